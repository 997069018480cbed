//! Process level (the daemon as a process, no guest): the daemon binary driven by the `vhost` crate's own vhost-user frontend: the
//! handshake and configuration space, real I/O through virtqueues in shared memfd
//! memory, protocol violations, reconnection and SIGTERM.

mod common;

use common::*;
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::VhostUserFrontend;
use vhost::{VhostBackend, VringConfigData};
use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use vm_memory::{Bytes, GuestAddress};

const MIB: u64 = 1 << 20;

fn u32_at(c: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(c[off..off + 4].try_into().unwrap())
}

#[test]
fn handshake_and_get_config_show_the_file_and_the_queues() {
    let dir = tempfile::tempdir().unwrap();
    let img = disk(dir.path(), 3 * MIB);
    let daemon = Daemon::start(dir.path(), &img, &["--queues", "2"]);
    let mut fe = connect(&daemon.socket, 2);
    let hs = handshake(&mut fe);

    for bit in [
        VIRTIO_F_VERSION_1,
        VIRTIO_RING_F_EVENT_IDX,
        VIRTIO_RING_F_INDIRECT_DESC,
        VIRTIO_BLK_F_FLUSH,
        VIRTIO_BLK_F_SEG_MAX,
        VIRTIO_BLK_F_SIZE_MAX,
        VIRTIO_BLK_F_BLK_SIZE,
        VIRTIO_BLK_F_MQ,
        VIRTIO_BLK_F_DISCARD,
        VIRTIO_BLK_F_WRITE_ZEROES,
    ] {
        assert_ne!(hs.features & (1 << bit), 0, "feature {bit} not offered");
    }
    assert_eq!(hs.features & (1 << VIRTIO_BLK_F_RO), 0);
    assert_ne!(
        hs.features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits(),
        0
    );
    assert!(hs.protocol.contains(VhostUserProtocolFeatures::CONFIG));
    assert!(hs.protocol.contains(VhostUserProtocolFeatures::MQ));
    assert_eq!(hs.queues, 2);

    let c = &hs.config;
    assert_eq!(
        u64::from_le_bytes(c[0..8].try_into().unwrap()),
        3 * MIB / 512
    );
    assert_eq!(u32_at(c, 12), 254, "seg_max");
    assert_eq!(u32_at(c, 20), 512, "blk_size");
    assert_eq!(u16::from_le_bytes([c[34], c[35]]), 2, "num_queues");
    drop(fe);
    drop(daemon);
}

#[test]
fn a_readonly_disk_offers_ro_and_refuses_writes_through_the_queue() {
    let dir = tempfile::tempdir().unwrap();
    let img = disk(dir.path(), MIB);
    std::fs::write(&img, pattern(MIB as usize, 3)).unwrap();
    let daemon = Daemon::start(dir.path(), &img, &["--readonly"]);
    let mut s = Session::open(&daemon.socket, 1);
    assert_ne!(s.hs.features & (1 << VIRTIO_BLK_F_RO), 0);
    assert_eq!(s.hs.features & (1 << VIRTIO_BLK_F_MQ), 0);
    s.mem.write_slice(&[0u8; 4096], GuestAddress(DATA)).unwrap();
    let st = s.queues[0].run(&s.mem, VIRTIO_BLK_T_OUT, 0, &[Desc(DATA, 4096, false)]);
    assert_eq!(st, VIRTIO_BLK_S_IOERR as u8);
    assert_eq!(std::fs::read(&img).unwrap(), pattern(MIB as usize, 3));
    // Reads work.
    let st = s.queues[0].run(&s.mem, VIRTIO_BLK_T_IN, 0, &[Desc(DATA, 4096, true)]);
    assert_eq!(st, VIRTIO_BLK_S_OK as u8);
    let mut back = vec![0u8; 4096];
    s.mem.read_slice(&mut back, GuestAddress(DATA)).unwrap();
    assert_eq!(back, pattern(4096, 3));
}

/// OUT, FLUSH, IN on `queue`: the file holds the data after FLUSH and it reads back.
fn write_flush_read(s: &mut Session, queue: usize, sector: u64, seed: u8, img: &std::path::Path) {
    let data = pattern(8192, seed);
    let (q, mem) = (&mut s.queues[queue], &s.mem);
    mem.write_slice(&data, GuestAddress(DATA)).unwrap();
    let st = q.run(
        mem,
        VIRTIO_BLK_T_OUT,
        sector,
        &[Desc(DATA, 4096, false), Desc(DATA + 4096, 4096, false)],
    );
    assert_eq!(st, VIRTIO_BLK_S_OK as u8, "OUT on queue {queue}");
    let st = q.run(mem, VIRTIO_BLK_T_FLUSH, 0, &[]);
    assert_eq!(st, VIRTIO_BLK_S_OK as u8, "FLUSH on queue {queue}");
    assert_eq!(
        file_range(img, sector * 512, 8192),
        data,
        "file after FLUSH"
    );

    mem.write_slice(&[0u8; 8192], GuestAddress(DATA)).unwrap();
    let before = q.used_idx(mem);
    let st = q.run(mem, VIRTIO_BLK_T_IN, sector, &[Desc(DATA, 8192, true)]);
    assert_eq!(st, VIRTIO_BLK_S_OK as u8, "IN on queue {queue}");
    assert_eq!(q.used_elem(mem, before).1, 8193, "used length of IN");
    let mut back = vec![0u8; 8192];
    mem.read_slice(&mut back, GuestAddress(DATA)).unwrap();
    assert_eq!(back, data, "read back on queue {queue}");
}

#[test]
fn io_through_each_queue_reaches_the_file_and_reads_back_with_io_uring() {
    io_through_each_queue("io_uring");
}

#[test]
fn io_through_each_queue_reaches_the_file_and_reads_back_with_sync() {
    io_through_each_queue("sync");
}

fn io_through_each_queue(engine: &str) {
    let dir = tempfile::tempdir().unwrap();
    let img = disk(dir.path(), 4 * MIB);
    let daemon = Daemon::start(
        dir.path(),
        &img,
        &["--queues", "2", "--id", "vu-test-id", "--engine", engine],
    );
    let mut s = Session::open(&daemon.socket, 2);
    write_flush_read(&mut s, 0, 16, 1, &img);
    write_flush_read(&mut s, 1, 2048, 2, &img);

    // GET_ID, on queue 1.
    let st = s.queues[1].run(&s.mem, VIRTIO_BLK_T_GET_ID, 0, &[Desc(DATA, 20, true)]);
    assert_eq!(st, VIRTIO_BLK_S_OK as u8);
    let mut id = [0u8; 10];
    s.mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
    assert_eq!(&id, b"vu-test-id");

    // An unknown request type is answered, and the queue goes on.
    let st = s.queues[0].run(&s.mem, 0x55, 0, &[]);
    assert_eq!(st, VIRTIO_BLK_S_UNSUPP as u8);
    write_flush_read(&mut s, 0, 100, 3, &img);

    // Several requests in one kick.
    let q = &mut s.queues[0];
    let before = q.used_idx(&s.mem);
    for _ in 0..4 {
        q.add_request(&s.mem, VIRTIO_BLK_T_FLUSH, 0, &[]);
    }
    let start = Instant::now();
    q.kick.write(1).unwrap();
    while q.used_idx(&s.mem) != before.wrapping_add(4) {
        assert!(start.elapsed() < TIMEOUT, "4 requests not all served");
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(
        daemon.stderr().contains("frontend connected"),
        "{}",
        daemon.stderr()
    );
    assert!(
        daemon.stderr().contains(&format!("{engine} engine")),
        "{}",
        daemon.stderr()
    );
}

#[test]
fn an_out_of_order_message_is_refused_and_the_next_connection_works() {
    let dir = tempfile::tempdir().unwrap();
    let img = disk(dir.path(), MIB);
    let mut daemon = Daemon::start(dir.path(), &img, &[]);

    // SET_VRING_ADDR before SET_MEM_TABLE: the backend cannot translate it.
    let mut fe = connect(&daemon.socket, 1);
    let hs = handshake(&mut fe);
    fe.set_features(driver_features(hs.features)).unwrap();
    fe.set_vring_num(0, QSIZE).unwrap();
    let r = fe.set_vring_addr(
        0,
        &VringConfigData {
            queue_max_size: QSIZE,
            queue_size: QSIZE,
            flags: 0,
            desc_table_addr: 0x7000_0000,
            used_ring_addr: 0x7000_2000,
            avail_ring_addr: 0x7000_1000,
            log_addr: None,
        },
    );
    assert!(
        r.is_err(),
        "SET_VRING_ADDR before SET_MEM_TABLE was accepted"
    );
    drop(fe);

    // A message for a queue the device does not have (no GET_QUEUE_NUM, so the
    // frontend library does not stop it first).
    let mut fe = connect(&daemon.socket, 8);
    fe.set_owner().unwrap();
    let features = fe.get_features().unwrap();
    let protocol = fe.get_protocol_features().unwrap();
    fe.set_protocol_features(protocol).unwrap();
    fe.set_features(driver_features(features)).unwrap();
    assert!(
        fe.set_vring_num(5, QSIZE).is_err(),
        "SET_VRING_NUM on queue 5 accepted"
    );
    drop(fe);

    // The daemon serves the next frontend in full.
    let mut s = Session::open(&daemon.socket, 1);
    write_flush_read(&mut s, 0, 0, 9, &img);
    assert!(daemon.is_running());
    let log = daemon.stderr();
    assert_eq!(log.matches("frontend connection ended").count(), 2, "{log}");
}

/// A memory table whose region the daemon must not map: `file` with the region's size
/// `size` at offset 0, offered by a frontend that completed the handshake. Returns
/// whether SET_MEM_TABLE was accepted.
fn offer_memory_table(socket: &std::path::Path, file: &std::fs::File, size: u64) -> bool {
    use std::os::fd::AsRawFd;
    let mut fe = connect(socket, 1);
    let hs = handshake(&mut fe);
    fe.set_features(driver_features(hs.features)).unwrap();
    let region = vhost::VhostUserMemoryRegionInfo {
        guest_phys_addr: 0,
        memory_size: size,
        userspace_addr: 0x7f00_0000_0000,
        mmap_offset: 0,
        mmap_handle: file.as_raw_fd(),
    };
    fe.set_mem_table(&[region]).is_ok()
}

#[test]
fn a_memory_table_the_frontend_could_shrink_or_that_outruns_its_file_is_refused() {
    use evmm_virtio::vhost::shared_memory::sealed_memfd;
    let dir = tempfile::tempdir().unwrap();
    let img = disk(dir.path(), MIB);
    let mut daemon = Daemon::start(dir.path(), &img, &[]);

    // 4 KiB of sealed file described as 16 MiB of guest RAM: mapping it works, the first
    // access past 4 KiB would raise SIGBUS in the daemon.
    let short = sealed_memfd(c"short", 4096).unwrap();
    assert!(
        !offer_memory_table(&daemon.socket, &short, 16 * MIB),
        "a region past the end of its file was accepted"
    );
    // A whole file, but one the frontend may truncate at any time.
    let unsealed = tempfile::tempfile().unwrap();
    unsealed.set_len(16 * MIB).unwrap();
    assert!(
        !offer_memory_table(&daemon.socket, &unsealed, 16 * MIB),
        "a region of a file that may shrink was accepted"
    );

    // The daemon serves the next frontend in full.
    let mut s = Session::open(&daemon.socket, 1);
    write_flush_read(&mut s, 0, 0, 5, &img);
    assert!(daemon.is_running());
    let log = daemon.stderr();
    assert!(log.contains("ends past the end of its file"), "{log}");
    assert!(log.contains("not sealed against shrinking"), "{log}");
    assert_eq!(log.matches("memory table refused").count(), 2, "{log}");
}

#[test]
fn the_socket_is_for_the_daemons_user_and_other_users_are_turned_away() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let img = disk(dir.path(), MIB);
    let daemon = Daemon::start(dir.path(), &img, &[]);
    let mode = std::fs::metadata(&daemon.socket)
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "socket mode {mode:o}");
    drop(daemon);

    // A daemon that serves uid 4242 only: this process (any other uid) is closed before
    // vhost-user sees a byte.
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    assert_ne!(uid, 4242, "run the tests as another user");
    let mut daemon = Daemon::start_on(
        &dir.path().join("uid-4242.sock"),
        &img,
        &["--frontend-uid", "4242", "--socket-mode", "666"],
    );
    let mode = std::fs::metadata(&daemon.socket)
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o666);
    let mut raw = UnixStream::connect(&daemon.socket).unwrap();
    raw.set_read_timeout(Some(TIMEOUT)).unwrap();
    // GET_FEATURES with NEED_REPLY: never answered (the daemon may have closed the
    // connection before it is even written).
    let _ = raw.write_all(&[1, 0, 0, 0, 0x09, 0, 0, 0, 0, 0, 0, 0]);
    let sink = read_until_closed(&mut raw);
    assert!(
        sink.is_empty(),
        "a refused frontend got an answer: {sink:?}"
    );
    assert!(daemon.is_running());
    let log = daemon.stderr();
    assert!(log.contains("refused a frontend of uid"), "{log}");
    assert!(!log.contains("frontend connected"), "{log}");
}

#[test]
fn a_connection_that_never_says_set_owner_is_dropped_and_the_real_frontend_gets_in() {
    let dir = tempfile::tempdir().unwrap();
    let img = disk(dir.path(), MIB);
    let mut daemon = Daemon::start(dir.path(), &img, &["--handshake-timeout", "1"]);
    let mut idle = UnixStream::connect(&daemon.socket).unwrap();
    idle.set_read_timeout(Some(TIMEOUT)).unwrap();
    // The real frontend connects while the idle one holds the daemon: it is served once
    // the idle one is dropped.
    let mut s = Session::open(&daemon.socket, 1);
    read_until_closed(&mut idle);
    write_flush_read(&mut s, 0, 0, 6, &img);
    assert!(daemon.is_running());
    let log = daemon.stderr();
    assert!(log.contains("no SET_OWNER within 1000 ms"), "{log}");
}

#[test]
fn random_bytes_on_the_socket_end_that_connection_only() {
    let dir = tempfile::tempdir().unwrap();
    let img = disk(dir.path(), MIB);
    let mut daemon = Daemon::start(dir.path(), &img, &[]);

    for garbage in [
        // A header claiming an absurd size, then noise.
        {
            let mut g = vec![0xffu8; 12];
            g.extend(pattern(500, 7));
            g
        },
        // A valid-looking GET_FEATURES header with a bad version, then noise.
        {
            let mut g = vec![1, 0, 0, 0, 0x7, 0, 0, 0, 0, 0, 0, 0];
            g.extend(pattern(64, 1));
            g
        },
        // A truncated header.
        vec![3, 0],
    ] {
        let mut raw = UnixStream::connect(&daemon.socket).unwrap();
        raw.set_read_timeout(Some(TIMEOUT)).unwrap();
        // The daemon may drop the connection before all of it is written (it sees an
        // impossible message size in the first 12 bytes).
        if let Err(e) = raw.write_all(&garbage) {
            assert!(
                matches!(
                    e.kind(),
                    std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
                ),
                "{e}"
            );
        }
        let _ = raw.shutdown(std::net::Shutdown::Write);
        // The daemon drops the connection (EOF, or a reset), possibly after an error
        // reply; it never hangs on it.
        read_until_closed(&mut raw);
    }
    let mut s = Session::open(&daemon.socket, 1);
    write_flush_read(&mut s, 0, 8, 4, &img);
    assert!(daemon.is_running());
}

#[test]
fn a_frontend_that_disconnects_leaves_the_daemon_ready_for_the_next() {
    let dir = tempfile::tempdir().unwrap();
    let img = disk(dir.path(), 2 * MIB);
    let daemon = Daemon::start(dir.path(), &img, &["--queues", "2"]);
    let mut fds_after_first = 0;
    for round in 0..12u8 {
        // SET_OWNER would fail on a backend that kept the last frontend's state.
        let mut s = Session::open(&daemon.socket, 2);
        let queue = usize::from(round % 2);
        write_flush_read(&mut s, queue, u64::from(round) * 64, round, &img);
        if round < 11 {
            // Leave mid-session: requests made available but never kicked.
            s.queues[0].add_request(&s.mem, VIRTIO_BLK_T_FLUSH, 0, &[]);
        }
        drop(s);
        // Wait for the daemon to finish the connection before counting descriptors.
        let start = Instant::now();
        while daemon.stderr().matches("frontend disconnected").count() < usize::from(round) + 1 {
            assert!(
                start.elapsed() < TIMEOUT,
                "disconnect not seen:\n{}",
                daemon.stderr()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        // The daemon logs the end of a connection after its threads and descriptors
        // are gone.
        if round == 1 {
            fds_after_first = daemon.open_fds();
        } else if round > 1 {
            assert_eq!(
                daemon.open_fds(),
                fds_after_first,
                "the daemon leaks descriptors across connections (round {round}): {:#?}\n{}",
                daemon.fd_targets(),
                daemon.stderr()
            );
        }
    }
    // Everything every connection wrote is in the file.
    for round in 0..12u8 {
        assert_eq!(
            file_range(&img, u64::from(round) * 64 * 512, 8192),
            pattern(8192, round)
        );
    }
}

#[test]
fn sigterm_with_a_frontend_connected_flushes_removes_the_socket_and_exits_0() {
    let dir = tempfile::tempdir().unwrap();
    let img = disk(dir.path(), 2 * MIB);
    let mut daemon = Daemon::start(dir.path(), &img, &["--queues", "2"]);
    let mut s = Session::open(&daemon.socket, 2);
    write_flush_read(&mut s, 1, 40, 5, &img);
    // Written but not flushed by the driver: fdatasync at exit makes it durable; it is
    // in the file either way.
    let last = pattern(4096, 6);
    s.mem.write_slice(&last, GuestAddress(DATA)).unwrap();
    let st = s.queues[0].run(&s.mem, VIRTIO_BLK_T_OUT, 200, &[Desc(DATA, 4096, false)]);
    assert_eq!(st, VIRTIO_BLK_S_OK as u8);

    let status = daemon.signal_and_wait(libc::SIGTERM);
    assert!(
        status.success(),
        "exit status {status}; stderr:\n{}",
        daemon.stderr()
    );
    assert!(!daemon.socket.exists(), "socket file left behind");
    assert_eq!(file_range(&img, 40 * 512, 8192), pattern(8192, 5));
    assert_eq!(file_range(&img, 200 * 512, 4096), last);
    // The frontend sees the connection gone.
    assert!(s.fe.get_features().is_err());
}

#[test]
fn sigint_while_idle_exits_0_and_removes_the_socket() {
    let dir = tempfile::tempdir().unwrap();
    let img = disk(dir.path(), MIB);
    let mut daemon = Daemon::start(dir.path(), &img, &[]);
    let status = daemon.signal_and_wait(libc::SIGINT);
    assert!(
        status.success(),
        "exit status {status}; stderr:\n{}",
        daemon.stderr()
    );
    assert!(!daemon.socket.exists());
}

#[test]
fn bad_input_is_a_clear_error_and_nothing_is_lost() {
    let dir = tempfile::tempdir().unwrap();
    let img = disk(dir.path(), MIB);
    let sock = dir.path().join("s.sock");
    let (sock_s, img_s) = (sock.to_str().unwrap(), img.to_str().unwrap());

    let (st, err) = run_to_end(&["--socket", sock_s, "--disk", "/nonexistent/disk.img"]);
    assert!(!st.success());
    assert!(
        err.contains("cannot open disk /nonexistent/disk.img"),
        "{err}"
    );
    assert!(!sock.exists(), "a socket was created for a missing disk");

    for q in ["0", "65", "many"] {
        let (st, err) = run_to_end(&["--socket", sock_s, "--disk", img_s, "--queues", q]);
        assert!(!st.success(), "--queues {q} accepted");
        assert!(err.contains("--queues"), "{err}");
    }
    let (st, err) = run_to_end(&["--socket", sock_s, "--disk", img_s, "--id", &"x".repeat(21)]);
    assert!(!st.success());
    assert!(err.contains("longer than 20 bytes"), "{err}");

    let missing = dir.path().join("no-such-dir/s.sock");
    let (st, err) = run_to_end(&["--socket", missing.to_str().unwrap(), "--disk", img_s]);
    assert!(!st.success());
    assert!(
        err.contains("cannot listen on") && err.contains("No such file"),
        "{err}"
    );

    let (st, err) = run_to_end(&["--socket", img_s, "--disk", img_s]);
    assert!(!st.success());
    assert!(err.contains("not a socket"), "{err}");
    assert_eq!(
        std::fs::metadata(&img).unwrap().len(),
        MIB,
        "the disk was touched"
    );

    // A socket in use: the second daemon refuses, the first one goes on serving.
    let mut first = Daemon::start_on(&sock, &img, &[]);
    let (st, err) = run_to_end(&["--socket", sock_s, "--disk", img_s]);
    assert!(!st.success());
    assert!(err.contains("in use"), "{err}");
    assert!(sock.exists() && first.is_running());
    let mut s = Session::open(&sock, 1);
    write_flush_read(&mut s, 0, 0, 8, &img);
}

#[test]
fn a_broken_ring_stops_its_queue_not_the_daemon() {
    let dir = tempfile::tempdir().unwrap();
    let img = disk(dir.path(), MIB);
    let mut daemon = Daemon::start(dir.path(), &img, &["--queues", "2"]);
    let mut s = Session::open(&daemon.socket, 2);
    // Queue 0's descriptor table now points at the last 16 bytes of guest memory: the
    // first chain's descriptors lie outside it.
    s.fe.get_vring_base(0).unwrap();
    s.fe.set_vring_addr(
        0,
        &VringConfigData {
            queue_max_size: QSIZE,
            queue_size: QSIZE,
            flags: 0,
            desc_table_addr: host_addr(&s.mem, MEM_SIZE as u64 - 16),
            used_ring_addr: host_addr(&s.mem, 0x2000),
            avail_ring_addr: host_addr(&s.mem, 0x1000),
            log_addr: None,
        },
    )
    .unwrap();
    s.fe.set_vring_base(0, 0).unwrap();
    s.fe.set_vring_kick(0, &s.queues[0].kick).unwrap();
    s.fe.set_vring_call(0, &s.queues[0].call).unwrap();
    s.fe.set_vring_enable(0, true).unwrap();
    s.mem.write_slice(&[0u8; 0x3000], GuestAddress(0)).unwrap();
    // Make head 1 available: its descriptor lies beyond the end of memory.
    s.mem.write_obj(1u16, GuestAddress(0x1004)).unwrap();
    s.mem.write_obj(1u16, GuestAddress(0x1002)).unwrap();
    s.queues[0].kick.write(1).unwrap();
    let start = Instant::now();
    while !daemon.stderr().contains("stopped after a guest fault") {
        assert!(
            start.elapsed() < TIMEOUT,
            "no fault logged:\n{}",
            daemon.stderr()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(
        s.queues[0].used_idx(&s.mem),
        0,
        "a used entry for a broken chain"
    );
    // Queue 1 is not affected.
    write_flush_read(&mut s, 1, 64, 12, &img);
    drop(s);
    // Nor is the next frontend.
    let mut s = Session::open(&daemon.socket, 2);
    write_flush_read(&mut s, 0, 0, 13, &img);
    assert!(daemon.is_running());
}
