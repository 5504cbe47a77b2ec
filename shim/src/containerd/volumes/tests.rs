use std::sync::{Mutex, mpsc};
use std::time::Duration;

use serde_json::json;

use super::watch::{Watcher, write_back};
use super::*;

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("zygote-shim-vol-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// kubelet's atomic writer: a new stamped directory, `..data` swapped to
/// it, a link per key, the old directory removed.
fn kubelet_write(dir: &Path, stamp: &str, keys: &[(&str, &str)]) {
    let new = dir.join(stamp);
    std::fs::create_dir_all(&new).unwrap();
    for (k, v) in keys {
        std::fs::write(new.join(k), v).unwrap();
    }
    let old = std::fs::read_link(dir.join("..data")).ok();
    let tmp = dir.join("..data_tmp");
    std::os::unix::fs::symlink(stamp, &tmp).unwrap();
    std::fs::rename(&tmp, dir.join("..data")).unwrap();
    for (k, _) in keys {
        let _ = std::os::unix::fs::symlink(format!("..data/{k}"), dir.join(k));
    }
    if let Some(old) = old {
        std::fs::remove_dir_all(dir.join(old)).unwrap();
    }
}

fn bind(destination: &str, source: &Path, ro: bool) -> Value {
    let mut options = vec!["rbind", "rprivate"];
    if ro {
        options.push("ro");
    }
    json!({"destination": destination, "type": "bind",
           "source": source.to_str().unwrap(), "options": options})
}

/// A tmpfs of `size` bytes mounted on `dir` as kubelet mounts a memory
/// emptyDir; unmounted when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: u64) -> Tmpfs {
        let c = |s: &str| std::ffi::CString::new(s).unwrap();
        let (source, target, data) = (
            c("tmpfs"),
            c(dir.to_str().unwrap()),
            c(&format!("size={size}")),
        );
        // SAFETY: valid NUL-terminated strings for the call.
        let rc = unsafe {
            libc::mount(
                source.as_ptr(),
                target.as_ptr(),
                source.as_ptr(),
                0,
                data.as_ptr().cast(),
            )
        };
        assert_eq!(
            rc,
            0,
            "mount a tmpfs (the tests run as root): {}",
            std::io::Error::last_os_error()
        );
        Tmpfs(dir.into())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let target = std::ffi::CString::new(self.0.to_str().unwrap()).unwrap();
        // SAFETY: a valid path string.
        unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
    }
}

#[test]
fn kubelet_mounts_are_copied_shared_or_served_from_the_host() {
    let d = scratch("place");
    let pod = d.join("pods/uid1");
    let cm = pod.join("volumes/kubernetes.io~configmap/cfg");
    let empty = pod.join("volumes/kubernetes.io~empty-dir/scratch");
    let memory = pod.join("volumes/kubernetes.io~empty-dir/mem");
    let host_dir = d.join("hostpath");
    let shm = d.join("sandboxes/p1/shm");
    for dir in [&cm, &empty, &memory, &host_dir, &shm] {
        std::fs::create_dir_all(dir).unwrap();
    }
    let _tmpfs = Tmpfs::mount(&memory, 8 << 20);
    kubelet_write(&cm, "..2026_12_03_01", &[("key", "v1")]);
    std::os::unix::fs::symlink("/etc/passwd", cm.join("out")).unwrap();
    let hosts = pod.join("etc-hosts");
    std::fs::write(&hosts, "127.0.0.1 localhost\n").unwrap();
    let log = pod.join("containers/app/0abc");
    std::fs::create_dir_all(log.parent().unwrap()).unwrap();
    std::fs::write(&log, "").unwrap();
    let mut spec = json!({"mounts": [
        {"destination": "/proc", "type": "proc", "source": "proc"},
        bind("/etc/cfg", &cm, true),
        bind("/etc/hosts", &hosts, false),
        bind("/dev/termination-log", &log, false),
        bind("/cache", &empty, false),
        bind("/cache2", &empty, false),
        bind("/mem", &memory, false),
        bind("/dev/shm", &shm, false),
        bind("/data", &host_dir, false),
        bind("/data-ro", &host_dir, true),
        bind("/dev/null2", Path::new("/dev/null"), false),
    ]});
    let placed = place(&mut spec).unwrap();
    let mounts = spec["mounts"].as_array().unwrap();
    let sources: Vec<&str> = mounts
        .iter()
        .map(|m| m["source"].as_str().unwrap())
        .collect();
    let volume = |name: String| format!("zygote-volume:{name}");
    let (cache, data) = (
        volume(host_name(empty.to_str().unwrap(), false)),
        volume(host_name(host_dir.to_str().unwrap(), false)),
    );
    assert_eq!(
        sources,
        [
            "proc",
            "zygote-volume:v0",
            "zygote-volume:v1",
            "zygote-volume:v2",
            &cache,
            &cache,
            &volume(shared_name("/mem", memory.to_str().unwrap())),
            "zygote-volume:shm",
            &data,
            &volume(host_name(host_dir.to_str().unwrap(), true)),
        ]
    );
    assert_eq!(placed.notes.len(), 1, "{:?}", placed.notes);
    assert!(placed.notes[0].contains("/dev/null2"));
    let copied: Vec<(&str, bool)> = placed
        .copied
        .iter()
        .map(|c| (c.name.as_str(), c.write_back))
        .collect();
    assert_eq!(copied, [("v0", false), ("v1", true), ("v2", true)]);
    // The configMap as kubelet laid it out, without the link that leaves it.
    let cfg = &placed.volumes[0];
    let paths: Vec<&str> = cfg.entries.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(
        paths,
        [
            "",
            "..2026_12_03_01",
            "..data",
            "key",
            "..2026_12_03_01/key"
        ]
    );
    // Served from the host: the disk-backed emptyDir (once for its two
    // mounts) and the hostPath, read-write and read-only apart.
    let hosted: Vec<(&Path, bool)> = placed
        .hosted
        .iter()
        .map(|h| (h.host.as_path(), h.read_only))
        .collect();
    assert_eq!(
        hosted,
        [
            (empty.as_path(), false),
            (host_dir.as_path(), false),
            (host_dir.as_path(), true)
        ]
    );
    // Shared and host volumes carry their directory only; the memory
    // emptyDir its size.
    let by_name = |n: &str| {
        placed
            .volumes
            .iter()
            .find(|v| volume(v.name.clone()) == n)
            .unwrap()
    };
    let mem = by_name(&volume(shared_name("/mem", memory.to_str().unwrap())));
    assert!(mem.shared && !mem.host && mem.entries.len() == 1);
    assert_eq!(mem.size_bytes, 8 << 20);
    let cache = by_name(&cache);
    assert!(cache.host && !cache.shared && cache.entries.len() == 1);
    assert_eq!(
        by_name("zygote-volume:shm").size_bytes,
        0,
        "not a tmpfs here"
    );
    drop(_tmpfs);
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn too_much_to_copy_is_a_clear_error() {
    let d = scratch("big");
    let secret = d.join("volumes/kubernetes.io~secret/big");
    std::fs::create_dir_all(&secret).unwrap();
    std::fs::write(secret.join("a"), vec![0u8; 2 << 20]).unwrap();
    std::fs::write(secret.join("b"), vec![0u8; 2 << 20]).unwrap();
    let mut spec = json!({"mounts": [bind("/s", &secret, true)]});
    let e = place(&mut spec).unwrap_err().to_string();
    assert!(
        e.contains("more than zygote copies") && e.contains("big"),
        "{e}"
    );
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn a_kubelet_update_is_sent_once_it_settles() {
    let d = scratch("watch");
    let cm = d.join("volumes/kubernetes.io~configmap/cfg");
    std::fs::create_dir_all(&cm).unwrap();
    kubelet_write(&cm, "..1", &[("key", "v1")]);
    let hosts = d.join("etc-hosts");
    std::fs::write(&hosts, "a").unwrap();
    let mut spec = json!({"mounts": [bind("/cfg", &cm, true), bind("/etc/hosts", &hosts, true)]});
    let placed = place(&mut spec).unwrap();
    let (tx, rx) = mpsc::channel();
    let tx = Mutex::new(tx);
    let watcher = Watcher::start(Box::new(move |id: &str, v: Volume| {
        tx.lock().unwrap().send((id.to_string(), v)).unwrap();
        Ok(())
    }))
    .unwrap();
    watcher.add("app", &placed.copied);
    kubelet_write(&cm, "..2", &[("key", "v2")]);
    let (id, v) = rx.recv_timeout(Duration::from_secs(20)).expect("sent");
    assert_eq!((id.as_str(), v.name.as_str()), ("app", "v0"));
    let key = v
        .entries
        .iter()
        .find(|e| e.path == "..2/key")
        .expect("new key");
    assert_eq!(key.data, b"v2");
    // The file volume, replaced by rename as an editor would.
    std::fs::write(d.join("hosts.new"), "b").unwrap();
    std::fs::rename(d.join("hosts.new"), &hosts).unwrap();
    let (_, v) = rx.recv_timeout(Duration::from_secs(20)).expect("sent");
    assert_eq!(
        (v.name.as_str(), v.entries[0].data.as_slice()),
        ("v1", &b"b"[..])
    );
    // Nothing more once the container is gone.
    watcher.remove("app");
    kubelet_write(&cm, "..3", &[("key", "v3")]);
    assert!(rx.recv_timeout(Duration::from_secs(2)).is_err());
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn a_write_back_does_not_follow_a_link() {
    let d = scratch("back");
    let log = d.join("log");
    std::fs::write(&log, "").unwrap();
    write_back(&log, b"bye").unwrap();
    assert_eq!(std::fs::read(&log).unwrap(), b"bye");
    let victim = d.join("victim");
    std::fs::write(&victim, "keep").unwrap();
    let link = d.join("link");
    std::os::unix::fs::symlink(&victim, &link).unwrap();
    assert!(write_back(&link, b"x").is_err());
    assert_eq!(std::fs::read(&victim).unwrap(), b"keep");
    std::fs::remove_dir_all(&d).unwrap();
}
