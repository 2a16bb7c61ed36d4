#![no_main]
//! libFuzzer drives `spaced_fuzz_targets::csv_import`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| spaced_fuzz_targets::csv_import(data));
