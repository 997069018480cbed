//! Prints the CPUs and memory the guest was given as one `EVMM-SYSINFO` line.

use evmm_guest_tools::sysinfo::SysInfo;
use std::process::ExitCode;

fn main() -> ExitCode {
    match SysInfo::read() {
        Ok(info) => {
            println!("{}", info.line());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("evmm-guest-sysinfo: {e}");
            ExitCode::FAILURE
        }
    }
}
