//! Network runs: a guest with a virtio-net device on a tap in the nested host (L1),
//! the guest's checks (`guest-images/guest/tests/net`, evmm-guest-net) and their peer
//! in L1 (`evmm-net-peer`, `guest-images/l1/net-peer`), all in one command run where
//! guests boot ([`crate::Route::run`]).
//!
//! - [`Check`]: one check, as the guest (`evmm.test=net evmm.args=...`) or the peer
//!   (`evmm-net-peer run ...`) runs it.
//! - [`NetPlan`]: both sides' checks, built in matching pairs (the guest receives what
//!   the peer sends, a barrier on each side, ports allocated in order).
//! - [`NetRun`]: the shell body of a run: the tap, the peer in the background, the VMM
//!   in the foreground, then the peer's output and exit status, the tap's counters,
//!   and the tap removed (when the run has not deleted it).
//! - [`qemu_net_guest`], [`evmm_net_guest`]: the VMM under test on that tap.
//! - [`NetOutput`]: the run's result lines, parsed.
//!
//! Traffic stays between L1 and its guest: L1 has no other network device. The
//! addresses are in 198.18.0.0/15, the range RFC 2544 sets aside for network
//! benchmarks.

use crate::evmm::EvmmGuest;
use crate::guest::{all_marker_fields, marker_fields};
use crate::images::{repo_root, target_dir};
use crate::nested::shell_quote;
use crate::qemu::QemuGuest;
use crate::route::Route;
use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::time::Duration;

/// L1's address on the tap.
pub const HOST_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
/// The guest's address.
pub const GUEST_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
/// The prefix length of both.
pub const PREFIX: u8 = 24;
/// The tap's name when none is given.
pub const DEFAULT_TAP: &str = "evmmtap0";
/// The guest's MAC address when none is given (QEMU's default OUI).
pub const DEFAULT_MAC: &str = "52:54:00:12:34:56";
/// The guest's interface (no udev in the guest: the kernel's name).
pub const GUEST_IFACE: &str = "eth0";
/// The guest test that runs the checks.
pub const GUEST_TEST: &str = "net";
/// The first port [`NetPlan`] hands out.
pub const FIRST_PORT: u16 = 5201;

/// One network check, as `evmm-guest-net` takes it (see `guest-images/guest/tests/net`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Check {
    /// `link IFACE MAC`: the interface exists with this MAC, is up, has a carrier.
    Link {
        /// Interface.
        iface: String,
        /// Expected MAC address.
        mac: String,
    },
    /// `addr IFACE IP/PREFIX [MTU]`: the address (replacing any), the MTU, link up.
    Addr {
        /// Interface.
        iface: String,
        /// Address with prefix length.
        cidr: String,
        /// MTU to set.
        mtu: Option<u32>,
    },
    /// `mtu IFACE MTU`.
    Mtu {
        /// Interface.
        iface: String,
        /// MTU.
        mtu: u32,
    },
    /// `stats IFACE`: its counters.
    Stats {
        /// Interface.
        iface: String,
    },
    /// `ping IP COUNT [SIZE]`: ICMP echoes with the don't-fragment bit.
    Ping {
        /// Target.
        dst: Ipv4Addr,
        /// Counted echoes (after the first reply).
        count: u32,
        /// ICMP payload bytes (default 56).
        size: Option<u32>,
    },
    /// `pinged MIN`: this side has answered at least MIN echo requests since boot.
    Pinged {
        /// Minimum.
        min: u64,
    },
    /// `send IP PORT MIB`: TCP, the deterministic stream, with its SHA-256.
    Send {
        /// Receiver.
        dst: Ipv4Addr,
        /// Its port.
        port: u16,
        /// MiB to send.
        mib: u64,
    },
    /// `recv PORT MIB`: receive and check the stream.
    Recv {
        /// Port to listen on.
        port: u16,
        /// MiB expected.
        mib: u64,
    },
    /// `barrier [IP] PORT`: listen (no IP) or connect; both sides go on together.
    Barrier {
        /// The listener, for the side that connects.
        peer: Option<Ipv4Addr>,
        /// Port.
        port: u16,
    },
    /// `udp-echo PORT`: the server of [`Check::UdpRr`].
    UdpEcho {
        /// Port.
        port: u16,
    },
    /// `udp-rr IP PORT COUNT [SIZE]`: request/response latency (p50/p99).
    UdpRr {
        /// Echo server.
        dst: Ipv4Addr,
        /// Its port.
        port: u16,
        /// Requests.
        count: u32,
        /// Payload bytes (default 64).
        size: Option<u32>,
    },
    /// `udp-flood IP PORT SECONDS [SIZE]`: datagrams as fast as possible.
    UdpFlood {
        /// Target.
        dst: Ipv4Addr,
        /// Its port.
        port: u16,
        /// Duration.
        seconds: u32,
        /// Payload bytes (default 1024).
        size: Option<u32>,
    },
    /// `udp-sink PORT SECONDS [DELAY_US]`: a slow reader.
    UdpSink {
        /// Port.
        port: u16,
        /// Seconds from the first datagram.
        seconds: u32,
        /// Pause after each datagram (default 1000 µs).
        delay_us: Option<u64>,
    },
    /// `iperf3-server PORT` (one test).
    Iperf3Server {
        /// Port.
        port: u16,
    },
    /// `iperf3-client IP PORT SECONDS [OPTION]...`.
    Iperf3Client {
        /// Server.
        dst: Ipv4Addr,
        /// Its port.
        port: u16,
        /// Duration.
        seconds: u32,
        /// Further iperf3 options (`-R`, `-u`, `-b`, `100M`, `-P`, `2`, ...).
        options: Vec<String>,
    },
    /// `rebind IFACE`: the driver lets go of the device and takes it again (a reset).
    Rebind {
        /// Interface.
        iface: String,
    },
    /// `set-link IFACE up|down|delete`: what a tap's user may do under a running VMM.
    SetLink {
        /// Interface.
        iface: String,
        /// `up`, `down` or `delete`.
        state: String,
    },
    /// `threads NAME`: the threads of process NAME and the `vhost-*` kernel threads.
    Threads {
        /// The process's name (its `comm`).
        process: String,
    },
    /// `sleep SECONDS`.
    Sleep {
        /// Seconds.
        seconds: u32,
    },
}

impl Check {
    /// The check's words, name first.
    pub fn words(&self) -> Vec<String> {
        let mut w: Vec<String> = Vec::new();
        let mut push = |items: &[&dyn ToString]| w.extend(items.iter().map(|i| i.to_string()));
        match self {
            Check::Link { iface, mac } => push(&[&"link", iface, mac]),
            Check::Addr { iface, cidr, mtu } => {
                push(&[&"addr", iface, cidr]);
                if let Some(m) = mtu {
                    push(&[m]);
                }
            }
            Check::Mtu { iface, mtu } => push(&[&"mtu", iface, mtu]),
            Check::Stats { iface } => push(&[&"stats", iface]),
            Check::Ping { dst, count, size } => {
                push(&[&"ping", dst, count]);
                if let Some(s) = size {
                    push(&[s]);
                }
            }
            Check::Pinged { min } => push(&[&"pinged", min]),
            Check::Send { dst, port, mib } => push(&[&"send", dst, port, mib]),
            Check::Recv { port, mib } => push(&[&"recv", port, mib]),
            Check::Barrier { peer, port } => {
                push(&[&"barrier"]);
                if let Some(p) = peer {
                    push(&[p]);
                }
                push(&[port]);
            }
            Check::UdpEcho { port } => push(&[&"udp-echo", port]),
            Check::UdpRr {
                dst,
                port,
                count,
                size,
            } => {
                push(&[&"udp-rr", dst, port, count]);
                if let Some(s) = size {
                    push(&[s]);
                }
            }
            Check::UdpFlood {
                dst,
                port,
                seconds,
                size,
            } => {
                push(&[&"udp-flood", dst, port, seconds]);
                if let Some(s) = size {
                    push(&[s]);
                }
            }
            Check::UdpSink {
                port,
                seconds,
                delay_us,
            } => {
                push(&[&"udp-sink", port, seconds]);
                if let Some(d) = delay_us {
                    push(&[d]);
                }
            }
            Check::Iperf3Server { port } => push(&[&"iperf3-server", port]),
            Check::Iperf3Client {
                dst,
                port,
                seconds,
                options,
            } => {
                push(&[&"iperf3-client", dst, port, seconds]);
                for o in options {
                    push(&[o]);
                }
            }
            Check::SetLink { iface, state } => push(&[&"set-link", iface, state]),
            Check::Threads { process } => push(&[&"threads", process]),
            Check::Rebind { iface } => push(&[&"rebind", iface]),
            Check::Sleep { seconds } => push(&[&"sleep", seconds]),
        }
        w
    }
}

/// The words of `checks`, separated by `+`.
pub fn check_words(checks: &[Check]) -> Vec<String> {
    let mut words = Vec::new();
    for (i, c) in checks.iter().enumerate() {
        if i > 0 {
            words.push("+".to_string());
        }
        words.extend(c.words());
    }
    words
}

/// The kernel command line words that run `checks` in the guest:
/// `evmm.test=net evmm.args=W1,W2,+,...`.
///
/// # Panics
/// When a word holds a comma or white space (the guest init splits `evmm.args` on
/// commas, the kernel its command line on white space).
pub fn guest_cmdline(checks: &[Check]) -> String {
    let words = check_words(checks);
    for w in &words {
        assert!(
            !w.is_empty() && !w.contains(',') && !w.contains(char::is_whitespace),
            "guest check word {w:?} cannot go into evmm.args="
        );
    }
    let mut line = crate::guest::test_arg(GUEST_TEST);
    if !words.is_empty() {
        line.push_str(&format!(" evmm.args={}", words.join(",")));
    }
    line
}

/// A side of a network run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Side {
    /// The guest (`side=guest`).
    Guest,
    /// The nested host, on the tap (`side=l1`).
    L1,
}

impl Side {
    /// The `side=` value.
    pub fn as_str(self) -> &'static str {
        match self {
            Side::Guest => "guest",
            Side::L1 => "l1",
        }
    }

    /// Parses a `side=` value.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "guest" => Some(Side::Guest),
            "l1" => Some(Side::L1),
            _ => None,
        }
    }

    /// The other side.
    pub fn other(self) -> Self {
        match self {
            Side::Guest => Side::L1,
            Side::L1 => Side::Guest,
        }
    }

    /// This side's address on the tap's network.
    pub fn ip(self) -> Ipv4Addr {
        match self {
            Side::Guest => GUEST_IP,
            Side::L1 => HOST_IP,
        }
    }
}

/// Both sides' checks, in the order each runs them. The pair builders keep the two
/// lists in step: whatever one side waits for, the other does at the same point.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetPlan {
    /// The guest's checks.
    pub guest: Vec<Check>,
    /// The peer's (L1's) checks.
    pub peer: Vec<Check>,
    next_port: u16,
}

impl Default for NetPlan {
    fn default() -> Self {
        Self::new()
    }
}

impl NetPlan {
    /// Nothing yet; ports from [`FIRST_PORT`].
    pub fn new() -> Self {
        Self {
            guest: Vec::new(),
            peer: Vec::new(),
            next_port: FIRST_PORT,
        }
    }

    /// The next free port.
    pub fn port(&mut self) -> u16 {
        let p = self.next_port;
        self.next_port += 1;
        p
    }

    fn side(&mut self, side: Side) -> &mut Vec<Check> {
        match side {
            Side::Guest => &mut self.guest,
            Side::L1 => &mut self.peer,
        }
    }

    /// A check on one side only.
    pub fn on(mut self, side: Side, check: Check) -> Self {
        self.side(side).push(check);
        self
    }

    /// The guest's `eth0` has `mac`, link up and carrier, then the guest's address
    /// ([`GUEST_IP`]/[`PREFIX`]) with `mtu`.
    pub fn link_up(self, mac: &str, mtu: u32) -> Self {
        self.on(
            Side::Guest,
            Check::Link {
                iface: GUEST_IFACE.into(),
                mac: mac.into(),
            },
        )
        .on(
            Side::Guest,
            Check::Addr {
                iface: GUEST_IFACE.into(),
                cidr: format!("{GUEST_IP}/{PREFIX}"),
                mtu: Some(mtu),
            },
        )
    }

    /// Both sides wait for each other here (the guest connects, the peer listens).
    pub fn barrier(mut self) -> Self {
        let port = self.port();
        self.peer.push(Check::Barrier { peer: None, port });
        self.guest.push(Check::Barrier {
            peer: Some(HOST_IP),
            port,
        });
        self
    }

    /// `from` pings the other side `count` times with `size` payload bytes (DF set).
    /// A ping from L1 sits between two barriers: it starts once the guest got here
    /// (its earlier checks, an MTU change say, are done), and the guest waits for it
    /// to end.
    pub fn ping(self, from: Side, count: u32, size: Option<u32>) -> Self {
        let ping = Check::Ping {
            dst: from.other().ip(),
            count,
            size,
        };
        match from {
            Side::Guest => self.on(Side::Guest, ping),
            Side::L1 => self.barrier().on(Side::L1, ping).barrier(),
        }
    }

    /// `from` sends `mib` MiB of the stream over TCP; the other side receives and
    /// checks it; both print the SHA-256.
    pub fn tcp(mut self, from: Side, mib: u64) -> Self {
        let port = self.port();
        let to = from.other();
        self.side(to).push(Check::Recv { port, mib });
        self.side(from).push(Check::Send {
            dst: to.ip(),
            port,
            mib,
        });
        self
    }

    /// The guest's MTU (L1's is the tap's, set by [`NetRun`]).
    pub fn guest_mtu(self, mtu: u32) -> Self {
        self.on(
            Side::Guest,
            Check::Mtu {
                iface: GUEST_IFACE.into(),
                mtu,
            },
        )
    }

    /// `client` sends `count` UDP requests of `size` bytes to an echo server on the
    /// other side (p50/p99 of the round trip).
    pub fn udp_rr(mut self, client: Side, count: u32, size: Option<u32>) -> Self {
        let port = self.port();
        let server = client.other();
        self.side(server).push(Check::UdpEcho { port });
        self.side(client).push(Check::UdpRr {
            dst: server.ip(),
            port,
            count,
            size,
        });
        self
    }

    /// After a barrier, `from` floods the other side with UDP for `seconds` while it
    /// reads slowly (`delay_us` after each datagram) for as long.
    pub fn udp_flood(
        mut self,
        from: Side,
        seconds: u32,
        size: Option<u32>,
        delay_us: Option<u64>,
    ) -> Self {
        self = self.barrier();
        let port = self.port();
        let to = from.other();
        self.side(to).push(Check::UdpSink {
            port,
            seconds,
            delay_us,
        });
        self.side(from).push(Check::UdpFlood {
            dst: to.ip(),
            port,
            seconds,
            size,
        });
        self
    }

    /// iperf3 for `seconds` with `client` on one side and the server on the other;
    /// `options` go to the client (`-R`, `-u`, `-P N`, ...).
    pub fn iperf3(mut self, client: Side, seconds: u32, options: &[&str]) -> Self {
        let port = self.port();
        let server = client.other();
        self.side(server).push(Check::Iperf3Server { port });
        self.side(client).push(Check::Iperf3Client {
            dst: server.ip(),
            port,
            seconds,
            options: options.iter().map(|s| s.to_string()).collect(),
        });
        self
    }

    /// The guest resets its network device through the driver (unbind, bind), then
    /// sets the address up again with `mtu`.
    pub fn rebind(self, mtu: u32) -> Self {
        self.on(
            Side::Guest,
            Check::Rebind {
                iface: GUEST_IFACE.into(),
            },
        )
        .on(
            Side::Guest,
            Check::Addr {
                iface: GUEST_IFACE.into(),
                cidr: format!("{GUEST_IP}/{PREFIX}"),
                mtu: Some(mtu),
            },
        )
    }

    /// L1 sets its tap `tap` `up`, `down` or deletes it (`delete`), without waiting
    /// for the guest.
    pub fn set_tap(self, tap: &str, state: &str) -> Self {
        self.on(
            Side::L1,
            Check::SetLink {
                iface: tap.into(),
                state: state.into(),
            },
        )
    }

    /// L1 lists the threads of its process `process` (the VMM) and the kernel's
    /// `vhost-*` threads, while the guest runs (it waits at a barrier after).
    pub fn threads(self, process: &str) -> Self {
        self.on(
            Side::L1,
            Check::Threads {
                process: process.into(),
            },
        )
        .barrier()
    }

    /// Each side prints its interface's counters (the guest's `eth0`, L1's `tap`).
    pub fn stats(self, tap: &str) -> Self {
        self.on(
            Side::Guest,
            Check::Stats {
                iface: GUEST_IFACE.into(),
            },
        )
        .on(Side::L1, Check::Stats { iface: tap.into() })
    }
}

/// L1's end of the link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tap {
    /// Interface name.
    pub name: String,
    /// L1's address on it, with prefix length.
    pub cidr: String,
    /// Its MTU.
    pub mtu: u32,
    /// Created with IFF_MULTI_QUEUE (`ip tuntap add ... multi_queue`).
    pub multi_queue: bool,
}

impl Default for Tap {
    fn default() -> Self {
        Self {
            name: DEFAULT_TAP.into(),
            cidr: format!("{HOST_IP}/{PREFIX}"),
            mtu: 1500,
            multi_queue: false,
        }
    }
}

/// The shell body of a network run.
#[derive(Debug, Clone)]
pub struct NetRun {
    /// The tap the VMM uses.
    pub tap: Tap,
    /// L1's checks (`evmm-net-peer run`).
    pub peer: Vec<Check>,
    /// The VMM's command line (console on stdout; it must end when the guest does).
    pub vmm: Vec<String>,
    /// How the peer script is run: `evmm-net-peer` in L1.
    pub peer_command: String,
    /// Prepended to PATH in the body (for the direct route: evmm-guest-net's folder).
    pub path_prefix: Option<String>,
    /// The peer's `$EVMM_NET_WAIT`: how long each of its checks waits for the guest
    /// to appear (the first one waits through the guest's boot).
    pub peer_wait: Duration,
    /// The VMM is killed after this long.
    pub vmm_limit: Duration,
    /// How long the peer may go on after the VMM ended before it is killed.
    pub peer_grace: Duration,
}

impl NetRun {
    /// A run of `vmm` with `peer`'s checks in L1 on a default [`Tap`]; the peer waits
    /// up to 180 s for the guest, the VMM may run 600 s, the peer 30 s longer.
    pub fn new(vmm: Vec<String>, peer: Vec<Check>) -> Self {
        Self {
            tap: Tap::default(),
            peer,
            vmm,
            peer_command: "evmm-net-peer".into(),
            path_prefix: None,
            peer_wait: Duration::from_secs(180),
            vmm_limit: Duration::from_secs(600),
            peer_grace: Duration::from_secs(30),
        }
    }

    /// Where `route` runs commands: L1 has `evmm-net-peer` and `evmm-guest-net` in
    /// its image; on this host (the direct route) they are the repository's script and
    /// the static build `guest-images/build` made.
    pub fn for_route(mut self, route: &Route) -> Self {
        // Inside the nested host (a benchmark that moved itself there) the route is
        // direct, and L1's image has the peer on PATH.
        let in_l1 = crate::nested::find_on_path("evmm-net-peer").is_some();
        if let (Route::Direct { .. }, false) = (route, in_l1) {
            self.peer_command = shell_quote(
                &repo_root()
                    .join("guest-images/l1/net-peer")
                    .display()
                    .to_string(),
            );
            self.path_prefix = Some(
                target_dir()
                    .join("guest/x86_64-unknown-linux-gnu/release")
                    .display()
                    .to_string(),
            );
        }
        self
    }

    /// The body: tap up, the peer in the background (its own session, output to a
    /// file), the VMM in the foreground under `timeout`, then the peer waited for
    /// (killed after the grace time), its output, the exit markers, the tap's
    /// counters, the tap removed. Prints `EVMM-NET-RUN-ERROR` and exits 1 when the
    /// tap cannot be made; otherwise exits 0, the outcome being in the markers
    /// (`EVMM-NET-VMM-EXIT status=`, `EVMM-NET-PEER-EXIT status=`,
    /// `EVMM-NET-PEER-HUNG`). It leaves errexit off (`set +e`).
    pub fn script(&self) -> String {
        let q = |s: &str| shell_quote(s);
        let tap = q(&self.tap.name);
        let peer_words: Vec<String> = check_words(&self.peer).iter().map(|w| q(w)).collect();
        let vmm: Vec<String> = self.vmm.iter().map(|w| q(w)).collect();
        let mut s = String::new();
        if let Some(prefix) = &self.path_prefix {
            s.push_str(&format!("PATH={}:\"$PATH\"\n", q(prefix)));
        }
        s.push_str(&format!(
            "NET_D=$(mktemp -d)\n\
             {peer} down {tap} >/dev/null 2>&1 || true\n\
             if ! {peer} up {tap} {cidr} {mtu}{mq}; then echo 'EVMM-NET-RUN-ERROR error=tap-setup'; rm -rf \"$NET_D\"; exit 1; fi\n\
             EVMM_NET_WAIT={wait} setsid {peer} run {checks} >\"$NET_D/peer.log\" 2>&1 </dev/null &\n\
             PEER=$!\n\
             set +e\n\
             timeout -s KILL {limit} {vmm}\n\
             echo \"EVMM-NET-VMM-EXIT status=$?\"\n\
             i=0; while kill -0 $PEER 2>/dev/null && [ $i -lt {grace} ]; do sleep 0.1; i=$((i+1)); done\n\
             if kill -0 $PEER 2>/dev/null; then echo EVMM-NET-PEER-HUNG; kill -KILL -$PEER 2>/dev/null || kill -KILL $PEER; fi\n\
             wait $PEER; peer_status=$?\n\
             cat \"$NET_D/peer.log\"\n\
             echo \"EVMM-NET-PEER-EXIT status=$peer_status\"\n\
             if [ -e /sys/class/net/{tap} ]; then {peer} show {tap}; {peer} down {tap}; else echo EVMM-NET-TAP-GONE tap={tap}; fi\n\
             rm -rf \"$NET_D\"\n\
             true\n",
            peer = self.peer_command,
            cidr = q(&self.tap.cidr),
            mtu = self.tap.mtu,
            mq = if self.tap.multi_queue { " multi_queue" } else { "" },
            wait = self.peer_wait.as_secs().max(1),
            checks = peer_words.join(" "),
            limit = self.vmm_limit.as_secs().max(1),
            vmm = vmm.join(" "),
            grace = self.peer_grace.as_secs() * 10,
        ));
        s
    }
}

/// QEMU's virtio-net device on a tap, for `-M microvm`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QemuNet {
    /// The tap (opened by name: `ifname=`, no scripts).
    pub tap: String,
    /// The guest's MAC address.
    pub mac: String,
    /// vhost-net (`vhost=on`) or QEMU's own device emulation (`vhost=off`).
    pub vhost: bool,
    /// Virtio 1.0 over virtio-mmio version 2 (QEMU 7.2 defaults to legacy
    /// virtio-mmio; evmm's transport is version 2).
    pub modern: bool,
    /// `virtio-net-pci` (no option ROM) on microvm's PCIe host bridge (`-M microvm,pcie=on`) instead
    /// of `virtio-net-device` on virtio-mmio: QEMU's virtio-mmio never hands an irqfd
    /// to KVM (a vhost worker's call eventfd is read by QEMU's main loop, which then
    /// raises the interrupt), its PCI transport does (MSI-X).
    pub pci: bool,
}

impl Default for QemuNet {
    fn default() -> Self {
        Self {
            tap: DEFAULT_TAP.into(),
            mac: DEFAULT_MAC.into(),
            vhost: false,
            modern: true,
            pci: false,
        }
    }
}

impl QemuNet {
    /// The QEMU arguments: `-netdev tap,...` and `-device virtio-net-device,...` (or
    /// `virtio-net-pci`).
    pub fn args(&self) -> Vec<String> {
        let mut a = Vec::new();
        if self.modern && !self.pci {
            a.extend(["-global".into(), "virtio-mmio.force-legacy=false".into()]);
        }
        a.extend([
            "-netdev".into(),
            format!(
                "tap,id=n0,ifname={},script=no,downscript=no,vhost={}",
                self.tap,
                if self.vhost { "on" } else { "off" }
            ),
            "-device".into(),
            if self.pci {
                format!(
                    "virtio-net-pci,netdev=n0,mac={},disable-legacy={},romfile=",
                    self.mac,
                    if self.modern { "on" } else { "off" }
                )
            } else {
                format!("virtio-net-device,netdev=n0,mac={}", self.mac)
            },
        ]);
        a
    }

    /// The machine: `microvm`, with its PCIe host bridge for [`Self::pci`].
    pub fn machine(&self) -> &'static str {
        if self.pci {
            "microvm,pcie=on"
        } else {
            "microvm"
        }
    }
}

/// A QEMU `-M microvm` guest running `checks` with `net`'s device.
pub fn qemu_net_guest(checks: &[Check], net: &QemuNet) -> QemuGuest {
    let mut guest = QemuGuest::microvm(GUEST_TEST);
    guest.machine = net.machine().into();
    guest.cmdline = guest_cmdline(checks);
    guest.extra = net.args();
    guest
}

/// An evmm guest running `checks` with a virtio-net device on `tap`:
/// `--net tap=TAP[,OPTION]...` (`options` such as `mac=...`, as evmm takes them).
pub fn evmm_net_guest(checks: &[Check], tap: &str, options: &[&str]) -> EvmmGuest {
    let mut guest = EvmmGuest::new(GUEST_TEST);
    guest.cmdline = guest_cmdline(checks);
    let mut spec = format!("tap={tap}");
    for o in options {
        spec.push(',');
        spec.push_str(o);
    }
    guest.extra = vec!["--net".into(), spec];
    guest
}

/// Where evmm writes its counters in a network run (one run at a time in a host).
pub const EVMM_METRICS: &str = "/tmp/evmm-net-metrics.json";
/// The marker of the line that carries evmm's counters after a run.
pub const METRICS_MARKER: &str = "EVMM-METRICS-JSON";

/// The command of `guest` (an evmm guest) with `--metrics` [`EVMM_METRICS`], followed
/// by the counters on one line after [`METRICS_MARKER`] once evmm has exited; its exit
/// status is evmm's.
pub fn evmm_argv_with_metrics(guest: &EvmmGuest, images: &crate::GuestImages) -> Vec<String> {
    let mut guest = guest.clone();
    guest
        .extra
        .extend(["--metrics".into(), EVMM_METRICS.into()]);
    let mut argv: Vec<String> = vec![
        "sh".into(),
        "-c".into(),
        format!("\"$@\"; s=$?; printf '{METRICS_MARKER} '; tr -d '\\n' < \"$0\"; echo; exit $s"),
        EVMM_METRICS.into(),
    ];
    argv.extend(guest.argv(images));
    argv
}

// --- results -------------------------------------------------------------------------

/// One `EVMM-NET-SHA256` line: an end of a TCP transfer.
#[derive(Debug, Clone, PartialEq)]
pub struct Transfer {
    /// Which side printed it.
    pub side: Side,
    /// `send` or `recv`.
    pub dir: String,
    /// The listening port (pairs the two ends).
    pub port: u16,
    /// Bytes sent or received.
    pub bytes: u64,
    /// Bytes expected.
    pub expected: u64,
    /// SHA-256 of the bytes, hex.
    pub sha256: String,
    /// Received bytes not equal to the stream.
    pub bad_bytes: u64,
    /// Passed on that side.
    pub ok: bool,
    /// Throughput seen there.
    pub mbit_s: f64,
    /// The error text, if any.
    pub error: Option<String>,
}

/// Both ends of one TCP transfer.
#[derive(Debug, Clone, PartialEq)]
pub struct TransferPair {
    /// The sender's line.
    pub sender: Transfer,
    /// The receiver's line.
    pub receiver: Transfer,
}

impl TransferPair {
    /// Both ends passed, with equal byte counts and digests.
    pub fn matched(&self) -> bool {
        self.sender.ok
            && self.receiver.ok
            && self.sender.bytes == self.receiver.bytes
            && self.sender.sha256 == self.receiver.sha256
    }
}

/// One `EVMM-NET-PING` line.
#[derive(Debug, Clone, PartialEq)]
pub struct Ping {
    /// Which side pinged.
    pub side: Side,
    /// Target.
    pub dst: String,
    /// Payload bytes.
    pub size: u32,
    /// Counted echoes sent.
    pub sent: u32,
    /// Replies.
    pub received: u32,
    /// Median round trip, µs.
    pub p50_us: f64,
    /// Passed.
    pub ok: bool,
    /// The error text, if any.
    pub error: Option<String>,
}

/// One `EVMM-NET-LINK` line.
#[derive(Debug, Clone, PartialEq)]
pub struct Link {
    /// Which side.
    pub side: Side,
    /// Interface.
    pub iface: String,
    /// Its MAC address.
    pub mac: String,
    /// Carrier on.
    pub carrier: bool,
    /// operstate.
    pub operstate: String,
    /// MTU.
    pub mtu: u32,
    /// Passed.
    pub ok: bool,
}

/// One `EVMM-NET-UDP-RR` line.
#[derive(Debug, Clone, PartialEq)]
pub struct UdpRr {
    /// The client's side.
    pub side: Side,
    /// Requests.
    pub count: u32,
    /// Answers.
    pub received: u32,
    /// Payload bytes.
    pub size: u32,
    /// Median round trip, µs.
    pub p50_us: f64,
    /// 90th percentile, µs.
    pub p90_us: f64,
    /// 99th percentile, µs.
    pub p99_us: f64,
    /// Passed (≤ 1 % lost).
    pub ok: bool,
}

/// One `EVMM-NET-IPERF3` line.
#[derive(Debug, Clone, PartialEq)]
pub struct Iperf3 {
    /// Which side.
    pub side: Side,
    /// `client` or `server`.
    pub role: String,
    /// The sender's bitrate, kbit/s.
    pub sender_kbit_s: Option<f64>,
    /// The receiver's bitrate, kbit/s.
    pub receiver_kbit_s: Option<f64>,
    /// TCP retransmissions.
    pub retransmits: Option<u64>,
    /// Passed.
    pub ok: bool,
}

/// One `EVMM-NET-UDP-FLOOD` or `EVMM-NET-UDP-SINK` line's counts.
#[derive(Debug, Clone, PartialEq)]
pub struct Udp {
    /// Which side.
    pub side: Side,
    /// Datagrams sent (flood) or read (sink).
    pub packets: u64,
    /// Passed.
    pub ok: bool,
}

/// The `EVMM-NET-CHECK` line after each check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckStatus {
    /// Which side.
    pub side: Side,
    /// The check's name.
    pub check: String,
    /// 0 passed, 1 failed, 2 could not run.
    pub status: i32,
}

/// Everything a network run printed that this module knows, parsed.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NetOutput {
    /// Links.
    pub links: Vec<Link>,
    /// Pings.
    pub pings: Vec<Ping>,
    /// Ends of TCP transfers.
    pub transfers: Vec<Transfer>,
    /// UDP request/response runs.
    pub udp_rr: Vec<UdpRr>,
    /// UDP floods.
    pub floods: Vec<Udp>,
    /// Slow UDP readers.
    pub sinks: Vec<Udp>,
    /// iperf3 ends.
    pub iperf3: Vec<Iperf3>,
    /// Check statuses, in order.
    pub checks: Vec<CheckStatus>,
    /// Interface counters (`EVMM-NET-STATS`), by side.
    pub stats: Vec<(Side, BTreeMap<String, String>)>,
    /// The VMM's exit status.
    pub vmm_status: Option<i32>,
    /// The peer's exit status.
    pub peer_status: Option<i32>,
    /// The peer had to be killed.
    pub peer_hung: bool,
    /// The tap could not be made.
    pub run_error: Option<String>,
}

fn side_of(f: &BTreeMap<String, String>) -> Option<Side> {
    Side::parse(f.get("side")?)
}

fn num<T: std::str::FromStr>(f: &BTreeMap<String, String>, key: &str) -> Option<T> {
    f.get(key)?.parse().ok()
}

fn ok(f: &BTreeMap<String, String>) -> bool {
    f.get("ok").map(String::as_str) == Some("1")
}

fn opt_f64(f: &BTreeMap<String, String>, key: &str) -> Option<f64> {
    num(f, key)
}

impl NetOutput {
    /// Parses a run's output; lines it cannot read are left out.
    pub fn parse(output: &str) -> Self {
        let mut out = NetOutput::default();
        for line in output.lines() {
            out.parse_line(line);
        }
        out
    }

    fn parse_line(&mut self, line: &str) {
        let get = |marker: &str| marker_fields(line, marker);
        if let Some(f) = get("EVMM-NET-SHA256") {
            if let (Some(side), Some(port)) = (side_of(&f), num(&f, "port")) {
                self.transfers.push(Transfer {
                    side,
                    dir: f.get("dir").cloned().unwrap_or_default(),
                    port,
                    bytes: num(&f, "bytes").unwrap_or(0),
                    expected: num(&f, "expected").unwrap_or(0),
                    sha256: f.get("sha256").cloned().unwrap_or_default(),
                    bad_bytes: num(&f, "bad_bytes").unwrap_or(0),
                    ok: ok(&f),
                    mbit_s: num(&f, "mbit_s").unwrap_or(0.0),
                    error: f.get("error").cloned(),
                });
            }
        } else if let Some(f) = get("EVMM-NET-PING") {
            if let Some(side) = side_of(&f) {
                self.pings.push(Ping {
                    side,
                    dst: f.get("dst").cloned().unwrap_or_default(),
                    size: num(&f, "size").unwrap_or(0),
                    sent: num(&f, "sent").unwrap_or(0),
                    received: num(&f, "received").unwrap_or(0),
                    p50_us: num(&f, "p50_us").unwrap_or(0.0),
                    ok: ok(&f),
                    error: f.get("error").cloned(),
                });
            }
        } else if let Some(f) = get("EVMM-NET-LINK") {
            if let Some(side) = side_of(&f) {
                self.links.push(Link {
                    side,
                    iface: f.get("iface").cloned().unwrap_or_default(),
                    mac: f.get("mac").cloned().unwrap_or_default(),
                    carrier: f.get("carrier").map(String::as_str) == Some("1"),
                    operstate: f.get("operstate").cloned().unwrap_or_default(),
                    mtu: num(&f, "mtu").unwrap_or(0),
                    ok: ok(&f),
                });
            }
        } else if let Some(f) = get("EVMM-NET-UDP-RR") {
            if let Some(side) = side_of(&f) {
                self.udp_rr.push(UdpRr {
                    side,
                    count: num(&f, "count").unwrap_or(0),
                    received: num(&f, "received").unwrap_or(0),
                    size: num(&f, "size").unwrap_or(0),
                    p50_us: num(&f, "p50_us").unwrap_or(0.0),
                    p90_us: num(&f, "p90_us").unwrap_or(0.0),
                    p99_us: num(&f, "p99_us").unwrap_or(0.0),
                    ok: ok(&f),
                });
            }
        } else if let Some(f) = get("EVMM-NET-UDP-FLOOD") {
            if let Some(side) = side_of(&f) {
                self.floods.push(Udp {
                    side,
                    packets: num(&f, "sent").unwrap_or(0),
                    ok: ok(&f),
                });
            }
        } else if let Some(f) = get("EVMM-NET-UDP-SINK") {
            if let Some(side) = side_of(&f) {
                self.sinks.push(Udp {
                    side,
                    packets: num(&f, "received").unwrap_or(0),
                    ok: ok(&f),
                });
            }
        } else if let Some(f) = get("EVMM-NET-IPERF3") {
            if let Some(side) = side_of(&f) {
                self.iperf3.push(Iperf3 {
                    side,
                    role: f.get("role").cloned().unwrap_or_default(),
                    sender_kbit_s: opt_f64(&f, "sender_kbit_s"),
                    receiver_kbit_s: opt_f64(&f, "receiver_kbit_s"),
                    retransmits: num(&f, "retransmits"),
                    ok: ok(&f),
                });
            }
        } else if let Some(f) = get("EVMM-NET-CHECK") {
            if let (Some(side), Some(status)) = (side_of(&f), num(&f, "status")) {
                self.checks.push(CheckStatus {
                    side,
                    check: f.get("check").cloned().unwrap_or_default(),
                    status,
                });
            }
        } else if let Some(f) = get("EVMM-NET-STATS") {
            if let Some(side) = side_of(&f) {
                self.stats.push((side, f));
            }
        } else if let Some(f) = get("EVMM-NET-VMM-EXIT") {
            self.vmm_status = num(&f, "status");
        } else if let Some(f) = get("EVMM-NET-PEER-EXIT") {
            self.peer_status = num(&f, "status");
        } else if get("EVMM-NET-PEER-HUNG").is_some() {
            self.peer_hung = true;
        } else if let Some(f) = get("EVMM-NET-RUN-ERROR") {
            self.run_error = Some(f.get("error").cloned().unwrap_or_default());
        }
    }

    /// The two ends of each TCP transfer (by port), in the order the receivers
    /// reported; a transfer whose other end printed nothing is left out (see
    /// [`NetOutput::unpaired_transfers`]).
    pub fn transfer_pairs(&self) -> Vec<TransferPair> {
        let mut pairs = Vec::new();
        for r in self.transfers.iter().filter(|t| t.dir == "recv") {
            if let Some(s) = self
                .transfers
                .iter()
                .find(|t| t.dir == "send" && t.port == r.port && t.side != r.side)
            {
                pairs.push(TransferPair {
                    sender: s.clone(),
                    receiver: r.clone(),
                });
            }
        }
        pairs
    }

    /// Transfer ends without their other end.
    pub fn unpaired_transfers(&self) -> Vec<&Transfer> {
        self.transfers
            .iter()
            .filter(|t| {
                !self
                    .transfers
                    .iter()
                    .any(|o| o.port == t.port && o.side != t.side && o.dir != t.dir)
            })
            .collect()
    }

    /// The pair whose sender was on `from`, for a transfer of `bytes`.
    pub fn transfer_from(&self, from: Side, bytes: u64) -> Option<TransferPair> {
        self.transfer_pairs()
            .into_iter()
            .find(|p| p.sender.side == from && p.sender.expected == bytes)
    }

    /// The first ping by `side` with `size` payload bytes (56 when None).
    pub fn ping_from(&self, side: Side, size: Option<u32>) -> Option<&Ping> {
        let size = size.unwrap_or(56);
        self.pings.iter().find(|p| p.side == side && p.size == size)
    }

    /// The checks that did not pass (status not 0), as `side:check=status`.
    pub fn failed_checks(&self) -> Vec<String> {
        self.checks
            .iter()
            .filter(|c| c.status != 0)
            .map(|c| format!("{}:{}={}", c.side.as_str(), c.check, c.status))
            .collect()
    }

    /// How many checks `side` passed.
    pub fn passed(&self, side: Side) -> usize {
        self.checks
            .iter()
            .filter(|c| c.side == side && c.status == 0)
            .count()
    }

    /// The guest started, printed no result, no check of either side failed, and the
    /// VMM exited 0: the guest reset (or powered off) in the middle of its checks
    /// without a word, which is what an L2 guest does now and then in the nested host
    /// whatever the VMM (README, Known problems). The peer then waits for a check
    /// that never comes and is killed, so its status says nothing here.
    pub fn guest_ended_silently(&self, console: &crate::GuestConsole) -> bool {
        console.started
            && console.result.is_none()
            && self.vmm_status == Some(0)
            && self.run_error.is_none()
            && self.checks.iter().all(|c| c.status == 0)
    }

    /// What says the run as a whole went wrong: the tap, the VMM's or the peer's
    /// exit status, a peer that had to be killed, a failed check. Empty: all well
    /// (the guest test's own result is in the console: [`crate::GuestConsole`]).
    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        if let Some(e) = &self.run_error {
            p.push(format!("the run could not start: {e}"));
        }
        match self.vmm_status {
            Some(0) => {}
            Some(s) => p.push(format!("the VMM exited {s}")),
            None => p.push("no VMM exit status".into()),
        }
        match self.peer_status {
            Some(0) => {}
            Some(s) => p.push(format!("the peer exited {s}")),
            None => p.push("no peer exit status".into()),
        }
        if self.peer_hung {
            p.push("the peer did not end after the VMM and was killed".into());
        }
        p.extend(
            self.failed_checks()
                .into_iter()
                .map(|c| format!("check {c} failed")),
        );
        p
    }
}

/// The fields of every `marker` line of `side` (for lines [`NetOutput`] does not
/// type, such as `EVMM-NET-PINGED` or `EVMM-NET-BARRIER`).
pub fn side_fields(output: &str, marker: &str, side: Side) -> Vec<BTreeMap<String, String>> {
    all_marker_fields(output, marker)
        .into_iter()
        .filter(|f| side_of(f) == Some(side))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(checks: &[Check]) -> String {
        check_words(checks).join(" ")
    }

    #[test]
    fn checks_as_words() {
        let c = [
            Check::Link {
                iface: "eth0".into(),
                mac: DEFAULT_MAC.into(),
            },
            Check::Addr {
                iface: "eth0".into(),
                cidr: "198.18.0.2/24".into(),
                mtu: Some(9000),
            },
            Check::Ping {
                dst: HOST_IP,
                count: 3,
                size: None,
            },
            Check::Ping {
                dst: HOST_IP,
                count: 3,
                size: Some(8000),
            },
            Check::Barrier {
                peer: Some(HOST_IP),
                port: 7,
            },
            Check::Barrier {
                peer: None,
                port: 7,
            },
            Check::Iperf3Client {
                dst: HOST_IP,
                port: 5201,
                seconds: 5,
                options: vec!["-R".into()],
            },
        ];
        assert_eq!(
            words(&c),
            "link eth0 52:54:00:12:34:56 + addr eth0 198.18.0.2/24 9000 + ping 198.18.0.1 3 + \
             ping 198.18.0.1 3 8000 + barrier 198.18.0.1 7 + barrier 7 + iperf3-client 198.18.0.1 5201 5 -R"
        );
        assert_eq!(
            guest_cmdline(&c[..3]),
            "evmm.test=net evmm.args=link,eth0,52:54:00:12:34:56,+,addr,eth0,198.18.0.2/24,9000,+,ping,198.18.0.1,3"
        );
        assert_eq!(guest_cmdline(&[]), "evmm.test=net");
    }

    #[test]
    #[should_panic(expected = "cannot go into evmm.args")]
    fn a_comma_cannot_go_to_the_guest() {
        guest_cmdline(&[Check::Iperf3Client {
            dst: HOST_IP,
            port: 1,
            seconds: 1,
            options: vec!["a,b".into()],
        }]);
    }

    #[test]
    fn a_plan_keeps_both_sides_in_step() {
        let plan = NetPlan::new()
            .link_up(DEFAULT_MAC, 1500)
            .ping(Side::Guest, 3, None)
            .ping(Side::L1, 3, None)
            .tcp(Side::L1, 64)
            .tcp(Side::Guest, 64)
            .guest_mtu(9000)
            .ping(Side::L1, 2, Some(8000));
        assert_eq!(
            words(&plan.guest),
            "link eth0 52:54:00:12:34:56 + addr eth0 198.18.0.2/24 1500 + ping 198.18.0.1 3 + \
             barrier 198.18.0.1 5201 + barrier 198.18.0.1 5202 + recv 5203 64 + send 198.18.0.1 5204 64 + \
             mtu eth0 9000 + barrier 198.18.0.1 5205 + barrier 198.18.0.1 5206"
        );
        assert_eq!(
            words(&plan.peer),
            "barrier 5201 + ping 198.18.0.2 3 + barrier 5202 + send 198.18.0.2 5203 64 + recv 5204 64 + \
             barrier 5205 + ping 198.18.0.2 2 8000 + barrier 5206"
        );
        let plan = NetPlan::new()
            .udp_rr(Side::L1, 100, Some(32))
            .udp_flood(Side::L1, 3, None, Some(500))
            .iperf3(Side::Guest, 5, &["-R"])
            .stats("tap9");
        assert_eq!(
            words(&plan.guest),
            "udp-echo 5201 + barrier 198.18.0.1 5202 + udp-sink 5203 3 500 + iperf3-client 198.18.0.1 5204 5 -R + stats eth0"
        );
        assert_eq!(
            words(&plan.peer),
            "udp-rr 198.18.0.2 5201 100 32 + barrier 5202 + udp-flood 198.18.0.2 5203 3 + iperf3-server 5204 + stats tap9"
        );
    }

    #[test]
    fn qemu_and_evmm_command_lines() {
        let net = QemuNet::default();
        assert_eq!(
            net.args().join(" "),
            "-global virtio-mmio.force-legacy=false -netdev tap,id=n0,ifname=evmmtap0,script=no,downscript=no,vhost=off \
             -device virtio-net-device,netdev=n0,mac=52:54:00:12:34:56"
        );
        let pci = QemuNet {
            vhost: true,
            pci: true,
            ..QemuNet::default()
        };
        assert_eq!(
            pci.args().join(" "),
            "-netdev tap,id=n0,ifname=evmmtap0,script=no,downscript=no,vhost=on \
             -device virtio-net-pci,netdev=n0,mac=52:54:00:12:34:56,disable-legacy=on,romfile="
        );
        assert_eq!(pci.machine(), "microvm,pcie=on");
        let images = crate::GuestImages {
            dir: "/o".into(),
            vmlinuz: "/o/vmlinuz".into(),
            initramfs: "/o/initramfs.cpio.gz".into(),
            l1_initramfs: "/o/l1.cpio".into(),
        };
        let checks = NetPlan::new().link_up(DEFAULT_MAC, 1500).guest;
        let argv = qemu_net_guest(&checks, &net).argv(&images).join(" ");
        assert!(argv.starts_with("evmm-qemu "), "{argv}");
        assert!(argv.contains("-M microvm,accel=kvm"), "{argv}");
        assert!(
            argv.contains(" evmm.test=net evmm.args=link,eth0,"),
            "{argv}"
        );
        assert!(argv.ends_with("mac=52:54:00:12:34:56"), "{argv}");
        let argv = evmm_net_guest(&checks, "tap1", &["mac=52:54:00:00:00:01"])
            .argv(&images)
            .join(" ");
        assert!(argv.starts_with("evmm --kernel /o/vmlinuz "), "{argv}");
        assert!(
            argv.ends_with(" --net tap=tap1,mac=52:54:00:00:00:01"),
            "{argv}"
        );
    }

    #[test]
    fn the_run_script() {
        let peer = NetPlan::new().ping(Side::L1, 3, None).peer;
        let mut run = NetRun::new(vec!["vmm".into(), "--opt".into(), "a b".into()], peer);
        run.tap.mtu = 9000;
        run.tap.multi_queue = true;
        let s = run.script();
        assert!(
            s.contains("evmm-net-peer up evmmtap0 198.18.0.1/24 9000 multi_queue; then"),
            "{s}"
        );
        assert!(
            s.contains("EVMM_NET_WAIT=180 setsid evmm-net-peer run barrier 5201 + ping 198.18.0.2 3 + barrier 5202 >"),
            "{s}"
        );
        assert!(s.contains("timeout -s KILL 600 vmm --opt 'a b'\n"), "{s}");
        assert!(s.contains("[ $i -lt 300 ]"), "{s}");
        assert!(
            s.contains("then evmm-net-peer show evmmtap0; evmm-net-peer down evmmtap0; else"),
            "{s}"
        );
        assert!(!s.contains("PATH="));
        let direct = run.for_route(&Route::Direct {
            probe: "ring 0 native".into(),
        });
        let s = direct.script();
        assert!(s.starts_with("PATH="), "{s}");
        assert!(s.contains("guest-images/l1/net-peer up evmmtap0"), "{s}");
    }

    /// The script runs under sh with stand-ins for the peer and the VMM and prints its
    /// markers in order.
    #[test]
    fn the_run_script_runs() {
        let dir = tempfile::tempdir().unwrap();
        let peer = dir.path().join("peer");
        std::fs::write(
            &peer,
            "#!/bin/sh\ncase $1 in run) shift; echo \"EVMM-NET-CHECK side=l1 check=$1 status=0\";; \
             show) echo \"EVMM-NET-STATS side=l1 iface=$2 rx_packets=5\";; esac\nexit 0\n",
        )
        .unwrap();
        let mut perms = std::fs::metadata(&peer).unwrap().permissions();
        std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o755);
        std::fs::set_permissions(&peer, perms).unwrap();
        let mut run = NetRun::new(
            vec![
                "sh".into(),
                "-c".into(),
                "echo EVMM-NET-CHECK side=guest check=ping status=0; exit 3".into(),
            ],
            vec![Check::Sleep { seconds: 0 }],
        );
        run.peer_command = peer.display().to_string();
        // An interface every host has, so the counters are read at the end.
        run.tap.name = "lo".into();
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(run.script())
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        let text = String::from_utf8_lossy(&out.stdout);
        let parsed = NetOutput::parse(&text);
        assert_eq!(parsed.vmm_status, Some(3), "{text}");
        assert_eq!(parsed.peer_status, Some(0), "{text}");
        assert!(!parsed.peer_hung);
        assert_eq!(parsed.passed(Side::Guest), 1);
        assert_eq!(parsed.passed(Side::L1), 1);
        assert_eq!(parsed.stats.len(), 1);
        assert_eq!(parsed.problems(), vec!["the VMM exited 3".to_string()]);
    }

    const OUTPUT: &str = "\
EVMM-GUEST-START kernel=6.1.0-50-amd64\r
EVMM-NET-LINK side=guest iface=eth0 mac=52:54:00:12:34:56 expected_mac=52:54:00:12:34:56 carrier=1 operstate=up mtu=1500 ok=1\r
EVMM-NET-CHECK side=guest check=link status=0\r
EVMM-NET-PING side=guest dst=198.18.0.1 size=56 df=1 sent=3 received=3 lost=0 attempts=1 min_us=300 p50_us=410 max_us=500 ok=1\r
EVMM-NET-SHA256 side=guest dir=recv port=5203 peer=198.18.0.1 bytes=67108864 expected=67108864 sha256=aa bad_bytes=0 ok=1 seconds=3.000 mbit_s=178.9\r
EVMM-NET-SHA256 side=guest dir=send port=5204 peer=198.18.0.1 bytes=67108864 expected=67108864 sha256=bb bad_bytes=0 ok=1 seconds=3.000 mbit_s=178.9\r
EVMM-NET-UDP-RR side=guest dst=198.18.0.1 port=5207 size=64 count=100 received=100 lost=0 p50_us=120.5 p90_us=150.0 p99_us=300.2 min_us=1 max_us=400 mean_us=130 ok=1\r
EVMM-NET-CHECK side=guest check=udp-rr status=1\r
EVMM-TEST-RESULT name=net status=1\r
EVMM-NET-VMM-EXIT status=0
EVMM-NET-PING side=l1 dst=198.18.0.2 size=8000 df=1 sent=2 received=2 lost=0 attempts=1 min_us=1 p50_us=900 max_us=1000 ok=1
EVMM-NET-SHA256 side=l1 dir=send port=5203 peer=198.18.0.2 bytes=67108864 expected=67108864 sha256=aa bad_bytes=0 ok=1 seconds=3.100 mbit_s=173.2
EVMM-NET-SHA256 side=l1 dir=recv port=5204 peer=198.18.0.2 bytes=67108864 expected=67108864 sha256=bc bad_bytes=5 ok=0 seconds=3.100 mbit_s=173.2
EVMM-NET-SHA256 side=l1 dir=recv port=5299 peer=- bytes=0 expected=1048576 sha256=e3 bad_bytes=0 ok=0 seconds=0.000 mbit_s=0.0 error=no_connection
EVMM-NET-IPERF3 side=l1 role=server target=5208 status=0 sender_kbit_s=- receiver_kbit_s=250000 retransmits=- ok=1
EVMM-NET-UDP-FLOOD side=l1 dst=198.18.0.2 port=5209 size=1024 sent=50000 errors=0 seconds=3.000 pps=16666 mbit_s=136.5 ok=1
EVMM-NET-UDP-SINK side=guest port=5209 received=1200 bytes=1228800 seconds=3.000 delay_us=1000 ok=1
EVMM-NET-PEER-EXIT status=0
EVMM-NET-STATS side=l1 iface=evmmtap0 rx_packets=10 tx_packets=12
";

    #[test]
    fn parses_a_run() {
        let o = NetOutput::parse(OUTPUT);
        assert_eq!(o.links.len(), 1);
        assert!(o.links[0].ok && o.links[0].carrier);
        assert_eq!(o.links[0].mac, DEFAULT_MAC);
        assert_eq!(o.links[0].mtu, 1500);
        let p = o.ping_from(Side::Guest, None).unwrap();
        assert_eq!((p.sent, p.received, p.ok), (3, 3, true));
        assert_eq!(p.p50_us, 410.0);
        let big = o.ping_from(Side::L1, Some(8000)).unwrap();
        assert_eq!(big.dst, "198.18.0.2");
        assert!(o.ping_from(Side::L1, None).is_none());

        let pairs = o.transfer_pairs();
        assert_eq!(pairs.len(), 2);
        let to_guest = o.transfer_from(Side::L1, 64 << 20).unwrap();
        assert_eq!(to_guest.receiver.side, Side::Guest);
        assert!(to_guest.matched());
        let from_guest = o.transfer_from(Side::Guest, 64 << 20).unwrap();
        assert!(
            !from_guest.matched(),
            "digests differ and the receiver failed"
        );
        assert_eq!(from_guest.receiver.bad_bytes, 5);
        let unpaired = o.unpaired_transfers();
        assert_eq!(unpaired.len(), 1);
        assert_eq!(unpaired[0].error.as_deref(), Some("no_connection"));

        assert_eq!(o.udp_rr[0].p99_us, 300.2);
        assert_eq!(o.udp_rr[0].count, 100);
        assert_eq!(o.iperf3[0].receiver_kbit_s, Some(250000.0));
        assert_eq!(o.iperf3[0].sender_kbit_s, None);
        assert_eq!(o.floods[0].packets, 50000);
        assert_eq!(o.sinks[0].packets, 1200);
        assert_eq!(o.sinks[0].side, Side::Guest);
        assert_eq!(o.vmm_status, Some(0));
        assert_eq!(o.peer_status, Some(0));
        assert_eq!(o.failed_checks(), vec!["guest:udp-rr=1".to_string()]);
        assert_eq!(
            o.problems(),
            vec!["check guest:udp-rr=1 failed".to_string()]
        );
        assert_eq!(o.stats[0].1["rx_packets"], "10");
        assert_eq!(side_fields(OUTPUT, "EVMM-NET-SHA256", Side::L1).len(), 3);
    }

    #[test]
    fn missing_exit_lines_are_problems() {
        let o = NetOutput::parse("EVMM-NET-PEER-HUNG\nEVMM-NET-RUN-ERROR error=tap-setup\n");
        let p = o.problems();
        assert!(p.iter().any(|p| p.contains("tap-setup")), "{p:?}");
        assert!(p.iter().any(|p| p.contains("no VMM exit status")), "{p:?}");
        assert!(p.iter().any(|p| p.contains("killed")), "{p:?}");
    }

    #[test]
    fn a_guest_that_ends_mid_checks_with_the_vmm_exiting_0_ended_silently() {
        // The shape of a CI failure (2026-12-01, QEMU microvm): the guest's checks
        // stop after `recv`, QEMU exits 0, the peer waits for the next transfer.
        let cut = "EVMM-GUEST-START kernel=6.1.0-50-amd64\n\
                   EVMM-NET-CHECK side=guest check=recv status=0\n\
                   EVMM-NET-VMM-EXIT status=0\n\
                   EVMM-NET-PEER-HUNG\n\
                   EVMM-NET-CHECK side=l1 check=send status=0\n\
                   EVMM-NET-PEER-EXIT status=137\n";
        let console = crate::GuestConsole::parse(cut);
        assert!(NetOutput::parse(cut).guest_ended_silently(&console));

        // Not when the guest printed its result, a check failed, or the VMM failed.
        let finished = format!("{cut}EVMM-TEST-RESULT name=net status=0\n");
        let console = crate::GuestConsole::parse(&finished);
        assert!(!NetOutput::parse(&finished).guest_ended_silently(&console));
        let failed = cut.replace("check=recv status=0", "check=recv status=1");
        let console = crate::GuestConsole::parse(&failed);
        assert!(!NetOutput::parse(&failed).guest_ended_silently(&console));
        let killed = cut.replace("VMM-EXIT status=0", "VMM-EXIT status=137");
        let console = crate::GuestConsole::parse(&killed);
        assert!(!NetOutput::parse(&killed).guest_ended_silently(&console));
        let never = "EVMM-NET-VMM-EXIT status=0\n";
        let console = crate::GuestConsole::parse(never);
        assert!(!NetOutput::parse(never).guest_ended_silently(&console));
    }

    #[test]
    fn sides() {
        assert_eq!(Side::parse("l1"), Some(Side::L1));
        assert_eq!(Side::parse("host"), None);
        assert_eq!(Side::Guest.other().ip(), HOST_IP);
        assert_eq!(Side::L1.as_str(), "l1");
    }
}
