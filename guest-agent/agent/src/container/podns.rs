//! The pod's shared namespaces: what Kubernetes shares between a pod's
//! containers beyond the network (the VM's): IPC always, and PID when the
//! pod sets `shareProcessNamespace`. The CRI names them in each
//! container's `linux.namespaces` as paths into its pause container, which
//! zygote does not run; a spec entry with a path means "the pod's".
//!
//! The agent keeps them in a holder process (`zygote-agent pod-namespaces
//! [IPC_PID]`), started for the pod's first container that asks: it joins
//! the IPC namespace of `IPC_PID` (the first container's, when that one was
//! staged in the template with an IPC namespace of its own) or makes one,
//! makes a PID namespace and forks its PID 1 (as the pause container is),
//! which reaps what is orphaned there and never exits. Containers that
//! share join these in their init (`setns`) instead of making their own.

use std::io::{BufRead, Read};
use std::path::PathBuf;
use std::process::{Command, ExitCode, Stdio};

use crate::procs::{self, Child};

/// The running holder.
#[derive(Debug)]
pub struct PodNamespaces {
    holder: Child,
    pid1: u32,
}

impl PodNamespaces {
    /// Starts the holder (`agent_exe pod-namespaces`), in the IPC namespace
    /// of `ipc_from` if given.
    pub fn start(agent_exe: &std::path::Path, ipc_from: Option<u32>) -> std::io::Result<Self> {
        let mut cmd = Command::new(agent_exe);
        cmd.arg("pod-namespaces")
            .env_clear()
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        if let Some(pid) = ipc_from {
            cmd.arg(pid.to_string());
        }
        let mut holder = procs::spawn(&mut cmd)?;
        let mut said = String::new();
        if let Some(out) = holder.inner.stdout.take() {
            // One line: the PID 1's pid as the agent sees it.
            let _ = std::io::BufReader::new(out.take(32)).read_line(&mut said);
        }
        match said.trim().parse::<u32>() {
            Ok(pid1) if pid1 > 0 => Ok(PodNamespaces { holder, pid1 }),
            _ => {
                let _ = holder.inner.kill();
                let _ = holder.wait();
                Err(std::io::Error::other(format!(
                    "the pod's namespace holder did not start ({:?})",
                    said.trim()
                )))
            }
        }
    }

    /// `/proc/PID/ns` of the namespaces' PID 1.
    pub fn dir(&self) -> PathBuf {
        PathBuf::from(format!("/proc/{}/ns", self.pid1))
    }
}

impl Drop for PodNamespaces {
    fn drop(&mut self) {
        // The PID 1 goes with its namespace (only a signal from outside it
        // ends it); the holder then ends too.
        // SAFETY: kill(2) of a process this holder made.
        unsafe { libc::kill(self.pid1 as i32, libc::SIGKILL) };
        let _ = self.holder.inner.kill();
        let _ = self.holder.wait();
    }
}

/// `zygote-agent pod-namespaces [IPC_PID]`: the holder's main.
pub fn main(ipc_from: Option<&str>) -> ExitCode {
    let made = (|| -> Result<(), String> {
        match ipc_from {
            Some(pid) => {
                let pid: u32 = pid.parse().map_err(|_| format!("not a pid: {pid:?}"))?;
                let ipc = format!("/proc/{pid}/ns/ipc");
                super::init::join_namespace(std::path::Path::new(&ipc), libc::CLONE_NEWIPC)?;
            }
            None => {
                // SAFETY: unshare with a namespace flag; single-threaded.
                let rc = unsafe { libc::unshare(libc::CLONE_NEWIPC) };
                super::init::check(rc, "unshare ipc")?
            }
        }
        // SAFETY: as above; the next child is the new namespace's PID 1.
        let rc = unsafe { libc::unshare(libc::CLONE_NEWPID) };
        super::init::check(rc, "unshare pid")
    })();
    if let Err(e) = made {
        eprintln!("zygote pod-namespaces: {e}");
        return ExitCode::from(1);
    }
    // SAFETY: fork in a single-threaded process.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        eprintln!(
            "zygote pod-namespaces: fork: {}",
            std::io::Error::last_os_error()
        );
        return ExitCode::from(1);
    }
    if pid == 0 {
        // PID 1 of the pod's PID namespace: reap whatever ends up here.
        // SAFETY: closing our copy of stdout (the agent reads the holder's).
        unsafe { libc::close(1) };
        loop {
            let mut status = 0;
            // SAFETY: waitpid for any child with a valid status pointer.
            if unsafe { libc::waitpid(-1, &mut status, 0) } < 0 {
                std::thread::sleep(std::time::Duration::from_secs(1));
            }
        }
    }
    println!("{pid}");
    let mut status = 0;
    // SAFETY: our own child.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    ExitCode::SUCCESS
}
