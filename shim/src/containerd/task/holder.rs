//! A host process for each task and exec, whose pid containerd gets.
//!
//! A container's processes run in the guest, but containerd and the tools
//! around it treat a task's pid as a host process that lives exactly as
//! long as the task: they look its cgroup up by it (`/proc/PID/cgroup`),
//! and check with `kill(pid, 0)` that it is gone once its exit was
//! reported (containerd's TestDaemonRestartWithRunningShim). The shim's
//! own pid lives until the last task is deleted, so each process gets a
//! holder: the shim binary again (`/proc/self/exe`, spawned without
//! copying the shim's address space), in the shim's cgroup, idle until
//! it is killed when its process's exit is recorded. It also ends by itself
//! when the shim dies: it waits for end-of-file on a pipe whose other end
//! only the shim holds.

use std::io::Read;
use std::os::fd::{FromRawFd, OwnedFd};
use std::process::{Child, Command, Stdio};

/// The shim binary's argument that makes it a holder.
pub const HOLDER_ARG: &str = "--zygote-pid-holder";

/// A running holder, killed and reaped when dropped.
#[derive(Debug)]
pub struct PidHolder {
    child: Child,
    /// The pipe's write end: closed when the shim dies.
    _lifeline: OwnedFd,
}

impl PidHolder {
    /// Starts one.
    pub fn spawn() -> std::io::Result<PidHolder> {
        let mut fds = [0; 2];
        // SAFETY: pipe2 fills two fds, owned below. Both close on exec; the
        // read end becomes the holder's stdin (dup2 clears the flag there).
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: fresh fds from pipe2, owned once each.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        let child = Command::new("/proc/self/exe")
            .arg(HOLDER_ARG)
            .stdin(Stdio::from(read))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        Ok(PidHolder {
            child,
            _lifeline: write,
        })
    }

    /// Its pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for PidHolder {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The holder's life (the process never returns): until its stdin ends.
pub fn hold() -> ! {
    // Whatever else the shim had open without close-on-exec (a VM's
    // eventfds) is not the holder's to keep.
    // SAFETY: closes fds from 3 up; nothing in this process uses them.
    unsafe { libc::close_range(3, libc::c_uint::MAX, 0) };
    let mut buf = [0u8; 64];
    let mut stdin = std::io::stdin().lock();
    loop {
        match stdin.read(&mut buf) {
            Ok(0) => std::process::exit(0),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => std::process::exit(1),
        }
    }
}
