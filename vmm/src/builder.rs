//! Building and running a machine: boot (today), restore and fork (later).
//!
//! Boot sequence: open KVM → guest RAM (memfd) → VM with in-kernel irqchip/PIT
//! → load kernel and initramfs → boot data (PVH start info or zero page) → MP
//! table → devices (serial, i8042, virtio-mmio rng and vsock) → vCPUs
//! configured → vCPU threads started.

use std::fs::File;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
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
use crate::devices::virtio::rng::Rng;
use crate::devices::virtio::vsock::{Vsock, VsockError};
use crate::devices::virtio::{MmioTransport, VirtioDevice};
use crate::exit::{ExitReason, ExitSignal};
use crate::vstate::kvm::{KvmError, KvmHandle, KvmKind};
use crate::vstate::memory::{GuestRam, MemoryError};
use crate::vstate::vcpu::{self, Vcpu, VcpuError, VcpuStats};
use crate::vstate::vm::{Vm, VmError};

/// The kernel command line every guest gets; KVM-kind parameters and devices follow.
pub const BASE_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1 quiet";

const SERIAL_PORT: u64 = 0x3f8;
const I8042_PORT: u64 = 0x60;

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

/// A running VM.
#[derive(Debug)]
pub struct Machine {
    kind: KvmKind,
    exit: ExitSignal,
    stop: Arc<AtomicBool>,
    vcpu_threads: Vec<JoinHandle<()>>,
    stats: Vec<Arc<VcpuStats>>,
    console_tail: Arc<Mutex<Vec<u8>>>,
    /// Devices live as long as the machine; dropping them stops their threads.
    devices: Vec<Arc<Mutex<MmioTransport>>>,
    cmdline: String,
    started: Instant,
    setup: Duration,
    // Dropped last: the VM and the memory the vCPUs and devices use.
    _vm: Vm,
    _ram: GuestRam,
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
        let console_file = match &config.console_log {
            Some(path) => Some(
                File::options()
                    .create(true)
                    .write(true)
                    .truncate(true)
                    .mode(0o600)
                    .open(path)
                    .map_err(|source| BuildError::ConsoleLog {
                        path: path.clone(),
                        source,
                    })?,
            ),
            None => None,
        };
        let console_out = ConsoleLog::new(console_file, exit.clone());
        let console_tail = console_out.tail();

        let mut pio = Bus::default();
        let serial_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(os("an irqfd"))?;
        vm.register_irqfd(&serial_irq, SERIAL_IRQ)?;
        pio.insert(
            Arc::new(Mutex::new(SerialConsole::new(serial_irq, console_out))),
            SERIAL_PORT,
            8,
        )?;
        pio.insert(
            Arc::new(Mutex::new(I8042::new(exit.clone()))),
            I8042_PORT,
            5,
        )?;

        let mut virtio: Vec<Box<dyn VirtioDevice>> = vec![Box::new(Rng::new())];
        if let Some((cid, path)) = &config.vsock {
            virtio.push(Box::new(Vsock::new(*cid, path)?));
        }
        let mut mmio = Bus::default();
        let mut devices = Vec::new();
        let mut cmdline_devices = Vec::new();
        for (i, device) in virtio.into_iter().enumerate() {
            let irq = IRQ_BASE + i as u32;
            if irq > IRQ_MAX {
                return Err(BuildError::OutOfIrqs);
            }
            let base = VIRTIO_MMIO_START + i as u64 * VIRTIO_MMIO_SIZE;
            let irqfd = EventFd::new(libc::EFD_NONBLOCK).map_err(os("an irqfd"))?;
            vm.register_irqfd(&irqfd, irq)?;
            let transport = Arc::new(Mutex::new(
                MmioTransport::new(device, mem.clone(), irqfd).map_err(os("a virtio transport"))?,
            ));
            mmio.insert(transport.clone(), base, VIRTIO_MMIO_SIZE)?;
            devices.push(transport);
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

        let stop = Arc::new(AtomicBool::new(false));
        let mut machine = Machine {
            kind: kvm.kind,
            exit,
            stop,
            vcpu_threads: Vec::new(),
            stats: Vec::new(),
            console_tail,
            devices,
            cmdline: cmdline
                .as_cstring()
                .map(|c| c.to_string_lossy().into_owned())
                .unwrap_or_default(),
            started: start,
            setup: Duration::ZERO,
            _vm: vm,
            _ram: ram,
        };
        for vcpu in vcpus {
            let stats = Arc::new(VcpuStats::default());
            let (pio, mmio, exit, stop) = (
                pio.clone(),
                mmio.clone(),
                machine.exit.clone(),
                machine.stop.clone(),
            );
            let thread_stats = stats.clone();
            let handle = std::thread::Builder::new()
                .name("zygote-vcpu".into())
                .spawn(move || vcpu.run(pio, mmio, exit, stop, thread_stats))
                .map_err(os("a vCPU thread"))?;
            machine.vcpu_threads.push(handle);
            machine.stats.push(stats);
        }
        machine.setup = start.elapsed();
        tracing::info!(kind = %machine.kind, setup_us = machine.setup.as_micros() as u64, "VM started");
        Ok(machine)
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

    /// The last lines the guest wrote to its console.
    pub fn console_tail(&self, lines: usize) -> String {
        let tail = self.console_tail.lock().expect("tail lock");
        let text = String::from_utf8_lossy(&tail);
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Stops the VM (if still running), joins its threads and releases everything.
    pub fn shutdown(mut self) -> ExitReason {
        self.stop_threads()
    }

    fn stop_threads(&mut self) -> ExitReason {
        self.exit.raise(ExitReason::Stopped);
        vcpu::stop_threads(&mut self.vcpu_threads, &self.stop);
        for device in self.devices.drain(..) {
            if let Ok(mut transport) = device.lock() {
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
