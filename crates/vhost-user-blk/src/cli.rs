//! The command line.

use crate::gate::{Admitted, FrontendUid};
use crate::{Config, GateConfig};
use clap::Parser;
use evmm_virtio::blk::config::MAX_QUEUES;
use evmm_virtio::blk::{BlockConfig, EngineChoice};
use evmm_virtio::poll::PollMode;
use std::path::PathBuf;
use std::time::Duration;

/// evmm-vhost-user-blk: serves a raw disk file to a vhost-user frontend (QEMU's
/// vhost-user-blk-pci, evmm) over a UNIX socket, with the same virtio-blk request code
/// as evmm's in-VMM device.
#[derive(Debug, Clone, Parser)]
#[command(name = "evmm-vhost-user-blk", version)]
pub struct Args {
    /// The UNIX socket to listen on (created; a stale one nobody listens on is replaced).
    #[arg(long, value_name = "PATH")]
    pub socket: PathBuf,
    /// The raw disk image.
    #[arg(long, value_name = "FILE")]
    pub disk: PathBuf,
    /// Offer VIRTIO_BLK_F_RO and refuse writes (the file is opened read-only).
    #[arg(long)]
    pub readonly: bool,
    /// Number of request queues, each served by a thread of its own.
    #[arg(long, value_name = "N", default_value_t = 1,
          value_parser = clap::value_parser!(u16).range(1..=i64::from(MAX_QUEUES)))]
    pub queues: u16,
    /// What GET_ID returns (at most 20 bytes).
    #[arg(long, value_name = "ID")]
    pub id: Option<String>,
    /// Open the disk with O_DIRECT (not on tmpfs).
    #[arg(long)]
    pub direct: bool,
    /// What executes the requests: io_uring (a ring per queue, many requests in
    /// flight), sync (one at a time per queue), or auto (io_uring where the host allows
    /// it, else sync with a warning).
    #[arg(long, value_name = "ENGINE", default_value = "auto", value_parser = parse_engine)]
    pub engine: EngineChoice,
    /// How each queue's thread waits for requests: off (on the kicks), a fixed window
    /// of 1 to 1000 µs, or adaptive (up to 64 µs), polling the ring with the driver's
    /// kicks turned off.
    #[arg(long, value_name = "MODE", default_value = "adaptive", value_parser = parse_poll)]
    pub poll: PollMode,
    /// The socket file's permissions, in octal (default 600: only the daemon's user can
    /// connect).
    #[arg(long, value_name = "OCTAL", default_value = "600", value_parser = parse_mode)]
    pub socket_mode: u32,
    /// A user whose frontends are served (repeatable; a numeric uid, or `any`); checked
    /// with the connecting process's credentials. Default: the daemon's own user.
    #[arg(long = "frontend-uid", value_name = "UID")]
    pub frontend_uids: Vec<FrontendUid>,
    /// Seconds a frontend may take, from connecting, to send SET_OWNER before it is
    /// disconnected.
    #[arg(long, value_name = "SECONDS", default_value_t = 10,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub handshake_timeout: u64,
    /// Seccomp filters on the daemon's threads (main, signal, relay, vhost-user
    /// protocol, queues): kill ends the daemon when a thread makes a syscall its filter
    /// does not allow, naming the thread and the syscall; log lets the syscall run and
    /// has the kernel log it; off installs none.
    #[arg(long, value_name = "MODE", default_value = "kill")]
    pub seccomp: evmm_seccomp::Mode,
    /// Diagnostics on stderr: off, error, warn, info, debug, trace (default: RUST_LOG,
    /// else warn).
    #[arg(long, value_name = "LEVEL")]
    pub log_level: Option<log::LevelFilter>,
}

impl Args {
    /// The daemon settings.
    pub fn config(&self) -> Config {
        Config {
            socket: self.socket.clone(),
            seccomp: self.seccomp,
            gate: GateConfig {
                socket_mode: self.socket_mode,
                admitted: Admitted::from_options(&self.frontend_uids),
                handshake: Duration::from_secs(self.handshake_timeout),
            },
            disk: BlockConfig {
                path: self.disk.clone(),
                readonly: self.readonly,
                id: self.id.clone(),
                queues: self.queues,
                direct: self.direct,
                poll: self.poll,
                engine: self.engine,
            },
        }
    }
}

fn parse_mode(s: &str) -> Result<u32, String> {
    u32::from_str_radix(s, 8)
        .ok()
        .filter(|m| *m <= 0o777)
        .ok_or_else(|| format!("{s:?} is not a permission mode in octal (e.g. 600, 660)"))
}

fn parse_engine(s: &str) -> Result<EngineChoice, String> {
    s.parse()
}

fn parse_poll(s: &str) -> Result<PollMode, String> {
    s.parse()
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::error::ErrorKind;

    fn parse(args: &[&str]) -> Result<Args, clap::Error> {
        Args::try_parse_from(std::iter::once("evmm-vhost-user-blk").chain(args.iter().copied()))
    }

    #[test]
    fn minimal_command_line_has_the_defaults() {
        let a = parse(&["--socket", "/run/vu.sock", "--disk", "a.img"]).unwrap();
        let c = a.config();
        assert_eq!(c.socket, PathBuf::from("/run/vu.sock"));
        assert_eq!(
            c.disk,
            BlockConfig {
                path: "a.img".into(),
                readonly: false,
                id: None,
                queues: 1,
                direct: false,
                poll: PollMode::Adaptive,
                engine: EngineChoice::Auto,
            }
        );
        assert_eq!(a.log_level, None);
        assert_eq!(
            c.gate,
            GateConfig {
                socket_mode: 0o600,
                admitted: Admitted::own_user(),
                handshake: Duration::from_secs(10),
            }
        );
    }

    #[test]
    fn every_option_is_parsed() {
        let a = parse(&[
            "--socket",
            "s",
            "--disk",
            "d",
            "--readonly",
            "--queues",
            "4",
            "--id",
            "serial-1",
            "--direct",
            "--engine",
            "sync",
            "--poll",
            "adaptive",
            "--log-level",
            "debug",
            "--socket-mode",
            "660",
            "--frontend-uid",
            "1000",
            "--frontend-uid",
            "1001",
            "--handshake-timeout",
            "3",
        ])
        .unwrap();
        let c = a.config();
        assert!(c.disk.readonly && c.disk.direct);
        assert_eq!(c.disk.queues, 4);
        assert_eq!(c.disk.poll, PollMode::Adaptive);
        assert_eq!(
            c.disk.engine,
            EngineChoice::Only(evmm_virtio::blk::EngineKind::Sync)
        );
        assert_eq!(c.disk.id.as_deref(), Some("serial-1"));
        assert_eq!(a.log_level, Some(log::LevelFilter::Debug));
        assert_eq!(c.gate.socket_mode, 0o660);
        assert_eq!(c.gate.admitted, Admitted::Uids(vec![1000, 1001]));
        assert_eq!(c.gate.handshake, Duration::from_secs(3));
    }

    #[test]
    fn bad_input_is_refused() {
        for bad in [
            &["--disk", "d"][..],
            &["--socket", "s"],
            &["--socket", "s", "--disk", "d", "--queues", "0"],
            &["--socket", "s", "--disk", "d", "--queues", "65"],
            &["--socket", "s", "--disk", "d", "--queues", "two"],
            &["--socket", "s", "--disk", "d", "--log-level", "loud"],
            &["--socket", "s", "--disk", "d", "--bogus"],
            &["--socket", "s", "--disk", "d", "--engine", "aio"],
            &["--socket", "s", "--disk", "d", "--poll", "2000"],
            &["--socket", "s", "--disk", "d", "--socket-mode", "800"],
            &["--socket", "s", "--disk", "d", "--socket-mode", "rw"],
            &["--socket", "s", "--disk", "d", "--frontend-uid", "root"],
            &["--socket", "s", "--disk", "d", "--handshake-timeout", "0"],
        ] {
            let e = parse(bad).expect_err(&format!("{bad:?} was accepted"));
            assert_ne!(e.kind(), ErrorKind::DisplayHelp, "{bad:?}");
        }
    }

    #[test]
    fn the_largest_queue_count_is_accepted() {
        let max = MAX_QUEUES.to_string();
        let a = parse(&["--socket", "s", "--disk", "d", "--queues", &max]).unwrap();
        assert_eq!(a.queues, MAX_QUEUES);
    }
}
