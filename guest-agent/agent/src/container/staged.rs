//! The pre-staged container: what every container of an image needs before
//! its spec is known, done once in the image's template so that every fork
//! has it ready.
//!
//! In the template the agent mounts a writable layer's tmpfs and the overlay
//! over the image, makes a cgroup, and spawns `zygote-agent container-init
//! --staged`: the init joins the cgroup, enters new mount, UTS, IPC and PID
//! namespaces and forks the container's PID 1 to be, which binds the root and
//! makes the mounts nearly every OCI spec starts with ([`premade_mounts`]:
//! containerd's defaults for `/proc`, `/dev` (with its device nodes),
//! `/dev/pts` and `/sys`), says so on the control socket and waits there.
//!
//! The first container created in a fork whose spec fits takes the slot
//! ([`plan`]): at start the agent sends the process (argv, env, user, cwd,
//! limits, the mounts still to make) and its stdio over the socket, and the
//! waiting process finishes what depends on the spec (unmounts what the spec
//! does not have, makes its other mounts, pivots, takes its credentials) and
//! execs. Nothing of the spec, and nothing secret, is in the template; the
//! reconcile runs before the spec is sent. Every later container, and one
//! whose mounts do not fit, takes the normal path.
//!
//! The control socket is the helper's fd [`super::READY_FD`], a
//! `SOCK_SEQPACKET` pair: the init writes the PID 1's pid there (as it writes
//! it on the "started" pipe of a normal start), the PID 1 writes
//! [`STAGED`] or why it could not stage. At start the agent writes the pid on
//! the container's own "started" pipe and sends that pipe along: from then
//! on, start reads as a normal start does.

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};

use serde::{Deserialize, Serialize};

use super::control::{readable, recv_record, send_record, seqpacket_pair};
use super::init::{check, enter_root, exec_process, run_init};
use super::mounts::{make_mounts, mounts_dev, prepare_root, unmount};
use super::registry::ContainerError;
use super::spec::{LaunchConfig, MountSpec};
use crate::procs::{self, Child};

/// What the PID 1 to be writes once it waits for its spec.
pub const STAGED: &[u8; 9] = b"\0zystaged";

use super::control::CHUNK;

/// The largest process description accepted (argv and env included).
const LAUNCH_MAX: usize = 16 << 20;

/// What `zygote-agent container-init --staged` gets on its command line.
#[derive(Debug, Serialize, Deserialize)]
pub struct StageConfig {
    /// The overlay's merged directory: the container's root to be.
    pub rootfs: PathBuf,
    /// The cgroup the init joins first.
    pub cgroup: Option<PathBuf>,
    /// Made below the root before waiting.
    pub mounts: Vec<MountSpec>,
}

/// What the waiting PID 1 gets at start.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StagedLaunch {
    /// The process; its `mounts` are those still to make, in order.
    pub process: LaunchConfig,
    /// Pre-made mounts the spec does not have, detached first.
    pub unmount: Vec<PathBuf>,
}

/// Mounts nearly every container's spec begins with (containerd's default
/// `/proc`, `/dev`, `/dev/pts` and `/sys`, which both `ctr` and the CRI
/// use), in the order they are made.
pub fn premade_mounts() -> Vec<MountSpec> {
    let m = |destination: &str, fstype: &str, options: &[&str]| MountSpec {
        destination: destination.into(),
        fstype: fstype.into(),
        source: fstype.into(),
        options: options.iter().map(|o| o.to_string()).collect(),
    };
    vec![
        m("/proc", "proc", &["nosuid", "noexec", "nodev"]),
        m(
            "/dev",
            "tmpfs",
            &["nosuid", "strictatime", "mode=755", "size=65536k"],
        ),
        m(
            "/dev/pts",
            "devpts",
            &[
                "nosuid",
                "noexec",
                "newinstance",
                "ptmxmode=0666",
                "mode=0620",
                "gid=5",
            ],
        ),
        m("/sys", "sysfs", &["nosuid", "noexec", "nodev", "ro"]),
    ]
}

/// How a spec's mounts are reached from the pre-made ones.
#[derive(Debug, PartialEq, Eq)]
pub struct Plan {
    /// Pre-made mounts to detach (the spec does not have them).
    pub unmount: Vec<PathBuf>,
    /// The spec's mounts still to make, in the spec's order.
    pub mount: Vec<MountSpec>,
}

/// Whether `inner` is `outer` or below it.
fn within(outer: &Path, inner: &Path) -> bool {
    inner.starts_with(outer)
}

/// The plan that gives the mount tree `spec` asks for, starting from
/// `premade` (made in order), if there is one: the spec's mounts equal to
/// pre-made ones are kept, the others made after them. That is the same tree
/// only if the kept ones come in the spec in the pre-made order, no other
/// spec mount before a kept one nests with it (it would have been under or
/// over it), and no kept one is below a pre-made one that goes.
pub fn plan(premade: &[MountSpec], spec: &[MountSpec]) -> Option<Plan> {
    let mut kept = vec![false; premade.len()];
    let mut last_kept = None;
    let mut mount = Vec::new();
    let mut made_before: Vec<&MountSpec> = Vec::new();
    for m in spec {
        let found = premade
            .iter()
            .enumerate()
            .find(|(i, p)| !kept[*i] && *p == m)
            .map(|(i, _)| i);
        match found {
            Some(i) => {
                if last_kept.is_some_and(|l| l > i) {
                    return None;
                }
                let nests = made_before.iter().any(|b| {
                    within(&b.destination, &m.destination) || within(&m.destination, &b.destination)
                });
                if nests {
                    return None;
                }
                kept[i] = true;
                last_kept = Some(i);
            }
            None => {
                made_before.push(m);
                mount.push(m.clone());
            }
        }
    }
    let gone: Vec<&MountSpec> = premade
        .iter()
        .zip(&kept)
        .filter(|(_, k)| !**k)
        .map(|(p, _)| p)
        .collect();
    let stays_below_gone = premade
        .iter()
        .zip(&kept)
        .filter(|(_, k)| **k)
        .any(|(p, _)| gone.iter().any(|g| within(&g.destination, &p.destination)));
    if stays_below_gone {
        return None;
    }
    Some(Plan {
        // Deepest first (pre-made order is parents first).
        unmount: gone.iter().rev().map(|g| g.destination.clone()).collect(),
        mount,
    })
}

/// A staged container waiting in this VM.
pub struct Slot {
    /// Its state directory (the writable layer's tmpfs).
    pub dir: PathBuf,
    /// The image root its overlay is over.
    pub lower: PathBuf,
    /// The writable layer's size limit it was made with (MiB, 0: default).
    pub upper_size_mib: u32,
    /// Its cgroup, if the guest has cgroup2.
    pub cgroup: Option<PathBuf>,
    init: Child,
    pid: u32,
    control: OwnedFd,
}

impl std::fmt::Debug for Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Slot")
            .field("dir", &self.dir)
            .field("lower", &self.lower)
            .field("pid", &self.pid)
            .finish()
    }
}

fn io(what: &str) -> impl FnOnce(std::io::Error) -> ContainerError + '_ {
    move |source| ContainerError::Os {
        what: what.into(),
        source,
    }
}

impl Slot {
    /// Stages a container over `lower` with its state in `dir` (a writable
    /// layer of `upper_size_mib`) and, with `cgroup_root`, a cgroup; the
    /// helper is `agent_exe`. Waits until its PID 1 waits for a spec.
    pub fn stage(
        dir: &Path,
        lower: &Path,
        upper_size_mib: u32,
        cgroup_root: Option<&Path>,
        agent_exe: &Path,
    ) -> Result<Slot, ContainerError> {
        super::layer::mount_state_tmpfs(dir, upper_size_mib)?;
        let mut cgroup = None;
        let staged = (|| {
            let merged = super::layer::mount_overlay(lower, dir)?;
            if let Some(root) = cgroup_root {
                let made = super::cgroup::create(root, "@staged", &Default::default())
                    .map_err(io("create the staged container's cgroup"))?;
                cgroup = Some(made);
            }
            let config = StageConfig {
                rootfs: merged,
                cgroup: cgroup.clone(),
                mounts: premade_mounts(),
            };
            let json = serde_json::to_string(&config).expect("plain data serializes");
            let (ours, theirs) = seqpacket_pair().map_err(io("make the control socket"))?;
            let init = procs::spawn_helper(super::with_ready_fd(
                Command::new(agent_exe)
                    .args(["container-init", "--staged"])
                    .arg(json)
                    .env_clear()
                    .stdin(Stdio::null()),
                &theirs,
            ))
            .map_err(io("start the staged container's init"))?;
            drop(theirs);
            match wait_staged(&ours, init.pid()) {
                Ok(pid) => Ok((init, pid, ours)),
                Err(e) => {
                    stop_init(init);
                    Err(e)
                }
            }
        })();
        match staged {
            Ok((init, pid, control)) => Ok(Slot {
                dir: dir.into(),
                lower: lower.into(),
                upper_size_mib,
                cgroup,
                init,
                pid,
                control,
            }),
            Err(e) => {
                if let Some(cg) = &cgroup {
                    super::cgroup::remove(cg);
                }
                super::layer::unmount_and_remove(dir);
                Err(e)
            }
        }
    }

    /// Sends the process and its stdio to the waiting PID 1 and lets it
    /// run; returns the init (whose exit status is the process's). The
    /// process's pid is written on `ready` first, as a normal init writes it.
    pub fn launch(
        self,
        launch: &StagedLaunch,
        stdio: [OwnedFd; 3],
        ready: &OwnedFd,
    ) -> std::io::Result<Child> {
        let bytes = self.pid.to_le_bytes();
        // SAFETY: a write of 4 bytes we own to a pipe we own (empty: it cannot block).
        let n = unsafe { libc::write(ready.as_raw_fd(), bytes.as_ptr().cast(), bytes.len()) };
        if n != bytes.len() as isize {
            return Err(std::io::Error::last_os_error());
        }
        let json = serde_json::to_vec(launch).map_err(std::io::Error::other)?;
        let fds = [
            stdio[0].as_raw_fd(),
            stdio[1].as_raw_fd(),
            stdio[2].as_raw_fd(),
            ready.as_raw_fd(),
        ];
        let control = self.control.as_raw_fd();
        let sent = send_record(control, &(json.len() as u64).to_le_bytes(), &fds).and_then(|()| {
            json.chunks(CHUNK)
                .try_for_each(|chunk| send_record(control, chunk, &[]))
        });
        match sent {
            Ok(()) => Ok(self.init),
            Err(e) => {
                // Nothing of it may run on unwaited for.
                stop_init(self.init);
                Err(e)
            }
        }
    }

    /// Whether its init still runs (a slot whose process died is no use).
    pub fn alive(&mut self) -> bool {
        matches!(
            self.init.wait_timeout(Some(std::time::Duration::ZERO)),
            Ok(None)
        )
    }

    /// The staged init's pid.
    pub fn init_pid(&self) -> u32 {
        self.init.pid()
    }

    /// Stops the waiting process (its root, state and cgroup stay).
    pub fn stop(self) {
        drop(self.control);
        stop_init(self.init);
    }

    /// Stops the waiting process and removes what was staged.
    pub fn discard(self) {
        let (dir, cgroup) = (self.dir.clone(), self.cgroup.clone());
        self.stop();
        if let Some(cg) = &cgroup {
            super::cgroup::remove(cg);
        }
        super::layer::unmount_and_remove(&dir);
    }
}

/// Kills a staged init (its PID 1 goes with its PID namespace) and reaps it.
fn stop_init(mut init: Child) {
    init.signal(libc::SIGKILL);
    let _ = init.wait();
}

/// Reads the control socket until the PID 1 waits (returns its pid) or
/// says why it could not.
fn wait_staged(control: &OwnedFd, init_pid: u32) -> Result<u32, ContainerError> {
    let failed = |why: String| ContainerError::StartFailed {
        id: "(staged)".into(),
        why,
    };
    let (mut pid, mut staged) = (None, false);
    while pid.is_none() || !staged {
        if !readable(control.as_raw_fd(), std::time::Duration::from_secs(300)) {
            return Err(failed(format!(
                "its init (pid {init_pid}) did not stage within 300 s"
            )));
        }
        let (record, _) =
            recv_record(control.as_raw_fd(), 0).map_err(io("read the control socket"))?;
        if record.is_empty() {
            return Err(failed("its init exited before it staged".into()));
        }
        if record == STAGED.as_slice() {
            staged = true;
        } else if let Ok(bytes) = <[u8; 4]>::try_from(record.as_slice()) {
            pid = Some(u32::from_le_bytes(bytes));
        } else {
            let why = super::failure_message(&record)
                .unwrap_or_else(|| "a garbled message on the control socket".into());
            return Err(failed(why));
        }
    }
    Ok(pid.expect("read"))
}

/// `zygote-agent container-init --staged CONFIG_JSON`: joins the cgroup,
/// enters the namespaces, forks the PID 1 to be, which makes the root and
/// the pre-made mounts and waits for its process.
pub fn main(config_json: &str) -> ExitCode {
    run_init(
        "container-init --staged",
        config_json,
        |c: &StageConfig| (c.cgroup.clone(), Vec::new()),
        stage_and_exec,
    )
}

/// The PID 1's part: stage, wait, finish, exec; returns why it could not.
fn stage_and_exec(config: &StageConfig) -> String {
    let control = super::READY_FD;
    let staged = prepare_root(&config.rootfs)
        .and_then(|()| make_mounts(&config.rootfs, &config.mounts, mounts_dev(&config.mounts)));
    if let Err(e) = staged {
        return e;
    }
    if let Err(e) = send_record(control, STAGED, &[]) {
        return format!("say it staged: {e}");
    }
    let launch = match receive_launch(control) {
        Ok(l) => l,
        Err(e) if e.is_empty() => {
            // The agent dropped the slot: nothing to run.
            // SAFETY: leaving without running destructors, as a failed child does.
            unsafe { libc::_exit(0) };
        }
        Err(e) => return e,
    };
    let c = &launch.process;
    if c.rootfs != config.rootfs {
        return format!(
            "the process is for root {}, staged {}",
            c.rootfs.display(),
            config.rootfs.display()
        );
    }
    let result = (|| {
        for path in &launch.unmount {
            unmount(&c.rootfs, path)?;
        }
        make_mounts(&c.rootfs, &c.mounts, mounts_dev(&c.mounts))?;
        enter_root(c)
    })();
    match result {
        Ok(()) => exec_process(c),
        Err(e) => e,
    }
}

/// Receives the process and installs its stdio (fds 0-2) and its
/// "started" pipe (fd [`super::READY_FD`], close-on-exec, in place of the
/// control socket). An empty error: the agent closed the socket.
fn receive_launch(control: RawFd) -> Result<StagedLaunch, String> {
    let (header, fds) = recv_record(control, 4).map_err(|e| format!("receive the process: {e}"))?;
    if header.is_empty() && fds.is_empty() {
        return Err(String::new());
    }
    let len = <[u8; 8]>::try_from(header.as_slice())
        .map(u64::from_le_bytes)
        .map_err(|_| "a garbled process header".to_string())? as usize;
    if fds.len() != 4 || len > LAUNCH_MAX {
        return Err(format!(
            "a process header with {} fds and {len} bytes",
            fds.len()
        ));
    }
    let mut json = Vec::with_capacity(len);
    while json.len() < len {
        let (chunk, _) =
            recv_record(control, 0).map_err(|e| format!("receive the process: {e}"))?;
        if chunk.is_empty() {
            return Err("the process was cut short".into());
        }
        json.extend_from_slice(&chunk);
    }
    let launch: StagedLaunch =
        serde_json::from_slice(&json).map_err(|e| format!("a garbled process: {e}"))?;
    // 0-3 are open (stdio and the control socket), so what came is above.
    if fds.iter().any(|fd| fd.as_raw_fd() <= super::READY_FD) {
        return Err("the process's stdio arrived on a low fd".into());
    }
    for (target, fd) in fds.iter().enumerate() {
        // SAFETY: dup2 of an fd we own onto a stdio number (or the started pipe's).
        if unsafe { libc::dup2(fd.as_raw_fd(), target as RawFd) } < 0 {
            check(-1, "install the process's stdio")?;
        }
    }
    drop(fds);
    // SAFETY: fcntl on our own fd.
    unsafe { libc::fcntl(super::READY_FD, libc::F_SETFD, libc::FD_CLOEXEC) };
    Ok(launch)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(destination: &str, fstype: &str) -> MountSpec {
        MountSpec {
            destination: destination.into(),
            fstype: fstype.into(),
            source: fstype.into(),
            options: vec![],
        }
    }

    #[test]
    fn a_spec_with_the_defaults_keeps_them_and_adds_the_rest() {
        let premade = premade_mounts();
        // ctr's defaults as the guest gets them (mqueue left out by the shim).
        let mut ctr = premade.clone();
        ctr.insert(3, m("/dev/shm", "tmpfs"));
        ctr.push(m("/run", "tmpfs"));
        let p = plan(&premade, &ctr).expect("fits");
        assert!(p.unmount.is_empty());
        let dests: Vec<_> = p.mount.iter().map(|m| m.destination.clone()).collect();
        assert_eq!(dests, [PathBuf::from("/dev/shm"), "/run".into()]);
        // The CRI's: the same four, then the cgroup file system.
        let mut cri = premade.clone();
        cri.push(m("/sys/fs/cgroup", "cgroup2"));
        let p = plan(&premade, &cri).expect("fits");
        assert_eq!(p.mount.len(), 1);
    }

    #[test]
    fn pre_made_mounts_a_spec_lacks_go_deepest_first() {
        let premade = premade_mounts();
        let p = plan(&premade, &premade[..1]).expect("fits");
        assert_eq!(
            p.unmount,
            [PathBuf::from("/sys"), "/dev/pts".into(), "/dev".into()]
        );
        let none = plan(&premade, &[]).expect("fits");
        assert_eq!(none.unmount.len(), 4);
    }

    #[test]
    fn a_spec_whose_order_differs_does_not_fit() {
        let premade = premade_mounts();
        // Its own /dev before the default /dev/pts: the kept /dev/pts would
        // end up under the spec's /dev, which it covers instead.
        let spec = vec![
            premade[0].clone(),
            m("/dev", "tmpfs"),
            premade[2].clone(),
            premade[3].clone(),
        ];
        assert_eq!(plan(&premade, &spec), None);
        // /dev/pts kept while /dev goes: it would go with it.
        let spec = vec![premade[0].clone(), premade[2].clone()];
        assert_eq!(plan(&premade, &spec), None);
        // The kept ones out of order.
        let spec = vec![premade[3].clone(), premade[0].clone()];
        assert_eq!(plan(&premade, &spec), None);
        // A mount before a kept one, not nesting with it, is fine.
        let spec = vec![m("/data", "tmpfs"), premade[0].clone()];
        let p = plan(&premade, &spec).expect("fits");
        assert_eq!(p.mount.len(), 1);
        assert_eq!(p.unmount.len(), 3);
    }
}
