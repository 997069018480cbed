//! The value of `--net`: `tap=NAME` or `fd=N[:N...]`, and
//! `[,mac=52:54:00:xx:xx:xx][,queues=N][,mtu=N][,poll_us=N][,vhost=on|off]`.
//!
//! Parsing checks the syntax and the ranges only; the tap is opened (and found to be
//! missing, of the wrong kind, or not ours to use) when evmm builds the devices, before
//! anything touches KVM.

use std::os::fd::RawFd;

use evmm_virtio::net::config::{MAX_QUEUE_PAIRS, MTU_RANGE};
use evmm_virtio::net::parse_mac;

/// The keys `--net` knows, for error messages.
const KEYS: &str = "tap, fd, mac, queues, mtu, poll_us, vhost";
/// Longest polling window, in microseconds.
pub const MAX_POLL_US: u32 = 1000;

/// Where a network device's tap comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TapSource {
    /// Opened (or created) by name.
    Name(String),
    /// Descriptors the caller opened, one per queue pair.
    Fds(Vec<RawFd>),
}

impl std::fmt::Display for TapSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TapSource::Name(name) => write!(f, "tap={name}"),
            TapSource::Fds(fds) => {
                let list: Vec<String> = fds.iter().map(ToString::to_string).collect();
                write!(f, "fd={}", list.join(":"))
            }
        }
    }
}

/// One `--net` device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetSpec {
    /// The tap.
    pub tap: TapSource,
    /// The guest's MAC address; `None`: one evmm makes up (52:54:00:...).
    pub mac: Option<[u8; 6]>,
    /// Queue pairs.
    pub queue_pairs: u16,
    /// The MTU offered to the guest.
    pub mtu: Option<u16>,
    /// The workers' polling window in microseconds.
    pub poll_us: u32,
    /// The kernel's vhost-net moves the frames instead of evmm's workers.
    pub vhost: bool,
}

/// Errors in one `--net` value.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NetOptionError {
    /// A `key=value` pair without `=`.
    #[error("'{0}' is not key=value")]
    NotKeyValue(String),
    /// A key `--net` does not know.
    #[error("unknown key '{0}' (known: {KEYS})")]
    UnknownKey(String),
    /// The same key twice.
    #[error("'{0}' given twice")]
    Duplicate(&'static str),
    /// Neither or both of `tap=` and `fd=`.
    #[error("give the tap as tap=NAME or as fd=N (one of them)")]
    TapSource,
    /// A bad value.
    #[error("{key}={value}: {expected}")]
    BadValue {
        /// The key.
        key: &'static str,
        /// The value as given.
        value: String,
        /// What was expected.
        expected: String,
    },
    /// `fd=` with a number of descriptors other than `queues=`.
    #[error("fd= gives {fds} descriptor(s) but queues={queues}: one per queue pair")]
    FdCount {
        /// Descriptors given.
        fds: usize,
        /// Queue pairs asked for.
        queues: u16,
    },
}

fn set_once<T>(slot: &mut Option<T>, key: &'static str, value: T) -> Result<(), NetOptionError> {
    if slot.replace(value).is_some() {
        return Err(NetOptionError::Duplicate(key));
    }
    Ok(())
}

fn bad(key: &'static str, value: &str, expected: impl Into<String>) -> NetOptionError {
    NetOptionError::BadValue {
        key,
        value: value.to_string(),
        expected: expected.into(),
    }
}

/// Parses one `--net` value. Defaults: one queue pair, no MTU offered (Linux takes
/// 1500), no polling.
pub fn parse_net(spec: &str) -> Result<NetSpec, NetOptionError> {
    let (mut tap, mut fds, mut mac, mut queues, mut mtu, mut poll_us, mut vhost) =
        (None, None, None, None, None, None, None);
    for item in spec.split(',') {
        let (key, value) = item
            .split_once('=')
            .ok_or_else(|| NetOptionError::NotKeyValue(item.to_string()))?;
        match key {
            "tap" => {
                if value.is_empty() {
                    return Err(bad("tap", value, "a tap name"));
                }
                set_once(&mut tap, "tap", value.to_string())?
            }
            "fd" => {
                let list = value
                    .split(':')
                    .map(|n| n.parse::<RawFd>().ok().filter(|fd| *fd >= 0))
                    .collect::<Option<Vec<_>>>()
                    .ok_or_else(|| bad("fd", value, "open descriptor numbers, N or N:N:..."))?;
                set_once(&mut fds, "fd", list)?
            }
            "mac" => {
                let m = parse_mac(value)
                    .filter(|m| m[0] & 1 == 0)
                    .ok_or_else(|| bad("mac", value, "a unicast MAC such as 52:54:00:12:34:56"))?;
                set_once(&mut mac, "mac", m)?
            }
            "queues" => {
                let n = value
                    .parse::<u16>()
                    .ok()
                    .filter(|n| (1..=MAX_QUEUE_PAIRS).contains(n))
                    .ok_or_else(|| {
                        bad(
                            "queues",
                            value,
                            format!("queue pairs, 1 to {MAX_QUEUE_PAIRS}"),
                        )
                    })?;
                set_once(&mut queues, "queues", n)?
            }
            "mtu" => {
                let n = value
                    .parse::<u16>()
                    .ok()
                    .filter(|n| MTU_RANGE.contains(n))
                    .ok_or_else(|| {
                        bad(
                            "mtu",
                            value,
                            format!("{} to {}", MTU_RANGE.start(), MTU_RANGE.end()),
                        )
                    })?;
                set_once(&mut mtu, "mtu", n)?
            }
            "poll_us" => {
                let n = value
                    .parse::<u32>()
                    .ok()
                    .filter(|n| *n <= MAX_POLL_US)
                    .ok_or_else(|| bad("poll_us", value, format!("0 to {MAX_POLL_US}")))?;
                set_once(&mut poll_us, "poll_us", n)?
            }
            "vhost" => {
                let on = match value {
                    "on" | "true" => true,
                    "off" | "false" => false,
                    _ => return Err(bad("vhost", value, "on or off")),
                };
                set_once(&mut vhost, "vhost", on)?
            }
            _ => return Err(NetOptionError::UnknownKey(key.to_string())),
        }
    }
    let vhost = vhost.unwrap_or(false);
    if vhost && poll_us.is_some_and(|p| p > 0) {
        return Err(bad(
            "poll_us",
            &poll_us.unwrap_or(0).to_string(),
            "evmm runs no worker to poll with vhost=on",
        ));
    }
    let queue_pairs = queues.unwrap_or(1);
    let tap = match (tap, fds) {
        (Some(name), None) => TapSource::Name(name),
        (None, Some(fds)) => {
            if fds.len() != usize::from(queue_pairs) {
                return Err(NetOptionError::FdCount {
                    fds: fds.len(),
                    queues: queue_pairs,
                });
            }
            TapSource::Fds(fds)
        }
        _ => return Err(NetOptionError::TapSource),
    };
    Ok(NetSpec {
        tap,
        mac,
        queue_pairs,
        mtu,
        poll_us: poll_us.unwrap_or(0),
        vhost,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tap_name_alone_takes_the_defaults() {
        assert_eq!(
            parse_net("tap=tap0").unwrap(),
            NetSpec {
                tap: TapSource::Name("tap0".into()),
                mac: None,
                queue_pairs: 1,
                mtu: None,
                poll_us: 0,
                vhost: false,
            }
        );
    }

    #[test]
    fn every_key() {
        let n = parse_net("fd=3:4,mac=52:54:00:12:34:56,queues=2,mtu=9000,poll_us=30").unwrap();
        assert_eq!(n.tap, TapSource::Fds(vec![3, 4]));
        assert_eq!(n.mac, Some([0x52, 0x54, 0, 0x12, 0x34, 0x56]));
        assert_eq!((n.queue_pairs, n.mtu, n.poll_us), (2, Some(9000), 30));
        assert!(!n.vhost);
        assert!(parse_net("tap=t,vhost=on").unwrap().vhost);
    }

    #[test]
    fn bad_values_say_what_was_expected() {
        let err = |s: &str| parse_net(s).unwrap_err().to_string();
        assert_eq!(
            err("tap=t,mac=52:54:00:12:34"),
            "mac=52:54:00:12:34: a unicast MAC such as 52:54:00:12:34:56"
        );
        assert!(err("tap=t,mac=01:00:5e:00:00:01").contains("unicast"));
        assert_eq!(err("tap=t,queues=0"), "queues=0: queue pairs, 1 to 8");
        assert_eq!(err("tap=t,queues=9"), "queues=9: queue pairs, 1 to 8");
        assert_eq!(err("tap=t,mtu=67"), "mtu=67: 68 to 65521");
        assert_eq!(err("tap=t,poll_us=1001"), "poll_us=1001: 0 to 1000");
        assert_eq!(
            err("mac=52:54:00:12:34:56"),
            "give the tap as tap=NAME or as fd=N (one of them)"
        );
        assert_eq!(
            err("tap=t,fd=3"),
            "give the tap as tap=NAME or as fd=N (one of them)"
        );
        assert_eq!(
            err("fd=3,queues=2"),
            "fd= gives 1 descriptor(s) but queues=2: one per queue pair"
        );
        assert_eq!(err("fd=x"), "fd=x: open descriptor numbers, N or N:N:...");
        assert_eq!(err("tap=t,tap=u"), "'tap' given twice");
        assert_eq!(
            err("tap=t,speed=10"),
            "unknown key 'speed' (known: tap, fd, mac, queues, mtu, poll_us, vhost)"
        );
        assert_eq!(err("tap"), "'tap' is not key=value");
    }
}
