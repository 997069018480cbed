//! A Linux tap device, one file descriptor per queue pair: opened by name on
//! `/dev/net/tun` (`IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`, plus `IFF_MULTI_QUEUE` for
//! several pairs), or handed over by the caller as open descriptors and checked to be
//! such taps. Non-blocking, close-on-exec, with a 12-byte virtio-net header on every
//! frame, so guest buffers go to `writev` and come from `readv` unchanged.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use super::config::HDR_LEN;

/// Errors of opening a tap.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// `/dev/net/tun` cannot be opened.
    #[error("cannot open /dev/net/tun: {0}{hint}", hint = open_hint(.0))]
    OpenTun(#[source] io::Error),
    /// The name does not fit an interface name.
    #[error("tap name '{0}' is not 1 to 15 bytes without '/' or spaces")]
    BadName(String),
    /// TUNSETIFF refused the tap.
    #[error("tap {name}: {source}{hint}", hint = attach_hint(.source, *.multi_queue))]
    Attach {
        /// The tap's name.
        name: String,
        /// Several queue pairs were asked for.
        multi_queue: bool,
        /// What the kernel said.
        #[source]
        source: io::Error,
    },
    /// A descriptor given with `fd=` is not a tap of the right kind.
    #[error("fd {fd}: {what}")]
    NotATap {
        /// The descriptor.
        fd: RawFd,
        /// What is wrong with it.
        what: String,
    },
    /// Another ioctl failed.
    #[error("tap {name}: {what}: {source}")]
    Ioctl {
        /// The tap's name.
        name: String,
        /// The request.
        what: &'static str,
        /// What the kernel said.
        #[source]
        source: io::Error,
    },
}

fn open_hint(e: &io::Error) -> &'static str {
    match e.raw_os_error() {
        Some(libc::ENOENT) => " (no tun driver: modprobe tun)",
        Some(libc::EACCES) | Some(libc::EPERM) => {
            " (no permission: run as root, or pass an open tap with fd=N)"
        }
        _ => "",
    }
}

fn attach_hint(e: &io::Error, multi_queue: bool) -> &'static str {
    match e.raw_os_error() {
        Some(libc::EPERM) => {
            " (no such tap and no right to create it, or a tap owned by another user: \
             create it with `ip tuntap add ... user UID`, or run with CAP_NET_ADMIN)"
        }
        Some(libc::EINVAL) if multi_queue => {
            " (the tap exists as a single-queue tap; queues > 1 needs one created with multi_queue)"
        }
        Some(libc::EINVAL) => {
            " (the tap exists with other flags: a multi-queue tap needs queues > 1, or it is a tun device)"
        }
        Some(libc::EBUSY) => " (the tap is in use by another process)",
        _ => "",
    }
}

/// What the device does with one queue of a tap (a trait so that tests can put a
/// socket pair or a failing stand-in in its place).
pub trait TapQueue: Send + Sync + AsRawFd + 'static {
    /// Reads one frame (virtio-net header included) into `iovs`.
    fn readv(&self, iovs: &[libc::iovec]) -> io::Result<usize>;
    /// Writes one frame (virtio-net header included) from `iovs`.
    fn writev(&self, iovs: &[libc::iovec]) -> io::Result<usize>;
    /// TUNSETOFFLOAD: which offloaded frames the tap may hand over (TUN_F_* flags).
    fn set_offloads(&self, flags: u32) -> Result<(), TapError>;
    /// Attaches or detaches this queue of a multi-queue tap.
    fn set_queue_enabled(&self, enabled: bool) -> Result<(), TapError>;
}

/// One queue of a tap.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

/// A zeroed `ifreq` with `name`.
fn ifreq(name: &str) -> libc::ifreq {
    // SAFETY: ifreq is plain data; all zeroes is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(name.as_bytes()) {
        *dst = *src as libc::c_char;
    }
    req
}

/// The flags of every evmm tap.
const TAP_FLAGS: libc::c_int = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR;

impl Tap {
    /// Opens (or creates) the tap `name` with one queue per pair (`pairs` queue pairs:
    /// IFF_MULTI_QUEUE when more than one).
    pub fn open(name: &str, pairs: u16) -> Result<Vec<Tap>, TapError> {
        if name.is_empty()
            || name.len() >= libc::IFNAMSIZ
            || name.contains(|c: char| c == '/' || c.is_whitespace())
        {
            return Err(TapError::BadName(name.to_string()));
        }
        let multi_queue = pairs > 1;
        let mut flags = TAP_FLAGS;
        if multi_queue {
            flags |= libc::IFF_MULTI_QUEUE;
        }
        (0..pairs.max(1))
            .map(|_| {
                let file = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
                    .open("/dev/net/tun")
                    .map_err(TapError::OpenTun)?;
                let mut req = ifreq(name);
                req.ifr_ifru.ifru_flags = flags as libc::c_short;
                // SAFETY: TUNSETIFF reads and writes the ifreq, which lives for the call.
                let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut req) };
                if rc < 0 {
                    return Err(TapError::Attach {
                        name: name.to_string(),
                        multi_queue,
                        source: io::Error::last_os_error(),
                    });
                }
                let tap = Tap {
                    file,
                    name: name.to_string(),
                };
                tap.set_vnet_hdr_size()?;
                Ok(tap)
            })
            .collect()
    }

    /// Takes over `fds`, taps the caller opened (one per queue pair), after checking
    /// that each is a tap with IFF_NO_PI and IFF_VNET_HDR (and IFF_MULTI_QUEUE when
    /// there are several). The descriptors become the device's.
    ///
    /// # Safety
    ///
    /// Each of `fds` must be an open descriptor that nothing else in this process
    /// owns or closes.
    pub unsafe fn from_fds(fds: &[RawFd]) -> Result<Vec<Tap>, TapError> {
        let multi_queue = fds.len() > 1;
        fds.iter()
            .map(|&fd| {
                let not_a_tap = |what: String| TapError::NotATap { fd, what };
                let mut req = ifreq("");
                // SAFETY: TUNGETIFF writes the ifreq, which lives for the call; on a
                // descriptor that is no tap it fails without touching it.
                let rc = unsafe { libc::ioctl(fd, libc::TUNGETIFF, &mut req) };
                if rc < 0 {
                    let e = io::Error::last_os_error();
                    return Err(not_a_tap(match e.raw_os_error() {
                        Some(libc::EBADF) => "not an open descriptor".into(),
                        Some(libc::EBADFD) => {
                            "a /dev/net/tun descriptor not attached to a tap".into()
                        }
                        _ => format!("not a tap ({e})"),
                    }));
                }
                // SAFETY: TUNGETIFF filled in the flags member of the union.
                let flags = libc::c_int::from(unsafe { req.ifr_ifru.ifru_flags });
                let name: String = req
                    .ifr_name
                    .iter()
                    .take_while(|&&c| c != 0)
                    .map(|&c| c as u8 as char)
                    .collect();
                if flags & 0x000f != libc::IFF_TAP {
                    return Err(not_a_tap(format!("{name} is a tun device, not a tap")));
                }
                for (flag, label) in [
                    (libc::IFF_NO_PI, "IFF_NO_PI"),
                    (libc::IFF_VNET_HDR, "IFF_VNET_HDR"),
                ] {
                    if flags & flag == 0 {
                        return Err(not_a_tap(format!("tap {name} was opened without {label}")));
                    }
                }
                if (flags & libc::IFF_MULTI_QUEUE != 0) != multi_queue {
                    return Err(not_a_tap(format!(
                        "tap {name} is {}multi-queue but {} descriptor(s) were given",
                        if multi_queue { "not " } else { "" },
                        fds.len()
                    )));
                }
                // SAFETY: the caller hands the descriptor over; it was checked to be open.
                let file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
                // SAFETY: plain fcntl calls on the descriptor.
                unsafe {
                    let fl = libc::fcntl(fd, libc::F_GETFL);
                    libc::fcntl(fd, libc::F_SETFL, fl | libc::O_NONBLOCK);
                    libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
                }
                let tap = Tap { file, name };
                tap.set_vnet_hdr_size()?;
                Ok(tap)
            })
            .collect()
    }

    /// The tap's interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The tap queue's descriptor (what a vhost-net backend is given).
    pub fn file(&self) -> &File {
        &self.file
    }

    fn ioctl_err(&self, what: &'static str) -> TapError {
        TapError::Ioctl {
            name: self.name.clone(),
            what,
            source: io::Error::last_os_error(),
        }
    }

    fn set_vnet_hdr_size(&self) -> Result<(), TapError> {
        let size = HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads the int, which lives for the call.
        let rc = unsafe { libc::ioctl(self.file.as_raw_fd(), libc::TUNSETVNETHDRSZ, &size) };
        if rc < 0 {
            return Err(self.ioctl_err("TUNSETVNETHDRSZ"));
        }
        Ok(())
    }

    fn tun_set_offloads(&self, flags: u32) -> Result<(), TapError> {
        // SAFETY: TUNSETOFFLOAD takes its argument by value.
        let rc = unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                libc::TUNSETOFFLOAD,
                libc::c_ulong::from(flags),
            )
        };
        if rc < 0 {
            return Err(self.ioctl_err("TUNSETOFFLOAD"));
        }
        Ok(())
    }

    /// TUNSETQUEUE: the kernel steers no traffic to a detached queue.
    fn tun_set_queue(&self, enabled: bool) -> Result<(), TapError> {
        let mut req = ifreq("");
        req.ifr_ifru.ifru_flags = if enabled {
            libc::IFF_ATTACH_QUEUE
        } else {
            libc::IFF_DETACH_QUEUE
        } as libc::c_short;
        // SAFETY: TUNSETQUEUE reads the ifreq, which lives for the call.
        let rc = unsafe { libc::ioctl(self.file.as_raw_fd(), libc::TUNSETQUEUE, &mut req) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            // Already in the asked state.
            if e.raw_os_error() == Some(libc::EINVAL) && enabled {
                return Ok(());
            }
            return Err(TapError::Ioctl {
                name: self.name.clone(),
                what: "TUNSETQUEUE",
                source: e,
            });
        }
        Ok(())
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

/// `readv`/`writev` on a descriptor, as one call each.
fn iov_result(rc: isize) -> io::Result<usize> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc as usize)
    }
}

impl TapQueue for Tap {
    fn readv(&self, iovs: &[libc::iovec]) -> io::Result<usize> {
        fd_readv(self.file.as_raw_fd(), iovs)
    }

    fn writev(&self, iovs: &[libc::iovec]) -> io::Result<usize> {
        fd_writev(self.file.as_raw_fd(), iovs)
    }

    fn set_offloads(&self, flags: u32) -> Result<(), TapError> {
        self.tun_set_offloads(flags)
    }

    fn set_queue_enabled(&self, enabled: bool) -> Result<(), TapError> {
        self.tun_set_queue(enabled)
    }
}

/// `readv(2)` on `fd`.
pub fn fd_readv(fd: RawFd, iovs: &[libc::iovec]) -> io::Result<usize> {
    let n = libc::c_int::try_from(iovs.len()).unwrap_or(libc::c_int::MAX);
    // SAFETY: every iovec points at memory valid for writing (guest memory the device
    // holds, or a buffer of the caller), for the duration of the call.
    iov_result(unsafe { libc::readv(fd, iovs.as_ptr(), n) })
}

/// `writev(2)` on `fd`.
pub fn fd_writev(fd: RawFd, iovs: &[libc::iovec]) -> io::Result<usize> {
    let n = libc::c_int::try_from(iovs.len()).unwrap_or(libc::c_int::MAX);
    // SAFETY: every iovec points at memory valid for reading for the duration of the call.
    iov_result(unsafe { libc::writev(fd, iovs.as_ptr(), n) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_names_are_refused_before_any_syscall() {
        for name in ["", "a/b", "has space", "sixteen-chars-xx"] {
            assert!(
                matches!(Tap::open(name, 1), Err(TapError::BadName(_))),
                "{name}"
            );
        }
    }

    #[test]
    fn a_descriptor_that_is_no_tap_is_refused() {
        let f = File::open("/dev/null").unwrap();
        let fd = f.as_raw_fd();
        // SAFETY: the test owns `f`; on failure from_fds takes nothing over.
        let e = unsafe { Tap::from_fds(&[fd]) }.unwrap_err().to_string();
        assert!(e.starts_with(&format!("fd {fd}: not a tap")), "{e}");
        drop(f);
    }

    #[test]
    fn hints_name_the_usual_causes() {
        let e = |errno| io::Error::from_raw_os_error(errno);
        assert!(attach_hint(&e(libc::EPERM), false).contains("CAP_NET_ADMIN"));
        assert!(attach_hint(&e(libc::EINVAL), true).contains("single-queue"));
        assert!(attach_hint(&e(libc::EBUSY), false).contains("in use"));
        assert!(open_hint(&e(libc::EACCES)).contains("fd=N"));
    }
}
