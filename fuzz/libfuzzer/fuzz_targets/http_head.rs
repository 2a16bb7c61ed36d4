#![no_main]
//! libFuzzer drives `spaced_fuzz_targets::http_head`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| spaced_fuzz_targets::http_head(data));
