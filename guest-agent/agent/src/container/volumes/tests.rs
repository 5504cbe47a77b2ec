use super::*;

fn entry(path: &str, kind: EntryKind, mode: u32) -> VolumeEntry {
    // SAFETY: getuid and getgid have no preconditions and cannot fail.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    VolumeEntry {
        path: path.into(),
        kind: kind as i32,
        mode,
        uid,
        gid,
        ..Default::default()
    }
}
fn file(path: &str, data: &str, mode: u32) -> VolumeEntry {
    VolumeEntry {
        data: data.as_bytes().to_vec(),
        ..entry(path, EntryKind::File, mode)
    }
}
fn link(path: &str, target: &str) -> VolumeEntry {
    VolumeEntry {
        target: target.into(),
        ..entry(path, EntryKind::Symlink, 0o777)
    }
}
/// A configMap as kubelet's atomic writer lays it out.
fn config_map(stamp: &str, keys: &[(&str, &str)]) -> Volume {
    let mut entries = vec![
        entry("", EntryKind::Dir, 0o777),
        entry(stamp, EntryKind::Dir, 0o755),
    ];
    for (k, v) in keys {
        entries.push(file(&format!("{stamp}/{k}"), v, 0o644));
    }
    entries.push(link("..data", stamp));
    for (k, _) in keys {
        entries.push(link(k, &format!("..data/{k}")));
    }
    Volume {
        name: "cfg".into(),
        entries,
        shared: false,
        ..Default::default()
    }
}

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("zygote-vol-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn a_config_map_is_written_then_swapped_as_kubelet_does() {
    let d = scratch("cm");
    let root = d.join("cfg");
    write(
        &root,
        &config_map("..2026_12_03_1", &[("a", "1"), ("b", "2")]),
    )
    .unwrap();
    assert_eq!(std::fs::read_to_string(root.join("a")).unwrap(), "1");
    assert_eq!(
        std::fs::read_link(root.join("..data")).unwrap(),
        Path::new("..2026_12_03_1")
    );
    // An update: key b gone, c new, a changed; the old stamp goes.
    write(
        &root,
        &config_map("..2026_12_03_2", &[("a", "3"), ("c", "4")]),
    )
    .unwrap();
    assert_eq!(std::fs::read_to_string(root.join("a")).unwrap(), "3");
    assert_eq!(std::fs::read_to_string(root.join("c")).unwrap(), "4");
    assert!(std::fs::symlink_metadata(root.join("b")).is_err());
    assert!(!root.join("..2026_12_03_1").exists());
    let mut names: Vec<_> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["..2026_12_03_2", "..data", "a", "c"]);
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn a_file_volume_is_rewritten_in_place_and_read_back() {
    let d = scratch("file");
    let root = d.join("termination-log");
    let v = |data: &str, mode| Volume {
        name: "log".into(),
        entries: vec![file("", data, mode)],
        shared: false,
        ..Default::default()
    };
    write(&root, &v("", 0o666)).unwrap();
    use std::os::unix::fs::MetadataExt;
    let ino = std::fs::metadata(&root).unwrap().ino();
    write(&root, &v("hosts v2", 0o644)).unwrap();
    let m = std::fs::metadata(&root).unwrap();
    assert_eq!((m.ino(), m.mode() & 0o7777), (ino, 0o644));
    std::fs::write(&root, "bye from the container").unwrap();
    assert_eq!(read(&root, "log", 3).unwrap(), b"bye");
    assert!(
        read(&d, "log", 10).is_err(),
        "a directory is no file volume"
    );
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn modes_are_kept() {
    let d = scratch("modes");
    let root = d.join("secret");
    let v = Volume {
        name: "s".into(),
        entries: vec![
            entry("", EntryKind::Dir, 0o1777),
            file("token", "t0k3n", 0o400),
        ],
        shared: false,
        ..Default::default()
    };
    write(&root, &v).unwrap();
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode(&root), 0o1777);
    assert_eq!(mode(&root.join("token")), 0o400);
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn what_the_host_may_not_send_is_refused_before_anything_is_written() {
    let d = scratch("bad");
    let root = d.join("v");
    let with = |entries: Vec<VolumeEntry>| Volume {
        name: "v".into(),
        entries,
        shared: false,
        ..Default::default()
    };
    let dir = || entry("", EntryKind::Dir, 0o755);
    let cases = [
        ("escape", with(vec![dir(), file("../x", "", 0o644)])),
        ("absolute", with(vec![dir(), file("/etc/x", "", 0o644)])),
        ("link out", with(vec![dir(), link("l", "../../etc")])),
        ("absolute link", with(vec![dir(), link("l", "/etc/shadow")])),
        ("orphan", with(vec![dir(), file("a/b", "", 0o644)])),
        (
            "twice",
            with(vec![dir(), file("a", "", 0o644), file("a", "", 0o644)]),
        ),
        ("no root", with(vec![file("a", "", 0o644)])),
        ("mode", with(vec![dir(), file("a", "", 0o17777)])),
        (
            "bad name",
            Volume {
                name: "..".into(),
                ..with(vec![dir()])
            },
        ),
    ];
    for (what, v) in cases {
        assert!(write(&root, &v).is_err(), "{what} accepted");
        assert!(!root.exists(), "{what} wrote something");
    }
    // A link may go up inside the volume.
    let ok = with(vec![
        dir(),
        entry("a", EntryKind::Dir, 0o755),
        link("a/l", "../b"),
    ]);
    write(&root, &ok).unwrap();
    std::fs::remove_dir_all(&d).unwrap();
}
