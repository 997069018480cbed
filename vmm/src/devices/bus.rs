//! Address-range dispatch of port I/O and MMIO exits to devices.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// How many distinct unclaimed addresses a bus remembers (to log each once); past
/// that, unclaimed accesses are only counted, so a guest sweeping the address space
/// cannot grow evmm's memory.
pub const UNCLAIMED_REMEMBERED: usize = 256;

/// A device that handles accesses to its address range. Offsets are
/// relative to the start of the range.
pub trait BusDevice: Send {
    /// Fills `data` for a read at `offset`.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Handles a write of `data` at `offset`.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// Errors while building a bus.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    /// The new range overlaps an existing one or is empty.
    #[error("bus range {base:#x}+{len:#x} is empty or overlaps another device")]
    Overlap {
        /// Start of the range.
        base: u64,
        /// Its length.
        len: u64,
    },
}

struct Entry {
    base: u64,
    len: u64,
    device: Arc<Mutex<dyn BusDevice>>,
}

/// A set of non-overlapping address ranges, each served by a device.
/// Accesses nobody claims read as all ones and are logged at debug level once per
/// address, for the first [`UNCLAIMED_REMEMBERED`] addresses.
#[derive(Default)]
pub struct Bus {
    entries: Vec<Entry>,
    unhandled: Mutex<BTreeSet<u64>>,
    unhandled_accesses: AtomicU64,
    name: &'static str,
}

impl Bus {
    /// An empty bus; `name` appears in log messages ("pio", "mmio").
    pub fn new(name: &'static str) -> Self {
        Bus {
            name,
            ..Default::default()
        }
    }

    /// Adds `device` for `[base, base + len)`.
    pub fn insert(
        &mut self,
        base: u64,
        len: u64,
        device: Arc<Mutex<dyn BusDevice>>,
    ) -> Result<(), BusError> {
        let end = base.checked_add(len).filter(|_| len > 0);
        let Some(end) = end else {
            return Err(BusError::Overlap { base, len });
        };
        if self
            .entries
            .iter()
            .any(|e| base < e.base + e.len && e.base < end)
        {
            return Err(BusError::Overlap { base, len });
        }
        self.entries.push(Entry { base, len, device });
        self.entries.sort_by_key(|e| e.base);
        Ok(())
    }

    fn find(&self, addr: u64) -> Option<(&Entry, u64)> {
        let idx = self.entries.partition_point(|e| e.base <= addr);
        let e = self.entries.get(idx.checked_sub(1)?)?;
        (addr - e.base < e.len).then(|| (e, addr - e.base))
    }

    fn note_unhandled(&self, addr: u64, write: bool) {
        self.unhandled_accesses.fetch_add(1, Ordering::Relaxed);
        let mut seen = self.unhandled.lock().unwrap_or_else(|e| e.into_inner());
        if seen.len() >= UNCLAIMED_REMEMBERED || !seen.insert(addr) {
            return;
        }
        log::debug!(
            "{}: unhandled {} at {addr:#x} (reads return all ones; not logged again)",
            self.name,
            if write { "write" } else { "read" }
        );
        if seen.len() == UNCLAIMED_REMEMBERED {
            log::debug!(
                "{}: {UNCLAIMED_REMEMBERED} unclaimed addresses seen; further ones are only counted",
                self.name
            );
        }
    }

    /// Accesses no device claimed, since the bus was built.
    pub fn unhandled_accesses(&self) -> u64 {
        self.unhandled_accesses.load(Ordering::Relaxed)
    }

    /// Dispatches a read; returns whether a device handled it.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr) {
            Some((e, offset)) => {
                e.device
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .read(offset, data);
                true
            }
            None => {
                data.fill(0xff);
                self.note_unhandled(addr, false);
                false
            }
        }
    }

    /// Dispatches a write; returns whether a device handled it.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr) {
            Some((e, offset)) => {
                e.device
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .write(offset, data);
                true
            }
            None => {
                self.note_unhandled(addr, true);
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Recorder {
        last_write: Option<(u64, Vec<u8>)>,
    }

    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.last_write = Some((offset, data.to_vec()));
        }
    }

    #[test]
    fn dispatches_by_range() {
        let mut bus = Bus::new("test");
        let a = Arc::new(Mutex::new(Recorder::default()));
        let b = Arc::new(Mutex::new(Recorder::default()));
        bus.insert(0x3f8, 8, a.clone()).unwrap();
        bus.insert(0x60, 5, b.clone()).unwrap();
        let mut d = [0u8; 1];
        assert!(bus.read(0x3fd, &mut d));
        assert_eq!(d[0], 5);
        assert!(bus.write(0x64, &[0xfe]));
        assert_eq!(b.lock().unwrap().last_write, Some((4, vec![0xfe])));
        assert!(a.lock().unwrap().last_write.is_none());
    }

    #[test]
    fn unclaimed_reads_are_all_ones() {
        let bus = Bus::new("test");
        let mut d = [0u8; 4];
        assert!(!bus.read(0xcfc, &mut d));
        assert_eq!(d, [0xff; 4]);
        assert!(!bus.write(0x80, &[0]));
        // Just past a device's end is unclaimed too.
        let mut bus = Bus::new("test");
        bus.insert(0x10, 2, Arc::new(Mutex::new(Recorder::default())))
            .unwrap();
        assert!(!bus.read(0x12, &mut d));
        assert!(!bus.read(0x0f, &mut d));
        assert!(bus.read(0x11, &mut d));
    }

    #[test]
    fn a_guest_sweeping_unclaimed_addresses_cannot_grow_the_bus() {
        let bus = Bus::new("test");
        let mut d = [0u8; 4];
        for addr in (0..1_000_000u64).map(|i| 0xd000_0000 + 4 * i) {
            assert!(!bus.read(addr, &mut d));
            assert!(!bus.write(addr, &d));
        }
        assert_eq!(bus.unhandled_accesses(), 2_000_000);
        assert_eq!(bus.unhandled.lock().unwrap().len(), UNCLAIMED_REMEMBERED);
    }

    #[test]
    fn rejects_overlaps() {
        let mut bus = Bus::new("test");
        let dev = || Arc::new(Mutex::new(Recorder::default()));
        bus.insert(0x100, 0x10, dev()).unwrap();
        assert!(bus.insert(0x10f, 1, dev()).is_err());
        assert!(bus.insert(0xf8, 0x9, dev()).is_err());
        assert!(bus.insert(0x110, 0, dev()).is_err());
        assert!(bus.insert(u64::MAX, 2, dev()).is_err());
        bus.insert(0x110, 1, dev()).unwrap();
    }
}
