//! Runtime detection on real binaries, on the host (fast): Go programs built
//! here with Debian's Go, normal, stripped, and with their section headers
//! gone; busybox; a running Go process through /proc.

use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use zygote_agent::detect::{Class, classify, classify_pid};
use zygote_tests::build_gorand;

fn go_version() -> String {
    let out = Command::new("go")
        .arg("version")
        .output()
        .expect("go installed");
    // "go version go1.19.8 linux/amd64"
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .nth(2)
        .unwrap()
        .to_string()
}

#[test]
fn go_binaries_are_recognized_with_their_version_however_stripped() {
    let dir = zygote_tests::scratch_dir("detect-go");
    let (normal, stripped) = build_gorand(&dir);
    let version = go_version();
    for exe in [&normal, &stripped] {
        let c = classify(Some(&std::fs::File::open(exe).unwrap()), "");
        assert_eq!(c.class, Class::Go, "{}: {c:?}", exe.display());
        assert_eq!(c.version, version);
        assert_eq!(c.evidence, ".go.buildinfo section");
    }
    // No section headers at all: found by the build info's magic in the data segment.
    let headless: PathBuf = dir.join("gorand-headless");
    std::fs::copy(&stripped, &headless).unwrap();
    let f = std::fs::File::options()
        .write(true)
        .read(true)
        .open(&headless)
        .unwrap();
    f.write_all_at(&0u64.to_le_bytes(), 40).unwrap(); // e_shoff
    f.write_all_at(&0u16.to_le_bytes(), 60).unwrap(); // e_shnum
    let c = classify(Some(&f), "");
    assert_eq!(c.class, Class::Go, "{c:?}");
    assert_eq!(c.version, version);
    assert!(c.evidence.contains("magic"), "{c:?}");

    // busybox is not Go.
    if let Ok(bb) = std::fs::File::open("/bin/busybox") {
        assert_eq!(classify(Some(&bb), "").class, Class::Native);
    }

    // A running Go process, through /proc, as the reconcile sees it.
    let base = dir.join("run");
    let mut child = Command::new(&stripped).arg(&base).spawn().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let c = classify_pid(child.id());
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(c.class, Class::Go);
    assert_eq!(c.version, version);
    std::fs::remove_dir_all(&dir).unwrap();
}
