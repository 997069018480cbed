//! Where each virtio-mmio device lives and how it is wired to KVM: a 4 KiB window in
//! the virtio-mmio area and a GSI per device ([`MmioSlot`]), announced in the DSDT and,
//! for kernels built with `CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES`, on the command line.
//!
//! [`attach_one`] is the one place where a device's interrupt eventfd becomes a KVM
//! **irqfd** on its GSI and each queue's kick eventfd a KVM **ioeventfd** on the
//! window's QueueNotify register with the queue index as datamatch (unless
//! `--notify exit`); every other register access exits to the vCPU thread, and the
//! MMIO bus hands it to the transport with the offset inside the window.
//!
//! Interrupts are edge-triggered, as in Firecracker: an irqfd without a resample fd
//! pulses its GSI (assert, de-assert), which is an edge, and Linux's virtio_mmio
//! handler reads and acknowledges InterruptStatus itself, so there is no level to
//! keep up.

use std::sync::{Arc, Mutex};

use evmm_virtio::transport::mmio::{MmioTransport, MMIO_WINDOW_SIZE, QUEUE_NOTIFY};
use evmm_virtio::VirtioDevice;
use kvm_ioctls::{IoEventAddress, VmFd};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::DeviceError;
use crate::arch::acpi::DsdtDevice;
use crate::arch::layout::{
    FIRST_DEVICE_GSI, MAX_VIRTIO_MMIO_DEVICES, VIRTIO_MMIO_SLOT_SIZE, VIRTIO_MMIO_START,
};
use crate::config::NotifyMode;
use crate::devices::bus::{Bus, BusDevice};
use crate::vstate::memory::GuestMemoryMmap;

const _: () = assert!(MMIO_WINDOW_SIZE <= VIRTIO_MMIO_SLOT_SIZE);

/// Where a virtio-mmio device lives in the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MmioSlot {
    /// The device's index: its order on the command line.
    pub index: u32,
    /// Guest-physical base of its window.
    pub base: u64,
    /// Its GSI (an IOAPIC pin).
    pub gsi: u32,
}

impl MmioSlot {
    /// Size of every window.
    pub const LEN: u64 = MMIO_WINDOW_SIZE;

    /// The DSDT entry (`_HID "LNRO0005"`, the window, an edge-triggered
    /// interrupt) through which Linux's virtio_mmio driver finds it.
    pub fn dsdt_device(&self) -> DsdtDevice {
        DsdtDevice::virtio_mmio(self.index, self.base, Self::LEN, self.gsi, true)
    }

    /// The `virtio_mmio.device=<size>@<base>:<irq>` kernel parameter.
    pub fn cmdline_param(&self) -> String {
        format!(
            "virtio_mmio.device={}K@{:#x}:{}",
            Self::LEN >> 10,
            self.base,
            self.gsi
        )
    }
}

/// The slots of `count` devices: windows one after another from the start
/// of the virtio-mmio area, GSIs one after another from the first device GSI.
pub fn mmio_slots(count: usize) -> Result<Vec<MmioSlot>, DeviceError> {
    if count > MAX_VIRTIO_MMIO_DEVICES as usize {
        return Err(DeviceError::TooManyDevices(count));
    }
    Ok((0..count as u32)
        .map(|index| MmioSlot {
            index,
            base: VIRTIO_MMIO_START + u64::from(index) * VIRTIO_MMIO_SLOT_SIZE,
            gsi: FIRST_DEVICE_GSI + index,
        })
        .collect())
}

/// `cmdline` with a `virtio_mmio.device=` parameter per slot. The
/// parameters go before a ` -- ` separator, if any, so they stay kernel
/// parameters instead of becoming arguments of init.
pub fn kernel_cmdline(cmdline: &str, slots: &[MmioSlot]) -> String {
    if slots.is_empty() {
        return cmdline.to_string();
    }
    let params = slots
        .iter()
        .map(MmioSlot::cmdline_param)
        .collect::<Vec<_>>()
        .join(" ");
    let (kernel, init) = if let Some(rest) = cmdline.strip_prefix("-- ") {
        ("", Some(rest))
    } else if cmdline == "--" {
        ("", Some(""))
    } else if let Some((kernel, init)) = cmdline.split_once(" -- ") {
        (kernel, Some(init))
    } else if let Some(kernel) = cmdline.strip_suffix(" --") {
        (kernel, Some(""))
    } else {
        (cmdline, None)
    };
    let mut out = kernel.trim_end().to_string();
    if !out.is_empty() {
        out.push(' ');
    }
    out.push_str(&params);
    if let Some(init) = init {
        out.push_str(" --");
        if !init.is_empty() {
            out.push(' ');
            out.push_str(init);
        }
    }
    out
}

/// Wires `device` to KVM and `bus` in `slot`: irqfd, ioeventfds (unless
/// `--notify exit`), the transport on the bus.
pub fn attach_one(
    vm: &VmFd,
    bus: &mut Bus,
    mem: &GuestMemoryMmap,
    notify: NotifyMode,
    slot: MmioSlot,
    device: Box<dyn VirtioDevice>,
) -> Result<Arc<Mutex<MmioTransport>>, DeviceError> {
    let base = slot.base;
    let transport_err = |source| DeviceError::Transport { base, source };
    let kvm_err = |what: String| move |source| DeviceError::Kvm { what, base, source };

    let irqfd = EventFd::new(EFD_NONBLOCK).map_err(transport_err)?;
    vm.register_irqfd(&irqfd, slot.gsi)
        .map_err(kvm_err("irqfd".into()))?;
    let transport = MmioTransport::new(device, mem.clone(), irqfd).map_err(transport_err)?;
    if notify == NotifyMode::Ioeventfd {
        let notify_addr = IoEventAddress::Mmio(base + QUEUE_NOTIFY);
        for (queue, kick) in transport.queue_kicks().iter().enumerate() {
            // A 4-byte datamatch: only a 32-bit write of this queue's index
            // is handled in KVM; anything else exits to the transport.
            vm.register_ioevent(kick, &notify_addr, queue as u32)
                .map_err(kvm_err(format!("ioeventfd of queue {queue}")))?;
        }
    }
    let transport = Arc::new(Mutex::new(transport));
    bus.insert(base, MmioSlot::LEN, transport.clone())?;
    Ok(transport)
}

/// The transport goes on the MMIO bus as is (an `Arc<Mutex<MmioTransport>>`); the
/// transport validates offsets and access sizes itself: a bad access from the guest is
/// ignored (reads return zeros), never a panic.
impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        MmioTransport::read(self, offset, data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        MmioTransport::write(self, offset, data);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vstate::memory::{e820_map, ram_ranges};

    #[test]
    fn slots_are_consecutive_windows_and_gsis() {
        let slots = mmio_slots(3).unwrap();
        assert_eq!(
            slots,
            vec![
                MmioSlot {
                    index: 0,
                    base: 0xc000_0000,
                    gsi: 5
                },
                MmioSlot {
                    index: 1,
                    base: 0xc000_1000,
                    gsi: 6
                },
                MmioSlot {
                    index: 2,
                    base: 0xc000_2000,
                    gsi: 7
                },
            ]
        );
        assert!(mmio_slots(0).unwrap().is_empty());
        let all = mmio_slots(MAX_VIRTIO_MMIO_DEVICES as usize).unwrap();
        assert_eq!(
            all.last().unwrap().gsi,
            crate::arch::layout::IOAPIC_PINS - 1
        );
        assert!(matches!(
            mmio_slots(MAX_VIRTIO_MMIO_DEVICES as usize + 1),
            Err(DeviceError::TooManyDevices(20))
        ));
    }

    #[test]
    fn windows_stay_out_of_ram_and_off_the_apics() {
        use crate::arch::layout::{COM1_GSI, IOAPIC_ADDR};
        let slots = mmio_slots(MAX_VIRTIO_MMIO_DEVICES as usize).unwrap();
        for mem in [16u64 << 20, 512 << 20, 3 << 30, (3 << 30) + 4096, 8 << 30] {
            for s in &slots {
                let end = s.base + MmioSlot::LEN;
                for (start, len) in ram_ranges(mem) {
                    assert!(end <= start.0 || s.base >= start.0 + len, "{s:?} in RAM");
                }
                for e in e820_map(mem) {
                    assert!(end <= e.addr || s.base >= e.addr + e.size, "{s:?} in e820");
                }
            }
        }
        for s in &slots {
            assert!(s.base + MmioSlot::LEN <= IOAPIC_ADDR);
            assert_ne!(s.gsi, COM1_GSI);
        }
    }

    #[test]
    fn dsdt_announces_each_slot() {
        let slots = mmio_slots(2).unwrap();
        let mut devices = vec![DsdtDevice::com1()];
        devices.extend(slots.iter().map(MmioSlot::dsdt_device));
        let t = crate::arch::acpi::dsdt(&devices);
        let count = t.windows(9).filter(|w| w == b"LNRO0005\0").count();
        assert_eq!(count, 2);
        for s in &slots {
            let name = format!("VR{:02X}", s.index);
            assert!(t.windows(4).any(|w| w == name.as_bytes()), "{name}");
            let mut mem32 = vec![0x86, 0x09, 0x00, 0x01];
            mem32.extend_from_slice(&(s.base as u32).to_le_bytes());
            mem32.extend_from_slice(&0x1000u32.to_le_bytes());
            assert!(
                t.windows(mem32.len()).any(|w| w == mem32),
                "window of {s:?}"
            );
            // Extended interrupt: consumer, edge, active high, one GSI.
            let irq = [0x89, 0x06, 0x00, 0x03, 0x01, s.gsi as u8, 0, 0, 0];
            assert!(t.windows(irq.len()).any(|w| w == irq), "GSI of {s:?}");
        }
    }

    #[test]
    fn cmdline_gets_one_parameter_per_device() {
        let slots = mmio_slots(2).unwrap();
        let both = "virtio_mmio.device=4K@0xc0000000:5 virtio_mmio.device=4K@0xc0001000:6";
        assert_eq!(
            kernel_cmdline("console=ttyS0 quiet", &slots),
            format!("console=ttyS0 quiet {both}")
        );
        assert_eq!(kernel_cmdline("console=ttyS0", &[]), "console=ttyS0");
        assert_eq!(kernel_cmdline("", &slots[..1]), &both[..34]);
        assert_eq!(
            kernel_cmdline("a  ", &slots[..1]),
            format!("a {}", &both[..34])
        );
        // Kernel parameters stay before init's arguments.
        assert_eq!(
            kernel_cmdline("console=ttyS0 -- single x=1", &slots),
            format!("console=ttyS0 {both} -- single x=1")
        );
        assert_eq!(
            kernel_cmdline("-- single", &slots[..1]),
            format!("{} -- single", &both[..34])
        );
        assert_eq!(
            kernel_cmdline("quiet --", &slots[..1]),
            format!("quiet {} --", &both[..34])
        );
        // "--" inside a word is not the separator.
        assert_eq!(
            kernel_cmdline("a--b", &slots[..1]),
            format!("a--b {}", &both[..34])
        );
    }
}
