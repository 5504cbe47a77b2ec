//! The shim under real containerd (Debian's 1.6, started by `hack/containerd`,
//! which `hack/test` runs first): `ctr run` in a forked VM with stdin read to
//! its end, the task events in order, a `binary://` logger, exec/ps/metrics/
//! kill, an OOM kill with its event, a terminal, two containers from one
//! template. Faults (refusals, a guest that panics or hangs, containerd
//! restarting, create/delete cycles) are in `containerd_faults.rs`.

use std::process::{Command, Output, Stdio};
use std::time::Duration;

use zygote_tests::{PvmSegv, retry_pvm_segv, vm_lock};

use zygote_tests::ctr::*;
use zygote_tests::{containerd_socket as socket, test_image as image};

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
    // The task's pid is a host process of its own (not the shim), in the
    // container's cgroup, alive while the task runs and gone once its exit
    // is reported, as containerd's clients expect of a task pid.
    let task_pid: i32 = state_of(&id)
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no pid in ctr task ls: {}", state_of(&id)));
    assert!(
        !shim_pids(&id).contains(&(task_pid as u32)),
        "the task pid is the shim's"
    );
    let cgroup = std::fs::read_to_string(format!("/proc/{task_pid}/cgroup")).unwrap();
    assert!(
        cgroup.contains(&format!("/default/{id}\n")),
        "pid {task_pid} is not in the container's cgroup: {cgroup}"
    );
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
        // SAFETY: signal 0 only asks whether the pid exists.
        let gone = unsafe { libc::kill(task_pid, 0) } != 0;
        assert!(gone, "pid {task_pid} still exists after the task's exit");
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
    retry_pvm_segv(twins_round);
    assert_eq!(template_dirs(), templates_before, "no template was built");
}

/// Two VMs forked from one template, each container on the staged path:
/// each is its own machine (its host name, a kernel random stream of its
/// own, the clock set at the fork, not the template's). Err when an exec's
/// own exit status was SIGSEGV (the PVM guest fault).
fn twins_round(attempt: u32) -> Result<(), PvmSegv> {
    let ids = [
        cid(&format!("twin-a{attempt}")),
        cid(&format!("twin-b{attempt}")),
    ];
    let _removed: Vec<Removed> = ids.iter().map(|i| Removed(i.clone())).collect();
    // Every second here is later than the template's snapshot (the first
    // run above built it): a fork that kept the template's clock is behind.
    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    for id in &ids {
        cleanup(id);
        let run = zygote_run(&["-d"], id, &["sleep", "1000"]);
        assert!(run.status.success(), "{}", text(&run.stderr));
    }
    let ls = text(&ctr(&["task", "ls"]).stdout);
    let mut seen = Vec::new();
    for id in &ids {
        assert!(
            ls.lines()
                .any(|l| l.starts_with(id.as_str()) && l.contains("RUNNING")),
            "{ls}"
        );
        assert_eq!(shim_pids(id).len(), 1, "one shim (one VM) each");
        let script =
            "cat /proc/sys/kernel/random/uuid; hostname; date +%s; grep ' / overlay ' /proc/mounts";
        let out = ctr(&["task", "exec", "--exec-id", "who", id, "sh", "-c", script]);
        PvmSegv::check(out.status.code().unwrap_or(0).into(), || {
            format!("exec in {id}")
        })?;
        let t = text(&out.stdout);
        assert!(out.status.success(), "{t} {}", text(&out.stderr));
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 4, "{t:?}");
        assert_eq!(lines[1], id.as_str(), "its own host name");
        let guest_now: u64 = lines[2].parse().expect("date +%s");
        assert!(
            guest_now >= before,
            "the guest's clock ({guest_now}) is behind the host's at the start ({before})"
        );
        assert!(
            lines[3].contains("/@staged/"),
            "its root is the staged container's: {}",
            lines[3]
        );
        seen.push(lines[0].to_string());
    }
    assert_ne!(
        seen[0], seen[1],
        "each fork's kernel random stream is its own"
    );
    for id in &ids {
        cleanup(id);
    }
    Ok(())
}

/// What a container's spec says of its security is applied as runc applies
/// it (the reference, in the same run): its capabilities (the default set,
/// and one dropped), and the default spec's masked and read-only paths
/// (`/sys/firmware` hidden under an empty tmpfs, `/proc/sys` read-only
/// even to root). (A non-root process with an ambient capability:
/// containerd's suite, TestBindLowPortNonOpt, through hack/conformance.)
#[test]
fn capabilities_and_masked_paths_are_the_specs_as_under_runc() {
    if !containerd_available() {
        return;
    }
    let _vm = vm_lock();
    let caps = "grep -E '^Cap(Inh|Prm|Eff|Bnd|Amb)' /proc/self/status";
    let paths = "ls -A /sys/firmware | wc -l; \
                 (echo z > /proc/sys/kernel/domainname) 2>/dev/null && echo writable || echo read-only";
    // containerd's default seccomp profile (the CRI's RuntimeDefault): what
    // it refuses, whatever the guest kernel would answer without it; no
    // CAP_NET_ADMIN: the interface stays as it is; a read-only root.
    let refused = "unshare -U true 2>&1; mount -t tmpfs t /mnt 2>&1; \
                   ip link set lo mtu 1300 2>&1; grep Seccomp: /proc/self/status";
    let readonly = "touch /x 2>&1; echo $?";
    let cases: [(&str, &[&str], &str); 5] = [
        ("default", &[], caps),
        ("dropped", &["--cap-drop", "CAP_NET_RAW"], caps),
        ("paths", &[], paths),
        ("seccomp", &["--seccomp"], refused),
        ("readonly", &["--read-only"], readonly),
    ];
    retry_pvm_segv(|attempt| {
        for (name, flags, script) in cases {
            let seen = |runtime: &[&str]| {
                let id = cid(&format!("caps-{name}-{}-{attempt}", runtime.len()));
                cleanup(&id);
                let _removed = Removed(id.clone());
                let mut args = vec!["run", "--rm"];
                args.extend_from_slice(flags);
                args.extend_from_slice(runtime);
                let image = image();
                args.extend_from_slice(&[image.as_str(), id.as_str(), "sh", "-c", script]);
                let out = ctr(&args);
                (out.status.code(), text(&out.stdout))
            };
            let (code, zygote) = seen(&["--runtime", RUNTIME]);
            PvmSegv::check(code.map_or(0, i64::from), || name.to_string())?;
            let (_, runc) = seen(&[]);
            eprintln!("{name}: {zygote:?}");
            assert_eq!(code, Some(0), "{zygote}");
            assert!(!zygote.is_empty(), "{name}");
            assert_eq!(zygote, runc, "{name}: as runc applies the spec");
        }
        Ok(())
    });
}
