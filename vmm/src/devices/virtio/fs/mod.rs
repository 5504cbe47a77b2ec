//! virtio-fs: a host directory shared with the guest over FUSE. So far the
//! server side (`server`): the device that carries its requests over a
//! virtio queue is not built yet.

pub mod server;
