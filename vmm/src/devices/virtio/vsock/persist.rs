//! Saved state of the vsock device.
//!
//! Connections are host Unix streams of the VM that was saved: they cannot be
//! carried into another VM. A restored device listens on its own socket and, once
//! running, tells the guest with a transport reset that every connection it had
//! is gone; guest listeners survive it (that is how the agent is reached again).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{Vsock, VsockError};
use crate::persist::Persist;

/// The vsock device's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct VsockState {
    /// The guest's CID.
    pub cid: u64,
    /// Features the driver accepted.
    pub acked_features: u64,
}

/// What a restored vsock device needs.
#[derive(Debug, Clone)]
pub struct VsockArgs {
    /// The new VM's own host socket.
    pub uds_path: PathBuf,
}

impl Persist for Vsock {
    type State = VsockState;
    type ConstructorArgs = VsockArgs;
    type Error = VsockError;

    fn save(&self) -> VsockState {
        VsockState {
            cid: self.cid,
            acked_features: self.acked_features,
        }
    }

    fn restore(args: VsockArgs, state: &VsockState) -> Result<Self, VsockError> {
        let mut vsock = Vsock::new(state.cid, &args.uds_path)?;
        vsock.acked_features = state.acked_features;
        vsock.reset_on_activate = true;
        Ok(vsock)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_gets_its_own_socket_and_a_pending_reset() {
        let dir = std::env::temp_dir().join(format!("zygote-vsock-persist-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut vsock = Vsock::new(42, &dir.join("a.sock")).unwrap();
        vsock.acked_features = 1 << 32;
        let state = vsock.save();
        let bytes = postcard::to_stdvec(&state).unwrap();
        let back: VsockState = postcard::from_bytes(&bytes).unwrap();
        let restored = Vsock::restore(
            VsockArgs {
                uds_path: dir.join("b.sock"),
            },
            &back,
        )
        .unwrap();
        assert_eq!(restored.save(), state);
        assert!(restored.reset_on_activate);
        assert!(!vsock.reset_on_activate);
        assert!(dir.join("b.sock").exists());
        // The same path twice is refused, not silently shared.
        assert!(matches!(
            Vsock::restore(
                VsockArgs {
                    uds_path: dir.join("b.sock")
                },
                &back
            ),
            Err(VsockError::PathExists(_))
        ));
        drop((vsock, restored));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
