//! Running a guest's VMM with a time limit, so that a hung guest fails a benchmark
//! with a message instead of stalling it.

use std::io::{self, Read};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// What a command printed on stdout, and how it ended.
#[derive(Debug)]
pub struct LimitedOutput {
    /// Its exit status; `None` when it ran past the limit and was killed.
    pub status: Option<ExitStatus>,
    /// Everything it wrote to stdout.
    pub stdout: String,
}

/// Runs `argv` (stdin closed, stderr inherited), collecting stdout; kills it after
/// `limit`.
pub fn run_with_limit<S: AsRef<str>>(argv: &[S], limit: Duration) -> io::Result<LimitedOutput> {
    let (program, args) = argv
        .split_first()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "empty command line"))?;
    let mut child = Command::new(program.as_ref())
        .args(args.iter().map(AsRef::as_ref))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| io::Error::new(e.kind(), format!("cannot run {}: {e}", program.as_ref())))?;
    let mut pipe = child.stdout.take().expect("stdout is piped");
    let reader = std::thread::spawn(move || {
        let mut out = Vec::new();
        let _ = pipe.read_to_end(&mut out);
        out
    });
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break Some(status);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let stdout = reader.join().unwrap_or_default();
    Ok(LimitedOutput {
        status,
        stdout: String::from_utf8_lossy(&stdout).into_owned(),
    })
}

/// A row name as a file name: ASCII letters and digits, lower case, everything else
/// `-` (for a benchmark's per-row files).
pub fn slug(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_and_status_come_back() {
        let out =
            run_with_limit(&["sh", "-c", "echo hi; exit 3"], Duration::from_secs(10)).unwrap();
        assert_eq!(out.stdout, "hi\n");
        assert_eq!(out.status.and_then(|s| s.code()), Some(3));
    }

    #[test]
    fn a_command_past_its_limit_is_killed() {
        let start = Instant::now();
        let out = run_with_limit(
            &["sh", "-c", "echo started; exec sleep 30"],
            Duration::from_millis(300),
        )
        .unwrap();
        assert!(out.status.is_none());
        assert_eq!(out.stdout, "started\n");
        assert!(start.elapsed() < Duration::from_secs(10));
    }

    #[test]
    fn a_missing_program_is_an_error() {
        assert!(run_with_limit(&["/nonexistent/program"], Duration::from_secs(1)).is_err());
    }
}
