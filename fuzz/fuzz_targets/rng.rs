#![no_main]
//! See zygote_vmm::fuzzing::rng.
libfuzzer_sys::fuzz_target!(|data: &[u8]| zygote_vmm::fuzzing::rng(data));
