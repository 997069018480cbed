//! The floor's network leg (`--tap NAME`): each kick becomes one probe frame written
//! to a tap, and the answer is the echo's frame read back from it, before the floor
//! answers the guest. The frame is the notify guest's (`crates/notify-guest`, net
//! mode): UDP/IPv4 to port 7 with `EVMMNET1` and a sequence number, so
//! `evmm-net-echo` on the tap answers both alike.

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;

/// `TUNSETIFF`: `_IOW('T', 202, int)`.
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;

/// Bytes of the probe frame (Ethernet + IPv4 + UDP + 18 bytes of payload).
pub const FRAME_LEN: usize = 60;
const MAGIC: &[u8; 8] = b"EVMMNET1";

/// A tap opened by name, without packet information.
pub struct EchoTap {
    file: File,
    buf: [u8; 2048],
}

#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: libc::c_short,
    _pad: [u8; 22],
}

impl EchoTap {
    /// Opens (or creates, with CAP_NET_ADMIN) the tap `name`.
    pub fn open(name: &str) -> io::Result<Self> {
        let c = CString::new(name).map_err(|_| io::Error::other("a NUL in the tap's name"))?;
        if c.as_bytes().len() >= 16 {
            return Err(io::Error::other("the tap's name is longer than 15 bytes"));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/net/tun")?;
        let mut req = IfReq {
            name: [0; 16],
            flags: IFF_TAP | IFF_NO_PI,
            _pad: [0; 22],
        };
        req.name[..c.as_bytes().len()].copy_from_slice(c.as_bytes());
        // SAFETY: TUNSETIFF reads and writes one ifreq, which `req` is (name, flags,
        // padding to the kernel's size).
        if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF as _, &mut req) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Self {
            file,
            buf: [0; 2048],
        })
    }

    /// Sends probe `seq` and waits for its answer (frames that are not it are
    /// skipped). Blocks in `read` on the tap.
    pub fn round_trip(&mut self, seq: u64) -> io::Result<()> {
        self.file.write_all(&probe_frame(seq))?;
        loop {
            let n = self.file.read(&mut self.buf)?;
            if is_answer(&self.buf[..n], seq) {
                return Ok(());
            }
        }
    }
}

/// The probe frame with sequence number `seq`, as the notify guest sends it.
pub fn probe_frame(seq: u64) -> [u8; FRAME_LEN] {
    let mut f = [0u8; FRAME_LEN];
    f[0..6].copy_from_slice(&[2, 0, 0, 0, 0, 1]);
    f[6..12].copy_from_slice(&[2, 0, 0, 0, 0, 2]);
    f[12..14].copy_from_slice(&[0x08, 0x00]);
    let ip = &mut f[14..34];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&46u16.to_be_bytes());
    ip[4..6].copy_from_slice(&(seq as u16).to_be_bytes());
    ip[8] = 64;
    ip[9] = 17;
    ip[12..16].copy_from_slice(&[198, 18, 0, 2]);
    ip[16..20].copy_from_slice(&[198, 18, 0, 1]);
    let sum = ipv4_checksum(ip);
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
    f[34..36].copy_from_slice(&40000u16.to_be_bytes());
    f[36..38].copy_from_slice(&7u16.to_be_bytes());
    f[38..40].copy_from_slice(&26u16.to_be_bytes());
    f[42..50].copy_from_slice(MAGIC);
    f[50..58].copy_from_slice(&seq.to_le_bytes());
    f
}

/// The echo of probe `seq`: to the probe's source MAC, with its magic and number.
pub fn is_answer(f: &[u8], seq: u64) -> bool {
    f.len() >= FRAME_LEN
        && f[0..6] == [2, 0, 0, 0, 0, 2]
        && &f[42..50] == MAGIC
        && f[50..58] == seq.to_le_bytes()
}

fn ipv4_checksum(header: &[u8]) -> u16 {
    let mut sum: u32 = header
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_probe_has_a_valid_ipv4_header_and_its_number() {
        let f = probe_frame(0x0102_0304_0506_0708);
        // A header with its checksum sums to 0xffff.
        assert_eq!(ipv4_checksum(&f[14..34]), 0);
        assert_eq!(&f[42..50], b"EVMMNET1");
        // The answer swaps the MACs; the probe itself is not its own answer.
        assert!(!is_answer(&f, 0x0102_0304_0506_0708));
        let mut answer = f;
        for i in 0..6 {
            answer.swap(i, 6 + i);
        }
        assert!(is_answer(&answer, 0x0102_0304_0506_0708));
        assert!(!is_answer(&answer, 1));
        assert!(!is_answer(&answer[..59], 0x0102_0304_0506_0708));
    }
}
