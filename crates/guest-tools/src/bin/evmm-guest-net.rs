//! Network checks for evmm's virtio-net tests, in the guest and as the peer in the
//! nested host (L1): `evmm-guest-net CHECK [+ CHECK]...` (see `evmm_guest_tools::net`
//! and `evmm-guest-net` without arguments for the list). Each check prints one
//! `EVMM-NET-...` line and an `EVMM-NET-CHECK side= check= status=` line; the run
//! stops at the first check that fails. Exit status: 0 all passed, 1 a check failed,
//! 2 a check could not run.

use evmm_guest_tools::net;
use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    ExitCode::from(net::run_checks(&args) as u8)
}
