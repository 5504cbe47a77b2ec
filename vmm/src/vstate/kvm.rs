//! The host's KVM: opening it and telling which kind it is.
//!
//! Production hosts have hardware virtualization (VMX/SVM). Development and CI
//! machines may expose `/dev/kvm` through PVM (`kvm_pvm`), which speaks the same
//! ioctls but emulates guest kernel code and ignores `KVM_SET_CPUID2` for the
//! guest's `CPUID` instruction; the guest command line differs between the two.

use std::fmt;
use std::path::Path;

use kvm_ioctls::{Cap, Kvm};

/// Which implementation backs `/dev/kvm`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KvmKind {
    /// Hardware-assisted virtualization (`kvm_intel` or `kvm_amd`).
    Hardware,
    /// PVM (`kvm_pvm`): shadow paging, guest kernel code emulated.
    Pvm,
}

impl fmt::Display for KvmKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KvmKind::Hardware => f.write_str("hardware"),
            KvmKind::Pvm => f.write_str("pvm"),
        }
    }
}

impl KvmKind {
    /// Detects the kind from the loaded modules.
    pub fn detect() -> KvmKind {
        Self::detect_in(Path::new("/sys/module"))
    }

    fn detect_in(modules: &Path) -> KvmKind {
        if modules.join("kvm_pvm").exists() {
            KvmKind::Pvm
        } else {
            KvmKind::Hardware
        }
    }

    /// Kernel command-line parameters this kind of KVM needs from the guest.
    ///
    /// On PVM the guest's `CPUID` shows the host's features whatever the VMM sets,
    /// and the emulator rejects some instructions (see docs/guest-kernel.md), so
    /// those features are turned off from the command line. Hardware KVM needs none.
    pub fn guest_cmdline(self) -> &'static str {
        match self {
            KvmKind::Hardware => "",
            KvmKind::Pvm => {
                "noxsave clearcpuid=cx16,popcnt,smap,rdrand,rdseed,invpcid,fsgsbase,erms,fsrm \
                 no_int3_selftest"
            }
        }
    }
}

/// Errors opening KVM.
#[derive(Debug, thiserror::Error)]
pub enum KvmError {
    /// `/dev/kvm` could not be opened.
    #[error("cannot open /dev/kvm (is KVM available and are you root?)")]
    Open(#[source] kvm_ioctls::Error),
    /// The KVM API version is not 12.
    #[error("unsupported KVM API version {0}")]
    ApiVersion(i32),
    /// A capability the VMM relies on is missing.
    #[error("KVM lacks a required capability: {0:?}")]
    MissingCap(Cap),
}

/// An open `/dev/kvm` with its kind.
#[derive(Debug)]
pub struct KvmHandle {
    /// The KVM system fd.
    pub kvm: Kvm,
    /// Which implementation it is.
    pub kind: KvmKind,
}

/// Capabilities the VMM cannot work without.
const REQUIRED_CAPS: [Cap; 7] = [
    Cap::Irqchip,
    Cap::Ioeventfd,
    Cap::Irqfd,
    Cap::UserMemory,
    Cap::SetTssAddr,
    Cap::Pit2,
    Cap::ExtCpuid,
];

impl KvmHandle {
    /// Opens `/dev/kvm`, checks the API version and the capabilities the VMM needs.
    pub fn open() -> Result<Self, KvmError> {
        let kvm = Kvm::new().map_err(KvmError::Open)?;
        let version = kvm.get_api_version();
        if version != kvm_bindings::KVM_API_VERSION as i32 {
            return Err(KvmError::ApiVersion(version));
        }
        for cap in REQUIRED_CAPS {
            if !kvm.check_extension(cap) {
                return Err(KvmError::MissingCap(cap));
            }
        }
        Ok(KvmHandle {
            kvm,
            kind: KvmKind::detect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kind_follows_the_pvm_module() {
        let dir = std::env::temp_dir().join(format!("zygote-kvmkind-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        assert_eq!(KvmKind::detect_in(&dir), KvmKind::Hardware);
        std::fs::create_dir_all(dir.join("kvm_pvm")).unwrap();
        assert_eq!(KvmKind::detect_in(&dir), KvmKind::Pvm);
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(KvmKind::Pvm.guest_cmdline().contains("noxsave"));
        assert!(KvmKind::Hardware.guest_cmdline().is_empty());
    }

    #[test]
    fn opens_the_real_kvm() {
        let handle = KvmHandle::open().expect("/dev/kvm must be usable for the VMM tests");
        assert_eq!(handle.kind, KvmKind::detect());
    }
}
