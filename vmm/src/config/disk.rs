//! The value of `--disk`:
//! `path=FILE[,readonly=on][,id=SERIAL][,queues=N][,direct=on]`
//! `[,engine=io_uring|sync|auto][,poll=off|adaptive|N]` (`poll_us=N` is `poll=N`).
//!
//! Parsing checks the syntax and the ranges only; [`check_disk_file`] looks at
//! the file without opening it, so a bad command line is reported before
//! anything is touched.

use std::path::{Path, PathBuf};

use evmm_virtio::blk::{BlockConfig, EngineChoice};
use evmm_virtio::poll::PollMode;

/// Most request queues a disk may have.
pub const MAX_DISK_QUEUES: u16 = evmm_virtio::blk::config::MAX_QUEUES;
/// Longest `id` (what VIRTIO_BLK_T_GET_ID returns), in bytes.
pub const MAX_DISK_ID_BYTES: usize = 20;
/// Longest fixed polling window, in microseconds.
pub const MAX_DISK_POLL_US: u32 = evmm_virtio::poll::MAX_POLL_US;
/// The keys `--disk` knows, for error messages.
const KEYS: &str = "path, readonly, id, queues, direct, engine, poll, poll_us";

/// Errors in one `--disk` value.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DiskOptionError {
    /// A `key=value` pair without `=`, or an empty item.
    #[error("'{0}' is not key=value")]
    NotKeyValue(String),
    /// A key `--disk` does not know.
    #[error("unknown key '{0}' (known: {KEYS})")]
    UnknownKey(String),
    /// The same key twice.
    #[error("'{0}' given twice")]
    Duplicate(&'static str),
    /// No `path=`.
    #[error("path=FILE is missing")]
    MissingPath,
    /// `path=` with nothing after it.
    #[error("path is empty")]
    EmptyPath,
    /// An on/off switch with another value.
    #[error("{key}={value}: expected on or off")]
    BadSwitch {
        /// The key.
        key: &'static str,
        /// The value given.
        value: String,
    },
    /// `queues` is not a number between 1 and [`MAX_DISK_QUEUES`].
    #[error("queues={0}: expected a number from 1 to {MAX_DISK_QUEUES}")]
    BadQueues(String),
    /// `poll` is not off, adaptive or microseconds up to [`MAX_DISK_POLL_US`].
    #[error("poll={0}: expected off, adaptive or microseconds from 0 to {MAX_DISK_POLL_US}")]
    BadPoll(String),
    /// `engine` is not io_uring, sync or auto.
    #[error("engine={0}: expected io_uring, sync or auto")]
    BadEngine(String),
    /// `id` is empty or longer than [`MAX_DISK_ID_BYTES`].
    #[error("id '{0}' must be 1 to {MAX_DISK_ID_BYTES} bytes long")]
    BadId(String),
}

/// Why a disk's file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum DiskFileError {
    /// The file does not exist or cannot be examined.
    #[error("cannot use {path}: {source}")]
    Inaccessible {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The path names a directory or something else that holds no data.
    #[error("{0} is not a regular file or block device")]
    NotAFile(PathBuf),
}

/// Two errors are equal when they name the same file and, for an
/// inaccessible one, the same kind of I/O error (so configurations compare).
impl PartialEq for DiskFileError {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (
                DiskFileError::Inaccessible { path, source },
                DiskFileError::Inaccessible {
                    path: p2,
                    source: s2,
                },
            ) => path == p2 && source.kind() == s2.kind(),
            (DiskFileError::NotAFile(a), DiskFileError::NotAFile(b)) => a == b,
            _ => false,
        }
    }
}

impl Eq for DiskFileError {}

fn switch(key: &'static str, value: &str) -> Result<bool, DiskOptionError> {
    match value {
        "on" | "true" => Ok(true),
        "off" | "false" => Ok(false),
        _ => Err(DiskOptionError::BadSwitch {
            key,
            value: value.to_string(),
        }),
    }
}

/// A `queues=` value: 1 to [`MAX_DISK_QUEUES`].
pub(crate) fn parse_queue_count(value: &str) -> Option<u16> {
    value
        .parse::<u16>()
        .ok()
        .filter(|n| (1..=MAX_DISK_QUEUES).contains(n))
}

fn set_once<T>(slot: &mut Option<T>, key: &'static str, value: T) -> Result<(), DiskOptionError> {
    if slot.replace(value).is_some() {
        return Err(DiskOptionError::Duplicate(key));
    }
    Ok(())
}

/// Parses one `--disk` value. Defaults: writable, no id, one queue,
/// buffered I/O, adaptive polling, engine auto (io_uring where the host allows it,
/// else sync).
pub fn parse_disk(spec: &str) -> Result<BlockConfig, DiskOptionError> {
    let mut path = None;
    let mut readonly = None;
    let mut id = None;
    let mut queues = None;
    let mut direct = None;
    let mut poll = None;
    let mut engine = None;
    for item in spec.split(',') {
        let (key, value) = item
            .split_once('=')
            .ok_or_else(|| DiskOptionError::NotKeyValue(item.to_string()))?;
        match key {
            "path" => {
                if value.is_empty() {
                    return Err(DiskOptionError::EmptyPath);
                }
                set_once(&mut path, "path", PathBuf::from(value))?;
            }
            "readonly" => set_once(&mut readonly, "readonly", switch("readonly", value)?)?,
            "direct" => set_once(&mut direct, "direct", switch("direct", value)?)?,
            "id" => {
                if value.is_empty() || value.len() > MAX_DISK_ID_BYTES {
                    return Err(DiskOptionError::BadId(value.to_string()));
                }
                set_once(&mut id, "id", value.to_string())?;
            }
            "queues" => {
                let n = parse_queue_count(value)
                    .ok_or_else(|| DiskOptionError::BadQueues(value.to_string()))?;
                set_once(&mut queues, "queues", n)?;
            }
            "poll" | "poll_us" => {
                let mode = if key == "poll_us" {
                    value.parse::<u32>().ok().and_then(|us| {
                        (us <= MAX_DISK_POLL_US).then_some(if us == 0 {
                            PollMode::Off
                        } else {
                            PollMode::Fixed(us)
                        })
                    })
                } else {
                    value.parse::<PollMode>().ok()
                };
                let mode = mode.ok_or_else(|| DiskOptionError::BadPoll(value.to_string()))?;
                set_once(&mut poll, "poll", mode)?;
            }
            "engine" => {
                let e = value
                    .parse::<EngineChoice>()
                    .map_err(|_| DiskOptionError::BadEngine(value.to_string()))?;
                set_once(&mut engine, "engine", e)?;
            }
            _ => return Err(DiskOptionError::UnknownKey(key.to_string())),
        }
    }
    Ok(BlockConfig {
        path: path.ok_or(DiskOptionError::MissingPath)?,
        readonly: readonly.unwrap_or(false),
        id,
        queues: queues.unwrap_or(1),
        direct: direct.unwrap_or(false),
        poll: poll.unwrap_or_default(),
        engine: engine.unwrap_or_default(),
    })
}

/// Checks that `path` exists and holds data (a regular file or a block
/// device), without opening it.
pub fn check_disk_file(path: &Path) -> Result<(), DiskFileError> {
    use std::os::unix::fs::FileTypeExt;
    let meta = std::fs::metadata(path).map_err(|source| DiskFileError::Inaccessible {
        path: path.to_path_buf(),
        source,
    })?;
    let kind = meta.file_type();
    if kind.is_file() || kind.is_block_device() {
        Ok(())
    } else {
        Err(DiskFileError::NotAFile(path.to_path_buf()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_alone_gets_the_defaults() {
        assert_eq!(
            parse_disk("path=/tmp/a.img").unwrap(),
            BlockConfig {
                path: "/tmp/a.img".into(),
                readonly: false,
                id: None,
                queues: 1,
                direct: false,
                poll: PollMode::Adaptive,
                engine: EngineChoice::Auto,
            }
        );
    }

    #[test]
    fn every_key_in_any_order() {
        assert_eq!(
            parse_disk(
                "queues=4,id=serial-01,poll=30,engine=sync,direct=on,readonly=on,path=/d/b.raw"
            )
            .unwrap(),
            BlockConfig {
                path: "/d/b.raw".into(),
                readonly: true,
                id: Some("serial-01".into()),
                queues: 4,
                direct: true,
                poll: PollMode::Fixed(30),
                engine: EngineChoice::Only(evmm_virtio::blk::EngineKind::Sync),
            }
        );
        let c = parse_disk("path=x,readonly=off,direct=false,queues=16").unwrap();
        assert!(!c.readonly && !c.direct);
        assert_eq!(c.queues, 16);
        // A path may contain '='.
        assert_eq!(parse_disk("path=/a=b").unwrap().path, PathBuf::from("/a=b"));
    }

    #[test]
    fn rejects_bad_keys_and_values() {
        use DiskOptionError::*;
        let err = |s: &str| parse_disk(s).unwrap_err();
        assert_eq!(err("path=/a,size=1"), UnknownKey("size".into()));
        assert_eq!(err("readonly=on"), MissingPath);
        assert_eq!(err(""), NotKeyValue("".into()));
        assert_eq!(err("/tmp/a.img"), NotKeyValue("/tmp/a.img".into()));
        assert_eq!(err("path=/a,"), NotKeyValue("".into()));
        assert_eq!(err("path="), EmptyPath);
        assert_eq!(err("path=/a,path=/b"), Duplicate("path"));
        assert_eq!(
            err("path=/a,readonly=on,readonly=off"),
            Duplicate("readonly")
        );
        assert_eq!(
            err("path=/a,readonly=yes"),
            BadSwitch {
                key: "readonly",
                value: "yes".into()
            }
        );
        assert_eq!(
            err("path=/a,direct="),
            BadSwitch {
                key: "direct",
                value: "".into()
            }
        );
        for q in ["0", "17", "x", "-1", "", "65536"] {
            assert_eq!(err(&format!("path=/a,queues={q}")), BadQueues(q.into()));
        }
        for us in ["1001", "x", "-1", "", "adaptive"] {
            assert_eq!(err(&format!("path=/a,poll_us={us}")), BadPoll(us.into()));
        }
        for p in ["1001", "x", "-1", "", "fast"] {
            assert_eq!(err(&format!("path=/a,poll={p}")), BadPoll(p.into()));
        }
        assert_eq!(err("path=/a,poll_us=1,poll_us=2"), Duplicate("poll"));
        assert_eq!(err("path=/a,poll=1,poll_us=2"), Duplicate("poll"));
        assert_eq!(
            parse_disk("path=/a,poll=adaptive").unwrap().poll,
            PollMode::Adaptive
        );
        assert_eq!(parse_disk("path=/a,poll=off").unwrap().poll, PollMode::Off);
        assert_eq!(parse_disk("path=/a,poll_us=0").unwrap().poll, PollMode::Off);
        for e in ["aio", "", "IO_URING"] {
            assert_eq!(err(&format!("path=/a,engine={e}")), BadEngine(e.into()));
        }
        assert_eq!(err("path=/a,engine=sync,engine=sync"), Duplicate("engine"));
        assert_eq!(
            parse_disk("path=/a,engine=io_uring").unwrap().engine,
            EngineChoice::Only(evmm_virtio::blk::EngineKind::IoUring)
        );
        assert_eq!(
            parse_disk("path=/a,poll_us=1000").unwrap().poll,
            PollMode::Fixed(1000)
        );
        let long = "a".repeat(21);
        assert_eq!(err(&format!("path=/a,id={long}")), BadId(long));
        assert_eq!(err("path=/a,id="), BadId("".into()));
        // 20 bytes is the limit, counted in bytes not characters.
        assert!(parse_disk(&format!("path=/a,id={}", "b".repeat(20))).is_ok());
        assert!(parse_disk(&format!("path=/a,id={}", "é".repeat(11))).is_err());
    }

    #[test]
    fn messages_name_the_problem() {
        let msg = parse_disk("path=/a,bogus=1").unwrap_err().to_string();
        assert!(
            msg.contains("bogus") && msg.contains("path, readonly"),
            "{msg}"
        );
        let msg = parse_disk("path=/a,queues=0").unwrap_err().to_string();
        assert!(msg.contains("1 to 16"), "{msg}");
    }

    #[test]
    fn disk_file_must_exist_and_hold_data() {
        let file = tempfile::NamedTempFile::new().unwrap();
        check_disk_file(file.path()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            check_disk_file(dir.path()),
            Err(DiskFileError::NotAFile(_))
        ));
        let missing = dir.path().join("missing.img");
        let err = check_disk_file(&missing).unwrap_err();
        assert!(matches!(err, DiskFileError::Inaccessible { .. }));
        assert!(err.to_string().contains("missing.img"));
    }
}
