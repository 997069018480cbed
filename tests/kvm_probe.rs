//! KVM level: the capability probe on this host: it measures, reports a verdict, and the route the
//! Linux-booting tests take follows from it.

use evmm_kvm_probe::{probe, Ring0};
use evmm_testhost::Route;
use std::path::Path;

#[test]
fn the_probe_picks_the_route_of_this_host() {
    let report = probe(None).unwrap_or_else(|e| panic!("the KVM probe failed: {e}"));
    eprintln!("{report}");
    assert!(report.cpl0_ns_per_iteration > 0.0 && report.cpl3_ns_per_iteration > 0.0);
    if Path::new("/sys/module/kvm_pvm").exists() {
        // PVM emulates guest ring-0 code: Linux cannot boot here directly.
        assert_eq!(report.ring0, Ring0::Emulated, "{report}");
    }
    let route = Route::detect().unwrap_or_else(|e| panic!("{e}"));
    eprintln!("{route}");
    match report.ring0 {
        Ring0::Emulated => assert!(matches!(route, Route::Nested { .. })),
        Ring0::Native => assert!(matches!(route, Route::Direct { .. })),
    }
}
