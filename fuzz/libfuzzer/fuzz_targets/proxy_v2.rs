#![no_main]
//! libFuzzer drives `spaced_fuzz_targets::proxy_v2`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| spaced_fuzz_targets::proxy_v2(data));
