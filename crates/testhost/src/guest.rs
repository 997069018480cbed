//! Reading what a guest of `guest-images/build` printed on its console.
//!
//! The guest init prints `EVMM-GUEST-START kernel=RELEASE`, then whatever the guest test
//! prints (tests report findings as `EVMM-NAME key=value ...` lines), then
//! `EVMM-TEST-RESULT name=TEST status=N`.

use std::collections::BTreeMap;

/// The start marker of the guest init.
pub const START_MARKER: &str = "EVMM-GUEST-START";
/// The prefix of the guest test's result line.
pub const RESULT_MARKER: &str = "EVMM-TEST-RESULT";

/// The kernel command line argument that names the guest test to run.
pub fn test_arg(name: &str) -> String {
    format!("evmm.test={name}")
}

/// What a guest console says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestConsole {
    /// The guest init started.
    pub started: bool,
    /// The guest test's name and exit status, when it finished.
    pub result: Option<(String, i32)>,
}

impl GuestConsole {
    /// Parses a console transcript.
    pub fn parse(console: &str) -> Self {
        let started = console
            .lines()
            .any(|l| marker_fields(l, START_MARKER).is_some());
        let result = console
            .lines()
            .rev()
            .find_map(|l| marker_fields(l, RESULT_MARKER))
            .and_then(|f| Some((f.get("name")?.clone(), f.get("status")?.parse().ok()?)));
        Self { started, result }
    }

    /// True when the test `name` ran and exited 0.
    pub fn passed(&self, name: &str) -> bool {
        matches!(&self.result, Some((n, 0)) if n == name)
    }
}

/// The `key=value` fields of a console line that starts with `marker` (after any
/// console noise before it), or None when the line has no such marker.
pub fn marker_fields(line: &str, marker: &str) -> Option<BTreeMap<String, String>> {
    let at = line.find(marker)?;
    let rest = &line[at + marker.len()..];
    if !(rest.is_empty() || rest.starts_with(' ')) {
        return None;
    }
    // The VMM's stderr shares the console's pipe: a log line it writes while the guest
    // is in the middle of a line lands after the marker's fields. It starts with a
    // colour escape or env_logger's `[`, which no marker field holds.
    let rest = rest.find(['\x1b', '[']).map_or(rest, |end| &rest[..end]);
    Some(
        rest.split_whitespace()
            .filter_map(|w| w.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    )
}

/// The fields of every line of `console` with `marker`.
pub fn all_marker_fields(console: &str, marker: &str) -> Vec<BTreeMap<String, String>> {
    console
        .lines()
        .filter_map(|l| marker_fields(l, marker))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_log_line_glued_to_a_marker_is_not_part_of_it() {
        let line = "EVMM-NET-CHECK side=guest check=barrier status=0\x1b[90m[\x1b[0m2026-11-30T17:54:16Z \x1b[1m\x1b[31mERROR\x1b[0m evmm_virtio::net::worker a=b";
        let f = marker_fields(line, "EVMM-NET-CHECK").unwrap();
        assert_eq!(f["status"], "0");
        assert_eq!(f.len(), 3, "{f:?}");
        let plain = "EVMM-NET-CHECK side=guest status=1[2026-11-30T17:54:16Z ERROR x] k=v";
        let f = marker_fields(plain, "EVMM-NET-CHECK").unwrap();
        assert_eq!(f["status"], "1");
        assert!(!f.contains_key("k"));
    }

    const CONSOLE: &str = "[    1.0] Linux version 6.1\r\n\
        EVMM-GUEST-START kernel=6.1.0-50-amd64\n\
        EVMM-SYSINFO cpus=2 ram_kib=523899 mem_total_kib=468560\n\
        EVMM-TEST-RESULT name=sysinfo status=0\n\
        [    6.6] reboot: Restarting system\n";

    #[test]
    fn parses_a_passing_test() {
        let c = GuestConsole::parse(CONSOLE);
        assert!(c.started);
        assert_eq!(c.result, Some(("sysinfo".into(), 0)));
        assert!(c.passed("sysinfo"));
        assert!(!c.passed("hello"));
        let info = &all_marker_fields(CONSOLE, "EVMM-SYSINFO")[0];
        assert_eq!(info["cpus"], "2");
        assert_eq!(info["ram_kib"], "523899");
    }

    #[test]
    fn a_failing_or_missing_result_is_not_a_pass() {
        let c = GuestConsole::parse("EVMM-GUEST-START\nEVMM-TEST-RESULT name=fail status=3\n");
        assert_eq!(c.result, Some(("fail".into(), 3)));
        assert!(!c.passed("fail"));
        let c = GuestConsole::parse("Kernel panic - not syncing\n");
        assert!(!c.started);
        assert_eq!(c.result, None);
    }

    #[test]
    fn markers_need_a_word_boundary() {
        assert!(marker_fields("EVMM-GUEST-STARTED", START_MARKER).is_none());
        assert!(marker_fields("noise EVMM-GUEST-START", START_MARKER).is_some());
    }
}
