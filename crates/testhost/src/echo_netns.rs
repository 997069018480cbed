//! One run of a VMM whose virtio-net device is on a tap answered by `evmm-net-echo`,
//! in a network namespace made for that run alone (`unshare -n`: util-linux's on
//! this host, busybox's in the nested host). The tap has no address and IPv6 is off
//! on it, so nothing but the guest's probe frames and their echoes crosses it, and the
//! namespace (tap included) ends with the run. For the network notify-latency bench
//! and its tests.

use crate::guest::marker_fields;
use crate::nested::shell_quote;
use crate::process::run_with_limit;
use std::path::Path;
use std::time::Duration;

/// What one run printed, and its outcome.
#[derive(Debug, Clone)]
pub struct EchoRun {
    /// The VMM's standard output, then the echo's summary.
    pub console: String,
    /// The VMM's exit status (`timeout`'s 137 when it ran past its limit).
    pub vmm_status: Option<i32>,
    /// The echo's summary: frames answered and its share's p50 and p99, ns.
    pub echo: Option<EchoSummary>,
}

/// The `NET-ECHO` line of `evmm-net-echo`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EchoSummary {
    /// Probe frames answered.
    pub frames: u64,
    /// Its share of a round trip, p50, ns.
    pub share_p50_ns: u64,
    /// Its share, p99, ns.
    pub share_p99_ns: u64,
}

impl EchoSummary {
    /// The summary in `console`, if the echo printed one.
    pub fn parse(console: &str) -> Option<Self> {
        let f = console.lines().find_map(|l| marker_fields(l, "NET-ECHO"))?;
        let num = |k: &str| f.get(k)?.parse().ok();
        Some(Self {
            frames: num("frames")?,
            share_p50_ns: num("share_ns_p50")?,
            share_p99_ns: num("share_ns_p99")?,
        })
    }
}

/// The shell script of a run: `bins` first on PATH when given, namespace set-up, the
/// echo (waited for until it listens), `vmm` under `timeout -s KILL limit`,
/// `NET-BENCH-VMM-EXIT status=`, the echo stopped and its output.
pub fn script(tap: &str, vmm: &[String], limit: Duration, bins: Option<&Path>) -> String {
    let vmm: Vec<String> = vmm.iter().map(|w| shell_quote(w)).collect();
    let tap = shell_quote(tap);
    let path = bins
        .map(|b| format!("PATH={}:\"$PATH\"\n", shell_quote(&b.display().to_string())))
        .unwrap_or_default();
    format!(
        "set -u\n{path}\
         if [ -x /usr/bin/ip ]; then IP=/usr/bin/ip; else IP=ip; fi\n\
         D=$(mktemp -d)\n\
         $IP link set lo up\n\
         $IP tuntap add dev {tap} mode tap || exit 1\n\
         echo 1 > /proc/sys/net/ipv6/conf/{tap}/disable_ipv6 2>/dev/null\n\
         $IP link set dev {tap} up || exit 1\n\
         evmm-net-echo {tap} > \"$D/echo\" &\n\
         ECHO=$!\n\
         i=0; while ! grep -q NET-ECHO-READY \"$D/echo\" 2>/dev/null; do\n\
           i=$((i+1)); [ $i -lt 200 ] || {{ echo 'NET-BENCH-ERROR the echo did not start'; cat \"$D/echo\"; exit 1; }}; sleep 0.05\n\
         done\n\
         timeout -s KILL {limit} {vmm}\n\
         echo \"NET-BENCH-VMM-EXIT status=$?\"\n\
         kill -TERM $ECHO; wait $ECHO\n\
         cat \"$D/echo\"\n\
         rm -rf \"$D\"\n",
        limit = limit.as_secs().max(1),
        vmm = vmm.join(" "),
    )
}

/// Runs `vmm` on tap `tap` in a namespace of its own with the echo (see the module),
/// with `bins` first on PATH when given (for `evmm-net-echo` and the VMM); an error
/// when the namespace or the echo cannot be set up or the whole run hangs.
pub fn run(
    tap: &str,
    vmm: &[String],
    limit: Duration,
    bins: Option<&Path>,
) -> Result<EchoRun, String> {
    let script = script(tap, vmm, limit, bins);
    let argv = ["unshare", "-n", "sh", "-c", &script];
    let out = run_with_limit(&argv, limit + Duration::from_secs(30))
        .map_err(|e| format!("cannot run unshare (util-linux or busybox): {e}"))?;
    let console = out.stdout;
    let status = out
        .status
        .ok_or_else(|| format!("the run still went on after {limit:?}; output:\n{console}"))?;
    if !status.success() {
        return Err(format!(
            "the network namespace or the echo could not be set up ({status}); output:\n{console}"
        ));
    }
    let vmm_status = console
        .lines()
        .find_map(|l| marker_fields(l, "NET-BENCH-VMM-EXIT"))
        .and_then(|f| f.get("status")?.parse().ok());
    let echo = EchoSummary::parse(&console);
    Ok(EchoRun {
        console,
        vmm_status,
        echo,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_echo_summary_is_read() {
        let console = "NOTIFY-DONE requests=5\nNET-ECHO frames=10 ignored=0 share_ns_p50=5000 share_ns_p90=6000 share_ns_p99=9000 share_ns_mean=5500\n";
        assert_eq!(
            EchoSummary::parse(console),
            Some(EchoSummary {
                frames: 10,
                share_p50_ns: 5000,
                share_p99_ns: 9000
            })
        );
        assert_eq!(EchoSummary::parse("nothing"), None);
    }

    #[test]
    fn the_script_quotes_the_vmm_and_limits_it() {
        let s = script(
            "evmmn0",
            &["evmm".into(), "--cmdline".into(), "a b".into()],
            Duration::from_secs(60),
            Some(Path::new("/r/bin")),
        );
        assert!(s.contains("PATH=/r/bin:\"$PATH\""), "{s}");
        assert!(s.contains("timeout -s KILL 60 evmm --cmdline 'a b'"), "{s}");
        assert!(s.contains("tuntap add dev evmmn0 mode tap"), "{s}");
    }
}
