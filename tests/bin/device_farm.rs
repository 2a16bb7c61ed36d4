//! `device-farm`: fake devices in a process of their own (see `spaced_tests::device_farm`), so
//! a test can hold 10,000 device connections without running out of descriptors.

fn main() -> std::process::ExitCode {
    match spaced_tests::device_farm::serve_stdio() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("device-farm: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
