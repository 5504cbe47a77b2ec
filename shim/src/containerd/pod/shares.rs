//! Host directories (hostPath, a `ctr --mount` of a directory) served to the
//! pod's VM by its shared file system (virtio-fs). A template's VM carries
//! the device with no server: FUSE state must not outlive a fork. The
//! first host directory of a fork attaches a fresh server; each directory
//! is a share named for its path and mode, served from then on for the
//! VM's life (the guest may hold its files open; a container that mounts
//! it again finds it there). The guest mounts the file system when a
//! container first needs it.

use zygote_vmm::devices::virtio::fs::ServerError;

use super::{PodError, PodVm};
use crate::containerd::volumes::Hosted;

impl PodVm {
    /// Shares each of `dirs` with the VM (those already shared stay as
    /// they are).
    pub fn share_dirs(&self, dirs: &[Hosted]) -> Result<(), PodError> {
        for d in dirs {
            match self
                .sandbox
                .machine()
                .share_dir(&d.name, &d.host, d.read_only)
            {
                Ok(()) | Err(ServerError::Taken(_)) => {}
                Err(e) => {
                    return Err(PodError::Share {
                        path: d.host.display().to_string(),
                        why: e.to_string(),
                    });
                }
            }
        }
        Ok(())
    }
}
