//! Saved state of the block device: the image's size and the features the
//! driver accepted. The image itself is not copied: a restored device opens
//! the same (immutable) image, whose size is checked.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{Block, BlockError, SECTOR_SIZE};
use crate::persist::Persist;

/// The block device's state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockState {
    /// The image the template used (for people; the fork passes its own path).
    pub path: PathBuf,
    /// Size in sectors.
    pub capacity: u64,
    /// Features the driver accepted.
    pub acked_features: u64,
    /// Its id: the image disk's, or an empty slot's.
    pub serial: String,
}

impl BlockState {
    /// A slot (restored empty, without an image argument).
    pub fn is_slot(&self) -> bool {
        self.serial != super::device::IMAGE_SERIAL
    }
}

/// What a restored block device needs.
#[derive(Debug, Clone)]
pub struct BlockArgs {
    /// The image (the same content the template had).
    pub path: PathBuf,
}

impl Persist for Block {
    type State = BlockState;
    type ConstructorArgs = BlockArgs;
    type Error = BlockError;

    fn save(&self) -> BlockState {
        BlockState {
            path: self.path(),
            capacity: self.capacity(),
            acked_features: self.acked_features,
            serial: self.serial.clone(),
        }
    }

    fn restore(args: BlockArgs, state: &BlockState) -> Result<Self, BlockError> {
        let mut block = Block::new(&args.path)?;
        if block.capacity() != state.capacity {
            return Err(BlockError::Changed {
                path: args.path,
                expected: state.capacity * SECTOR_SIZE,
                found: block.capacity() * SECTOR_SIZE,
            });
        }
        block.acked_features = state.acked_features;
        Ok(block)
    }
}

impl Block {
    /// An empty slot as the snapshot saved it.
    pub fn restore_slot(state: &BlockState) -> Result<Self, BlockError> {
        if state.capacity != 0 {
            return Err(BlockError::SlotInUse(state.serial.clone()));
        }
        let mut block = Block::slot(&state.serial);
        block.acked_features = state.acked_features;
        Ok(block)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_a_changed_image() {
        let p = std::env::temp_dir().join(format!("zygote-blk-persist-{}", std::process::id()));
        std::fs::write(&p, vec![0u8; 4096]).unwrap();
        let mut b = Block::new(&p).unwrap();
        b.acked_features = super::super::VIRTIO_BLK_F_RO;
        let state = b.save();
        let back: BlockState = postcard::from_bytes(&postcard::to_stdvec(&state).unwrap()).unwrap();
        let restored = Block::restore(BlockArgs { path: p.clone() }, &back).unwrap();
        assert_eq!(restored.save(), state);
        std::fs::write(&p, vec![0u8; 8192]).unwrap();
        assert!(matches!(
            Block::restore(BlockArgs { path: p.clone() }, &back),
            Err(BlockError::Changed {
                expected: 4096,
                found: 8192,
                ..
            })
        ));
        // A slot comes back empty; one saved holding an image does not.
        let mut slot = Block::slot("zygote-slot0");
        let empty = slot.save();
        assert!(empty.is_slot() && !state.is_slot());
        assert_eq!(Block::restore_slot(&empty).unwrap().save(), empty);
        slot.set_image(Some(&p)).unwrap();
        assert!(matches!(
            Block::restore_slot(&slot.save()),
            Err(BlockError::SlotInUse(_))
        ));
        std::fs::remove_file(&p).unwrap();
    }
}
