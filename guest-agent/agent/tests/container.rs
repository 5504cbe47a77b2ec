//! The container init on the host (as root): an OCI spec run in its own
//! namespaces over a busybox root file system made here. Fast, beside the few
//! real-VM tests.

use std::io::Read;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use zygote_agent::container::{launch, process_pid, ready_pipe, spec::launch_config, wait_ready};

mod common;
use common::{AGENT, busybox_rootfs, is_root, run, spec};

/// Launches `argv` in `root` with no stdio; the child (the container's
/// init) and what its started pipe said within 10 s.
fn launch_silent(
    root: &Path,
    argv: &[&str],
) -> (
    zygote_agent::procs::Child,
    Option<zygote_agent::container::Ready>,
) {
    let config = launch_config(&spec(argv, serde_json::json!({})), root).unwrap();
    let (ready, ready_w) = ready_pipe().unwrap();
    let child = launch(
        &config,
        Path::new(AGENT),
        Stdio::null(),
        Stdio::null(),
        Stdio::null(),
        &ready_w,
    )
    .unwrap();
    drop(ready_w);
    (child, wait_ready(&ready, Duration::from_secs(10)))
}

#[test]
fn process_spec_is_applied_inside_its_own_namespaces() {
    if !is_root() {
        return;
    }
    let root = busybox_rootfs("spec");
    let json = spec(
        &[
            "/bin/sh",
            "-c",
            "echo \"$GREETING\"; pwd; id -u; id -g; id -G; hostname; echo $$; \
          grep NoNewPrivs /proc/self/status; ulimit -n; ls /",
        ],
        serde_json::json!({
            "cwd": "/tmp", "env": ["GREETING=hello from a container", "PATH=/bin"],
            "user": {"uid": 1000, "gid": 1000, "additionalGids": [5]},
            "rlimits": [{"type": "RLIMIT_NOFILE", "soft": 64, "hard": 64}],
            "noNewPrivileges": true,
        }),
    );
    let (code, out, err) = run(&root, &json);
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        &lines[..9],
        [
            "hello from a container",
            "/tmp",
            "1000",
            "1000",
            "1000 5",
            "box",
            "1",
            "NoNewPrivs:\t1",
            "64"
        ],
        "{out}"
    );
    assert!(
        out.contains("bin") && !out.contains("zygote-rootfs"),
        "the root is the image: {out}"
    );
    // The host's hostname is untouched (a UTS namespace).
    assert_ne!(
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .unwrap()
            .trim(),
        "box"
    );
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn exit_codes_signals_and_start_failures() {
    if !is_root() {
        return;
    }
    let root = busybox_rootfs("exit");
    assert_eq!(
        run(
            &root,
            &spec(&["/bin/sh", "-c", "exit 3"], serde_json::json!({}))
        )
        .0,
        3
    );
    let (code, _, err) = run(
        &root,
        &spec(&["/bin/no-such-program"], serde_json::json!({})),
    );
    assert_eq!(code, 127);
    assert!(err.contains("exec /bin/no-such-program"), "{err}");
    let (code, _, err) = run(
        &root,
        &spec(&["/bin/sh"], serde_json::json!({"cwd": "/nonexistent"})),
    );
    assert_eq!(code, 127);
    assert!(err.contains("chdir /nonexistent"), "{err}");

    // A program that does not exist: the started pipe says why, and the
    // init exits 127 (the agent fails the start with it, as runc does).
    let (mut child, said) = launch_silent(&root, &["/bin/no-such-program"]);
    let said = said.expect("the pipe closes");
    let why = said.failed.expect("a missing program is a failed start");
    assert!(why.contains("exec /bin/no-such-program"), "{why}");
    assert_eq!(child.wait().unwrap().code(), Some(127));

    // Killed from outside by signal 9: reported as 128 + 9.
    let (mut child, ready_said) = launch_silent(&root, &["/bin/sleep", "100"]);
    let ready_said =
        ready_said.expect("the started pipe gives the pid and closes when the process has exec'd");
    assert_eq!(ready_said.failed, None);
    let started = ready_said.pid;
    let cmdline = std::fs::read_to_string(format!("/proc/{started}/cmdline")).unwrap_or_default();
    assert!(cmdline.starts_with("/bin/sleep"), "{cmdline:?}");
    let pid = (0..100)
        .find_map(|_| {
            std::thread::sleep(Duration::from_millis(20));
            process_pid(child.pid())
        })
        .expect("the container process appears");
    // SAFETY: kill(2) of the container process we just started.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    let status = child.wait().unwrap();
    assert_eq!(
        status.code(),
        Some(128 + 9),
        "{status:?} {:?}",
        status.signal()
    );
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn registry_runs_a_container_with_streams_over_an_overlay() {
    use std::os::unix::net::UnixStream;
    use zygote_agent::container::registry::{ContainerError, Registry, read_stdio_header};
    if !is_root() {
        return;
    }
    let image = busybox_rootfs("registry");
    let state = std::env::temp_dir().join(format!("zygote-registry-{}", std::process::id()));
    let registry = Registry::new(&state, Path::new(AGENT), None);
    let json = spec(
        &[
            "/bin/sh",
            "-c",
            "read line; echo \"got $line\"; echo to-err >&2; echo written > /etc/new; exit 7",
        ],
        serde_json::json!({}),
    );
    registry
        .create("c1", &json, image.to_str().unwrap(), 0, &[])
        .unwrap();
    assert!(matches!(
        registry.create("c1", &json, image.to_str().unwrap(), 0, &[]),
        Err(ContainerError::Exists(_))
    ));
    assert!(matches!(
        registry.create("../x", &json, image.to_str().unwrap(), 0, &[]),
        Err(ContainerError::InvalidId(_))
    ));
    assert!(matches!(
        registry.create("c2", &json, "relative", 0, &[]),
        Err(ContainerError::Rootfs(_))
    ));
    // A program that is not in the image fails the create (as runc's does),
    // on the PATH or by path, and leaves nothing.
    for program in ["no-such-program", "/bin/no-such-program"] {
        let missing = spec(&[program], serde_json::json!({}));
        assert!(
            matches!(
                registry.create("c3", &missing, image.to_str().unwrap(), 0, &[]),
                Err(ContainerError::NoProgram { .. })
            ),
            "{program}"
        );
        assert!(matches!(
            registry.start("c3"),
            Err(ContainerError::NotFound(_))
        ));
    }
    assert!(matches!(
        registry.start("nope"),
        Err(ContainerError::NotFound(_))
    ));

    // Streams attach before start, as the host does: nothing is lost.
    let attach = |name: &str| {
        let (host, guest) = UnixStream::pair().unwrap();
        let mut header = std::io::Cursor::new(format!("c1 {name}\n").into_bytes());
        let (id, which) = read_stdio_header(&mut header).unwrap();
        registry.attach(&id, &which, guest).unwrap();
        host
    };
    let mut stdin = attach("stdin");
    let mut stdout = attach("stdout");
    let mut stderr = attach("stderr");
    // stdin's bytes and its end can come before the start (containerd's
    // writer may be done by then): the process still reads them first.
    use std::io::Write;
    stdin.write_all(b"hello\n").unwrap();
    drop(stdin);
    std::thread::sleep(std::time::Duration::from_millis(100));
    registry.start("c1").unwrap();
    assert_eq!(registry.wait("c1").unwrap(), 7);
    assert!(
        matches!(registry.signal("c1", 9), Err(ContainerError::Finished(_))),
        "a signal after the exit: already finished (containerd's NOT_FOUND)"
    );
    let mut out = String::new();
    stdout.read_to_string(&mut out).unwrap();
    let mut err = String::new();
    stderr.read_to_string(&mut err).unwrap();
    assert_eq!(out, "got hello\n");
    assert_eq!(err, "to-err\n");
    // The write went to the container's own layer, not the image.
    assert!(!image.join("etc/new").exists());
    assert!(state.join("c1/upper/etc/new").exists());
    registry.remove("c1").unwrap();
    assert!(!state.join("c1").exists());

    // An exec joins a running container: its root, hostname and PID namespace.
    let sleeper = spec(&["/bin/sleep", "100"], serde_json::json!({}));
    registry
        .create("svc", &sleeper, image.to_str().unwrap(), 0, &[])
        .unwrap();
    assert!(
        matches!(
            registry.exec("svc", "e1", br#"{"args": ["/bin/true"], "cwd": "/"}"#),
            Err(ContainerError::State { .. })
        ),
        "no exec into a container that is not running"
    );
    registry.start("svc").unwrap();
    let process = br#"{"args": ["/bin/sh", "-c", "hostname; cat /proc/1/cmdline; echo; ls /"], "cwd": "/", "env": ["PATH=/bin"], "user": {"uid": 0, "gid": 0}}"#;
    // Right after the start: the exec waits for the container's PID 1.
    registry.exec("svc", "e1", process).unwrap();
    let (host, guest) = UnixStream::pair().unwrap();
    registry.attach("svc/e1", "stdout", guest).unwrap();
    registry.start("svc/e1").unwrap();
    assert_eq!(registry.wait("svc/e1").unwrap(), 0);
    let mut text = String::new();
    let mut host = host;
    host.read_to_string(&mut text).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], "box");
    assert!(lines[1].starts_with("/bin/sleep"), "{text}");
    assert!(
        text.contains("bin") && !text.contains("zygote-rootfs"),
        "{text}"
    );
    registry.remove("svc").unwrap();
    assert!(matches!(
        registry.wait("svc/e1"),
        Err(ContainerError::NotFound(_))
    ));
    assert!(matches!(
        registry.wait("c1"),
        Err(ContainerError::NotFound(_))
    ));
    assert!(read_stdio_header(&mut std::io::Cursor::new(b"no-newline".to_vec())).is_err());
    // The longest key, as the CRI names execs: two 64-character ids.
    let long = format!("{}/{} stdout\n", "a".repeat(64), "b".repeat(64));
    let (key, stream) = read_stdio_header(&mut std::io::Cursor::new(long.into_bytes())).unwrap();
    assert_eq!((key.len(), stream.as_str()), (129, "stdout"));
    let too_long = format!("{} stdout\n", "a".repeat(300));
    assert!(read_stdio_header(&mut std::io::Cursor::new(too_long.into_bytes())).is_err());
    std::fs::remove_dir_all(&image).unwrap();
    let _ = std::fs::remove_dir_all(&state);
}

/// A host end of one of `id`'s streams, attached as the agent's stdio port does.
fn attach_pair(
    registry: &zygote_agent::container::registry::Registry,
    id: &str,
    stream: &str,
) -> std::os::unix::net::UnixStream {
    let (host, guest) = std::os::unix::net::UnixStream::pair().unwrap();
    registry.attach(id, stream, guest).unwrap();
    host
}

#[test]
fn terminal_mode_close_stdin_and_a_limited_writable_layer() {
    use std::io::Write;
    use zygote_agent::container::registry::{ContainerError, Registry};
    if !is_root() {
        return;
    }
    let image = busybox_rootfs("tty");
    let state = std::env::temp_dir().join(format!("zygote-tty-{}", std::process::id()));
    let registry = Registry::new(&state, Path::new(AGENT), None);

    // A terminal: one output stream, the process's stdin is a tty of the size set.
    let json = spec(
        &[
            "/bin/sh",
            "-c",
            "[ -t 0 ] && [ -t 1 ] && echo is-a-tty; stty size; read x; echo got-$x",
        ],
        serde_json::json!({"terminal": true}),
    );
    registry
        .create("t1", &json, image.to_str().unwrap(), 0, &[])
        .unwrap();
    registry.resize_tty("t1", 100, 30).unwrap();
    let mut tty_in = attach_pair(&registry, "t1", "stdin");
    let mut tty_out = attach_pair(&registry, "t1", "stdout");
    assert!(
        matches!(
            registry.attach("t1", "stderr", std::io::empty()),
            Err(ContainerError::State { .. })
        ),
        "a terminal has no stderr"
    );
    registry.start("t1").unwrap();
    tty_in.write_all(b"hello\n").unwrap();
    let mut out = String::new();
    tty_out.read_to_string(&mut out).unwrap();
    assert_eq!(registry.wait("t1").unwrap(), 0, "{out}");
    assert!(out.contains("is-a-tty\r\n"), "{out:?}");
    assert!(out.contains("30 100\r\n"), "{out:?}");
    assert!(out.contains("got-hello\r\n"), "{out:?}");
    registry.remove("t1").unwrap();

    // CloseStdin: `cat` reads end of file though the host's stream stays open.
    let json = spec(&["/bin/sh", "-c", "cat; echo done"], serde_json::json!({}));
    registry
        .create("c1", &json, image.to_str().unwrap(), 0, &[])
        .unwrap();
    let stdin = attach_pair(&registry, "c1", "stdin");
    let mut stdout = attach_pair(&registry, "c1", "stdout");
    assert!(
        matches!(
            registry.resize_tty("c1", 80, 24),
            Err(ContainerError::State { .. })
        ),
        "not a terminal"
    );
    registry.start("c1").unwrap();
    (&stdin).write_all(b"before close\n").unwrap();
    registry.close_stdin("c1").unwrap();
    assert_eq!(registry.wait("c1").unwrap(), 0);
    let mut out = String::new();
    stdout.read_to_string(&mut out).unwrap();
    assert!(out.ends_with("done\n"), "{out:?}");
    registry.remove("c1").unwrap();
    drop(stdin);

    // The writable layer is a tmpfs of the size asked for: 8 MB do not fit in 4 MiB.
    let json = spec(
        &[
            "/bin/sh",
            "-c",
            "head -c 8000000 /dev/zero > /big || echo full",
        ],
        serde_json::json!({}),
    );
    registry
        .create("w1", &json, image.to_str().unwrap(), 4, &[])
        .unwrap();
    let mut stdout = attach_pair(&registry, "w1", "stdout");
    registry.start("w1").unwrap();
    registry.wait("w1").unwrap();
    let mut out = String::new();
    stdout.read_to_string(&mut out).unwrap();
    assert!(out.contains("full"), "{out:?}");
    registry.remove("w1").unwrap();
    assert!(!state.join("w1").exists(), "its tmpfs is gone");
    std::fs::remove_dir_all(&image).unwrap();
    let _ = std::fs::remove_dir_all(&state);
}

/// A spec whose mounts begin with containerd's defaults (as `ctr`'s and
/// the CRI's do), then `extra`.
fn default_mounts_spec(
    args: &[&str],
    process: serde_json::Value,
    extra: serde_json::Value,
) -> Vec<u8> {
    let mut v: serde_json::Value = serde_json::from_slice(&spec(args, process)).unwrap();
    let mut mounts: Vec<serde_json::Value> = zygote_agent::container::staged::premade_mounts()
        .iter()
        .map(|m| {
            serde_json::json!({"destination": m.destination, "type": m.fstype,
                "source": m.source, "options": m.options})
        })
        .collect();
    mounts.extend(extra.as_array().unwrap().iter().cloned());
    v["mounts"] = serde_json::Value::Array(mounts);
    serde_json::to_vec(&v).unwrap()
}

#[test]
fn a_staged_container_takes_its_spec_at_start_and_only_once() {
    use zygote_agent::container::registry::{ContainerError, Registry};
    if !is_root() {
        return;
    }
    let image = busybox_rootfs("staged");
    let state = std::env::temp_dir().join(format!("zygote-staged-{}", std::process::id()));
    let registry = Registry::new(&state, Path::new(AGENT), None);
    let rootfs = image.to_str().unwrap();
    let staged = state.join("@staged");
    let init = registry.stage(rootfs, 0).unwrap();
    assert!(
        matches!(registry.stage(rootfs, 0), Err(ContainerError::Exists(_))),
        "one at a time"
    );
    assert!(Path::new(&format!("/proc/{init}")).exists());
    let tmp = serde_json::json!([{"destination": "/tmp", "type": "tmpfs", "source": "tmpfs",
        "options": ["nosuid", "nodev"]}]);
    let script = "echo \"$GREETING\"; hostname; id -u; pwd; ls /dev/pts/ptmx >/dev/null && echo x > /dev/null && ls -l /dev/null | head -c 10; echo; \
        grep -c ' /tmp tmpfs' /proc/mounts; grep -c ' /sys sysfs ro' /proc/mounts; echo $$; exit 3";
    let json = default_mounts_spec(
        &["/bin/sh", "-c", script],
        serde_json::json!({"env": ["PATH=/bin", "GREETING=hello"], "user": {"uid": 1000, "gid": 1000}, "cwd": "/tmp"}),
        tmp.clone(),
    );
    // The first container over the image takes it: its state is the staged one's.
    registry.create("s1", &json, rootfs, 0, &[]).unwrap();
    assert!(staged.exists() && !state.join("s1").exists());
    let mut out = attach_pair(&registry, "s1", "stdout");
    let mut err = attach_pair(&registry, "s1", "stderr");
    registry.start("s1").unwrap();
    assert_eq!(registry.wait("s1").unwrap(), 3);
    let (mut text, mut errors) = (String::new(), String::new());
    out.read_to_string(&mut text).unwrap();
    err.read_to_string(&mut errors).unwrap();
    assert_eq!(
        text, "hello\nbox\n1000\n/tmp\ncrw-rw-rw-\n1\n1\n1\n",
        "stderr: {errors}"
    );
    registry.remove("s1").unwrap();
    assert!(!staged.exists(), "its root went with it");
    assert!(!Path::new(&format!("/proc/{init}")).exists());

    // The next takes the normal path.
    registry.create("s2", &json, rootfs, 0, &[]).unwrap();
    assert!(state.join("s2").exists());
    registry.remove("s2").unwrap();

    // A terminal, and a spec without the default /sys (unmounted at start).
    registry.stage(rootfs, 0).unwrap();
    let mut json: serde_json::Value = serde_json::from_slice(&default_mounts_spec(
        &[
            "/bin/sh",
            "-c",
            "[ -t 0 ] && echo tty; hostname; grep -c ' /sys ' /proc/mounts",
        ],
        serde_json::json!({"terminal": true}),
        tmp,
    ))
    .unwrap();
    json["mounts"].as_array_mut().unwrap().remove(3);
    // No hostname of its own: the VM's (here the host's), as a fresh UTS
    // namespace would have copied it at start.
    json.as_object_mut().unwrap().remove("hostname");
    let json = serde_json::to_vec(&json).unwrap();
    registry.create("t1", &json, rootfs, 0, &[]).unwrap();
    assert!(staged.exists(), "took the staged one");
    let mut out = attach_pair(&registry, "t1", "stdout");
    registry.start("t1").unwrap();
    let mut text = String::new();
    out.read_to_string(&mut text).unwrap();
    assert_eq!(registry.wait("t1").unwrap(), 1, "grep found none: {text:?}");
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    assert_eq!(text, format!("tty\r\n{}\r\n0\r\n", host.trim()));
    registry.remove("t1").unwrap();

    // A spec the staged mounts do not fit leaves it for another; one that
    // takes it and is removed unstarted leaves nothing.
    let init = registry.stage(rootfs, 0).unwrap();
    // Its own /dev, then the default /dev/pts: the staged /dev/pts would be
    // under a /dev made after it.
    let mut other: serde_json::Value =
        serde_json::from_slice(&spec(&["/bin/sh", "-c", "true"], serde_json::json!({}))).unwrap();
    let pts = &zygote_agent::container::staged::premade_mounts()[2];
    other["mounts"] = serde_json::json!([
        {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid"]},
        {"destination": pts.destination, "type": pts.fstype, "source": pts.source, "options": pts.options}
    ]);
    let other = serde_json::to_vec(&other).unwrap();
    registry.create("n1", &other, rootfs, 0, &[]).unwrap();
    assert!(state.join("n1").exists(), "normal path");
    registry.remove("n1").unwrap();
    let fits = default_mounts_spec(&["/bin/sh"], serde_json::json!({}), serde_json::json!([]));
    registry.create("u1", &fits, rootfs, 0, &[]).unwrap();
    registry.remove("u1").unwrap();
    assert!(!staged.exists());
    assert!(!Path::new(&format!("/proc/{init}")).exists());

    // A program missing from the image fails the create and spends the slot cleanly.
    let init = registry.stage(rootfs, 0).unwrap();
    let missing = default_mounts_spec(
        &["/bin/nothing"],
        serde_json::json!({}),
        serde_json::json!([]),
    );
    assert!(matches!(
        registry.create("m1", &missing, rootfs, 0, &[]),
        Err(ContainerError::NoProgram { .. })
    ));
    assert!(!staged.exists());
    assert!(!Path::new(&format!("/proc/{init}")).exists());
    registry.stage(rootfs, 0).unwrap();
    registry.unstage();
    assert!(!staged.exists());
    std::fs::remove_dir_all(&image).unwrap();
    let _ = std::fs::remove_dir_all(&state);
}
