#![no_main]
//! libFuzzer drives `spaced_fuzz_targets::dr_frame`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| spaced_fuzz_targets::dr_frame(data));
