//! Which way a test boots Linux guests: directly on this host's /dev/kvm when it runs
//! ring-0 guest code natively, else inside the nested test host.

use crate::error::{Error, Result};
use crate::images::target_dir;
use crate::nested::{NestedHost, RunOutput};
use std::fmt;
use std::io::Read;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Where Linux guests run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// This host's /dev/kvm runs ring-0 guest code natively.
    Direct {
        /// The capability probe's verdict.
        probe: String,
    },
    /// Ring 0 is emulated here: guests run in the nested test host (L1).
    Nested {
        /// The capability probe's verdict.
        probe: String,
    },
}

impl Route {
    /// Runs the capability probe ([`evmm_kvm_probe::probe`]) and picks the route.
    pub fn detect() -> Result<Self> {
        let report = evmm_kvm_probe::probe(None).map_err(|e| Error::Probe(e.to_string()))?;
        Self::from_probe_line(&report.to_string())
    }

    /// The route for a line of `evmm-kvm-probe` output.
    pub fn from_probe_line(line: &str) -> Result<Self> {
        let probe = line.to_string();
        if line.starts_with("ring 0 native") {
            Ok(Route::Direct { probe })
        } else if line.starts_with("ring 0 emulated") {
            Ok(Route::Nested { probe })
        } else {
            Err(Error::Probe(format!("unexpected probe output: {line}")))
        }
    }

    /// Runs `argv` where guests boot: on this host (in the repository, release binaries on
    /// PATH) or in the nested host, stopping it after `limit`. A nested run that loses
    /// the nested host is made again, up to three attempts ([`NestedHost::attempts`]).
    pub fn run<S: AsRef<str>>(&self, argv: &[S], limit: Duration) -> Result<RunOutput> {
        self.run_attempts(argv, limit, 3)
    }

    /// As [`Route::run`] with at most `attempts` nested attempts (1 for a caller that
    /// makes attempts of its own).
    pub fn run_attempts<S: AsRef<str>>(
        &self,
        argv: &[S],
        limit: Duration,
        attempts: u32,
    ) -> Result<RunOutput> {
        match self {
            Route::Direct { .. } => run_here(argv, limit),
            Route::Nested { .. } => NestedHost::new()?
                .timeout(limit)
                .attempts(attempts)
                .run(argv),
        }
    }
}

/// For a program that boots Linux guests (a benchmark): where this host's /dev/kvm
/// cannot boot them, runs this very program with the same arguments in the nested
/// host, printing its output as it comes, and returns its exit status; where it can
/// (inside the nested host too), returns `None` and the caller goes on here. Prints
/// the route on stderr either way.
pub fn rerun_where_guests_boot(limit: Duration) -> Result<Option<i32>> {
    rerun_where_guests_boot_with(limit, &[])
}

/// Set in the environment of a program [`rerun_where_guests_boot`] runs in the nested
/// host: [`write_output`] then sends its files back.
const SEND_BACK_ENV: &str = "EVMM_SEND_BACK";
/// The line that carries a file back from the nested host.
const SEND_BACK_MARKER: &str = "EVMM-NESTED-FILE";

/// Whether this program was started by [`rerun_in_nested_host`] (or
/// [`rerun_where_guests_boot`]): it runs in the nested host and sends its files back.
pub fn running_in_nested_host() -> bool {
    std::env::var_os(SEND_BACK_ENV).is_some()
}

/// Writes a benchmark's output file `path`; in a program that
/// [`rerun_where_guests_boot`] runs in the nested host, also sends it back to the same
/// path on this host (as one line of its output), since L1's files end with L1.
pub fn write_output(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    std::fs::write(path, bytes)?;
    if running_in_nested_host() {
        let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        println!(
            "{SEND_BACK_MARKER} path={} hex={hex}",
            crate::nested::shell_quote(&path.display().to_string())
        );
    }
    Ok(())
}

/// Writes the file a [`SEND_BACK_MARKER`] line carries into `root`; `None` for any other
/// line. Only a relative path under `target/` without `..` is taken: the line comes
/// from another machine's output, which a guest's console may end up in.
fn received_file(root: &std::path::Path, line: &str) -> Option<std::io::Result<PathBuf>> {
    use std::path::Component;
    let rest = line.strip_prefix(SEND_BACK_MARKER)?.trim_start();
    let (path, hex) = rest.strip_prefix("path=")?.split_once(" hex=")?;
    let relative = PathBuf::from(path.trim_matches('\''));
    let plain = relative
        .components()
        .all(|c| matches!(c, Component::Normal(_)));
    if !plain || !relative.starts_with("target") {
        return Some(Err(std::io::Error::other(format!(
            "refused {}: not a relative path under target/",
            relative.display()
        ))));
    }
    let path = root.join(relative);
    let bytes: Option<Vec<u8>> = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
        .collect();
    Some(match bytes {
        Some(b) => path
            .parent()
            .map_or(Ok(()), std::fs::create_dir_all)
            .and_then(|()| std::fs::write(&path, b))
            .map(|()| path),
        None => Err(std::io::Error::other("bad hex")),
    })
}

/// As [`rerun_where_guests_boot`], with `files` of this host also in the nested host,
/// at the same paths (files the guest images folder does not carry).
pub fn rerun_where_guests_boot_with(limit: Duration, files: &[PathBuf]) -> Result<Option<i32>> {
    let route = Route::detect()?;
    eprintln!("{route}");
    if let Route::Direct { .. } = route {
        return Ok(None);
    }
    let argv: Vec<String> = std::env::args().collect();
    rerun_in_nested_host(&argv, limit, files).map(Some)
}

/// Runs this benchmark program in the nested host whatever the route, with `argv`
/// (`argv[0]` is taken by its file name: the release binaries are on PATH in L1),
/// printing its output as it comes and writing back the files it sends
/// ([`write_output`]); returns its exit status. For a benchmark whose table has rows
/// that only the nested host can run (kernel vhost, here).
pub fn rerun_in_nested_host(argv: &[String], limit: Duration, files: &[PathBuf]) -> Result<i32> {
    let mut argv = argv.to_vec();
    if let Some(name) = argv
        .first()
        .and_then(|a| std::path::Path::new(a).file_name())
        .map(|n| n.to_string_lossy().into_owned())
    {
        argv[0] = name;
    }
    // The program runs in the repository's folder in L1, as here: relative paths agree.
    argv.insert(0, format!("{SEND_BACK_ENV}=1"));
    argv.insert(0, "env".into());
    let mut host = NestedHost::new()?.timeout(limit).on_line(|line| {
        match received_file(&crate::images::repo_root(), line) {
            Some(Ok(path)) => eprintln!("received {} from the nested host", path.display()),
            Some(Err(e)) => eprintln!("a file from the nested host could not be written: {e}"),
            None => println!("{line}"),
        }
    });
    for f in files {
        host = host.file(f, f.display().to_string());
    }
    let out = host.run(&argv)?;
    eprintln!(
        "nested host: {} exited {} ({})",
        argv[2],
        out.status,
        out.timing()
    );
    Ok(out.status)
}

/// The `main` of a benchmark program: with `nested_limit`, first
/// [`rerun_where_guests_boot`] (and exit with the nested run's status if it went
/// there); then `run` here. A failure is one `error:` line and exit status 1.
pub fn bench_main(
    nested_limit: Option<Duration>,
    run: impl FnOnce() -> std::result::Result<(), Box<dyn std::error::Error>>,
) -> std::process::ExitCode {
    bench_main_with(nested_limit, &[], run)
}

/// As [`bench_main`], with `files` also in the nested host
/// ([`rerun_where_guests_boot_with`]).
pub fn bench_main_with(
    nested_limit: Option<Duration>,
    files: &[PathBuf],
    run: impl FnOnce() -> std::result::Result<(), Box<dyn std::error::Error>>,
) -> std::process::ExitCode {
    use std::process::ExitCode;
    let result = match nested_limit
        .map(|limit| rerun_where_guests_boot_with(limit, files))
        .transpose()
    {
        Ok(Some(Some(status))) => return ExitCode::from(u8::try_from(status).unwrap_or(1)),
        Ok(_) => run(),
        Err(e) => Err(e.into()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

impl fmt::Display for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Route::Direct { probe } => write!(f, "route: direct on this host's /dev/kvm ({probe})"),
            Route::Nested { probe } => write!(
                f,
                "route: nested KVM inside QEMU's emulator, because this host's /dev/kvm cannot boot Linux ({probe})"
            ),
        }
    }
}

fn run_here<S: AsRef<str>>(argv: &[S], limit: Duration) -> Result<RunOutput> {
    let (program, args) = argv.split_first().ok_or_else(|| {
        Error::Spawn(
            "an empty command".into(),
            std::io::ErrorKind::InvalidInput.into(),
        )
    })?;
    let path = std::env::join_paths(
        std::iter::once(target_dir().join("release")).chain(
            std::env::var_os("PATH")
                .iter()
                .flat_map(std::env::split_paths),
        ),
    )
    .map_err(|e| Error::Spawn("PATH".into(), std::io::Error::other(e)))?;
    let started = Instant::now();
    let mut child = Command::new("sh")
        .arg("-c")
        .arg("exec \"$@\" 2>&1")
        .arg("sh")
        .arg(program.as_ref())
        .args(args.iter().map(AsRef::as_ref))
        .current_dir(crate::images::repo_root())
        .env("PATH", path)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| Error::Spawn(program.as_ref().to_string(), e))?;
    let mut stdout = child.stdout.take().expect("stdout is piped");
    let reader = std::thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = stdout.read_to_end(&mut bytes);
        String::from_utf8_lossy(&bytes).into_owned()
    });
    let status = loop {
        if let Some(status) = child
            .try_wait()
            .map_err(|e| Error::Io("waiting for the command", e))?
        {
            break status;
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            return Err(Error::TimedOut {
                limit,
                output: reader.join().unwrap_or_default(),
                console: String::new(),
            });
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Ok(RunOutput {
        status: status.code().unwrap_or(-1),
        output: reader.join().unwrap_or_default().trim_end().to_string(),
        l1_boot: Duration::ZERO,
        command_time: started.elapsed(),
        lost_attempts: Vec::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_lines_pick_the_route() {
        let r = Route::from_probe_line("ring 0 emulated: 450 ns/iteration at CPL0").unwrap();
        assert!(matches!(r, Route::Nested { .. }));
        assert!(r.to_string().contains("nested"));
        let r = Route::from_probe_line("ring 0 native: 0.3 ns/iteration at CPL0").unwrap();
        assert!(matches!(r, Route::Direct { .. }));
        assert!(Route::from_probe_line("error: no /dev/kvm").is_err());
    }

    #[test]
    fn files_come_back_only_under_target() {
        let root = tempfile::tempdir().unwrap();
        let line = format!("{SEND_BACK_MARKER} path=target/x/out.json hex=7b7d0a");
        let path = received_file(root.path(), &line).unwrap().unwrap();
        assert_eq!(std::fs::read(path).unwrap(), b"{}\n");
        for bad in ["/etc/passwd", "target/../../x", "src/lib.rs", "../target/y"] {
            let line = format!("{SEND_BACK_MARKER} path={bad} hex=00");
            assert!(received_file(root.path(), &line).unwrap().is_err(), "{bad}");
        }
        assert!(received_file(root.path(), "an ordinary line").is_none());
        let bad_hex = format!("{SEND_BACK_MARKER} path=target/z hex=0g");
        assert!(received_file(root.path(), &bad_hex).unwrap().is_err());
    }

    #[test]
    fn direct_runs_report_status_and_output() {
        let out = run_here(
            &["sh", "-c", "echo out; echo err >&2; exit 3"],
            Duration::from_secs(10),
        )
        .unwrap();
        assert_eq!(out.status, 3);
        assert_eq!(out.output, "out\nerr");
        let err = run_here(&["sleep", "5"], Duration::from_millis(200)).unwrap_err();
        assert!(matches!(err, Error::TimedOut { .. }), "{err}");
    }
}
