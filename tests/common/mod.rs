//! Helpers shared by the tests that boot the stock guest where Linux guests boot (the
//! route the capability probe picks): shell scripts with a scratch folder `$D`, evmm
//! command lines that print their metrics, and the guest's markers.
// Each test crate uses its own subset.
#![allow(dead_code)]

pub mod net;

use evmm_testhost::guest::marker_fields;
use evmm_testhost::nested::shell_quote;
use evmm_testhost::{EvmmGuest, GuestConsole, GuestImages, Route, RunOutput};
use std::collections::BTreeMap;
use std::time::Duration;

pub const MIB: u64 = 1024 * 1024;

/// Runs a shell script where guests boot; `$D` is a fresh folder for disk files.
pub fn run_script(body: &str) -> RunOutput {
    try_run_script(body, Duration::from_secs(600), 3).unwrap_or_else(|e| panic!("{e}"))
}

/// As [`run_script`], with a time limit and at most `attempts` nested attempts (1 for
/// a caller that retries itself), returning what went wrong instead of panicking.
pub fn try_run_script(body: &str, limit: Duration, attempts: u32) -> Result<RunOutput, String> {
    let route = Route::detect().map_err(|e| e.to_string())?;
    eprintln!("{route}");
    let script = format!("set -e\nD=$(mktemp -d)\n{body}\nrm -rf \"$D\"\n");
    let out = route
        .run_attempts(&["sh", "-c", &script], limit, attempts)
        .map_err(|e| format!("run failed: {e}"))?;
    eprintln!("ran: {}", out.timing());
    if out.status != 0 {
        return Err(format!(
            "script failed ({}); output:\n{}",
            out.status, out.output
        ));
    }
    Ok(out)
}

/// The shell command that boots the guest test `test` with `args` under evmm with
/// the given evmm options, printing its metrics JSON after the console.
pub fn evmm_cmd(test: &str, args: &[&str], options: &[&str]) -> String {
    let mut options = options.to_vec();
    options.extend(["--metrics", "$D/metrics.json"]);
    format!(
        "{}\nprintf 'EVMM-METRICS-JSON '; tr -d '\\n' < \"$D/metrics.json\"; echo",
        evmm_line(test, args, &options)
    )
}

/// The shell-quoted evmm command line that boots the guest test `test` with `args`
/// (joined into `evmm.args=`) and the given evmm options; `$D` in them is expanded.
pub fn evmm_line(test: &str, args: &[&str], options: &[&str]) -> String {
    let images = GuestImages::build().unwrap_or_else(|e| panic!("{e}"));
    let mut guest = EvmmGuest::new(test);
    if !args.is_empty() {
        guest
            .cmdline
            .push_str(&format!(" evmm.args={}", args.join(",")));
    }
    guest.extra = options.iter().map(|s| s.to_string()).collect();
    guest
        .argv(&images)
        .iter()
        .map(|a| dollar_d(&shell_quote(a)))
        .collect::<Vec<_>>()
        .join(" ")
}

/// A single-quoted shell word with `$D` in it: reopens the quotes around `$D` so the
/// shell expands it.
pub fn dollar_d(quoted: &str) -> String {
    quoted.replace("$D", "'\"$D\"'")
}

pub fn dd_zero(name: &str, mib: u64) -> String {
    format!("dd if=/dev/zero of=\"$D/{name}\" bs=1M count={mib} 2>/dev/null")
}

pub fn marker(out: &RunOutput, name: &str) -> BTreeMap<String, String> {
    out.output
        .lines()
        .find_map(|l| marker_fields(l, name))
        .unwrap_or_else(|| panic!("no {name} line; output:\n{}", out.output))
}

pub fn metrics(out: &RunOutput) -> serde_json::Value {
    metrics_in(&out.output)
}

/// The metrics evmm printed (`EVMM-METRICS-JSON`) in `text`.
pub fn metrics_in(text: &str) -> serde_json::Value {
    let line = text
        .lines()
        .find_map(|l| l.split_once("EVMM-METRICS-JSON ").map(|(_, j)| j))
        .unwrap_or_else(|| panic!("no metrics; output:\n{text}"));
    serde_json::from_str(line).unwrap_or_else(|e| panic!("bad metrics JSON ({e}): {line}"))
}

/// Runs `attempt` up to three times, printing each failure, and returns the first
/// success: in the nested host guests sometimes stall or reset, and evmm +
/// qemu-storage-daemon sometimes takes L1 down (README, "Known problems"). What an
/// attempt returns is then checked in full by the caller.
pub fn up_to_three_attempts<T>(what: &str, attempt: impl FnMut() -> Result<T, String>) -> T {
    up_to_attempts(what, 3, attempt)
}

/// As [`up_to_three_attempts`], with `n` attempts.
pub fn up_to_attempts<T>(what: &str, n: u32, mut attempt: impl FnMut() -> Result<T, String>) -> T {
    let mut failures = Vec::new();
    for i in 1..=n {
        match attempt() {
            Ok(v) => return v,
            Err(e) => {
                eprintln!("{what}: attempt {i} of {n} FAILED (retried): {e}");
                failures.push(e);
            }
        }
    }
    panic!(
        "{what}: all {n} attempts failed:\n{}",
        failures.join("\n---\n")
    );
}

/// Sum of a per-queue counter over every queue of device `dev`.
pub fn queue_sum(m: &serde_json::Value, dev: usize, counter: &str) -> u64 {
    let queues = m["devices"][dev]["transport"]["device"]["queues"]
        .as_array()
        .unwrap_or_else(|| panic!("no queues in metrics: {m}"));
    queues
        .iter()
        .map(|q| {
            q.pointer(counter)
                .and_then(|v| v.as_u64())
                .unwrap_or_else(|| panic!("no counter {counter} in {q}"))
        })
        .sum()
}

pub fn guest_passed(out: &RunOutput, test: &str) {
    let console = GuestConsole::parse(&out.output);
    assert!(
        console.started,
        "guest did not start; output:\n{}",
        out.output
    );
    assert!(
        console.passed(test),
        "guest test {test} failed; output:\n{}",
        out.output
    );
}
