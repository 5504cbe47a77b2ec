//! The shim under real containerd (Debian's 1.6, started by `hack/containerd`,
//! which `hack/test` runs first): `ctr run` in a forked VM with stdin read to
//! its end, the task events in order, a `binary://` logger, exec/ps/metrics/
//! kill, an OOM kill with its event, a terminal, two containers from one
//! template, and failures that leave nothing behind.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use zygote_tests::{PvmSegv, retry_pvm_segv, vm_lock};

use zygote_tests::ctr::*;
use zygote_tests::{containerd_socket as socket, test_image as image};

/// `ctr events`, collected in the background.
struct Events {
    child: Child,
    lines: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Events {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Events {
    fn start() -> Self {
        let mut child = ctr_cmd(&["events"]).stdout(Stdio::piped()).spawn().unwrap();
        let out = child.stdout.take().unwrap();
        let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = lines.clone();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        // containerd subscribes the client before the first event it must see.
        std::thread::sleep(Duration::from_millis(300));
        Events {
            child,
            lines,
            reader: Some(reader),
        }
    }

    /// The exit status of process `process` (the container's id for its
    /// init, else the exec id) of container `id`, from its `/tasks/exit`
    /// event if one came within `wait`.
    fn exit_status(&self, id: &str, process: &str, wait: Duration) -> Option<i64> {
        let deadline = Instant::now() + wait;
        loop {
            let found = self.lines.lock().unwrap().iter().find_map(|l| {
                // "DATE TIME ZONE UTC NAMESPACE /tasks/exit {...}"
                let json = &l[l.find(" /tasks/exit ")? + " /tasks/exit ".len()..];
                let v: serde_json::Value = serde_json::from_str(json.trim()).ok()?;
                (v["container_id"] == id && v["id"] == process)
                    .then(|| v["exit_status"].as_i64().unwrap_or(0))
            });
            if found.is_some() || Instant::now() >= deadline {
                return found;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `Err` if the container's own process `id` exited SIGSEGV (the PVM
    /// guest fault) within `wait`.
    fn container_segv(&self, id: &str, wait: Duration, context: &str) -> Result<(), PvmSegv> {
        match self.exit_status(id, id, wait) {
            Some(status) => PvmSegv::check(status, || format!("container {id} ({context})")),
            None => Ok(()),
        }
    }

    /// Stops collecting; asserts that the events naming `id` among the
    /// topics `want` came in that order (the shim exited with its last task).
    fn assert_order(self, id: &str, want: &[&str]) {
        let topics = self.topics_of(id);
        let seen: Vec<&str> = topics
            .iter()
            .map(String::as_str)
            .filter(|t| want.contains(t))
            .collect();
        assert_eq!(seen, want, "all events: {topics:?}");
        assert!(
            shim_pids(id).is_empty(),
            "the shim exited with its last task"
        );
    }

    /// The topics of the events naming `id`, in order.
    fn topics_of(mut self, id: &str) -> Vec<String> {
        std::thread::sleep(Duration::from_millis(500));
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.reader.take().expect("read once").join().unwrap();
        let lines = std::mem::take(&mut *self.lines.lock().unwrap());
        lines
            .iter()
            .filter(|l| l.contains(&format!("\"{id}\"")))
            // "DATE TIME ZONE UTC NAMESPACE TOPIC {...}"
            .filter_map(|l| {
                l.split_whitespace()
                    .find(|w| w.starts_with("/tasks/"))
                    .map(str::to_string)
            })
            .collect()
    }
}

#[test]
fn ctr_run_prints_output_returns_the_exit_code_and_publishes_events_in_order() {
    if !containerd_available() {
        return;
    }
    let _vm = vm_lock();
    let id = cid("run");
    cleanup(&id);
    let _removed = Removed(id.clone());
    let events = Events::start();
    // stdin is a pipe that ends: the container reads it to its end (`cat`
    // returns only at end of file, so a lost close would hang the run,
    // which `timeout` turns into a failure).
    let mut run = Command::new("timeout");
    run.args(["600", "ctr", "--address"])
        .arg(socket())
        .args(["run", "--rm", "--runtime", RUNTIME, &image(), &id])
        .args([
            "sh",
            "-c",
            "echo out-line; read x; echo \"stdin $x\"; cat; echo err-line >&2; uname -r; exit 3",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = run.spawn().expect("ctr");
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(b"first\nsecond\n").unwrap();
    }
    let out = child.wait_with_output().unwrap();
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(
        out.status.code(),
        Some(3),
        "stdout: {stdout}\nstderr: {stderr}"
    );
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        lines[..3],
        ["out-line", "stdin first", "second"],
        "{stdout}"
    );
    assert!(stderr.contains("err-line"), "{stderr}");
    let host = text(&Command::new("uname").arg("-r").output().unwrap().stdout);
    assert_ne!(lines[3], host.trim(), "the guest's kernel, not the host's");
    events.assert_order(
        &id,
        &[
            "/tasks/create",
            "/tasks/start",
            "/tasks/exit",
            "/tasks/delete",
        ],
    );
    assert!(
        ctr(&["container", "info", &id]).status.code() != Some(0),
        "--rm removed the container"
    );
}

#[test]
fn a_binary_log_uri_gets_the_output() {
    if !containerd_available() {
        return;
    }
    let _vm = vm_lock();
    let dir = std::env::temp_dir().join(format!("zygote-ctrlog-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // A logging program as containerd runs one: streams on fds 3 and 4, ready
    // when fd 5 closes, arguments from the URI's query.
    let logger = dir.join("logger");
    std::fs::write(
        &logger,
        "#!/bin/sh\nexec 5>&-\necho \"$CONTAINER_NAMESPACE/$CONTAINER_ID\" > \"$2/env\"\n\
         cat <&3 > \"$2/out\" & cat <&4 > \"$2/err\" & wait\n",
    )
    .unwrap();
    std::fs::set_permissions(&logger, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let id = cid("binlog");
    cleanup(&id);
    let _removed = Removed(id.clone());
    let uri = format!("binary://{}?dir={}", logger.display(), dir.display());
    let out = zygote_run(
        &["--rm", "--log-uri", &uri],
        &id,
        &["sh", "-c", "echo to-stdout; echo to-stderr >&2; exit 2"],
    );
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    let read = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap_or_default();
    assert_eq!(read("out"), "to-stdout\n");
    assert_eq!(read("err"), "to-stderr\n");
    assert_eq!(read("env"), format!("default/{id}\n"));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_memory_limit_kills_with_a_task_oom_event() {
    if !containerd_available() {
        return;
    }
    let _vm = vm_lock();
    let id = cid("oom");
    cleanup(&id);
    let _removed = Removed(id.clone());
    let events = Events::start();
    // A 32 MiB buffer under a 16 MiB limit: the guest's OOM killer takes the
    // process in the container's cgroup; the agent's memory.events watch
    // tells the shim, which publishes TaskOOM before the exit.
    let out = zygote_run(
        &["--rm", "--memory-limit", &(16u64 << 20).to_string()],
        &id,
        &["dd", "if=/dev/zero", "of=/dev/null", "bs=32M", "count=1"],
    );
    assert_eq!(out.status.code(), Some(137), "{}", text(&out.stderr));
    events.assert_order(
        &id,
        &[
            "/tasks/create",
            "/tasks/start",
            "/tasks/oom",
            "/tasks/exit",
            "/tasks/delete",
        ],
    );
}

#[test]
fn a_detached_task_execs_lists_processes_reports_metrics_and_is_killed() {
    if !containerd_available() {
        return;
    }
    let _vm = vm_lock();
    // The exec can also find the container already gone (crashed) before its
    // exit reached containerd.
    retry_pvm_segv(detached_round);
}

/// One detached task: exec, ps, metrics, kill, events. Err when the exec's
/// or the container's own exit status was SIGSEGV (the PVM guest fault);
/// every other failure panics.
fn detached_round(attempt: u32) -> Result<(), PvmSegv> {
    let id = cid(&format!("detached{attempt}"));
    cleanup(&id);
    let _removed = Removed(id.clone());
    let events = Events::start();
    let run = zygote_run(&["-d"], &id, &["sleep", "1000"]);
    assert!(run.status.success(), "{}", text(&run.stderr));
    let state_of = |id: &str| {
        text(&ctr(&["task", "ls"]).stdout)
            .lines()
            .find(|l| l.starts_with(id))
            .unwrap_or_default()
            .to_string()
    };
    let result = (|| {
        let exec = ctr(&[
            "task",
            "exec",
            "--exec-id",
            "e1",
            &id,
            "sh",
            "-c",
            "echo in-container; cat /proc/1/cmdline; echo; exit 4",
        ]);
        let exec_out = text(&exec.stdout);
        if exec.status.code() != Some(4) {
            let context = format!(
                "exec exited {:?}: {exec_out} {}; the task: {}",
                exec.status.code(),
                text(&exec.stderr),
                state_of(&id)
            );
            PvmSegv::check(exec.status.code().unwrap_or(0).into(), || {
                format!("exec e1 of {id}: {context}")
            })?;
            events.container_segv(&id, Duration::from_secs(5), &context)?;
            panic!("{context}");
        }
        assert!(exec_out.starts_with("in-container\nsleep"), "{exec_out:?}");

        let ps = text(&ctr(&["task", "ps", &id]).stdout);
        let pids: Vec<&str> = ps
            .lines()
            .skip(1)
            .filter(|l| !l.trim().is_empty())
            .collect();
        assert!(
            !pids.is_empty(),
            "ctr task ps lists the container's processes: {ps}"
        );

        let metrics = ctr(&["task", "metrics", "--format", "json", &id]);
        let m = text(&metrics.stdout);
        assert!(metrics.status.success(), "{m} {}", text(&metrics.stderr));
        let v: serde_json::Value = serde_json::from_str(&m).unwrap_or_else(|e| panic!("{e}: {m}"));
        let usage = v["memory"]["usage"].as_u64().unwrap_or(0);
        let pids_now = v["pids"]["current"].as_u64().unwrap_or(0);
        assert!(usage > 0 && pids_now >= 1, "metrics read real values: {m}");

        // SIGKILL: `sleep` is its PID namespace's init, which ignores a
        // SIGTERM it has no handler for (under runc as well).
        let kill = ctr(&["task", "kill", "-s", "SIGKILL", &id]);
        if !kill.status.success() {
            let context = format!("kill: {}; the task: {}", text(&kill.stderr), state_of(&id));
            events.container_segv(&id, Duration::from_secs(5), &context)?;
            panic!("{context}");
        }
        wait_task(&id, "STOPPED");
        let rm = ctr(&["task", "rm", &id]);
        assert!(rm.status.success(), "{}", text(&rm.stderr));
        Ok(())
    })();
    cleanup(&id);
    // (On an error, dropping `events` stops `ctr events`.)
    result?;
    events.assert_order(
        &id,
        &[
            "/tasks/create",
            "/tasks/start",
            "/tasks/exec-added",
            "/tasks/exec-started",
            "/tasks/exit",
            "/tasks/exit",
            "/tasks/delete",
        ],
    );
    Ok(())
}

#[test]
fn execs_end_with_their_process_and_a_missing_program_is_refused() {
    if !containerd_available() {
        return;
    }
    let _vm = vm_lock();
    retry_pvm_segv(exec_edges_round);
    // A container whose program does not exist is refused at create (as
    // under runc), and nothing of it is left.
    let runs_before = vm_run_dirs();
    let id = cid("nobinary");
    cleanup(&id);
    let _removed = Removed(id.clone());
    let run = zygote_run(&["--rm"], &id, &["/bin/no-such-program"]);
    let err = text(&run.stderr);
    assert!(!run.status.success(), "{}", text(&run.stdout));
    assert!(err.contains("no-such-program"), "{err}");
    cleanup(&id);
    assert!(shim_pids(&id).is_empty());
    assert_no_run_dirs_left(&runs_before);
}

/// One container (its id has `_`, which a host name cannot): its host name,
/// an exec whose background child
/// keeps its stdout open, an exec of a missing program.
fn exec_edges_round(attempt: u32) -> Result<(), PvmSegv> {
    let id = cid(&format!("edge_{attempt}"));
    cleanup(&id);
    let _removed = Removed(id.clone());
    let events = Events::start();
    let run = zygote_run(&["-d"], &id, &["sleep", "1000"]);
    assert!(run.status.success(), "{}", text(&run.stderr));
    let exec = |exec_id: &str, argv: &[&str]| -> Result<Output, PvmSegv> {
        let mut args = vec!["task", "exec", "--exec-id", exec_id, &id];
        args.extend_from_slice(argv);
        let out = ctr(&args);
        let status = out.status.code().unwrap_or(0);
        PvmSegv::check(status.into(), || format!("exec {exec_id} of {id}"))?;
        if !out.status.success() {
            events.container_segv(&id, Duration::from_secs(5), exec_id)?;
        }
        Ok(out)
    };
    let host = exec("host", &["hostname"])?;
    assert_eq!(
        text(&host.stdout).trim(),
        id.replace('_', "-"),
        "the id made a host name"
    );
    // The exec's own process ends; its child still holds its stdout. The
    // exec returns with what was written (it used to wait for the child).
    let bg = exec("bg", &["sh", "-c", "sleep 600 & echo hi"])?;
    assert!(bg.status.success(), "{}", text(&bg.stderr));
    assert_eq!(text(&bg.stdout), "hi\n");
    let missing = exec("missing", &["/bin/no-such-program"])?;
    assert!(!missing.status.success(), "{}", text(&missing.stdout));
    let err = text(&missing.stderr);
    assert!(err.contains("no-such-program"), "{err}");
    cleanup(&id);
    Ok(())
}

#[test]
fn a_terminal_and_two_containers_from_one_template() {
    if !containerd_available() {
        return;
    }
    let _vm = vm_lock();
    // -t: ctr needs a terminal of its own; `script` gives it one.
    let id = cid("tty");
    cleanup(&id);
    let _removed = Removed(id.clone());
    let cmd = format!(
        "ctr --address {} run --rm -t --runtime {RUNTIME} {} {id} sh -c '[ -t 0 ] && echo on-a-tty; tty'",
        socket().display(),
        image()
    );
    let out = Command::new("script")
        .args(["-qec", &cmd, "/dev/null"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let t = text(&out.stdout);
    assert!(out.status.success(), "{t} {}", text(&out.stderr));
    assert!(t.contains("on-a-tty"), "{t:?}");
    assert!(
        t.contains("/dev/console") || t.contains("/dev/pts/"),
        "{t:?}"
    );

    // Two at once: both fork the template the first run built (no new build).
    let templates_before = template_dirs();
    let ids = [cid("twin-a"), cid("twin-b")];
    let _removed: Vec<Removed> = ids.iter().map(|i| Removed(i.clone())).collect();
    for id in &ids {
        cleanup(id);
        let run = zygote_run(&["-d"], id, &["sleep", "1000"]);
        assert!(run.status.success(), "{}", text(&run.stderr));
    }
    let ls = text(&ctr(&["task", "ls"]).stdout);
    for id in &ids {
        assert!(
            ls.lines()
                .any(|l| l.starts_with(id.as_str()) && l.contains("RUNNING")),
            "{ls}"
        );
        assert_eq!(shim_pids(id).len(), 1, "one shim (one VM) each");
    }
    assert_eq!(template_dirs(), templates_before, "no template was built");
    for id in &ids {
        cleanup(id);
    }
}

/// Template directories with their creation stamps.
fn template_dirs() -> Vec<(String, String)> {
    let root = zygote::paths::templates();
    let mut v: Vec<(String, String)> = std::fs::read_dir(root)
        .map(|rd| {
            rd.flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with("ctr-"))
                .map(|e| {
                    let meta =
                        std::fs::read_to_string(e.path().join("template.json")).unwrap_or_default();
                    (e.file_name().to_string_lossy().into_owned(), meta)
                })
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Waits a moment for containerd's clean-up (`shim delete`), then asserts
/// that the VM run directories are what they were before.
fn assert_no_run_dirs_left(before: &[PathBuf]) {
    // Only new ones count: one of an earlier test's VM may still be going.
    let new = || -> Vec<PathBuf> {
        vm_run_dirs()
            .into_iter()
            .filter(|d| !before.contains(d))
            .collect()
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while !new().is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(new(), Vec::<PathBuf>::new(), "no VM run directory is left");
}

/// A point in containerd's log (where the shims' logs go), to read only what
/// a test caused after it.
struct LogMark(usize);

impl LogMark {
    fn path() -> PathBuf {
        zygote::paths::home().join("containerd/containerd.log")
    }

    fn now() -> Self {
        LogMark(std::fs::metadata(Self::path()).map_or(0, |m| m.len() as usize))
    }

    fn since(&self) -> String {
        let log = std::fs::read(Self::path()).unwrap_or_default();
        String::from_utf8_lossy(log.get(self.0..).unwrap_or_default()).into_owned()
    }
}

/// `ctr run --rm` of `true` under the runtime configuration `config` (written
/// into `dir`), which must fail; returns ctr's error output.
fn run_refused(dir: &std::path::Path, name: &str, config: &str) -> String {
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, config).unwrap();
    let id = cid(name);
    cleanup(&id);
    let _removed = Removed(id.clone());
    let out = zygote_run(
        &["--rm", "--runtime-config-path", path.to_str().unwrap()],
        &id,
        &["true"],
    );
    assert!(!out.status.success(), "{name}: ctr run succeeded");
    text(&out.stderr)
}

/// Copies the image templates of the default store (building one with a run
/// if there is none) into `store`, each with a byte of its state file flipped
/// and the damaged bytes kept beside it as `state.damaged`. (The same image
/// in two containerd namespaces has two snapshot chains, so two templates:
/// all are copied, so that whichever this run selects is damaged.) Returns
/// the copies' directories.
fn damaged_template_copies(store: &std::path::Path) -> Vec<PathBuf> {
    if template_dirs().is_empty() {
        let id = cid("warm");
        cleanup(&id);
        let _removed = Removed(id.clone());
        let out = zygote_run(&["--rm"], &id, &["true"]);
        assert!(out.status.success(), "{}", text(&out.stderr));
    }
    let mut copies = Vec::new();
    for (name, _) in template_dirs() {
        let from = zygote::paths::templates().join(&name);
        let to = store.join(&name);
        std::fs::create_dir_all(&to).unwrap();
        let cp = Command::new("cp")
            .arg("--sparse=always")
            .args(["memory", "state", "template.json"].map(|f| from.join(f)))
            .arg(&to)
            .status()
            .unwrap();
        assert!(cp.success());
        let mut state = std::fs::read(to.join("state")).unwrap();
        let middle = state.len() / 2;
        state[middle] ^= 0x55;
        std::fs::write(to.join("state"), &state).unwrap();
        std::fs::write(to.join("state.damaged"), &state).unwrap();
        copies.push(to);
    }
    copies
}

#[test]
fn failures_are_reported_and_leave_nothing_behind() {
    if !containerd_available() {
        return;
    }
    let _vm = vm_lock();
    let dir = std::env::temp_dir().join(format!("zygote-ctrfail-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let runs_before = vm_run_dirs();

    let templates = dir.join("templates");
    // A missing kernel: the template cannot be built; containerd says why.
    let err = run_refused(
        &dir,
        "nokernel",
        &format!(
            "kernel = \"/nonexistent/vmlinux\"\ntemplates = \"{}\"\n",
            templates.display()
        ),
    );
    assert!(err.contains("/nonexistent/vmlinux"), "{err}");

    // A missing guest image (initramfs): the same, before any VM is made.
    let err = run_refused(
        &dir,
        "noinitramfs",
        &format!(
            "initramfs = \"/nonexistent/initramfs.cpio\"\ntemplates = \"{}\"\n",
            templates.display()
        ),
    );
    assert!(err.contains("/nonexistent/initramfs.cpio"), "{err}");

    // A damaged template (its state file's checksum fails): refused with
    // what is wrong and what to do; the template is left for the operator.
    let store = dir.join("damaged-store");
    let damaged = damaged_template_copies(&store);
    let err = run_refused(
        &dir,
        "damaged",
        &format!("templates = \"{}\"\n", store.display()),
    );
    assert!(
        err.contains("template ctr-") && err.contains("damaged") && err.contains("checksum"),
        "{err}"
    );
    for d in &damaged {
        assert_eq!(
            std::fs::read(d.join("state")).unwrap(),
            std::fs::read(d.join("state.damaged")).unwrap(),
            "the damaged template is left as it was"
        );
    }

    // An invalid spec field (a relative working directory): refused by the agent.
    let id = cid("badspec");
    cleanup(&id);
    let _removed = Removed(id.clone());
    let out = zygote_run(&["--rm", "--cwd", "relative/dir"], &id, &["true"]);
    let err = text(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("process.cwd"), "{err}");
    cleanup(&id);

    // The shim killed with SIGKILL: containerd's `shim delete` cleans up.
    let id = cid("killed");
    cleanup(&id);
    let _removed = Removed(id.clone());
    let run = zygote_run(&["-d"], &id, &["sleep", "1000"]);
    assert!(run.status.success(), "{}", text(&run.stderr));
    let shims = shim_pids(&id);
    assert_eq!(shims.len(), 1);
    // SAFETY: kill(2) of the shim process found above.
    unsafe { libc::kill(shims[0] as i32, libc::SIGKILL) };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let ls = text(&ctr(&["task", "ls"]).stdout);
        if !ls
            .lines()
            .any(|l| l.starts_with(id.as_str()) && l.contains("RUNNING"))
        {
            break;
        }
        assert!(Instant::now() < deadline, "containerd did not notice: {ls}");
        std::thread::sleep(Duration::from_millis(200));
    }
    cleanup(&id);
    assert!(shim_pids(&id).is_empty());
    assert_no_run_dirs_left(&runs_before);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_guest_panic_marks_the_tasks_exited_and_leaves_nothing_behind() {
    if !containerd_available() {
        return;
    }
    let _vm = vm_lock();
    retry_pvm_segv(panic_round);
}

/// Crashes a pod's kernel from a container; Err if the container's process
/// crashed (139) before the kernel did.
fn panic_round(attempt: u32) -> Result<(), PvmSegv> {
    let runs_before = vm_run_dirs();
    let log = LogMark::now();
    let id = cid(&format!("panic{attempt}"));
    cleanup(&id);
    let _removed = Removed(id.clone());
    let events = Events::start();
    // --privileged: the pod's own kernel may be crashed by its root (as a
    // runc container could not: /proc/sysrq-trigger is read-only there).
    let run = zygote_run(&["-d", "--privileged"], &id, &["sleep", "1000"]);
    assert!(run.status.success(), "{}", text(&run.stderr));
    let crash = ctr(&[
        "task",
        "exec",
        "--exec-id",
        "crash",
        &id,
        "sh",
        "-c",
        "echo c > /proc/sysrq-trigger",
    ]);
    PvmSegv::check(crash.status.code().unwrap_or(0).into(), || {
        format!("exec crash of {id} (before it wrote to sysrq-trigger)")
    })?;
    assert!(!crash.status.success(), "the exec cannot finish normally");
    wait_task(&id, "STOPPED");
    // The container's own process crashed before the kernel did?
    events.container_segv(&id, Duration::from_secs(5), "before the kernel panicked")?;
    let rm = ctr(&["task", "rm", &id]);
    let rm_text = format!("{}{}", text(&rm.stdout), text(&rm.stderr));
    assert!(rm.status.success(), "{rm_text}");
    let _ = ctr(&["container", "rm", &id]);
    let topics = events.topics_of(&id);
    assert!(
        topics.iter().any(|t| t == "/tasks/exit")
            && topics.last().is_some_and(|t| t == "/tasks/delete"),
        "{topics:?}"
    );
    let log = log.since();
    assert!(
        // By the monitor, or by the waiter that saw it first.
        log.lines().any(|l| l.contains("Panic")
            && (l.contains("the pod VM failed") || l.contains("the pod's VM stopped"))),
        "the reason is logged: {log}"
    );
    cleanup(&id);
    assert!(shim_pids(&id).is_empty());
    assert_no_run_dirs_left(&runs_before);
    Ok(())
}

#[test]
fn an_unresponsive_guest_is_detected_and_its_tasks_marked_exited() {
    if !containerd_available() {
        return;
    }
    let _vm = vm_lock();
    let runs_before = vm_run_dirs();
    let log = LogMark::now();
    let id = cid("hung");
    cleanup(&id);
    let _removed = Removed(id.clone());
    let run = zygote_run(&["-d"], &id, &["sleep", "1000"]);
    assert!(run.status.success(), "{}", text(&run.stderr));
    let shim = shim_pids(&id);
    assert_eq!(shim.len(), 1);
    // Freeze the guest: stop its vCPU threads alone (ptrace), as a guest that
    // hangs looks to the host. The shim's other threads keep running.
    let frozen = FrozenGuest::freeze(shim[0]);
    let started = Instant::now();
    // Two missed pings (10 s apart, 10 s each) mark the task exited.
    wait_task(&id, "STOPPED");
    eprintln!("marked exited after {:?}", started.elapsed());
    drop(frozen);
    let log = log.since();
    assert!(
        log.lines()
            .any(|l| l.contains("the pod VM failed") && l.contains("did not answer")),
        "the reason is logged: {log}"
    );
    cleanup(&id);
    assert!(shim_pids(&id).is_empty());
    assert_no_run_dirs_left(&runs_before);
}

/// Restarts hack/containerd's containerd (its shims keep running).
fn restart_containerd() {
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../hack/containerd");
    for action in ["stop", "start"] {
        let out = Command::new(&script).arg(action).output().unwrap();
        assert!(
            out.status.success(),
            "hack/containerd {action}: {}",
            text(&out.stderr)
        );
    }
}

#[test]
fn tasks_outlive_a_containerd_restart() {
    if !containerd_available() {
        return;
    }
    let _vm = vm_lock();
    retry_pvm_segv(restart_round);
}

/// Two tasks across a containerd restart: one exits while containerd is
/// down (its exit is reported once containerd is back), the other keeps
/// running and is listed, exec'd into, measured and killed after it.
fn restart_round(attempt: u32) -> Result<(), PvmSegv> {
    let (lasting, brief) = (
        cid(&format!("lasting{attempt}")),
        cid(&format!("brief{attempt}")),
    );
    let _removed = [Removed(lasting.clone()), Removed(brief.clone())];
    for id in [&lasting, &brief] {
        cleanup(id);
    }
    let run = zygote_run(&["-d"], &lasting, &["sleep", "1000"]);
    assert!(run.status.success(), "{}", text(&run.stderr));
    let run = zygote_run(&["-d"], &brief, &["sh", "-c", "sleep 15; exit 7"]);
    assert!(run.status.success(), "{}", text(&run.stderr));
    let shims = [shim_pids(&lasting), shim_pids(&brief)];
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../hack/containerd");
    let stop = Command::new(&script).arg("stop").output().unwrap();
    assert!(stop.status.success(), "{}", text(&stop.stderr));
    // `brief` exits while containerd is away: its shim keeps the event.
    std::thread::sleep(Duration::from_secs(25));
    restart_containerd();
    assert_eq!(
        [shim_pids(&lasting), shim_pids(&brief)],
        shims,
        "the same shims serve the tasks"
    );
    let events = Events::start();
    wait_task(&brief, "STOPPED");
    // `ctr task rm` says "task ID exit with non-zero exit code N".
    let rm = ctr(&["task", "rm", &brief]);
    let rm_said = format!("{}{}", text(&rm.stdout), text(&rm.stderr));
    assert!(rm.status.success(), "{rm_said}");
    let status: Option<i64> = rm_said
        .split("exit code ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.trim_matches('"').parse().ok());
    PvmSegv::check(status.unwrap_or(0), || {
        format!("container {brief}: {rm_said}")
    })?;
    assert_eq!(status, Some(7), "its own exit status: {rm_said}");

    wait_task(&lasting, "RUNNING");
    let exec = ctr(&[
        "task",
        "exec",
        "--exec-id",
        "after",
        &lasting,
        "echo",
        "still-here",
    ]);
    PvmSegv::check(exec.status.code().unwrap_or(0).into(), || {
        format!("exec after the restart in {lasting}")
    })?;
    assert!(exec.status.success(), "{}", text(&exec.stderr));
    assert_eq!(text(&exec.stdout), "still-here\n");
    let metrics = ctr(&["task", "metrics", "--format", "json", &lasting]);
    let m = text(&metrics.stdout);
    assert!(metrics.status.success(), "{m} {}", text(&metrics.stderr));
    let v: serde_json::Value = serde_json::from_str(&m).unwrap_or_else(|e| panic!("{e}: {m}"));
    assert!(v["memory"]["usage"].as_u64().unwrap_or(0) > 0, "{m}");
    let kill = ctr(&["task", "kill", "-s", "SIGKILL", &lasting]);
    assert!(kill.status.success(), "{}", text(&kill.stderr));
    wait_task(&lasting, "STOPPED");
    let status = events.exit_status(&lasting, &lasting, Duration::from_secs(30));
    PvmSegv::check(status.unwrap_or(0), || format!("container {lasting}"))?;
    assert_eq!(
        status,
        Some(137),
        "its exit reached containerd's subscribers"
    );
    cleanup(&lasting);
    cleanup(&brief);
    Ok(())
}

#[test]
fn create_start_delete_cycles_leave_nothing_behind() {
    if !containerd_available() {
        return;
    }
    let _vm = vm_lock();
    // A few in the suite; `hack/cycles` runs 100 (ZYGOTE_CYCLES).
    let cycles: u32 = std::env::var("ZYGOTE_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let cycle = |n: u32| -> Result<(), PvmSegv> {
        let id = cid(&format!("cycle{n}"));
        let run = zygote_run(&["--rm"], &id, &["true"]);
        PvmSegv::check(run.status.code().unwrap_or(0).into(), || {
            format!("container {id}")
        })?;
        assert!(run.status.success(), "cycle {n}: {}", text(&run.stderr));
        Ok(())
    };
    // The first cycle warms containerd up (its own caches and connections).
    retry_pvm_segv(|_| cycle(0));
    std::thread::sleep(Duration::from_secs(1));
    let before = host_footprint();
    for n in 1..=cycles {
        retry_pvm_segv(|_| cycle(n));
    }
    let after = footprint_after(&before);
    eprintln!("{cycles} create/start/delete cycles: before {before:?}, after {after:?}");
    assert_eq!(after, before, "{cycles} cycles left something behind");
}
