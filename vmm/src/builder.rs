//! Building and running a machine: boot (today), restore and fork (later).
//!
//! Boot sequence: open KVM → guest RAM (memfd) → VM with in-kernel irqchip/PIT
//! → load kernel and initramfs → boot data (PVH start info or zero page) → MP
//! table → devices (serial, i8042, virtio-mmio rng, vsock, blk, net) → vCPUs
//! configured → vCPU threads started.

use std::fs::File;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::EventFd;

use crate::arch::x86_64::layout::{
    IRQ_BASE, IRQ_MAX, SERIAL_IRQ, VIRTIO_MMIO_SIZE, VIRTIO_MMIO_START,
};
use crate::arch::x86_64::{boot, mptable};
use crate::devices::bus::{Bus, BusError};
use crate::devices::legacy::{ConsoleLog, I8042, SerialConsole};
use crate::devices::virtio::block::{Block, BlockError, slot_serial};
use crate::devices::virtio::fs::{self, Fs, ServerError};
use crate::devices::virtio::net::{Net, NetConfig};
use crate::devices::virtio::rng::Rng;
use crate::devices::virtio::vsock::{Vsock, VsockError};
use crate::devices::virtio::{MmioTransport, VirtioDevice};
use crate::exit::{ExitReason, ExitSignal};
use crate::vstate::kvm::{KvmError, KvmHandle, KvmKind};
use crate::vstate::memory::{GuestRam, MemoryError};
use crate::vstate::vcpu::{self, Vcpu, VcpuError, VcpuStats};
use crate::vstate::vm::{Vm, VmError};

/// The kernel command line every guest gets; KVM-kind parameters and devices follow.
///
/// `clocksource=kvm-clock`: the guest keeps time by kvmclock, which a fork
/// restores frozen (no monotonic jump however long the template was stored).
/// The TSC clocksource would jump on PVM, where the guest reads the host's TSC
/// without an offset (measured: a fork's uptime grew by the template's age).
pub const BASE_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1 quiet clocksource=kvm-clock";

pub(crate) const SERIAL_PORT: u64 = 0x3f8;
pub(crate) const I8042_PORT: u64 = 0x60;

/// What to boot.
#[derive(Debug, Clone)]
pub struct VmConfig {
    /// Number of vCPUs (1..=32).
    pub vcpus: u8,
    /// Guest RAM in MiB.
    pub memory_mib: u64,
    /// Kernel: ELF vmlinux (PVH entry preferred) or bzImage.
    pub kernel: PathBuf,
    /// Optional uncompressed or compressed initramfs.
    pub initramfs: Option<PathBuf>,
    /// Extra kernel command-line parameters.
    pub extra_cmdline: String,
    /// The vsock device: guest CID and the host Unix socket path.
    pub vsock: Option<(u64, PathBuf)>,
    /// Where the serial console is logged (capped); none keeps only an in-memory tail.
    pub console_log: Option<PathBuf>,
    /// Fault all guest RAM in before the guest runs.
    pub prefault: bool,
    /// Read-only disk images (virtio-blk: `/dev/vda`, `/dev/vdb`, ...).
    pub disks: Vec<PathBuf>,
    /// Empty disk slots after them (serials `zygote-slot0`, ...), for images
    /// put in while the guest runs ([`Machine::set_disk`]).
    pub disk_slots: u8,
    /// A shared file system (virtio-fs, tag [`fs::SHARE_TAG`]) with no
    /// share yet: what a template carries; a fork's host directories are
    /// added to it ([`Machine::share_dir`]) and the guest mounts it then.
    pub shared_fs: bool,
    /// A NIC (virtio-net) without a link: what a template has; its forks
    /// are given a tap.
    pub net: Option<NetConfig>,
}

/// Errors building a machine. Nothing is left running or on disk when one is returned.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// A vCPU count outside 1..=32.
    #[error("invalid vCPU count {0} (1..={max})", max = mptable::MAX_VCPUS)]
    InvalidVcpus(u8),
    /// KVM could not be opened.
    #[error(transparent)]
    Kvm(#[from] KvmError),
    /// Guest memory could not be set up.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// The VM could not be created.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// The kernel or initramfs could not be loaded.
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    /// The MP table could not be written.
    #[error(transparent)]
    Mptable(#[from] mptable::MptableError),
    /// The vsock device could not be created.
    #[error(transparent)]
    Vsock(#[from] VsockError),
    /// A disk image could not be attached.
    #[error(transparent)]
    Block(#[from] BlockError),
    /// A vCPU could not be set up.
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    /// Devices overlap on a bus (a VMM bug).
    #[error(transparent)]
    Bus(#[from] BusError),
    /// Too many devices for the interrupt lines.
    #[error("out of interrupt lines for devices")]
    OutOfIrqs,
    /// The console log could not be created.
    #[error("cannot create console log {path}")]
    ConsoleLog {
        /// Path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// An eventfd, signal handler or thread could not be created.
    #[error("cannot set up {what}")]
    Os {
        /// What.
        what: &'static str,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

fn os(what: &'static str) -> impl FnOnce(std::io::Error) -> BuildError {
    move |source| BuildError::Os { what, source }
}

/// A virtio-mmio device slot: where it is, its line, its transport.
#[derive(Debug)]
pub(crate) struct VirtioSlot {
    pub(crate) base: u64,
    pub(crate) irq: u32,
    pub(crate) transport: Arc<Mutex<MmioTransport>>,
}

/// The devices of a machine being put together.
#[derive(Debug)]
pub(crate) struct LiveDevices {
    pub(crate) exit: ExitSignal,
    pub(crate) console_tail: Arc<Mutex<Vec<u8>>>,
    pub(crate) serial: Arc<Mutex<SerialConsole>>,
    pub(crate) i8042: Arc<Mutex<I8042>>,
    pub(crate) virtio: Vec<VirtioSlot>,
}

/// A running VM.
#[derive(Debug)]
pub struct Machine {
    pub(crate) kind: KvmKind,
    pub(crate) exit: ExitSignal,
    pub(crate) stop: Arc<AtomicBool>,
    pub(crate) vcpu_threads: Vec<JoinHandle<Vcpu>>,
    pub(crate) stats: Vec<Arc<VcpuStats>>,
    pub(crate) console_tail: Arc<Mutex<Vec<u8>>>,
    pub(crate) serial: Arc<Mutex<SerialConsole>>,
    pub(crate) i8042: Arc<Mutex<I8042>>,
    /// Devices live as long as the machine; dropping them stops their threads.
    pub(crate) devices: Vec<VirtioSlot>,
    pub(crate) cmdline: String,
    pub(crate) started: Instant,
    pub(crate) setup: Duration,
    pub(crate) fork_phases: Option<crate::snapshot::ForkPhases>,
    pub(crate) kvm: KvmHandle,
    // Dropped last: the VM and the memory the vCPUs and devices use.
    pub(crate) vm: Vm,
    pub(crate) ram: GuestRam,
}

/// Opens the console log (truncated, mode 0600) and makes the console's sink.
pub(crate) fn console_sink(
    path: Option<&Path>,
    exit: &ExitSignal,
) -> Result<ConsoleLog, BuildError> {
    let file = match path {
        Some(path) => Some(
            File::options()
                .create(true)
                .write(true)
                .truncate(true)
                .mode(0o600)
                .open(path)
                .map_err(|source| BuildError::ConsoleLog {
                    path: path.into(),
                    source,
                })?,
        ),
        None => None,
    };
    Ok(ConsoleLog::new(file, exit.clone()))
}

/// A fresh irqfd wired to `gsi`.
pub(crate) fn irqfd(vm: &Vm, gsi: u32) -> Result<EventFd, BuildError> {
    let evt = EventFd::new(libc::EFD_NONBLOCK).map_err(os("an irqfd"))?;
    vm.register_irqfd(&evt, gsi)?;
    Ok(evt)
}

/// The port I/O bus: the console and the i8042.
pub(crate) fn legacy_bus(
    serial: &Arc<Mutex<SerialConsole>>,
    i8042: &Arc<Mutex<I8042>>,
) -> Result<Bus, BusError> {
    let mut pio = Bus::default();
    pio.insert(serial.clone(), SERIAL_PORT, 8)?;
    pio.insert(i8042.clone(), I8042_PORT, 5)?;
    Ok(pio)
}

/// The MMIO bus of the virtio slots.
pub(crate) fn virtio_bus(devices: &[VirtioSlot]) -> Result<Bus, BusError> {
    let mut mmio = Bus::default();
    for slot in devices {
        mmio.insert(slot.transport.clone(), slot.base, VIRTIO_MMIO_SIZE)?;
    }
    Ok(mmio)
}

/// Where a machine's vCPUs spent their time, summed over them.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct GuestTimes {
    /// Inside `KVM_RUN` (wall time: guest work, and the guest halted).
    pub run: Duration,
    /// Of which halted, waiting for an interrupt; None where KVM has no
    /// binary statistics (PVM reports almost none: it idles otherwise).
    pub halt: Option<Duration>,
    /// The vCPU threads' CPU time inside `KVM_RUN`: guest work only, halts
    /// excluded, on any KVM.
    pub cpu: Duration,
    /// The vCPU threads' time outside `KVM_RUN`: the VMM handling exits.
    pub exits: Duration,
}

impl Machine {
    /// Boots `config`. On error nothing is left behind (threads, sockets, files).
    pub fn boot(config: &VmConfig) -> Result<Machine, BuildError> {
        let start = Instant::now();
        if config.vcpus == 0 || config.vcpus > mptable::MAX_VCPUS {
            return Err(BuildError::InvalidVcpus(config.vcpus));
        }
        vcpu::install_kick_handler().map_err(os("the vCPU kick signal"))?;
        let kvm = KvmHandle::open()?;
        let ram = GuestRam::new(config.memory_mib, config.prefault)?;
        let mem = &ram.memory;
        let vm = Vm::new(&kvm, mem)?;

        let kernel = boot::load_kernel(mem, &config.kernel)?;
        let initramfs = config
            .initramfs
            .as_deref()
            .map(|path| boot::load_initramfs(mem, path, &kernel))
            .transpose()?;
        mptable::setup(mem, config.vcpus)?;

        let exit = ExitSignal::default();
        let console_out = console_sink(config.console_log.as_deref(), &exit)?;
        let console_tail = console_out.tail();
        let serial = Arc::new(Mutex::new(SerialConsole::new(
            irqfd(&vm, SERIAL_IRQ)?,
            console_out,
        )));
        let i8042 = Arc::new(Mutex::new(I8042::new(exit.clone())));

        let mut virtio: Vec<Box<dyn VirtioDevice>> = vec![Box::new(Rng::new())];
        if let Some((cid, path)) = &config.vsock {
            virtio.push(Box::new(Vsock::new(*cid, path)?));
        }
        for disk in &config.disks {
            virtio.push(Box::new(Block::new(disk)?));
        }
        for n in 0..config.disk_slots {
            virtio.push(Box::new(Block::slot(&slot_serial(n))));
        }
        if config.shared_fs {
            virtio.push(Box::new(
                Fs::new(fs::SHARE_TAG).expect("the share's tag is valid"),
            ));
        }
        if let Some(net) = config.net {
            virtio.push(Box::new(Net::new(net, None)));
        }
        let mut devices = Vec::new();
        let mut cmdline_devices = Vec::new();
        for (i, device) in virtio.into_iter().enumerate() {
            let irq = IRQ_BASE + i as u32;
            if irq > IRQ_MAX {
                return Err(BuildError::OutOfIrqs);
            }
            let base = VIRTIO_MMIO_START + i as u64 * VIRTIO_MMIO_SIZE;
            let transport = MmioTransport::new(device, mem.clone(), irqfd(&vm, irq)?)
                .map_err(os("a virtio transport"))?;
            devices.push(VirtioSlot {
                base,
                irq,
                transport: Arc::new(Mutex::new(transport)),
            });
            cmdline_devices.push(format!("virtio_mmio.device=4K@{base:#x}:{irq}"));
        }

        let mut parts = vec![BASE_CMDLINE, kvm.kind.guest_cmdline()];
        parts.extend(cmdline_devices.iter().map(String::as_str));
        parts.push(&config.extra_cmdline);
        let cmdline = boot::build_cmdline(&parts)?;
        boot::write_boot_data(mem, &kernel, &cmdline, initramfs)?;

        let vcpus = (0..config.vcpus)
            .map(|i| {
                let vcpu = Vcpu::new(&vm, i)?;
                vcpu.configure(&kvm, mem, &kernel, config.vcpus)?;
                Ok(vcpu)
            })
            .collect::<Result<Vec<_>, VcpuError>>()?;

        let cmdline = cmdline
            .as_cstring()
            .map(|c| c.to_string_lossy().into_owned())
            .unwrap_or_default();
        let devices = LiveDevices {
            exit,
            console_tail,
            serial,
            i8042,
            virtio: devices,
        };
        let machine = Machine::assemble(kvm, vm, ram, devices, cmdline, start, vcpus)?;
        tracing::info!(kind = %machine.kind, setup_us = machine.setup.as_micros() as u64, "VM started");
        Ok(machine)
    }

    /// Puts a machine together from its parts and starts its vCPUs; `setup` is
    /// the time since `start`.
    pub(crate) fn assemble(
        kvm: KvmHandle,
        vm: Vm,
        ram: GuestRam,
        devices: LiveDevices,
        cmdline: String,
        start: Instant,
        vcpus: Vec<Vcpu>,
    ) -> Result<Machine, BuildError> {
        let mut machine = Machine {
            kind: kvm.kind,
            exit: devices.exit,
            stop: Arc::new(AtomicBool::new(false)),
            vcpu_threads: Vec::new(),
            stats: Vec::new(),
            console_tail: devices.console_tail,
            serial: devices.serial,
            i8042: devices.i8042,
            devices: devices.virtio,
            cmdline,
            started: start,
            setup: Duration::ZERO,
            fork_phases: None,
            kvm,
            vm,
            ram,
        };
        machine.start_vcpus(vcpus)?;
        machine.setup = start.elapsed();
        Ok(machine)
    }

    /// Starts one thread per vCPU, with the machine's buses.
    pub(crate) fn start_vcpus(&mut self, vcpus: Vec<Vcpu>) -> Result<(), BuildError> {
        let pio = legacy_bus(&self.serial, &self.i8042)?;
        let mmio = virtio_bus(&self.devices)?;
        for vcpu in vcpus {
            let stats = Arc::new(VcpuStats {
                kvm: vcpu.kvm_stats(),
                ..Default::default()
            });
            let (pio, mmio, exit, stop) = (
                pio.clone(),
                mmio.clone(),
                self.exit.clone(),
                self.stop.clone(),
            );
            let thread_stats = stats.clone();
            let handle = std::thread::Builder::new()
                .name("zygote-vcpu".into())
                .spawn(move || vcpu.run(pio, mmio, exit, stop, thread_stats))
                .map_err(os("a vCPU thread"))?;
            self.vcpu_threads.push(handle);
            self.stats.push(stats);
        }
        Ok(())
    }

    /// Which KVM runs this machine.
    pub fn kind(&self) -> KvmKind {
        self.kind
    }

    /// The kernel command line the guest got.
    pub fn cmdline(&self) -> &str {
        &self.cmdline
    }

    /// When `boot` was called.
    pub fn started(&self) -> Instant {
        self.started
    }

    /// Time from `boot` being called to the vCPUs running (host-side set-up).
    pub fn setup_time(&self) -> Duration {
        self.setup
    }

    /// Time all vCPUs spent inside `KVM_RUN` so far (guest-side work).
    pub fn guest_run_time(&self) -> Duration {
        Duration::from_nanos(
            self.stats
                .iter()
                .map(|s| s.run_ns.load(Ordering::Relaxed))
                .sum(),
        )
    }

    /// CPU time all vCPU threads spent inside `KVM_RUN` so far (guest work,
    /// halts excluded; on PVM also the host work done inside `KVM_RUN` on the
    /// guest's behalf: emulation, shadow paging, copy-on-write faults).
    pub fn guest_cpu_time(&self) -> Duration {
        Duration::from_nanos(self.stats.iter().map(|s| s.cpu_in_run_now_ns()).sum())
    }

    /// Time all vCPUs waited halted inside `KVM_RUN` so far (the guest idle,
    /// waiting for an interrupt); None where KVM has no binary statistics.
    pub fn guest_halt_time(&self) -> Option<Duration> {
        let mut total = 0;
        for s in &self.stats {
            total += s.kvm.as_ref()?.halt_wait_ns();
        }
        Some(Duration::from_nanos(total))
    }

    /// Exits to userspace so far, over all vCPUs.
    pub fn exit_count(&self) -> u64 {
        self.stats
            .iter()
            .map(|s| s.exits.load(Ordering::Relaxed))
            .sum()
    }

    /// Why the VM stopped, if it has.
    pub fn exit_reason(&self) -> Option<ExitReason> {
        self.exit.reason()
    }

    /// Waits up to `timeout` for the VM to stop by itself.
    pub fn wait(&self, timeout: Duration) -> Option<ExitReason> {
        self.exit.wait_timeout(timeout)
    }

    /// Puts image `path` in the empty disk slot `serial`, or (None) empties
    /// it, and tells the guest's driver (a configuration change: it reads
    /// the new capacity). Empty it only once the guest no longer uses it.
    pub fn set_disk(&self, serial: &str, path: Option<&Path>) -> Result<(), BlockError> {
        for slot in &self.devices {
            let mut transport = slot.transport.lock().expect("virtio transport lock");
            let found = match transport.device_mut().as_block() {
                Some(block) if block.serial() == serial => {
                    block.set_image(path)?;
                    true
                }
                _ => false,
            };
            if found {
                transport.config_changed();
                return Ok(());
            }
        }
        Err(BlockError::NoSlot(serial.into()))
    }

    /// Serves host directory `dir` to the guest as `/NAME` of its shared
    /// file system (read-only on the host side too if `read_only`). The
    /// guest mounts the file system once its first share is there.
    pub fn share_dir(&self, name: &str, dir: &Path, read_only: bool) -> Result<(), ServerError> {
        for slot in &self.devices {
            let mut transport = slot.transport.lock().expect("virtio transport lock");
            if let Some(fs) = transport.device_mut().as_fs() {
                return fs.add_share(name, dir, read_only);
            }
        }
        Err(ServerError::Start(std::io::Error::other(
            "this VM has no shared file system device",
        )))
    }

    /// The last lines the guest wrote to its console.
    pub fn console_tail(&self, lines: usize) -> String {
        let tail = self.console_tail.lock().expect("tail lock");
        let text = String::from_utf8_lossy(&tail);
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Stops the guest for good from a shared reference (e.g. a monitor that
    /// found it unresponsive): its exit reason becomes
    /// [`ExitReason::Stopped`] unless it had one, and its vCPUs are kicked
    /// out of `KVM_RUN` and never enter it again, so no guest code runs
    /// after this returns. Waits up to `limit` for the vCPU threads to end
    /// (one stopped by a debugger ends when it runs again); says whether
    /// they did. Its threads are joined at [`Machine::shutdown`] or drop.
    pub fn halt(&self, limit: Duration) -> (ExitReason, bool) {
        self.exit.raise(ExitReason::Stopped);
        let ended = vcpu::halt_threads(&self.vcpu_threads, &self.stop, Some(limit));
        (self.exit.reason().unwrap_or(ExitReason::Stopped), ended)
    }

    /// Test hook: arms [`crate::jail::arm_trip`] and kicks the vCPU threads
    /// out of `KVM_RUN`, so one of them makes a call outside its list now.
    pub fn trip_seccomp(&self) {
        crate::jail::arm_trip();
        vcpu::kick_threads(&self.vcpu_threads);
    }

    /// Stops the VM (if still running), joins its threads and releases everything.
    pub fn shutdown(mut self) -> ExitReason {
        self.stop_threads()
    }

    /// As [`Machine::shutdown`], and the vCPUs' final times (halts are
    /// accounted by KVM when they end, and a thread's CPU time when its run
    /// loop ends, so these are exact only once the vCPUs stopped).
    pub fn shutdown_timed(mut self) -> (ExitReason, GuestTimes) {
        let reason = self.stop_threads();
        let times = GuestTimes {
            run: self.guest_run_time(),
            halt: self.guest_halt_time(),
            cpu: Duration::from_nanos(self.stats.iter().map(|s| s.cpu_in_run_ns()).sum()),
            exits: Duration::from_nanos(self.stats.iter().map(|s| s.outside_run_ns()).sum()),
        };
        (reason, times)
    }

    fn stop_threads(&mut self) -> ExitReason {
        self.exit.raise(ExitReason::Stopped);
        vcpu::stop_threads(&mut self.vcpu_threads, &self.stop);
        for slot in self.devices.drain(..) {
            if let Ok(mut transport) = slot.transport.lock() {
                transport.device_mut().reset();
            }
        }
        self.exit.reason().unwrap_or(ExitReason::Stopped)
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        if !self.vcpu_threads.is_empty() || !self.devices.is_empty() {
            self.stop_threads();
        }
    }
}
