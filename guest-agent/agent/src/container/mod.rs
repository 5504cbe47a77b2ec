//! Containers inside the VM: an OCI runtime spec run in its own namespaces
//! with its image as root.
//!
//! - `spec.rs`: the OCI spec, checked, turned into a [`spec::LaunchConfig`].
//! - `init.rs`: the container's init (`zygote-agent container-init`), which
//!   enters the namespaces, sets up the root and execs the process.

pub mod cgroup;
pub mod init;
pub mod oom;
pub mod registry;
pub mod spec;

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

/// Waits until the write ends of a "started" pipe are closed (the process
/// exec'd or died), up to `timeout`. The helper writes the process's pid (as
/// the agent sees it, 4 bytes) first: returned once the pipe is closed.
pub fn wait_ready(read: &File, timeout: std::time::Duration) -> Option<u32> {
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
            let mut buf = [0u8; 16];
            match (&*read).read(&mut buf) {
                Ok(0) => {
                    let pid: [u8; 4] = got.get(..4)?.try_into().ok()?;
                    return Some(u32::from_le_bytes(pid));
                }
                Ok(k) => got.extend_from_slice(&buf[..k]),
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
fn with_ready_fd<'a>(cmd: &'a mut Command, ready: &OwnedFd) -> &'a mut Command {
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
    ready: OwnedFd,
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
        &ready,
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
    ready: OwnedFd,
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
        &ready,
    ))
}

#[cfg(test)]
mod tests {
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
