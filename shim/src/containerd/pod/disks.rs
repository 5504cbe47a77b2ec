//! Images other than the pod's first: a sidecar from another image gets
//! that image's erofs disk in one of the VM's empty disk slots (the template
//! has them, capacity 0: virtio-mmio has no hotplug). The VMM puts the image
//! in the slot and raises a configuration interrupt; the agent finds the
//! disk by its serial once its capacity shows, and mounts it read-only; the
//! container gets its own writable layer over it, as any other. When the
//! container is removed the image is unmounted and the slot emptied.

use std::path::Path;

use zygote_agent_api::{MountImage, UnmountImage, request, response};
use zygote_vmm::devices::virtio::block::slot_serial;

use super::{PodError, PodVm};

/// Where slot `n`'s image is mounted in the guest.
pub fn slot_root(n: u8) -> String {
    format!("/run/zygote/images/slot{n}")
}

impl PodVm {
    /// Puts `image` in a free disk slot for container `id` and mounts it;
    /// the guest root to make the container over.
    pub fn attach_image(&self, id: &str, image: &Path) -> Result<String, PodError> {
        let n = {
            let mut slots = self.slots.lock().expect("disk slots lock");
            let Some(n) = slots.iter().position(Option::is_none) else {
                let users: Vec<String> = slots.iter().flatten().cloned().collect();
                return Err(PodError::NoSlot {
                    slots: slots.len(),
                    users,
                });
            };
            slots[n] = Some(id.into());
            n as u8
        };
        let serial = slot_serial(n);
        let attached = self
            .sandbox
            .machine()
            .set_disk(&serial, Some(image))
            .map_err(|e| PodError::Disk(e.to_string()))
            .and_then(|()| {
                let answer = self.call(request::Body::MountImage(MountImage {
                    device: String::new(),
                    target: slot_root(n),
                    warm: false,
                    serial: serial.clone(),
                }))?;
                match answer {
                    response::Body::Mounted(_) => Ok(()),
                    other => Err(PodError::Unexpected {
                        request: "MountImage",
                        answer: format!("{other:?}"),
                    }),
                }
            });
        if let Err(e) = attached {
            let _ = self.sandbox.machine().set_disk(&serial, None);
            self.slots.lock().expect("disk slots lock")[n as usize] = None;
            return Err(e);
        }
        tracing::info!("{id}: image {} in disk slot {n}", image.display());
        Ok(slot_root(n))
    }

    /// Unmounts and takes out the image container `id` was given, if any
    /// (after the container is removed from the guest).
    pub fn detach_image(&self, id: &str) -> Result<(), PodError> {
        let n = {
            let slots = self.slots.lock().expect("disk slots lock");
            match slots.iter().position(|s| s.as_deref() == Some(id)) {
                Some(n) => n as u8,
                None => return Ok(()),
            }
        };
        match self.call(request::Body::UnmountImage(UnmountImage {
            target: slot_root(n),
        }))? {
            response::Body::Empty(_) => {}
            other => {
                return Err(PodError::Unexpected {
                    request: "UnmountImage",
                    answer: format!("{other:?}"),
                });
            }
        }
        self.sandbox
            .machine()
            .set_disk(&slot_serial(n), None)
            .map_err(|e| PodError::Disk(e.to_string()))?;
        self.slots.lock().expect("disk slots lock")[n as usize] = None;
        tracing::info!("{id}: disk slot {n} emptied");
        Ok(())
    }
}
