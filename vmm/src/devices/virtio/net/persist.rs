//! Saved state of the NIC: its MAC, MTU and the features the driver accepted
//! (its queues are saved by the transport). The tap is not state: a template
//! has none, and each fork brings its own.

use serde::{Deserialize, Serialize};

use super::{Net, NetConfig, Tap};
use crate::persist::Persist;

/// The NIC's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetState {
    /// MAC and MTU as the guest read them at probe.
    pub config: NetConfig,
    /// Features the driver accepted.
    pub acked_features: u64,
    /// The link was up when saved.
    pub link_up: bool,
}

/// What a restored NIC needs.
#[derive(Debug, Default)]
pub struct NetArgs {
    /// The new VM's own tap (none: the link is down).
    pub tap: Option<Tap>,
}

impl Persist for Net {
    type State = NetState;
    type ConstructorArgs = NetArgs;
    type Error = std::convert::Infallible;

    fn save(&self) -> NetState {
        NetState {
            config: self.config,
            acked_features: self.acked_features,
            link_up: self.link_up(),
        }
    }

    fn restore(args: NetArgs, state: &NetState) -> Result<Self, Self::Error> {
        let mut net = Net::new(state.config, args.tap);
        net.acked_features = state.acked_features;
        net.announce_link = net.link_up() != state.link_up;
        Ok(net)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::VirtioDevice;

    #[test]
    fn round_trip_keeps_identity_and_takes_the_new_link() {
        let mut net = Net::new(
            NetConfig {
                mac: [2, 0, 0, 0, 0, 9],
                mtu: 1400,
            },
            None,
        );
        net.set_acked_features(super::super::features::MRG_RXBUF | super::super::features::MAC);
        let state = net.save();
        let bytes = postcard::to_stdvec(&state).unwrap();
        let back: NetState = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(back, state);
        let restored = Net::restore(NetArgs::default(), &back).unwrap();
        assert_eq!(restored.save(), state);
        assert!(!restored.announce_link, "still no tap: nothing changed");
        assert!(!state.link_up);
    }
}
