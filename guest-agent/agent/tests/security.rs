//! The spec's security fields as the container's init applies them, and a
//! hostile image, on the host (as root): fast, beside the real-VM tests in
//! tests/tests/containerd.rs that compare the same with runc.

use std::os::unix::fs::symlink;
use std::path::Path;

use zygote_agent::container::spec::{SpecError, launch_config};

mod common;
use common::{busybox_rootfs, is_root, run, spec};

/// `spec(args)` with `f` applied to its JSON.
fn spec_with(args: &[&str], f: impl FnOnce(&mut serde_json::Value)) -> Vec<u8> {
    let mut v: serde_json::Value =
        serde_json::from_slice(&spec(args, serde_json::json!({}))).unwrap();
    f(&mut v);
    serde_json::to_vec(&v).unwrap()
}

#[test]
fn a_hostile_image_cannot_make_the_init_touch_anything_outside_its_root() {
    if !is_root() {
        return;
    }
    let root = busybox_rootfs("hostile");
    let outside = root.with_file_name(format!(
        "{}-outside",
        root.file_name().unwrap().to_string_lossy()
    ));
    let _ = std::fs::remove_dir_all(&outside);
    std::fs::create_dir_all(outside.join("dir")).unwrap();
    let init = outside.join("init");
    std::fs::write(&init, "the guest's /init").unwrap();
    // Links in the image that lead out of the root if followed from outside
    // it: to a file the spec binds over, to a directory a mount goes under
    // (absolute, and relative with more `..` than the root is deep).
    symlink(&init, root.join("etc/hostname")).unwrap();
    symlink(outside.join("dir"), root.join("data")).unwrap();
    let up = "../".repeat(root.components().count() + 2);
    symlink(
        format!("{up}{}", outside.join("dir").display()),
        root.join("run"),
    )
    .unwrap();
    let bound = outside.with_extension("hostname");
    std::fs::write(&bound, "from-the-spec\n").unwrap();
    let json = spec_with(
        &[
            "/bin/sh",
            "-c",
            "cat /etc/hostname; cd /data/sub && echo data-ok; cd /run/x && echo run-ok",
        ],
        |v| {
            let mounts = v["mounts"].as_array_mut().unwrap();
            mounts.push(
                serde_json::json!({"destination": "/etc/hostname", "type": "bind",
                "source": bound, "options": ["rbind", "ro"]}),
            );
            mounts.push(
                serde_json::json!({"destination": "/data/sub", "type": "tmpfs", "source": "tmpfs"}),
            );
            mounts.push(
                serde_json::json!({"destination": "/run/x", "type": "tmpfs", "source": "tmpfs"}),
            );
        },
    );
    let (code, out, err) = run(&root, &json);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(out, "from-the-spec\ndata-ok\nrun-ok\n");
    // Outside the root: nothing written, nothing made.
    assert_eq!(std::fs::read_to_string(&init).unwrap(), "the guest's /init");
    assert_eq!(std::fs::read_dir(outside.join("dir")).unwrap().count(), 0);
    assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 2);
    std::fs::remove_dir_all(&root).unwrap();
    std::fs::remove_dir_all(&outside).unwrap();
    std::fs::remove_file(&bound).unwrap();
}

#[test]
fn the_seccomp_profile_holds_the_process_and_not_before() {
    if !is_root() {
        return;
    }
    let root = busybox_rootfs("seccomp");
    symlink("busybox", root.join("bin/unshare")).unwrap();
    let script = "unshare -U true && echo userns-ok; grep Seccomp: /proc/self/status";
    let profile = |v: &mut serde_json::Value| {
        v["linux"] = serde_json::json!({"seccomp": {
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": ["SCMP_ARCH_X86_64"],
        "syscalls": [
            {"names": ["unshare", "keyctl"], "action": "SCMP_ACT_ERRNO"},
            {"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": 38},
        ]}});
    };
    // Without a profile the same call works (so the filter is what stops it).
    let (code, out, err) = run(
        &root,
        &spec(&["/bin/sh", "-c", script], serde_json::json!({})),
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, "userns-ok\nSeccomp:\t0\n");
    let (code, out, err) = run(&root, &spec_with(&["/bin/sh", "-c", script], profile));
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, "Seccomp:\t2\n");
    assert!(err.contains("Operation not permitted"), "{err}");
    // With no_new_privs too (the filter goes on last).
    let (code, out, err) = run(
        &root,
        &spec_with(&["/bin/sh", "-c", script], |v| {
            profile(v);
            v["process"]["noNewPrivileges"] = true.into();
        }),
    );
    assert_eq!((code, out.as_str()), (0, "Seccomp:\t2\n"), "{err}");
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn sysctls_and_oom_score_adj() {
    if !is_root() {
        return;
    }
    let root = busybox_rootfs("sysctl");
    let host_shmmax = std::fs::read_to_string("/proc/sys/kernel/shmmax").unwrap();
    let json = spec_with(
        &[
            "/bin/sh",
            "-c",
            "cat /proc/sys/kernel/shmmax /proc/sys/kernel/domainname /proc/self/oom_score_adj",
        ],
        |v| {
            v["linux"] = serde_json::json!({"sysctl": {
                "kernel.shmmax": "123456", "kernel.domainname": "pod.example"}});
            v["process"]["oomScoreAdj"] = 500.into();
        },
    );
    let (code, out, err) = run(&root, &json);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, "123456\npod.example\n500\n");
    // The host's (this test's namespaces) unchanged.
    assert_eq!(
        std::fs::read_to_string("/proc/sys/kernel/shmmax").unwrap(),
        host_shmmax
    );

    // Refused when the spec is read: not the container's, not a name, out of range.
    let refused = |f: &dyn Fn(&mut serde_json::Value)| {
        launch_config(&spec_with(&["/bin/true"], f), &root).unwrap_err()
    };
    for name in [
        "kernel.panic",
        "vm.overcommit_memory",
        "net/../kernel/panic",
        "net..x",
    ] {
        let e = refused(&|v| v["linux"] = serde_json::json!({"sysctl": {name: "1"}}));
        assert!(matches!(e, SpecError::Sysctl(..)), "{name}: {e}");
    }
    let e = refused(&|v| v["process"]["oomScoreAdj"] = 1001.into());
    assert!(matches!(e, SpecError::OomScoreAdj(1001)), "{e}");
    let e = refused(&|v| {
        v["linux"] = serde_json::json!({"seccomp": {"defaultAction": "SCMP_ACT_NOTIFY"}})
    });
    assert!(matches!(e, SpecError::Seccomp(_)), "{e}");
    assert!(Path::new(&root).exists());
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn containers_join_the_pods_ipc_and_pid_namespaces_when_the_spec_names_them() {
    use std::io::Read;
    use std::os::unix::net::UnixStream;
    use zygote_agent::container::registry::Registry;
    if !is_root() {
        return;
    }
    let image = busybox_rootfs("podns");
    symlink("busybox", image.join("bin/readlink")).unwrap();
    let state = std::env::temp_dir().join(format!("zygote-podns-{}", std::process::id()));
    let registry = Registry::new(&state, Path::new(common::AGENT), None);
    let script = "readlink /proc/self/ns/ipc; readlink /proc/self/ns/pid; echo $$; \
                  tr '\\0' ' ' < /proc/1/cmdline; echo";
    // As the CRI names the pause container's namespaces (any path: the pod's).
    let run = |id: &str, shared: &[&str]| {
        let json = spec_with(&["/bin/sh", "-c", script], |v| {
            let ns: Vec<serde_json::Value> = ["mount", "uts", "ipc", "pid"]
                .iter()
                .map(|t| {
                    if shared.contains(t) {
                        serde_json::json!({"type": t, "path": format!("/proc/77/ns/{t}")})
                    } else {
                        serde_json::json!({"type": t})
                    }
                })
                .collect();
            v["linux"] = serde_json::json!({"namespaces": ns});
        });
        registry
            .create(id, &json, image.to_str().unwrap(), 0, &[])
            .unwrap();
        let (mut host, guest) = UnixStream::pair().unwrap();
        registry.attach(id, "stdout", guest).unwrap();
        registry.start(id).unwrap();
        assert_eq!(registry.wait(id).unwrap(), 0, "{id}");
        let mut out = String::new();
        host.read_to_string(&mut out).unwrap();
        let lines: Vec<String> = out.lines().map(String::from).collect();
        assert_eq!(lines.len(), 4, "{id}: {out}");
        lines
    };
    let first = run("first", &["ipc"]);
    let second = run("second", &["ipc", "pid"]);
    let own = run("own", &[]);
    let host_ipc = std::fs::read_link("/proc/self/ns/ipc").unwrap();
    // IPC: the pod's, shared by the two that name it; the third has its own.
    assert_eq!(first[0], second[0]);
    assert_ne!(first[0], own[0]);
    assert_ne!(first[0], host_ipc.to_string_lossy());
    // PID: the second is in the pod's namespace, whose PID 1 is the holder
    // (as the pause container is); the others are their namespace's PID 1.
    assert_ne!(second[1], first[1]);
    assert_ne!(second[2], "1");
    assert!(second[3].contains("pod-namespaces"), "{second:?}");
    assert_eq!((first[2].as_str(), own[2].as_str()), ("1", "1"));
    for id in ["first", "second", "own"] {
        registry.remove(id).unwrap();
    }
    drop(registry);
    let _ = std::fs::remove_dir_all(&state);
    std::fs::remove_dir_all(&image).unwrap();
}
