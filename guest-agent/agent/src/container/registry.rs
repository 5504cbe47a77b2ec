//! The containers of this VM: create (root overlay, stdio pipes), start, attach
//! stdio streams, wait (exit reported only once attached output is drained),
//! signal, remove.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::thread::JoinHandle;

use super::spec::{LaunchConfig, SpecError, launch_config, plain_absolute};
use super::{launch, process_pid};

/// Where containers' writable layers and mount points live (a tmpfs in the guest).
pub const STATE_DIR: &str = "/run/zygote/containers";

/// Errors of container operations.
#[derive(Debug, thiserror::Error)]
pub enum ContainerError {
    /// Not a valid id.
    #[error("invalid container id {0:?}: use 1-64 of [A-Za-z0-9_.-]")]
    InvalidId(String),
    /// The id is taken.
    #[error("container {0} already exists")]
    Exists(String),
    /// No such container.
    #[error("container {0} not found")]
    NotFound(String),
    /// The spec was refused.
    #[error(transparent)]
    Spec(#[from] SpecError),
    /// The image root is not usable.
    #[error("rootfs {0:?} must be an absolute path to a directory")]
    Rootfs(String),
    /// The container is not in the state the operation needs.
    #[error("container {id} is {state}")]
    State {
        /// Container id.
        id: String,
        /// Its state.
        state: &'static str,
    },
    /// A system call failed.
    #[error("{what}: {source}")]
    Os {
        /// What failed.
        what: String,
        /// Cause.
        source: std::io::Error,
    },
}

fn os(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ContainerError {
    let what = what.into();
    move |source| ContainerError::Os { what, source }
}

enum State {
    Created,
    Running { init_pid: u32 },
    Exited { code: i32 },
}

impl State {
    fn name(&self) -> &'static str {
        match self {
            State::Created => "created, not started",
            State::Running { .. } => "running",
            State::Exited { .. } => "exited",
        }
    }
}

/// The agent's ends of a process's stdio pipes, until a stream takes them.
#[derive(Default)]
struct Pipes {
    stdin: Option<File>,
    stdout: Option<File>,
    stderr: Option<File>,
    /// The process's ends, handed to it at start.
    child: Option<(File, File, File)>,
}

struct Container {
    config: LaunchConfig,
    dir: PathBuf,
    /// The cgroup this entry created (an exec shares its container's).
    cgroup: Option<PathBuf>,
    /// For an exec: the container it runs in (it owns no root or cgroup).
    exec_in: Option<String>,
    state: Mutex<State>,
    exited: Condvar,
    pipes: Mutex<Pipes>,
    drains: Mutex<Vec<JoinHandle<()>>>,
}

impl Container {
    /// A process not started yet, with its stdio pipes.
    fn new(
        config: LaunchConfig,
        dir: PathBuf,
        cgroup: Option<PathBuf>,
        exec_in: Option<String>,
    ) -> Result<Self, ContainerError> {
        let (in_r, in_w) = pipe()?;
        let (out_r, out_w) = pipe()?;
        let (err_r, err_w) = pipe()?;
        Ok(Container {
            config,
            dir,
            cgroup,
            exec_in,
            state: Mutex::new(State::Created),
            exited: Condvar::new(),
            pipes: Mutex::new(Pipes {
                stdin: Some(in_w),
                stdout: Some(out_r),
                stderr: Some(err_r),
                child: Some((in_r, out_w, err_w)),
            }),
            drains: Mutex::default(),
        })
    }
}

/// All containers.
#[derive(Default)]
pub struct Registry {
    containers: Mutex<HashMap<String, Arc<Container>>>,
    state_dir: PathBuf,
    agent_exe: PathBuf,
    cgroup_root: Option<PathBuf>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ids: Vec<String> = self
            .containers
            .lock()
            .map(|c| c.keys().cloned().collect())
            .unwrap_or_default();
        f.debug_struct("Registry")
            .field("containers", &ids)
            .finish()
    }
}

fn pipe() -> Result<(File, File), ContainerError> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills two fds into a valid array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(os("pipe")(std::io::Error::last_os_error()));
    }
    // SAFETY: both fds were just created and are owned by nothing else.
    let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    Ok((File::from(r), File::from(w)))
}

fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id != "."
        && id != ".."
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

fn mount_overlay(lower: &Path, dir: &Path) -> Result<PathBuf, ContainerError> {
    let (upper, work, merged) = (dir.join("upper"), dir.join("work"), dir.join("rootfs"));
    for d in [&upper, &work, &merged] {
        std::fs::create_dir_all(d).map_err(os(format!("create {}", d.display())))?;
    }
    let data = format!(
        "lowerdir={},upperdir={},workdir={}",
        lower.display(),
        upper.display(),
        work.display()
    );
    let c = |s: &str| std::ffi::CString::new(s).unwrap_or_default();
    let (src, target, fstype, data_c) = (
        c("overlay"),
        c(&merged.to_string_lossy()),
        c("overlay"),
        c(&data),
    );
    // SAFETY: valid NUL-terminated strings for the duration of the call.
    let rc = unsafe {
        libc::mount(
            src.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            data_c.as_ptr().cast(),
        )
    };
    if rc != 0 {
        return Err(os("mount overlay")(std::io::Error::last_os_error()));
    }
    Ok(merged)
}

fn unmount_and_remove(dir: &Path) {
    let merged = dir.join("rootfs");
    if let Ok(c) = std::ffi::CString::new(merged.to_string_lossy().as_bytes()) {
        // SAFETY: a valid path string.
        unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
    }
    let _ = std::fs::remove_dir_all(dir);
}

impl Registry {
    /// A registry keeping state under `state_dir`, with `agent_exe` as the containers' init.
    /// Containers get a cgroup each when `cgroup_root` is a cgroup2 hierarchy.
    pub fn new(state_dir: &Path, agent_exe: &Path, cgroup_root: Option<&Path>) -> Self {
        Registry {
            containers: Mutex::default(),
            state_dir: state_dir.into(),
            agent_exe: agent_exe.into(),
            cgroup_root: cgroup_root.and_then(super::cgroup::v2_root),
        }
    }

    /// The agent's registry (PID 1: state in the guest's /run).
    pub fn global() -> &'static Registry {
        static R: OnceLock<Registry> = OnceLock::new();
        R.get_or_init(|| {
            Registry::new(
                Path::new(STATE_DIR),
                Path::new("/proc/self/exe"),
                Some(Path::new("/sys/fs/cgroup")),
            )
        })
    }

    fn get(&self, id: &str) -> Result<Arc<Container>, ContainerError> {
        self.containers
            .lock()
            .expect("registry lock")
            .get(id)
            .cloned()
            .ok_or_else(|| ContainerError::NotFound(id.into()))
    }

    /// Checks the spec, mounts the container's root (an overlay with a tmpfs
    /// upper over `rootfs`) and makes its stdio pipes.
    pub fn create(&self, id: &str, spec_json: &[u8], rootfs: &str) -> Result<(), ContainerError> {
        if !valid_id(id) {
            return Err(ContainerError::InvalidId(id.into()));
        }
        let lower = Path::new(rootfs);
        if !plain_absolute(lower) || !lower.is_dir() {
            return Err(ContainerError::Rootfs(rootfs.into()));
        }
        let dir = self.state_dir.join(id);
        // Checked before anything is mounted.
        launch_config(spec_json, &dir.join("rootfs"))?;
        let mut containers = self.containers.lock().expect("registry lock");
        if containers.contains_key(id) {
            return Err(ContainerError::Exists(id.into()));
        }
        let mut cgroup_dir = None;
        let result = (|| {
            let merged = mount_overlay(lower, &dir)?;
            let mut config = launch_config(spec_json, &merged)?;
            if let Some(root) = &self.cgroup_root {
                let cg = super::cgroup::create(root, id, &config.resources)
                    .map_err(os(format!("create the cgroup of {id}")))?;
                cgroup_dir = Some(cg.clone());
                config.cgroup = Some(cg);
            }
            let cgroup = config.cgroup.clone();
            Container::new(config, dir.clone(), cgroup, None)
        })();
        match result {
            Ok(c) => {
                containers.insert(id.into(), Arc::new(c));
                Ok(())
            }
            Err(e) => {
                if let Some(cg) = &cgroup_dir {
                    super::cgroup::remove(cg);
                }
                unmount_and_remove(&dir);
                Err(e)
            }
        }
    }

    /// Starts the container's process; returns the init's pid.
    pub fn start(&self, id: &str) -> Result<u32, ContainerError> {
        let c = self.get(id)?;
        let mut state = c.state.lock().expect("state lock");
        if !matches!(*state, State::Created) {
            return Err(ContainerError::State {
                id: id.into(),
                state: state.name(),
            });
        }
        let (stdin, stdout, stderr) = c
            .pipes
            .lock()
            .expect("pipes lock")
            .child
            .take()
            .expect("created");
        let mut child = match &c.exec_in {
            None => launch(
                &c.config,
                &self.agent_exe,
                Stdio::from(stdin),
                Stdio::from(stdout),
                Stdio::from(stderr),
            ),
            Some(parent) => {
                let target = self.container_pid(parent)?;
                super::launch_exec(
                    &c.config,
                    target,
                    &self.agent_exe,
                    Stdio::from(stdin),
                    Stdio::from(stdout),
                    Stdio::from(stderr),
                )
            }
        }
        .map_err(os("start the container's init"))?;
        let init_pid = child.pid();
        *state = State::Running { init_pid };
        let c2 = c.clone();
        std::thread::Builder::new()
            .name("agent-wait".into())
            .spawn(move || {
                let code = match child.wait() {
                    Ok(s) => s.code().unwrap_or(128),
                    Err(_) => 128,
                };
                // Output already attached is delivered before the exit is reported.
                let drains: Vec<_> = c2.drains.lock().expect("drains lock").drain(..).collect();
                for d in drains {
                    let _ = d.join();
                }
                *c2.state.lock().expect("state lock") = State::Exited { code };
                c2.exited.notify_all();
            })
            .map_err(os("start a waiter thread"))?;
        Ok(init_pid)
    }

    /// The running container `id`'s PID 1 (as the agent sees it). Right after
    /// a start its init may not have forked it yet: wait for it, a while.
    fn container_pid(&self, id: &str) -> Result<u32, ContainerError> {
        let c = self.get(id)?;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            let init_pid = match *c.state.lock().expect("state lock") {
                State::Running { init_pid } => init_pid,
                ref other => {
                    return Err(ContainerError::State {
                        id: id.into(),
                        state: other.name(),
                    });
                }
            };
            if let Some(pid) = process_pid(init_pid) {
                return Ok(pid);
            }
            if std::time::Instant::now() >= deadline {
                return Err(ContainerError::State {
                    id: id.into(),
                    state: "starting for over 30 s",
                });
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }

    /// Prepares process `exec_id` (an OCI `process` object) in the running
    /// container `id`; it is started with [`Registry::start`] under the key
    /// `id/exec_id`, and its streams attach under that key.
    pub fn exec(&self, id: &str, exec_id: &str, process_json: &[u8]) -> Result<(), ContainerError> {
        if !valid_id(exec_id) {
            return Err(ContainerError::InvalidId(exec_id.into()));
        }
        let parent = self.get(id)?;
        self.container_pid(id)?;
        let process: serde_json::Value =
            serde_json::from_slice(process_json).map_err(|e| SpecError::Parse(e.to_string()))?;
        let wrapped = serde_json::json!({"ociVersion": "1.0.2", "process": process});
        let mut config = launch_config(
            &serde_json::to_vec(&wrapped).expect("plain JSON"),
            &parent.config.rootfs,
        )?;
        config.cgroup = parent.config.cgroup.clone();
        let key = zygote_agent_api::process_key(id, exec_id);
        let mut containers = self.containers.lock().expect("registry lock");
        if containers.contains_key(&key) {
            return Err(ContainerError::Exists(key));
        }
        let exec = Container::new(config, parent.dir.clone(), None, Some(id.into()))?;
        containers.insert(key, Arc::new(exec));
        Ok(())
    }

    /// Connects `stream` (`stdin`, `stdout` or `stderr`) of container `id` to `conn`.
    pub fn attach<S>(&self, id: &str, stream: &str, conn: S) -> Result<(), ContainerError>
    where
        S: Read + Write + Send + 'static,
    {
        let c = self.get(id)?;
        let mut pipes = c.pipes.lock().expect("pipes lock");
        let taken = match stream {
            "stdin" => pipes.stdin.take().map(|p| (p, true)),
            "stdout" => pipes.stdout.take().map(|p| (p, false)),
            "stderr" => pipes.stderr.take().map(|p| (p, false)),
            _ => None,
        };
        let Some((pipe, is_stdin)) = taken else {
            return Err(ContainerError::State {
                id: id.into(),
                state: "already attached, or no such stream",
            });
        };
        let handle = std::thread::Builder::new()
            .name("agent-stdio".into())
            .spawn(move || {
                let (mut pipe, mut conn) = (pipe, conn);
                if is_stdin {
                    let _ = std::io::copy(&mut conn, &mut pipe);
                } else {
                    let _ = std::io::copy(&mut pipe, &mut conn);
                    let _ = conn.flush();
                }
            })
            .map_err(os("start a stdio thread"))?;
        if !is_stdin {
            c.drains.lock().expect("drains lock").push(handle);
        }
        Ok(())
    }

    /// Waits for the container's process to exit; returns its exit code.
    pub fn wait(&self, id: &str) -> Result<i32, ContainerError> {
        let c = self.get(id)?;
        let mut state = c.state.lock().expect("state lock");
        loop {
            match *state {
                State::Exited { code } => return Ok(code),
                State::Created => {
                    return Err(ContainerError::State {
                        id: id.into(),
                        state: state.name(),
                    });
                }
                State::Running { .. } => state = c.exited.wait(state).expect("state lock"),
            }
        }
    }

    /// Sends the container's process `signal`.
    pub fn signal(&self, id: &str, signal: i32) -> Result<(), ContainerError> {
        let c = self.get(id)?;
        let state = c.state.lock().expect("state lock");
        let State::Running { init_pid } = *state else {
            return Err(ContainerError::State {
                id: id.into(),
                state: state.name(),
            });
        };
        let pid = process_pid(init_pid).unwrap_or(init_pid);
        // SAFETY: kill(2) of a process this agent started and has not reaped.
        if unsafe { libc::kill(pid as i32, signal) } != 0 {
            return Err(os("kill")(std::io::Error::last_os_error()));
        }
        Ok(())
    }

    /// Kills the container if it runs, then removes its root and state.
    pub fn remove(&self, id: &str) -> Result<(), ContainerError> {
        let c = self.get(id)?;
        if matches!(*c.state.lock().expect("state lock"), State::Running { .. }) {
            let _ = self.signal(id, libc::SIGKILL);
            self.wait(id)?;
        }
        self.containers.lock().expect("registry lock").remove(id);
        if c.exec_in.is_some() {
            return Ok(());
        }
        // The container's execs go with it.
        let prefix = format!("{id}/");
        let execs: Vec<String> = self
            .containers
            .lock()
            .expect("registry lock")
            .keys()
            .filter(|k| k.starts_with(&prefix))
            .cloned()
            .collect();
        for exec in execs {
            let _ = self.remove(&exec);
        }
        unmount_and_remove(&c.dir);
        if let Some(cg) = &c.cgroup {
            super::cgroup::remove(cg);
        }
        Ok(())
    }

    /// The container's cgroup counters (zeros without a cgroup).
    pub fn stats(&self, id: &str) -> Result<zygote_agent_api::ContainerStats, ContainerError> {
        use super::cgroup::{keyed, single};
        let c = self.get(id)?;
        let Some(cg) = &c.config.cgroup else {
            return Ok(Default::default());
        };
        Ok(zygote_agent_api::ContainerStats {
            cpu_usage_usec: keyed(cg, "cpu.stat", "usage_usec"),
            memory_current: single(cg, "memory.current"),
            memory_max: single(cg, "memory.max"),
            pids_current: single(cg, "pids.current"),
            oom_kills: keyed(cg, "memory.events", "oom_kill"),
        })
    }

    /// Whether the container's cgroup saw an OOM kill.
    pub fn oom_killed(&self, id: &str) -> bool {
        self.stats(id).is_ok_and(|s| s.oom_kills > 0)
    }
}

/// Reads the stream header `<id> <stream>\n` (at most 128 bytes, byte by byte
/// so nothing after it is consumed).
pub fn read_stdio_header(conn: &mut impl Read) -> std::io::Result<(String, String)> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while line.len() < 128 {
        conn.read_exact(&mut byte)?;
        if byte[0] == b'\n' {
            let text = String::from_utf8_lossy(&line).into_owned();
            let mut parts = text.split_whitespace();
            if let (Some(id), Some(stream), None) = (parts.next(), parts.next(), parts.next()) {
                return Ok((id.into(), stream.into()));
            }
            break;
        }
        line.push(byte[0]);
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::InvalidData,
        "bad stdio header",
    ))
}
