//! Parsing a virtio-blk request out of a descriptor chain.
//!
//! This code knows guest memory and descriptor chains only (no worker, no transport),
//! so the vhost-user-blk backend can run exactly the same parser.
//!
//! The device expects the layout every Linux driver uses: the 16-byte header in the
//! first (device-readable) descriptor, then the data descriptors, then the status
//! byte in the last (device-writable) descriptor. The status is written to the last
//! byte of that descriptor. See the [module docs](super) for what happens when a
//! chain does not fit.

use std::ops::Deref;
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
    VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::DescriptorChain;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, Permissions};

/// log2 of the virtio-blk sector size.
pub const SECTOR_SHIFT: u32 = 9;
/// The virtio-blk sector size: capacity and request offsets count in these.
pub const SECTOR_SIZE: u64 = 1 << SECTOR_SHIFT;
/// Size of the request header (`struct virtio_blk_outhdr`).
pub const HEADER_LEN: u32 = 16;
/// Size of one DISCARD / WRITE_ZEROES range (`struct virtio_blk_discard_write_zeroes`).
pub const RANGE_LEN: u32 = 16;

/// The request types this device knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RequestType {
    /// Read sectors into the guest.
    #[default]
    In,
    /// Write sectors from the guest.
    Out,
    /// Make written data durable.
    Flush,
    /// Return the device ID string.
    GetId,
    /// Deallocate ranges.
    Discard,
    /// Zero ranges.
    WriteZeroes,
    /// Any other type: answered VIRTIO_BLK_S_UNSUPP.
    Unsupported(u32),
}

impl From<u32> for RequestType {
    fn from(t: u32) -> Self {
        match t {
            VIRTIO_BLK_T_IN => Self::In,
            VIRTIO_BLK_T_OUT => Self::Out,
            VIRTIO_BLK_T_FLUSH => Self::Flush,
            VIRTIO_BLK_T_GET_ID => Self::GetId,
            VIRTIO_BLK_T_DISCARD => Self::Discard,
            VIRTIO_BLK_T_WRITE_ZEROES => Self::WriteZeroes,
            other => Self::Unsupported(other),
        }
    }
}

impl RequestType {
    /// Whether the request changes the disk (refused on a read-only one).
    pub fn writes_disk(self) -> bool {
        matches!(self, Self::Out | Self::Discard | Self::WriteZeroes)
    }

    /// Whether the data descriptors of this type are written by the device.
    fn data_is_device_writable(self) -> Option<bool> {
        match self {
            Self::In | Self::GetId => Some(true),
            Self::Out | Self::Discard | Self::WriteZeroes => Some(false),
            Self::Flush | Self::Unsupported(_) => None,
        }
    }
}

/// One guest buffer of a request's data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// Guest-physical address.
    pub addr: GuestAddress,
    /// Length in bytes.
    pub len: u32,
}

/// One range of a DISCARD or WRITE_ZEROES request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Range {
    /// First sector.
    pub sector: u64,
    /// Number of sectors.
    pub num_sectors: u32,
    /// VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP or 0.
    pub flags: u32,
}

/// The limits a request is checked against (the device's config space plus capacity).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestLimits {
    /// Disk size in sectors.
    pub capacity_sectors: u64,
    /// Maximum number of data segments (config `seg_max`).
    pub seg_max: u32,
    /// Maximum size of one data segment (config `size_max`).
    pub size_max: u32,
    /// Maximum total data of one IN/OUT request.
    pub max_request_bytes: u64,
    /// Maximum sectors of one DISCARD range.
    pub max_discard_sectors: u32,
    /// Maximum ranges of one DISCARD request.
    pub max_discard_seg: u32,
    /// Maximum sectors of one WRITE_ZEROES range.
    pub max_write_zeroes_sectors: u32,
    /// Maximum ranges of one WRITE_ZEROES request.
    pub max_write_zeroes_seg: u32,
}

/// Why a chain is not a valid request. Each variant is one "kind" of guest fault,
/// logged once per device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Fault {
    /// The chain has no descriptors (e.g. a head index beyond the queue).
    #[error("empty descriptor chain")]
    EmptyChain,
    /// The chain stops at a descriptor that says it has a next one: a loop, a next
    /// index beyond the table, an unreadable descriptor or a bad indirect table.
    #[error("descriptor chain is broken (loop, bad next index or bad indirect table)")]
    BrokenChain,
    /// The last descriptor is not device-writable.
    #[error("status descriptor is not device-writable")]
    StatusNotWritable,
    /// The last descriptor has length 0.
    #[error("status descriptor is empty")]
    StatusTooShort,
    /// The status byte is outside guest memory.
    #[error("status descriptor is outside guest memory")]
    StatusOutOfMemory,
    /// The chain has only the status descriptor.
    #[error("request header is missing")]
    HeaderMissing,
    /// The header descriptor is device-writable.
    #[error("request header is in a device-writable descriptor")]
    HeaderWriteOnly,
    /// The header descriptor is shorter than 16 bytes.
    #[error("request header descriptor is shorter than 16 bytes")]
    HeaderTooShort,
    /// A header or data descriptor is outside guest memory.
    #[error("descriptor outside guest memory")]
    DescriptorOutOfMemory,
    /// More data descriptors than `seg_max`.
    #[error("too many data segments")]
    TooManySegments,
    /// A data descriptor larger than `size_max`.
    #[error("data segment larger than size_max")]
    SegmentTooLarge,
    /// The request's data exceeds what one request may carry.
    #[error("request larger than allowed")]
    RequestTooLarge,
    /// A data descriptor goes the wrong way for the request type.
    #[error("data descriptor has the wrong direction for the request type")]
    WrongDirection,
    /// IN/OUT data that is not a multiple of 512 bytes.
    #[error("data length is not a multiple of the sector size")]
    UnalignedLength,
    /// The request reaches beyond the end of the disk.
    #[error("sector beyond capacity")]
    SectorOutOfRange,
    /// A malformed DISCARD/WRITE_ZEROES range list.
    #[error("bad discard/write-zeroes range")]
    BadRange,
    /// Flags the device does not support in a DISCARD/WRITE_ZEROES range.
    #[error("unsupported discard/write-zeroes flags")]
    UnsupportedFlags,
    /// A request type the device does not know.
    #[error("unsupported request type")]
    Unsupported,
}

impl Fault {
    /// The status byte that answers this fault.
    pub fn status(self) -> u8 {
        match self {
            Self::Unsupported | Self::UnsupportedFlags => VIRTIO_BLK_S_UNSUPP as u8,
            _ => VIRTIO_BLK_S_IOERR as u8,
        }
    }

    /// A small distinct number per kind (for log-once bookkeeping).
    pub fn index(self) -> u32 {
        self as u32
    }

    /// Whether the fault is a malformed chain (rather than a well-formed request the
    /// device does not support).
    pub fn is_malformed(self) -> bool {
        !matches!(self, Self::Unsupported | Self::UnsupportedFlags)
    }
}

/// A chain that is not a valid request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// There is no writable status byte to answer in: the device must set
    /// DEVICE_NEEDS_RESET and stop processing the queue.
    #[error("unanswerable request: {0}")]
    NoStatus(Fault),
    /// The request is answered with `fault.status()` in the status byte.
    #[error("rejected request: {fault}")]
    Rejected {
        /// Where the status byte goes.
        status_addr: GuestAddress,
        /// Why.
        fault: Fault,
    },
}

/// A parsed, validated virtio-blk request.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Request {
    /// What to do.
    pub request_type: RequestType,
    /// The first sector (IN/OUT).
    pub sector: u64,
    /// The data buffers, in order.
    pub data: Vec<Segment>,
    /// The ranges of a DISCARD / WRITE_ZEROES request.
    pub ranges: Vec<Range>,
    /// Where the status byte goes.
    pub status_addr: GuestAddress,
}

/// Where a chain's status byte is: the last byte of its last descriptor, which must
/// end the chain, be device-writable, non-empty and in guest memory.
pub fn status_byte<M: GuestMemory + ?Sized>(
    descs: &[Descriptor],
    mem: &M,
) -> Result<GuestAddress, Fault> {
    let status_desc = descs.last().ok_or(Fault::EmptyChain)?;
    if status_desc.has_next() {
        return Err(Fault::BrokenChain);
    }
    if !status_desc.is_write_only() {
        return Err(Fault::StatusNotWritable);
    }
    if status_desc.len() == 0 {
        return Err(Fault::StatusTooShort);
    }
    status_desc
        .addr()
        .checked_add(u64::from(status_desc.len()) - 1)
        .filter(|a| mem.check_range(*a, 1, Permissions::Write))
        .ok_or(Fault::StatusOutOfMemory)
}

impl Request {
    /// Total length of the data buffers.
    pub fn data_len(&self) -> u64 {
        self.data.iter().map(|s| u64::from(s.len)).sum()
    }

    /// Parses and validates the request in `chain`. `mem` is the guest memory the
    /// chain's buffers live in. (A device parses with [`RequestScratch::parse`], which
    /// reuses its buffers.)
    pub fn parse<C, M>(
        chain: DescriptorChain<C>,
        mem: &M,
        limits: &RequestLimits,
    ) -> Result<Self, ParseError>
    where
        C: Deref,
        C::Target: GuestMemory,
        M: GuestMemory + ?Sized,
    {
        RequestScratch::default().parse(chain, mem, limits).cloned()
    }
}

/// The buffers a queue parses its requests into, kept from one request to the next
/// so that parsing a read or write allocates nothing once they have grown to the
/// largest chain seen.
#[derive(Debug, Default)]
pub struct RequestScratch {
    descs: Vec<Descriptor>,
    request: Request,
}

impl RequestScratch {
    /// Parses and validates the request in `chain` (see [`Request::parse`]).
    pub fn parse<C, M>(
        &mut self,
        chain: DescriptorChain<C>,
        mem: &M,
        limits: &RequestLimits,
    ) -> Result<&Request, ParseError>
    where
        C: Deref,
        C::Target: GuestMemory,
        M: GuestMemory + ?Sized,
    {
        let Self { descs, request } = self;
        descs.clear();
        descs.extend(chain);
        let status_addr = status_byte(descs, mem).map_err(ParseError::NoStatus)?;
        let rest = &descs[..descs.len() - 1];
        let reject = |fault| ParseError::Rejected { status_addr, fault };

        // The header: the first 16 device-readable bytes, in as many descriptors as the
        // driver used (VERSION_1 forbids a device to assume the layout). Bytes of the
        // last header descriptor after the header are data.
        let mut raw = [0u8; HEADER_LEN as usize];
        let mut got = 0usize;
        let mut first_data = 0usize;
        let mut header_tail = None;
        for (i, d) in rest.iter().enumerate() {
            if d.is_write_only() {
                return Err(reject(if got == 0 {
                    Fault::HeaderWriteOnly
                } else {
                    Fault::HeaderTooShort
                }));
            }
            let take = (HEADER_LEN as usize - got).min(d.len() as usize);
            let dst = raw
                .get_mut(got..got + take)
                .ok_or(reject(Fault::HeaderTooShort))?;
            mem.read_slice(dst, d.addr())
                .map_err(|_| reject(Fault::DescriptorOutOfMemory))?;
            got += take;
            first_data = i + 1;
            if got == HEADER_LEN as usize {
                let tail = d.len() - take as u32;
                if tail > 0 {
                    let addr = d
                        .addr()
                        .checked_add(take as u64)
                        .ok_or(reject(Fault::DescriptorOutOfMemory))?;
                    header_tail = Some((addr, tail, false));
                }
                break;
            }
        }
        if rest.is_empty() {
            return Err(reject(Fault::HeaderMissing));
        }
        if got < HEADER_LEN as usize {
            return Err(reject(Fault::HeaderTooShort));
        }
        let (type_bytes, rest_bytes) = raw.split_at(4);
        let (_ioprio, sector_bytes) = rest_bytes.split_at(4);
        let request_type = RequestType::from(u32::from_le_bytes(
            type_bytes
                .try_into()
                .map_err(|_| reject(Fault::HeaderTooShort))?,
        ));
        let sector = u64::from_le_bytes(
            sector_bytes
                .try_into()
                .map_err(|_| reject(Fault::HeaderTooShort))?,
        );

        let writable = match request_type.data_is_device_writable() {
            Some(w) => Some(w),
            None if matches!(request_type, RequestType::Unsupported(_)) => {
                return Err(reject(Fault::Unsupported))
            }
            None => None,
        };
        // Bytes of the status descriptor before the status byte are device-writable
        // data. Split-off parts in the wrong direction for the request are ignored (as
        // QEMU does); whole descriptors in the wrong direction are refused below.
        let status_desc = descs.last().ok_or(reject(Fault::HeaderMissing))?;
        let status_prefix =
            (status_desc.len() > 1).then(|| (status_desc.addr(), status_desc.len() - 1, true));
        let keep = |part: &(GuestAddress, u32, bool)| writable.is_none_or(|w| w == part.2);
        let data_descs = rest.get(first_data..).unwrap_or_default();
        let parts = header_tail
            .filter(keep)
            .into_iter()
            .chain(
                data_descs
                    .iter()
                    .map(|d| (d.addr(), d.len(), d.is_write_only())),
            )
            .chain(status_prefix.filter(keep));

        let data = &mut request.data;
        data.clear();
        let mut total: u64 = 0;
        for (addr, len, write_only) in parts {
            if data.len() == limits.seg_max as usize {
                return Err(reject(Fault::TooManySegments));
            }
            if let Some(w) = writable {
                if write_only != w {
                    return Err(reject(Fault::WrongDirection));
                }
            }
            if len > limits.size_max {
                return Err(reject(Fault::SegmentTooLarge));
            }
            let access = if write_only {
                Permissions::Write
            } else {
                Permissions::Read
            };
            if len > 0 && !mem.check_range(addr, len as usize, access) {
                return Err(reject(Fault::DescriptorOutOfMemory));
            }
            total += u64::from(len);
            data.push(Segment { addr, len });
        }
        if total > limits.max_request_bytes {
            return Err(reject(Fault::RequestTooLarge));
        }

        request.ranges.clear();
        match request_type {
            RequestType::In | RequestType::Out => {
                if !total.is_multiple_of(SECTOR_SIZE) {
                    return Err(reject(Fault::UnalignedLength));
                }
                check_extent(sector, total >> SECTOR_SHIFT, limits.capacity_sectors)
                    .ok_or(reject(Fault::SectorOutOfRange))?;
            }
            RequestType::Discard | RequestType::WriteZeroes => {
                let (max_seg, max_sectors) = if request_type == RequestType::Discard {
                    (limits.max_discard_seg, limits.max_discard_sectors)
                } else {
                    (limits.max_write_zeroes_seg, limits.max_write_zeroes_sectors)
                };
                request.ranges = read_ranges(data, mem, max_seg).map_err(reject)?;
                for r in &request.ranges {
                    let allowed = if request_type == RequestType::Discard {
                        0
                    } else {
                        VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
                    };
                    if r.flags & !allowed != 0 {
                        return Err(reject(Fault::UnsupportedFlags));
                    }
                    if r.num_sectors > max_sectors {
                        return Err(reject(Fault::BadRange));
                    }
                    check_extent(r.sector, u64::from(r.num_sectors), limits.capacity_sectors)
                        .ok_or(reject(Fault::SectorOutOfRange))?;
                }
            }
            RequestType::Flush | RequestType::GetId | RequestType::Unsupported(_) => {}
        }

        request.request_type = request_type;
        request.sector = sector;
        request.status_addr = status_addr;
        Ok(request)
    }
}

/// `Some(())` when `[sector, sector + count)` lies within the disk.
fn check_extent(sector: u64, count: u64, capacity: u64) -> Option<()> {
    let end = sector.checked_add(count)?;
    (end <= capacity).then_some(())
}

/// Reads the DISCARD/WRITE_ZEROES ranges out of the (device-readable) data.
fn read_ranges<M: GuestMemory + ?Sized>(
    data: &[Segment],
    mem: &M,
    max_seg: u32,
) -> Result<Vec<Range>, Fault> {
    let mut bytes = Vec::new();
    for s in data {
        let start = bytes.len();
        let end = start + s.len as usize;
        if end > (max_seg as usize) * RANGE_LEN as usize {
            return Err(Fault::BadRange);
        }
        bytes.resize(end, 0);
        let buf = bytes.get_mut(start..).ok_or(Fault::BadRange)?;
        mem.read_slice(buf, s.addr)
            .map_err(|_| Fault::DescriptorOutOfMemory)?;
    }
    if bytes.is_empty() || bytes.len() % RANGE_LEN as usize != 0 {
        return Err(Fault::BadRange);
    }
    let mut ranges = Vec::with_capacity(bytes.len() / RANGE_LEN as usize);
    for chunk in bytes.chunks_exact(RANGE_LEN as usize) {
        let field = |from: usize, to: usize| chunk.get(from..to).ok_or(Fault::BadRange);
        let sector = u64::from_le_bytes(field(0, 8)?.try_into().map_err(|_| Fault::BadRange)?);
        let num_sectors =
            u32::from_le_bytes(field(8, 12)?.try_into().map_err(|_| Fault::BadRange)?);
        let flags = u32::from_le_bytes(field(12, 16)?.try_into().map_err(|_| Fault::BadRange)?);
        ranges.push(Range {
            sector,
            num_sectors,
            flags,
        });
    }
    Ok(ranges)
}
