//! A tracefs instance of its own (`instances/evmm-<pid>` under the tracefs mount):
//! the host's tracepoints recorded on the host TSC (`trace_clock` `x86-tsc`) without
//! touching the global trace buffer, and the text of the trace parsed into events.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

/// Where tracefs is mounted, or mounted by [`TraceInstance::new`] when it is not.
pub const TRACEFS: &str = "/sys/kernel/tracing";

/// One recording: the instance folder, removed on drop.
pub struct TraceInstance {
    dir: PathBuf,
}

impl TraceInstance {
    /// Makes the instance (mounting tracefs at [`TRACEFS`] first if needed), with the
    /// host TSC as its clock, `buffer_kb` per CPU and `events` (`system/event`)
    /// enabled, not yet recording. Needs root; the error says so.
    pub fn new(events: &[&str], buffer_kb: u32) -> io::Result<Self> {
        let root = Path::new(TRACEFS);
        if !root.join("instances").is_dir() {
            mount_tracefs(root)?;
        }
        let dir = root.join(format!("instances/evmm-{}", std::process::id()));
        if !dir.is_dir() {
            fs::create_dir(&dir).map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!(
                        "cannot create the tracefs instance {} (root is needed): {e}",
                        dir.display()
                    ),
                )
            })?;
        }
        let t = Self { dir };
        t.write("tracing_on", "0")?;
        t.write("trace_clock", "x86-tsc")?;
        t.write("buffer_size_kb", &buffer_kb.to_string())?;
        t.write("trace", "")?;
        for e in events {
            t.write(&format!("events/{e}/enable"), "1").map_err(|err| {
                io::Error::new(
                    err.kind(),
                    format!("cannot enable the tracepoint {e}: {err}"),
                )
            })?;
        }
        Ok(t)
    }

    /// Keeps only the events of `event` (`system/event`, enabled) that match `expr`
    /// (tracefs filter syntax, e.g. `id == 232`).
    pub fn filter(&self, event: &str, expr: &str) -> io::Result<()> {
        self.write(&format!("events/{event}/filter"), expr)
    }

    /// Starts or stops recording.
    pub fn record(&self, on: bool) -> io::Result<()> {
        self.write("tracing_on", if on { "1" } else { "0" })
    }

    /// The recorded trace, as text.
    pub fn text(&self) -> io::Result<String> {
        fs::read_to_string(self.dir.join("trace"))
    }

    /// Events lost because the buffer was full (the `overrun` of every CPU's stats).
    pub fn overruns(&self) -> u64 {
        let Ok(cpus) = fs::read_dir(self.dir.join("per_cpu")) else {
            return 0;
        };
        cpus.flatten()
            .filter_map(|c| fs::read_to_string(c.path().join("stats")).ok())
            .flat_map(|s| {
                s.lines()
                    .filter_map(|l| l.strip_prefix("overrun: ")?.trim().parse::<u64>().ok())
                    .collect::<Vec<_>>()
            })
            .sum()
    }

    fn write(&self, file: &str, value: &str) -> io::Result<()> {
        fs::write(self.dir.join(file), value).map_err(|e| {
            io::Error::new(e.kind(), format!("{}: {e}", self.dir.join(file).display()))
        })
    }
}

impl Drop for TraceInstance {
    fn drop(&mut self) {
        let _ = self.record(false);
        if let Err(e) = fs::remove_dir(&self.dir) {
            log::warn!(
                "cannot remove the tracefs instance {}: {e}",
                self.dir.display()
            );
        }
    }
}

fn mount_tracefs(root: &Path) -> io::Result<()> {
    let status = std::process::Command::new("mount")
        .args(["-t", "tracefs", "nodev"])
        .arg(root)
        .status()?;
    if status.success() && root.join("instances").is_dir() {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "tracefs is not mounted at {} and mounting it failed (root is needed)",
            root.display()
        )))
    }
}

/// One line of the trace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// The task's name (`comm`).
    pub task: String,
    /// Its thread id.
    pub tid: u32,
    /// The CPU it ran on.
    pub cpu: u32,
    /// The host TSC (with `trace_clock` `x86-tsc`).
    pub tsc: u64,
    /// `system`-less event name (`kvm_mmio`, `sched_waking`, ...).
    pub name: String,
    /// The rest of the line.
    pub fields: String,
}

impl Event {
    /// The value of `key=value` in the fields (`sched_*` events), if any.
    pub fn field(&self, key: &str) -> Option<&str> {
        self.fields.split_whitespace().find_map(|w| {
            let (k, v) = w.split_once('=')?;
            (k == key).then_some(v)
        })
    }
}

/// Parses `  comm-tid   [cpu] flags tsc: name: fields`; `None` for comments and any
/// other line.
pub fn parse_line(line: &str) -> Option<Event> {
    if line.starts_with('#') {
        return None;
    }
    let open = line.find(" [")?;
    let close = open + line[open..].find(']')?;
    let who = line[..open].trim();
    let dash = who.rfind('-')?;
    let tid = who[dash + 1..].parse().ok()?;
    let task = who[..dash].to_string();
    let cpu = line[open + 2..close].parse().ok()?;
    let mut rest = line[close + 1..].split_whitespace();
    let _flags = rest.next()?;
    let tsc = rest.next()?.strip_suffix(':')?.parse().ok()?;
    let name = rest.next()?.strip_suffix(':')?.to_string();
    let fields = rest.collect::<Vec<_>>().join(" ");
    Some(Event {
        task,
        tid,
        cpu,
        tsc,
        name,
        fields,
    })
}

/// Every event of a trace, in time order.
pub fn parse(text: &str) -> Vec<Event> {
    let mut events: Vec<Event> = text.lines().filter_map(parse_line).collect();
    events.sort_by_key(|e| e.tsc);
    events
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trace_lines_are_parsed() {
        let e = parse_line(
            "           vcpu0-32239   [001] ..... 181608725640665: kvm_mmio: mmio write len 4 gpa 0xc0000050 val 0x0",
        )
        .unwrap();
        assert_eq!(
            (e.task.as_str(), e.tid, e.cpu, e.tsc, e.name.as_str()),
            ("vcpu0", 32239, 1, 181608725640665, "kvm_mmio")
        );
        assert_eq!(e.fields, "mmio write len 4 gpa 0xc0000050 val 0x0");
        let w = parse_line(
            "           vcpu0-32239   [001] d..5. 181608725647341: sched_waking: comm=evmm-blk pid=32241 prio=120 target_cpu=000",
        )
        .unwrap();
        assert_eq!(w.field("comm"), Some("evmm-blk"));
        assert_eq!(w.field("pid"), Some("32241"));
        // A task name with a dash and a space.
        let k = parse_line(
            "     kworker/0:0 x-10017   [000] ..... 181608766997344: kvm_set_irq: gsi 5 level 1 source 0",
        )
        .unwrap();
        assert_eq!((k.task.as_str(), k.tid), ("kworker/0:0 x", 10017));
        assert_eq!(parse_line("# tracer: nop"), None);
        assert_eq!(parse_line("garbage"), None);
    }

    #[test]
    fn events_come_out_in_time_order() {
        let text = "a-1 [000] ..... 30: x: \nb-2 [001] ..... 10: y: \n";
        let names: Vec<String> = parse(text).into_iter().map(|e| e.name).collect();
        assert_eq!(names, ["y", "x"]);
    }
}
