#![no_main]
//! See zygote_vmm::fuzzing::machine_state.
libfuzzer_sys::fuzz_target!(|data: &[u8]| zygote_vmm::fuzzing::machine_state(data));
