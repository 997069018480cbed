//! Network checks for a virtio-net device, run in the guest and, as its peer, in the
//! nested host (L1) on the tap the VMM is attached to: the same program on both ends.
//!
//! Each check prints one `EVMM-NET-...` line of `key=value` fields, the first of which
//! is `side=` (`guest`, or what `$EVMM_NET_SIDE` says: the L1 peer sets `l1`), and
//! says whether it passed. Where a check needs the other end (a ping, a TCP
//! connection, a UDP request), it first waits for it up to `$EVMM_NET_WAIT` seconds
//! (default 120): the guest boots while the peer is already running, and the checks
//! on the two sides rendezvous by retrying, or explicitly with `barrier`.
//!
//! TCP transfers carry a deterministic pseudo-random stream (splitmix64 of the byte
//! offset and a seed), so the receiver checks every byte, and both ends print the
//! SHA-256 of what they sent or received.

use sha2::{Digest, Sha256};
use std::error::Error;
use std::fs;
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Lower-case hexadecimal of `bytes`.
fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The environment variable that names the side in every line (default `guest`).
pub const SIDE_ENV: &str = "EVMM_NET_SIDE";
/// The environment variable with the first-contact wait, in seconds.
pub const WAIT_ENV: &str = "EVMM_NET_WAIT";
/// The first-contact wait when `$EVMM_NET_WAIT` is not set.
pub const DEFAULT_WAIT: Duration = Duration::from_secs(120);
/// The seed of the TCP stream when a check names none.
pub const DEFAULT_SEED: u64 = 1;
/// Bytes in a MiB.
pub const MIB: u64 = 1024 * 1024;
/// How long a TCP transfer may make no progress before it fails.
const STALL_LIMIT: Duration = Duration::from_secs(60);
/// What the UDP request/response client sends at the end to stop the echo server.
const UDP_STOP: &[u8] = b"EVMM-NET-STOP";

/// The side this program reports as: `$EVMM_NET_SIDE`, else `guest`.
pub fn side() -> String {
    std::env::var(SIDE_ENV)
        .ok()
        .filter(|s| !s.is_empty() && !s.contains(char::is_whitespace))
        .unwrap_or_else(|| "guest".into())
}

/// How long to wait for the other end to appear: `$EVMM_NET_WAIT` seconds, else
/// [`DEFAULT_WAIT`].
pub fn first_contact_wait() -> Duration {
    std::env::var(WAIT_ENV)
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .filter(|s| *s > 0.0)
        .map(Duration::from_secs_f64)
        .unwrap_or(DEFAULT_WAIT)
}

/// An error text as one `key=value`-safe word.
fn word(text: &str) -> String {
    text.chars()
        .map(|c| {
            if c.is_whitespace() || c == '=' {
                '_'
            } else {
                c
            }
        })
        .collect()
}

fn error_field(error: &Option<String>) -> String {
    error
        .as_ref()
        .map(|e| format!(" error={}", word(e)))
        .unwrap_or_default()
}

fn flag(b: bool) -> u8 {
    u8::from(b)
}

// --- the deterministic stream ------------------------------------------------------

/// Word `index` of the stream `seed` (splitmix64).
pub fn stream_word(seed: u64, index: u64) -> u64 {
    let mut z = seed
        .wrapping_add(index.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15))
        .wrapping_mul(0xD1B5_4A32_D192_ED03);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Fills `buf` with the stream `seed` from byte `offset` on (little-endian words).
pub fn fill_stream(seed: u64, offset: u64, buf: &mut [u8]) {
    let mut off = offset;
    let mut i = 0;
    while i < buf.len() {
        let start = (off % 8) as usize;
        let n = (8 - start).min(buf.len() - i);
        let bytes = stream_word(seed, off / 8).to_le_bytes();
        buf[i..i + n].copy_from_slice(&bytes[start..start + n]);
        i += n;
        off += n as u64;
    }
}

/// The SHA-256 (hex) of the first `len` bytes of the stream `seed`.
pub fn stream_sha256(seed: u64, len: u64) -> String {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut off = 0;
    while off < len {
        let n = (len - off).min(buf.len() as u64) as usize;
        fill_stream(seed, off, &mut buf[..n]);
        h.update(&buf[..n]);
        off += n as u64;
    }
    hex(h.finalize().as_slice())
}

/// Checks received data against the stream as it arrives.
struct Verifier {
    seed: u64,
    offset: u64,
    scratch: Vec<u8>,
    bad_bytes: u64,
}

impl Verifier {
    fn new(seed: u64) -> Self {
        Self {
            seed,
            offset: 0,
            scratch: Vec::new(),
            bad_bytes: 0,
        }
    }

    fn check(&mut self, data: &[u8]) {
        self.scratch.resize(data.len(), 0);
        fill_stream(self.seed, self.offset, &mut self.scratch);
        self.bad_bytes += data
            .iter()
            .zip(&self.scratch)
            .filter(|(a, b)| a != b)
            .count() as u64;
        self.offset += data.len() as u64;
    }
}

// --- TCP ------------------------------------------------------------------------------

/// Connects to `addr`, retrying until `wait` has passed (the other end may not be
/// listening yet, or not even up).
pub fn connect_retry(addr: SocketAddrV4, wait: Duration) -> io::Result<TcpStream> {
    let deadline = Instant::now() + wait;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match TcpStream::connect_timeout(
            &SocketAddr::V4(addr),
            left.clamp(Duration::from_millis(100), Duration::from_secs(3)),
        ) {
            Ok(s) => return Ok(s),
            Err(e) if Instant::now() >= deadline => {
                return Err(io::Error::new(
                    e.kind(),
                    format!("no connection to {addr} within {wait:?}: {e}"),
                ))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(250)),
        }
    }
}

/// Listens on `port` (all addresses) and accepts one connection within `wait`.
pub fn accept_one(port: u16, wait: Duration) -> io::Result<(TcpStream, SocketAddr)> {
    let listener = TcpListener::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port))?;
    accept_within(&listener, wait)
}

fn accept_within(listener: &TcpListener, wait: Duration) -> io::Result<(TcpStream, SocketAddr)> {
    listener.set_nonblocking(true)?;
    let deadline = Instant::now() + wait;
    loop {
        match listener.accept() {
            Ok((s, peer)) => {
                s.set_nonblocking(false)?;
                return Ok((s, peer));
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("no connection within {wait:?}"),
                    ));
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => return Err(e),
        }
    }
}

/// Which way a transfer went, seen from the side that reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dir {
    /// This side sent.
    Send,
    /// This side received.
    Recv,
}

impl Dir {
    /// `send` or `recv`.
    pub fn as_str(self) -> &'static str {
        match self {
            Dir::Send => "send",
            Dir::Recv => "recv",
        }
    }
}

/// One end of a TCP transfer of the stream.
#[derive(Debug, Clone)]
pub struct Transfer {
    /// This end's direction.
    pub dir: Dir,
    /// The listening port.
    pub port: u16,
    /// The other end's address (empty when there was no connection).
    pub peer: String,
    /// Bytes the transfer was to carry.
    pub expected: u64,
    /// Bytes sent or received.
    pub bytes: u64,
    /// SHA-256 of those bytes.
    pub sha256: String,
    /// Received bytes that differ from the stream (0 for the sender).
    pub bad_bytes: u64,
    /// From the connection to the end (the receiver's close, for the sender).
    pub seconds: f64,
    /// What went wrong, if anything did.
    pub error: Option<String>,
}

impl Transfer {
    fn new(dir: Dir, port: u16, expected: u64) -> Self {
        Self {
            dir,
            port,
            peer: String::new(),
            expected,
            bytes: 0,
            sha256: hex(Sha256::new().finalize().as_slice()),
            bad_bytes: 0,
            seconds: 0.0,
            error: None,
        }
    }

    /// All bytes went across intact.
    pub fn ok(&self) -> bool {
        self.error.is_none() && self.bytes == self.expected && self.bad_bytes == 0
    }

    /// Throughput in Mbit/s.
    pub fn mbit_s(&self) -> f64 {
        if self.seconds > 0.0 {
            self.bytes as f64 * 8.0 / self.seconds / 1e6
        } else {
            0.0
        }
    }

    /// The `EVMM-NET-SHA256` line.
    pub fn line(&self, side: &str) -> String {
        format!(
            "EVMM-NET-SHA256 side={side} dir={} port={} peer={} bytes={} expected={} sha256={} bad_bytes={} ok={} seconds={:.3} mbit_s={:.1}{}",
            self.dir.as_str(),
            self.port,
            if self.peer.is_empty() { "-" } else { &self.peer },
            self.bytes,
            self.expected,
            self.sha256,
            self.bad_bytes,
            flag(self.ok()),
            self.seconds,
            self.mbit_s(),
            error_field(&self.error)
        )
    }
}

const CHUNK: usize = 256 * 1024;

/// Connects to `dst:port` (retrying up to `wait`) and sends `len` bytes of the stream
/// `seed`, then waits for the receiver to close.
pub fn tcp_send(dst: Ipv4Addr, port: u16, len: u64, seed: u64, wait: Duration) -> Transfer {
    let mut t = Transfer::new(Dir::Send, port, len);
    let mut stream = match connect_retry(SocketAddrV4::new(dst, port), wait) {
        Ok(s) => s,
        Err(e) => {
            t.error = Some(e.to_string());
            return t;
        }
    };
    t.peer = dst.to_string();
    let started = Instant::now();
    let mut sha = Sha256::new();
    let result = (|| -> io::Result<()> {
        stream.set_write_timeout(Some(STALL_LIMIT))?;
        stream.set_read_timeout(Some(STALL_LIMIT))?;
        let mut buf = vec![0u8; CHUNK];
        while t.bytes < len {
            let n = (len - t.bytes).min(CHUNK as u64) as usize;
            fill_stream(seed, t.bytes, &mut buf[..n]);
            stream.write_all(&buf[..n])?;
            sha.update(&buf[..n]);
            t.bytes += n as u64;
        }
        stream.shutdown(Shutdown::Write)?;
        // The receiver closes once it has read everything.
        let mut sink = [0u8; 64];
        while stream.read(&mut sink)? > 0 {}
        Ok(())
    })();
    t.seconds = started.elapsed().as_secs_f64();
    t.sha256 = hex(sha.finalize().as_slice());
    if let Err(e) = result {
        t.error = Some(format!("after {} bytes: {e}", t.bytes));
    }
    t
}

/// Listens on `port`, accepts one connection within `wait` and receives the stream
/// `seed` until the sender closes, checking every byte; `len` bytes are expected.
pub fn tcp_recv(port: u16, len: u64, seed: u64, wait: Duration) -> Transfer {
    let listener = TcpListener::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port));
    tcp_recv_on(listener, len, seed, wait)
}

fn tcp_recv_on(listener: io::Result<TcpListener>, len: u64, seed: u64, wait: Duration) -> Transfer {
    let port = listener
        .as_ref()
        .ok()
        .and_then(|l| l.local_addr().ok())
        .map(|a| a.port())
        .unwrap_or(0);
    let mut t = Transfer::new(Dir::Recv, port, len);
    let (mut stream, peer) = match listener.and_then(|l| accept_within(&l, wait)) {
        Ok(x) => x,
        Err(e) => {
            t.error = Some(e.to_string());
            return t;
        }
    };
    t.peer = peer.ip().to_string();
    let started = Instant::now();
    let mut sha = Sha256::new();
    let mut verifier = Verifier::new(seed);
    let result = (|| -> io::Result<()> {
        stream.set_read_timeout(Some(STALL_LIMIT))?;
        let mut buf = vec![0u8; CHUNK];
        loop {
            let n = match stream.read(&mut buf) {
                Ok(0) => return Ok(()),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            sha.update(&buf[..n]);
            verifier.check(&buf[..n]);
            t.bytes += n as u64;
        }
    })();
    t.seconds = started.elapsed().as_secs_f64();
    t.sha256 = hex(sha.finalize().as_slice());
    t.bad_bytes = verifier.bad_bytes;
    if let Err(e) = result {
        t.error = Some(format!("after {} bytes: {e}", t.bytes));
    }
    t
}

/// A rendezvous of the two sides: one listens on `port`, the other (`peer` given)
/// connects, retrying; each sends one byte and reads the other's. Returns the other
/// end's address.
pub fn barrier(peer: Option<Ipv4Addr>, port: u16, wait: Duration) -> io::Result<String> {
    let (mut stream, other) = match peer {
        Some(ip) => {
            let s = connect_retry(SocketAddrV4::new(ip, port), wait)?;
            (s, ip.to_string())
        }
        None => {
            let (s, a) = accept_one(port, wait)?;
            (s, a.ip().to_string())
        }
    };
    stream.set_read_timeout(Some(STALL_LIMIT))?;
    stream.write_all(b"B")?;
    let mut byte = [0u8; 1];
    stream.read_exact(&mut byte)?;
    Ok(other)
}

// --- ICMP echo --------------------------------------------------------------------------

/// The internet checksum of `data`.
pub fn inet_checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for pair in data.chunks(2) {
        let word = u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]);
        sum += u32::from(word);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An ICMP echo request with `id`, `seq` and `payload`.
pub fn echo_request(id: u16, seq: u16, payload: &[u8]) -> Vec<u8> {
    let mut p = Vec::with_capacity(8 + payload.len());
    p.extend_from_slice(&[8, 0, 0, 0]);
    p.extend_from_slice(&id.to_be_bytes());
    p.extend_from_slice(&seq.to_be_bytes());
    p.extend_from_slice(payload);
    let sum = inet_checksum(&p);
    p[2..4].copy_from_slice(&sum.to_be_bytes());
    p
}

/// Whether `packet` (an IPv4 packet as a raw socket reads it) is the echo reply to
/// `id`/`seq` carrying `payload`.
pub fn is_echo_reply(packet: &[u8], id: u16, seq: u16, payload: &[u8]) -> bool {
    let Some(&first) = packet.first() else {
        return false;
    };
    let ihl = usize::from(first & 0x0f) * 4;
    let Some(icmp) = packet.get(ihl..) else {
        return false;
    };
    icmp.len() == 8 + payload.len()
        && icmp[0] == 0
        && icmp[1] == 0
        && icmp[4..6] == id.to_be_bytes()
        && icmp[6..8] == seq.to_be_bytes()
        && &icmp[8..] == payload
}

/// A raw ICMP socket with the don't-fragment bit on everything it sends
/// (IP_PMTUDISC_DO: a packet larger than the route's MTU fails with EMSGSIZE
/// instead of going out in fragments).
struct IcmpSocket {
    fd: OwnedFd,
}

impl IcmpSocket {
    fn open() -> io::Result<Self> {
        // SAFETY: socket() takes no pointers; the result is checked before use.
        let raw = unsafe {
            libc::socket(
                libc::AF_INET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::IPPROTO_ICMP,
            )
        };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: raw is a descriptor just returned by socket() and owned by nothing else.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let value: libc::c_int = libc::IP_PMTUDISC_DO;
        // SAFETY: the option value is a c_int that lives across the call, with its size.
        let rc = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::IPPROTO_IP,
                libc::IP_MTU_DISCOVER,
                (&value as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Self { fd })
    }

    fn send_to(&self, packet: &[u8], dst: Ipv4Addr) -> io::Result<()> {
        let addr = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: 0,
            sin_addr: libc::in_addr {
                s_addr: u32::from_ne_bytes(dst.octets()),
            },
            sin_zero: [0; 8],
        };
        // SAFETY: packet and addr are valid for the lengths given for the whole call.
        let n = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                packet.as_ptr().cast(),
                packet.len(),
                0,
                (&addr as *const libc::sockaddr_in).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
            )
        };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }

    /// Reads packets until the reply to `id`/`seq` arrives (true) or `deadline` passes.
    fn wait_reply(&self, id: u16, seq: u16, payload: &[u8], deadline: Instant) -> io::Result<bool> {
        let mut buf = vec![0u8; 65536];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(false);
            }
            let mut pfd = libc::pollfd {
                fd: self.fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            let ms = left.as_millis().clamp(1, 60_000) as libc::c_int;
            // SAFETY: pfd is one valid pollfd for the duration of the call.
            let rc = unsafe { libc::poll(&mut pfd, 1, ms) };
            if rc < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if rc == 0 {
                continue;
            }
            // SAFETY: buf is valid for buf.len() bytes of writes during the call.
            let n = unsafe {
                libc::recv(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) {
                    continue;
                }
                return Err(e);
            }
            if is_echo_reply(&buf[..n as usize], id, seq, payload) {
                return Ok(true);
            }
        }
    }
}

/// What a ping run found.
#[derive(Debug, Clone)]
pub struct PingReport {
    /// Where the echoes went.
    pub dst: Ipv4Addr,
    /// ICMP payload bytes per echo (the IP packet is 28 bytes longer).
    pub size: usize,
    /// Echo requests sent after the first contact.
    pub sent: u32,
    /// Their replies.
    pub received: u32,
    /// Round-trip times of the replies, µs.
    pub rtts_us: Vec<f64>,
    /// Probes sent until the first reply (the other end coming up).
    pub attempts: u32,
    /// What went wrong, if anything did.
    pub error: Option<String>,
}

impl PingReport {
    /// Every counted echo came back.
    pub fn ok(&self) -> bool {
        self.error.is_none() && self.sent > 0 && self.received == self.sent
    }

    /// The `EVMM-NET-PING` line.
    pub fn line(&self, side: &str) -> String {
        let s = Summary::of(&self.rtts_us);
        format!(
            "EVMM-NET-PING side={side} dst={} size={} df=1 sent={} received={} lost={} attempts={} min_us={:.0} p50_us={:.0} max_us={:.0} ok={}{}",
            self.dst,
            self.size,
            self.sent,
            self.received,
            self.sent - self.received,
            self.attempts,
            s.min,
            s.p50,
            s.max,
            flag(self.ok()),
            error_field(&self.error)
        )
    }
}

/// Sends ICMP echoes with `size` payload bytes and the don't-fragment bit to `dst`:
/// one a second until the first reply (at most `wait`), then `count` counted ones,
/// each waiting up to 2 s for its reply. Needs a raw socket (root).
pub fn ping(dst: Ipv4Addr, count: u32, size: usize, wait: Duration) -> PingReport {
    let mut r = PingReport {
        dst,
        size,
        sent: 0,
        received: 0,
        rtts_us: Vec::new(),
        attempts: 0,
        error: None,
    };
    let sock = match IcmpSocket::open() {
        Ok(s) => s,
        Err(e) => {
            r.error = Some(format!("raw ICMP socket: {e}"));
            return r;
        }
    };
    let id = (std::process::id() & 0xffff) as u16;
    let payload: Vec<u8> = (0..size).map(|i| (i * 31 + 7) as u8).collect();
    let mut seq: u16 = 0;
    let deadline = Instant::now() + wait;
    loop {
        seq = seq.wrapping_add(1);
        r.attempts += 1;
        let probe_end = Instant::now() + Duration::from_secs(1);
        match sock.send_to(&echo_request(id, seq, &payload), dst) {
            Ok(()) => match sock.wait_reply(id, seq, &payload, probe_end) {
                Ok(true) => break,
                Ok(false) => {}
                Err(e) => {
                    r.error = Some(e.to_string());
                    return r;
                }
            },
            Err(e) if e.raw_os_error() == Some(libc::EMSGSIZE) => {
                r.error = Some(format!("{e} (the packet is larger than the path MTU)"));
                return r;
            }
            // Unreachable until the other end answers ARP: go on probing.
            Err(_) => std::thread::sleep(probe_end.saturating_duration_since(Instant::now())),
        }
        if Instant::now() >= deadline {
            r.error = Some(format!("no reply within {wait:?}"));
            return r;
        }
    }
    for _ in 0..count {
        seq = seq.wrapping_add(1);
        r.sent += 1;
        let started = Instant::now();
        match sock.send_to(&echo_request(id, seq, &payload), dst) {
            Ok(()) => {}
            Err(e) => {
                r.error = Some(e.to_string());
                continue;
            }
        }
        match sock.wait_reply(id, seq, &payload, started + Duration::from_secs(2)) {
            Ok(true) => {
                r.received += 1;
                r.rtts_us.push(started.elapsed().as_secs_f64() * 1e6);
            }
            Ok(false) => {}
            Err(e) => r.error = Some(e.to_string()),
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    r
}

/// `InEchos` and `OutEchoReps` of the `Icmp:` lines of /proc/net/snmp.
pub fn icmp_echo_counts(snmp: &str) -> Option<(u64, u64)> {
    let mut lines = snmp.lines().filter(|l| l.starts_with("Icmp:"));
    let names: Vec<&str> = lines.next()?.split_whitespace().collect();
    let values: Vec<&str> = lines.next()?.split_whitespace().collect();
    let get = |name: &str| -> Option<u64> {
        let i = names.iter().position(|n| *n == name)?;
        values.get(i)?.parse().ok()
    };
    Some((get("InEchos")?, get("OutEchoReps")?))
}

/// Waits up to `wait` until this host has answered at least `min` echo requests
/// since boot; returns (InEchos, OutEchoReps).
pub fn pinged(min: u64, wait: Duration) -> io::Result<(u64, u64)> {
    let deadline = Instant::now() + wait;
    loop {
        let snmp = fs::read_to_string("/proc/net/snmp")?;
        let counts = icmp_echo_counts(&snmp).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                "no Icmp lines in /proc/net/snmp",
            )
        })?;
        if counts.1 >= min || Instant::now() >= deadline {
            return Ok(counts);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

// --- UDP --------------------------------------------------------------------------------

/// Percentiles of a series.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Summary {
    /// Smallest.
    pub min: f64,
    /// Median (nearest rank).
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Largest.
    pub max: f64,
    /// Mean.
    pub mean: f64,
}

impl Summary {
    /// The summary of `values` (all zero when empty).
    pub fn of(values: &[f64]) -> Self {
        if values.is_empty() {
            return Self::default();
        }
        let mut v = values.to_vec();
        v.sort_by(f64::total_cmp);
        let rank = |p: f64| {
            let i = ((p / 100.0) * v.len() as f64).ceil() as usize;
            v[i.clamp(1, v.len()) - 1]
        };
        Self {
            min: v[0],
            p50: rank(50.0),
            p90: rank(90.0),
            p99: rank(99.0),
            max: v[v.len() - 1],
            mean: v.iter().sum::<f64>() / v.len() as f64,
        }
    }
}

fn udp_bind(port: u16) -> io::Result<UdpSocket> {
    UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port))
}

/// What the UDP echo server did.
#[derive(Debug, Clone)]
pub struct UdpEchoReport {
    /// The port it served.
    pub port: u16,
    /// Requests echoed.
    pub packets: u64,
    /// Their bytes.
    pub bytes: u64,
    /// The client said it was done (else the server stopped on silence).
    pub stopped: bool,
}

impl UdpEchoReport {
    /// The `EVMM-NET-UDP-ECHO` line.
    pub fn line(&self, side: &str) -> String {
        format!(
            "EVMM-NET-UDP-ECHO side={side} port={} packets={} bytes={} stopped={} ok={}",
            self.port,
            self.packets,
            self.bytes,
            flag(self.stopped),
            flag(self.packets > 0)
        )
    }
}

/// Echoes UDP datagrams on `port` back to their sender until the client's stop
/// datagram, `wait` without a first datagram, or 10 s of silence after one.
pub fn udp_echo(port: u16, wait: Duration) -> io::Result<UdpEchoReport> {
    udp_echo_on(udp_bind(port)?, wait)
}

fn udp_echo_on(sock: UdpSocket, wait: Duration) -> io::Result<UdpEchoReport> {
    let mut r = UdpEchoReport {
        port: sock.local_addr()?.port(),
        packets: 0,
        bytes: 0,
        stopped: false,
    };
    sock.set_read_timeout(Some(Duration::from_millis(200)))?;
    let mut buf = vec![0u8; 65536];
    let mut last = Instant::now();
    loop {
        match sock.recv_from(&mut buf) {
            Ok((n, from)) => {
                last = Instant::now();
                if &buf[..n] == UDP_STOP {
                    r.stopped = true;
                    return Ok(r);
                }
                sock.send_to(&buf[..n], from)?;
                r.packets += 1;
                r.bytes += n as u64;
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                let limit = if r.packets == 0 {
                    wait
                } else {
                    Duration::from_secs(10)
                };
                if last.elapsed() >= limit {
                    return Ok(r);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// Request/response latency over UDP.
#[derive(Debug, Clone)]
pub struct UdpRrReport {
    /// The echo server.
    pub dst: SocketAddrV4,
    /// Datagram payload bytes.
    pub size: usize,
    /// Requests sent after the first contact.
    pub count: u32,
    /// Round-trip times of the answered ones, µs.
    pub rtts_us: Vec<f64>,
    /// What went wrong, if anything did.
    pub error: Option<String>,
}

impl UdpRrReport {
    /// Answers came back for at least 99 % of the requests.
    pub fn ok(&self) -> bool {
        let received = self.rtts_us.len() as u64;
        self.error.is_none() && received > 0 && received * 100 >= u64::from(self.count) * 99
    }

    /// The `EVMM-NET-UDP-RR` line.
    pub fn line(&self, side: &str) -> String {
        let s = Summary::of(&self.rtts_us);
        let received = self.rtts_us.len() as u32;
        format!(
            "EVMM-NET-UDP-RR side={side} dst={} port={} size={} count={} received={} lost={} p50_us={:.1} p90_us={:.1} p99_us={:.1} min_us={:.1} max_us={:.1} mean_us={:.1} ok={}{}",
            self.dst.ip(),
            self.dst.port(),
            self.size,
            self.count,
            received,
            self.count.saturating_sub(received),
            s.p50,
            s.p90,
            s.p99,
            s.min,
            s.max,
            s.mean,
            flag(self.ok()),
            error_field(&self.error)
        )
    }
}

/// Sends `count` requests of `size` bytes (at least 8) one after the other to the
/// UDP echo server at `dst`, each waiting up to 1 s for its answer, after a first
/// contact (a probe a second, at most `wait`); then tells the server to stop.
pub fn udp_rr(dst: SocketAddrV4, count: u32, size: usize, wait: Duration) -> UdpRrReport {
    let mut r = UdpRrReport {
        dst,
        size: size.max(8),
        count,
        rtts_us: Vec::new(),
        error: None,
    };
    let result = (|| -> io::Result<()> {
        let sock = udp_bind(0)?;
        sock.connect(dst)?;
        let mut req = vec![0u8; r.size];
        let mut buf = vec![0u8; 65536];
        // Each request carries its number; a late answer to an earlier one is skipped.
        let exchange =
            |seq: u64, req: &mut [u8], buf: &mut [u8], limit: Duration| -> io::Result<bool> {
                req[..8].copy_from_slice(&seq.to_le_bytes());
                let deadline = Instant::now() + limit;
                // ECONNREFUSED: an ICMP port unreachable for an earlier datagram.
                match sock.send(req) {
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => return Ok(false),
                    Err(e) => return Err(e),
                }
                loop {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Ok(false);
                    }
                    sock.set_read_timeout(Some(left))?;
                    match sock.recv(buf) {
                        Ok(n) if n == req.len() && buf[..8] == req[..8] => return Ok(true),
                        Ok(_) => {}
                        Err(e)
                            if matches!(
                                e.kind(),
                                io::ErrorKind::WouldBlock
                                    | io::ErrorKind::TimedOut
                                    | io::ErrorKind::ConnectionRefused
                                    | io::ErrorKind::Interrupted
                            ) =>
                        {
                            if e.kind() == io::ErrorKind::ConnectionRefused {
                                std::thread::sleep(left.min(Duration::from_millis(200)));
                            }
                        }
                        Err(e) => return Err(e),
                    }
                }
            };
        let deadline = Instant::now() + wait;
        let mut probe = u64::MAX;
        while !exchange(probe, &mut req, &mut buf, Duration::from_secs(1))? {
            if Instant::now() >= deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("no answer from {dst} within {wait:?}"),
                ));
            }
            probe -= 1;
        }
        for seq in 0..u64::from(count) {
            let started = Instant::now();
            if exchange(seq, &mut req, &mut buf, Duration::from_secs(1))? {
                r.rtts_us.push(started.elapsed().as_secs_f64() * 1e6);
            }
        }
        for _ in 0..3 {
            let _ = sock.send(UDP_STOP);
        }
        Ok(())
    })();
    if let Err(e) = result {
        r.error = Some(e.to_string());
    }
    r
}

/// What a UDP flood sent.
#[derive(Debug, Clone)]
pub struct UdpFloodReport {
    /// Where it went.
    pub dst: SocketAddrV4,
    /// Payload bytes per datagram.
    pub size: usize,
    /// Datagrams sent.
    pub sent: u64,
    /// Sends that failed (ENOBUFS, EAGAIN, ...).
    pub errors: u64,
    /// How long it ran.
    pub seconds: f64,
}

impl UdpFloodReport {
    /// The `EVMM-NET-UDP-FLOOD` line.
    pub fn line(&self, side: &str) -> String {
        let secs = self.seconds.max(1e-9);
        format!(
            "EVMM-NET-UDP-FLOOD side={side} dst={} port={} size={} sent={} errors={} seconds={:.3} pps={:.0} mbit_s={:.1} ok={}",
            self.dst.ip(),
            self.dst.port(),
            self.size,
            self.sent,
            self.errors,
            self.seconds,
            self.sent as f64 / secs,
            (self.sent * self.size as u64) as f64 * 8.0 / secs / 1e6,
            flag(self.sent > 0)
        )
    }
}

/// Sends `size`-byte datagrams to `dst` as fast as it can for `seconds` (bounded in
/// time by construction; the target is the other side of the tap).
pub fn udp_flood(dst: SocketAddrV4, seconds: f64, size: usize) -> io::Result<UdpFloodReport> {
    let sock = udp_bind(0)?;
    let payload = vec![0x5au8; size];
    let started = Instant::now();
    let limit = Duration::from_secs_f64(seconds);
    let mut r = UdpFloodReport {
        dst,
        size,
        sent: 0,
        errors: 0,
        seconds: 0.0,
    };
    'outer: loop {
        for _ in 0..64 {
            match sock.send_to(&payload, dst) {
                Ok(_) => r.sent += 1,
                Err(_) => r.errors += 1,
            }
        }
        if started.elapsed() >= limit {
            break 'outer;
        }
    }
    r.seconds = started.elapsed().as_secs_f64();
    Ok(r)
}

/// What a slow UDP reader got.
#[derive(Debug, Clone)]
pub struct UdpSinkReport {
    /// The port it read.
    pub port: u16,
    /// Datagrams read.
    pub received: u64,
    /// Their bytes.
    pub bytes: u64,
    /// From the first datagram to the end.
    pub seconds: f64,
    /// The pause after each datagram, µs.
    pub delay_us: u64,
}

impl UdpSinkReport {
    /// The `EVMM-NET-UDP-SINK` line.
    pub fn line(&self, side: &str) -> String {
        format!(
            "EVMM-NET-UDP-SINK side={side} port={} received={} bytes={} seconds={:.3} delay_us={} ok={}",
            self.port,
            self.received,
            self.bytes,
            self.seconds,
            self.delay_us,
            flag(self.received > 0)
        )
    }
}

/// Reads datagrams on `port` slowly (pausing `delay_us` after each) for `seconds`
/// from the first one, which must come within `wait`.
pub fn udp_sink(
    port: u16,
    seconds: f64,
    delay_us: u64,
    wait: Duration,
) -> io::Result<UdpSinkReport> {
    udp_sink_on(udp_bind(port)?, seconds, delay_us, wait)
}

fn udp_sink_on(
    sock: UdpSocket,
    seconds: f64,
    delay_us: u64,
    wait: Duration,
) -> io::Result<UdpSinkReport> {
    let mut r = UdpSinkReport {
        port: sock.local_addr()?.port(),
        received: 0,
        bytes: 0,
        seconds: 0.0,
        delay_us,
    };
    let mut buf = vec![0u8; 65536];
    let started = Instant::now();
    let mut first: Option<Instant> = None;
    let limit = Duration::from_secs_f64(seconds);
    loop {
        let end = match first {
            Some(t) => t + limit,
            None => started + wait,
        };
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        sock.set_read_timeout(Some(left.min(Duration::from_millis(200))))?;
        match sock.recv(&mut buf) {
            Ok(n) => {
                first.get_or_insert_with(Instant::now);
                r.received += 1;
                r.bytes += n as u64;
                if delay_us > 0 {
                    std::thread::sleep(Duration::from_micros(delay_us));
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) => {}
            Err(e) => return Err(e),
        }
    }
    r.seconds = first.map(|t| t.elapsed().as_secs_f64()).unwrap_or(0.0);
    Ok(r)
}

// --- iperf3 -------------------------------------------------------------------------------

/// The summary of an iperf3 run (text output with `-f k`).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Iperf3Summary {
    /// The sender's bitrate, kbit/s (the `[SUM]` line with several streams).
    pub sender_kbit_s: Option<f64>,
    /// The receiver's bitrate, kbit/s.
    pub receiver_kbit_s: Option<f64>,
    /// The sender's TCP retransmissions.
    pub retransmits: Option<u64>,
}

/// Reads the `sender`/`receiver` lines of iperf3's text output (the last of each
/// wins, which is the `[SUM]` line with `-P`).
pub fn parse_iperf3(text: &str) -> Iperf3Summary {
    let mut s = Iperf3Summary::default();
    for line in text.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        let Some(&last) = words.last() else { continue };
        if last != "sender" && last != "receiver" {
            continue;
        }
        let Some(unit_at) = words.iter().position(|w| w.ends_with("bits/sec")) else {
            continue;
        };
        let scale = match words[unit_at] {
            "bits/sec" => 1e-3,
            "Kbits/sec" => 1.0,
            "Mbits/sec" => 1e3,
            "Gbits/sec" => 1e6,
            "Tbits/sec" => 1e9,
            _ => continue,
        };
        let Some(value) = unit_at
            .checked_sub(1)
            .and_then(|i| words[i].parse::<f64>().ok())
        else {
            continue;
        };
        if last == "sender" {
            s.sender_kbit_s = Some(value * scale);
            s.retransmits = words
                .get(unit_at + 1)
                .filter(|w| **w != "sender")
                .and_then(|w| w.parse().ok());
        } else {
            s.receiver_kbit_s = Some(value * scale);
        }
    }
    s
}

/// The `EVMM-NET-IPERF3` line.
pub fn iperf3_line(
    side: &str,
    role: &str,
    target: &str,
    status: i32,
    s: &Iperf3Summary,
    error: &Option<String>,
) -> String {
    let opt = |v: Option<f64>| v.map(|v| format!("{v:.0}")).unwrap_or_else(|| "-".into());
    format!(
        "EVMM-NET-IPERF3 side={side} role={role} target={target} status={status} sender_kbit_s={} receiver_kbit_s={} retransmits={} ok={}{}",
        opt(s.sender_kbit_s),
        opt(s.receiver_kbit_s),
        s.retransmits.map(|r| r.to_string()).unwrap_or_else(|| "-".into()),
        flag(error.is_none() && iperf3_ok(role, status, s)),
        error_field(error)
    )
}

/// An iperf3 run passed: exit status 0 and its summary. The client prints both the
/// sender's and the receiver's line; the server only its own end's (the receiver, or
/// the sender with `-R`).
pub fn iperf3_ok(role: &str, status: i32, s: &Iperf3Summary) -> bool {
    status == 0
        && match role {
            "client" => s.receiver_kbit_s.is_some(),
            _ => s.receiver_kbit_s.is_some() || s.sender_kbit_s.is_some(),
        }
}

/// Runs `argv`, stopping it after `limit`; returns its exit status (-1: killed or
/// not started) and stdout + stderr.
fn run_limited(argv: &[String], limit: Duration) -> (i32, String) {
    let mut child = match Command::new(&argv[0])
        .args(&argv[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(c) => c,
        Err(e) => return (-1, format!("cannot run {}: {e}", argv[0])),
    };
    let pipe = |r: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut text = String::new();
            if let Some(mut r) = r {
                let _ = r.read_to_string(&mut text);
            }
            text
        })
    };
    let out = pipe(
        child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
    );
    let err = pipe(
        child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
    );
    let deadline = Instant::now() + limit;
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break s.code().unwrap_or(-1),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                break -1;
            }
        }
    };
    let text = out.join().unwrap_or_default() + &err.join().unwrap_or_default();
    (status, text)
}

/// `iperf3 -c dst -p port -t seconds -f k EXTRA...`, retried while the server is not
/// there yet (up to `wait`); prints iperf3's output, returns its line.
pub fn iperf3_client(
    dst: Ipv4Addr,
    port: u16,
    seconds: u32,
    extra: &[&str],
    wait: Duration,
) -> (bool, String) {
    let mut argv: Vec<String> = ["iperf3", "-c", &dst.to_string(), "-p", &port.to_string()]
        .iter()
        .map(|s| s.to_string())
        .collect();
    argv.extend(["-t".into(), seconds.to_string(), "-f".into(), "k".into()]);
    argv.extend(extra.iter().map(|s| s.to_string()));
    let deadline = Instant::now() + wait;
    let limit = Duration::from_secs(u64::from(seconds) + 60);
    loop {
        let (status, text) = run_limited(&argv, limit);
        let unreachable = [
            "unable to connect",
            "Connection refused",
            "No route to host",
            "unable to send control message",
        ]
        .iter()
        .any(|m| text.contains(m));
        if status != 0 && unreachable && Instant::now() < deadline {
            std::thread::sleep(Duration::from_secs(1));
            continue;
        }
        print!("{text}");
        let s = parse_iperf3(&text);
        let error = (status != 0).then(|| format!("iperf3 exited {status}"));
        let line = iperf3_line(
            &side(),
            "client",
            &format!("{dst}:{port}"),
            status,
            &s,
            &error,
        );
        return (iperf3_ok("client", status, &s), line);
    }
}

/// `iperf3 -s -1 -p port -f k`: serves one test, stopped after `limit`; prints
/// iperf3's output, returns its line.
pub fn iperf3_server(port: u16, limit: Duration) -> (bool, String) {
    let argv: Vec<String> = ["iperf3", "-s", "-1", "-p", &port.to_string(), "-f", "k"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let (status, text) = run_limited(&argv, limit);
    print!("{text}");
    let s = parse_iperf3(&text);
    let error = (status != 0).then(|| format!("iperf3 exited {status}"));
    let line = iperf3_line(&side(), "server", &port.to_string(), status, &s, &error);
    (iperf3_ok("server", status, &s), line)
}

// --- interfaces ---------------------------------------------------------------------------

fn sysfs(iface: &str, attr: &str) -> Option<String> {
    fs::read_to_string(format!("/sys/class/net/{iface}/{attr}"))
        .ok()
        .map(|s| s.trim().to_string())
}

fn ip(args: &[&str]) -> io::Result<()> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()?;
    if out.status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "ip {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

/// What `link` found.
#[derive(Debug, Clone)]
pub struct LinkReport {
    /// The interface.
    pub iface: String,
    /// Its MAC address (empty when it never appeared).
    pub mac: String,
    /// The MAC address expected.
    pub expected_mac: String,
    /// /sys/class/net/IFACE/carrier.
    pub carrier: bool,
    /// /sys/class/net/IFACE/operstate.
    pub operstate: String,
    /// Its MTU.
    pub mtu: u32,
}

impl LinkReport {
    /// The interface exists with the expected MAC and its link is up.
    pub fn ok(&self) -> bool {
        self.mac.eq_ignore_ascii_case(&self.expected_mac) && self.carrier
    }

    /// The `EVMM-NET-LINK` line.
    pub fn line(&self, side: &str) -> String {
        format!(
            "EVMM-NET-LINK side={side} iface={} mac={} expected_mac={} carrier={} operstate={} mtu={} ok={}",
            self.iface,
            if self.mac.is_empty() { "-" } else { &self.mac },
            self.expected_mac.to_ascii_lowercase(),
            flag(self.carrier),
            if self.operstate.is_empty() { "-" } else { &self.operstate },
            self.mtu,
            flag(self.ok())
        )
    }
}

/// Waits (up to `wait`) for `iface` to appear, sets it up, waits for its carrier,
/// and reports its MAC address and state.
pub fn link(iface: &str, expected_mac: &str, wait: Duration) -> io::Result<LinkReport> {
    let deadline = Instant::now() + wait;
    while sysfs(iface, "address").is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut r = LinkReport {
        iface: iface.into(),
        mac: String::new(),
        expected_mac: expected_mac.into(),
        carrier: false,
        operstate: String::new(),
        mtu: 0,
    };
    let Some(mac) = sysfs(iface, "address") else {
        return Ok(r);
    };
    r.mac = mac;
    ip(&["link", "set", iface, "up"])?;
    while sysfs(iface, "carrier").as_deref() != Some("1") && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    // operstate goes from "unknown"/"down" to "up" a moment after the carrier.
    let settle = Instant::now() + Duration::from_secs(5);
    while sysfs(iface, "operstate").as_deref() != Some("up") && Instant::now() < settle {
        std::thread::sleep(Duration::from_millis(100));
    }
    r.carrier = sysfs(iface, "carrier").as_deref() == Some("1");
    r.operstate = sysfs(iface, "operstate").unwrap_or_default();
    r.mtu = sysfs(iface, "mtu")
        .and_then(|m| m.parse().ok())
        .unwrap_or(0);
    Ok(r)
}

/// Gives `iface` the address `cidr` (replacing any), the MTU if given, and sets it up.
pub fn addr(iface: &str, cidr: &str, mtu: Option<u32>) -> io::Result<String> {
    ip(&["addr", "flush", "dev", iface])?;
    if let Some(mtu) = mtu {
        ip(&["link", "set", iface, "mtu", &mtu.to_string()])?;
    }
    ip(&["addr", "add", cidr, "dev", iface])?;
    ip(&["link", "set", iface, "up"])?;
    let actual = sysfs(iface, "mtu").unwrap_or_default();
    Ok(format!(
        "EVMM-NET-ADDR side={} iface={iface} addr={cidr} mtu={actual} ok={}",
        side(),
        flag(mtu.is_none_or(|m| m.to_string() == actual))
    ))
}

/// Sets the MTU of `iface`.
pub fn set_mtu(iface: &str, mtu: u32) -> io::Result<String> {
    ip(&["link", "set", iface, "mtu", &mtu.to_string()])?;
    let actual = sysfs(iface, "mtu").unwrap_or_default();
    Ok(format!(
        "EVMM-NET-MTU side={} iface={iface} mtu={actual} ok={}",
        side(),
        flag(mtu.to_string() == actual)
    ))
}

/// The `EVMM-NET-STATS` line of `iface`: its packet and byte counters.
pub fn stats(iface: &str) -> io::Result<String> {
    if sysfs(iface, "address").is_none() {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("no interface {iface}"),
        ));
    }
    let mut line = format!("EVMM-NET-STATS side={} iface={iface}", side());
    for c in [
        "rx_packets",
        "rx_bytes",
        "rx_dropped",
        "rx_errors",
        "tx_packets",
        "tx_bytes",
        "tx_dropped",
        "tx_errors",
    ] {
        let v = sysfs(iface, &format!("statistics/{c}")).unwrap_or_else(|| "-".into());
        line.push_str(&format!(" {c}={v}"));
    }
    for a in ["mtu", "carrier", "operstate"] {
        let v = sysfs(iface, a).unwrap_or_else(|| "-".into());
        line.push_str(&format!(" {a}={}", if v.is_empty() { "-" } else { &v }));
    }
    Ok(line)
}

/// Resets the virtio device behind `iface` through its driver: unbinds it from
/// virtio_net and binds it again (the device sees a reset and a new activation), waits
/// for the interface to come back and sets it up. The `EVMM-NET-REBIND` line.
pub fn rebind(iface: &str, wait: Duration) -> io::Result<String> {
    let dev = std::fs::read_link(format!("/sys/class/net/{iface}/device"))?;
    let name = dev
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| io::Error::other("no device name"))?
        .to_string();
    let driver = "/sys/bus/virtio/drivers/virtio_net";
    std::fs::write(format!("{driver}/unbind"), &name)?;
    let gone = sysfs(iface, "address").is_none();
    std::fs::write(format!("{driver}/bind"), &name)?;
    let deadline = Instant::now() + wait;
    while sysfs(iface, "address").is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let back = sysfs(iface, "address").is_some();
    if back {
        ip(&["link", "set", iface, "up"])?;
    }
    Ok(format!(
        "EVMM-NET-REBIND side={} iface={iface} device={name} gone={} back={} ok={}",
        side(),
        flag(gone),
        flag(back),
        flag(gone && back)
    ))
}

/// Takes interface `iface` `up` or `down`, or deletes it (`delete`): what a tap's user
/// may do to it under a running VMM. The `EVMM-NET-SET-LINK` line.
pub fn set_link(iface: &str, state: &str) -> io::Result<String> {
    let r = match state {
        "up" | "down" => ip(&["link", "set", iface, state]),
        "delete" => ip(&["link", "del", iface]),
        _ => {
            return Err(io::Error::other(format!(
                "set-link {iface} {state}: up, down or delete"
            )))
        }
    };
    Ok(format!(
        "EVMM-NET-SET-LINK side={} iface={iface} state={state} ok={}{}",
        side(),
        flag(r.is_ok()),
        error_field(&r.err().map(|e| e.to_string()))
    ))
}

/// The `EVMM-NET-THREADS` line: the thread names of the process called `name` (the
/// first, by pid) and its CPU time, and the kernel threads called `vhost-*` (the
/// kernel's vhost workers, named after the thread that set up the vhost device) with
/// theirs. CPU times are in microseconds, from `schedstat` where the kernel keeps it
/// (nanoseconds on the CPU), else from `stat` (utime + stime, in clock ticks).
pub fn threads(name: &str) -> io::Result<String> {
    let mut pids: Vec<u32> = std::fs::read_dir("/proc")?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    pids.sort_unstable();
    let comm = |path: String| {
        std::fs::read_to_string(path)
            .map(|c| c.trim().to_string())
            .unwrap_or_default()
    };
    let found = pids
        .iter()
        .copied()
        .find(|pid| comm(format!("/proc/{pid}/comm")) == name);
    let (mut threads, cpu_us) = match found {
        Some(pid) => {
            let mut names = Vec::new();
            let mut cpu = 0;
            for task in std::fs::read_dir(format!("/proc/{pid}/task"))?.filter_map(|e| e.ok()) {
                let dir = task.path().display().to_string();
                names.push(comm(format!("{dir}/comm")));
                cpu += task_cpu_us(&dir).unwrap_or(0);
            }
            (names, Some(cpu))
        }
        None => (Vec::new(), None),
    };
    threads.sort();
    let kthreads: Vec<(String, u64)> = pids
        .iter()
        .map(|pid| (comm(format!("/proc/{pid}/comm")), *pid))
        .filter(|(c, _)| c.starts_with("vhost-"))
        .map(|(c, pid)| (c, task_cpu_us(&format!("/proc/{pid}")).unwrap_or(0)))
        .collect();
    let list = |v: Vec<String>| {
        if v.is_empty() {
            "-".into()
        } else {
            v.join(",")
        }
    };
    let kvm: String = found
        .map(kvm_counters)
        .unwrap_or_default()
        .iter()
        .map(|(k, v)| format!(" kvm_{k}={v}"))
        .collect();
    Ok(format!(
        "EVMM-NET-THREADS side={} process={name} pid={} threads={} cpu_us={} vhost_kthreads={} vhost_cpu_us={}{kvm} ok={}",
        side(),
        found.map_or("-".into(), |p| p.to_string()),
        list(threads),
        cpu_us.map_or("-".into(), |c| c.to_string()),
        list(kthreads.iter().map(|(c, _)| c.clone()).collect()),
        list(kthreads.iter().map(|(_, t)| t.to_string()).collect()),
        flag(found.is_some())
    ))
}

/// KVM's counters of the VMs of process `pid` (debugfs: `/sys/kernel/debug/kvm/PID-FD/`),
/// summed over its VMs: how often its guests left to the host and why, and how many
/// interrupts were injected, which tell one VMM's device path from another's. Empty
/// where debugfs is not mounted.
fn kvm_counters(pid: u32) -> Vec<(&'static str, u64)> {
    const NAMES: [&str; 6] = [
        "exits",
        "mmio_exits",
        "io_exits",
        "irq_injections",
        "halt_exits",
        "halt_wakeup",
    ];
    let Ok(dir) = std::fs::read_dir("/sys/kernel/debug/kvm") else {
        return Vec::new();
    };
    let prefix = format!("{pid}-");
    let vms: Vec<std::path::PathBuf> = dir
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
        .map(|e| e.path())
        .collect();
    if vms.is_empty() {
        return Vec::new();
    }
    NAMES
        .iter()
        .map(|name| {
            let total = vms
                .iter()
                .filter_map(|vm| std::fs::read_to_string(vm.join(name)).ok())
                .filter_map(|v| v.trim().parse::<u64>().ok())
                .sum();
            (*name, total)
        })
        .collect()
}

/// The CPU time of the task whose `/proc` directory is `dir`, in microseconds.
fn task_cpu_us(dir: &str) -> Option<u64> {
    if let Ok(s) = std::fs::read_to_string(format!("{dir}/schedstat")) {
        if let Some(ns) = s
            .split_whitespace()
            .next()
            .and_then(|n| n.parse::<u64>().ok())
        {
            return Some(ns / 1000);
        }
    }
    let stat = std::fs::read_to_string(format!("{dir}/stat")).ok()?;
    ticks_us(&stat)
}

/// utime + stime of a `/proc/.../stat` line, in microseconds (100 ticks a second, as
/// Debian's kernels count them: `USER_HZ`).
fn ticks_us(stat: &str) -> Option<u64> {
    // The name is in parentheses and may hold spaces: the fields start after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the name: state is field 3 of the line, utime 14, stime 15.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) * 10_000)
}

// --- checks -------------------------------------------------------------------------------

/// The checks and their arguments (`evmm-guest-net CHECK [+ CHECK]...`).
pub const USAGE: &str = "\
usage: evmm-guest-net CHECK [+ CHECK]...   (runs the checks in order, stops at the first that fails)
  link IFACE MAC                  IFACE exists with MAC; set up; carrier on
  addr IFACE IP/PREFIX [MTU]      replace IFACE's addresses, set the MTU, set up
  mtu IFACE MTU                   set the MTU
  stats IFACE                     print IFACE's counters
  set-link IFACE up|down|delete   take IFACE up or down, or delete it
  threads NAME                    print the threads of process NAME and the vhost-* kernel threads
  rebind IFACE                    unbind IFACE's virtio device from virtio_net and bind it again
  ping IP COUNT [SIZE]            COUNT ICMP echoes of SIZE bytes (default 56), don't-fragment set
  pinged MIN                      wait until this host has answered MIN echo requests since boot
  send IP PORT MIB [SEED]         send MIB MiB of the stream over TCP, print its SHA-256
  recv PORT MIB [SEED]            receive and check MIB MiB of the stream, print its SHA-256
  barrier [IP] PORT               rendezvous: listen on PORT, or connect to IP:PORT
  udp-echo PORT                   echo UDP datagrams until the client stops
  udp-rr IP PORT COUNT [SIZE]     COUNT UDP request/responses, print p50/p99
  udp-flood IP PORT SECONDS [SIZE]   send UDP datagrams as fast as possible
  udp-sink PORT SECONDS [DELAY_US]   read UDP datagrams slowly (default 1000 us each)
  iperf3-server PORT              iperf3 -s -1 (one test)
  iperf3-client IP PORT SECONDS [IPERF3-OPTION]...
  sleep SECONDS
  gen MIB [SEED]                  write the stream to stdout (to check the SHA-256 elsewhere)
environment: EVMM_NET_SIDE (default guest), EVMM_NET_WAIT (first-contact wait, s, default 120)";

/// Splits `args` into checks at each lone `+`; empty checks are dropped.
pub fn split_checks(args: &[String]) -> Vec<Vec<String>> {
    args.split(|a| a == "+")
        .filter(|c| !c.is_empty())
        .map(|c| c.to_vec())
        .collect()
}

type CheckResult = Result<bool, Box<dyn Error>>;

fn report(ok: bool, line: String) -> CheckResult {
    println!("{line}");
    Ok(ok)
}

/// Runs one check (its words, name first), printing its line; Ok(true) when it passed.
pub fn run_check(words: &[&str]) -> CheckResult {
    let side = side();
    let wait = first_contact_wait();
    let mib = |s: &str| -> Result<u64, Box<dyn Error>> { Ok(s.parse::<u64>()? * MIB) };
    let seed = |s: Option<&&str>| -> Result<u64, Box<dyn Error>> {
        Ok(s.map(|s| s.parse()).transpose()?.unwrap_or(DEFAULT_SEED))
    };
    match words {
        ["link", iface, mac] => {
            let r = link(iface, mac, wait)?;
            report(r.ok(), r.line(&side))
        }
        ["addr", iface, cidr, rest @ ..] if rest.len() <= 1 => {
            let mtu = rest.first().map(|m| m.parse()).transpose()?;
            let line = addr(iface, cidr, mtu)?;
            report(line.ends_with("ok=1"), line)
        }
        ["mtu", iface, mtu] => {
            let line = set_mtu(iface, mtu.parse()?)?;
            report(line.ends_with("ok=1"), line)
        }
        ["stats", iface] => report(true, stats(iface)?),
        ["rebind", iface] => {
            let line = rebind(iface, wait)?;
            report(line.ends_with("ok=1"), line)
        }
        ["set-link", iface, state] => {
            let line = set_link(iface, state)?;
            report(line.contains(" ok=1"), line)
        }
        ["threads", name] => {
            let line = threads(name)?;
            report(line.ends_with("ok=1"), line)
        }
        ["ping", ip, count, rest @ ..] if rest.len() <= 1 => {
            let size = rest.first().map(|s| s.parse()).transpose()?.unwrap_or(56);
            let r = ping(ip.parse()?, count.parse()?, size, wait);
            report(r.ok(), r.line(&side))
        }
        ["pinged", min] => {
            let min: u64 = min.parse()?;
            let (in_echos, out_reps) = pinged(min, wait)?;
            let ok = out_reps >= min;
            report(
                ok,
                format!(
                    "EVMM-NET-PINGED side={side} min={min} in_echos={in_echos} out_echo_reps={out_reps} ok={}",
                    flag(ok)
                ),
            )
        }
        ["send", ip, port, n, rest @ ..] if rest.len() <= 1 => {
            let t = tcp_send(
                ip.parse()?,
                port.parse()?,
                mib(n)?,
                seed(rest.first())?,
                wait,
            );
            report(t.ok(), t.line(&side))
        }
        ["recv", port, n, rest @ ..] if rest.len() <= 1 => {
            let t = tcp_recv(port.parse()?, mib(n)?, seed(rest.first())?, wait);
            report(t.ok(), t.line(&side))
        }
        ["barrier", rest @ ..] if (1..=2).contains(&rest.len()) => {
            let (peer, port) = match rest {
                [ip, port] => (Some(ip.parse::<Ipv4Addr>()?), port.parse::<u16>()?),
                [port] => (None, port.parse()?),
                _ => unreachable!("guarded above"),
            };
            let started = Instant::now();
            let result = barrier(peer, port, wait);
            let role = if peer.is_some() { "connect" } else { "listen" };
            let (ok, tail) = match &result {
                Ok(other) => (true, format!("peer={other} ok=1")),
                Err(e) => (false, format!("peer=- ok=0 error={}", word(&e.to_string()))),
            };
            report(
                ok,
                format!(
                    "EVMM-NET-BARRIER side={side} port={port} role={role} seconds={:.3} {tail}",
                    started.elapsed().as_secs_f64()
                ),
            )
        }
        ["udp-echo", port] => {
            let r = udp_echo(port.parse()?, wait)?;
            report(r.packets > 0, r.line(&side))
        }
        ["udp-rr", ip, port, count, rest @ ..] if rest.len() <= 1 => {
            let size = rest.first().map(|s| s.parse()).transpose()?.unwrap_or(64);
            let dst = SocketAddrV4::new(ip.parse()?, port.parse()?);
            let r = udp_rr(dst, count.parse()?, size, wait);
            report(r.ok(), r.line(&side))
        }
        ["udp-flood", ip, port, secs, rest @ ..] if rest.len() <= 1 => {
            let size = rest.first().map(|s| s.parse()).transpose()?.unwrap_or(1024);
            let dst = SocketAddrV4::new(ip.parse()?, port.parse()?);
            let r = udp_flood(dst, secs.parse()?, size)?;
            report(r.sent > 0, r.line(&side))
        }
        ["udp-sink", port, secs, rest @ ..] if rest.len() <= 1 => {
            let delay = rest.first().map(|s| s.parse()).transpose()?.unwrap_or(1000);
            let r = udp_sink(port.parse()?, secs.parse()?, delay, wait)?;
            report(r.received > 0, r.line(&side))
        }
        ["iperf3-server", port] => {
            let (ok, line) = iperf3_server(port.parse()?, wait + Duration::from_secs(600));
            report(ok, line)
        }
        ["iperf3-client", ip, port, secs, extra @ ..] => {
            let (ok, line) = iperf3_client(ip.parse()?, port.parse()?, secs.parse()?, extra, wait);
            report(ok, line)
        }
        ["sleep", secs] => {
            std::thread::sleep(Duration::from_secs_f64(secs.parse()?));
            Ok(true)
        }
        ["gen", n, rest @ ..] if rest.len() <= 1 => {
            let (len, seed) = (mib(n)?, seed(rest.first())?);
            let mut out = io::stdout().lock();
            let mut buf = vec![0u8; CHUNK];
            let mut off = 0;
            while off < len {
                let k = (len - off).min(CHUNK as u64) as usize;
                fill_stream(seed, off, &mut buf[..k]);
                out.write_all(&buf[..k])?;
                off += k as u64;
            }
            out.flush()?;
            Ok(true)
        }
        _ => Err(format!(
            "unknown check or wrong arguments: {}\n{USAGE}",
            words.join(" ")
        )
        .into()),
    }
}

/// Runs every check of `args` (separated by `+`) in order, printing an
/// `EVMM-NET-CHECK side= check= status=` line after each, and stops at the first
/// that fails. Returns the exit status: 0, 1 (a check failed) or 2 (a check could not
/// run: bad arguments, a missing program).
pub fn run_checks(args: &[String]) -> i32 {
    let checks = split_checks(args);
    if checks.is_empty() {
        eprintln!("{USAGE}");
        return 2;
    }
    let side = side();
    for check in checks {
        let words: Vec<&str> = check.iter().map(String::as_str).collect();
        let status = match run_check(&words) {
            Ok(true) => 0,
            Ok(false) => 1,
            Err(e) => {
                println!(
                    "EVMM-NET-ERROR side={side} check={} error={}",
                    words[0],
                    word(e.to_string().lines().next().unwrap_or_default())
                );
                eprintln!("evmm-guest-net: {}: {e}", words.join(" "));
                2
            }
        };
        println!(
            "EVMM-NET-CHECK side={side} check={} status={status}",
            words[0]
        );
        if status != 0 {
            return status;
        }
    }
    0
}

#[cfg(test)]
mod tests {
    use super::*;
    fn sha256_hex(data: &[u8]) -> String {
        hex(Sha256::digest(data).as_slice())
    }

    const LOCAL: Ipv4Addr = Ipv4Addr::LOCALHOST;

    #[test]
    fn cpu_time_from_stat_and_schedstat() {
        let stat = "126 (a) b c) S 1 126 1 0 -1 4194560 100 0 0 0 250 70 0 0 20 0 2 0 5 0";
        assert_eq!(ticks_us(stat), Some(320 * 10_000));
        assert_eq!(ticks_us("no parenthesis"), None);
        // This process has run a little: some CPU time, from either file.
        let me = format!("/proc/{}", std::process::id());
        let spin = std::time::Instant::now();
        while spin.elapsed() < Duration::from_millis(30) {}
        assert!(task_cpu_us(&me).unwrap() > 0);
        let line = threads("no-such-process-name").unwrap();
        assert!(line.contains(" pid=- threads=- cpu_us=- "), "{line}");
        assert!(line.ends_with(" ok=0"), "{line}");
    }

    #[test]
    fn the_stream_is_the_same_from_any_offset() {
        let mut whole = vec![0u8; 1000];
        fill_stream(7, 0, &mut whole);
        for (off, len) in [(0, 1), (1, 7), (3, 64), (8, 8), (13, 500), (999, 1)] {
            let mut part = vec![0u8; len];
            fill_stream(7, off as u64, &mut part);
            assert_eq!(part, whole[off..off + len], "offset {off}");
        }
        let mut other = vec![0u8; 1000];
        fill_stream(8, 0, &mut other);
        assert_ne!(whole, other, "seeds differ");
        assert_eq!(stream_sha256(7, 1000), sha256_hex(&whole));
    }

    /// The digest agrees with coreutils' sha256sum on the stream.
    #[test]
    fn stream_digest_agrees_with_sha256sum() {
        let len = 3 * MIB + 5;
        let mut data = vec![0u8; len as usize];
        fill_stream(DEFAULT_SEED, 0, &mut data);
        let mut child = Command::new("sha256sum")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("sha256sum (coreutils) runs");
        child.stdin.take().unwrap().write_all(&data).unwrap();
        let out = child.wait_with_output().unwrap();
        let theirs = String::from_utf8(out.stdout).unwrap();
        assert_eq!(
            theirs.split_whitespace().next().unwrap(),
            stream_sha256(DEFAULT_SEED, len)
        );
    }

    #[test]
    fn tcp_transfer_over_loopback_checks_every_byte() {
        let listener = TcpListener::bind((LOCAL, 0)).unwrap();
        let port = listener.local_addr().unwrap().port();
        let rx = std::thread::spawn(move || {
            tcp_recv_on(Ok(listener), 5 * MIB, 3, Duration::from_secs(10))
        });
        let tx = tcp_send(LOCAL, port, 5 * MIB, 3, Duration::from_secs(10));
        let rx = rx.join().unwrap();
        assert!(tx.ok(), "{}", tx.line("t"));
        assert!(rx.ok(), "{}", rx.line("t"));
        assert_eq!(tx.sha256, rx.sha256);
        assert_eq!(rx.sha256, stream_sha256(3, 5 * MIB));
        assert!(rx
            .line("guest")
            .starts_with("EVMM-NET-SHA256 side=guest dir=recv "));
        assert!(rx
            .line("guest")
            .contains(" bytes=5242880 expected=5242880 "));
    }

    #[test]
    fn a_short_or_wrong_stream_fails_the_receiver() {
        // Fewer bytes than expected.
        let listener = TcpListener::bind((LOCAL, 0)).unwrap();
        let port = listener.local_addr().unwrap().port();
        let rx = std::thread::spawn(move || {
            tcp_recv_on(Ok(listener), 2 * MIB, 3, Duration::from_secs(10))
        });
        let tx = tcp_send(LOCAL, port, MIB, 3, Duration::from_secs(10));
        let rx = rx.join().unwrap();
        assert!(tx.ok());
        assert!(!rx.ok());
        assert_eq!(rx.bytes, MIB);
        // Another seed: every byte checked.
        let listener = TcpListener::bind((LOCAL, 0)).unwrap();
        let port = listener.local_addr().unwrap().port();
        let rx =
            std::thread::spawn(move || tcp_recv_on(Ok(listener), MIB, 3, Duration::from_secs(10)));
        tcp_send(LOCAL, port, MIB, 4, Duration::from_secs(10));
        let rx = rx.join().unwrap();
        assert!(!rx.ok());
        assert!(rx.bad_bytes > MIB / 2, "{}", rx.line("t"));
        assert!(rx.line("t").contains(" ok=0 "));
    }

    #[test]
    fn the_sender_waits_for_the_listener() {
        // Find a free port, then listen on it only after a while.
        let port = TcpListener::bind((LOCAL, 0))
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let rx = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(800));
            tcp_recv(port, MIB, 1, Duration::from_secs(10))
        });
        let tx = tcp_send(LOCAL, port, MIB, 1, Duration::from_secs(10));
        assert!(tx.ok(), "{}", tx.line("t"));
        assert!(rx.join().unwrap().ok());
        // Nobody ever listens: an error, in time.
        let t = tcp_send(LOCAL, port, MIB, 1, Duration::from_millis(300));
        assert!(!t.ok());
        assert!(t.line("t").contains(" error="), "{}", t.line("t"));
    }

    #[test]
    fn barrier_meets_both_sides() {
        let port = TcpListener::bind((LOCAL, 0))
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let listener = std::thread::spawn(move || barrier(None, port, Duration::from_secs(10)));
        let other = barrier(Some(LOCAL), port, Duration::from_secs(10)).unwrap();
        assert_eq!(other, "127.0.0.1");
        assert_eq!(listener.join().unwrap().unwrap(), "127.0.0.1");
    }

    #[test]
    fn icmp_packets() {
        let req = echo_request(0x1234, 7, b"hello");
        assert_eq!(req[0], 8);
        assert_eq!(
            inet_checksum(&req),
            0,
            "a packet with its checksum sums to 0"
        );
        // The reply as a raw socket reads it: a 20-byte IP header, then type 0.
        let mut reply = vec![0x45u8];
        reply.extend_from_slice(&[0; 19]);
        let mut icmp = req.clone();
        icmp[0] = 0;
        reply.extend_from_slice(&icmp);
        assert!(is_echo_reply(&reply, 0x1234, 7, b"hello"));
        assert!(!is_echo_reply(&reply, 0x1234, 8, b"hello"));
        assert!(!is_echo_reply(&reply, 0x1235, 7, b"hello"));
        assert!(!is_echo_reply(&reply, 0x1234, 7, b"hellO"));
        assert!(!is_echo_reply(&reply[..30], 0x1234, 7, b"hello"));
        assert!(!is_echo_reply(&[], 0x1234, 7, b"hello"));
    }

    /// Needs root (a raw socket), as the tests run in CI.
    #[test]
    fn ping_loopback_with_dont_fragment() {
        let r = ping(LOCAL, 3, 56, Duration::from_secs(5));
        assert!(r.ok(), "{}", r.line("t"));
        assert_eq!(r.received, 3);
        // Larger than loopback's MTU (65536) with DF: refused, not fragmented.
        let r = ping(LOCAL, 1, 65_600, Duration::from_secs(5));
        assert!(!r.ok());
        assert!(r.error.is_some(), "{}", r.line("t"));
    }

    #[test]
    fn snmp_echo_counters() {
        let snmp = "Ip: Forwarding DefaultTTL\nIp: 1 64\n\
            Icmp: InMsgs InErrors InCsumErrors InDestUnreachs InTimeExcds InParmProbs InSrcQuenchs InRedirects InEchos InEchoReps InTimestamps InTimestampReps InAddrMasks InAddrMaskReps OutMsgs OutErrors OutRateLimitGlobal OutRateLimitHost OutDestUnreachs OutTimeExcds OutParmProbs OutSrcQuenchs OutRedirects OutEchos OutEchoReps OutTimestamps OutTimestampReps OutAddrMasks OutAddrMaskReps\n\
            Icmp: 10 0 0 0 0 0 0 0 6 4 0 0 0 0 10 0 0 0 0 0 0 0 0 4 6 0 0 0 0\n\
            IcmpMsg: InType0 InType8\nIcmpMsg: 4 6\n";
        assert_eq!(icmp_echo_counts(snmp), Some((6, 6)));
        assert_eq!(icmp_echo_counts("Ip: a\nIp: 1\n"), None);
        let here = fs::read_to_string("/proc/net/snmp").unwrap();
        assert!(icmp_echo_counts(&here).is_some());
    }

    #[test]
    fn udp_request_response_and_flood_over_loopback() {
        let sock = UdpSocket::bind((LOCAL, 0)).unwrap();
        let port = sock.local_addr().unwrap().port();
        let server =
            std::thread::spawn(move || udp_echo_on(sock, Duration::from_secs(10)).unwrap());
        let r = udp_rr(
            SocketAddrV4::new(LOCAL, port),
            200,
            100,
            Duration::from_secs(10),
        );
        assert!(r.ok(), "{}", r.line("t"));
        let echo = server.join().unwrap();
        assert!(echo.stopped);
        assert!(echo.packets >= 201, "{}", echo.line("t"));
        let line = r.line("guest");
        assert!(
            line.starts_with("EVMM-NET-UDP-RR side=guest dst=127.0.0.1 "),
            "{line}"
        );
        assert!(line.contains(" count=200 received=200 lost=0 "), "{line}");

        let sock = UdpSocket::bind((LOCAL, 0)).unwrap();
        let port = sock.local_addr().unwrap().port();
        let sink = std::thread::spawn(move || {
            udp_sink_on(sock, 0.5, 1000, Duration::from_secs(10)).unwrap()
        });
        let flood = udp_flood(SocketAddrV4::new(LOCAL, port), 0.7, 512).unwrap();
        let sink = sink.join().unwrap();
        assert!(flood.sent > 0);
        assert!(
            sink.received > 0 && sink.received <= flood.sent,
            "{} {}",
            flood.line("t"),
            sink.line("t")
        );
        // A slow reader gets a fraction of a flood.
        assert!(
            sink.received < flood.sent,
            "{} {}",
            flood.line("t"),
            sink.line("t")
        );
    }

    #[test]
    fn nothing_to_echo_ends_on_the_wait() {
        let sock = UdpSocket::bind((LOCAL, 0)).unwrap();
        let r = udp_echo_on(sock, Duration::from_millis(300)).unwrap();
        assert_eq!(r.packets, 0);
        assert!(r.line("t").ends_with("ok=0"));
        let r = udp_rr(
            SocketAddrV4::new(LOCAL, 9),
            5,
            64,
            Duration::from_millis(300),
        );
        assert!(!r.ok());
    }

    #[test]
    fn iperf3_summaries() {
        let tcp = "\
[ ID] Interval           Transfer     Bitrate         Retr
[  5]   0.00-2.00   sec  25.0 MBytes  104857 Kbits/sec    3             sender
[  5]   0.00-2.04   sec  24.8 MBytes  101976 Kbits/sec                  receiver
";
        let s = parse_iperf3(tcp);
        assert_eq!(s.sender_kbit_s, Some(104857.0));
        assert_eq!(s.receiver_kbit_s, Some(101976.0));
        assert_eq!(s.retransmits, Some(3));
        let multi = "\
[  5]   0.00-2.00   sec  10 MBytes  40000 Kbits/sec    0             sender
[  7]   0.00-2.00   sec  10 MBytes  40000 Kbits/sec                  receiver
[SUM]   0.00-2.00   sec  20 MBytes  1.5 Gbits/sec    1             sender
[SUM]   0.00-2.00   sec  20 MBytes  1.4 Gbits/sec                  receiver
";
        let s = parse_iperf3(multi);
        assert_eq!(s.sender_kbit_s, Some(1.5e6));
        assert_eq!(s.receiver_kbit_s, Some(1.4e6));
        assert_eq!(s.retransmits, Some(1));
        let udp = "[  5]   0.00-10.00  sec  1.25 MBytes  1049 Kbits/sec  0.000 ms  0/906 (0%)  receiver\n";
        let s = parse_iperf3(udp);
        assert_eq!(s.receiver_kbit_s, Some(1049.0));
        assert_eq!(
            parse_iperf3("iperf3: error - unable to connect"),
            Iperf3Summary::default()
        );
        // A server with -R sends: only the sender's line.
        let reverse =
            "[  5]   0.00-3.01   sec   361 MBytes  1007114 Kbits/sec    0             sender\n";
        let s = parse_iperf3(reverse);
        assert!(iperf3_ok("server", 0, &s));
        assert!(!iperf3_ok("client", 0, &s));
        assert!(!iperf3_ok("server", 1, &s));
        let line = iperf3_line("l1", "server", "5201", 0, &s, &None);
        assert!(line.ends_with(" ok=1"), "{line}");
        let line = iperf3_line("l1", "server", "5201", 0, &parse_iperf3(tcp), &None);
        assert!(
            line.contains(" receiver_kbit_s=101976 retransmits=3 ok=1"),
            "{line}"
        );
    }

    #[test]
    fn checks_split_on_plus() {
        let args: Vec<String> = "ping 1.2.3.4 3 + + recv 5001 64 +"
            .split(' ')
            .map(String::from)
            .collect();
        assert_eq!(
            split_checks(&args),
            vec![vec!["ping", "1.2.3.4", "3"], vec!["recv", "5001", "64"]]
        );
        assert!(run_check(&["ping"]).is_err());
        assert!(run_check(&["nonsense", "1"]).is_err());
        assert_eq!(run_checks(&["sleep".into(), "0".into()]), 0);
        assert_eq!(run_checks(&["ping".into()]), 2);
    }

    #[test]
    fn percentiles() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        let s = Summary::of(&v);
        assert_eq!(
            (s.min, s.p50, s.p90, s.p99, s.max),
            (1.0, 50.0, 90.0, 99.0, 100.0)
        );
        assert_eq!(Summary::of(&[]).p50, 0.0);
        assert_eq!(Summary::of(&[5.0]).p99, 5.0);
    }
}
