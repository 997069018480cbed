//! Errors of the test host.

use std::path::PathBuf;
use std::process::ExitStatus;
use std::time::Duration;

/// What went wrong while preparing or running a guest or the nested host.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A guest image is not there.
    #[error("guest image {0} is missing: run guest-images/build")]
    ImagesMissing(PathBuf),
    /// `guest-images/build` failed.
    #[error("guest-images/build failed ({0}); its messages are above")]
    ImageBuild(ExitStatus),
    /// `crates/notify-guest/build.sh` failed.
    #[error("building the notify guest failed ({0}); its messages are above")]
    GuestBuild(ExitStatus),
    /// A program could not be started.
    #[error("cannot start {0}: {1}")]
    Spawn(String, #[source] std::io::Error),
    /// QEMU, needed for the nested host, is not installed.
    #[error("qemu-system-x86_64 not found on PATH: the nested test host needs it (apt-get install qemu-system-x86)")]
    QemuMissing,
    /// No release binary of the repository was found for the payload.
    #[error("no release binaries in {0}: run cargo build --release first")]
    NoBinaries(PathBuf),
    /// Preparing the run's files failed.
    #[error("preparing the nested host's payload failed: {0}")]
    Payload(#[source] std::io::Error),
    /// L1 did not print its ready marker in time or ended before it.
    #[error("the nested host (L1) did not come up within {limit:?}{}", console_tail(.console))]
    L1NotUp {
        /// The boot time limit.
        limit: Duration,
        /// The end of L1's console log.
        console: String,
    },
    /// QEMU ended before the command reported its status.
    #[error("the nested host ended without reporting the command's status ({status}){}", console_tail(.console))]
    L1Died {
        /// QEMU's exit status.
        status: String,
        /// The end of L1's console log and QEMU's stderr.
        console: String,
    },
    /// The command ran longer than its limit and was stopped.
    #[error("the command exceeded its time limit of {limit:?} and was stopped{}", console_tail(.console))]
    TimedOut {
        /// The limit.
        limit: Duration,
        /// What the command printed before it was stopped.
        output: String,
        /// The end of the nested host's console (empty for a run on this host).
        console: String,
    },
    /// A guest never printed the start marker of its init.
    #[error("{command} never showed the guest's start marker; the end of its console:\n{console}")]
    NoStartMarker {
        /// The VMM.
        command: String,
        /// The end of the console.
        console: String,
    },
    /// The capability probe failed or said something unexpected.
    #[error("the KVM capability probe failed: {0}")]
    Probe(String),
    /// A vhost-user backend did not come up.
    #[error("vhost-user backend: {0}")]
    Backend(String),
    /// No QEMU CPU model starts on this host's KVM.
    #[error("choosing QEMU's CPU model: {0}")]
    CpuModel(String),
    /// Another I/O failure.
    #[error("{0}: {1}")]
    Io(&'static str, #[source] std::io::Error),
}

impl Error {
    /// Whether a run failed because the nested host was lost rather than because of what
    /// it was asked to do: L1 did not come up, L1 ended (a panic of its kernel), or the
    /// command stalled (an L2 stall of the emulated SVM). A fresh L1 may well succeed.
    pub fn lost_the_nested_host(&self) -> bool {
        matches!(
            self,
            Error::L1NotUp { .. } | Error::L1Died { .. } | Error::TimedOut { .. }
        )
    }
}

fn console_tail(console: &str) -> String {
    if console.trim().is_empty() {
        String::new()
    } else {
        format!("; the end of its console:\n{console}")
    }
}

/// Result of this crate.
pub type Result<T> = std::result::Result<T, Error>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_lost_nested_host_is_worth_another_attempt() {
        let lost = [
            Error::L1NotUp {
                limit: Duration::from_secs(1),
                console: String::new(),
            },
            Error::L1Died {
                status: "exit status: 0".into(),
                console: "BUG: stack guard page was hit".into(),
            },
            Error::TimedOut {
                limit: Duration::from_secs(1),
                output: String::new(),
                console: String::new(),
            },
        ];
        assert!(lost.iter().all(Error::lost_the_nested_host));
        let not_lost = [
            Error::QemuMissing,
            Error::ImagesMissing("x".into()),
            Error::Probe("no /dev/kvm".into()),
            Error::Payload(std::io::ErrorKind::NotFound.into()),
        ];
        assert!(!not_lost.iter().any(Error::lost_the_nested_host));
    }
}
