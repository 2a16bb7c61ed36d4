#![no_main]
//! libFuzzer drives `spaced_fuzz_targets::guard_line`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| spaced_fuzz_targets::guard_line(data));
