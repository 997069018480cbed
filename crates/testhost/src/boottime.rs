//! Timing a guest boot: from starting a VMM to the guest init's start marker, and to
//! the VMM's exit.

use crate::error::{Error, Result};
use crate::guest::START_MARKER;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// One boot of a guest.
#[derive(Debug, Clone)]
pub struct BootTiming {
    /// VMM start → the guest init's start marker on the console.
    pub to_init: Duration,
    /// VMM start → VMM exit (after the guest rebooted).
    pub to_exit: Duration,
    /// The VMM's exit code.
    pub status: i32,
    /// The console transcript.
    pub console: String,
}

/// Runs `argv` (a VMM booting a guest of `guest-images/build` with its console on
/// stdout), timing the start marker and the exit. Fails when the marker never comes.
pub fn time_boot<S: AsRef<str>>(argv: &[S]) -> Result<BootTiming> {
    let (program, args) = argv.split_first().ok_or_else(|| {
        Error::Spawn(
            "an empty command".into(),
            std::io::ErrorKind::InvalidInput.into(),
        )
    })?;
    let started = Instant::now();
    let mut child = Command::new(program.as_ref())
        .args(args.iter().map(AsRef::as_ref))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| Error::Spawn(program.as_ref().to_string(), e))?;
    let stdout = child.stdout.take().expect("stdout is piped");
    let mut to_init = None;
    let mut console = String::new();
    let mut reader = BufReader::new(stdout);
    let mut line = Vec::new();
    while reader
        .read_until(b'\n', &mut line)
        .map_err(|e| Error::Io("reading the console", e))?
        > 0
    {
        let text = String::from_utf8_lossy(&line);
        if to_init.is_none() && text.contains(START_MARKER) {
            to_init = Some(started.elapsed());
        }
        console.push_str(&text);
        line.clear();
    }
    let status = child
        .wait()
        .map_err(|e| Error::Io("waiting for the VMM", e))?;
    let to_exit = started.elapsed();
    let to_init = to_init.ok_or_else(|| Error::NoStartMarker {
        command: program.as_ref().to_string(),
        console: console
            .lines()
            .rev()
            .take(20)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect::<Vec<_>>()
            .join("\n"),
    })?;
    Ok(BootTiming {
        to_init,
        to_exit,
        status: status.code().unwrap_or(-1),
        console,
    })
}

/// The median, minimum and maximum of some durations, in seconds.
pub fn summary(samples: &[Duration]) -> (f64, f64, f64) {
    let mut s: Vec<f64> = samples.iter().map(Duration::as_secs_f64).collect();
    s.sort_by(f64::total_cmp);
    if s.is_empty() {
        return (f64::NAN, f64::NAN, f64::NAN);
    }
    let median = if s.len() % 2 == 1 {
        s[s.len() / 2]
    } else {
        (s[s.len() / 2 - 1] + s[s.len() / 2]) / 2.0
    };
    (median, s[0], s[s.len() - 1])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_a_fake_vmm() {
        let t = time_boot(&[
            "sh",
            "-c",
            "echo booting; sleep 0.1; echo EVMM-GUEST-START kernel=x; exit 0",
        ])
        .unwrap();
        assert!(t.to_init >= Duration::from_millis(100));
        assert!(t.to_exit >= t.to_init);
        assert_eq!(t.status, 0);
        let e = time_boot(&["sh", "-c", "echo no marker"]).unwrap_err();
        assert!(e.to_string().contains("no marker"), "{e}");
    }

    #[test]
    fn summaries() {
        let d = |s| Duration::from_secs(s);
        assert_eq!(summary(&[d(3), d(1), d(2)]), (2.0, 1.0, 3.0));
        assert_eq!(summary(&[d(4), d(1), d(2), d(3)]), (2.5, 1.0, 4.0));
    }
}
