//! The VM's virtio devices: each is opened (a disk) or connected (a vhost-user
//! backend) before anything touches KVM, becomes a [`PendingDevice`] in its slot, and
//! goes through one path, [`VirtioDevices::attach`] → [`mmio::attach_one`], which wires
//! it to KVM and the MMIO bus.
//!
//! The devices are the `--disk`s (in-VMM virtio-blk) and then the
//! `--vhost-user-blk`s (virtio-blk served by an external backend, which gets the
//! same kick eventfds and irqfd: see [`evmm_virtio::vhost`]).

use std::sync::{Arc, Mutex};

pub mod mmio;

use evmm_virtio::blk::{Block, BlockConfig, BlockError};
use evmm_virtio::net::{default_mac, Net, NetConfig, NetError, Tap};
use evmm_virtio::transport::mmio::MmioTransport;
use evmm_virtio::vhost::net::VhostNetError;
use evmm_virtio::vhost::user::VhostUserError;
use evmm_virtio::vhost::{
    VhostNet, VhostUserBlk, VhostUserBlkConfig, VhostUserFs, VhostUserFsConfig,
};
use evmm_virtio::VirtioDevice;
use kvm_ioctls::{Cap, Kvm, VmFd};

use crate::arch::layout::MAX_VIRTIO_MMIO_DEVICES;
use crate::config::net::{NetSpec, TapSource};
use crate::config::NotifyMode;
use crate::devices::bus::{Bus, BusError};
use crate::metrics::{DeviceRecord, MetricsReport};
use crate::vstate::memory::GuestMemoryMmap;
use mmio::{attach_one, MmioSlot};

pub use mmio::{kernel_cmdline, mmio_slots};

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
    /// A tap cannot be opened, or the network device set up.
    #[error("--net {tap}: {source}")]
    Net {
        /// The tap as given (`tap=NAME` or `fd=N`).
        tap: String,
        /// Why.
        #[source]
        source: NetError,
    },
    /// vhost-net cannot serve a network device.
    #[error("--net {tap},vhost=on: {source}")]
    VhostNet {
        /// The tap as given (`tap=NAME` or `fd=N`).
        tap: String,
        /// Why.
        #[source]
        source: VhostNetError,
    },
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

/// `aa:bb:cc:dd:ee:ff`.
fn format_mac(mac: [u8; 6]) -> String {
    mac.map(|b| format!("{b:02x}")).join(":")
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
            c.connect(&format!("vhost-user-blk@{:#x}", s.base))
                .map_err(Into::into)
        })
        .collect()
}

/// Connects to the backend of every `--fs` device, in its slot (`slots` as many as
/// `configs`); as [`connect_vhost_user`].
pub fn connect_fs(
    configs: &[VhostUserFsConfig],
    slots: &[MmioSlot],
) -> Result<Vec<VhostUserFs>, DeviceError> {
    configs
        .iter()
        .zip(slots)
        .map(|(c, s)| {
            c.connect(&format!("vhost-user-fs@{:#x}", s.base))
                .map_err(Into::into)
        })
        .collect()
}

/// Opens the tap of every `--net` device, in its slot (`slots` as many as `specs`),
/// and with `vhost=on` its vhost-net descriptors for guest memory `mem`. Done before
/// anything touches KVM, so a missing tap or vhost-net is reported first.
pub fn open_nets(
    specs: &[NetSpec],
    slots: &[MmioSlot],
    mem: &GuestMemoryMmap,
) -> Result<Vec<PendingDevice>, DeviceError> {
    specs
        .iter()
        .zip(slots)
        .map(|(spec, &slot)| {
            let tap_err = |source| DeviceError::Net {
                tap: spec.tap.to_string(),
                source,
            };
            let (name, taps) = match &spec.tap {
                TapSource::Name(name) => (name.clone(), Tap::open(name, spec.queue_pairs)),
                // SAFETY: the descriptors are the caller's, handed to evmm on the command
                // line; nothing else in evmm opens, uses or closes them.
                TapSource::Fds(fds) => (spec.tap.to_string(), unsafe { Tap::from_fds(fds) }),
            };
            let taps = taps.map_err(|e| tap_err(NetError::Tap(e)))?;
            let name = taps.first().map(|t| t.name().to_string()).unwrap_or(name);
            let config = NetConfig {
                mac: spec
                    .mac
                    .unwrap_or_else(|| default_mac(slot.index, std::process::id())),
                queue_pairs: spec.queue_pairs,
                mtu: spec.mtu,
                poll_us: spec.poll_us,
            };
            let info = DeviceInfo {
                kind: if spec.vhost {
                    "vhost-net"
                } else {
                    "virtio-net"
                },
                id: Some(format_mac(config.mac)),
                path: name.clone(),
                queues: usize::from(spec.queue_pairs),
                readonly: false,
            };
            let device: Box<dyn VirtioDevice> = if spec.vhost {
                Box::new(VhostNet::new(config, &name, taps, mem).map_err(|source| {
                    DeviceError::VhostNet {
                        tap: spec.tap.to_string(),
                        source,
                    }
                })?)
            } else {
                Box::new(Net::new(config, &name, taps).map_err(tap_err)?)
            };
            Ok(PendingDevice { slot, info, device })
        })
        .collect()
}

/// What a device is, for the log and the metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    /// `"virtio-blk"`, `"vhost-user-blk"`, `"virtio-net"`, `"vhost-net"` or
    /// `"vhost-user-fs"`.
    pub kind: &'static str,
    /// The disk's `id=`, the network device's MAC, or the file system's tag.
    pub id: Option<String>,
    /// The disk file, the backend's socket, or the tap.
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

impl PendingDevice {
    /// A `--fs`.
    pub fn vhost_user_fs(slot: MmioSlot, config: &VhostUserFsConfig, device: VhostUserFs) -> Self {
        PendingDevice {
            slot,
            info: DeviceInfo {
                kind: "vhost-user-fs",
                id: Some(config.tag.clone()),
                path: device.socket().display().to_string(),
                queues: device.queue_count(),
                readonly: false,
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

#[cfg(test)]
mod tests {
    use super::*;
    use evmm_virtio::transport::mmio::QUEUE_NOTIFY;
    use kvm_ioctls::IoEventAddress;

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

    /// A VM with an irqchip and `disks` attached, on real KVM. Needs
    /// /dev/kvm: without it the test fails (it never skips silently).
    fn vm_with_disks(
        notify: NotifyMode,
        disks: &[BlockConfig],
    ) -> (VmFd, Bus, VirtioDevices, crate::vstate::memory::GuestRam) {
        let kvm = Kvm::new().expect("no usable /dev/kvm: these tests need KVM");
        let vm = kvm.create_vm().unwrap();
        vm.create_irq_chip().unwrap();
        let ram = crate::vstate::memory::GuestRam::new(16 << 20).unwrap();
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
            poll: Default::default(),
            engine: Default::default(),
        }
    }

    fn read32(bus: &Bus, addr: u64) -> u32 {
        let mut d = [0u8; 4];
        assert!(bus.read(addr, &mut d));
        u32::from_le_bytes(d)
    }

    #[test]
    fn transports_answer_on_the_bus_and_ioeventfds_are_registered() {
        // Two images: a disk open for writing is locked against a second open.
        let files = [(); 2].map(|_| {
            let f = tempfile::NamedTempFile::new().unwrap();
            f.as_file().set_len(1 << 20).unwrap();
            f
        });
        let disks = [disk(files[0].path(), 1), disk(files[1].path(), 3)];
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
            files[0].path().display().to_string()
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
