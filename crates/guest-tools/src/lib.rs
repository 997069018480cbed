//! Guest-side test programs for evmm's Linux guests.
//!
//! These run inside the guest initramfs (built by `guest-images/build`) and print
//! their findings as single `KEY key=value ...` lines on the console, which the
//! host-side tests parse.

pub mod blk;
pub mod faults;
pub mod net;
pub mod sysinfo;
