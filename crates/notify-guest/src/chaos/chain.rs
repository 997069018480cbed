//! Descriptor chains, good and bad, written into a queue's own ring area.

use core::ptr::write_volatile;

use super::mem::{Layout, INDIRECT_OFF};
use super::rng::Rng;
use crate::virtio::{DESC_F_NEXT, DESC_F_WRITE};

/// `VIRTQ_DESC_F_INDIRECT`.
const DESC_F_INDIRECT: u16 = 4;
/// Request types (virtio-blk).
const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
const T_DISCARD: u32 = 11;
const T_WRITE_ZEROES: u32 = 13;
/// Most descriptors one chain is built from here.
const MAX_SEGS: usize = 24;

/// One descriptor before it is placed in a table.
#[derive(Clone, Copy, Default)]
struct Seg {
    addr: u64,
    len: u32,
    flags: u16,
}

/// How a chain is linked.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Link {
    /// Straight, in the descriptor table.
    Plain,
    /// The last descriptor points back at the first.
    Loop,
    /// The last descriptor points past the end of the table.
    OutOfRange,
    /// Through an indirect table in the ring area.
    Indirect,
}

/// What one chain should look like.
pub struct Chain {
    segs: [Seg; MAX_SEGS],
    n: usize,
    link: Link,
}

/// A request type, sector and shape picked at random for a disk of
/// `capacity` sectors. Mostly valid requests; the rest break one rule each.
pub fn random(rng: &mut Rng, mem: &Layout, slot: usize, capacity: u64) -> Chain {
    let mut c = Chain {
        segs: [Seg::default(); MAX_SEGS],
        n: 0,
        link: Link::Plain,
    };
    let buf = mem.buffer(slot);
    let header = buf + rng.below(0x100) * 16;
    let status = buf + 0x1000 + rng.below(0x1000);
    let ty = match rng.weighted(&[30, 25, 8, 8, 6, 6, 4]) {
        0 => T_IN,
        1 => T_OUT,
        2 => T_FLUSH,
        3 => T_GET_ID,
        4 => T_DISCARD,
        5 => T_WRITE_ZEROES,
        _ => rng.next() as u32,
    };
    let sector = match rng.weighted(&[85, 4, 4, 3, 2, 2]) {
        0 => rng.below(capacity.max(1)),
        1 => capacity,
        2 => capacity.saturating_sub(rng.below(4)),
        3 => u64::MAX - rng.below(8),
        4 => 1 << rng.range(40, 64),
        _ => rng.next(),
    };
    // SAFETY: the header is in this slot's buffer area (guest RAM above the
    // image, see `mem`), which only this code and the device write.
    unsafe {
        write_volatile(header as *mut u32, ty);
        write_volatile((header + 4) as *mut u32, 0);
        write_volatile((header + 8) as *mut u64, sector);
        write_volatile(status as *mut u8, 0xee);
    }
    let hlen = if rng.chance(96) {
        16
    } else {
        pick!(rng, [0, 8, 15, 17, 4096])
    };
    c.push(header, hlen, 0);

    match ty {
        T_FLUSH => {}
        T_GET_ID => {
            let len = if rng.chance(85) {
                20
            } else {
                pick!(rng, [1, 19, 64, 0])
            };
            c.data(rng, mem, slot, len, DESC_F_WRITE);
        }
        T_DISCARD | T_WRITE_ZEROES => {
            let n = rng.range(1, 4);
            let segs = buf + 0x2000;
            for i in 0..n {
                let s = if rng.chance(80) {
                    rng.below(capacity.max(1))
                } else {
                    pick!(rng, [capacity, u64::MAX - 1, 1 << 62, rng.next()])
                };
                let num = if rng.chance(80) {
                    rng.range(1, 256) as u32
                } else {
                    pick!(rng, [0, u32::MAX, 1 << 31, rng.next() as u32])
                };
                let flags = if rng.chance(80) { 0 } else { rng.next() as u32 };
                // SAFETY: as for the header (the slot's buffer area).
                unsafe {
                    let p = segs + 16 * i;
                    write_volatile(p as *mut u64, s);
                    write_volatile((p + 8) as *mut u32, num);
                    write_volatile((p + 12) as *mut u32, flags);
                }
            }
            let len = if rng.chance(85) {
                16 * n as u32
            } else {
                pick!(rng, [0, 8, 17, 4096, u32::MAX])
            };
            c.push(segs, len, 0);
        }
        _ => {
            let dir = if ty == T_IN { DESC_F_WRITE } else { 0 };
            for _ in 0..rng.range(1, 5) {
                let len = match rng.weighted(&[85, 5, 5, 5]) {
                    0 => 512 * rng.range(1, 33) as u32,
                    1 => rng.range(1, 512) as u32,
                    2 => pick!(rng, [u32::MAX, 1 << 31, (1 << 20) + 512, 0]),
                    _ => 0,
                };
                c.data(rng, mem, slot, len, dir);
            }
        }
    }
    let slen = if rng.chance(95) {
        1
    } else {
        pick!(rng, [0, 2, 4096])
    };
    c.push(status, slen, DESC_F_WRITE);

    // One broken rule in some of the chains.
    match rng.below(100) {
        0..=5 => {
            // A wrong direction.
            let i = rng.below(c.n as u64) as usize;
            c.segs[i].flags ^= DESC_F_WRITE;
        }
        6..=8 => c.link = Link::Loop,
        9..=10 => c.link = Link::OutOfRange,
        11..=22 => c.link = Link::Indirect,
        23..=24 => {
            // A stray INDIRECT flag inside the chain.
            let i = rng.below(c.n as u64) as usize;
            c.segs[i].flags |= DESC_F_INDIRECT;
        }
        25..=27 => {
            // A data or header address outside RAM.
            let i = rng.below(c.n as u64) as usize;
            c.segs[i].addr = mem.outside(rng);
        }
        28..=29 => {
            // As many descriptors as fit.
            while c.n < MAX_SEGS {
                c.data(rng, mem, slot, 512, DESC_F_WRITE);
            }
        }
        _ => {}
    }
    c
}

impl Chain {
    fn push(&mut self, addr: u64, len: u32, flags: u16) {
        if self.n < MAX_SEGS {
            self.segs[self.n] = Seg { addr, len, flags };
            self.n += 1;
        }
    }

    /// A data descriptor of `len` bytes at an address [`Layout::data`] picks.
    fn data(&mut self, rng: &mut Rng, mem: &Layout, slot: usize, len: u32, flags: u16) {
        let at = mem.data(rng, slot, u64::from(len));
        self.push(at.addr, len, flags);
    }

    /// Writes the chain into the descriptor table at `table` (of `size`
    /// entries) from entry `first`, and returns (head, entries used). An
    /// indirect chain goes into the ring area's indirect table at `ring`.
    pub fn place(
        &self,
        rng: &mut Rng,
        mem: &Layout,
        ring: u64,
        size: u16,
        first: u16,
    ) -> (u16, u16) {
        let size = size.max(1);
        if self.link == Link::Indirect {
            let own = ring + INDIRECT_OFF;
            let at = mem.table(rng, own, false);
            for i in 0..self.n {
                let next = if i + 1 < self.n { (i + 1) as u16 } else { 0 };
                let flags = self.segs[i].flags | if i + 1 < self.n { DESC_F_NEXT } else { 0 };
                write_desc(own, i as u16, self.segs[i], flags, next);
            }
            // Lengths past the 4 KiB indirect area only for tables outside RAM:
            // the device would read the next ring areas as descriptors.
            let len = match rng.weighted(&[85, 5, 5, 5]) {
                0 => 16 * self.n as u32,
                1 => 0,
                2 => 16 * self.n as u32 + 8,
                _ if at.sane => pick!(rng, [4096, 16, 48]),
                _ => pick!(rng, [u32::MAX, 16 * 4096, 16]),
            };
            let mut flags = DESC_F_INDIRECT;
            if rng.chance(5) {
                flags |= DESC_F_NEXT;
            }
            let seg = Seg {
                addr: at.addr,
                len,
                flags: 0,
            };
            write_desc(ring, first % size, seg, flags, (first + 1) % size);
            return (first % size, 1);
        }
        let n = self.n as u16;
        for i in 0..n {
            let idx = (first + i) % size;
            let last = i + 1 == n;
            let (flags, next) = match (last, self.link) {
                (false, _) => (DESC_F_NEXT, (first + i + 1) % size),
                (true, Link::Loop) => (DESC_F_NEXT, first % size),
                (true, Link::OutOfRange) => (DESC_F_NEXT, size + rng.below(100) as u16),
                (true, _) => (0, 0),
            };
            write_desc(
                ring,
                idx,
                self.segs[i as usize],
                self.segs[i as usize].flags | flags,
                next,
            );
        }
        (first % size, n)
    }
}

/// Writes descriptor `idx` of the table at `table`.
fn write_desc(table: u64, idx: u16, seg: Seg, flags: u16, next: u16) {
    let p = table + 16 * u64::from(idx);
    // SAFETY: `table` is a queue's own descriptor or indirect table in its ring
    // area (4 KiB, idx < 256), which only this code writes.
    unsafe {
        write_volatile(p as *mut u64, seg.addr);
        write_volatile((p + 8) as *mut u32, seg.len);
        write_volatile((p + 12) as *mut u16, flags);
        write_volatile((p + 14) as *mut u16, next);
    }
}
