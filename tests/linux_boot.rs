//! Linux level (Debian's stock guest; in the nested host where /dev/kvm cannot boot
//! it): evmm boots Debian's stock kernel with the guest initramfs to its init, with the vCPUs
//! and memory it was given, and ends when the guest powers off or reboots. Runs on the
//! route the capability probe picks (printed).

use evmm_testhost::guest::all_marker_fields;
use evmm_testhost::{EvmmGuest, GuestConsole, GuestImages, Route};
use std::time::Duration;

/// Boots `guest` under evmm and returns its console; evmm must exit 0 within the limit.
fn boot(guest: &EvmmGuest) -> String {
    try_boot(guest, 3).unwrap_or_else(|e| panic!("{e}"))
}

/// One boot, with at most `attempts` nested attempts (1 where the caller retries).
fn try_boot(guest: &EvmmGuest, attempts: u32) -> Result<String, String> {
    let route = Route::detect().map_err(|e| e.to_string())?;
    eprintln!("{route}");
    let images = GuestImages::build().map_err(|e| e.to_string())?;
    let argv = guest.argv(&images);
    // A hang (the guest never ends, or evmm never exits) hits this limit and fails.
    let out = route
        .run_attempts(&argv, Duration::from_secs(240), attempts)
        .map_err(|e| format!("evmm run failed: {e}"))?;
    eprintln!("evmm ran: {}", out.timing());
    if out.status != 0 {
        return Err(format!(
            "evmm exited {}; console:\n{}",
            out.status, out.output
        ));
    }
    if !GuestConsole::parse(&out.output).started {
        return Err(format!("no start marker; console:\n{}", out.output));
    }
    Ok(out.output)
}

/// SMP guests in the nested host sometimes reset or stall early in boot, under QEMU as
/// the guest's VMM as much as under evmm (README: "Where Linux guests run"); such a boot
/// is retried, at most twice, and every failed attempt is printed.
fn boot_smp(guest: &EvmmGuest) -> String {
    let mut failures = Vec::new();
    for attempt in 1..=3 {
        match try_boot(guest, 1) {
            Ok(console) => return console,
            Err(e) => {
                eprintln!("attempt {attempt} of an SMP boot failed: {e}");
                failures.push(e);
            }
        }
    }
    panic!("3 SMP boots failed:\n{}", failures.join("\n---\n"));
}

fn sysinfo(cpus: u32, memory_mib: u32) {
    let mut guest = EvmmGuest::new("sysinfo");
    guest.cpus = cpus;
    guest.memory_mib = memory_mib;
    let console = if cpus > 1 {
        boot_smp(&guest)
    } else {
        boot(&guest)
    };
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
