//! The shim under real containerd when things go wrong: refused requests and
//! damaged templates, a guest that panics or stops answering, containerd
//! restarting under running tasks, and create/start/delete cycles — each
//! leaving nothing behind.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use zygote_tests::ctr::*;
use zygote_tests::{PvmSegv, retry_pvm_segv, vm_lock};

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

/// Copies the image templates of the default store (after a run, which
/// builds the image's template if there is none or rebuilds it if it is
/// stale — a stale copy would be rebuilt, not refused) into `store`, each with a byte of its state file flipped
/// and the damaged bytes kept beside it as `state.damaged`. (The same image
/// in two containerd namespaces has two snapshot chains, so two templates:
/// all are copied, so that whichever this run selects is damaged.) Returns
/// the copies' directories.
fn damaged_template_copies(store: &std::path::Path) -> Vec<PathBuf> {
    {
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
    // The node's settings (the VM shape selects the template) with that store.
    let node_config = std::env::var_os("ZYGOTE_CONFIG")
        .map_or_else(|| zygote::paths::home().join("config.toml"), PathBuf::from);
    let shape: String = std::fs::read_to_string(&node_config)
        .unwrap_or_default()
        .lines()
        .filter(|l| !l.trim_start().starts_with("templates"))
        .map(|l| format!("{l}\n"))
        .collect();
    let err = run_refused(
        &dir,
        "damaged",
        &format!("{shape}templates = \"{}\"\n", store.display()),
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
    let task_pid = task_pid(&id);
    // SAFETY: kill(2) of the shim process found above.
    unsafe { libc::kill(shims[0] as i32, libc::SIGKILL) };
    reported_dead_and_gone(&id, task_pid);
    assert_no_run_dirs_left(&runs_before);
    // The dead shim's cgroup (ctr's `/default/ID`, which it had joined) too.
    let left: Vec<_> = std::fs::read_dir("/sys/fs/cgroup")
        .unwrap()
        .flatten()
        .map(|h| h.path().join("default").join(&id))
        .chain([std::path::Path::new("/sys/fs/cgroup/default").join(&id)])
        .filter(|d| d.exists())
        .collect();
    assert!(left.is_empty(), "cgroups left: {left:?}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The host pid `ctr task ls` gives task `id`.
fn task_pid(id: &str) -> i32 {
    let ls = text(&ctr(&["task", "ls"]).stdout);
    ls.lines()
        .find(|l| l.starts_with(id))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or_else(|| panic!("no pid for {id} in {ls}"))
}

/// After task `id`'s shim died: containerd reports the task not running,
/// and once cleaned up no shim process of it is left, nor its task pid
/// (a host process of the shim's that must not outlive it).
fn reported_dead_and_gone(id: &str, task_pid: i32) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let ls = text(&ctr(&["task", "ls"]).stdout);
        if !ls
            .lines()
            .any(|l| l.starts_with(id) && l.contains("RUNNING"))
        {
            break;
        }
        assert!(Instant::now() < deadline, "containerd did not notice: {ls}");
        std::thread::sleep(Duration::from_millis(200));
    }
    cleanup(id);
    // containerd runs the dead shim's `shim delete` (the same binary, `-id`
    // of the task) on its own, and it may still be removing the cgroup
    // (it waits up to 3 s for the kernel to let go of it): gone soon, not
    // necessarily at once.
    let deadline = Instant::now() + Duration::from_secs(15);
    while !shim_pids(id).is_empty() {
        assert!(
            Instant::now() < deadline,
            "a shim process of {id} is left 15 s after the cleanup"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // Gone, or a zombie left to whoever adopted it (this machine's PID 1
    // does not reap): not running.
    let state = std::fs::read_to_string(format!("/proc/{task_pid}/stat")).unwrap_or_default();
    let running = state
        .rsplit_once(") ")
        .is_some_and(|(_, rest)| !rest.starts_with('Z'));
    assert!(
        !running,
        "the task's pid {task_pid} outlived its shim: {state}"
    );
}

/// A vCPU thread making a system call outside its seccomp list (the test
/// hook, `test_hooks` in hack/containerd's shim config) kills the shim with
/// SIGSYS; containerd reports the task dead, and nothing is left.
#[test]
fn a_vcpu_thread_outside_its_seccomp_list_kills_the_shim() {
    if !containerd_available() {
        return;
    }
    let _vm = vm_lock();
    let runs_before = vm_run_dirs();
    let id = cid("seccomp-trip");
    cleanup(&id);
    let _removed = Removed(id.clone());
    let trip = format!("{}=3000", "zygote.dev/test-seccomp-trip-ms");
    let run = zygote_run(&["-d", "--annotation", &trip], &id, &["sleep", "1000"]);
    assert!(run.status.success(), "{}", text(&run.stderr));
    let shims = shim_pids(&id);
    assert_eq!(shims.len(), 1);
    let task_pid = task_pid(&id);
    reported_dead_and_gone(&id, task_pid);
    // The kernel's word for it: the shim, killed by SIGSYS (31) on a vCPU
    // thread, at personality (135), the hook's call.
    let dmesg = text(&Command::new("dmesg").output().unwrap().stdout);
    let line = dmesg
        .lines()
        .rev()
        .find(|l| l.contains("type=1326") && l.contains(&format!("pid={} ", shims[0])))
        .unwrap_or_else(|| panic!("no seccomp kill of pid {} in dmesg", shims[0]));
    eprintln!("{line}");
    assert!(line.contains("comm=\"zygote-vcpu\""), "{line}");
    assert!(
        line.contains("sig=31") && line.contains("syscall=135"),
        "{line}"
    );
    assert_no_run_dirs_left(&runs_before);
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
