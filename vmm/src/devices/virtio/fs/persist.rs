//! Saved state of a virtio-fs device: its tag and the features the driver
//! accepted (its queues are saved by the transport). The share is not
//! saved: a restored device serves nothing until one is attached.

use serde::{Deserialize, Serialize};

use super::{Fs, FsError};
use crate::persist::Persist;

/// A virtio-fs device's state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FsState {
    /// The tag the guest mounts it by.
    pub tag: String,
    /// Features the driver accepted.
    pub acked_features: u64,
}

impl Persist for Fs {
    type State = FsState;
    type ConstructorArgs = ();
    type Error = FsError;

    fn save(&self) -> FsState {
        FsState {
            tag: self.tag.clone(),
            acked_features: self.acked_features,
        }
    }

    fn restore((): (), state: &FsState) -> Result<Self, FsError> {
        let mut fs = Fs::new(&state.tag)?;
        fs.acked_features = state.acked_features;
        Ok(fs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_without_the_share() {
        let mut fs = Fs::new("zygote-share").unwrap();
        fs.acked_features = 1 << 32;
        let bytes = postcard::to_stdvec(&fs.save()).unwrap();
        let back: FsState = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(Fs::restore((), &back).unwrap().save(), fs.save());
        let bad = FsState {
            tag: "x".repeat(40),
            acked_features: 0,
        };
        assert!(matches!(Fs::restore((), &bad), Err(FsError::Tag(40))));
    }
}
