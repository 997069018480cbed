//! vhost-user-fs: the per-device parts of a virtio-fs device (virtio ID 26) served by
//! a vhost-user backend such as virtiofsd.
//!
//! The configuration space is evmm's own: the tag the guest mounts (36 bytes, NUL
//! padded) and `num_request_queues`; nothing is read from or written to the backend
//! with GET_CONFIG/SET_CONFIG. The device has one high-priority queue (queue 0, used
//! for FORGET and interrupts of requests) and `num_request_queues` request queues after
//! it. No DAX window (no shared memory region) is offered. Once the backend is lost,
//! the takeover answers every request that expects a reply with a FUSE reply header
//! carrying `-EIO` for the request's `unique`; requests without a reply (FORGET) are
//! returned with nothing written.

use std::path::PathBuf;

use vhost::vhost_user::VhostUserProtocolFeatures;
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::frontend::FrontendError;
use super::user::connection::{BackendInfo, HandshakeNeeds};
use super::user::{UserDeviceKind, VhostUserDevice, VhostUserError};

/// The virtio device ID of a file system device.
pub const VIRTIO_ID_FS: u32 = 26;
/// Length of the tag field of the configuration space.
pub const TAG_LEN: usize = 36;
/// Size of the configuration space: the tag and `num_request_queues`.
pub const CONFIG_SIZE: usize = TAG_LEN + 4;
/// Most request queues evmm offers (besides the high-priority queue).
pub const MAX_REQUEST_QUEUES: u16 = 8;
/// Size of every queue (QEMU's vhost-user-fs default).
pub const QUEUE_SIZE: u16 = 128;
/// Size of a FUSE request header (`fuse_in_header`) up to and including `unique`.
const IN_HEADER_UNIQUE_END: usize = 16;
/// Size of a FUSE reply header (`fuse_out_header`: len, error, unique).
const OUT_HEADER_LEN: usize = 16;
/// The error the takeover answers with.
const EIO: i32 = 5;

/// One `--fs` device: the tag the guest mounts, the backend's socket, the request
/// queues.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VhostUserFsConfig {
    /// The tag (`mount -t virtiofs TAG /mnt`): 1 to 36 bytes, no NUL.
    pub tag: String,
    /// The backend's Unix socket.
    pub socket: PathBuf,
    /// Request queues (besides the high-priority queue); 1 to [`MAX_REQUEST_QUEUES`].
    pub queues: u16,
}

/// The file system parts of a vhost-user device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FsKind {
    tag: String,
}

/// A file system served by a vhost-user backend.
pub type VhostUserFs = VhostUserDevice<FsKind>;

impl VhostUserFsConfig {
    /// Connects to the backend and does the handshake; see
    /// [`VhostUserDevice::connect`].
    pub fn connect(&self, name: &str) -> Result<VhostUserFs, VhostUserError> {
        let kind = FsKind {
            tag: self.tag.clone(),
        };
        VhostUserDevice::connect(kind, &self.socket, Some(self.queues), name)
    }
}

impl UserDeviceKind for FsKind {
    fn name(&self) -> &'static str {
        "vhost-user-fs"
    }

    fn option(&self) -> &'static str {
        "fs"
    }

    fn device_type(&self) -> u32 {
        VIRTIO_ID_FS
    }

    fn queue_size(&self) -> u16 {
        QUEUE_SIZE
    }

    fn handshake_needs(&self) -> HandshakeNeeds {
        HandshakeNeeds {
            protocol_features: VhostUserProtocolFeatures::empty(),
            config_size: 0,
        }
    }

    fn guest_features(&self, backend: u64) -> u64 {
        backend
    }

    /// The high-priority queue plus `requested` request queues (1 by default). A
    /// backend with the MQ protocol feature must have that many; one without it is
    /// taken to serve the two queues every virtio-fs device has.
    fn queue_count(
        &self,
        info: &BackendInfo,
        requested: Option<u16>,
    ) -> Result<u16, FrontendError> {
        let requests = requested.unwrap_or(1).clamp(1, MAX_REQUEST_QUEUES);
        let total = requests + 1;
        let max = info.max_queues;
        if info
            .protocol_features
            .contains(VhostUserProtocolFeatures::MQ)
            && u64::from(total) > max
        {
            return Err(FrontendError::TooManyQueues {
                requested: requests,
                max: max.saturating_sub(1),
            });
        }
        if requests > 1
            && !info
                .protocol_features
                .contains(VhostUserProtocolFeatures::MQ)
        {
            return Err(FrontendError::NoMultiqueue(requests));
        }
        Ok(total)
    }

    fn config_space(&self, _info: &BackendInfo, queues: u16) -> Vec<u8> {
        config_space(&self.tag, queues.saturating_sub(1))
    }

    fn forwards_config_write(&self, _offset: u64, _len: usize, _features: u64) -> bool {
        false
    }

    fn fail_request(&self, descs: &[Descriptor], mem: &GuestMemoryMmap) -> Result<u32, String> {
        let Some(first_writable) = descs.iter().position(|d| d.is_write_only()) else {
            // FORGET and BATCH_FORGET have no reply.
            return Ok(0);
        };
        let mut header = [0u8; IN_HEADER_UNIQUE_END];
        gather(&descs[..first_writable], mem, &mut header)
            .map_err(|e| format!("request header: {e}"))?;
        let unique = u64::from_le_bytes(header[8..16].try_into().unwrap_or_default());
        let mut reply = [0u8; OUT_HEADER_LEN];
        reply[0..4].copy_from_slice(&(OUT_HEADER_LEN as u32).to_le_bytes());
        reply[4..8].copy_from_slice(&(-EIO).to_le_bytes());
        reply[8..16].copy_from_slice(&unique.to_le_bytes());
        scatter(&descs[first_writable..], mem, &reply).map_err(|e| format!("reply header: {e}"))?;
        Ok(OUT_HEADER_LEN as u32)
    }
}

/// The configuration space: `tag` NUL padded to [`TAG_LEN`] bytes, then
/// `num_request_queues` (little endian).
pub fn config_space(tag: &str, request_queues: u16) -> Vec<u8> {
    let mut config = vec![0u8; CONFIG_SIZE];
    let n = tag.len().min(TAG_LEN);
    config[..n].copy_from_slice(&tag.as_bytes()[..n]);
    config[TAG_LEN..].copy_from_slice(&u32::from(request_queues).to_le_bytes());
    config
}

/// Reads `out.len()` bytes from the device-readable descriptors `descs`, in order.
fn gather(descs: &[Descriptor], mem: &GuestMemoryMmap, out: &mut [u8]) -> Result<(), String> {
    let mut done = 0;
    for d in descs.iter().filter(|d| !d.is_write_only()) {
        if done == out.len() {
            break;
        }
        let n = (d.len() as usize).min(out.len() - done);
        mem.read_slice(&mut out[done..done + n], d.addr())
            .map_err(|e| e.to_string())?;
        done += n;
    }
    if done < out.len() {
        return Err(format!("{done} of {} bytes", out.len()));
    }
    Ok(())
}

/// Writes `data` into the device-writable descriptors of `descs`, in order.
fn scatter(descs: &[Descriptor], mem: &GuestMemoryMmap, data: &[u8]) -> Result<(), String> {
    let mut done = 0;
    for d in descs.iter().filter(|d| d.is_write_only()) {
        if done == data.len() {
            break;
        }
        let n = (d.len() as usize).min(data.len() - done);
        mem.write_slice(&data[done..done + n], GuestAddress(d.addr().0))
            .map_err(|e| e.to_string())?;
        done += n;
    }
    if done < data.len() {
        return Err(format!("room for {done} of {} bytes", data.len()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_queue::desc::split::Descriptor;
    use vm_memory::GuestAddress;

    const WRITE: u16 = virtio_bindings::virtio_ring::VRING_DESC_F_WRITE as u16;

    fn info(mq: bool, max_queues: u64) -> BackendInfo {
        BackendInfo {
            features: 0,
            protocol_features: if mq {
                VhostUserProtocolFeatures::MQ
            } else {
                VhostUserProtocolFeatures::empty()
            },
            max_queues,
            config: Vec::new(),
        }
    }

    fn desc(addr: u64, len: u32, flags: u16) -> Descriptor {
        Descriptor::new(addr, len, flags, 0)
    }

    fn kind() -> FsKind {
        FsKind { tag: "root".into() }
    }

    #[test]
    fn config_space_has_the_tag_and_the_request_queues() {
        let c = kind().config_space(&info(false, 1), 3);
        assert_eq!(c.len(), CONFIG_SIZE);
        assert_eq!(&c[..4], b"root");
        assert!(c[4..TAG_LEN].iter().all(|&b| b == 0));
        assert_eq!(u32::from_le_bytes(c[TAG_LEN..].try_into().unwrap()), 2);
        let long = config_space(&"t".repeat(36), 1);
        assert_eq!(&long[..TAG_LEN], "t".repeat(36).as_bytes());
    }

    #[test]
    fn queue_count_is_the_hiprio_queue_plus_the_request_queues() {
        let k = kind();
        assert_eq!(k.queue_count(&info(false, 1), None).unwrap(), 2);
        assert_eq!(k.queue_count(&info(true, 2), Some(1)).unwrap(), 2);
        assert_eq!(k.queue_count(&info(true, 5), Some(4)).unwrap(), 5);
        assert!(matches!(
            k.queue_count(&info(true, 2), Some(2)),
            Err(FrontendError::TooManyQueues {
                requested: 2,
                max: 1
            })
        ));
        assert!(matches!(
            k.queue_count(&info(false, 1), Some(2)),
            Err(FrontendError::NoMultiqueue(2))
        ));
    }

    #[test]
    fn the_takeover_answers_eio_with_the_requests_unique() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        // fuse_in_header split over two readable descriptors, the reply header in the
        // first writable one.
        let mut header = [0u8; 40];
        header[0..4].copy_from_slice(&40u32.to_le_bytes());
        header[4..8].copy_from_slice(&1u32.to_le_bytes());
        header[8..16].copy_from_slice(&0x1122_3344_5566_7788u64.to_le_bytes());
        mem.write_slice(&header[..10], GuestAddress(0x1000))
            .unwrap();
        mem.write_slice(&header[10..], GuestAddress(0x2000))
            .unwrap();
        mem.write_slice(&[0xaa; 64], GuestAddress(0x3000)).unwrap();
        let descs = [
            desc(0x1000, 10, 0),
            desc(0x2000, 30, 0),
            desc(0x3000, 16, WRITE),
            desc(0x4000, 64, WRITE),
        ];
        assert_eq!(kind().fail_request(&descs, &mem).unwrap(), 16);
        let mut reply = [0u8; 16];
        mem.read_slice(&mut reply, GuestAddress(0x3000)).unwrap();
        assert_eq!(u32::from_le_bytes(reply[0..4].try_into().unwrap()), 16);
        assert_eq!(i32::from_le_bytes(reply[4..8].try_into().unwrap()), -5);
        assert_eq!(
            u64::from_le_bytes(reply[8..16].try_into().unwrap()),
            0x1122_3344_5566_7788
        );
        let mut after = [0u8; 4];
        mem.read_slice(&mut after, GuestAddress(0x4000)).unwrap();
        assert_eq!(after, [0; 4], "nothing written past the reply header");
    }

    #[test]
    fn forget_gets_no_reply_and_bad_chains_are_refused() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        assert_eq!(
            kind().fail_request(&[desc(0x1000, 48, 0)], &mem).unwrap(),
            0
        );
        // A reply header that does not fit.
        let short = [desc(0x1000, 40, 0), desc(0x2000, 8, WRITE)];
        assert!(kind().fail_request(&short, &mem).is_err());
        // A request header outside guest memory.
        let outside = [desc(0xffff_0000, 40, 0), desc(0x2000, 16, WRITE)];
        assert!(kind().fail_request(&outside, &mem).is_err());
        // No request header at all.
        let bare = [desc(0x2000, 16, WRITE)];
        assert!(kind().fail_request(&bare, &mem).is_err());
    }
}
