#![no_main]
//! libFuzzer drives `spaced_fuzz_targets::admin_frame`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| spaced_fuzz_targets::admin_frame(data));
