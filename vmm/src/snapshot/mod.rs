//! Snapshots and forks: a running machine saved as a template, and new machines
//! made from a template by mapping its memory copy-on-write.
//!
//! - `state_file`: the framed, checksummed state file.
//! - `memory_file`: guest RAM as a sparse file and its checksum.
//! - `template`: the on-disk store (atomic install, build lock, listing).
//! - `machine`: [`crate::Machine::snapshot`] and [`crate::Machine::fork`].

mod machine;
pub mod memory_file;
pub mod state_file;
pub mod template;

use std::fs::File;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::devices::legacy::{I8042State, SerialSnapshot};
use crate::devices::virtio::MmioState;
use crate::vstate::kvm::KvmKind;
use crate::vstate::memory::{GuestRam, MemoryError};
use crate::vstate::persist::{VcpuState, VmState};

/// An MSR as saved (re-exported for tools that inspect or edit a state).
pub use kvm_bindings::kvm_msr_entry as KvmMsrEntry;
pub use machine::{ForkConfig, ForkError, ForkPhases, SnapshotError, SnapshotInfo};
pub use memory_file::{MemoryFileError, MemoryFileInfo};
pub use state_file::{STATE_VERSION, StateFileError};
pub use template::{InstallError, StoreError, TemplateLock, TemplateName, TemplateStore};

/// Guest RAM as recorded in the state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryState {
    /// Bytes of guest RAM (= the memory file's length).
    pub size: u64,
    /// CRC-32 of the memory file, checked by [`Template::verify`] (never on a fork).
    pub crc32: u32,
}

/// A virtio-mmio slot as saved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioSlotState {
    /// MMIO base address.
    pub base: u64,
    /// Interrupt line.
    pub irq: u32,
    /// The transport and its device.
    pub transport: MmioState,
}

/// Everything needed to make a machine again, besides its memory.
#[derive(Debug, Serialize, Deserialize)]
pub struct MachineState {
    /// The KVM it was taken on: PVM and hardware state are not interchangeable.
    pub kind: KvmKind,
    /// Guest RAM.
    pub memory: MemoryState,
    /// The command line the guest booted with (for people; not used on restore).
    pub cmdline: String,
    /// Interrupt controllers, PIT, kvmclock.
    pub vm: VmState,
    /// Each vCPU.
    pub vcpus: Vec<VcpuState>,
    /// The console.
    pub serial: SerialSnapshot,
    /// The reset line.
    pub i8042: I8042State,
    /// virtio devices.
    pub virtio: Vec<VirtioSlotState>,
}

/// Errors opening or checking a template.
#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    /// The state file is missing, damaged or of another version.
    #[error(transparent)]
    State(#[from] StateFileError),
    /// The memory file could not be opened.
    #[error("cannot open memory file {path}")]
    OpenMemory {
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The memory file is shorter than the guest RAM.
    #[error("template {dir} is truncated: memory file holds {found} bytes, the guest has {needed}")]
    Truncated {
        /// The template.
        dir: PathBuf,
        /// Guest RAM.
        needed: u64,
        /// File length.
        found: u64,
    },
    /// The memory file could not be examined.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// The memory file does not match its checksum (from [`Template::verify`]).
    #[error(transparent)]
    MemoryFile(#[from] MemoryFileError),
}

/// A template opened for forking: its state decoded once, its memory file open.
#[derive(Debug)]
pub struct Template {
    dir: PathBuf,
    state: MachineState,
    memory: File,
}

impl Template {
    /// Opens the template in `dir`: reads and checks the state file (magic,
    /// version, size, checksum), opens the memory file and checks that it covers
    /// guest RAM. The memory itself is not read.
    pub fn open(dir: &Path) -> Result<Template, TemplateError> {
        let state: MachineState = state_file::read_state(&dir.join(template::STATE_FILE))?;
        let path = dir.join(template::MEMORY_FILE);
        let memory = File::open(&path).map_err(|source| TemplateError::OpenMemory {
            path: path.clone(),
            source,
        })?;
        let found = memory.metadata().map_err(MemoryError::Stat)?.len();
        if found < state.memory.size {
            return Err(TemplateError::Truncated {
                dir: dir.into(),
                needed: state.memory.size,
                found,
            });
        }
        Ok(Template {
            dir: dir.into(),
            state,
            memory,
        })
    }

    /// Reads the whole memory file and checks it against the recorded checksum.
    pub fn verify(&self) -> Result<(), TemplateError> {
        memory_file::verify_memory(
            &self.dir.join(template::MEMORY_FILE),
            self.state.memory.size,
            self.state.memory.crc32,
        )?;
        Ok(())
    }

    /// Where it is.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Its saved state.
    pub fn state(&self) -> &MachineState {
        &self.state
    }

    /// Maps its memory copy-on-write for a new machine.
    pub(crate) fn map_memory(&self) -> Result<GuestRam, MemoryError> {
        GuestRam::map_private(&self.memory, self.state.memory.size)
    }
}
