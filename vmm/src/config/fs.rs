//! The value of `--fs`: `tag=TAG,socket=PATH[,queues=N]`.
//!
//! Parsing checks the syntax and the ranges only: whether a backend answers on the
//! socket is found out when evmm connects, before the guest runs.

use std::path::PathBuf;

pub use evmm_virtio::vhost::fs::{MAX_REQUEST_QUEUES, TAG_LEN};
pub use evmm_virtio::vhost::VhostUserFsConfig;

/// The keys `--fs` knows, for error messages.
const KEYS: &str = "tag, socket, queues";

/// Errors in one `--fs` value.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FsOptionError {
    /// A `key=value` pair without `=`, or an empty item.
    #[error("'{0}' is not key=value")]
    NotKeyValue(String),
    /// A key `--fs` does not know.
    #[error("unknown key '{0}' (known: {KEYS})")]
    UnknownKey(String),
    /// The same key twice.
    #[error("'{0}' given twice")]
    Duplicate(&'static str),
    /// No `tag=`.
    #[error("tag=TAG is missing")]
    MissingTag,
    /// A tag that is empty, too long or has a NUL byte.
    #[error("tag '{0}': expected 1 to {TAG_LEN} bytes without NUL")]
    BadTag(String),
    /// No `socket=`.
    #[error("socket=PATH is missing")]
    MissingSocket,
    /// `socket=` with nothing after it.
    #[error("socket is empty")]
    EmptySocket,
    /// `queues` is not a number between 1 and [`MAX_REQUEST_QUEUES`].
    #[error("queues={0}: expected a number of request queues from 1 to {MAX_REQUEST_QUEUES}")]
    BadQueues(String),
}

/// Parses one `--fs` value.
pub fn parse_fs(spec: &str) -> Result<VhostUserFsConfig, FsOptionError> {
    let mut tag = None;
    let mut socket = None;
    let mut queues = None;
    for item in spec.split(',') {
        let (key, value) = item
            .split_once('=')
            .ok_or_else(|| FsOptionError::NotKeyValue(item.to_string()))?;
        match key {
            "tag" => {
                if value.is_empty() || value.len() > TAG_LEN || value.contains('\0') {
                    return Err(FsOptionError::BadTag(value.to_string()));
                }
                if tag.replace(value.to_string()).is_some() {
                    return Err(FsOptionError::Duplicate("tag"));
                }
            }
            "socket" => {
                if value.is_empty() {
                    return Err(FsOptionError::EmptySocket);
                }
                if socket.replace(PathBuf::from(value)).is_some() {
                    return Err(FsOptionError::Duplicate("socket"));
                }
            }
            "queues" => {
                let n = value
                    .parse::<u16>()
                    .ok()
                    .filter(|n| (1..=MAX_REQUEST_QUEUES).contains(n))
                    .ok_or_else(|| FsOptionError::BadQueues(value.to_string()))?;
                if queues.replace(n).is_some() {
                    return Err(FsOptionError::Duplicate("queues"));
                }
            }
            _ => return Err(FsOptionError::UnknownKey(key.to_string())),
        }
    }
    Ok(VhostUserFsConfig {
        tag: tag.ok_or(FsOptionError::MissingTag)?,
        socket: socket.ok_or(FsOptionError::MissingSocket)?,
        queues: queues.unwrap_or(1),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tag_and_socket_with_one_request_queue_by_default() {
        assert_eq!(
            parse_fs("tag=root,socket=/run/fs.sock").unwrap(),
            VhostUserFsConfig {
                tag: "root".into(),
                socket: "/run/fs.sock".into(),
                queues: 1
            }
        );
        let c = parse_fs("queues=2,socket=/a=b,tag=x").unwrap();
        assert_eq!((c.tag.as_str(), c.queues), ("x", 2));
        assert_eq!(c.socket, PathBuf::from("/a=b"));
    }

    #[test]
    fn rejects_bad_keys_and_values() {
        use FsOptionError::*;
        let err = |s: &str| parse_fs(s).unwrap_err();
        assert_eq!(err(""), NotKeyValue("".into()));
        assert_eq!(err("socket=/s"), MissingTag);
        assert_eq!(err("tag=a"), MissingSocket);
        assert_eq!(err("tag=,socket=/s"), BadTag("".into()));
        let long = "t".repeat(37);
        assert_eq!(err(&format!("tag={long},socket=/s")), BadTag(long));
        assert_eq!(err("tag=a,socket="), EmptySocket);
        assert_eq!(err("tag=a,tag=b,socket=/s"), Duplicate("tag"));
        assert_eq!(err("tag=a,socket=/s,socket=/t"), Duplicate("socket"));
        assert_eq!(
            err("tag=a,socket=/s,cache=auto"),
            UnknownKey("cache".into())
        );
        for q in ["0", "9", "x", ""] {
            assert_eq!(
                err(&format!("tag=a,socket=/s,queues={q}")),
                BadQueues(q.into())
            );
        }
        assert_eq!(
            err("tag=a,socket=/s,queues=9").to_string(),
            "queues=9: expected a number of request queues from 1 to 8"
        );
    }
}
