//! Containers inside the VM: an OCI runtime spec run in its own namespaces
//! with its image as root.
//!
//! - `spec.rs`: the OCI spec, checked, turned into a [`spec::LaunchConfig`].
//! - `init.rs`: the container's init (`zygote-agent container-init`), which
//!   enters the namespaces, sets up the root and execs the process.
//! - `layer.rs`: a container's writable layer (its tmpfs, the overlay).
//! - `staged.rs`: a container staged in a template before its spec is
//!   known; `control.rs`: its control socket.
//! - `volumes.rs`: volumes the host copies in, and the pod's shared ones.
//! - `registry.rs`: the containers of this VM and their processes.

pub mod caps;
pub mod cgroup;
pub mod control;
pub mod init;
pub mod layer;
pub mod masks;
pub mod mounts;
pub mod oom;
pub mod podns;
pub mod registry;
pub mod resolve;
pub mod seccomp;
pub mod spec;
pub mod staged;
pub mod stdio;
pub mod volumes;

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::process::{Command, Stdio};

use crate::procs::{self, Child};

/// The fd on which an init or exec helper gets the write end of the "started"
/// pipe: it reaches the container's process, and closes when that process
/// has exec'd (close-on-exec) or died.
pub const READY_FD: i32 = 3;

/// A "started" pipe: the read end for the agent, the write end for the helper.
pub fn ready_pipe() -> std::io::Result<(File, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills two fds into a valid array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: both fds were just created and are owned by nothing else.
    Ok(unsafe {
        (
            File::from(OwnedFd::from_raw_fd(fds[0])),
            OwnedFd::from_raw_fd(fds[1]),
        )
    })
}

/// What the "started" pipe said.
#[derive(Debug, PartialEq, Eq)]
pub struct Ready {
    /// The process's pid, as the agent sees it.
    pub pid: u32,
    /// Why it could not exec (e.g. no such program), if it could not.
    pub failed: Option<String>,
}

/// The most a helper may say on the pipe (its pid and why it failed).
const READY_MAX: usize = 4096;

/// What a process that could not exec writes on the pipe before its
/// reason: `START_FAILED`, the reason's length (u16, little-endian), the
/// reason. The helper's pid (4 bytes) and this are each one write of less
/// than `PIPE_BUF`, so each arrives whole, in either order.
pub const START_FAILED: &[u8; 8] = b"\0zyfail\0";

/// The message a process that could not exec writes (reason cut to 2 KiB).
pub fn start_failed_message(why: &str) -> Vec<u8> {
    let why = &why.as_bytes()[..why.len().min(2048)];
    let mut m = START_FAILED.to_vec();
    m.extend_from_slice(&(why.len() as u16).to_le_bytes());
    m.extend_from_slice(why);
    m
}

/// The reason in a [`start_failed_message`] at the start of `got`, and the
/// message's length.
fn failure_at(got: &[u8]) -> Option<(String, usize)> {
    let rest = got.strip_prefix(START_FAILED.as_slice())?;
    let len = u16::from_le_bytes(rest.get(..2)?.try_into().ok()?) as usize;
    let why = rest.get(2..2 + len)?;
    Some((
        String::from_utf8_lossy(why).trim().to_string(),
        START_FAILED.len() + 2 + len,
    ))
}

/// The reason a [`start_failed_message`] gives.
pub fn failure_message(message: &[u8]) -> Option<String> {
    failure_at(message).map(|(why, _)| why)
}

/// The pid and the failure, from everything read on the pipe.
fn parse_ready(got: &[u8]) -> Option<Ready> {
    let failure = |at: usize| failure_at(got.get(at..)?);
    let pid_at = |at: usize| -> Option<u32> {
        Some(u32::from_le_bytes(got.get(at..at + 4)?.try_into().ok()?))
    };
    if let Some((why, len)) = failure(0) {
        return Some(Ready {
            pid: pid_at(len)?,
            failed: Some(why),
        });
    }
    Some(Ready {
        pid: pid_at(0)?,
        failed: failure(4).map(|(why, _)| why),
    })
}

/// Waits until the write ends of a "started" pipe are closed (the process
/// exec'd or died), up to `timeout`. The helper writes the process's pid (as
/// the agent sees it, 4 bytes) first; a process that could not exec writes
/// why after it.
pub fn wait_ready(read: &File, timeout: std::time::Duration) -> Option<Ready> {
    use std::io::Read;
    let mut pfd = libc::pollfd {
        fd: read.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let deadline = std::time::Instant::now() + timeout;
    let mut got = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        // SAFETY: poll on one valid pollfd.
        let n = unsafe { libc::poll(&mut pfd, 1, left.as_millis().min(i32::MAX as u128) as i32) };
        if n > 0 {
            let mut buf = [0u8; 512];
            match (&*read).read(&mut buf) {
                Ok(0) => return parse_ready(&got),
                Ok(k) => {
                    let room = READY_MAX.saturating_sub(got.len());
                    got.extend_from_slice(&buf[..k.min(room)]);
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => return None,
            }
            continue;
        }
        if n == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            return None;
        }
    }
}

/// `cmd` with `ready` as its fd [`READY_FD`] (`ready` must stay open until
/// the spawn).
pub(super) fn with_ready_fd<'a>(cmd: &'a mut Command, ready: &OwnedFd) -> &'a mut Command {
    use std::os::unix::process::CommandExt;
    let fd = ready.as_raw_fd();
    // SAFETY: dup2 is async-signal-safe; the closure only uses an integer. The
    // original stays close-on-exec; the copy at READY_FD does not.
    unsafe {
        cmd.pre_exec(move || {
            if libc::dup2(fd, READY_FD) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd
}

/// Starts the container described by `config`: the agent binary `agent_exe` as
/// its init, with the given stdio. The returned child's exit status is the
/// container process's (128 + N when killed by signal N). `ready`'s write end
/// closes when the container's process has exec'd.
pub fn launch(
    config: &spec::LaunchConfig,
    agent_exe: &Path,
    stdin: Stdio,
    stdout: Stdio,
    stderr: Stdio,
    ready: &OwnedFd,
) -> std::io::Result<Child> {
    let json = serde_json::to_string(config).map_err(std::io::Error::other)?;
    procs::spawn(with_ready_fd(
        Command::new(agent_exe)
            .arg("container-init")
            .arg(json)
            .env_clear()
            .stdin(stdin)
            .stdout(stdout)
            .stderr(stderr),
        ready,
    ))
}

/// The container's process: the init's one child (its pid in the agent's view).
/// From `/proc/PID/task/PID/children` where the kernel has it, else by finding
/// the process whose parent is the init (the guest kernel has no
/// `CONFIG_PROC_CHILDREN`).
pub fn process_pid(init_pid: u32) -> Option<u32> {
    if let Ok(children) =
        std::fs::read_to_string(format!("/proc/{init_pid}/task/{init_pid}/children"))
    {
        return children.split_whitespace().next()?.parse().ok();
    }
    child_by_parent(init_pid)
}

/// A process whose parent is `parent`, found by scanning `/proc/*/stat`.
pub fn child_by_parent(parent: u32) -> Option<u32> {
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // "pid (comm) state ppid ...": comm may hold spaces and parentheses.
        let ppid: u32 = stat
            .rsplit_once(')')?
            .1
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()?;
        (ppid == parent).then_some(pid)
    })
}

/// Starts another process in a running container whose PID 1 is `target_pid`.
pub fn launch_exec(
    process: &spec::LaunchConfig,
    target_pid: u32,
    agent_exe: &Path,
    stdin: Stdio,
    stdout: Stdio,
    stderr: Stdio,
    ready: &OwnedFd,
) -> std::io::Result<Child> {
    let config = init::ExecConfig {
        process: process.clone(),
        target_pid,
    };
    let json = serde_json::to_string(&config).map_err(std::io::Error::other)?;
    procs::spawn(with_ready_fd(
        Command::new(agent_exe)
            .arg("container-exec")
            .arg(json)
            .env_clear()
            .stdin(stdin)
            .stdout(stdout)
            .stderr(stderr),
        ready,
    ))
}

#[cfg(test)]
mod tests {
    use super::{Ready, parse_ready, start_failed_message};

    #[test]
    fn the_started_pipe_is_read_in_either_order() {
        let pid = 42u32.to_le_bytes();
        assert_eq!(
            parse_ready(&pid),
            Some(Ready {
                pid: 42,
                failed: None
            })
        );
        let failed = start_failed_message("exec foo: No such file or directory");
        let want = Some(Ready {
            pid: 42,
            failed: Some("exec foo: No such file or directory".into()),
        });
        assert_eq!(parse_ready(&[pid.as_slice(), &failed].concat()), want);
        assert_eq!(parse_ready(&[failed.as_slice(), &pid].concat()), want);
        assert_eq!(parse_ready(&[]), None);
        assert_eq!(parse_ready(&failed), None, "no pid");
    }

    #[test]
    fn the_child_of_a_process_is_found() {
        let mut child = std::process::Command::new("/bin/sh")
            .args(["-c", "sleep 5 & wait"])
            .spawn()
            .unwrap();
        let sh = child.id();
        let found = (0..100).find_map(|_| {
            std::thread::sleep(std::time::Duration::from_millis(10));
            super::process_pid(sh)
        });
        assert_eq!(super::child_by_parent(sh), found, "both ways agree");
        let _ = child.kill();
        let _ = child.wait();
        let sleeper = found.expect("sh's child");
        let stat = std::fs::read_to_string(format!("/proc/{sleeper}/stat")).unwrap_or_default();
        assert!(stat.is_empty() || stat.contains("(sleep)"), "{stat}");
    }
}
