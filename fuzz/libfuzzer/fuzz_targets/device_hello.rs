#![no_main]
//! libFuzzer drives `spaced_fuzz_targets::device_hello`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| spaced_fuzz_targets::device_hello(data));
