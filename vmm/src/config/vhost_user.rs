//! The value of `--vhost-user-blk`: `socket=PATH[,queues=N]`.
//!
//! Parsing checks the syntax and the ranges only: whether the socket is there and a
//! backend answers on it is found out when evmm connects, before the guest runs.

use std::path::PathBuf;

pub use evmm_virtio::vhost::VhostUserBlkConfig;

use super::disk::{parse_queue_count, MAX_DISK_QUEUES};

/// The keys `--vhost-user-blk` knows, for error messages.
const KEYS: &str = "socket, queues";

/// Errors in one `--vhost-user-blk` value.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum VhostUserOptionError {
    /// A `key=value` pair without `=`, or an empty item.
    #[error("'{0}' is not key=value")]
    NotKeyValue(String),
    /// A key `--vhost-user-blk` does not know.
    #[error("unknown key '{0}' (known: {KEYS})")]
    UnknownKey(String),
    /// The same key twice.
    #[error("'{0}' given twice")]
    Duplicate(&'static str),
    /// No `socket=`.
    #[error("socket=PATH is missing")]
    MissingSocket,
    /// `socket=` with nothing after it.
    #[error("socket is empty")]
    EmptySocket,
    /// `queues` is not a number between 1 and [`MAX_DISK_QUEUES`].
    #[error("queues={0}: expected a number from 1 to {MAX_DISK_QUEUES}")]
    BadQueues(String),
}

/// Parses one `--vhost-user-blk` value.
pub fn parse_vhost_user_blk(spec: &str) -> Result<VhostUserBlkConfig, VhostUserOptionError> {
    let mut socket = None;
    let mut queues = None;
    for item in spec.split(',') {
        let (key, value) = item
            .split_once('=')
            .ok_or_else(|| VhostUserOptionError::NotKeyValue(item.to_string()))?;
        match key {
            "socket" => {
                if value.is_empty() {
                    return Err(VhostUserOptionError::EmptySocket);
                }
                if socket.replace(PathBuf::from(value)).is_some() {
                    return Err(VhostUserOptionError::Duplicate("socket"));
                }
            }
            "queues" => {
                let n = parse_queue_count(value)
                    .ok_or_else(|| VhostUserOptionError::BadQueues(value.to_string()))?;
                if queues.replace(n).is_some() {
                    return Err(VhostUserOptionError::Duplicate("queues"));
                }
            }
            _ => return Err(VhostUserOptionError::UnknownKey(key.to_string())),
        }
    }
    Ok(VhostUserBlkConfig {
        socket: socket.ok_or(VhostUserOptionError::MissingSocket)?,
        queues,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_alone_leaves_queues_to_the_backend() {
        assert_eq!(
            parse_vhost_user_blk("socket=/run/vu.sock").unwrap(),
            VhostUserBlkConfig {
                socket: "/run/vu.sock".into(),
                queues: None
            }
        );
    }

    #[test]
    fn both_keys_in_any_order() {
        assert_eq!(
            parse_vhost_user_blk("queues=4,socket=/tmp/a=b.sock").unwrap(),
            VhostUserBlkConfig {
                socket: "/tmp/a=b.sock".into(),
                queues: Some(4)
            }
        );
        assert_eq!(
            parse_vhost_user_blk("socket=s,queues=16").unwrap().queues,
            Some(16)
        );
    }

    #[test]
    fn rejects_bad_keys_and_values() {
        use VhostUserOptionError::*;
        let err = |s: &str| parse_vhost_user_blk(s).unwrap_err();
        assert_eq!(err(""), NotKeyValue("".into()));
        assert_eq!(err("/tmp/vu.sock"), NotKeyValue("/tmp/vu.sock".into()));
        assert_eq!(err("socket=/s,"), NotKeyValue("".into()));
        assert_eq!(err("socket="), EmptySocket);
        assert_eq!(err("queues=2"), MissingSocket);
        assert_eq!(err("socket=/a,socket=/b"), Duplicate("socket"));
        assert_eq!(err("socket=/a,queues=1,queues=2"), Duplicate("queues"));
        assert_eq!(err("socket=/a,path=/b"), UnknownKey("path".into()));
        assert_eq!(err("path=/a.img"), UnknownKey("path".into()));
        for q in ["0", "17", "x", "-1", "", "65536"] {
            assert_eq!(err(&format!("socket=/a,queues={q}")), BadQueues(q.into()));
        }
    }

    #[test]
    fn messages_name_the_problem() {
        let msg = parse_vhost_user_blk("socket=/a,readonly=on")
            .unwrap_err()
            .to_string();
        assert_eq!(msg, "unknown key 'readonly' (known: socket, queues)");
        let msg = parse_vhost_user_blk("socket=/a,queues=99")
            .unwrap_err()
            .to_string();
        assert_eq!(msg, "queues=99: expected a number from 1 to 16");
        assert_eq!(
            parse_vhost_user_blk("queues=1").unwrap_err().to_string(),
            "socket=PATH is missing"
        );
    }
}
