//! Where zygote keeps things. Everything generated lives outside the source tree.

use std::path::PathBuf;

/// Root of zygote's cached artefacts (`$ZYGOTE_HOME`, default `/var/lib/zygote`).
pub fn home() -> PathBuf {
    std::env::var_os("ZYGOTE_HOME").map_or_else(|| PathBuf::from("/var/lib/zygote"), PathBuf::from)
}

/// The guest kernel (`$ZYGOTE_KERNEL`, default `$ZYGOTE_HOME/kernel/vmlinux`).
pub fn kernel() -> PathBuf {
    std::env::var_os("ZYGOTE_KERNEL").map_or_else(|| home().join("kernel/vmlinux"), PathBuf::from)
}

/// The guest initramfs with the agent (`$ZYGOTE_INITRAMFS`, default `$ZYGOTE_HOME/image/initramfs.cpio`).
pub fn initramfs() -> PathBuf {
    std::env::var_os("ZYGOTE_INITRAMFS")
        .map_or_else(|| home().join("image/initramfs.cpio"), PathBuf::from)
}

/// Per-VM run directories (`$ZYGOTE_RUN`, default `/run/zygote/vms`).
pub fn run_root() -> PathBuf {
    std::env::var_os("ZYGOTE_RUN").map_or_else(|| PathBuf::from("/run/zygote/vms"), PathBuf::from)
}

/// The image cache (`$ZYGOTE_IMAGES`, default `$ZYGOTE_HOME/images`).
pub fn images() -> PathBuf {
    std::env::var_os("ZYGOTE_IMAGES").map_or_else(|| home().join("images"), PathBuf::from)
}

/// The template store (`$ZYGOTE_TEMPLATES`, default `$ZYGOTE_HOME/templates`).
pub fn templates() -> PathBuf {
    std::env::var_os("ZYGOTE_TEMPLATES").map_or_else(|| home().join("templates"), PathBuf::from)
}
