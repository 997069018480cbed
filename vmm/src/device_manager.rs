//! Wires virtio devices to KVM: each device gets a 4 KiB window in the
//! virtio-mmio area and a GSI ([`MmioSlot`]), its interrupt eventfd becomes
//! a KVM irqfd on that GSI, each queue's kick eventfd a KVM ioeventfd on the
//! window's QueueNotify register with the queue index as datamatch (unless
//! `--notify exit`), and the transport goes on the MMIO bus for every other
//! register access. The guest finds the devices in the DSDT and, for kernels
//! built with `CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES`, on the command line.
//!
//! The devices are the `--disk`s (in-VMM virtio-blk) and then the
//! `--vhost-user-blk`s (virtio-blk served by an external backend, which gets the
//! same kick eventfds and irqfd: see [`crate::vhost_user`]).
//!
//! Interrupts are edge-triggered, as in Firecracker: an irqfd without a
//! resample fd pulses its GSI (assert, de-assert), which is an edge, and
//! Linux's virtio_mmio handler reads and acknowledges InterruptStatus
//! itself, so there is no level to keep up.

use std::sync::{Arc, Mutex};

use evmm_virtio::blk::{Block, BlockConfig, BlockError};
use evmm_virtio::mmio::{MmioTransport, MMIO_WINDOW_SIZE, QUEUE_NOTIFY};
use evmm_virtio::VirtioDevice;
use kvm_ioctls::{Cap, IoEventAddress, Kvm, VmFd};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::acpi::DsdtDevice;
use crate::bus::{Bus, BusError};
use crate::config::NotifyMode;
use crate::layout::{
    FIRST_DEVICE_GSI, MAX_VIRTIO_MMIO_DEVICES, VIRTIO_MMIO_SLOT_SIZE, VIRTIO_MMIO_START,
};
use crate::memory::GuestMemoryMmap;
use crate::metrics::{DeviceRecord, MetricsReport};
use crate::vhost_user::{VhostUserBlk, VhostUserBlkConfig, VhostUserError};

const _: () = assert!(MMIO_WINDOW_SIZE <= VIRTIO_MMIO_SLOT_SIZE);

/// Errors while creating devices or wiring them to KVM.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// More devices than slots.
    #[error("{0} virtio devices requested; evmm has slots for {MAX_VIRTIO_MMIO_DEVICES}")]
    TooManyDevices(usize),
    /// A disk cannot be opened.
    #[error(transparent)]
    Block(#[from] BlockError),
    /// A vhost-user backend cannot be reached or refused the handshake.
    #[error(transparent)]
    VhostUser(#[from] VhostUserError),
    /// A `direct=on` disk cannot be opened with O_DIRECT.
    #[error("{0} (direct=on needs a file system with O_DIRECT; tmpfs has none: try direct=off)")]
    NoDirectIo(#[source] BlockError),
    /// KVM cannot deliver queue notifications through ioeventfds.
    #[error("KVM does not support ioeventfds (KVM_CAP_IOEVENTFD); use --notify exit")]
    NoIoeventfd,
    /// An eventfd or the transport could not be created.
    #[error("cannot create the transport of the device at {base:#x}: {source}")]
    Transport {
        /// The device's MMIO base.
        base: u64,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// KVM refused an irqfd or ioeventfd.
    #[error("cannot register the {what} of the device at {base:#x}: {source}")]
    Kvm {
        /// "irqfd" or "ioeventfd of queue N".
        what: String,
        /// The device's MMIO base.
        base: u64,
        /// Why.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// The window overlaps another device on the MMIO bus.
    #[error(transparent)]
    Bus(#[from] BusError),
}

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

/// Opens every disk. Done before anything touches KVM, so a bad disk is
/// reported first.
pub fn open_disks(disks: &[BlockConfig]) -> Result<Vec<Block>, DeviceError> {
    disks
        .iter()
        .map(|d| {
            Block::new(d.clone()).map_err(|e| match &e {
                BlockError::Open { source, .. }
                    if d.direct && source.raw_os_error() == Some(libc::EINVAL) =>
                {
                    DeviceError::NoDirectIo(e)
                }
                _ => DeviceError::Block(e),
            })
        })
        .collect()
}

/// Connects to the backend of every `--vhost-user-blk` device, in its slot
/// (`slots` as many as `configs`). Done before anything touches KVM, so a
/// missing backend is reported first; on error the devices already
/// connected are closed again.
pub fn connect_vhost_user(
    configs: &[VhostUserBlkConfig],
    slots: &[MmioSlot],
) -> Result<Vec<VhostUserBlk>, DeviceError> {
    configs
        .iter()
        .zip(slots)
        .map(|(c, s)| {
            VhostUserBlk::connect(c, &format!("vhost-user-blk@{:#x}", s.base)).map_err(Into::into)
        })
        .collect()
}

/// What a device is, for the log and the metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    /// `"virtio-blk"` or `"vhost-user-blk"`.
    pub kind: &'static str,
    /// The disk's `id=`, if any.
    pub id: Option<String>,
    /// The disk file or the backend's socket.
    pub path: String,
    /// Request queues.
    pub queues: usize,
    /// A read-only disk.
    pub readonly: bool,
}

/// A device waiting to be wired to KVM in its slot.
pub struct PendingDevice {
    /// Where it goes.
    pub slot: MmioSlot,
    /// What it is.
    pub info: DeviceInfo,
    /// The device.
    pub device: Box<dyn VirtioDevice>,
}

impl PendingDevice {
    /// A `--disk`.
    pub fn block(slot: MmioSlot, config: &BlockConfig, block: Block) -> Self {
        PendingDevice {
            slot,
            info: DeviceInfo {
                kind: "virtio-blk",
                id: config.id.clone(),
                path: config.path.display().to_string(),
                queues: usize::from(config.queues),
                readonly: config.readonly,
            },
            device: Box::new(block),
        }
    }

    /// A `--vhost-user-blk`.
    pub fn vhost_user_blk(slot: MmioSlot, device: VhostUserBlk) -> Self {
        PendingDevice {
            slot,
            info: DeviceInfo {
                kind: "vhost-user-blk",
                id: None,
                path: device.socket().display().to_string(),
                queues: device.queue_count(),
                readonly: device.avail_features()
                    & (1 << virtio_bindings::virtio_blk::VIRTIO_BLK_F_RO)
                    != 0,
            },
            device: Box::new(device),
        }
    }
}

/// A device wired to KVM and the bus.
struct Attached {
    slot: MmioSlot,
    info: DeviceInfo,
    transport: Arc<Mutex<MmioTransport>>,
}

/// The VM's virtio devices. Dropping this (after the vCPUs, which share the
/// transports through the MMIO bus, are gone) drops the transports, whose
/// devices stop and join their workers.
pub struct VirtioDevices {
    notify: NotifyMode,
    devices: Vec<Attached>,
}

impl VirtioDevices {
    /// Wires each device to KVM and `bus` in its slot (slots as from
    /// [`mmio_slots`]). `mem` is the VM's own guest memory.
    pub fn attach(
        kvm: &Kvm,
        vm: &VmFd,
        bus: &mut Bus,
        mem: &GuestMemoryMmap,
        notify: NotifyMode,
        pending: Vec<PendingDevice>,
    ) -> Result<Self, DeviceError> {
        if notify == NotifyMode::Ioeventfd
            && !pending.is_empty()
            && !kvm.check_extension(Cap::Ioeventfd)
        {
            return Err(DeviceError::NoIoeventfd);
        }
        let mut devices = Vec::with_capacity(pending.len());
        for PendingDevice { slot, info, device } in pending {
            let transport = attach_one(vm, bus, mem, notify, slot, device)?;
            log::info!(
                "{} {} at {:#x}, GSI {}, {} queue(s), notify by {}{}",
                info.kind,
                info.path,
                slot.base,
                slot.gsi,
                info.queues,
                notify.as_str(),
                if info.readonly { ", read-only" } else { "" }
            );
            devices.push(Attached {
                slot,
                info,
                transport,
            });
        }
        Ok(VirtioDevices { notify, devices })
    }

    /// The counters of every device, for `--metrics`.
    pub fn metrics(&self) -> MetricsReport {
        MetricsReport {
            notify: self.notify.as_str(),
            devices: self
                .devices
                .iter()
                .map(|d| DeviceRecord {
                    kind: d.info.kind,
                    id: d.info.id.clone(),
                    path: d.info.path.clone(),
                    mmio_base: d.slot.base,
                    gsi: d.slot.gsi,
                    transport: d
                        .transport
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .metrics(),
                })
                .collect(),
        }
    }
}

fn attach_one(
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::{e820_map, ram_ranges};

    #[test]
    fn direct_io_refusal_gets_a_hint() {
        let e = BlockError::Open {
            path: "/tmp/a.img".into(),
            source: std::io::Error::from_raw_os_error(libc::EINVAL),
        };
        let msg = DeviceError::NoDirectIo(e).to_string();
        assert!(msg.starts_with("cannot open disk /tmp/a.img: "), "{msg}");
        assert!(msg.contains("direct=off"), "{msg}");
    }

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
        assert_eq!(all.last().unwrap().gsi, crate::layout::IOAPIC_PINS - 1);
        assert!(matches!(
            mmio_slots(MAX_VIRTIO_MMIO_DEVICES as usize + 1),
            Err(DeviceError::TooManyDevices(20))
        ));
    }

    #[test]
    fn windows_stay_out_of_ram_and_off_the_apics() {
        use crate::layout::{COM1_GSI, IOAPIC_ADDR};
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
        let t = crate::acpi::dsdt(&devices);
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

    /// A VM with an irqchip and `disks` attached, on real KVM. Needs
    /// /dev/kvm: without it the test fails (it never skips silently).
    fn vm_with_disks(
        notify: NotifyMode,
        disks: &[BlockConfig],
    ) -> (VmFd, Bus, VirtioDevices, crate::memory::GuestRam) {
        let kvm = Kvm::new().expect("no usable /dev/kvm: these tests need KVM");
        let vm = kvm.create_vm().unwrap();
        vm.create_irq_chip().unwrap();
        let ram = crate::memory::GuestRam::new(16 << 20).unwrap();
        let slots = mmio_slots(disks.len()).unwrap();
        let blocks = open_disks(disks).unwrap();
        let pending = slots
            .into_iter()
            .zip(disks)
            .zip(blocks)
            .map(|((s, c), b)| PendingDevice::block(s, c, b))
            .collect();
        let mut bus = Bus::new("mmio");
        let devices =
            VirtioDevices::attach(&kvm, &vm, &mut bus, ram.memory(), notify, pending).unwrap();
        (vm, bus, devices, ram)
    }

    fn disk(path: &std::path::Path, queues: u16) -> BlockConfig {
        BlockConfig {
            path: path.to_path_buf(),
            readonly: false,
            id: Some(format!("q{queues}")),
            queues,
            direct: false,
            poll_us: 0,
        }
    }

    fn read32(bus: &Bus, addr: u64) -> u32 {
        let mut d = [0u8; 4];
        assert!(bus.read(addr, &mut d));
        u32::from_le_bytes(d)
    }

    #[test]
    fn transports_answer_on_the_bus_and_ioeventfds_are_registered() {
        let file = tempfile::NamedTempFile::new().unwrap();
        file.as_file().set_len(1 << 20).unwrap();
        let disks = [disk(file.path(), 1), disk(file.path(), 3)];
        let (vm, bus, devices, _ram) = vm_with_disks(NotifyMode::Ioeventfd, &disks);
        for slot in mmio_slots(2).unwrap() {
            assert_eq!(read32(&bus, slot.base), 0x7472_6976, "MagicValue");
            assert_eq!(read32(&bus, slot.base + 4), 2, "Version");
            assert_eq!(read32(&bus, slot.base + 8), 2, "DeviceID: block");
            // Odd accesses from the guest are ignored, not fatal.
            let mut odd = [0u8; 3];
            assert!(bus.read(slot.base + 1, &mut odd));
            assert!(bus.write(slot.base + 0x71, &[1, 2, 3]));
            assert!(bus.write(slot.base + MmioSlot::LEN - 1, &[0xff]));
        }
        assert!(
            !bus.read(0xc000_2000, &mut [0u8; 4]),
            "nothing past the last window"
        );
        // KVM already has each kick on QueueNotify with its queue index as
        // datamatch: a second registration of the same triple is refused.
        for (d, queues) in devices.devices.iter().zip([1usize, 3]) {
            let t = d.transport.lock().unwrap();
            assert_eq!(t.queue_kicks().len(), queues);
            let addr = IoEventAddress::Mmio(d.slot.base + QUEUE_NOTIFY);
            for (q, kick) in t.queue_kicks().iter().enumerate() {
                let err = vm.register_ioevent(kick, &addr, q as u32).unwrap_err();
                assert_eq!(err.errno(), libc::EEXIST, "queue {q}");
            }
        }
        let report = serde_json::to_value(devices.metrics()).unwrap();
        assert_eq!(report["notify"], "ioeventfd");
        assert_eq!(report["devices"][1]["mmio_base"], 0xc000_1000u64);
        assert_eq!(report["devices"][1]["gsi"], 6);
        assert_eq!(report["devices"][1]["id"], "q3");
        assert_eq!(report["devices"][1]["kind"], "virtio-blk");
        assert_eq!(
            report["devices"][0]["path"],
            file.path().display().to_string()
        );
        assert!(report["devices"][0]["transport"].is_object());
    }

    #[test]
    fn notify_exit_registers_no_ioeventfd_and_the_transport_kicks() {
        let file = tempfile::NamedTempFile::new().unwrap();
        file.as_file().set_len(1 << 20).unwrap();
        let (vm, bus, devices, _ram) = vm_with_disks(NotifyMode::Exit, &[disk(file.path(), 2)]);
        let d = &devices.devices[0];
        let addr = IoEventAddress::Mmio(d.slot.base + QUEUE_NOTIFY);
        {
            let t = d.transport.lock().unwrap();
            for (q, kick) in t.queue_kicks().iter().enumerate() {
                // Free: nothing was registered there.
                vm.register_ioevent(kick, &addr, q as u32).unwrap();
                vm.unregister_ioevent(kick, &addr, q as u32).unwrap();
            }
        }
        // A QueueNotify write that reaches the bus is an exit, counted.
        assert!(bus.write(d.slot.base + QUEUE_NOTIFY, &1u32.to_le_bytes()));
        assert_eq!(d.transport.lock().unwrap().notify_exits(), 1);
        assert_eq!(devices.metrics().notify, "exit");
    }
}
