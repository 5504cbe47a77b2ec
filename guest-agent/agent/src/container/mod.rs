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

use std::path::Path;
use std::process::{Command, Stdio};

use crate::procs::{self, Child};

/// Starts the container described by `config`: the agent binary `agent_exe` as
/// its init, with the given stdio. The returned child's exit status is the
/// container process's (128 + N when killed by signal N).
pub fn launch(
    config: &spec::LaunchConfig,
    agent_exe: &Path,
    stdin: Stdio,
    stdout: Stdio,
    stderr: Stdio,
) -> std::io::Result<Child> {
    let json = serde_json::to_string(config).map_err(std::io::Error::other)?;
    procs::spawn(
        Command::new(agent_exe)
            .arg("container-init")
            .arg(json)
            .env_clear()
            .stdin(stdin)
            .stdout(stdout)
            .stderr(stderr),
    )
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
) -> std::io::Result<Child> {
    let config = init::ExecConfig {
        process: process.clone(),
        target_pid,
    };
    let json = serde_json::to_string(&config).map_err(std::io::Error::other)?;
    procs::spawn(
        Command::new(agent_exe)
            .arg("container-exec")
            .arg(json)
            .env_clear()
            .stdin(stdin)
            .stdout(stdout)
            .stderr(stderr),
    )
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
