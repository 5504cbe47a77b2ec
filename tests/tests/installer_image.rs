//! The Helm chart's installer image as `hack/installer-image` builds it: an
//! OCI archive that containerd imports, whose `zygote` CLI runs in a
//! container (runc, as the DaemonSet's pod runs on a node) with the
//! libraries the image carries, and which holds everything an install puts
//! on a node.

use std::path::Path;
use std::process::Command;

use zygote_tests::ctr::{cleanup, containerd_available, ctr, text};

#[test]
fn the_installer_image_imports_and_its_cli_runs_in_a_container() {
    if !containerd_available() {
        return;
    }
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = std::env::temp_dir().join(format!("zygote-installer-{}.tar", std::process::id()));
    let built = Command::new(src.join("hack/installer-image"))
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(built.status.success(), "{}", text(&built.stderr));

    let base = "zygote.local/zygote-installer-test";
    let imported = ctr(&[
        "images",
        "import",
        "--base-name",
        base,
        out.to_str().unwrap(),
    ]);
    std::fs::remove_file(&out).unwrap();
    assert!(imported.status.success(), "{}", text(&imported.stderr));
    let listed = text(&ctr(&["images", "ls", "-q"]).stdout);
    let image = listed
        .lines()
        .find(|l| l.starts_with(&format!("{base}:")))
        .unwrap_or_else(|| panic!("{base} not imported: {listed}"))
        .to_string();

    let id = format!("installer-{}", std::process::id());
    cleanup(&id);
    // The image's default command (`zygote node status`) against an empty
    // node root: it runs (its libraries are in the image) and says nothing
    // is installed. Then what the image carries for an install.
    let status = ctr(&["run", "--rm", &image, &id]);
    let listing = ctr(&[
        "run",
        "--rm",
        &image,
        &format!("{id}-ls"),
        "/bin/ls",
        "/opt/zygote-dist",
        "/opt/zygote-dist/bin",
        "/bin/nsenter",
    ]);
    let _ = ctr(&["images", "rm", &image]);
    assert!(status.status.success(), "{}", text(&status.stderr));
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(status["registered"], false, "{status}");
    assert!(
        status["artefacts"]
            .as_array()
            .unwrap()
            .iter()
            .all(|a| a[1] == false),
        "{status}"
    );
    let listing = text(&listing.stdout);
    for file in [
        "vmlinux",
        "initramfs.cpio",
        "zygote",
        "containerd-shim-zygote-v2",
        "/bin/nsenter",
    ] {
        assert!(
            listing.lines().any(|l| l.trim() == file),
            "{file} in the image: {listing}"
        );
    }
}
