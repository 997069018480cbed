//! Does this host's `/dev/kvm` run guest ring-0 code natively? The capability probe
//! ([`probe`]) answers by timing a loop in a tiny long-mode guest at CPL 0 and CPL 3;
//! [`long_mode`] is the flat long-mode set-up (GDT, TSS, identity-mapped page tables,
//! special registers) of such hand-built guests, shared with the raw notify floor.

pub mod long_mode;
pub mod probe;

pub use probe::{probe, probe_native_quickly, ProbeError, ProbeReport, Ring0, MAX_ITERATIONS};
