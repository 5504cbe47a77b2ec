//! The container's init: `zygote-agent container-init CONFIG_JSON`, started by
//! the agent with the container's stdio. A fresh, single-threaded process, so
//! it may fork freely: it joins the pod's namespaces the spec names
//! (`super::podns`) and enters new ones for the rest (mount, UTS, IPC, PID),
//! forks the container's PID 1, which sets up the root file system (mounts,
//! `super::mounts`; `pivot_root`), sysctls, masked paths, hostname, rlimits,
//! user, capabilities, `no_new_privs` and the seccomp filter and execs the
//! process; the init waits for it and exits with its status (128 + N for a
//! signal), which is what the agent reports.

use std::ffi::CString;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use super::mounts::{make_mounts, mount, mounts_dev, prepare_root};
use super::resolve::{Make, fd_path, open_in_root, open_root};
use super::spec::LaunchConfig;

/// Exit status when the container's process could not be started.
pub const EXIT_SETUP_FAILED: u8 = 127;

pub(super) fn cstr(s: impl AsRef<std::ffi::OsStr>) -> CString {
    use std::os::unix::ffi::OsStrExt;
    CString::new(s.as_ref().as_bytes()).unwrap_or_else(|_| c"".into())
}

pub(super) fn check(rc: libc::c_int, what: &str) -> Result<(), String> {
    if rc == 0 {
        Ok(())
    } else {
        Err(format!("{what}: {}", std::io::Error::last_os_error()))
    }
}

fn setup_and_exec(c: &LaunchConfig) -> String {
    let result = prepare_root(&c.rootfs)
        .and_then(|()| make_mounts(&c.rootfs, &c.mounts, mounts_dev(&c.mounts)))
        .and_then(|()| enter_root(c));
    if let Err(e) = result {
        return e;
    }
    exec_process(c)
}

/// The terminal as /dev/console, the root pivoted to (made read-only if
/// asked), hostname and credentials: what is left once the mounts are made.
pub(super) fn enter_root(c: &LaunchConfig) -> Result<(), String> {
    let root = &c.rootfs;
    if c.terminal {
        // As runc does: the terminal is also the container's /dev/console.
        // By its path: the fd's mount belongs to the agent's namespace,
        // which a bind mount may not take from.
        let pts = std::fs::read_link("/proc/self/fd/0")
            .map_err(|e| format!("the terminal's path: {e}"))?;
        let console = open_in_root(&open_root(root)?, Path::new("/dev/console"), Make::File)?;
        mount(
            &pts.to_string_lossy(),
            &fd_path(&console),
            "",
            libc::MS_BIND,
            "",
        )?;
    }
    let root_c = cstr(root);
    // SAFETY: a valid path string.
    check(unsafe { libc::chdir(root_c.as_ptr()) }, "chdir rootfs")?;
    // pivot_root(".", "."): the old root ends up on top and is detached next.
    // SAFETY: valid path strings; the calling process is in its own mount namespace.
    let rc =
        unsafe { libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr()) as libc::c_int };
    if rc == 0 {
        // SAFETY: a valid path string.
        let rc = unsafe { libc::umount2(c".".as_ptr(), libc::MNT_DETACH) };
        check(rc, "detach old root")?;
    } else if std::io::Error::last_os_error().raw_os_error() == Some(libc::EINVAL) {
        // The guest's own root is the initramfs, which cannot be pivoted away
        // from: move the container's root over it and chroot (runc's
        // no-pivot mode). The initramfs stays below, unreachable by path.
        mount(".", Path::new("/"), "", libc::MS_MOVE, "")?;
        // SAFETY: a valid path string.
        check(unsafe { libc::chroot(c".".as_ptr()) }, "chroot")?;
    } else {
        check(rc, "pivot_root")?;
    }
    // SAFETY: a valid path string.
    check(unsafe { libc::chdir(c"/".as_ptr()) }, "chdir /")?;
    if c.readonly_root {
        mount(
            "",
            Path::new("/"),
            "",
            libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY,
            "",
        )?;
    }
    // As runc: sysctls (through the container's /proc), then read-only
    // paths, then masked ones, in the root now at `/`.
    for (path, value) in &c.sysctls {
        let file = Path::new("/proc/sys").join(path);
        std::fs::write(&file, value).map_err(|e| format!("sysctl {}: {e}", path.display()))?;
    }
    // As runc: read-only paths, then masked ones, in the root now at `/`.
    for path in &c.readonly_paths {
        super::masks::readonly(path)?;
    }
    for path in &c.masked_paths {
        super::masks::mask(path)?;
    }
    apply_hostname_and_credentials(c)
}

/// Hostname (if any), controlling terminal (with `terminal`), rlimits,
/// bounding set, groups, gid, uid, capabilities, no_new_privs, cwd.
fn apply_hostname_and_credentials(c: &LaunchConfig) -> Result<(), String> {
    {
        if c.terminal {
            // A new session whose controlling terminal is stdin (the pty's slave).
            // SAFETY: setsid has no arguments; this child is not a group leader.
            if unsafe { libc::setsid() } < 0 {
                return Err(format!("setsid: {}", std::io::Error::last_os_error()));
            }
            // SAFETY: TIOCSCTTY on fd 0 with an integer argument.
            let rc = unsafe { libc::ioctl(0, libc::TIOCSCTTY, 0) };
            check(rc, "set the controlling terminal")?;
        }
        if let Some(h) = &c.hostname {
            // SAFETY: the pointer and length describe the hostname.
            let rc = unsafe { libc::sethostname(h.as_ptr().cast(), h.len()) };
            check(rc, "sethostname")?;
        }
        for &(resource, soft, hard) in &c.rlimits {
            let lim = libc::rlimit {
                rlim_cur: soft,
                rlim_max: hard,
            };
            // SAFETY: a valid rlimit.
            check(unsafe { libc::setrlimit(resource as _, &lim) }, "setrlimit")?;
        }
        if let Some(adj) = c.oom_score_adj {
            std::fs::write("/proc/self/oom_score_adj", adj.to_string())
                .map_err(|e| format!("oom_score_adj: {e}"))?;
        }
        // The seccomp filter: without no_new_privs it must go on while the
        // process still has CAP_SYS_ADMIN (as runc), else as late as can be.
        let filters = c.seccomp.as_deref().map(super::seccomp::sock_filters);
        let install = |f: &[libc::sock_filter]| {
            super::seccomp::install(f).map_err(|e| format!("seccomp: {e}"))
        };
        if let Some(f) = filters.as_deref().filter(|_| !c.no_new_privileges) {
            install(f)?;
        }
        if let Some(caps) = &c.capabilities {
            super::caps::before_setuid(caps)?;
        }
        let groups: Vec<libc::gid_t> = c.additional_gids.clone();
        // SAFETY: the pointer and length describe `groups`.
        let rc = unsafe { libc::setgroups(groups.len(), groups.as_ptr()) };
        check(rc, "setgroups")?;
        // SAFETY: plain ids.
        check(unsafe { libc::setgid(c.gid) }, "setgid")?;
        // SAFETY: plain ids.
        check(unsafe { libc::setuid(c.uid) }, "setuid")?;
        if let Some(caps) = &c.capabilities {
            super::caps::after_setuid(caps)?;
        }
        if c.no_new_privileges {
            // SAFETY: prctl with integer arguments.
            let rc = unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
            check(rc, "no_new_privs")?;
        }
        let cwd = cstr(&c.cwd);
        // SAFETY: a valid path string.
        let rc = unsafe { libc::chdir(cwd.as_ptr()) };
        check(rc, &format!("chdir {}", c.cwd.display()))?;
        if let Some(f) = filters.as_deref().filter(|_| c.no_new_privileges) {
            install(f)?;
        }
        Ok(())
    }
}

/// Execs the process; returns why it could not.
pub(super) fn exec_process(c: &LaunchConfig) -> String {
    let program = resolve(&c.args[0], &c.env);
    let argv: Vec<CString> = c.args.iter().map(cstr).collect();
    let envp: Vec<CString> = c.env.iter().map(cstr).collect();
    let mut argv_p: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
    argv_p.push(std::ptr::null());
    let mut envp_p: Vec<*const libc::c_char> = envp.iter().map(|a| a.as_ptr()).collect();
    envp_p.push(std::ptr::null());
    let prog = cstr(&program);
    // SAFETY: NUL-terminated argv/envp arrays of valid strings that outlive the call.
    unsafe { libc::execve(prog.as_ptr(), argv_p.as_ptr(), envp_p.as_ptr()) };
    format!(
        "exec {}: {}",
        program.display(),
        std::io::Error::last_os_error()
    )
}

/// `args[0]` itself if it has a '/', else the first match on the spec's PATH.
fn resolve(arg0: &str, env: &[String]) -> PathBuf {
    if arg0.contains('/') {
        return arg0.into();
    }
    let path = env
        .iter()
        .find_map(|e| e.strip_prefix("PATH="))
        .unwrap_or("/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin");
    path.split(':')
        .map(|d| Path::new(d).join(arg0))
        .find(|p| p.is_file())
        .unwrap_or_else(|| arg0.into())
}

/// The init's main: namespaces, fork, wait, exit with the process's status.
pub fn main(config_json: &str) -> ExitCode {
    run_init(
        "container-init",
        config_json,
        |c: &LaunchConfig| (c.cgroup.clone(), pod_joins(c)),
        setup_and_exec,
    )
}

/// The pod's namespaces `c` joins: (`/proc/PID/ns/KIND`, its clone flag).
fn pod_joins(c: &LaunchConfig) -> Vec<(PathBuf, libc::c_int)> {
    let Some(dir) = &c.pod_ns else {
        return Vec::new();
    };
    [
        (c.share.ipc, "ipc", libc::CLONE_NEWIPC),
        (c.share.pid, "pid", libc::CLONE_NEWPID),
    ]
    .into_iter()
    .filter(|(on, _, _)| *on)
    .map(|(_, kind, flag)| (dir.join(kind), flag))
    .collect()
}

/// An init's main (`what` names it in errors): its config from JSON, its
/// cgroup and the pod's namespaces it joins (from `enter`) and its own
/// namespaces, then `child` in the forked process, whose status becomes
/// the init's.
pub(super) fn run_init<C: serde::de::DeserializeOwned>(
    what: &str,
    config_json: &str,
    enter: impl FnOnce(&C) -> (Option<PathBuf>, Vec<(PathBuf, libc::c_int)>),
    child: impl FnOnce(&C) -> String,
) -> ExitCode {
    let config: C = match serde_json::from_str(config_json) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("zygote {what}: bad config: {e}");
            return ExitCode::from(EXIT_SETUP_FAILED);
        }
    };
    let (cgroup, joins) = enter(&config);
    if let Err(e) = enter_namespaces(cgroup.as_deref(), &joins) {
        eprintln!("zygote {what}: {e}");
        return ExitCode::from(EXIT_SETUP_FAILED);
    }
    fork_and_wait(what, || child(&config))
}

/// The init's set-up before it forks: into the container's cgroup first
/// (everything forked from here is limited), then the pod's namespaces in
/// `joins`, then new mount, UTS, IPC and PID namespaces for the rest.
fn enter_namespaces(cgroup: Option<&Path>, joins: &[(PathBuf, libc::c_int)]) -> Result<(), String> {
    if let Some(cgroup) = cgroup {
        std::fs::write(cgroup.join("cgroup.procs"), "0")
            .map_err(|e| format!("join {}: {e}", cgroup.display()))?;
    }
    let mut flags =
        libc::CLONE_NEWNS | libc::CLONE_NEWUTS | libc::CLONE_NEWIPC | libc::CLONE_NEWPID;
    for (path, kind) in joins {
        join_namespace(path, *kind)?;
        flags &= !kind;
    }
    // SAFETY: unshare with namespace flags; this process is single-threaded.
    check(unsafe { libc::unshare(flags) }, "unshare")
}

/// Joins the namespace at `path` (`kind`: its `CLONE_NEW*` flag, or 0 for
/// any); the caller must be single-threaded.
pub(super) fn join_namespace(path: &Path, kind: libc::c_int) -> Result<(), String> {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(path).map_err(|e| format!("open {}: {e}", path.display()))?;
    // SAFETY: setns with an fd we own; the caller is single-threaded.
    let rc = unsafe { libc::setns(f.as_raw_fd(), kind) };
    check(rc, &format!("join {}", path.display()))
}

/// Forks; the child runs `child` (which only returns on failure, with the
/// reason); this process waits and exits with the child's status. The
/// "started" pipe at [`super::READY_FD`] goes to the child alone, closed on
/// its exec.
pub(super) fn fork_and_wait(what: &str, child: impl FnOnce() -> String) -> ExitCode {
    let ready = super::READY_FD;
    // SAFETY: fcntl on a descriptor number; EBADF (no pipe given) is harmless.
    let has_ready = unsafe { libc::fcntl(ready, libc::F_SETFD, libc::FD_CLOEXEC) } == 0;
    // SAFETY: fork in a single-threaded process.
    let pid = unsafe { libc::fork() };
    if pid > 0 && has_ready {
        // The process's pid as the agent sees it (this helper shares its PID
        // namespace), so the agent never has to look for it in /proc.
        let bytes = (pid as u32).to_le_bytes();
        // SAFETY: a write of 4 bytes we own to our fd, then closing our copy
        // of the pipe (the child has its own, closed on its exec).
        unsafe {
            libc::write(ready, bytes.as_ptr().cast(), bytes.len());
            libc::close(ready);
        }
    }
    if pid < 0 {
        eprintln!("zygote {what}: fork: {}", std::io::Error::last_os_error());
        return ExitCode::from(EXIT_SETUP_FAILED);
    }
    if pid == 0 {
        let err = child();
        eprintln!("zygote {what}: {err}");
        if has_ready {
            // Why it could not start, for the agent's start request (the
            // pipe closes with this process).
            let message = super::start_failed_message(&err);
            // SAFETY: one write from a buffer we own to our own fd.
            unsafe { libc::write(ready, message.as_ptr().cast(), message.len()) };
        }
        // SAFETY: leaving the child without running the parent's destructors.
        unsafe { libc::_exit(i32::from(EXIT_SETUP_FAILED)) };
    }
    let mut status = 0;
    loop {
        // SAFETY: waitpid for our own child with a valid status pointer.
        let r = unsafe { libc::waitpid(pid, &mut status, 0) };
        if r == pid {
            break;
        }
        if r < 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            return ExitCode::from(EXIT_SETUP_FAILED);
        }
    }
    let code = if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else {
        128 + libc::WTERMSIG(status)
    };
    ExitCode::from(code as u8)
}

/// What `zygote-agent container-exec` gets: the process and the container's
/// PID 1 (whose namespaces and root it joins).
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct ExecConfig {
    /// The process (its `rootfs`, `mounts` and `hostname` are not used).
    pub process: LaunchConfig,
    /// The container's PID 1, as the agent sees it.
    pub target_pid: u32,
}

/// `zygote-agent container-exec CONFIG_JSON`: joins a running container's
/// cgroup, namespaces and root, forks the process there, waits for it.
pub fn exec_main(config_json: &str) -> ExitCode {
    let config: ExecConfig = match serde_json::from_str(config_json) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("zygote container-exec: bad config: {e}");
            return ExitCode::from(EXIT_SETUP_FAILED);
        }
    };
    let result = (|| -> Result<std::fs::File, String> {
        if let Some(cgroup) = &config.process.cgroup {
            std::fs::write(cgroup.join("cgroup.procs"), "0")
                .map_err(|e| format!("join {}: {e}", cgroup.display()))?;
        }
        let pid = config.target_pid;
        // The container's root, opened before leaving our mount namespace.
        let root = std::fs::File::open(format!("/proc/{pid}/root"))
            .map_err(|e| format!("open the container's root: {e}"))?;
        for ns in ["ipc", "uts", "pid", "mnt"] {
            join_namespace(Path::new(&format!("/proc/{pid}/ns/{ns}")), 0)?;
        }
        Ok(root)
    })();
    let root = match result {
        Ok(r) => r,
        Err(e) => {
            eprintln!("zygote container-exec: {e}");
            return ExitCode::from(EXIT_SETUP_FAILED);
        }
    };
    fork_and_wait("container-exec", move || {
        use std::os::fd::AsRawFd;
        let entered = (|| -> Result<(), String> {
            // SAFETY: fchdir to a directory fd we own.
            let rc = unsafe { libc::fchdir(root.as_raw_fd()) };
            check(rc, "enter the container's root")?;
            // SAFETY: a valid path string.
            check(unsafe { libc::chroot(c".".as_ptr()) }, "chroot")?;
            let mut process = config.process.clone();
            process.hostname = None;
            apply_hostname_and_credentials(&process)
        })();
        match entered {
            Ok(()) => exec_process(&config.process),
            Err(e) => e,
        }
    })
}
