//! Saved state of the entropy device: only the features the driver accepted
//! (its queue is saved by the transport).

use serde::{Deserialize, Serialize};

use super::Rng;
use crate::persist::Persist;

/// The rng device's state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RngState {
    /// Features the driver accepted.
    pub acked_features: u64,
}

impl Persist for Rng {
    type State = RngState;
    type ConstructorArgs = ();
    type Error = std::convert::Infallible;

    fn save(&self) -> RngState {
        RngState {
            acked_features: self.acked_features,
        }
    }

    fn restore((): (), state: &RngState) -> Result<Self, Self::Error> {
        let mut rng = Rng::new();
        rng.acked_features = state.acked_features;
        Ok(rng)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::VirtioDevice;

    #[test]
    fn round_trip() {
        let mut rng = Rng::new();
        rng.set_acked_features(1 << 32);
        let state = rng.save();
        let bytes = postcard::to_stdvec(&state).unwrap();
        let back: RngState = postcard::from_bytes(&bytes).unwrap();
        let restored = Rng::restore((), &back).unwrap();
        assert_eq!(restored.save(), state);
        assert_eq!(state.acked_features, 1 << 32);
    }
}
