//! Long-running processes the agent started (`Spawn`), kept in one cgroup that
//! the reconcile freezes, and remembered well enough to be started again.

use std::collections::HashMap;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Mutex, MutexGuard};

use zygote_agent_api::Spawn;

use crate::procs::{self, Child};

/// The cgroup (v2) of the workload.
pub const CGROUP: &str = "/sys/fs/cgroup/workload";

/// Why a process could not be started.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    /// No program, or a relative one.
    #[error("argv[0] must be an absolute path")]
    BadArgv,
    /// An environment entry without `=`.
    #[error("environment entry {0:?} is not KEY=value")]
    BadEnv(String),
    /// The output file could not be opened.
    #[error("cannot open output {path}: {source}")]
    Output {
        /// The file.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// The program could not be started.
    #[error("cannot start {program}: {source}")]
    Start {
        /// The program.
        program: String,
        /// Cause.
        source: std::io::Error,
    },
}

struct Entry {
    spec: Spawn,
    child: Child,
}

static TABLE: Mutex<Option<HashMap<u32, Entry>>> = Mutex::new(None);

fn table() -> MutexGuard<'static, Option<HashMap<u32, Entry>>> {
    let mut t = TABLE.lock().unwrap_or_else(|p| p.into_inner());
    t.get_or_insert_with(HashMap::new);
    t
}

/// Starts `spec` in the workload cgroup and remembers it.
pub fn spawn(spec: &Spawn) -> Result<u32, SpawnError> {
    let program = spec
        .argv
        .first()
        .filter(|p| p.starts_with('/'))
        .ok_or(SpawnError::BadArgv)?;
    let mut cmd = Command::new(program);
    cmd.args(&spec.argv[1..])
        .env_clear()
        .current_dir(if spec.cwd.is_empty() { "/" } else { &spec.cwd })
        .uid(spec.uid)
        .gid(spec.gid)
        .stdin(Stdio::null());
    for kv in &spec.env {
        let (k, v) = kv
            .split_once('=')
            .ok_or_else(|| SpawnError::BadEnv(kv.clone()))?;
        cmd.env(k, v);
    }
    if spec.output.is_empty() {
        cmd.stdout(Stdio::null()).stderr(Stdio::null());
    } else {
        let open = || {
            std::fs::File::options()
                .create(true)
                .append(true)
                .open(&spec.output)
                .map_err(|source| SpawnError::Output {
                    path: spec.output.clone().into(),
                    source,
                })
        };
        cmd.stdout(open()?).stderr(open()?);
    }
    let child = procs::spawn(&mut cmd).map_err(|source| SpawnError::Start {
        program: program.clone(),
        source,
    })?;
    let pid = child.pid();
    // Into the workload cgroup (absent outside a VM: then it stays where it is).
    let _ = std::fs::write(Path::new(CGROUP).join("cgroup.procs"), pid.to_string());
    table().as_mut().expect("initialised").insert(
        pid,
        Entry {
            spec: spec.clone(),
            child,
        },
    );
    Ok(pid)
}

/// What the agent knows of a process it started.
pub fn spec_of(pid: u32) -> Option<Spawn> {
    table()
        .as_ref()
        .expect("initialised")
        .get(&pid)
        .map(|e| e.spec.clone())
}

/// Whether process `pid` (one the agent started) still runs: `Some(None)`
/// if it does, `Some(Some(code))` with its exit code (128 + N: killed by
/// signal N) if it ended, `None` if the agent did not start it.
pub fn status(pid: u32) -> Option<Option<i32>> {
    use std::os::unix::process::ExitStatusExt;
    let mut table = table();
    let entry = table.as_mut().expect("initialised").get_mut(&pid)?;
    let ended = entry
        .child
        .wait_timeout(Some(std::time::Duration::ZERO))
        .ok()
        .flatten();
    Some(ended.map(|s| {
        s.code()
            .or_else(|| s.signal().map(|n| 128 + n))
            .unwrap_or(128)
    }))
}

/// Kills process `pid` (one the agent started), waits for it, forgets it and
/// returns how it was started.
pub fn kill(pid: u32) -> Option<Spawn> {
    let mut entry = table().as_mut().expect("initialised").remove(&pid)?;
    entry.child.signal(libc::SIGKILL);
    let _ = entry.child.wait();
    Some(entry.spec)
}

/// Creates the workload cgroup (PID 1 at start-up).
pub fn setup_cgroup() {
    if let Err(e) = std::fs::create_dir_all(CGROUP) {
        eprintln!("zygote-agent: cannot create {CGROUP}: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spawn_remember_and_kill() {
        let dir = std::env::temp_dir().join(format!("zygote-workload-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let out = dir.join("out");
        let spec = Spawn {
            argv: vec![
                "/bin/sh".into(),
                "-c".into(),
                "echo $GREETING; pwd; exec sleep 30".into(),
            ],
            env: vec!["GREETING=hello".into()],
            cwd: dir.to_string_lossy().into(),
            uid: unsafe_uid(),
            gid: unsafe_gid(),
            output: out.to_string_lossy().into(),
        };
        let pid = spawn(&spec).unwrap();
        assert_eq!(spec_of(pid), Some(spec.clone()));
        std::thread::sleep(std::time::Duration::from_millis(200));
        assert_eq!(status(pid), Some(None), "still running");
        assert_eq!(status(1), None, "not one of ours");
        assert_eq!(kill(pid), Some(spec));
        assert_eq!(spec_of(pid), None);
        let text = std::fs::read_to_string(&out).unwrap();
        assert_eq!(text, format!("hello\n{}\n", dir.display()));
        assert!(matches!(
            spawn(&Spawn {
                argv: vec!["sh".into()],
                ..Default::default()
            }),
            Err(SpawnError::BadArgv)
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn unsafe_uid() -> u32 {
        // SAFETY: getuid has no preconditions.
        unsafe { libc::getuid() }
    }

    fn unsafe_gid() -> u32 {
        // SAFETY: getgid has no preconditions.
        unsafe { libc::getgid() }
    }
}
