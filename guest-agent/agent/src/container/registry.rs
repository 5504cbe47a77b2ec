//! The containers of this VM: create (root overlay, stdio pipes), start, attach
//! stdio streams, wait (exit reported only once attached output is drained),
//! signal, remove.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::thread::JoinHandle;

use zygote_agent_api::Volume;

use super::layer::{mount_overlay, mount_state_tmpfs, resize_state_tmpfs, unmount_and_remove};
use super::spec::{LaunchConfig, SpecError, launch_config, plain_absolute};
use super::staged::{Plan, Slot, StagedLaunch, plan, premade_mounts};
pub use super::stdio::read_stdio_header;
use super::stdio::{Pipes, forward_stdin};
use super::{launch, process_pid};

/// Where containers' writable layers and mount points live (a tmpfs in the guest).
pub const STATE_DIR: &str = "/run/zygote/containers";

/// The staged container's state, in [`STATE_DIR`] ('@' is in no container id).
const STAGED_DIR: &str = "@staged";
/// Under the state directory: the pod's shared volumes.
pub const POD_DIR: &str = "@pod";

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
    /// Not available here.
    #[error("{0}")]
    Unsupported(&'static str),
    /// The process has exited (a signal has no one to reach: containerd's
    /// "process already finished", NOT_FOUND).
    #[error("process {0} already finished")]
    Finished(String),
    /// The process's program is not in the container.
    #[error("{id}: no program {program:?} in the container (looked up on its PATH)")]
    NoProgram {
        /// Container id.
        id: String,
        /// `args[0]`.
        program: String,
    },
    /// The process could not be started (e.g. its program does not exist).
    #[error("{id}: cannot start its process: {why}")]
    StartFailed {
        /// Container (or exec) id.
        id: String,
        /// What the helper said.
        why: String,
    },
    /// A system call failed.
    /// A volume the host sent cannot be placed.
    #[error(transparent)]
    Volume(#[from] super::volumes::VolumeError),
    #[error("{what}: {source}")]
    Os {
        /// What failed.
        what: String,
        /// Cause.
        source: std::io::Error,
    },
}

pub(super) fn os(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ContainerError {
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

/// Whether the process's program (`args[0]`, looked up on the spec's PATH
/// as a shell would) can be in the container's root `root`: it is there (as
/// any kind of file: a link may point into a mount), or it would be on one
/// of the spec's mounts, which are made only at start.
fn program_may_exist(root: &Path, config: &LaunchConfig) -> bool {
    let arg0 = &config.args[0];
    let candidates: Vec<PathBuf> = if arg0.contains('/') {
        vec![config.cwd.join(arg0)]
    } else {
        let path = config
            .env
            .iter()
            .find_map(|e| e.strip_prefix("PATH="))
            .unwrap_or("/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin");
        path.split(':')
            .filter(|d| d.starts_with('/'))
            .map(|d| Path::new(d).join(arg0))
            .collect()
    };
    candidates.iter().any(|p| {
        config.mounts.iter().any(|m| p.starts_with(&m.destination))
            || root
                .join(p.strip_prefix("/").unwrap_or(p))
                .symlink_metadata()
                .is_ok()
    })
}

/// How long an exec's exit waits for its output to end (a background child
/// may hold it open).
const EXEC_OUTPUT_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

/// Waits until every thread of `threads` has finished, at most `grace`
/// (those still running are left to finish on their own).
fn wait_finished(threads: &[JoinHandle<()>], grace: std::time::Duration) {
    let start = std::time::Instant::now();
    while threads.iter().any(|t| !t.is_finished()) && start.elapsed() < grace {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// A process the registry runs in a container: the container's own (its
/// init; it owns the container's root and cgroup) or an exec in it.
struct ContainerProcess {
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
    /// The process's pid (its init's child), once started.
    pid: OnceLock<u32>,
    /// The pre-staged container this one took, until its start.
    staged: Mutex<Option<(Slot, Plan)>>,
}

impl ContainerProcess {
    /// A process not started yet, with its stdio pipes.
    fn new(
        config: LaunchConfig,
        dir: PathBuf,
        cgroup: Option<PathBuf>,
        exec_in: Option<String>,
    ) -> Result<Self, ContainerError> {
        let pipes = if config.terminal {
            Pipes::terminal()?
        } else {
            Pipes::plain()?
        };
        Ok(ContainerProcess {
            config,
            dir,
            cgroup,
            exec_in,
            state: Mutex::new(State::Created),
            exited: Condvar::new(),
            pipes: Mutex::new(pipes),
            drains: Mutex::default(),
            pid: OnceLock::new(),
            staged: Mutex::new(None),
        })
    }
}

/// All containers.
#[derive(Default)]
pub struct Registry {
    containers: Mutex<HashMap<String, Arc<ContainerProcess>>>,
    state_dir: PathBuf,
    agent_exe: PathBuf,
    cgroup_root: Option<PathBuf>,
    oom: OnceLock<Option<super::oom::OomWatcher>>,
    /// The pre-staged container waiting for a spec, if any.
    slot: Mutex<Option<Slot>>,
    /// The pod's shared namespaces, once a container asked for them.
    pod_ns: Mutex<Option<super::podns::PodNamespaces>>,
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

fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id != "."
        && id != ".."
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
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
            oom: OnceLock::new(),
            slot: Mutex::default(),
            pod_ns: Mutex::default(),
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

    fn get(&self, id: &str) -> Result<Arc<ContainerProcess>, ContainerError> {
        self.containers
            .lock()
            .expect("registry lock")
            .get(id)
            .cloned()
            .ok_or_else(|| ContainerError::NotFound(id.into()))
    }

    /// Checks the spec, mounts the container's root (an overlay with a tmpfs
    /// upper over `rootfs`) and makes its stdio pipes.
    pub fn create(
        &self,
        id: &str,
        spec_json: &[u8],
        rootfs: &str,
        upper_size_mib: u32,
        volumes: &[Volume],
    ) -> Result<(), ContainerError> {
        if !valid_id(id) {
            return Err(ContainerError::InvalidId(id.into()));
        }
        let lower = Path::new(rootfs);
        if !plain_absolute(lower) || !lower.is_dir() {
            return Err(ContainerError::Rootfs(rootfs.into()));
        }
        // Checked before anything is mounted.
        let checked = launch_config(spec_json, &self.state_dir.join(id).join("rootfs"))?;
        let mut containers = self.containers.lock().expect("registry lock");
        if containers.contains_key(id) {
            return Err(ContainerError::Exists(id.into()));
        }
        // The staged container has IPC and PID namespaces of its own, made in
        // the template: it can be the pod's first (its IPC becomes the
        // pod's), not join a PID namespace or IPC namespace made before.
        let pod_ns_made = self.pod_ns.lock().expect("pod ns lock").is_some();
        let stageable = !(checked.share.pid || checked.share.ipc && pod_ns_made);
        let mut staged = if stageable {
            self.take_slot(lower, &checked.mounts)
        } else {
            None
        };
        let dir = match &staged {
            Some((slot, _)) => slot.dir.clone(),
            None => self.state_dir.join(id),
        };
        let mut cgroup_dir = None;
        let result = (|| {
            let merged = match &staged {
                Some((slot, _)) => {
                    if slot.upper_size_mib != upper_size_mib {
                        resize_state_tmpfs(&dir, upper_size_mib)?;
                    }
                    dir.join("rootfs")
                }
                None => {
                    mount_state_tmpfs(&dir, upper_size_mib)?;
                    mount_overlay(lower, &dir)?
                }
            };
            let mut config = launch_config(spec_json, &merged)?;
            if config.share.ipc || config.share.pid {
                let ipc_from = staged.as_ref().map(|(slot, _)| slot.init_pid());
                config.pod_ns = Some(self.pod_namespaces(ipc_from)?);
            }
            let pod_dir = self.state_dir.join(POD_DIR);
            super::volumes::place(volumes, &dir, &pod_dir, &mut config.mounts)?;
            if let Some((_, planned)) = &mut staged {
                // The same mounts, their volume sources now guest paths.
                *planned = plan(&premade_mounts(), &config.mounts)
                    .ok_or(ContainerError::Unsupported("a staged plan that changed"))?;
            }
            // As `runc create` does: a program that is not there fails the
            // create, not a start that would "exit 127" later.
            if !program_may_exist(&merged, &config) {
                return Err(ContainerError::NoProgram {
                    id: id.into(),
                    program: config.args[0].clone(),
                });
            }
            let slot_cgroup = staged.as_ref().and_then(|(slot, _)| slot.cgroup.clone());
            if let Some(cg) = slot_cgroup {
                cgroup_dir = Some(cg.clone());
                super::cgroup::apply(&cg, &config.resources)
                    .map_err(os(format!("limit the cgroup of {id}")))?;
            } else if let Some(root) = &self.cgroup_root {
                cgroup_dir = Some(
                    super::cgroup::create(root, id, &config.resources)
                        .map_err(os(format!("create the cgroup of {id}")))?,
                );
            }
            if let Some(cg) = &cgroup_dir {
                if let Some(w) = self.oom() {
                    w.watch(id, cg)
                        .map_err(os(format!("watch the OOM events of {id}")))?;
                }
                config.cgroup = Some(cg.clone());
            }
            let cgroup = config.cgroup.clone();
            ContainerProcess::new(config, dir.clone(), cgroup, None)
        })();
        match result {
            Ok(c) => {
                *c.staged.lock().expect("staged lock") = staged.take();
                containers.insert(id.into(), Arc::new(c));
                Ok(())
            }
            Err(e) => {
                if let Some((slot, _)) = staged {
                    // Its cgroup goes too, even if the create failed before
                    // taking it as the container's.
                    cgroup_dir = cgroup_dir.or_else(|| slot.cgroup.clone());
                    slot.stop();
                }
                if let Some(cg) = &cgroup_dir {
                    if let Some(w) = self.oom() {
                        w.unwatch(id);
                    }
                    super::cgroup::remove(cg);
                }
                unmount_and_remove(&dir);
                Err(e)
            }
        }
    }

    /// The pod's shared namespaces (`/proc/PID/ns`), their holder started
    /// first if need be (in the IPC namespace of `ipc_from`, if given).
    fn pod_namespaces(&self, ipc_from: Option<u32>) -> Result<PathBuf, ContainerError> {
        let mut held = self.pod_ns.lock().expect("pod ns lock");
        if held.is_none() {
            *held = Some(
                super::podns::PodNamespaces::start(&self.agent_exe, ipc_from)
                    .map_err(os("start the pod's namespaces"))?,
            );
        }
        Ok(held.as_ref().expect("just made").dir())
    }

    /// Brings container `id`'s copy of volume `v` to `v`'s content.
    pub fn update_volume(&self, id: &str, v: &Volume) -> Result<(), ContainerError> {
        let c = self.get(id)?;
        let at = super::volumes::copied_root(&c.dir, &v.name);
        if v.shared || v.host || !super::volumes::valid_name(&v.name) || !at.exists() {
            return Err(ContainerError::NotFound(format!(
                "volume {:?} of {id}",
                v.name
            )));
        }
        Ok(super::volumes::write(&at, v)?)
    }

    /// Up to `max` bytes of container `id`'s file volume `name`.
    pub fn read_volume(&self, id: &str, name: &str, max: u32) -> Result<Vec<u8>, ContainerError> {
        let c = self.get(id)?;
        if !super::volumes::valid_name(name) {
            return Err(ContainerError::NotFound(format!("volume {name:?} of {id}")));
        }
        let at = super::volumes::copied_root(&c.dir, name);
        Ok(super::volumes::read(&at, name, max)?)
    }

    /// Stages a container over the image root `rootfs` with a writable
    /// layer of `upper_size_mib` (see [`super::staged`]); returns its
    /// init's pid. One at a time: another is refused while one waits.
    pub fn stage(&self, rootfs: &str, upper_size_mib: u32) -> Result<u32, ContainerError> {
        let lower = Path::new(rootfs);
        if !plain_absolute(lower) || !lower.is_dir() {
            return Err(ContainerError::Rootfs(rootfs.into()));
        }
        let mut slot = self.slot.lock().expect("slot lock");
        if slot.is_some() {
            return Err(ContainerError::Exists("the staged container".into()));
        }
        let staged = Slot::stage(
            &self.state_dir.join(STAGED_DIR),
            lower,
            upper_size_mib,
            self.cgroup_root.as_deref(),
            &self.agent_exe,
        )?;
        let pid = staged.init_pid();
        *slot = Some(staged);
        Ok(pid)
    }

    /// Drops the staged container, if one waits: its process stops, its
    /// root and cgroup go.
    pub fn unstage(&self) {
        if let Some(slot) = self.slot.lock().expect("slot lock").take() {
            slot.discard();
        }
    }

    /// The staged container, if one waits over `lower` and a spec with
    /// `mounts` can take it.
    fn take_slot(&self, lower: &Path, mounts: &[super::spec::MountSpec]) -> Option<(Slot, Plan)> {
        let mut slot = self.slot.lock().expect("slot lock");
        if !slot.as_mut()?.alive() {
            eprintln!("zygote-agent: the staged container's init is gone; dropped");
            slot.take()?.discard();
            return None;
        }
        if slot.as_ref()?.lower != lower {
            return None;
        }
        let plan = plan(&premade_mounts(), mounts)?;
        Some((slot.take()?, plan))
    }

    /// Starts the container's process; returns the init's pid once the
    /// process has exec'd (or failed to), as `runc start` does: an exec or a
    /// signal that follows finds the container's process, not its set-up.
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
        let (ready, ready_w) = super::ready_pipe().map_err(os("make the started pipe"))?;
        let staged = c.staged.lock().expect("staged lock").take();
        let mut child = match (&c.exec_in, staged) {
            (None, Some((slot, plan))) => {
                let mut process = c.config.clone();
                process.mounts = plan.mount;
                // Its UTS namespace was made in the template: without a
                // hostname of its own it takes the VM's (as a fresh one
                // copies it), which the reconcile has set since.
                if process.hostname.is_none() {
                    process.hostname = Some(crate::sys::hostname());
                }
                let launched = StagedLaunch {
                    process,
                    unmount: plan.unmount,
                };
                slot.launch(
                    &launched,
                    [stdin.into(), stdout.into(), stderr.into()],
                    &ready_w,
                )
            }
            (None, None) => launch(
                &c.config,
                &self.agent_exe,
                Stdio::from(stdin),
                Stdio::from(stdout),
                Stdio::from(stderr),
                &ready_w,
            ),
            (Some(parent), _) => {
                let target = self.container_pid(parent)?;
                super::launch_exec(
                    &c.config,
                    target,
                    &self.agent_exe,
                    Stdio::from(stdin),
                    Stdio::from(stdout),
                    Stdio::from(stderr),
                    &ready_w,
                )
            }
        }
        .map_err(os("start the container's init"))?;
        drop(ready_w);
        let init_pid = child.pid();
        *state = State::Running { init_pid };
        drop(state);
        let c2 = c.clone();
        std::thread::Builder::new()
            .name("agent-wait".into())
            .spawn(move || {
                // The init exits with its process's status; if the init itself
                // was killed, 128 + its signal, as a shell reports it.
                let code = match child.wait() {
                    Ok(s) => {
                        use std::os::unix::process::ExitStatusExt;
                        s.code()
                            .or_else(|| s.signal().map(|n| 128 + n))
                            .unwrap_or(128)
                    }
                    Err(_) => 128,
                };
                // Output already attached is delivered before the exit is
                // reported. A container's other processes die with its PID
                // namespace, so its output ends; an exec's background child
                // can hold the exec's stdout open for as long as it lives:
                // its exit is reported after a grace (Kata #869), and the
                // copy goes on until the host closes the stream.
                let drains: Vec<_> = c2.drains.lock().expect("drains lock").drain(..).collect();
                if c2.exec_in.is_some() {
                    wait_finished(&drains, EXEC_OUTPUT_GRACE);
                } else {
                    for d in drains {
                        let _ = d.join();
                    }
                }
                *c2.state.lock().expect("state lock") = State::Exited { code };
                c2.exited.notify_all();
            })
            .map_err(os("start a waiter thread"))?;
        match super::wait_ready(&ready, std::time::Duration::from_secs(60)) {
            Some(super::Ready {
                failed: Some(why), ..
            }) => {
                // runc fails `start` (or `exec`) the same way; the init
                // exits 127 and the process is left exited.
                return Err(ContainerError::StartFailed { id: id.into(), why });
            }
            Some(super::Ready { pid, failed: None }) => {
                let _ = c.pid.set(pid);
            }
            None => eprintln!("zygote-agent: {id}: its process did not start within 60 s"),
        }
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
            if let Some(&pid) = c.pid.get() {
                return Ok(pid);
            }
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
        // The container's filter holds its execs too, as under runc.
        config.seccomp = parent.config.seccomp.clone();
        let key = zygote_agent_api::process_key(id, exec_id);
        let mut containers = self.containers.lock().expect("registry lock");
        if containers.contains_key(&key) {
            return Err(ContainerError::Exists(key));
        }
        let exec = ContainerProcess::new(config, parent.dir.clone(), None, Some(id.into()))?;
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
        let busy = || ContainerError::State {
            id: id.into(),
            state: "already attached, or no such stream",
        };
        if stream == "stdin" {
            if pipes.stdin_attached {
                return Err(busy());
            }
            let slot = pipes.stdin.clone();
            std::thread::Builder::new()
                .name("agent-stdin".into())
                .spawn(move || forward_stdin(conn, &slot))
                .map_err(os("start a stdio thread"))?;
            pipes.stdin_attached = true;
            return Ok(());
        }
        let output = match stream {
            "stdout" => pipes.stdout.take(),
            "stderr" => pipes.stderr.take(),
            _ => None,
        };
        let mut output = output.ok_or_else(busy)?;
        let handle = std::thread::Builder::new()
            .name("agent-stdio".into())
            .spawn(move || {
                let mut conn = conn;
                // A terminal's master reads EIO once the process side is gone
                // (after what it wrote): that is its end of file.
                let _ = std::io::copy(&mut output, &mut conn);
                let _ = conn.flush();
            })
            .map_err(os("start a stdio thread"))?;
        c.drains.lock().expect("drains lock").push(handle);
        Ok(())
    }

    /// Closes the process's stdin: it reads end of file (a terminal stays
    /// open, only the host's input stops).
    pub fn close_stdin(&self, id: &str) -> Result<(), ContainerError> {
        let c = self.get(id)?;
        let slot = c.pipes.lock().expect("pipes lock").stdin.clone();
        slot.lock().expect("stdin lock").take();
        Ok(())
    }

    /// Sets the terminal's window size.
    pub fn resize_tty(&self, id: &str, width: u32, height: u32) -> Result<(), ContainerError> {
        use std::os::fd::AsRawFd;
        let c = self.get(id)?;
        let pipes = c.pipes.lock().expect("pipes lock");
        let Some(tty) = &pipes.tty else {
            return Err(ContainerError::State {
                id: id.into(),
                state: "not on a terminal",
            });
        };
        let size = libc::winsize {
            ws_row: height.min(u32::from(u16::MAX)) as u16,
            ws_col: width.min(u32::from(u16::MAX)) as u16,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ on a terminal fd we own, with a valid winsize.
        if unsafe { libc::ioctl(tty.as_raw_fd(), libc::TIOCSWINSZ, &size) } != 0 {
            return Err(os("set the window size")(std::io::Error::last_os_error()));
        }
        Ok(())
    }

    /// The OOM watcher (None where there are no cgroups).
    fn oom(&self) -> Option<&super::oom::OomWatcher> {
        self.cgroup_root.as_ref()?;
        self.oom
            .get_or_init(|| match super::oom::OomWatcher::start() {
                Ok(w) => Some(w),
                Err(e) => {
                    eprintln!("zygote-agent: no OOM events: {e}");
                    None
                }
            })
            .as_ref()
    }

    /// The next OOM kill in any container; waits up to `timeout` (None: forever).
    pub fn next_oom(
        &self,
        timeout: Option<std::time::Duration>,
    ) -> Result<zygote_agent_api::OomEvent, ContainerError> {
        let Some(w) = self.oom() else {
            return Err(ContainerError::Unsupported(
                "OOM events need the guest's cgroup2 memory controller",
            ));
        };
        w.next(timeout)
            .ok_or(ContainerError::Unsupported("no OOM event in time"))
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
        let init_pid = match *state {
            State::Running { init_pid } => init_pid,
            State::Exited { .. } => return Err(ContainerError::Finished(id.into())),
            State::Created => {
                return Err(ContainerError::State {
                    id: id.into(),
                    state: state.name(),
                });
            }
        };
        let pid = c
            .pid
            .get()
            .copied()
            .or_else(|| process_pid(init_pid))
            .unwrap_or(init_pid);
        // SAFETY: kill(2) of a process this agent started and has not reaped.
        if unsafe { libc::kill(pid as i32, signal) } != 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ESRCH) {
                // Gone, its exit not reported yet.
                return Err(ContainerError::Finished(id.into()));
            }
            return Err(os("kill")(e));
        }
        Ok(())
    }

    /// Kills the container if it runs, then removes its root and state.
    pub fn remove(&self, id: &str) -> Result<(), ContainerError> {
        let c = self.get(id)?;
        // Created from the staged container and never started: its waiting
        // process goes first.
        if let Some((slot, _)) = c.staged.lock().expect("staged lock").take() {
            slot.stop();
        }
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
            if let Some(w) = self.oom() {
                w.unwatch(id);
            }
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

    /// The processes of container `id` (its cgroup's; without a cgroup, its
    /// init and the init's child), as the agent sees their pids.
    pub fn pids(&self, id: &str) -> Result<Vec<u32>, ContainerError> {
        let c = self.get(id)?;
        if let Some(cg) = &c.config.cgroup {
            return Ok(super::cgroup::pids(cg));
        }
        let state = c.state.lock().expect("state lock");
        Ok(match *state {
            State::Running { init_pid } => std::iter::once(init_pid)
                .chain(process_pid(init_pid))
                .collect(),
            _ => Vec::new(),
        })
    }

    /// Changes the limits of container `id`'s cgroup (an OCI
    /// `linux.resources` object).
    pub fn update(&self, id: &str, resources_json: &[u8]) -> Result<(), ContainerError> {
        let c = self.get(id)?;
        let resources = super::spec::parse_resources(resources_json)?;
        let Some(cg) = &c.cgroup else {
            return Err(ContainerError::Unsupported(
                "resource limits need the guest's cgroup2 (and not an exec)",
            ));
        };
        super::cgroup::apply(cg, &resources).map_err(os(format!("update the cgroup of {id}")))
    }

    /// Whether the container's cgroup saw an OOM kill.
    pub fn oom_killed(&self, id: &str) -> bool {
        self.stats(id).is_ok_and(|s| s.oom_kills > 0)
    }
}
