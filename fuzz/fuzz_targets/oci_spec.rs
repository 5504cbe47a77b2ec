#![no_main]
//! A container's OCI spec (its `config.json`, from the image's config and
//! the client) into what the container's init does: paths, mounts,
//! capabilities, the seccomp profile compiled to BPF, sysctls.
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ =
        zygote_agent::container::spec::launch_config(data, std::path::Path::new("/run/c/rootfs"));
});
