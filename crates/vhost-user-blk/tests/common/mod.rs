//! Helpers of the protocol tests: the daemon as a child process, guest memory in a
//! memfd shared with it, a vhost-user frontend (the `vhost` crate's own) and a tiny
//! virtio-blk driver that writes requests into a split virtqueue.

#![allow(dead_code)]

pub use evmm_virtio::test_utils::Desc;
use evmm_virtio::test_utils::{memfd_memory, DriverRing};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};
use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_bindings::virtio_blk::VIRTIO_BLK_F_FLUSH;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// How long anything may take before a test gives up.
pub const TIMEOUT: Duration = Duration::from_secs(20);

/// The daemon binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_evmm-vhost-user-blk");

/// Waits for `child` up to `limit`; None if it is still running.
pub fn wait_timeout(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return Some(status);
        }
        if start.elapsed() > limit {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs the binary with `args` to its end (killing it after [`TIMEOUT`]); returns
/// its status and stderr.
pub fn run_to_end(args: &[&str]) -> (ExitStatus, String) {
    let dir = tempfile::tempdir().unwrap();
    let err_path = dir.path().join("stderr");
    let mut child = Command::new(BIN)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(File::create(&err_path).unwrap())
        .spawn()
        .expect("spawn the daemon");
    let status = match wait_timeout(&mut child, TIMEOUT) {
        Some(s) => s,
        None => {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{args:?} did not end; stderr:\n{}",
                std::fs::read_to_string(&err_path).unwrap_or_default()
            );
        }
    };
    (
        status,
        std::fs::read_to_string(&err_path).unwrap_or_default(),
    )
}

/// The daemon, running as a child process; killed when dropped.
pub struct Daemon {
    child: Child,
    /// Its socket.
    pub socket: PathBuf,
    stderr: PathBuf,
}

impl Daemon {
    /// Starts the daemon on `disk` with a socket in `dir` and `extra` arguments, and
    /// waits for its socket.
    pub fn start(dir: &Path, disk: &Path, extra: &[&str]) -> Self {
        let socket = dir.join("vu.sock");
        Self::start_on(&socket, disk, extra)
    }

    /// Starts the daemon on `socket`.
    pub fn start_on(socket: &Path, disk: &Path, extra: &[&str]) -> Self {
        let stderr = socket.with_extension(format!("stderr-{}", std::process::id()));
        let child = Command::new(BIN)
            .arg("--socket")
            .arg(socket)
            .arg("--disk")
            .arg(disk)
            .args(["--log-level", "debug"])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&stderr).unwrap())
            .spawn()
            .expect("spawn the daemon");
        let mut d = Self {
            child,
            socket: socket.to_path_buf(),
            stderr,
        };
        let start = Instant::now();
        while !socket.exists() {
            if let Some(status) = d.child.try_wait().unwrap() {
                panic!("daemon exited ({status}) before listening:\n{}", d.stderr());
            }
            assert!(
                start.elapsed() < TIMEOUT,
                "no socket; stderr:\n{}",
                d.stderr()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        d
    }

    /// Its stderr so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Its pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether it still runs.
    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// Sends `signal` and waits for the exit.
    pub fn signal_and_wait(&mut self, signal: libc::c_int) -> ExitStatus {
        let pid = libc::pid_t::try_from(self.child.id()).unwrap();
        // SAFETY: kill() only sends a signal to our own child process.
        assert_eq!(unsafe { libc::kill(pid, signal) }, 0);
        match wait_timeout(&mut self.child, TIMEOUT) {
            Some(s) => s,
            None => panic!("daemon ignored signal {signal}; stderr:\n{}", self.stderr()),
        }
    }

    /// What each open descriptor of the daemon is (for failure messages).
    pub fn fd_targets(&self) -> Vec<String> {
        let dir = format!("/proc/{}/fd", self.pid());
        let mut v: Vec<String> = std::fs::read_dir(&dir)
            .map(|d| {
                d.filter_map(Result::ok)
                    .map(|e| {
                        let target = std::fs::read_link(e.path())
                            .map(|t| t.display().to_string())
                            .unwrap_or_default();
                        format!("{} -> {target}", e.file_name().to_string_lossy())
                    })
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }

    /// Number of open file descriptors of the daemon.
    pub fn open_fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .unwrap()
            .count()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        let _ = std::fs::remove_file(&self.stderr);
    }
}

/// Reads `stream` until the daemon ends the connection (EOF, or a reset) and returns
/// what it sent; fails if the connection stays open past the stream's read timeout.
pub fn read_until_closed(stream: &mut std::os::unix::net::UnixStream) -> Vec<u8> {
    use std::io::Read;
    let mut got = Vec::new();
    let r = stream.read_to_end(&mut got);
    assert!(
        r.is_ok()
            || r.as_ref()
                .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionReset),
        "the daemon did not end the connection: {r:?}"
    );
    got
}

/// A disk file of `len` bytes (zeros) in `dir`.
pub fn disk(dir: &Path, len: u64) -> PathBuf {
    let path = dir.join("disk.img");
    let f = File::create(&path).unwrap();
    f.set_len(len).unwrap();
    path
}

/// Guest memory size of the tests.
pub const MEM_SIZE: usize = 4 << 20;
/// Queue size of the tests.
pub const QSIZE: u16 = 16;
/// Where requests' headers, data and status bytes go.
pub const HDR: u64 = 0x10_0000;
/// Data buffers.
pub const DATA: u64 = 0x20_0000;
/// Status byte.
pub const STATUS: u64 = 0x3f_f000;

/// Guest memory in a memfd, shared with the daemon through SET_MEM_TABLE.
pub fn guest_memory() -> GuestMemoryMmap {
    memfd_memory(MEM_SIZE)
}

/// The memory table entry of `mem` for SET_MEM_TABLE.
pub fn memory_region(mem: &GuestMemoryMmap) -> VhostUserMemoryRegionInfo {
    let region = mem.find_region(GuestAddress(0)).unwrap();
    VhostUserMemoryRegionInfo::from_guest_region(region).unwrap()
}

/// The host address of guest address `gpa` (what vring addresses are given in).
pub fn host_addr(mem: &GuestMemoryMmap, gpa: u64) -> u64 {
    mem.get_host_address(GuestAddress(gpa)).unwrap() as u64
}

/// Connects a frontend that asks for an acknowledgement of every message.
pub fn connect(socket: &Path, queues: u64) -> Frontend {
    let fe = Frontend::connect(socket, queues).expect("connect");
    fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
    fe
}

/// The features a Linux virtio-blk driver takes: VERSION_1, EVENT_IDX, FLUSH, and the
/// vhost-user protocol bit.
pub fn driver_features(offered: u64) -> u64 {
    let wanted = (1 << VIRTIO_F_VERSION_1)
        | (1 << VIRTIO_RING_F_EVENT_IDX)
        | (1 << VIRTIO_BLK_F_FLUSH)
        | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
    offered & wanted
}

/// What the handshake learnt.
pub struct Handshake {
    /// The virtio features offered.
    pub features: u64,
    /// The protocol features offered.
    pub protocol: VhostUserProtocolFeatures,
    /// GET_QUEUE_NUM.
    pub queues: u64,
    /// The first 60 bytes of the configuration space.
    pub config: Vec<u8>,
}

/// QEMU's order: SET_OWNER, GET_FEATURES, GET/SET_PROTOCOL_FEATURES, GET_QUEUE_NUM,
/// GET_CONFIG.
pub fn handshake(fe: &mut Frontend) -> Handshake {
    fe.set_owner().expect("SET_OWNER");
    let features = fe.get_features().expect("GET_FEATURES");
    let protocol = fe.get_protocol_features().expect("GET_PROTOCOL_FEATURES");
    fe.set_protocol_features(protocol)
        .expect("SET_PROTOCOL_FEATURES");
    let queues = fe.get_queue_num().expect("GET_QUEUE_NUM");
    let (_, config) = fe
        .get_config(0, 60, VhostUserConfigFlags::empty(), &[0u8; 60])
        .expect("GET_CONFIG");
    Handshake {
        features,
        protocol,
        queues,
        config,
    }
}

/// A split virtqueue the test drives as a virtio driver would.
pub struct TestQueue {
    /// The queue index.
    pub index: usize,
    /// The rings in guest memory.
    pub ring: DriverRing,
    /// The kick eventfd (the test writes it).
    pub kick: EventFd,
    /// The call eventfd (the daemon writes it).
    pub call: EventFd,
}

impl TestQueue {
    /// Queue `index`'s rings at 64 KiB * index.
    pub fn new(index: usize) -> Self {
        Self {
            index,
            ring: DriverRing::at(0x1_0000 * index as u64, QSIZE),
            kick: EventFd::new(EFD_NONBLOCK).unwrap(),
            call: EventFd::new(EFD_NONBLOCK).unwrap(),
        }
    }

    /// Zeroes the rings and hands the queue to the backend: SET_VRING_NUM, _ADDR,
    /// _BASE, _CALL, _KICK, _ENABLE.
    pub fn setup(&mut self, fe: &mut Frontend, mem: &GuestMemoryMmap) {
        self.ring.clear(mem);
        fe.set_vring_num(self.index, QSIZE).expect("SET_VRING_NUM");
        fe.set_vring_addr(
            self.index,
            &VringConfigData {
                queue_max_size: QSIZE,
                queue_size: QSIZE,
                flags: 0,
                desc_table_addr: host_addr(mem, self.ring.desc),
                used_ring_addr: host_addr(mem, self.ring.used),
                avail_ring_addr: host_addr(mem, self.ring.avail),
                log_addr: None,
            },
        )
        .expect("SET_VRING_ADDR");
        fe.set_vring_base(self.index, 0).expect("SET_VRING_BASE");
        fe.set_vring_call(self.index, &self.call)
            .expect("SET_VRING_CALL");
        fe.set_vring_kick(self.index, &self.kick)
            .expect("SET_VRING_KICK");
        fe.set_vring_enable(self.index, true)
            .expect("SET_VRING_ENABLE");
    }

    /// Writes a request (header, `data` descriptors, status) and makes it available
    /// with EVENT_IDX's used_event at it (call me once it is used); returns its head.
    pub fn add_request(
        &mut self,
        mem: &GuestMemoryMmap,
        request_type: u32,
        sector: u64,
        data: &[Desc],
    ) -> u16 {
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&request_type.to_le_bytes());
        h[8..].copy_from_slice(&sector.to_le_bytes());
        mem.write_slice(&h, GuestAddress(HDR)).unwrap();
        mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        let mut descs = vec![Desc(HDR, 16, false)];
        descs.extend_from_slice(data);
        descs.push(Desc(STATUS, 1, true));
        self.ring.set_used_event(mem, self.ring.avail_idx());
        self.ring.add_chain(mem, &descs)
    }

    /// Kicks the queue and waits for the call; returns the used ring's index.
    pub fn kick_and_wait(&self, mem: &GuestMemoryMmap) -> u16 {
        self.kick.write(1).unwrap();
        let start = Instant::now();
        loop {
            if self.call.read().is_ok() {
                return self.used_idx(mem);
            }
            assert!(
                start.elapsed() < TIMEOUT,
                "queue {}: no call after a kick (used idx {})",
                self.index,
                self.used_idx(mem)
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// The used ring's index.
    pub fn used_idx(&self, mem: &GuestMemoryMmap) -> u16 {
        self.ring.used_idx(mem)
    }

    /// Used element `i`: (head, length).
    pub fn used_elem(&self, mem: &GuestMemoryMmap, i: u16) -> (u32, u32) {
        self.ring.used_elem(mem, i)
    }

    /// Runs one request to completion; returns its status byte.
    pub fn run(
        &mut self,
        mem: &GuestMemoryMmap,
        request_type: u32,
        sector: u64,
        data: &[Desc],
    ) -> u8 {
        let before = self.used_idx(mem);
        let head = self.add_request(mem, request_type, sector, data);
        let after = self.kick_and_wait(mem);
        assert_eq!(after, before.wrapping_add(1), "queue {}", self.index);
        assert_eq!(self.used_elem(mem, before).0, u32::from(head));
        mem.read_obj(GuestAddress(STATUS)).unwrap()
    }
}

/// A full session: handshake, features, memory, and the given queues set up.
pub struct Session {
    /// The frontend.
    pub fe: Frontend,
    /// Guest memory.
    pub mem: GuestMemoryMmap,
    /// The queues set up.
    pub queues: Vec<TestQueue>,
    /// What the handshake learnt.
    pub hs: Handshake,
}

impl Session {
    /// Connects to `socket` and sets up `queues` queues.
    pub fn open(socket: &Path, queues: usize) -> Self {
        let mut fe = connect(socket, queues as u64);
        let hs = handshake(&mut fe);
        fe.set_features(driver_features(hs.features))
            .expect("SET_FEATURES");
        let mem = guest_memory();
        fe.set_mem_table(&[memory_region(&mem)])
            .expect("SET_MEM_TABLE");
        let mut qs: Vec<TestQueue> = (0..queues).map(TestQueue::new).collect();
        for q in &mut qs {
            q.setup(&mut fe, &mem);
        }
        Self {
            fe,
            mem,
            queues: qs,
            hs,
        }
    }
}

/// A recognisable pattern.
pub fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(31).wrapping_add(u32::from(seed)) as u8 | 1)
        .collect()
}

/// `len` bytes of `file` at `offset`.
pub fn file_range(file: &Path, offset: u64, len: usize) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; len];
    File::open(file)
        .unwrap()
        .read_exact_at(&mut buf, offset)
        .unwrap();
    buf
}
