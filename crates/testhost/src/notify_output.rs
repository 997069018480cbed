//! Reading the result lines of the notify guest and the raw KVM floor
//! program (`NOTIFY-INFO`, `NOTIFY-ID`, `NOTIFY-RESULT`, `NOTIFY-DONE`; see
//! crates/notify-guest/README.md), and their statistics.

use crate::guest::marker_fields;
use serde::Serialize;

/// One measured series: a request kind and a wait mode.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Series {
    /// `get_id`, `read` or `floor`.
    pub kind: String,
    /// `poll`, `irq` or `irq_wake`.
    pub mode: String,
    /// Requests that completed with an error (0 when the line has no such field).
    pub errors: u64,
    /// Interrupts the guest counted during the series.
    pub irqs: u64,
    /// QueueNotify writes the guest made (it skips the kick while the device has
    /// turned kicks off); `None` for lines without the field (the raw floor).
    pub kicks: Option<u64>,
    /// Per-request latency in TSC cycles.
    pub cycles: Vec<u64>,
}

/// Everything a notify-guest (or floor) run printed.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct NotifyRun {
    /// The id GET_ID returned (guest runs only).
    pub id: Option<String>,
    /// Requests per series, from `NOTIFY-DONE` (None when the run did not finish).
    pub done: Option<u64>,
    /// TSC frequency in kHz when the run printed it (the floor program does).
    pub tsc_khz: Option<u64>,
    /// The series, in the order printed.
    pub series: Vec<Series>,
    /// `NOTIFY-ERROR` lines.
    pub errors: Vec<String>,
}

impl NotifyRun {
    /// Parses a console transcript.
    pub fn parse(console: &str) -> Self {
        let mut run = NotifyRun::default();
        for line in console.lines() {
            if let Some(f) = marker_fields(line, "NOTIFY-RESULT") {
                let num = |k: &str| f.get(k).and_then(|v| v.parse().ok()).unwrap_or(0);
                let cycles = f
                    .get("cycles")
                    .map(|c| c.split(',').filter_map(|v| v.parse().ok()).collect())
                    .unwrap_or_default();
                run.series.push(Series {
                    kind: f.get("kind").cloned().unwrap_or_default(),
                    mode: f.get("mode").cloned().unwrap_or_default(),
                    errors: num("errors"),
                    irqs: num("irqs"),
                    kicks: f.get("kicks").and_then(|v| v.parse().ok()),
                    cycles,
                });
            } else if let Some(f) = marker_fields(line, "NOTIFY-ID") {
                run.id = f.get("id").cloned();
            } else if let Some(f) = marker_fields(line, "NOTIFY-DONE") {
                run.done = f.get("requests").and_then(|v| v.parse().ok());
            } else if let Some(f) = marker_fields(line, "NOTIFY-INFO") {
                if let Some(khz) = f.get("tsc_khz").and_then(|v| v.parse().ok()) {
                    run.tsc_khz = Some(khz);
                }
            } else if let Some(at) = line.find("NOTIFY-ERROR") {
                run.errors.push(line[at..].to_string());
            }
        }
        run
    }

    /// The series of `kind` and `mode`.
    pub fn series(&self, kind: &str, mode: &str) -> Option<&Series> {
        self.series
            .iter()
            .find(|s| s.kind == kind && s.mode == mode)
    }
}

/// Percentiles and mean of a series.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Stats {
    /// Samples.
    pub n: usize,
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// 99.9th percentile.
    pub p999: f64,
    /// Mean.
    pub mean: f64,
}

impl Stats {
    /// Nearest-rank percentiles of `samples` (any unit).
    pub fn of(samples: &[u64]) -> Option<Self> {
        if samples.is_empty() {
            return None;
        }
        let mut s = samples.to_vec();
        s.sort_unstable();
        // Nearest rank, in integers: the smallest sample with at least p‰ of them at or below.
        let rank = |permille: usize| {
            let i = (permille * s.len()).div_ceil(1000);
            s[i.clamp(1, s.len()) - 1] as f64
        };
        Some(Self {
            n: s.len(),
            p50: rank(500),
            p90: rank(900),
            p99: rank(990),
            p999: rank(999),
            mean: s.iter().map(|&v| v as f64).sum::<f64>() / s.len() as f64,
        })
    }

    /// The same figures divided by `div` (cycles → µs with the TSC rate in MHz).
    pub fn scaled(&self, div: f64) -> Self {
        Self {
            n: self.n,
            p50: self.p50 / div,
            p90: self.p90 / div,
            p99: self.p99 / div,
            p999: self.p999 / div,
            mean: self.mean / div,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OUT: &str = "NOTIFY-INFO source=floor tsc_khz=2600000 gsi=5\n\
        NOTIFY-ID id=notify-id\n\
        NOTIFY-RESULT kind=get_id mode=irq n=3 irqs=3 errors=0 min=1 p50=2 cycles=30,10,20\n\
        NOTIFY-ERROR kind=read mode=poll request=4 timeout\n\
        NOTIFY-DONE requests=3\n";

    #[test]
    fn parses_a_run() {
        let run = NotifyRun::parse(OUT);
        assert_eq!(run.id.as_deref(), Some("notify-id"));
        assert_eq!(run.done, Some(3));
        assert_eq!(run.tsc_khz, Some(2_600_000));
        let s = run.series("get_id", "irq").unwrap();
        assert_eq!(s.cycles, vec![30, 10, 20]);
        assert_eq!((s.irqs, s.errors), (3, 0));
        assert_eq!(run.errors.len(), 1);
        assert!(run.series("read", "poll").is_none());
    }

    #[test]
    fn nearest_rank_percentiles() {
        let samples: Vec<u64> = (1..=1000).collect();
        let s = Stats::of(&samples).unwrap();
        assert_eq!((s.p50, s.p90, s.p99, s.p999), (500.0, 900.0, 990.0, 999.0));
        assert_eq!(s.mean, 500.5);
        assert_eq!(Stats::of(&[7]).unwrap().p999, 7.0);
        assert!(Stats::of(&[]).is_none());
        assert_eq!(s.scaled(10.0).p50, 50.0);
    }
}
