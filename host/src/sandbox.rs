//! A zygote VM with its agent reachable.
//!
//! [`Sandbox::boot`] makes a run directory (vsock socket, console log), boots the
//! machine, and waits until the agent answers a Ping, recording a [`Timeline`].
//! [`Sandbox::shutdown`] asks the agent to power off, stops the machine if it
//! does not, and removes the run directory. Dropping a sandbox also stops the VM
//! and removes its directory: nothing is left behind on any path.

use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;

use zygote_agent_api::{AgentClient, ClientError, Pong, READY_PORT, request};
use zygote_vmm::devices::virtio::net::{NetConfig, Tap};
use zygote_vmm::snapshot::{ForkConfig, ForkError, SnapshotError, SnapshotInfo, Template};
use zygote_vmm::{BuildError, ExitReason, KvmKind, Machine, VmConfig};

use crate::paths;

/// The guest CID. Each VM's hybrid vsock is its own namespace, so all use the same.
pub const GUEST_CID: u64 = 3;
/// How often the host checks (on the host side only) whether the agent said it is ready.
const WAIT_INTERVAL: Duration = Duration::from_millis(2);
/// How often the host probes the guest for an agent that did not say it is ready.
const PROBE_INTERVAL: Duration = Duration::from_secs(2);
/// Console lines quoted in errors.
const TAIL_LINES: usize = 30;

/// How to boot.
#[derive(Debug, Clone)]
pub struct SandboxConfig {
    /// vCPUs.
    pub vcpus: u8,
    /// Guest RAM, MiB.
    pub memory_mib: u64,
    /// Guest kernel.
    pub kernel: PathBuf,
    /// Initramfs with the agent as /init.
    pub initramfs: PathBuf,
    /// Pre-fault guest RAM on the host.
    pub prefault: bool,
    /// Extra kernel parameters.
    pub extra_cmdline: String,
    /// How long the agent may take to answer.
    pub agent_timeout: Duration,
    /// Keep the console log here (default: in the run directory, removed with it).
    pub console_log: Option<PathBuf>,
    /// Read-only disk images (`/dev/vda`, ...).
    pub disks: Vec<PathBuf>,
    /// Empty disk slots after them, for images put in while the guest runs.
    pub disk_slots: u8,
    /// A shared file system with no share yet (virtio-fs), for the host
    /// directories of a fork's pod.
    pub shared_fs: bool,
    /// CPUs a template keeps online (0: all); its forks bring more online
    /// as their pods ask (offline vCPUs halt and cost the host nothing).
    pub online_cpus: u8,
    /// The cap a template puts on all its containers' memory together, MiB
    /// (0: none); its forks keep it unless their pods ask for another size.
    pub pod_memory_mib: u64,
    /// The NIC every VM has, without a link until a fork is given a tap.
    pub nic: Option<NetConfig>,
    /// Whether the agent serves its debug requests (Exec, Spawn, SelfTest:
    /// programs run as root outside any container), which the kernel
    /// command line's `zygote.debug=1` turns on: for the test suite and the
    /// CLI's checks and template warm-ups, never for a pod's VM.
    pub debug_requests: bool,
}

/// The kernel parameter that lets the agent serve debug requests.
pub const DEBUG_CMDLINE: &str = "zygote.debug=1";

impl Default for SandboxConfig {
    fn default() -> Self {
        SandboxConfig {
            vcpus: 1,
            memory_mib: 128,
            kernel: paths::kernel(),
            initramfs: paths::initramfs(),
            prefault: false,
            extra_cmdline: String::new(),
            debug_requests: false,
            agent_timeout: Duration::from_secs(180),
            console_log: None,
            disks: Vec::new(),
            disk_slots: 0,
            shared_fs: false,
            online_cpus: 0,
            pod_memory_mib: 0,
            nic: Some(NetConfig::default()),
        }
    }
}

/// Errors booting or driving a sandbox.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// The run directory could not be created.
    #[error("cannot create run directory {path}")]
    RunDir {
        /// Path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The initramfs is missing (the kernel's absence is reported by the VMM).
    #[error("guest image {0} not found (build it with hack/guest-image)")]
    MissingImage(PathBuf),
    /// The VM could not be built.
    #[error("cannot boot the VM")]
    Build(#[from] BuildError),
    /// The VM could not be forked from its template.
    #[error("cannot fork template {template}")]
    Fork {
        /// The template's directory.
        template: PathBuf,
        /// Cause.
        #[source]
        source: ForkError,
    },
    /// The guest stopped before its agent answered.
    #[error("the guest stopped before its agent answered ({reason:?}); console:\n{console}")]
    GuestExited {
        /// Why.
        reason: ExitReason,
        /// The console's last lines.
        console: String,
    },
    /// The agent did not answer in time.
    #[error("the agent did not answer within {timeout:?}; console:\n{console}")]
    AgentTimeout {
        /// The limit.
        timeout: Duration,
        /// The console's last lines.
        console: String,
    },
    /// Talking to the agent failed.
    #[error("agent call failed")]
    Agent(#[from] ClientError),
}

/// Where boot time went, in milliseconds from the boot request.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Timeline {
    /// Host-side set-up: KVM, memory, kernel load, devices, vCPUs started.
    pub vmm_setup_ms: f64,
    /// When the guest kernel started its clock (agent_ready − guest uptime at the Ping).
    pub kernel_entry_ms: f64,
    /// When the agent started (its own CLOCK_BOOTTIME reading, mapped to host time).
    pub agent_start_ms: f64,
    /// When the agent answered the first Ping.
    pub agent_ready_ms: f64,
    /// Total vCPU time spent inside KVM_RUN until then (guest-side work).
    pub guest_run_ms: f64,
}

/// Where a fork's time went, in milliseconds from the fork request.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct ForkTimeline {
    /// Host-side work: request → all vCPUs running (map, VM, restore, devices, threads).
    pub host_ms: f64,
    /// Of which: mapping the memory file and opening KVM.
    pub map_ms: f64,
    /// Of which: KVM_CREATE_VM, irqchip, PIT, memory slots.
    pub create_vm_ms: f64,
    /// Of which: vCPUs created, VM and vCPU state restored.
    pub restore_ms: f64,
    /// Of which: devices restored.
    pub devices_ms: f64,
    /// Of which: vCPU threads started.
    pub start_ms: f64,
    /// Request → the agent answered a Ping over a new vsock connection.
    pub ready_ms: f64,
    /// vCPU time inside KVM_RUN until then (guest-side work).
    pub guest_run_ms: f64,
}

/// Removes the run directories this process created (for a process ending on a
/// signal, whose destructors will not run).
pub fn remove_own_run_dirs() {
    let prefix = format!("vm-{}-", std::process::id());
    if let Ok(entries) = std::fs::read_dir(paths::run_root()) {
        for e in entries.filter_map(Result::ok) {
            if e.file_name().to_string_lossy().starts_with(&prefix) {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
}

/// Removes the run directories of processes that no longer exist (a shim
/// killed with SIGKILL cannot remove its own); returns how many. A
/// directory's owner is the pid in its name (`vm-<pid>-<n>`).
pub fn sweep_dead_run_dirs() -> usize {
    let Ok(entries) = std::fs::read_dir(paths::run_root()) else {
        return 0;
    };
    let mut removed = 0;
    for e in entries.filter_map(Result::ok) {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix("vm-")
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() && std::fs::remove_dir_all(e.path()).is_ok()
        {
            removed += 1;
        }
    }
    removed
}

/// A per-VM directory under the run root, removed on drop.
#[derive(Debug)]
struct RunDir(PathBuf);

impl RunDir {
    fn create() -> Result<Self, SandboxError> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "vm-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let path = paths::run_root().join(name);
        // The VM's sockets are in here: the owner's alone, whatever the umask.
        let made = std::fs::create_dir_all(paths::run_root())
            .and_then(|()| std::fs::create_dir(&path))
            .and_then(|()| private(&path, 0o700));
        made.map_err(|source| SandboxError::RunDir {
            path: path.clone(),
            source,
        })?;
        Ok(RunDir(path))
    }
}

/// Sets `path`'s mode to exactly `mode` (not what the umask left of it).
pub fn private(path: &Path, mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
}

impl Drop for RunDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A booted VM whose agent answered.
#[derive(Debug)]
pub struct Sandbox {
    // Field order is drop order: the machine (and its socket) before the directory.
    machine: Machine,
    run_dir: RunDir,
    vsock: PathBuf,
    /// Boot timeline (a booted sandbox).
    pub boot: Option<Timeline>,
    /// Fork timeline (a forked sandbox).
    pub fork: Option<ForkTimeline>,
    /// The agent's first answer.
    pub pong: Pong,
}

/// Fails if the guest stopped, or if `timeout` has passed since the machine started.
fn still_waiting(machine: &Machine, timeout: Duration) -> Result<(), SandboxError> {
    if let Some(reason) = machine.exit_reason() {
        return Err(SandboxError::GuestExited {
            reason,
            console: machine.console_tail(TAIL_LINES),
        });
    }
    if machine.started().elapsed() >= timeout {
        return Err(SandboxError::AgentTimeout {
            timeout,
            console: machine.console_tail(TAIL_LINES),
        });
    }
    Ok(())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

impl Sandbox {
    /// Boots a VM and waits for its agent.
    pub fn boot(config: &SandboxConfig) -> Result<Sandbox, SandboxError> {
        if !config.initramfs.exists() {
            return Err(SandboxError::MissingImage(config.initramfs.clone()));
        }
        let run_dir = RunDir::create()?;
        let vsock = run_dir.0.join("vsock.sock");
        let vm_config = VmConfig {
            vcpus: config.vcpus,
            memory_mib: config.memory_mib,
            kernel: config.kernel.clone(),
            initramfs: Some(config.initramfs.clone()),
            extra_cmdline: if config.debug_requests {
                format!("{} {DEBUG_CMDLINE}", config.extra_cmdline)
                    .trim()
                    .to_string()
            } else {
                config.extra_cmdline.clone()
            },
            vsock: Some((GUEST_CID, vsock.clone())),
            console_log: Some(
                config
                    .console_log
                    .clone()
                    .unwrap_or_else(|| run_dir.0.join("console.log")),
            ),
            prefault: config.prefault,
            disks: config.disks.clone(),
            disk_slots: config.disk_slots,
            shared_fs: config.shared_fs,
            net: config.nic,
        };
        // The agent connects here once it listens; until then the host only waits,
        // instead of probing the guest (each probe costs guest kernel work).
        let ready_path = PathBuf::from(format!("{}_{}", vsock.display(), READY_PORT));
        let ready = UnixListener::bind(&ready_path)
            .and_then(|l| private(&ready_path, 0o600).map(|()| l))
            .and_then(|l| l.set_nonblocking(true).map(|()| l))
            .map_err(|source| SandboxError::RunDir {
                path: ready_path.clone(),
                source,
            })?;
        let machine = Machine::boot(&vm_config)?;
        let mut next_probe = Instant::now() + PROBE_INTERVAL;
        let pong = loop {
            still_waiting(&machine, config.agent_timeout)?;
            let signalled = match ready.accept() {
                Ok(_) => true,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => false,
                Err(e) => return Err(ClientError::Io(e).into()),
            };
            // A rare probe as well, for an agent that cannot reach the ready socket.
            if signalled || Instant::now() >= next_probe {
                next_probe = Instant::now() + PROBE_INTERVAL;
                match AgentClient::connect(&vsock, Duration::from_secs(5)) {
                    Ok(mut client) => break client.ping()?,
                    Err(ClientError::Handshake { .. }) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            std::thread::sleep(WAIT_INTERVAL);
        };
        drop(ready);
        let _ = std::fs::remove_file(&ready_path);
        let ready = machine.started().elapsed();
        let uptime = Duration::from_nanos(pong.uptime_ns);
        let agent_age = Duration::from_nanos(pong.uptime_ns.saturating_sub(pong.agent_started_ns));
        let timeline = Timeline {
            vmm_setup_ms: ms(machine.setup_time()),
            kernel_entry_ms: ms(ready.saturating_sub(uptime).max(machine.setup_time())),
            agent_start_ms: ms(ready.saturating_sub(agent_age)),
            agent_ready_ms: ms(ready),
            guest_run_ms: ms(machine.guest_run_time()),
        };
        Ok(Sandbox {
            machine,
            run_dir,
            vsock,
            boot: Some(timeline),
            fork: None,
            pong,
        })
    }

    /// Forks a VM from `template` and waits (up to `timeout`) until its agent
    /// answers a Ping on a new connection. Its NIC, if any, has no link.
    pub fn fork(template: &Template, timeout: Duration) -> Result<Sandbox, SandboxError> {
        Sandbox::fork_with(template, timeout, None)
    }

    /// As [`Sandbox::fork`], the NIC's link up on `tap` if one is given.
    pub fn fork_with(
        template: &Template,
        timeout: Duration,
        tap: Option<Tap>,
    ) -> Result<Sandbox, SandboxError> {
        let run_dir = RunDir::create()?;
        let vsock = run_dir.0.join("vsock.sock");
        let config = ForkConfig {
            vsock_path: Some(vsock.clone()),
            console_log: Some(run_dir.0.join("console.log")),
            disks: Vec::new(),
            tap,
        };
        let machine = Machine::fork(template, config).map_err(|source| SandboxError::Fork {
            template: template.dir().into(),
            source,
        })?;
        let deadline = machine.started() + timeout;
        let pong = loop {
            still_waiting(&machine, timeout)?;
            match AgentClient::connect(
                &vsock,
                deadline
                    .saturating_duration_since(Instant::now())
                    .max(Duration::from_millis(10)),
            ) {
                Ok(mut client) => break client.ping()?,
                Err(ClientError::Handshake { .. }) => std::thread::sleep(WAIT_INTERVAL),
                Err(e) => return Err(e.into()),
            }
        };
        let ready = machine.started().elapsed();
        let phases = machine.fork_phases().unwrap_or_default();
        let fork = ForkTimeline {
            host_ms: ms(machine.setup_time()),
            map_ms: ms(phases.map),
            create_vm_ms: ms(phases.create_vm),
            restore_ms: ms(phases.restore),
            devices_ms: ms(phases.devices),
            start_ms: ms(phases.start),
            ready_ms: ms(ready),
            guest_run_ms: ms(machine.guest_run_time()),
        };
        Ok(Sandbox {
            machine,
            run_dir,
            vsock,
            boot: None,
            fork: Some(fork),
            pong,
        })
    }

    /// Snapshots the VM into `dir` (see [`Machine::snapshot`]), then stops it and
    /// removes its run directory.
    pub fn snapshot_into(mut self, dir: &Path) -> Result<SnapshotInfo, SnapshotError> {
        self.machine.snapshot(dir)
    }

    /// A new connection to the agent.
    pub fn client(&self) -> Result<AgentClient, SandboxError> {
        Ok(AgentClient::connect(&self.vsock, Duration::from_secs(10))?)
    }

    /// The VM's hybrid-vsock socket.
    pub fn vsock_path(&self) -> &Path {
        &self.vsock
    }

    /// The VM's run directory.
    pub fn run_dir(&self) -> &Path {
        &self.run_dir.0
    }

    /// Which KVM runs it.
    pub fn kind(&self) -> KvmKind {
        self.machine.kind()
    }

    /// The machine.
    pub fn machine(&self) -> &Machine {
        &self.machine
    }

    /// Stops the VM at once (no power-off asked) and removes the run directory.
    pub fn kill(self) -> ExitReason {
        self.kill_timed().0
    }

    /// As [`Sandbox::kill`], with the vCPUs' final times (see
    /// [`Machine::shutdown_timed`]).
    pub fn kill_timed(self) -> (ExitReason, zygote_vmm::GuestTimes) {
        let Sandbox {
            machine, run_dir, ..
        } = self;
        let times = machine.shutdown_timed();
        drop(run_dir);
        times
    }

    /// Asks the guest to power off and waits up to `grace`; then stops the VM
    /// regardless and removes the run directory. Returns why the VM stopped.
    pub fn shutdown(self, grace: Duration) -> ExitReason {
        let asked = self.client().and_then(|mut c| {
            c.set_timeout(grace).map_err(ClientError::Io)?;
            Ok(c.call(request::Body::Shutdown(Default::default()))?)
        });
        // Once the request went out the guest may be powering off even if
        // its answer was lost: wait for it then too.
        let sent = match &asked {
            Ok(_) => true,
            Err(SandboxError::Agent(e)) => {
                matches!(e, ClientError::Io(_) | ClientError::NoAnswer(_))
            }
            Err(_) => false,
        };
        let off = sent && self.machine.wait(grace).is_some();
        if !off {
            // What the guest was doing is the only clue to a shutdown that hangs.
            tracing::warn!(
                "the guest did not power off within {grace:?} ({}); its console's last lines:\n{}",
                match &asked {
                    Ok(_) => "it acknowledged the shutdown".to_string(),
                    Err(e) => crate::describe(e),
                },
                self.machine.console_tail(20)
            );
        }
        self.kill()
    }
}
