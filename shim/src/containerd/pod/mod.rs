//! A pod's VM: forked from the template of its image (built on the spot the
//! first time), reconciled into its own machine, then driven through the
//! agent by typed methods (`calls.rs`): the agent's wire types stop here.

mod accounting;
mod calls;
mod disks;
mod network;
mod phases;
mod shares;

pub use accounting::{process_cpu_time, process_demand};
pub use calls::{ExitWait, OomStream, ProcessExit};
pub use network::WiredNetwork;
pub use phases::Phase;

use accounting::threads_cpu;
use network::{Attached, guest_network};

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use zygote_agent_api::{AgentClient, ClientError, MountImage, StageContainer, request, response};
use zygote_vmm::snapshot::{Template, TemplateName, TemplateStore};

use super::config::ShimConfig;
use crate::image::ImageBuild;
use crate::reconcile::{ReconcileSpec, reconcile};
use crate::sandbox::{Sandbox, SandboxConfig};
use crate::template::{self, BuildSpec};

/// Where the image disk is mounted in every template (and so in every fork).
pub const IMAGE_ROOT: &str = "/run/zygote/image";

/// Errors making or using a pod VM.
#[derive(Debug, thiserror::Error)]
pub enum PodError {
    /// The template could not be built or opened.
    #[error("template {name}: {message}")]
    Template {
        /// Its name.
        name: String,
        /// What failed.
        message: String,
    },
    /// The template exists but is damaged (its state file fails its checks,
    /// or its memory file is short). Not rebuilt behind the operator's back:
    /// damage there means a disk or a hand that needs looking at.
    #[error(
        "template {name} at {} is damaged: {why}; remove that directory (or \
         `zygote template rm {name}` in the default store) and the next container builds it again",
        dir.display()
    )]
    Damaged {
        /// Its name.
        name: String,
        /// Its directory.
        dir: PathBuf,
        /// What is wrong (the whole chain of causes).
        why: String,
    },
    /// The fork failed.
    #[error("fork of template {name}")]
    Fork {
        /// Its name.
        name: String,
        /// Cause.
        #[source]
        source: crate::sandbox::SandboxError,
    },
    /// The reconcile failed.
    #[error("reconcile of the new VM")]
    Reconcile(#[from] crate::reconcile::ReconcileError),
    /// The pod's network namespace could not be wired to the VM.
    #[error("the pod's network")]
    Network(#[from] crate::net::NetError),
    /// An agent call failed.
    #[error(transparent)]
    Agent(#[from] ClientError),
    /// The VM is gone.
    #[error("the pod's VM stopped: {0}")]
    Stopped(String),
    /// Every disk slot holds an image.
    #[error(
        "the pod's VM has {slots} disk slots for images other than its first, all in use \
         (by {users:?}); set disk_slots in the zygote config for more"
    )]
    NoSlot {
        /// How many.
        slots: usize,
        /// The containers using them.
        users: Vec<String>,
    },
    /// A host directory could not be shared with the VM.
    #[error("cannot share host directory {path} with the VM: {why}")]
    Share {
        /// The directory.
        path: String,
        /// Why.
        why: String,
    },
    /// A disk slot could not take or give up an image.
    #[error("disk slot: {0}")]
    Disk(String),
    /// The agent answered a request with a body of another request.
    #[error("unexpected answer from the agent to {request}: {answer}")]
    Unexpected {
        /// The request.
        request: &'static str,
        /// What came back.
        answer: String,
    },
}

/// Where a pod VM's start went, ms.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct PodTimings {
    /// The template was built now (the cold path), ms (0 when it existed).
    pub template_build_ms: f64,
    /// This process's CPU time for that build (its VM's included), ms.
    pub template_build_cpu_ms: f64,
    /// Fork: host-side work (map, VM, restore, devices, vCPU threads).
    pub fork_host_ms: f64,
    /// Fork request → agent answered.
    pub fork_ready_ms: f64,
    /// vCPU time inside KVM_RUN until the agent answered.
    pub fork_guest_run_ms: f64,
    /// The reconcile (host's view: round trips included).
    pub reconcile_ms: f64,
}

/// A pod VM's life, measured when it stopped.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PodEnd {
    /// Guest CPU phase by phase (fork, reconcile, each container's create,
    /// start, exit, delete; `teardown`: from the last of those to the VM's stop).
    #[serde(skip)]
    pub phases: Vec<Phase>,
    /// Fork → stopped, ms.
    pub life_ms: f64,
    /// vCPU time inside `KVM_RUN`, ms.
    pub guest_run_ms: f64,
    /// Of which the vCPUs waited halted (the guest idle), ms; None where KVM
    /// has no statistics.
    pub guest_halt_ms: Option<f64>,
    /// The vCPU threads' CPU time inside `KVM_RUN` (guest work), ms.
    pub guest_cpu_ms: f64,
    /// Host-side work: this shim process's CPU time (containerd's requests,
    /// stdio, the VMM's devices and exit handling, fork, reconcile) less the
    /// guest's and less a template build's, ms. Read from the kernel's CPU
    /// accounting, so it does not depend on KVM reporting halts.
    pub host_cpu_ms: f64,
    /// Of which the vCPU threads handling exits (outside `KVM_RUN`), ms.
    pub host_vcpu_exits_ms: f64,
    /// Of which the VMM's device threads (vsock, rng), ms.
    pub host_devices_ms: f64,
}

/// A running pod VM.
pub struct PodVm {
    sandbox: Sandbox,
    /// The pod's network namespace, wired to the VM's NIC (none: no network).
    network: Attached,
    /// The template it was forked from.
    pub template: String,
    /// The image it has on /dev/vda.
    pub image: PathBuf,
    /// Its empty disk slots: the container each one's image is for.
    slots: Mutex<Vec<Option<String>>>,
    /// Idle control connections: a call takes one (or dials a new one), so
    /// a slow call never holds up another.
    idle: Mutex<Vec<AgentClient>>,
    timeout: Duration,
    /// Its start.
    pub timings: PodTimings,
    /// Guest CPU per phase so far.
    phases: Mutex<phases::Phases>,
    /// The reconcile's steps as the agent timed them (guest wall time, ms).
    pub reconcile_steps: Vec<(String, f64)>,
    /// When it was forked.
    pub created: Instant,
    /// Halted because the pod ran out of memory on the host.
    out_of_memory: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for PodVm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PodVm")
            .field("template", &self.template)
            .field("run_dir", &self.sandbox.run_dir())
            .finish()
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// The template name for `image` in VMs of this shape.
pub fn template_name(image: &ImageBuild, config: &ShimConfig) -> String {
    let short: String = image
        .key
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .collect();
    let short = &short[short.len().saturating_sub(16)..];
    format!("ctr-{short}-{}", config.vm_shape())
}

impl PodVm {
    /// Forks the pod's VM from `image`'s template (built first if missing or
    /// stale) and reconciles it with `hostname`; with `network`, the VM's
    /// NIC becomes the pod's interface; `cpus` come online and the pod's
    /// containers together get at most `memory` bytes. On error nothing is
    /// left (no VM; the network, dropped, is detached).
    pub fn create(
        config: &ShimConfig,
        image: &ImageBuild,
        hostname: &str,
        network: Option<WiredNetwork>,
        cpus: u8,
        memory: Option<u64>,
    ) -> Result<Self, PodError> {
        let name = template_name(image, config);
        let failed = |message: String| PodError::Template {
            name: name.clone(),
            message,
        };
        let timeout = Duration::from_secs(config.agent_timeout_s);
        let store = TemplateStore::new(&config.templates);
        let spec = BuildSpec {
            mounts: vec![MountImage {
                device: "/dev/vda".into(),
                target: IMAGE_ROOT.into(),
                warm: true,
                serial: String::new(),
            }],
            name: TemplateName::new(&name).map_err(|e| failed(e.to_string()))?,
            sandbox: SandboxConfig {
                vcpus: config.template_vcpus(),
                online_cpus: if config.sized() { 1 } else { 0 },
                // What a pod asking for no size gets, set once in the template.
                pod_memory_mib: config.pod_memory(None).ok().flatten().unwrap_or(0) >> 20,
                memory_mib: config.template_memory_mib(),
                // Sized by memory: the rest of the RAM is added by each fork.
                extra_cmdline: if config.memory_sized() {
                    format!("mem={}M", config.memory_mib)
                } else {
                    String::new()
                },
                kernel: config.kernel.clone(),
                initramfs: config.initramfs.clone(),
                agent_timeout: Duration::from_secs(config.agent_timeout_s.max(300)),
                disks: vec![image.path.clone()],
                disk_slots: config.disk_slots,
                shared_fs: true,
                ..Default::default()
            },
            spawn: vec![],
            warm: vec![],
            // The pod's first container starts with one exec (the mounts,
            // namespaces and cgroup every container needs are made here).
            stage: Some(StageContainer {
                rootfs: IMAGE_ROOT.into(),
                upper_size_mib: config.upper_size_mib,
            }),
            settle: Duration::from_millis(config.settle_ms),
            force: false,
        };
        let cpu_before = process_cpu_time();
        let built = template::build(&store, &spec)
            .map_err(|e| failed(format!("{:#}", anyhow::Error::from(e))))?;
        let template_build_cpu_ms = ms(process_cpu_time().saturating_sub(cpu_before));
        let template_build_ms = if built.reused { 0.0 } else { built.total_ms };
        if !built.reused {
            tracing::info!(
                "template {name} built for image {} in {:.0} ms (cold path)",
                image.key,
                built.total_ms
            );
        }
        let opened = Template::open(&built.dir).map_err(|e| PodError::Damaged {
            name: name.clone(),
            dir: built.dir.clone(),
            why: format!("{:#}", anyhow::Error::from(e)),
        })?;
        let (network, tap, (interfaces, routes)) = match network {
            Some(wired) => {
                let guest = guest_network(&wired.interface);
                (wired.guard, Some(wired.tap), guest)
            }
            None => (Attached(None), None, Default::default()),
        };
        let sandbox =
            Sandbox::fork_with(&opened, timeout, tap).map_err(|source| PodError::Fork {
                name: name.clone(),
                source,
            })?;
        let fork = sandbox.fork.expect("a forked sandbox has a fork timeline");
        let created = Instant::now()
            .checked_sub(Duration::from_secs_f64(fork.ready_ms / 1e3))
            .unwrap_or_else(Instant::now);
        let mut phases = phases::Phases::new(created, Duration::ZERO);
        phases.mark("fork", sandbox.machine().guest_cpu_time());
        let started = Instant::now();
        let policy = config
            .policy
            .iter()
            .filter_map(|r| crate::reconcile::parse_policy(r).ok())
            .collect();
        let mut client = sandbox.client().map_err(|e| PodError::Fork {
            name: name.clone(),
            source: e,
        })?;
        let outcome = reconcile(
            &mut client,
            &ReconcileSpec {
                generation: 1,
                hostname: hostname.into(),
                policy,
                interfaces,
                routes,
                skip_sample: true,
                ..Default::default()
            },
        )?;
        phases.mark("reconcile", sandbox.machine().guest_cpu_time());
        client.set_timeout(timeout).map_err(ClientError::Io)?;
        let pod = PodVm {
            slots: Mutex::new(vec![None; config.disk_slots as usize]),
            template: name,
            image: image.path.clone(),
            idle: Mutex::new(vec![client]),
            timeout,
            timings: PodTimings {
                template_build_ms,
                template_build_cpu_ms,
                fork_host_ms: fork.host_ms,
                fork_ready_ms: fork.ready_ms,
                fork_guest_run_ms: fork.guest_run_ms,
                reconcile_ms: ms(started.elapsed()),
            },
            phases: Mutex::new(phases),
            reconcile_steps: outcome
                .report
                .steps
                .iter()
                .map(|s| (s.name.clone(), s.elapsed_ns as f64 / 1e6))
                .collect(),
            created,
            sandbox,
            network,
            out_of_memory: Default::default(),
        };
        if config.sized() && cpus > 1 {
            // The template keeps one CPU online; the pod's others come up now.
            pod.set_cpus(cpus)?;
        }
        if let Some(bytes) = memory {
            // RAM beyond what the template uses is added up to the pod's size.
            let ram = if config.memory_sized() {
                config.template_memory_mib() << 20
            } else {
                0
            };
            pod.set_memory(bytes, ram)?;
        }
        Ok(pod)
    }

    /// The vCPU threads' CPU time inside `KVM_RUN` so far (the guest's work).
    pub fn guest_cpu(&self) -> Duration {
        self.sandbox.machine().guest_cpu_time()
    }

    /// Ends phase `name` of the VM's life (see `phases.rs`).
    pub fn mark(&self, name: &'static str) {
        let cpu = self.guest_cpu();
        self.phases.lock().expect("phases lock").mark(name, cpu);
    }

    /// The phases ended so far.
    pub fn phases(&self) -> Vec<Phase> {
        self.phases.lock().expect("phases lock").list().to_vec()
    }

    /// The network namespace the VM is wired into, if any.
    pub fn netns(&self) -> Option<&Path> {
        self.network.0.as_deref()
    }

    /// One request on an idle control connection (a new one if none is
    /// idle). A connection that broke or answered out of step is dropped.
    pub(crate) fn call(&self, body: request::Body) -> Result<response::Body, PodError> {
        self.check()?;
        let idle = self.idle.lock().expect("idle lock").pop();
        let mut client = match idle {
            Some(c) => c,
            None => self.connect()?,
        };
        let result = client.call(body);
        if !matches!(&result, Err(e) if e.breaks_connection()) {
            self.idle.lock().expect("idle lock").push(client);
        }
        result.map_err(|e| self.explain(e))
    }

    /// A connection of its own (for calls that block: waits, OOM events).
    pub fn connect(&self) -> Result<AgentClient, PodError> {
        let client = self
            .sandbox
            .client()
            .map_err(|e| PodError::Stopped(e.to_string()))?;
        client.set_timeout(self.timeout).map_err(ClientError::Io)?;
        Ok(client)
    }

    /// Fails if the VM stopped.
    pub fn check(&self) -> Result<(), PodError> {
        match self.sandbox.machine().exit_reason() {
            Some(reason) => Err(PodError::Stopped(format!(
                "{reason:?}; console:\n{}",
                self.sandbox.machine().console_tail(20)
            ))),
            None => Ok(()),
        }
    }

    /// Stops the guest for good (its processes with it), e.g. when its
    /// agent stopped answering: after this, no guest code runs. Says whether
    /// the vCPU threads had ended within 5 s (see `Machine::halt`).
    pub fn halt(&self) -> (zygote_vmm::ExitReason, bool) {
        self.sandbox.machine().halt(Duration::from_secs(5))
    }

    /// Test hook: a vCPU thread makes a call outside its seccomp list now.
    pub fn trip_seccomp(&self) {
        self.sandbox.machine().trip_seccomp();
    }

    /// Halts the guest because the pod ran out of memory on the host (its
    /// processes' exits say so).
    pub fn halt_out_of_memory(&self) -> (zygote_vmm::ExitReason, bool) {
        self.out_of_memory
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.halt()
    }

    /// Whether it was halted for running out of memory on the host.
    pub fn out_of_memory(&self) -> bool {
        self.out_of_memory.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// An agent error, or why the VM stopped if it did.
    pub fn explain(&self, e: ClientError) -> PodError {
        match self.check() {
            Err(stopped) => stopped,
            Ok(()) => {
                if matches!(e, ClientError::NoAnswer(_)) {
                    // What the guest said last, for the one who looks into
                    // it (the agent reports its own failures there).
                    tracing::warn!(
                        "{e}; guest CPU so far {} ms; console:\n{}",
                        self.guest_cpu().as_millis(),
                        self.sandbox.machine().console_tail(20)
                    );
                }
                PodError::Agent(e)
            }
        }
    }

    /// The hybrid-vsock socket (stdio streams connect through it).
    pub fn vsock_path(&self) -> &Path {
        self.sandbox.vsock_path()
    }

    /// The VM's run directory.
    pub fn run_dir(&self) -> &Path {
        self.sandbox.run_dir()
    }

    /// vCPU time inside KVM_RUN so far.
    pub fn guest_run_ms(&self) -> f64 {
        ms(self.sandbox.machine().guest_run_time())
    }

    /// Stops the VM and removes its run directory. Nothing in it needs a
    /// clean power-off: its disk is read-only and its writable layers are
    /// guest memory.
    pub fn shutdown(self) -> PodEnd {
        self.mark("teardown");
        let phases = self.phases();
        drop(self.idle);
        let life_ms = ms(self.created.elapsed());
        let build_cpu_ms = self.timings.template_build_cpu_ms;
        // The device threads end with the VM: read them just before.
        let devices = threads_cpu("zygote-", "zygote-vcpu");
        let (reason, times) = self.sandbox.kill_timed();
        tracing::info!("pod VM stopped: {reason:?}");
        drop(self.network);
        PodEnd {
            phases,
            life_ms,
            guest_run_ms: ms(times.run),
            guest_halt_ms: times.halt.map(ms),
            guest_cpu_ms: ms(times.cpu),
            host_cpu_ms: ms(process_cpu_time().saturating_sub(times.cpu)) - build_cpu_ms,
            host_vcpu_exits_ms: ms(times.exits),
            host_devices_ms: ms(devices),
        }
    }
}
