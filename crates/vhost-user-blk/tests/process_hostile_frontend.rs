//! Process level: a hostile vhost-user frontend against the daemon, generated from
//! seeds. Each connection sends a few messages: mostly real request codes with bodies
//! of random values (sometimes cut short or too long), sometimes unknown codes; memory
//! tables of sealed memfds of random sizes (too short for the regions, or not sealed),
//! kick and call descriptors that are eventfds, pipes or memfds, and now and then up to
//! 40 descriptors on any message; the eventfds it passed as kicks are then written.
//! Every other connection sets up two queues by the book and then fills their rings
//! with random descriptors and kicks (a hostile guest behind an honest frontend).
//! After every connection the daemon must still run and have ended that connection;
//! a real frontend then does I/O, and the daemon's descriptor count is back to what it
//! was. `EVMM_SOAK_SEEDS=N` runs N connections instead of the default.

mod common;

use common::*;
use evmm_virtio::test_utils::{soak_seeds, SeededRng};
use evmm_virtio::vhost::shared_memory::sealed_memfd;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

const MIB: u64 = 1 << 20;
/// Connections under `cargo test`.
const DEFAULT_CONNECTIONS: u64 = 40;
/// Request codes of the vhost-user protocol the generator favours.
const CODES: &[u32] = &[
    1, 2, 3, 4, 5, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 24, 25, 37, 38, 39,
];
const SET_OWNER: u32 = 3;
const SET_MEM_TABLE: u32 = 5;
const SET_VRING_KICK: u32 = 12;
const SET_VRING_CALL: u32 = 13;
const SET_VRING_ERR: u32 = 14;
const ADD_MEM_REG: u32 = 38;

/// Descriptors of one message, and the eventfds the test may write as kicks.
struct Passed {
    fds: Vec<OwnedFd>,
    kicks: Vec<EventFd>,
}

fn some_fd(rng: &mut SeededRng, passed: &mut Passed) {
    match rng.below(4) {
        0 => {
            let e = EventFd::new(EFD_NONBLOCK).unwrap();
            passed.fds.push(e.try_clone().unwrap().into_owned());
            passed.kicks.push(e);
        }
        1 => {
            let (r, w) = std::io::pipe().unwrap();
            passed
                .fds
                .push(if rng.chance(50) { r.into() } else { w.into() });
        }
        2 => {
            let size = 4096 * (1 + rng.below(512));
            passed
                .fds
                .push(sealed_memfd(c"hostile", size).unwrap().into());
        }
        _ => passed.fds.push(File::open("/dev/null").unwrap().into()),
    }
}

/// An eventfd's descriptor as an owned file descriptor.
trait IntoOwned {
    fn into_owned(self) -> OwnedFd;
}

impl IntoOwned for EventFd {
    fn into_owned(self) -> OwnedFd {
        use std::os::fd::{FromRawFd, IntoRawFd};
        // SAFETY: `into_raw_fd` hands over the descriptor; nothing else owns it.
        unsafe { OwnedFd::from_raw_fd(self.into_raw_fd()) }
    }
}

/// One message: header, body, descriptors.
fn message(rng: &mut SeededRng, first: bool) -> (Vec<u8>, Passed) {
    let code = if first && rng.chance(70) {
        SET_OWNER
    } else if rng.chance(90) {
        CODES[rng.below(CODES.len() as u64) as usize]
    } else {
        rng.next_u64() as u32
    };
    let mut passed = Passed {
        fds: Vec::new(),
        kicks: Vec::new(),
    };
    let mut body: Vec<u8> = Vec::new();
    match code {
        SET_MEM_TABLE => {
            // num_regions, padding, then regions of (gpa, size, uaddr, offset).
            let n = rng.below(4) + 1;
            body.extend((n as u32).to_le_bytes());
            body.extend(0u32.to_le_bytes());
            for i in 0..n {
                let size = 4096 * (1 + rng.below(1024));
                body.extend((i << 30).to_le_bytes());
                body.extend(size.to_le_bytes());
                body.extend((0x7f00_0000_0000 + (i << 32)).to_le_bytes());
                body.extend((rng.below(4) * 4096).to_le_bytes());
                let file_size = if rng.chance(50) {
                    size
                } else {
                    4096 * (1 + rng.below(16))
                };
                if rng.chance(80) {
                    passed
                        .fds
                        .push(sealed_memfd(c"hostile-ram", file_size).unwrap().into());
                } else {
                    let f = tempfile::tempfile().unwrap();
                    f.set_len(file_size).unwrap();
                    passed.fds.push(f.into());
                }
            }
        }
        ADD_MEM_REG => {
            body.extend(0u64.to_le_bytes());
            body.extend((4096 * (1 + rng.below(64))).to_le_bytes());
            body.extend(0x7f00_0000_0000u64.to_le_bytes());
            body.extend(0u64.to_le_bytes());
            some_fd(rng, &mut passed);
        }
        SET_VRING_KICK | SET_VRING_CALL | SET_VRING_ERR => {
            // Queue index in the low byte; bit 8 set means "no descriptor".
            let index = rng.below(3) | if rng.chance(10) { 0x100 } else { 0 };
            body.extend(index.to_le_bytes());
            if index & 0x100 == 0 {
                some_fd(rng, &mut passed);
            }
        }
        _ => {
            let words = match rng.below(4) {
                0 => 0,
                1 => 1,
                2 => 5,
                _ => rng.below(40),
            };
            for _ in 0..words {
                // Small numbers (queue indices, sizes) more often than not.
                let v = if rng.chance(60) {
                    rng.below(300)
                } else {
                    rng.next_u64()
                };
                body.extend(v.to_le_bytes());
            }
        }
    }
    if rng.chance(10) {
        for _ in 0..rng.below(40) {
            some_fd(rng, &mut passed);
        }
    }
    // The size field: usually honest; sometimes a lie either way.
    let size = match rng.below(10) {
        0 => rng.below(1 << 20) as u32,
        1 => (body.len() as u32).saturating_sub(rng.below(8) as u32),
        _ => body.len() as u32,
    };
    let flags: u32 = if rng.chance(85) {
        1 | if rng.chance(50) { 0x8 } else { 0 }
    } else {
        rng.next_u64() as u32
    };
    let mut m = Vec::with_capacity(12 + body.len());
    m.extend(code.to_le_bytes());
    m.extend(flags.to_le_bytes());
    m.extend(size.to_le_bytes());
    m.extend(body);
    (m, passed)
}

/// The number of connections the daemon has finished.
fn ended(daemon: &Daemon) -> usize {
    let log = daemon.stderr();
    log.matches("frontend disconnected").count()
        + log.matches("frontend connection ended").count()
        + log.matches("cannot start serving a frontend").count()
}

fn wait_ended(daemon: &Daemon, n: usize, what: &str) {
    let start = Instant::now();
    while ended(daemon) < n {
        assert!(
            start.elapsed() < TIMEOUT,
            "{what}: the daemon did not end the connection:\n{}",
            daemon.stderr()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Sends one generated connection's messages; returns without waiting for the daemon.
fn hostile_connection(socket: &std::path::Path, seed: u64) {
    let mut rng = SeededRng::new(seed);
    let stream = UnixStream::connect(socket).unwrap();
    stream
        .set_write_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    stream
        .set_read_timeout(Some(Duration::from_millis(20)))
        .unwrap();
    let mut kicks = Vec::new();
    for i in 0..1 + rng.below(8) {
        let (m, passed) = message(&mut rng, i == 0);
        let raw: Vec<_> = passed.fds.iter().map(AsRawFd::as_raw_fd).collect();
        let sent = if raw.is_empty() {
            (&stream).write_all(&m).map(|()| m.len())
        } else {
            stream
                .send_with_fds(&[&m[..]], &raw)
                .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
        };
        if sent.is_err() {
            // The daemon ended the connection already.
            break;
        }
        kicks.extend(passed.kicks);
        // Whatever comes back is read and ignored.
        let mut sink = [0u8; 4096];
        let _ = (&stream).read(&mut sink);
    }
    for k in &kicks {
        let _ = k.write(1);
    }
    std::thread::sleep(Duration::from_millis(2));
}

/// A frontend that sets everything up by the book, then fills both queues' rings with
/// random descriptors (addresses mostly inside guest memory) and kicks: a hostile guest
/// behind an honest frontend.
fn garbage_rings(socket: &std::path::Path, seed: u64) {
    use evmm_virtio::test_utils::MEM_SIZE;
    use vm_memory::{Bytes, GuestAddress};
    let mut rng = SeededRng::new(seed);
    let s = Session::open(socket, 2);
    for q in &s.queues {
        let r = &q.ring;
        for i in 0..u64::from(r.size) {
            let addr = if rng.chance(80) {
                rng.below(MEM_SIZE as u64)
            } else {
                rng.next_u64()
            };
            let len = if rng.chance(70) {
                rng.below(8192)
            } else {
                rng.next_u64()
            } as u32;
            let flags = rng.below(8) as u16;
            let next = rng.below(u64::from(r.size) + 2) as u16;
            let mut d = [0u8; 16];
            d[..8].copy_from_slice(&addr.to_le_bytes());
            d[8..12].copy_from_slice(&len.to_le_bytes());
            d[12..14].copy_from_slice(&flags.to_le_bytes());
            d[14..].copy_from_slice(&next.to_le_bytes());
            s.mem
                .write_slice(&d, GuestAddress(r.desc + 16 * i))
                .unwrap();
            // Headers where the descriptors point, now and then.
            if rng.chance(50) && addr < MEM_SIZE as u64 - 16 {
                let t = rng.below(12) as u32;
                let _ = s.mem.write_obj(t, GuestAddress(addr));
                let _ = s.mem.write_obj(rng.below(16384), GuestAddress(addr + 8));
            }
        }
        for i in 0..u64::from(r.size) {
            let head = rng.below(u64::from(r.size) + 4) as u16;
            s.mem
                .write_obj(head, GuestAddress(r.avail + 4 + 2 * i))
                .unwrap();
        }
        // Mostly a plausible number of new entries (a ring index running more than the
        // queue size ahead is refused at once).
        let idx = if rng.chance(90) {
            1 + rng.below(u64::from(r.size))
        } else {
            rng.below(1 << 16)
        } as u16;
        s.mem.write_obj(idx, GuestAddress(r.avail + 2)).unwrap();
        q.kick.write(1).unwrap();
    }
    std::thread::sleep(Duration::from_millis(5));
    drop(s);
}

#[test]
fn a_hostile_frontend_ends_only_its_own_connection_and_leaks_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let img = disk(dir.path(), 4 * MIB);
    let mut daemon = Daemon::start(
        dir.path(),
        &img,
        &["--queues", "2", "--handshake-timeout", "1"],
    );
    // A real frontend first; the descriptor count after it is the baseline.
    let mut s = Session::open(&daemon.socket, 1);
    write_flush_read(&mut s, 0, 0, 1, &img);
    drop(s);
    wait_ended(&daemon, 1, "the first real frontend");
    let baseline = daemon.open_fds();

    let connections = soak_seeds(DEFAULT_CONNECTIONS);
    for seed in 0..connections {
        if seed % 2 == 0 {
            hostile_connection(&daemon.socket, seed);
        } else {
            garbage_rings(&daemon.socket, seed);
        }
        wait_ended(&daemon, 2 + seed as usize, &format!("seed {seed}"));
        assert!(
            daemon.is_running(),
            "seed {seed} brought the daemon down:\n{}",
            daemon.stderr()
        );
    }
    assert_eq!(
        daemon.open_fds(),
        baseline,
        "descriptors leaked over {connections} hostile connections"
    );
    // And the daemon still serves.
    let mut s = Session::open(&daemon.socket, 2);
    write_flush_read(&mut s, 1, 64, 2, &img);
    drop(s);
    // What ended the connections, for the record.
    let log = daemon.stderr();
    let mut reasons = std::collections::BTreeMap::<String, usize>::new();
    for line in log.lines() {
        for key in [
            "frontend connection ended: ",
            "memory table refused",
            "no SET_OWNER within",
            "frontend disconnected",
            "guest fault",
        ] {
            if let Some((_, rest)) = line.split_once(key) {
                let reason: String = rest.chars().take(50).collect();
                *reasons.entry(format!("{key}{reason}")).or_default() += 1;
            }
        }
    }
    for (reason, n) in &reasons {
        eprintln!("{n:6}  {reason}");
    }
    let status = daemon.signal_and_wait(libc::SIGTERM);
    assert!(status.success(), "{status}:\n{}", daemon.stderr());
    eprintln!("hostile frontend: {connections} generated connections, the daemon survived each");
}

/// A real session's OUT, FLUSH, IN on `queue` at `sector`.
fn write_flush_read(s: &mut Session, queue: usize, sector: u64, seed: u8, img: &std::path::Path) {
    use virtio_bindings::virtio_blk::*;
    use vm_memory::{Bytes, GuestAddress};
    let data = pattern(4096, seed);
    s.mem.write_slice(&data, GuestAddress(DATA)).unwrap();
    let (q, mem) = (&mut s.queues[queue], &s.mem);
    let st = q.run(mem, VIRTIO_BLK_T_OUT, sector, &[Desc(DATA, 4096, false)]);
    assert_eq!(st, VIRTIO_BLK_S_OK as u8);
    let st = q.run(mem, VIRTIO_BLK_T_FLUSH, 0, &[]);
    assert_eq!(st, VIRTIO_BLK_S_OK as u8);
    assert_eq!(file_range(img, sector * 512, 4096), data);
}
