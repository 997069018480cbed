//! A kick's way from the guest's store to its interrupt handler, cut into stages by
//! the host's tracepoints ([`crate::tracefs`]), one request at a time.
//!
//! Each request starts where KVM sees the guest's store: a `kvm_mmio` (or
//! `kvm_fast_mmio`) write of the vCPU thread to the QueueNotify address (the time
//! before it, from the guest's own start mark, is the caller's: the guest knows it);
//! the stages end at, in order:
//! 1. `signal`: the first `sched_waking` by the vCPU thread of a task other than
//!    itself and kworkers (the consumer: a device worker, a backend's queue thread,
//!    QEMU's loop; the ioeventfd signals it on the vCPU's way, and so does a VMM that
//!    took the write as an exit);
//! 2. `wakeup`: the consumer switched in (`sched_switch next_pid=`), or its first
//!    event of its own when no switch to it is traced (it had not slept yet);
//! 3. `work`: the consumer raises the interrupt: it wakes a kworker (an irqfd on an
//!    IOAPIC pin is injected from a workqueue) or calls `kvm_set_irq` itself;
//! 4. `inject`: `kvm_set_irq gsi G level 1`;
//! 5. `deliver`: the guest's handler runs: on a host that emulates guest ring 0 (PVM)
//!    its first instruction (`rdtsc`, `0f 31`) is a `kvm_emulate_insn` of the vCPU;
//!    elsewhere the vCPU's first `kvm_entry` after `kvm_inj_virq`.
//!
//! A request whose stages do not all appear before the next kick (a polled request:
//! no interrupt) is left out.

use crate::tracefs::Event;

/// The stage names, in order.
pub const STAGES: [&str; 5] = ["signal", "wakeup", "work", "inject", "deliver"];

/// What the stages are read against.
#[derive(Debug, Clone)]
pub struct Anchors {
    /// The vCPU thread's id.
    pub vcpu_tid: u32,
    /// The QueueNotify address as the tracepoints print it (`0xc0000050`).
    pub notify_gpa: String,
    /// The device's GSI.
    pub gsi: u32,
}

/// One request's stage boundaries (host TSC) and who consumed the kick.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// Which QueueNotify write of the trace this is (0 for the first).
    pub kick: usize,
    /// `[kick, woken, running, raised, injected, handler]`.
    pub tsc: [u64; 6],
    /// The consumer's task name.
    pub consumer: String,
}

impl Request {
    /// The length of each stage, in TSC cycles.
    pub fn stages(&self) -> [u64; 5] {
        let mut d = [0; 5];
        for (i, v) in d.iter_mut().enumerate() {
            *v = self.tsc[i + 1].saturating_sub(self.tsc[i]);
        }
        d
    }

    /// From KVM seeing the store to the guest's handler, cycles.
    pub fn total(&self) -> u64 {
        self.tsc[5].saturating_sub(self.tsc[0])
    }
}

fn is_kick(e: &Event, a: &Anchors) -> bool {
    e.tid == a.vcpu_tid
        && ((e.name == "kvm_mmio" && e.fields.starts_with("mmio write"))
            || e.name == "kvm_fast_mmio")
        && e.fields.contains(&format!("gpa {}", a.notify_gpa))
}

/// The requests of `events` (in time order) with all their stages.
pub fn requests(events: &[Event], a: &Anchors) -> Vec<Request> {
    let kicks: Vec<usize> = (0..events.len())
        .filter(|&i| is_kick(&events[i], a))
        .collect();
    let mut out = Vec::new();
    for (n, &k) in kicks.iter().enumerate() {
        let end = kicks.get(n + 1).copied().unwrap_or(events.len());
        if let Some(r) = one(events, n, k, end, a) {
            out.push(r);
        }
    }
    out
}

fn one(events: &[Event], n: usize, k: usize, end: usize, a: &Anchors) -> Option<Request> {
    let kick = &events[k];
    let after = &events[k + 1..end];
    let (wi, woken) = after.iter().enumerate().find(|(_, e)| {
        e.name == "sched_waking"
            && e.tid == a.vcpu_tid
            && e.field("pid").and_then(|p| p.parse::<u32>().ok()) != Some(a.vcpu_tid)
            && !e.field("comm").unwrap_or("").starts_with("kworker")
    })?;
    let consumer: u32 = woken.field("pid")?.parse().ok()?;
    let after = &after[wi + 1..];
    // Switched in, or, when the wake-up found it not yet switched out (no
    // `sched_switch` to it), its first event of its own.
    let (ri, running) = after.iter().enumerate().find(|(_, e)| {
        (e.name == "sched_switch"
            && e.field("next_pid").and_then(|p| p.parse::<u32>().ok()) == Some(consumer))
            || e.tid == consumer
    })?;
    let after = &after[ri..];
    let level1 = format!("gsi {} level 1", a.gsi);
    let (ai, raised) = after.iter().enumerate().find(|(_, e)| {
        e.tid == consumer
            && ((e.name == "sched_waking" && e.field("comm").unwrap_or("").starts_with("kworker"))
                || (e.name == "kvm_set_irq" && e.fields.starts_with(&level1))
                || e.name == "kvm_msi_set_irq")
    })?;
    let after_raise = &after[ai..];
    let (ii, injected) = after_raise.iter().enumerate().find(|(_, e)| {
        (e.name == "kvm_set_irq" && e.fields.starts_with(&level1)) || e.name == "kvm_msi_set_irq"
    })?;
    let after = &after_raise[ii + 1..];
    let handler = after
        .iter()
        .find(|e| {
            e.tid == a.vcpu_tid && e.name == "kvm_emulate_insn" && e.fields.contains(":0f 31 ")
        })
        .or_else(|| {
            let inj = after
                .iter()
                .position(|e| e.tid == a.vcpu_tid && e.name == "kvm_inj_virq")?;
            after[inj..]
                .iter()
                .find(|e| e.tid == a.vcpu_tid && e.name == "kvm_entry")
        })?;
    Some(Request {
        kick: n,
        tsc: [
            kick.tsc,
            woken.tsc,
            running.tsc,
            raised.tsc,
            injected.tsc,
            handler.tsc,
        ],
        consumer: woken.field("comm").unwrap_or("?").to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tracefs::parse;

    const A: fn() -> Anchors = || Anchors {
        vcpu_tid: 7,
        notify_gpa: "0xc0000050".into(),
        gsi: 5,
    };

    /// A polled request (no interrupt), then one through an irqfd on an IOAPIC pin.
    const TRACE: &str = "\
vcpu0-7 [001] ..... 100: kvm_emulate_insn: 0:10a6ea:41 c7 02 00 00 00 00 (prot64)
vcpu0-7 [001] ..... 110: kvm_mmio: mmio write len 4 gpa 0xc0000050 val 0x0
vcpu0-7 [001] d..5. 115: sched_waking: comm=evmm-blk pid=9 prio=120 target_cpu=000
rustc-3 [000] d..2. 150: sched_switch: prev_comm=rustc prev_pid=3 prev_prio=120 prev_state=R ==> next_comm=evmm-blk next_pid=9 next_prio=120
vcpu0-7 [001] ..... 200: kvm_emulate_insn: 0:10a6ea:41 c7 02 00 00 00 00 (prot64)
vcpu0-7 [001] ..... 204: kvm_mmio: mmio write len 4 gpa 0xc0000050 val 0x0
vcpu0-7 [001] ..... 205: kvm_mmio: mmio write len 4 gpa 0xfee00080 val 0x0
vcpu0-7 [001] d..5. 210: sched_waking: comm=kworker/1:1 pid=11 prio=120 target_cpu=001
sshd-4 [000] d..5. 211: sched_waking: comm=rcu_preempt pid=15 prio=120 target_cpu=000
vcpu0-7 [001] d..5. 212: sched_waking: comm=evmm-blk pid=9 prio=120 target_cpu=000
rustc-3 [000] d..2. 250: sched_switch: prev_comm=rustc prev_pid=3 prev_prio=120 prev_state=R ==> next_comm=evmm-blk next_pid=9 next_prio=120
evmm-blk-9 [000] d..4. 290: sched_waking: comm=kworker/0:0 pid=10 prio=120 target_cpu=000
kworker/0:0-10 [000] ..... 300: kvm_set_irq: gsi 5 level 1 source 0
kworker/0:0-10 [000] ..... 301: kvm_set_irq: gsi 5 level 0 source 0
vcpu0-7 [001] ..... 340: kvm_emulate_insn: 0:1000c0:0f 31 (prot64)
";

    #[test]
    fn an_interrupted_request_is_cut_into_its_stages_and_a_polled_one_left_out() {
        let r = requests(&parse(TRACE), &A());
        assert_eq!(r.len(), 1, "{r:?}");
        assert_eq!(r[0].kick, 1);
        assert_eq!(r[0].tsc, [204, 212, 250, 290, 300, 340]);
        assert_eq!(r[0].stages(), [8, 38, 40, 10, 40]);
        assert_eq!(r[0].total(), 136);
        assert_eq!(r[0].consumer, "evmm-blk");
    }

    #[test]
    fn a_consumer_never_switched_in_runs_from_its_first_event() {
        let t = "\
vcpu0-7 [001] ..... 204: kvm_mmio: mmio write len 4 gpa 0xc0000050 val 0x0
vcpu0-7 [001] d..5. 212: sched_waking: comm=evmm-blk pid=9 prio=120 target_cpu=000
evmm-blk-9 [000] d..4. 290: sched_waking: comm=kworker/0:0 pid=10 prio=120 target_cpu=000
kworker/0:0-10 [000] ..... 300: kvm_set_irq: gsi 5 level 1 source 0
vcpu0-7 [001] ..... 340: kvm_emulate_insn: 0:1000c0:0f 31 (prot64)
";
        let r = requests(&parse(t), &A());
        assert_eq!(r.len(), 1, "{r:?}");
        assert_eq!(r[0].tsc, [204, 212, 290, 290, 300, 340]);
    }

    #[test]
    fn a_consumer_that_raises_the_line_itself_is_its_own_injector() {
        // QEMU's loop: KVM_IRQ_LINE from its own thread, no kworker.
        let t = "\
vcpu0-7 [001] ..... 200: kvm_exit: reason npf
vcpu0-7 [001] ..... 204: kvm_fast_mmio: fast mmio at gpa 0xc0000050
vcpu0-7 [001] d..5. 212: sched_waking: comm=qemu-system-x86 pid=5 prio=120 target_cpu=000
x-3 [000] d..2. 250: sched_switch: prev_comm=x prev_pid=3 prev_prio=120 prev_state=R ==> next_comm=qemu-system-x86 next_pid=5 next_prio=120
qemu-system-x86-5 [000] ..... 290: kvm_set_irq: gsi 5 level 1 source 0
vcpu0-7 [001] ..... 320: kvm_inj_virq: IRQ 0x40
vcpu0-7 [001] ..... 330: kvm_entry: vcpu 0
";
        let r = requests(&parse(t), &A());
        assert_eq!(r.len(), 1, "{r:?}");
        assert_eq!(r[0].tsc, [204, 212, 250, 290, 290, 330]);
    }
}
