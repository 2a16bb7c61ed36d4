#![no_main]
//! libFuzzer drives `spaced_fuzz_targets::fabric_apply`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| spaced_fuzz_targets::fabric_apply(data));
