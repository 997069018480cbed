//! Linux level, QEMU as the reference VMM: QEMU microvm's own `virtio-net-device`
//! (`vhost=off`, virtio-mmio version 2) on a tap in the nested host, with Debian's
//! stock guest. This validates the network checks (`guest-images/guest/tests/net`,
//! evmm-guest-net), their peer in L1 (`evmm-net-peer`) and the run builder of
//! `evmm_testhost::net` against a device no one here wrote, so that evmm's virtio-net
//! device is tested with plumbing known to work. One boot checks: eth0 has the MAC
//! given and its link up; pings both ways; 64 MiB over TCP each way, with equal SHA-256
//! at both ends (and equal to the stream's, computed here); MTU 9000 and 8,000-byte
//! pings with the don't-fragment bit both ways. A second boot runs the benchmark's
//! tools once each: UDP request/response latency, iperf3 both ways, a UDP flood into
//! a slow reader, and pings after it. Runs on the route the capability probe picks;
//! fails (never skips) when anything is missing.

mod common;

use common::net::{assert_link, assert_pings, assert_transfers, tap_counter};
use common::MIB;
use evmm_testhost::net::{qemu_net_guest, side_fields, QemuNet, Side, DEFAULT_TAP};
use evmm_testhost::{GuestImages, NetOutput, NetPlan};

const MAC: &str = "52:54:00:e5:4e:01";
const TRANSFER_MIB: u64 = 64;
const JUMBO_MTU: u32 = 9000;
const JUMBO_PING: u32 = 8000;

/// Boots the stock guest under QEMU microvm with a virtio-net-device on a tap of MTU
/// `tap_mtu` and runs `plan` ([`common::net::run`]).
fn run(plan: &NetPlan, tap_mtu: u32) -> (String, NetOutput) {
    let images = GuestImages::build().unwrap_or_else(|e| panic!("{e}"));
    let net = QemuNet {
        mac: MAC.into(),
        ..QemuNet::default()
    };
    let guest = qemu_net_guest(&plan.guest, &net);
    common::net::run(guest.argv(&images), plan, tap_mtu, false)
}

#[test]
fn qemu_virtio_net_on_a_tap_passes_the_network_checks() {
    let plan = NetPlan::new()
        .link_up(MAC, 1500)
        .ping(Side::Guest, 3, None)
        .ping(Side::L1, 3, None)
        .tcp(Side::L1, TRANSFER_MIB)
        .tcp(Side::Guest, TRANSFER_MIB)
        .guest_mtu(JUMBO_MTU)
        .ping(Side::Guest, 3, Some(JUMBO_PING))
        .ping(Side::L1, 3, Some(JUMBO_PING))
        .stats(DEFAULT_TAP);
    let (text, net) = run(&plan, JUMBO_MTU);

    // eth0: the MAC QEMU was given, link up.
    assert_eq!(assert_link(&net, &text, MAC), 1500);

    // Pings both ways, then 8,000 bytes with DF at MTU 9000 both ways.
    assert_pings(&net, &text, Side::Guest, None, 3);
    assert_pings(&net, &text, Side::L1, None, 3);
    let mtu = side_fields(&text, "EVMM-NET-MTU", Side::Guest);
    assert_eq!(
        mtu.first().map(|f| f["mtu"].as_str()),
        Some("9000"),
        "output:\n{text}"
    );
    assert_pings(&net, &text, Side::Guest, Some(JUMBO_PING), 3);
    assert_pings(&net, &text, Side::L1, Some(JUMBO_PING), 3);

    // 64 MiB each way, the same digest at both ends and equal to the stream's.
    assert_transfers(&net, &text, TRANSFER_MIB, "QEMU");

    // The tap carried it: at least the 64 MiB each way.
    for counter in ["rx_bytes", "tx_bytes"] {
        let v = tap_counter(&net, &text, counter);
        assert!(v >= TRANSFER_MIB * MIB, "tap {counter}={v}");
    }
}

#[test]
fn qemu_virtio_net_runs_the_benchmark_tools() {
    let plan = NetPlan::new()
        .link_up(MAC, 1500)
        .udp_rr(Side::Guest, 200, None)
        .iperf3(Side::Guest, 3, &[])
        .iperf3(Side::Guest, 3, &["-R"])
        .udp_flood(Side::L1, 3, None, Some(1000))
        .ping(Side::Guest, 3, None)
        .ping(Side::L1, 3, None)
        .stats(DEFAULT_TAP);
    let (text, net) = run(&plan, 1500);

    // Request/response latency, every answer back.
    let rr = net
        .udp_rr
        .iter()
        .find(|r| r.side == Side::Guest)
        .unwrap_or_else(|| panic!("no UDP request/response line; output:\n{text}"));
    assert!(rr.ok && rr.count == 200, "{rr:?}");
    assert!(
        rr.p50_us > 0.0 && rr.p50_us <= rr.p90_us && rr.p90_us <= rr.p99_us,
        "{rr:?}"
    );
    eprintln!(
        "UDP request/response, guest -> L1: p50 {:.0} us, p99 {:.0} us ({}/{})",
        rr.p50_us, rr.p99_us, rr.received, rr.count
    );

    // iperf3 with the guest as the client, sending and then (-R) receiving; both
    // ends report the receiver's bitrate.
    let clients: Vec<_> = net
        .iperf3
        .iter()
        .filter(|r| r.side == Side::Guest && r.role == "client")
        .collect();
    let servers: Vec<_> = net
        .iperf3
        .iter()
        .filter(|r| r.side == Side::L1 && r.role == "server")
        .collect();
    assert_eq!((clients.len(), servers.len()), (2, 2), "output:\n{text}");
    for (c, dir) in clients.iter().zip(["guest -> L1", "L1 -> guest (-R)"]) {
        let kbit = c.receiver_kbit_s.unwrap_or(0.0);
        assert!(c.ok && kbit > 0.0, "{c:?}");
        eprintln!("iperf3 {dir}: {:.1} Mbit/s at the receiver", kbit / 1000.0);
    }
    assert!(servers.iter().all(|s| s.ok), "{servers:?}");

    // A flood from L1 into a guest that reads slowly: the guest takes what it can,
    // drops the rest, and answers pings afterwards.
    let flood = net
        .floods
        .iter()
        .find(|f| f.side == Side::L1)
        .unwrap_or_else(|| panic!("no flood line; output:\n{text}"));
    let sink = net
        .sinks
        .iter()
        .find(|s| s.side == Side::Guest)
        .unwrap_or_else(|| panic!("no sink line; output:\n{text}"));
    assert!(flood.ok && sink.ok, "{flood:?} {sink:?}");
    assert!(sink.packets <= flood.packets, "{flood:?} {sink:?}");
    eprintln!(
        "UDP flood L1 -> guest: {} sent, {} read by the slow reader",
        flood.packets, sink.packets
    );
    assert_pings(&net, &text, Side::Guest, None, 3);
    assert_pings(&net, &text, Side::L1, None, 3);
    eprintln!(
        "tap: tx_packets={} tx_dropped={}",
        tap_counter(&net, &text, "tx_packets"),
        tap_counter(&net, &text, "tx_dropped")
    );
}
