//! CPU time of a process and everything it started, from /proc: what a VMM (and a
//! vhost-user backend) spent while a guest ran a job.

use std::collections::HashMap;
use std::time::Duration;

/// User plus system CPU time of `pid` and of every live descendant, now. Processes
/// that already ended are not counted (their time went to their parent's `cutime`
/// only when reaped).
pub fn tree_cpu(pid: u32) -> Duration {
    let mut parent_of = HashMap::new();
    let mut ticks = HashMap::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(p) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        if let Some((ppid, t)) = parse_stat(&stat) {
            parent_of.insert(p, ppid);
            ticks.insert(p, t);
        }
    }
    let in_tree = |mut p: u32| loop {
        if p == pid {
            return true;
        }
        match parent_of.get(&p) {
            Some(&pp) if pp != p && pp != 0 => p = pp,
            _ => return false,
        }
    };
    let total: u64 = ticks
        .iter()
        .filter(|(p, _)| in_tree(**p))
        .map(|(_, t)| *t)
        .sum();
    ticks_to_duration(total)
}

/// (ppid, utime + stime) from a `/proc/PID/stat` line. The command name may hold
/// spaces and parentheses: the fields start after its last ')'.
fn parse_stat(stat: &str) -> Option<(u32, u64)> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the name: state(3) ppid(4) ... utime(14) stime(15), 1-based in proc(5).
    let ppid = fields.get(1)?.parse().ok()?;
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((ppid, utime + stime))
}

fn ticks_to_duration(ticks: u64) -> Duration {
    // SAFETY: sysconf only reads a configuration value.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let hz = u64::try_from(hz).ok().filter(|&h| h > 0).unwrap_or(100);
    Duration::from_micros(ticks * 1_000_000 / hz)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_lines_with_odd_names_parse() {
        let line = "1234 (qemu (x) y) S 77 1234 1234 0 -1 4194560 100 0 0 0 250 30 0 0 20 0 3 0 99 1000 10";
        assert_eq!(parse_stat(line), Some((77, 280)));
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn this_process_has_spent_some_cpu() {
        let start = std::time::Instant::now();
        let mut x = 0u64;
        while start.elapsed() < Duration::from_millis(50) {
            x = x.wrapping_add(std::hint::black_box(1));
        }
        assert!(x > 0);
        assert!(tree_cpu(std::process::id()) > Duration::ZERO);
    }
}
