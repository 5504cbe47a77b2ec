#![no_main]
//! See zygote_vmm::fuzzing::vsock.
libfuzzer_sys::fuzz_target!(|data: &[u8]| zygote_vmm::fuzzing::vsock(data));
