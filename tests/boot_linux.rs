//! evmm boots Debian's stock kernel with the guest initramfs to its init, with the vCPUs
//! and memory it was given, and ends when the guest powers off or reboots. Runs on the
//! route the capability probe picks (printed).

use evmm_testhost::guest::all_marker_fields;
use evmm_testhost::{EvmmGuest, GuestConsole, GuestImages, Route};
use std::time::Duration;

/// Boots `guest` under evmm and returns its console; evmm must exit 0 within the limit.
fn boot(guest: &EvmmGuest) -> String {
    let route = Route::detect().unwrap_or_else(|e| panic!("{e}"));
    eprintln!("{route}");
    let images = GuestImages::build().unwrap_or_else(|e| panic!("{e}"));
    let argv = guest.argv(&images);
    // A hang (the guest never ends, or evmm never exits) hits this limit and fails.
    let out = route
        .run(&argv, Duration::from_secs(240))
        .unwrap_or_else(|e| panic!("evmm run failed: {e}"));
    eprintln!("evmm ran {:.1} s", out.command_time.as_secs_f64());
    assert_eq!(
        out.status, 0,
        "evmm exited {}; console:\n{}",
        out.status, out.output
    );
    let console = GuestConsole::parse(&out.output);
    assert!(console.started, "no start marker; console:\n{}", out.output);
    out.output
}

fn sysinfo(cpus: u32, memory_mib: u32) {
    let mut guest = EvmmGuest::new("sysinfo");
    guest.cpus = cpus;
    guest.memory_mib = memory_mib;
    let console = boot(&guest);
    assert!(
        GuestConsole::parse(&console).passed("sysinfo"),
        "console:\n{console}"
    );
    let info = all_marker_fields(&console, "EVMM-SYSINFO");
    let info = info
        .first()
        .unwrap_or_else(|| panic!("no EVMM-SYSINFO line:\n{console}"));
    assert_eq!(info["cpus"], cpus.to_string(), "console:\n{console}");
    let ram_kib: u64 = info["ram_kib"].parse().unwrap();
    let given_kib = u64::from(memory_mib) * 1024;
    // The e820 map hands the guest all of it but the legacy BIOS area below 1 MiB.
    assert!(
        (given_kib - 1024..=given_kib).contains(&ram_kib),
        "guest RAM {ram_kib} KiB for {given_kib} KiB given"
    );
}

#[test]
fn boots_to_init_with_one_vcpu() {
    sysinfo(1, 512);
}

#[test]
fn boots_to_init_with_two_vcpus() {
    sysinfo(2, 768);
}

#[test]
fn guest_poweroff_ends_evmm_with_status_0() {
    let mut guest = EvmmGuest::new("hello");
    guest.cmdline.push_str(" evmm.end=poweroff");
    let console = boot(&guest);
    assert!(
        GuestConsole::parse(&console).passed("hello"),
        "console:\n{console}"
    );
    assert!(
        console.contains("EVMM-GUEST-END poweroff"),
        "console:\n{console}"
    );
}
