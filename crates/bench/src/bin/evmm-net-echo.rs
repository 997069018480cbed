//! `evmm-net-echo IFACE [--frames N] [--idle-seconds S]`: the far end of the
//! network notify-latency benchmark. On IFACE (the tap a VMM's virtio-net device is
//! attached to, seen from the host's side) it answers every probe frame of the notify
//! guest at once, from a raw packet socket: a UDP/IPv4 frame to port 7 whose payload
//! starts with `EVMMNET1` goes back with its Ethernet addresses, IPv4 addresses and
//! UDP ports swapped (the checksums stay valid). Anything else is ignored, and the
//! host's IP stack plays no part.
//!
//! Its own share of each round trip is measured: from the kernel's receive timestamp
//! of the frame (`SO_TIMESTAMPNS`, taken as the tap's write enters the stack) until
//! the answer's `send` returned (the answer is then queued on the tap for the VMM).
//! Prints `NET-ECHO-READY iface=` once listening and, at the end (after N frames, S
//! idle seconds, or SIGTERM/SIGINT), `NET-ECHO frames= ignored= share_ns_p50= p90=
//! p99= mean=` on stdout. Exit status 0; 1 with an `error:` line when the socket
//! cannot be set up.

use clap::Parser;
use std::ffi::CString;
use std::io;
use std::mem::size_of;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// The guest's probe: UDP to this port, payload starting with [`MAGIC`].
const ECHO_PORT: u16 = 7;
const MAGIC: &[u8; 8] = b"EVMMNET1";

#[derive(Debug, Parser)]
#[command(name = "evmm-net-echo", version)]
struct Cli {
    /// The interface (a tap) to answer on.
    iface: String,
    /// Stop after answering this many frames.
    #[arg(long)]
    frames: Option<u64>,
    /// Stop after this many seconds without a probe frame.
    #[arg(long, default_value_t = 600)]
    idle_seconds: u64,
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match run(&cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: &Cli) -> io::Result<()> {
    for sig in [libc::SIGTERM, libc::SIGINT] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        if unsafe { libc::signal(sig, on_signal as *const () as libc::sighandler_t) }
            == libc::SIG_ERR
        {
            return Err(io::Error::last_os_error());
        }
    }
    let sock = bind_packet_socket(&cli.iface)?;
    println!("NET-ECHO-READY iface={}", cli.iface);
    let mut shares: Vec<u64> = Vec::new();
    let mut ignored = 0u64;
    let mut frame = [0u8; 2048];
    let mut last = Instant::now();
    while !STOP.load(Ordering::Relaxed)
        && cli.frames.is_none_or(|n| (shares.len() as u64) < n)
        && last.elapsed() < Duration::from_secs(cli.idle_seconds)
    {
        let (len, outgoing, rx_ns) = match receive(&sock, &mut frame) {
            Ok(r) => r,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) =>
            {
                continue
            }
            Err(e) => return Err(e),
        };
        if outgoing {
            continue;
        }
        if !answer_in_place(&mut frame[..len]) {
            ignored += 1;
            continue;
        }
        // SAFETY: sends `len` initialised bytes of `frame` on a socket this function owns.
        let sent = unsafe { libc::send(sock.as_raw_fd(), frame.as_ptr().cast(), len, 0) };
        let done = realtime_ns();
        if sent < 0 {
            log_send_error(io::Error::last_os_error());
            continue;
        }
        if let Some(rx) = rx_ns {
            shares.push(done.saturating_sub(rx));
        }
        last = Instant::now();
    }
    println!("{}", summary_line(&mut shares, ignored));
    Ok(())
}

fn log_send_error(e: io::Error) {
    eprintln!("evmm-net-echo: send: {e}");
}

/// `NET-ECHO frames= ignored= share_ns_p50= ...` for the shares seen.
fn summary_line(shares: &mut [u64], ignored: u64) -> String {
    shares.sort_unstable();
    let pct = |p: usize| -> u64 {
        if shares.is_empty() {
            return 0;
        }
        let rank = (p * shares.len()).div_ceil(100).clamp(1, shares.len());
        shares[rank - 1]
    };
    let mean = if shares.is_empty() {
        0
    } else {
        shares.iter().sum::<u64>() / shares.len() as u64
    };
    format!(
        "NET-ECHO frames={} ignored={ignored} share_ns_p50={} share_ns_p90={} share_ns_p99={} share_ns_mean={mean}",
        shares.len(),
        pct(50),
        pct(90),
        pct(99)
    )
}

/// Turns a probe frame into its answer (addresses and ports swapped); false for any
/// other frame, which is left as it was.
fn answer_in_place(f: &mut [u8]) -> bool {
    const ETH: usize = 14;
    if f.len() < ETH + 20 + 8 + MAGIC.len() || f[12..14] != [0x08, 0x00] {
        return false;
    }
    let ihl = usize::from(f[ETH] & 0x0f) * 4;
    if f[ETH] >> 4 != 4 || ihl < 20 || f[ETH + 9] != 17 {
        return false;
    }
    let udp = ETH + ihl;
    let payload = udp + 8;
    if f.len() < payload + MAGIC.len()
        || u16::from_be_bytes([f[udp + 2], f[udp + 3]]) != ECHO_PORT
        || &f[payload..payload + MAGIC.len()] != MAGIC
    {
        return false;
    }
    for i in 0..6 {
        f.swap(i, 6 + i);
    }
    for i in 0..4 {
        f.swap(ETH + 12 + i, ETH + 16 + i);
    }
    for i in 0..2 {
        f.swap(udp + i, udp + 2 + i);
    }
    true
}

/// A raw packet socket bound to `iface`, every protocol, with receive timestamps and a
/// 200 ms receive timeout (so that a stop request is seen).
fn bind_packet_socket(iface: &str) -> io::Result<OwnedFd> {
    let name = CString::new(iface).map_err(|_| io::Error::other("the interface name has a NUL"))?;
    // SAFETY: if_nametoindex reads a NUL-terminated string.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if index == 0 {
        return Err(io::Error::other(format!(
            "no interface {iface}: {}",
            io::Error::last_os_error()
        )));
    }
    let proto = (libc::ETH_P_ALL as u16).to_be();
    // SAFETY: plain socket(2); the descriptor is owned right after.
    let fd = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            i32::from(proto),
        )
    };
    if fd < 0 {
        return Err(io::Error::other(format!(
            "cannot open a packet socket (needs CAP_NET_RAW): {}",
            io::Error::last_os_error()
        )));
    }
    // SAFETY: fd is a fresh descriptor nobody else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_ll is plain data; all-zero is a valid start.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_protocol = proto;
    addr.sll_ifindex = index as i32;
    // SAFETY: binds the owned socket to a sockaddr_ll of the size given.
    let rc = unsafe {
        libc::bind(
            sock.as_raw_fd(),
            (&addr as *const libc::sockaddr_ll).cast(),
            size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    set_option(&sock, libc::SO_TIMESTAMPNS, &1i32)?;
    let timeout = libc::timeval {
        tv_sec: 0,
        tv_usec: 200_000,
    };
    set_option(&sock, libc::SO_RCVTIMEO, &timeout)?;
    Ok(sock)
}

fn set_option<T>(sock: &OwnedFd, name: libc::c_int, value: &T) -> io::Result<()> {
    // SAFETY: `value` is a live T of the size passed.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            name,
            (value as *const T).cast(),
            size_of::<T>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// One frame: its length, whether this host sent it (an outgoing copy), and the
/// kernel's receive timestamp in CLOCK_REALTIME ns when there was one.
fn receive(sock: &OwnedFd, buf: &mut [u8]) -> io::Result<(usize, bool, Option<u64>)> {
    // SAFETY: plain-data structures, zero is a valid start for each.
    let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    let mut control = [0u64; 16];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: as above.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_name = (&mut from as *mut libc::sockaddr_ll).cast();
    msg.msg_namelen = size_of::<libc::sockaddr_ll>() as libc::socklen_t;
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = size_of::<[u64; 16]>();
    // SAFETY: every pointer in `msg` refers to a live buffer of the size given.
    let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut rx = None;
    // SAFETY: walks the control messages the kernel wrote into `control`, within
    // msg_controllen; a timestamp's data is a timespec.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_TIMESTAMPNS {
                let ts = std::ptr::read_unaligned(libc::CMSG_DATA(c) as *const libc::timespec);
                rx = Some(ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64);
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    let outgoing = from.sll_pkttype == libc::PACKET_OUTGOING;
    Ok((n as usize, outgoing, rx))
}

fn realtime_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_REALTIME, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A probe frame as the notify guest builds it (sequence `seq`).
    fn probe(seq: u64) -> Vec<u8> {
        let mut f = Vec::new();
        f.extend([2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 2, 0x08, 0x00]);
        f.extend([0x45, 0, 0, 46, 0, 1, 0, 0, 64, 17, 0, 0]);
        f.extend([198, 18, 0, 2, 198, 18, 0, 1]);
        f.extend(40000u16.to_be_bytes());
        f.extend(ECHO_PORT.to_be_bytes());
        f.extend(26u16.to_be_bytes());
        f.extend([0, 0]);
        f.extend(MAGIC);
        f.extend(seq.to_le_bytes());
        f.extend([0, 0]);
        f
    }

    #[test]
    fn a_probe_is_answered_with_everything_swapped() {
        let mut f = probe(9);
        assert_eq!(f.len(), 60);
        assert!(answer_in_place(&mut f));
        assert_eq!(&f[0..12], &[2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1]);
        assert_eq!(&f[26..34], &[198, 18, 0, 1, 198, 18, 0, 2]);
        assert_eq!(u16::from_be_bytes([f[34], f[35]]), ECHO_PORT);
        assert_eq!(u16::from_be_bytes([f[36], f[37]]), 40000);
        assert_eq!(&f[42..50], MAGIC);
        assert_eq!(u64::from_le_bytes(f[50..58].try_into().unwrap()), 9);
    }

    #[test]
    fn other_frames_are_left_alone() {
        let good = probe(1);
        let mut cases = vec![good[..40].to_vec()];
        let mut arp = good.clone();
        arp[12..14].copy_from_slice(&[0x08, 0x06]);
        cases.push(arp);
        let mut tcp = good.clone();
        tcp[23] = 6;
        cases.push(tcp);
        let mut port = good.clone();
        port[37] = 8;
        cases.push(port);
        let mut magic = good.clone();
        magic[42] = b'X';
        cases.push(magic);
        let mut ipv6 = good.clone();
        ipv6[14] = 0x65;
        cases.push(ipv6);
        for mut c in cases {
            let before = c.clone();
            assert!(!answer_in_place(&mut c));
            assert_eq!(c, before);
        }
    }

    #[test]
    fn the_summary_has_nearest_rank_percentiles() {
        let mut shares: Vec<u64> = (1..=100).rev().collect();
        assert_eq!(
            summary_line(&mut shares, 3),
            "NET-ECHO frames=100 ignored=3 share_ns_p50=50 share_ns_p90=90 share_ns_p99=99 share_ns_mean=50"
        );
        assert!(summary_line(&mut [], 0).starts_with("NET-ECHO frames=0 ignored=0 share_ns_p50=0"));
    }
}
