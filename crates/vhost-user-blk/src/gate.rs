//! The daemon's front door: who may be a frontend, and how long one may take to say
//! hello.
//!
//! The daemon accepts on its public socket itself, so it can look at the peer's
//! credentials (`SO_PEERCRED`) before vhost-user-backend sees a byte: a frontend of a
//! user that is not admitted ([`Admitted`]) is closed at once. An admitted connection is
//! handed to vhost-user-backend through a [`Relay`]: the daemon connects to a listener
//! of its own in a private (0700) directory, vhost-user-backend accepts that (and the
//! listener and its directory are removed), and a relay thread copies the frontend's messages and their file descriptors both ways. Only
//! control messages take that hop; the data path (guest memory, kick and call eventfds)
//! is direct. The relay also ends a connection whose frontend has not sent SET_OWNER
//! within the handshake timeout, so a connection that only sits there cannot lock the
//! real frontend out.

use std::io::{self, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::str::FromStr;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use vhost::vhost_user::Listener;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// The vhost-user request code of SET_OWNER, the first message of every handshake.
const SET_OWNER: u32 = 3;
/// A vhost-user message header: request, flags, size (u32 each).
const HEADER_LEN: usize = 12;
/// The most descriptors one vhost-user message carries (the protocol's limit is 32).
const MAX_FDS: usize = 32;
/// The largest message body relayed (vhost-user bodies are at most a few KiB; a
/// memory table of 509 regions is 16 KiB).
const MAX_BODY: usize = 64 * 1024;

/// The users whose frontends may connect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admitted {
    /// These uids.
    Uids(Vec<u32>),
    /// Every user who can open the socket.
    Anyone,
}

impl Admitted {
    /// The daemon's own user alone (the default).
    pub fn own_user() -> Self {
        // SAFETY: geteuid has no preconditions and cannot fail.
        let uid = unsafe { libc::geteuid() };
        Admitted::Uids(vec![uid])
    }

    /// Whether a frontend of `uid` may connect.
    pub fn admits(&self, uid: u32) -> bool {
        match self {
            Admitted::Uids(uids) => uids.contains(&uid),
            Admitted::Anyone => true,
        }
    }
}

impl std::fmt::Display for Admitted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Admitted::Anyone => f.write_str("any user"),
            Admitted::Uids(uids) => {
                let list: Vec<String> = uids.iter().map(u32::to_string).collect();
                write!(f, "uid {}", list.join(", "))
            }
        }
    }
}

/// One `--frontend-uid` value: a uid or `any`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrontendUid {
    /// This uid.
    Uid(u32),
    /// Every user.
    Any,
}

impl FromStr for FrontendUid {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s == "any" {
            return Ok(FrontendUid::Any);
        }
        s.parse()
            .map(FrontendUid::Uid)
            .map_err(|_| format!("{s:?} is neither a numeric uid nor `any`"))
    }
}

impl Admitted {
    /// From the `--frontend-uid` values (none: [`Admitted::own_user`]).
    pub fn from_options(values: &[FrontendUid]) -> Self {
        if values.is_empty() {
            return Self::own_user();
        }
        if values.contains(&FrontendUid::Any) {
            return Admitted::Anyone;
        }
        Admitted::Uids(
            values
                .iter()
                .filter_map(|v| match v {
                    FrontendUid::Uid(u) => Some(*u),
                    FrontendUid::Any => None,
                })
                .collect(),
        )
    }
}

/// The uid of the process at the other end of `stream` when it connected.
pub fn peer_uid(stream: &UnixStream) -> io::Result<u32> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred` and `len` are valid for writes of the sizes given, and the kernel
    // writes at most `len` bytes into `cred`.
    let r = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cred.uid)
}

/// The private listener one connection is handed over on: vhost-user-backend accepts
/// from it the client end the daemon connected. It lives in a fresh directory only the
/// daemon's user can enter, and both go when it is dropped (right after the hand-over).
pub struct Relay {
    listener: Listener,
    path: PathBuf,
    // Dropped last: removes the directory and the socket in it.
    _dir: tempfile::TempDir,
}

impl Relay {
    /// A listener in a fresh 0700 directory.
    pub fn new() -> io::Result<Self> {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::Builder::new()
            .prefix("evmm-vu-blk-relay.")
            .permissions(std::fs::Permissions::from_mode(0o700))
            .tempdir()?;
        let path = dir.path().join("backend.sock");
        let listener = Listener::from(UnixListener::bind(&path)?);
        Ok(Self {
            listener,
            path,
            _dir: dir,
        })
    }

    /// Connects a client to the private listener; `vhost-user-backend` accepts it from
    /// [`Relay::listener`].
    pub fn connect(&self) -> io::Result<UnixStream> {
        UnixStream::connect(&self.path)
    }

    /// The listener to hand to `VhostUserDaemon::start`.
    pub fn listener(&mut self) -> &mut Listener {
        &mut self.listener
    }
}

/// Starts the thread that relays between `frontend` and `backend` until either side
/// hangs up, or until `handshake` has passed without SET_OWNER from the frontend. Both
/// sockets are shut down when it ends; shutting `frontend` down from elsewhere (keep a
/// clone) ends it too.
pub fn spawn_relay(
    frontend: UnixStream,
    backend: UnixStream,
    handshake: Duration,
) -> io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name("evmm-vu-relay".into())
        .spawn(move || {
            if let Err(e) = evmm_seccomp::confine_once(evmm_seccomp::ThreadKind::DaemonRelay) {
                log::error!("{e}");
            }
            let ended = relay(&frontend, &backend, handshake);
            match ended {
                Ok(Ended::HungUp) => log::debug!("relay: a side hung up"),
                Ok(Ended::NoHandshake) => log::warn!(
                    "frontend closed: no SET_OWNER within {} ms of connecting",
                    handshake.as_millis()
                ),
                Err(e) => log::debug!("relay ended: {e}"),
            }
            let _ = frontend.shutdown(std::net::Shutdown::Both);
            let _ = backend.shutdown(std::net::Shutdown::Both);
        })
}

/// Why a relay ended without an error.
#[derive(Debug, PartialEq, Eq)]
enum Ended {
    HungUp,
    NoHandshake,
}

fn relay(frontend: &UnixStream, backend: &UnixStream, handshake: Duration) -> io::Result<Ended> {
    let deadline = Instant::now() + handshake;
    let mut owner_seen = false;
    let mut message = Vec::with_capacity(HEADER_LEN + 4096);
    // Until SET_OWNER, no read of the frontend may outlast the deadline, even one in the
    // middle of a message.
    frontend.set_read_timeout(Some(handshake))?;
    loop {
        let timeout = if owner_seen {
            -1
        } else {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(Ended::NoHandshake);
            }
            i32::try_from(left.as_millis().max(1)).unwrap_or(i32::MAX)
        };
        let mut fds = [
            libc::pollfd {
                fd: frontend.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: backend.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: `fds` is a valid array of two pollfd structs that outlives the call,
        // and its length is passed with it.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        for (i, (from, to)) in [(frontend, backend), (backend, frontend)]
            .into_iter()
            .enumerate()
        {
            if fds[i].revents == 0 {
                continue;
            }
            let passed = match read_message(from, &mut message) {
                Ok(Some(passed)) => passed,
                Ok(None) => return Ok(Ended::HungUp),
                Err(e)
                    if !owner_seen
                        && matches!(
                            e.kind(),
                            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                        ) =>
                {
                    return Ok(Ended::NoHandshake)
                }
                Err(e) => return Err(e),
            };
            if i == 0 && !owner_seen && request_of(&message) == SET_OWNER {
                owner_seen = true;
                frontend.set_read_timeout(None)?;
            }
            send(to, &message, &passed)?;
        }
    }
}

/// The request code in a message's header.
fn request_of(message: &[u8]) -> u32 {
    u32_at(message, 0)
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    let mut word = [0u8; 4];
    if let Some(src) = bytes.get(at..at + 4) {
        word.copy_from_slice(src);
    }
    u32::from_le_bytes(word)
}

/// Reads one whole vhost-user message (header and body) from `from` into `message`,
/// with the descriptors that came with it. `None`: `from` hung up between messages.
///
/// Message by message, because one read of a UNIX stream socket may run from one
/// message into the next and return the next one's descriptors: forwarded as one
/// chunk, they would arrive with the wrong message.
fn read_message(from: &UnixStream, message: &mut Vec<u8>) -> io::Result<Option<Vec<OwnedFd>>> {
    let mut passed = Vec::new();
    message.clear();
    message.resize(HEADER_LEN, 0);
    if !read_exact_with_fds(from, message, &mut passed)? {
        return Ok(None);
    }
    let size = u32_at(message, 8) as usize;
    if size > MAX_BODY {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("a message body of {size} bytes (at most {MAX_BODY})"),
        ));
    }
    message.resize(HEADER_LEN + size, 0);
    if let Some(body) = message.get_mut(HEADER_LEN..) {
        if !body.is_empty() && !read_exact_with_fds(from, body, &mut passed)? {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
    }
    Ok(Some(passed))
}

/// Fills `buf` from `from`, collecting descriptors into `passed` (at most [`MAX_FDS`];
/// the rest are closed). False if `from` hung up before the first byte.
fn read_exact_with_fds(
    from: &UnixStream,
    buf: &mut [u8],
    passed: &mut Vec<OwnedFd>,
) -> io::Result<bool> {
    let mut done = 0;
    while done < buf.len() {
        let rest = buf.get_mut(done..).unwrap_or_default();
        let mut raw: [RawFd; MAX_FDS] = [-1; MAX_FDS];
        let mut iov = [libc::iovec {
            iov_base: rest.as_mut_ptr().cast(),
            iov_len: rest.len(),
        }];
        // SAFETY: the iovec points into `buf`, which is valid for writes of that length
        // and outlives the call.
        let got = unsafe { from.recv_with_fds(&mut iov, &mut raw) };
        let (len, nfds) = match got {
            Ok(r) => r,
            Err(e) if e.errno() == libc::EINTR => continue,
            Err(e) => return Err(io::Error::from_raw_os_error(e.errno())),
        };
        for &fd in raw.iter().take(nfds) {
            // SAFETY: descriptors the kernel just installed for this process; nothing
            // else owns them.
            let fd = unsafe { OwnedFd::from_raw_fd(fd) };
            if passed.len() < MAX_FDS {
                passed.push(fd);
            }
        }
        if len == 0 {
            if done == 0 {
                return Ok(false);
            }
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        done += len;
    }
    Ok(true)
}

/// Writes all of `data` to `to`, the descriptors with its first byte.
fn send(mut to: &UnixStream, data: &[u8], passed: &[OwnedFd]) -> io::Result<()> {
    let raw: Vec<RawFd> = passed.iter().map(AsRawFd::as_raw_fd).collect();
    let sent = if raw.is_empty() {
        0
    } else {
        to.send_with_fds(&[data], &raw)
            .map_err(|e| io::Error::from_raw_os_error(e.errno()))?
    };
    to.write_all(data.get(sent..).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn header(request: u32, size: u32) -> Vec<u8> {
        let mut h = request.to_le_bytes().to_vec();
        h.extend(1u32.to_le_bytes());
        h.extend(size.to_le_bytes());
        h
    }

    #[test]
    fn messages_are_relayed_one_by_one_with_their_own_descriptors() {
        // Two messages sent back to back, only the second with a descriptor: one read of
        // the socket could return both, with the descriptor; it must arrive with the
        // second.
        let (frontend, fe_peer) = UnixStream::pair().unwrap();
        let (backend, be_peer) = UnixStream::pair().unwrap();
        let t = spawn_relay(fe_peer, be_peer, Duration::from_secs(5)).unwrap();
        let first = header(SET_OWNER, 0);
        let mut second = header(5, 8);
        second.extend(7u64.to_le_bytes());
        (&frontend).write_all(&first).unwrap();
        let (_r, w) = std::io::pipe().unwrap();
        frontend
            .send_with_fds(&[&second[..]], &[w.as_raw_fd()])
            .unwrap();
        let mut got = Vec::new();
        for want in [&first, &second] {
            let mut buf = vec![0u8; want.len()];
            let mut fds = [-1; 4];
            let mut iov = [libc::iovec {
                iov_base: buf.as_mut_ptr().cast(),
                iov_len: buf.len(),
            }];
            // SAFETY: the iovec points into `buf`, valid for writes.
            let (len, nfds) = unsafe { backend.recv_with_fds(&mut iov, &mut fds) }.unwrap();
            assert_eq!(&buf[..len], &want[..]);
            got.push(nfds);
            for fd in fds.iter().take(nfds) {
                // SAFETY: a descriptor the kernel just gave this process.
                drop(unsafe { OwnedFd::from_raw_fd(*fd) });
            }
        }
        assert_eq!(got, [0, 1]);
        drop(frontend);
        t.join().unwrap();
    }

    #[test]
    fn an_oversized_body_ends_the_relay() {
        let (frontend, fe_peer) = UnixStream::pair().unwrap();
        let (backend, be_peer) = UnixStream::pair().unwrap();
        let t = spawn_relay(fe_peer, be_peer, Duration::from_secs(5)).unwrap();
        (&frontend).write_all(&header(SET_OWNER, u32::MAX)).unwrap();
        let mut all = Vec::new();
        (&backend).read_to_end(&mut all).unwrap();
        assert!(all.is_empty());
        t.join().unwrap();
    }

    #[test]
    fn admitted_users_from_the_options() {
        let own = Admitted::own_user();
        // SAFETY: geteuid has no preconditions.
        let uid = unsafe { libc::geteuid() };
        assert!(own.admits(uid));
        assert_eq!(Admitted::from_options(&[]), own);
        let some = Admitted::from_options(&[FrontendUid::Uid(7), FrontendUid::Uid(9)]);
        assert!(some.admits(9) && !some.admits(0));
        assert_eq!(
            Admitted::from_options(&[FrontendUid::Uid(7), FrontendUid::Any]),
            Admitted::Anyone
        );
        assert_eq!("any".parse::<FrontendUid>(), Ok(FrontendUid::Any));
        assert!("root".parse::<FrontendUid>().is_err());
    }

    #[test]
    fn peer_uid_is_the_connecting_user() {
        let (a, _b) = UnixStream::pair().unwrap();
        // SAFETY: geteuid has no preconditions.
        let uid = unsafe { libc::geteuid() };
        assert_eq!(peer_uid(&a).unwrap(), uid);
    }

    #[test]
    fn the_relay_carries_bytes_and_descriptors_both_ways() {
        let (frontend, fe_peer) = UnixStream::pair().unwrap();
        let (backend, be_peer) = UnixStream::pair().unwrap();
        let t = spawn_relay(fe_peer, be_peer, Duration::from_secs(5)).unwrap();
        // A message with a descriptor (a pipe's write end) from the frontend.
        let (mut r, w) = std::io::pipe().unwrap();
        let mut msg = header(SET_OWNER, 4);
        msg.extend(b"tail");
        frontend
            .send_with_fds(&[&msg[..]], &[w.as_raw_fd()])
            .unwrap();
        drop(w);
        let mut buf = [0u8; 64];
        let mut got = [-1; 4];
        let mut iov = [libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        }];
        // SAFETY: the iovec points into `buf`, valid for writes.
        let (len, nfds) = unsafe { backend.recv_with_fds(&mut iov, &mut got) }.unwrap();
        assert_eq!(&buf[..len], &msg[..]);
        assert_eq!(nfds, 1);
        // SAFETY: a descriptor the kernel just gave this process.
        let mut w2 = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(got[0]) });
        w2.write_all(b"through").unwrap();
        drop(w2);
        let mut s = String::new();
        r.read_to_string(&mut s).unwrap();
        assert_eq!(s, "through");
        // A reply back.
        let mut reply = header(SET_OWNER, 5);
        reply.extend(b"reply");
        (&backend).write_all(&reply).unwrap();
        let mut back = vec![0u8; reply.len()];
        (&frontend).read_exact(&mut back).unwrap();
        assert_eq!(back, reply);
        // The frontend hangs up: the backend side sees it.
        drop(frontend);
        let mut rest = Vec::new();
        (&backend).read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty());
        t.join().unwrap();
    }

    #[test]
    fn a_frontend_that_never_says_set_owner_is_closed() {
        let (frontend, fe_peer) = UnixStream::pair().unwrap();
        let (backend, be_peer) = UnixStream::pair().unwrap();
        let t = spawn_relay(fe_peer, be_peer, Duration::from_millis(100)).unwrap();
        // GET_FEATURES only, then nothing.
        (&frontend).write_all(&header(1, 0)).unwrap();
        let mut all = Vec::new();
        (&backend).read_to_end(&mut all).unwrap();
        assert_eq!(all, header(1, 0));
        let mut rest = Vec::new();
        (&frontend).read_to_end(&mut rest).unwrap();
        t.join().unwrap();
    }
}
