//! zygote: the containerd shim (`containerd`) on the host runtime library
//! (`zygote-host`, re-exported here), and the two binaries that use them:
//! `containerd-shim-zygote-v2` and the operator CLI `zygote`.

pub use zygote_host::{
    describe, doctor, image, net, node, paths, procmem, reconcile, sandbox, template,
};

pub mod containerd;
pub mod cri_client;
