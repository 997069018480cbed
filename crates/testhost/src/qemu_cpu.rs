//! The CPU model QEMU guests on KVM run with, chosen by trying it on this host.
//!
//! `-cpu host` passes the host's CPU through, but whether KVM accepts every MSR value
//! QEMU then sets differs from host to host: on some, QEMU aborts at start-up with
//! `failed to set MSR 0x10a` (IA32_ARCH_CAPABILITIES). So the model is probed: QEMU is
//! started stopped (`-S`) with each candidate in turn and told to quit over QMP; the
//! first that gets that far (QEMU sets the vCPUs' MSRs while it creates them, before
//! its monitor answers) is used. `$EVMM_QEMU_CPU` forces a model without probing, so
//! the fallback can be tested on hosts that would never need it.

use crate::error::{Error, Result};
use std::fmt;
use std::io::Write;
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The model tried first: the host's CPU as it is.
pub const PREFERRED: &str = "host";
/// The model used where the host's KVM refuses QEMU's IA32_ARCH_CAPABILITIES value.
pub const FALLBACK: &str = "host,-arch-capabilities";
/// The environment variable that forces a model.
pub const ENV: &str = "EVMM_QEMU_CPU";
/// The QEMU binary.
pub const QEMU: &str = "qemu-system-x86_64";

/// How long one trial start may take (QEMU in the nested host is slow).
const TRIAL_LIMIT: Duration = Duration::from_secs(60);

/// The chosen model and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CpuModel {
    /// The `-cpu` argument.
    pub model: String,
    /// How it was chosen, for the log and the benchmark tables.
    pub reason: String,
}

impl fmt::Display for CpuModel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "-cpu {} ({})", self.model, self.reason)
    }
}

/// The model for QEMU guests on this host's KVM: `$EVMM_QEMU_CPU` when set, else the
/// first of [`PREFERRED`] and [`FALLBACK`] that QEMU starts with. Probed once per
/// process.
pub fn kvm_cpu_model() -> Result<CpuModel> {
    static CHOICE: OnceLock<std::result::Result<CpuModel, String>> = OnceLock::new();
    CHOICE
        .get_or_init(|| {
            match std::env::var(ENV) {
                Ok(forced) if !forced.trim().is_empty() => Ok(CpuModel {
                    model: forced.trim().to_string(),
                    reason: format!("forced by ${ENV}"),
                }),
                _ => choose(QEMU, &[PREFERRED, FALLBACK]),
            }
            .map_err(|e| match e {
                Error::CpuModel(why) => why,
                other => other.to_string(),
            })
        })
        .clone()
        .map_err(Error::CpuModel)
}

/// The first of `candidates` that `qemu` starts a KVM microvm with.
pub fn choose(qemu: &str, candidates: &[&str]) -> Result<CpuModel> {
    let mut refusals = Vec::new();
    for (i, model) in candidates.iter().enumerate() {
        match trial_start(qemu, model) {
            Ok(()) => {
                let reason = if i == 0 {
                    "accepted by this host's KVM".to_string()
                } else {
                    format!("this host's KVM refused {}", refusals.join("; "))
                };
                return Ok(CpuModel {
                    model: model.to_string(),
                    reason,
                });
            }
            Err(why) => refusals.push(format!("-cpu {model}: {why}")),
        }
    }
    Err(Error::CpuModel(format!(
        "QEMU starts with none of the CPU models tried: {}",
        refusals.join("; ")
    )))
}

/// Starts `qemu` stopped with CPU `model` on KVM and quits it over QMP; the error is
/// the last line QEMU printed.
fn trial_start(qemu: &str, model: &str) -> std::result::Result<(), String> {
    let mut child = Command::new(qemu)
        .args(["-M", "microvm,accel=kvm", "-cpu", model, "-m", "64"])
        .args(["-nodefaults", "-no-user-config", "-display", "none"])
        .args(["-S", "-qmp", "stdio"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run {qemu}: {e}"))?;
    // QEMU reads the commands once its monitor is up; if it died before, the write
    // fails and the exit status tells.
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(b"{\"execute\":\"qmp_capabilities\"}\n{\"execute\":\"quit\"}\n");
    }
    let started = Instant::now();
    while child.try_wait().map_err(|e| e.to_string())?.is_none() {
        if started.elapsed() > TRIAL_LIMIT {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("did not quit within {TRIAL_LIMIT:?}"));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    if out.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    let first_error = stderr
        .lines()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("no message")
        .trim();
    Err(format!("{} ({})", first_error, out.status))
}

/// The model an `evmm-qemu` run reported in `output` (its `evmm-qemu: -cpu ...` line).
pub fn reported_model(output: &str) -> Option<&str> {
    output.lines().find_map(|l| {
        l.trim()
            .strip_prefix("evmm-qemu: -cpu ")
            .and_then(|rest| rest.split_whitespace().next())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// A stand-in for QEMU that, like the hosts that refuse MSR 0x10a, aborts for
    /// `-cpu host` and quits cleanly for anything else.
    fn fake_qemu(dir: &tempfile::TempDir, refuses: &str) -> String {
        let path = dir.path().join("qemu");
        std::fs::write(
            &path,
            format!(
                "#!/bin/sh\n\
                 while [ $# -gt 0 ]; do [ \"$1\" = -cpu ] && cpu=$2; shift; done\n\
                 case \"$cpu\" in {refuses})\n\
                 echo 'qemu-system-x86_64: error: failed to set MSR 0x10a to 0x69' >&2\n\
                 kill -ABRT $$;;\n\
                 esac\n\
                 cat >/dev/null\n"
            ),
        )
        .unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path.display().to_string()
    }

    #[test]
    fn host_is_taken_where_it_starts() {
        let dir = tempfile::tempdir().unwrap();
        let qemu = fake_qemu(&dir, "nothing");
        let m = choose(&qemu, &[PREFERRED, FALLBACK]).unwrap();
        assert_eq!(m.model, "host");
        assert!(m.reason.contains("accepted"), "{m}");
    }

    #[test]
    fn the_fallback_is_taken_where_host_aborts() {
        let dir = tempfile::tempdir().unwrap();
        let qemu = fake_qemu(&dir, "host");
        let m = choose(&qemu, &[PREFERRED, FALLBACK]).unwrap();
        assert_eq!(m.model, FALLBACK);
        assert!(m.reason.contains("failed to set MSR 0x10a"), "{m}");
    }

    #[test]
    fn no_model_that_starts_is_an_error_naming_each() {
        let dir = tempfile::tempdir().unwrap();
        let qemu = fake_qemu(&dir, "*");
        let e = choose(&qemu, &[PREFERRED, FALLBACK])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("-cpu host:") && e.contains(&format!("-cpu {FALLBACK}:")),
            "{e}"
        );
        let e = choose("/nonexistent/qemu", &[PREFERRED])
            .unwrap_err()
            .to_string();
        assert!(e.contains("cannot run /nonexistent/qemu"), "{e}");
    }

    #[test]
    fn the_reported_model_is_found_in_output() {
        let out = "boot\nevmm-qemu: -cpu host,-arch-capabilities (forced)\nmore";
        assert_eq!(reported_model(out), Some("host,-arch-capabilities"));
        assert_eq!(reported_model("nothing"), None);
    }

    /// The real QEMU on this host's KVM starts with the model the probe picks (and the
    /// fallback model starts too, so a host that needs it is covered on every host).
    #[test]
    fn the_real_qemu_starts_with_the_chosen_model_and_with_the_fallback() {
        let m = choose(QEMU, &[PREFERRED, FALLBACK])
            .expect("qemu-system-x86_64 with KVM is needed (scripts/setup installs it)");
        eprintln!("QEMU CPU model on this host: {m}");
        trial_start(QEMU, FALLBACK).expect("the fallback model starts");
    }
}
