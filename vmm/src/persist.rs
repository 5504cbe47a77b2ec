//! The shape of saved state (Firecracker's `Persist`), shared by every device.
//!
//! There are no default methods: a component that is part of a snapshot but does
//! not say how it is saved and restored does not compile. `State` is plain data
//! (serde); `ConstructorArgs` carries the live things a restored component needs
//! and that cannot be saved (file descriptors, guest memory, interrupt lines).

/// A component that can be saved into a snapshot and rebuilt from it.
pub trait Persist: Sized {
    /// The saved form.
    type State: serde::Serialize + serde::de::DeserializeOwned;
    /// What `restore` needs besides the state.
    type ConstructorArgs;
    /// Why `restore` can fail.
    type Error;

    /// The component's state now.
    fn save(&self) -> Self::State;

    /// Rebuilds the component from `state`.
    fn restore(args: Self::ConstructorArgs, state: &Self::State) -> Result<Self, Self::Error>;
}
