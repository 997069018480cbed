//! The control queue (with VIRTIO_NET_F_CTRL_VQ, i.e. several queue pairs): the
//! commands Linux sends, each answered in its last, device-writable byte.
//!
//! * MQ / VQ_PAIRS_SET n: n pairs carry traffic from now on; the tap queues of the
//!   others are detached, so the kernel steers no flow to a queue nobody reads (until
//!   the first such command only pair 0 does, as the spec orders);
//! * GUEST_OFFLOADS_SET: the tap's offloads follow (TUNSETOFFLOAD), refused (ERR) for
//!   an offload that was not negotiated;
//! * RX (promiscuous, all-multicast, ...) and MAC (filter table, address): OK; the
//!   device filters nothing, which the spec allows (filtering is best effort);
//! * anything else: ERR. A command is never left unanswered: Linux waits for the
//!   answer spinning, with the vCPU stuck.

use virtio_bindings::virtio_net::*;

use super::chain::{read_prefix, write_at};
use super::config::{guest_offload_bits, has, tap_offloads};
use super::tap::TapQueue;

/// The most command bytes looked at (a MAC filter table may be longer; it is not read).
pub const MAX_COMMAND: usize = 64;

/// What the control queue changes, shared by a device's workers.
pub struct Control<'a, T: TapQueue> {
    /// Every queue pair's tap queue.
    pub taps: &'a [T],
    /// The features the driver accepted.
    pub acked: u64,
}

impl<T: TapQueue> Control<'_, T> {
    /// Answers the command in `cmd` (class, command, data): VIRTIO_NET_OK or _ERR.
    pub fn execute(&self, cmd: &[u8]) -> u8 {
        let ok = match cmd {
            [class, code, data @ ..] => self.dispatch(u32::from(*class), u32::from(*code), data),
            _ => false,
        };
        if ok {
            VIRTIO_NET_OK as u8
        } else {
            VIRTIO_NET_ERR as u8
        }
    }

    fn dispatch(&self, class: u32, code: u32, data: &[u8]) -> bool {
        match (class, code) {
            (VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET) => match data {
                [lo, hi, ..] => self.set_pairs(u16::from_le_bytes([*lo, *hi])),
                _ => false,
            },
            (VIRTIO_NET_CTRL_GUEST_OFFLOADS, VIRTIO_NET_CTRL_GUEST_OFFLOADS_SET) => {
                match data.get(..8).and_then(|b| <[u8; 8]>::try_from(b).ok()) {
                    Some(b) => self.set_offloads(u64::from_le_bytes(b)),
                    None => false,
                }
            }
            (VIRTIO_NET_CTRL_RX, _) | (VIRTIO_NET_CTRL_MAC, _) => true,
            _ => false,
        }
    }

    /// VQ_PAIRS_SET: pairs `0..n` carry traffic.
    fn set_pairs(&self, n: u16) -> bool {
        if !has(self.acked, VIRTIO_NET_F_MQ) || n == 0 || usize::from(n) > self.taps.len() {
            return false;
        }
        enable_pairs(self.taps, usize::from(n))
    }

    /// GUEST_OFFLOADS_SET: only offloads the driver negotiated.
    fn set_offloads(&self, offloads: u64) -> bool {
        if offloads & !(self.acked & guest_offload_bits()) != 0 {
            return false;
        }
        match self.taps.first() {
            Some(tap) => match tap.set_offloads(tap_offloads(offloads)) {
                Ok(()) => true,
                Err(e) => {
                    crate::guest_warn!("virtio-net: cannot change the tap's offloads: {e}");
                    false
                }
            },
            None => false,
        }
    }
}

/// Attaches the tap queues of pairs `0..n` and detaches the others.
pub fn enable_pairs<T: TapQueue>(taps: &[T], n: usize) -> bool {
    if taps.len() < 2 {
        return true;
    }
    let mut ok = true;
    for (i, tap) in taps.iter().enumerate() {
        if let Err(e) = tap.set_queue_enabled(i < n) {
            crate::guest_warn!("virtio-net: pair {i}: {e}");
            ok = false;
        }
    }
    ok
}

/// The command of a control chain: its device-readable bytes (up to [`MAX_COMMAND`])
/// in `cmd`, returning how many; the answer goes with [`answer`].
///
/// # Safety
///
/// The iovecs must point into guest memory the caller holds.
pub unsafe fn command(readable: &[libc::iovec], cmd: &mut [u8; MAX_COMMAND]) -> usize {
    // SAFETY: as the caller vouches.
    unsafe { read_prefix(readable, cmd) }
}

/// Writes `ack` into the last byte of the device-writable buffers `writable`.
///
/// # Safety
///
/// The iovecs must point into guest memory the caller holds.
pub unsafe fn answer(writable: &[libc::iovec], ack: u8) {
    let total: usize = writable.iter().map(|i| i.iov_len).sum();
    if total > 0 {
        // SAFETY: as the caller vouches.
        unsafe { write_at(writable, total - 1, &[ack]) };
    }
}

#[cfg(test)]
mod tests {
    use super::super::tap::TapError;
    use super::*;
    use std::sync::Mutex;

    #[derive(Default)]
    struct FakeTap {
        enabled: Mutex<Option<bool>>,
        offloads: Mutex<Option<u32>>,
    }

    impl std::os::fd::AsRawFd for FakeTap {
        fn as_raw_fd(&self) -> std::os::fd::RawFd {
            -1
        }
    }

    impl TapQueue for FakeTap {
        fn readv(&self, _: &[libc::iovec]) -> std::io::Result<usize> {
            Err(std::io::ErrorKind::WouldBlock.into())
        }
        fn writev(&self, _: &[libc::iovec]) -> std::io::Result<usize> {
            Ok(0)
        }
        fn set_offloads(&self, flags: u32) -> Result<(), TapError> {
            *self.offloads.lock().unwrap() = Some(flags);
            Ok(())
        }
        fn set_queue_enabled(&self, enabled: bool) -> Result<(), TapError> {
            *self.enabled.lock().unwrap() = Some(enabled);
            Ok(())
        }
    }

    const OK: u8 = VIRTIO_NET_OK as u8;
    const ERR: u8 = VIRTIO_NET_ERR as u8;

    fn bits(b: &[u32]) -> u64 {
        b.iter().fold(0, |a, x| a | (1 << x))
    }

    #[test]
    fn pairs_set_attaches_the_first_n_tap_queues() {
        let taps: Vec<FakeTap> = (0..3).map(|_| FakeTap::default()).collect();
        let c = Control {
            taps: &taps,
            acked: bits(&[VIRTIO_NET_F_MQ, VIRTIO_NET_F_CTRL_VQ]),
        };
        assert_eq!(c.execute(&[4, 0, 2, 0]), OK);
        let state: Vec<_> = taps.iter().map(|t| *t.enabled.lock().unwrap()).collect();
        assert_eq!(state, [Some(true), Some(true), Some(false)]);
        assert_eq!(
            c.execute(&[4, 0, 4, 0]),
            ERR,
            "more pairs than the device has"
        );
        assert_eq!(c.execute(&[4, 0, 0, 0]), ERR);
        assert_eq!(c.execute(&[4, 0]), ERR, "no data");
        let no_mq = Control {
            taps: &taps,
            acked: 0,
        };
        assert_eq!(no_mq.execute(&[4, 0, 1, 0]), ERR);
    }

    #[test]
    fn offloads_only_as_negotiated() {
        let taps = [FakeTap::default()];
        let acked = bits(&[VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4]);
        let c = Control { taps: &taps, acked };
        let mut cmd = vec![5, 0];
        cmd.extend(acked.to_le_bytes());
        assert_eq!(c.execute(&cmd), OK);
        assert_eq!(
            *taps[0].offloads.lock().unwrap(),
            Some(libc::TUN_F_CSUM | libc::TUN_F_TSO4)
        );
        let mut cmd = vec![5, 0];
        cmd.extend(bits(&[VIRTIO_NET_F_GUEST_UFO]).to_le_bytes());
        assert_eq!(c.execute(&cmd), ERR);
    }

    #[test]
    fn rx_mode_is_ok_and_the_unknown_is_err() {
        let taps = [FakeTap::default()];
        let c = Control {
            taps: &taps,
            acked: 0,
        };
        assert_eq!(c.execute(&[0, 0, 1]), OK, "promiscuous on");
        assert_eq!(c.execute(&[1, 1, 0, 0, 0, 0, 0, 0]), OK, "MAC address set");
        assert_eq!(c.execute(&[2, 0, 1, 0]), ERR, "VLAN");
        assert_eq!(c.execute(&[9]), ERR);
        assert_eq!(c.execute(&[]), ERR);
    }

    #[test]
    fn the_answer_goes_to_the_last_writable_byte() {
        let mut a = [0xffu8; 3];
        let mut b = [0xffu8; 2];
        let iovs = [
            libc::iovec {
                iov_base: a.as_mut_ptr().cast(),
                iov_len: a.len(),
            },
            libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: b.len(),
            },
        ];
        // SAFETY: the iovecs point at the two arrays above.
        unsafe { answer(&iovs, 0) };
        assert_eq!((a, b), ([0xff; 3], [0xff, 0]));
    }
}
