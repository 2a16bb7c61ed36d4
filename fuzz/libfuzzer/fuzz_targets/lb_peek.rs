#![no_main]
//! libFuzzer drives `spaced_fuzz_targets::lb_peek`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| spaced_fuzz_targets::lb_peek(data));
