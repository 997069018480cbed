//! Linux level, QEMU as the VMM: the guest images boot independently of evmm: Debian's QEMU, with KVM, boots the stock
//! kernel with the guest initramfs to its start marker and returns the guest test's result.

use evmm_testhost::guest::all_marker_fields;
use evmm_testhost::qemu_cpu::{reported_model, FALLBACK};
use evmm_testhost::{GuestConsole, GuestImages, QemuGuest, Route};
use std::time::Duration;

fn boot_in_qemu(route: &Route, guest: &QemuGuest) -> String {
    let images = GuestImages::build().unwrap_or_else(|e| panic!("{e}"));
    let out = route
        .run(&guest.argv(&images), Duration::from_secs(240))
        .unwrap_or_else(|e| panic!("QEMU run failed: {e}"));
    assert_eq!(out.status, 0, "QEMU failed; output:\n{}", out.output);
    let cpu = reported_model(&out.output)
        .unwrap_or_else(|| panic!("evmm-qemu reported no CPU model:\n{}", out.output));
    if let Some(forced) = &guest.cpu {
        assert_eq!(cpu, forced, "the forced CPU model was not used");
    }
    eprintln!("QEMU (-cpu {cpu}) boot and guest test: {}", out.timing());
    out.output
}

fn route() -> Route {
    let route = Route::detect().unwrap_or_else(|e| panic!("{e}"));
    eprintln!("{route}");
    route
}

#[test]
fn qemu_boots_the_stock_kernel_to_the_guest_test() {
    let route = route();
    let guest = QemuGuest::microvm("sysinfo");
    let console = boot_in_qemu(&route, &guest);
    let parsed = GuestConsole::parse(&console);
    assert!(parsed.started, "no start marker; console:\n{console}");
    assert!(
        parsed.passed("sysinfo"),
        "guest test failed; console:\n{console}"
    );
    let info = all_marker_fields(&console, "EVMM-SYSINFO");
    let info = info
        .first()
        .unwrap_or_else(|| panic!("no EVMM-SYSINFO line:\n{console}"));
    assert_eq!(info["cpus"], "1");
    let ram_kib: u64 = info["ram_kib"].parse().unwrap();
    // The firmware map gives nearly all of the 512 MiB (less BIOS areas).
    assert!(
        (500 * 1024..=512 * 1024).contains(&ram_kib),
        "ram_kib={ram_kib}"
    );
}

/// Also runs QEMU with the CPU model used where the host's KVM refuses `-cpu host`, so
/// that model is tried on every host.
#[test]
fn a_failing_guest_test_reports_its_status() {
    let route = route();
    let mut guest = QemuGuest::microvm("fail");
    guest.cpu = Some(FALLBACK.into());
    guest.cmdline.push_str(" evmm.args=5");
    let console = boot_in_qemu(&route, &guest);
    let parsed = GuestConsole::parse(&console);
    assert!(parsed.started, "no start marker; console:\n{console}");
    assert_eq!(
        parsed.result,
        Some(("fail".into(), 5)),
        "console:\n{console}"
    );
}
