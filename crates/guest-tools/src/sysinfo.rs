//! What the guest was given: online CPUs and RAM, read from procfs.

use std::fs;
use std::io;

/// The machine as the guest kernel sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SysInfo {
    /// CPUs the kernel brought online.
    pub cpus: usize,
    /// Sum of the "System RAM" ranges of /proc/iomem (what the firmware map gave), in KiB.
    pub ram_kib: u64,
    /// MemTotal of /proc/meminfo (RAM less what the kernel keeps), in KiB.
    pub mem_total_kib: u64,
}

impl SysInfo {
    /// Reads the running system.
    pub fn read() -> io::Result<Self> {
        Ok(Self {
            cpus: parse_cpu_list(&fs::read_to_string("/sys/devices/system/cpu/online")?)
                .ok_or_else(|| invalid("/sys/devices/system/cpu/online"))?,
            ram_kib: parse_iomem_ram(&fs::read_to_string("/proc/iomem")?) / 1024,
            mem_total_kib: parse_meminfo_total(&fs::read_to_string("/proc/meminfo")?)
                .ok_or_else(|| invalid("/proc/meminfo"))?,
        })
    }

    /// The one-line form the host-side tests parse.
    pub fn line(&self) -> String {
        format!(
            "EVMM-SYSINFO cpus={} ram_kib={} mem_total_kib={}",
            self.cpus, self.ram_kib, self.mem_total_kib
        )
    }
}

fn invalid(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("cannot parse {what}"))
}

/// Counts the CPUs in a kernel CPU list such as `0-3,6,8-9`.
pub fn parse_cpu_list(list: &str) -> Option<usize> {
    let mut count = 0;
    for part in list.trim().split(',').filter(|p| !p.is_empty()) {
        count += match part.split_once('-') {
            Some((lo, hi)) => {
                let (lo, hi): (usize, usize) = (lo.parse().ok()?, hi.parse().ok()?);
                hi.checked_sub(lo)? + 1
            }
            None => {
                part.parse::<usize>().ok()?;
                1
            }
        };
    }
    Some(count)
}

/// Sums the top-level "System RAM" ranges of /proc/iomem, in bytes.
pub fn parse_iomem_ram(iomem: &str) -> u64 {
    iomem
        .lines()
        .filter(|l| !l.starts_with(' '))
        .filter_map(|l| l.split_once(" : "))
        .filter(|(_, name)| name.trim() == "System RAM")
        .filter_map(|(range, _)| range.split_once('-'))
        .filter_map(|(lo, hi)| {
            let lo = u64::from_str_radix(lo.trim(), 16).ok()?;
            let hi = u64::from_str_radix(hi.trim(), 16).ok()?;
            Some(hi - lo + 1)
        })
        .sum()
}

/// MemTotal of /proc/meminfo, in KiB.
pub fn parse_meminfo_total(meminfo: &str) -> Option<u64> {
    meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists() {
        assert_eq!(parse_cpu_list("0\n"), Some(1));
        assert_eq!(parse_cpu_list("0-1"), Some(2));
        assert_eq!(parse_cpu_list("0-3,6,8-9"), Some(7));
        assert_eq!(parse_cpu_list("3-1"), None);
        assert_eq!(parse_cpu_list("x"), None);
    }

    #[test]
    fn iomem_sums_top_level_ram_only() {
        let iomem = "00000000-00000fff : Reserved\n\
                     00001000-0009fbff : System RAM\n\
                     00100000-1fffffff : System RAM\n  \
                     01000000-01ffffff : Kernel code\n\
                     fee00000-fee00fff : Local APIC\n";
        assert_eq!(parse_iomem_ram(iomem), 0x9ec00 + 0x1ff00000);
    }

    #[test]
    fn meminfo_total() {
        let m = "MemTotal:         485632 kB\nMemFree:          400000 kB\n";
        assert_eq!(parse_meminfo_total(m), Some(485632));
        assert_eq!(parse_meminfo_total("MemFree: 1 kB\n"), None);
    }
}
