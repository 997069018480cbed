//! CPU time of a process and everything it started, from /proc: what a VMM (and a
//! vhost-user backend) spent while a guest ran a job.

use std::collections::HashMap;
use std::time::Duration;

/// CPU time of a process tree, and the part of it its vCPU threads spent (which
/// includes the guest's own running time: KVM accounts it to the thread in KVM_RUN).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CpuSplit {
    /// Every thread.
    pub total: Duration,
    /// Threads named like a vCPU: evmm's `vcpuN`, QEMU's `CPU N/KVM`.
    pub vcpu: Duration,
}

impl CpuSplit {
    /// What the threads other than the vCPUs spent (device workers, event loops).
    pub fn devices(&self) -> Duration {
        self.total.saturating_sub(self.vcpu)
    }
}

impl std::ops::Add for CpuSplit {
    type Output = CpuSplit;

    fn add(self, o: CpuSplit) -> CpuSplit {
        CpuSplit {
            total: self.total + o.total,
            vcpu: self.vcpu + o.vcpu,
        }
    }
}

/// [`tree_cpu`], split between vCPU threads and the others, per thread from
/// `/proc/PID/task`.
pub fn tree_cpu_split(pid: u32) -> CpuSplit {
    let mut split = CpuSplit::default();
    for p in tree_pids(pid) {
        let tasks = std::fs::read_dir(format!("/proc/{p}/task"));
        for task in tasks.into_iter().flatten().flatten() {
            let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else {
                continue;
            };
            let Some((_, ticks)) = parse_stat(&stat) else {
                continue;
            };
            let t = ticks_to_duration(ticks);
            split.total += t;
            if is_vcpu_thread(&stat) {
                split.vcpu += t;
            }
        }
    }
    split
}

fn is_vcpu_thread(stat: &str) -> bool {
    let name = stat
        .find('(')
        .zip(stat.rfind(')'))
        .and_then(|(a, b)| stat.get(a + 1..b))
        .unwrap_or_default();
    name.strip_prefix("vcpu")
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        || (name.starts_with("CPU ") && name.ends_with("/KVM"))
}

/// `pid` and every live descendant.
fn tree_pids(pid: u32) -> Vec<u32> {
    let mut parent_of = HashMap::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(p) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        if let Some((ppid, _)) = std::fs::read_to_string(entry.path().join("stat"))
            .ok()
            .and_then(|s| parse_stat(&s))
        {
            parent_of.insert(p, ppid);
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
    parent_of.keys().copied().filter(|p| in_tree(*p)).collect()
}

/// User plus system CPU time of `pid` and of every live descendant, now. Processes
/// that already ended are not counted (their time went to their parent's `cutime`
/// only when reaped).
pub fn tree_cpu(pid: u32) -> Duration {
    tree_cpu_split(pid).total
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
    fn vcpu_threads_are_told_apart() {
        let stat = |name: &str| format!("1 ({name}) S 1 1 1 0 -1 0 0 0 0 0 5 5 0 0");
        assert!(is_vcpu_thread(&stat("vcpu0")));
        assert!(is_vcpu_thread(&stat("vcpu12")));
        assert!(is_vcpu_thread(&stat("CPU 0/KVM")));
        assert!(!is_vcpu_thread(&stat("evmm-blk")));
        assert!(!is_vcpu_thread(&stat("vcpu")));
        assert!(!is_vcpu_thread(&stat("IO iothread0")));
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
        let split = tree_cpu_split(std::process::id());
        assert!(split.total > Duration::ZERO && split.vcpu == Duration::ZERO);
    }
}
