//! Saving a running machine, and making new machines from a template.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::memory_file::{self, MemoryFileError, MemoryFileInfo};
use super::state_file::{self, StateFileError};
use super::template::{MEMORY_FILE, STATE_FILE};
use super::{MachineState, MemoryState, Template, VirtioSlotState};
use crate::arch::x86_64::layout::{
    IRQ_BASE, IRQ_MAX, SERIAL_IRQ, VIRTIO_MMIO_SIZE, VIRTIO_MMIO_START,
};
use crate::arch::x86_64::mptable::MAX_VCPUS;
use crate::builder::{BuildError, LiveDevices, Machine, VirtioSlot, console_sink, irqfd};
use crate::devices::legacy::persist::SerialRestoreError;
use crate::devices::legacy::{I8042, SerialArgs, SerialConsole};
use crate::devices::virtio::net::Tap;
use crate::devices::virtio::persist::{DeviceArgs, MmioArgs, RestoreError};
use crate::devices::virtio::{DeviceState, MmioTransport};
use crate::exit::{ExitReason, ExitSignal};
use crate::persist::Persist;
use crate::vstate::kvm::{KvmError, KvmHandle, KvmKind};
use crate::vstate::memory::MemoryError;
use crate::vstate::vcpu::{self, Vcpu, VcpuError};
use crate::vstate::vm::{Vm, VmError};

/// Errors taking a snapshot. The machine does not run again afterwards.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// The VM had already stopped.
    #[error("the VM is not running ({0:?})")]
    NotRunning(ExitReason),
    /// A vCPU thread died.
    #[error("a vCPU thread was lost")]
    LostVcpu,
    /// Saving a vCPU failed.
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    /// Saving the VM failed.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// Writing the memory file failed (e.g. the disk is full).
    #[error(transparent)]
    Memory(#[from] MemoryFileError),
    /// Writing the state file failed.
    #[error(transparent)]
    State(#[from] StateFileError),
}

/// What a snapshot wrote and how long it took.
#[derive(Debug, Clone, Copy)]
pub struct SnapshotInfo {
    /// Stopping the vCPUs and devices.
    pub pause: Duration,
    /// Saving vCPU, VM and device state.
    pub save: Duration,
    /// Writing and flushing the memory file.
    pub memory_write: Duration,
    /// The memory file.
    pub memory: MemoryFileInfo,
}

/// What a fork gets of its own.
#[derive(Debug, Default)]
pub struct ForkConfig {
    /// The fork's vsock socket (required when the template has a vsock device).
    pub vsock_path: Option<PathBuf>,
    /// The fork's console log (a fresh file).
    pub console_log: Option<PathBuf>,
    /// Disk images for the template's block devices, in order (default: the
    /// images the template was built with; they must not have changed).
    pub disks: Vec<PathBuf>,
    /// A tap for the template's NIC: its link comes up in the fork (none:
    /// the NIC stays without a link, as in the template).
    pub tap: Option<Tap>,
}

/// Errors forking. Nothing is left running or on disk when one is returned.
#[derive(Debug, thiserror::Error)]
pub enum ForkError {
    /// KVM could not be opened.
    #[error(transparent)]
    Kvm(#[from] KvmError),
    /// The template was taken on another kind of KVM.
    #[error("template was taken on {template} KVM; this host has {host} KVM")]
    KindMismatch {
        /// The template's.
        template: KvmKind,
        /// This host's.
        host: KvmKind,
    },
    /// A tap was given but the template has no NIC (built before NICs were).
    #[error("the template has no network device: rebuild it")]
    NoNic,
    /// The saved machine is not one this VMM builds.
    #[error("template state is inconsistent: {0}")]
    Inconsistent(&'static str),
    /// The memory file could not be mapped.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// The VM could not be created or restored.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// A vCPU could not be created or restored.
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    /// The console could not be restored.
    #[error(transparent)]
    Serial(#[from] SerialRestoreError),
    /// A virtio device could not be restored.
    #[error(transparent)]
    Virtio(#[from] RestoreError),
    /// Set-up shared with boot failed (console log, irqfds, threads).
    #[error(transparent)]
    Build(#[from] BuildError),
}

/// Host-side phases of a fork, from the request to all vCPUs running.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ForkPhases {
    /// `mmap` of the memory file (MAP_PRIVATE) and opening KVM.
    pub map: Duration,
    /// KVM_CREATE_VM, irqchip, PIT, memory slots.
    pub create_vm: Duration,
    /// vCPUs created and VM + vCPU state restored.
    pub restore: Duration,
    /// Devices restored (their threads started).
    pub devices: Duration,
    /// vCPU threads started.
    pub start: Duration,
}

impl Machine {
    /// Stops the machine at a safe point and writes it to `dir` (an existing,
    /// empty directory): `state` and `memory`. vCPUs are kicked out of `KVM_RUN`
    /// and any port/MMIO access they exited for is completed before their
    /// registers are read; devices hand back their queues. The machine does not
    /// run again: shut it down afterwards.
    pub fn snapshot(&mut self, dir: &Path) -> Result<SnapshotInfo, SnapshotError> {
        if let Some(reason) = self.exit.reason() {
            return Err(SnapshotError::NotRunning(reason));
        }
        let t0 = Instant::now();
        let expected = self.vcpu_threads.len();
        let mut vcpus = vcpu::stop_threads(&mut self.vcpu_threads, &self.stop);
        if let Some(reason) = self.exit.reason() {
            return Err(SnapshotError::NotRunning(reason));
        }
        self.exit.raise(ExitReason::Stopped);
        if vcpus.len() != expected {
            return Err(SnapshotError::LostVcpu);
        }
        vcpus.sort_by_key(Vcpu::index);
        for v in &mut vcpus {
            v.complete_pending_io()?;
        }
        for slot in &self.devices {
            slot.transport.lock().expect("transport lock").pause();
        }
        let pause = t0.elapsed();

        let t1 = Instant::now();
        let vcpu_states = vcpus
            .iter()
            .map(|v| v.save_state(&self.kvm))
            .collect::<Result<Vec<_>, _>>()?;
        let vm = self.vm.save_state()?;
        let serial = self.serial.lock().expect("serial lock").save();
        let i8042 = self.i8042.lock().expect("i8042 lock").save();
        let virtio = self
            .devices
            .iter()
            .map(|slot| VirtioSlotState {
                base: slot.base,
                irq: slot.irq,
                transport: slot.transport.lock().expect("transport lock").save(),
            })
            .collect();
        let save = t1.elapsed();

        let t2 = Instant::now();
        let memory = memory_file::write_memory(&self.ram, &dir.join(MEMORY_FILE))?;
        let memory_write = t2.elapsed();
        let state = MachineState {
            kind: self.kind,
            memory: MemoryState {
                size: memory.size,
                crc32: memory.crc32,
            },
            cmdline: self.cmdline.clone(),
            vm,
            vcpus: vcpu_states,
            serial,
            i8042,
            virtio,
        };
        state_file::write_state(&dir.join(STATE_FILE), &state)?;
        tracing::info!(
            pause_us = pause.as_micros() as u64,
            save_us = save.as_micros() as u64,
            memory_ms = memory_write.as_millis() as u64,
            data_mib = memory.data_bytes >> 20,
            "snapshot taken"
        );
        Ok(SnapshotInfo {
            pause,
            save,
            memory_write,
            memory,
        })
    }

    /// Makes a new running machine from `template`: its memory mapped
    /// copy-on-write, VM, vCPUs and devices restored, its own vsock socket and
    /// console log; the guest is told its vsock connections are gone. Nothing of
    /// the memory file is read here. On error nothing is left behind.
    pub fn fork(template: &Template, config: ForkConfig) -> Result<Machine, ForkError> {
        let start = Instant::now();
        let state = template.state();
        check_shape(state)?;
        vcpu::install_kick_handler().map_err(|source| BuildError::Os {
            what: "the vCPU kick signal",
            source,
        })?;
        let kvm = KvmHandle::open()?;
        if kvm.kind != state.kind {
            return Err(ForkError::KindMismatch {
                template: state.kind,
                host: kvm.kind,
            });
        }
        let ram = template.map_memory()?;
        let t_map = start.elapsed();

        let vm = Vm::new(&kvm, &ram.memory)?;
        let t_vm = start.elapsed();

        let vcpus = state
            .vcpus
            .iter()
            .map(|s| Vcpu::new(&vm, s.index))
            .collect::<Result<Vec<_>, _>>()?;
        vm.restore_state(&state.vm)?;
        for (vcpu, s) in vcpus.iter().zip(&state.vcpus) {
            vcpu.restore_state(s)?;
        }
        let t_restore = start.elapsed();

        let exit = ExitSignal::default();
        let console_out = console_sink(config.console_log.as_deref(), &exit)?;
        let console_tail = console_out.tail();
        let serial = SerialConsole::restore(
            SerialArgs {
                irq: irqfd(&vm, SERIAL_IRQ)?,
                out: console_out,
            },
            &state.serial,
        )?;
        let i8042 = I8042::restore(exit.clone(), &state.i8042).expect("infallible");
        // Disks: the fork's own paths if given, else the images the template used.
        let disks: Vec<PathBuf> = if config.disks.is_empty() {
            state
                .virtio
                .iter()
                .filter_map(|slot| match &slot.transport.device {
                    DeviceState::Block(b) if !b.is_slot() => Some(b.path.clone()),
                    _ => None,
                })
                .collect()
        } else {
            config.disks.clone()
        };
        let has_nic = state
            .virtio
            .iter()
            .any(|slot| matches!(slot.transport.device, DeviceState::Net(_)));
        if config.tap.is_some() && !has_nic {
            return Err(ForkError::NoNic);
        }
        let mut device_args = DeviceArgs {
            vsock_path: config.vsock_path,
            disks,
            tap: config.tap,
        };
        let mut disk = 0;
        let devices = state
            .virtio
            .iter()
            .map(|slot| {
                let args = MmioArgs {
                    device: device_args.for_device(&slot.transport.device),
                    disk,
                    mem: ram.memory.clone(),
                    irqfd: irqfd(&vm, slot.irq)?,
                };
                if matches!(&slot.transport.device, DeviceState::Block(b) if !b.is_slot()) {
                    disk += 1;
                }
                Ok(VirtioSlot {
                    base: slot.base,
                    irq: slot.irq,
                    transport: Arc::new(Mutex::new(MmioTransport::restore(args, &slot.transport)?)),
                })
            })
            .collect::<Result<Vec<_>, ForkError>>()?;
        let t_devices = start.elapsed();

        let devices = LiveDevices {
            exit,
            console_tail,
            serial: Arc::new(Mutex::new(serial)),
            i8042: Arc::new(Mutex::new(i8042)),
            virtio: devices,
        };
        let cmdline = state.cmdline.clone();
        let mut machine = Machine::assemble(kvm, vm, ram, devices, cmdline, start, vcpus)?;
        machine.fork_phases = Some(ForkPhases {
            map: t_map,
            create_vm: t_vm - t_map,
            restore: t_restore - t_vm,
            devices: t_devices - t_restore,
            start: machine.setup - t_devices,
        });
        tracing::debug!(setup_us = machine.setup.as_micros() as u64, "VM forked");
        Ok(machine)
    }

    /// The host-side phases, for a machine made by [`Machine::fork`].
    pub fn fork_phases(&self) -> Option<ForkPhases> {
        self.fork_phases
    }
}

/// Refuses saved machines this VMM would not have built (the checksum already
/// rules out damage; this rules out states from a confused writer).
fn check_shape(state: &MachineState) -> Result<(), ForkError> {
    let n = state.vcpus.len();
    if n == 0 || n > usize::from(MAX_VCPUS) {
        return Err(ForkError::Inconsistent("vCPU count out of range"));
    }
    if state
        .vcpus
        .iter()
        .enumerate()
        .any(|(i, v)| usize::from(v.index) != i)
    {
        return Err(ForkError::Inconsistent("vCPU indices out of order"));
    }
    for (i, slot) in state.virtio.iter().enumerate() {
        if slot.irq < IRQ_BASE
            || slot.irq > IRQ_MAX
            || slot.base != VIRTIO_MMIO_START + i as u64 * VIRTIO_MMIO_SIZE
        {
            return Err(ForkError::Inconsistent("virtio device outside its slot"));
        }
    }
    Ok(())
}
