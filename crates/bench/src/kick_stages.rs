//! A kick's way from the guest's store to its interrupt handler, cut into stages by
//! the host's tracepoints ([`crate::tracefs`]), one request at a time.
//!
//! Each request starts where KVM sees the guest's store: a `kvm_mmio` (or
//! `kvm_fast_mmio`) write of the vCPU thread to the QueueNotify address, of the
//! kicked queue's index where the tracepoint shows the value (the time before it,
//! from the guest's own start mark, is the caller's: the guest knows it); the stages
//! end at, in order:
//! 1. `signal`: the first `sched_waking` by the vCPU thread of a task other than
//!    itself and kworkers (the consumer: a device worker, a backend's queue thread,
//!    QEMU's loop, the kernel's vhost worker; the ioeventfd signals it on the vCPU's
//!    way, and so does a VMM that took the write as an exit);
//! 2. `wakeup`: the consumer switched in (`sched_switch next_pid=`), or its first
//!    event of its own when no switch to it is traced (it had not slept yet);
//! 3. `work`: the consumer enters the system call that raises the interrupt (the
//!    irqfd's `write`, QEMU's `KVM_IRQ_LINE` ioctl: `sys_enter`; a kernel thread
//!    such as vhost's makes none, and its work runs to the next mark), or wakes a
//!    relay that raises it for it (QEMU's loop reading a vhost worker's call
//!    eventfd, where its transport has no irqfd);
//! 4. `raise`: the interrupt is raised: the consumer (or the relay) wakes a kworker
//!    (an irqfd on an IOAPIC pin is injected from a workqueue) or calls
//!    `kvm_set_irq` itself;
//! 5. `inject`: `kvm_set_irq gsi G level 1`;
//! 6. `deliver`: the guest's handler runs: on a host that emulates guest ring 0 (PVM)
//!    its first instruction (`rdtsc`, `0f 31`) is a `kvm_emulate_insn` of the vCPU;
//!    elsewhere the vCPU's first `kvm_entry` after `kvm_inj_virq`.
//!
//! On the network path ([`Anchors::echo`]: a program answers each frame on the tap's
//! other side; the `net` tracepoints filtered to the tap) `work` is cut where the
//! frame crosses the tap and comes back: `tx` until the frame enters the host's stack
//! from the tap (`netif_receive_skb`), `echo wakeup` until the echo runs, `echo` until
//! its answer is queued on the tap (`net_dev_queue`), `rx wakeup` until the consumer
//! runs again (nothing when it is still on a CPU), `rx` until it enters the system
//! call that raises the interrupt.
//!
//! A request whose stages do not all appear before the next kick (a polled request:
//! no interrupt) is left out.

use crate::tracefs::Event;

/// The stage names of the disk path, in order.
pub const STAGES: [&str; 6] = ["signal", "wakeup", "work", "raise", "inject", "deliver"];

/// The stage names of the network path (an echo across the tap), in order.
pub const NET_STAGES: [&str; 10] = [
    "signal",
    "wakeup",
    "tx",
    "echo wakeup",
    "echo",
    "rx wakeup",
    "rx",
    "raise",
    "inject",
    "deliver",
];

/// What the stages are read against.
#[derive(Debug, Clone)]
pub struct Anchors {
    /// The vCPU thread's id.
    pub vcpu_tid: u32,
    /// The QueueNotify address as the tracepoints print it (`0xc0000050`).
    pub notify_gpa: String,
    /// The kicked queue's index, where the tracepoint prints the written value
    /// (`kvm_mmio` does, `kvm_fast_mmio` does not): other queues' kicks are not
    /// requests. `None`: every write is.
    pub notify_val: Option<u32>,
    /// The device's GSI.
    pub gsi: u32,
    /// The task name of the program answering each frame across the tap, on the
    /// network path.
    pub echo: Option<String>,
}

impl Anchors {
    /// The names of the stages [`requests`] cuts, in order.
    pub fn stage_names(&self) -> &'static [&'static str] {
        if self.echo.is_some() {
            &NET_STAGES
        } else {
            &STAGES
        }
    }
}

/// One request's stage boundaries (host TSC) and who consumed the kick.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// Which request-kick of the trace this is (0 for the first).
    pub kick: usize,
    /// The kick, then the end of each stage of [`Anchors::stage_names`].
    pub tsc: Vec<u64>,
    /// The consumer's task name.
    pub consumer: String,
}

impl Request {
    /// The length of each stage, in TSC cycles.
    pub fn stages(&self) -> Vec<u64> {
        self.tsc
            .windows(2)
            .map(|w| w[1].saturating_sub(w[0]))
            .collect()
    }

    /// From KVM seeing the store to the guest's handler, cycles.
    pub fn total(&self) -> u64 {
        match (self.tsc.first(), self.tsc.last()) {
            (Some(a), Some(b)) => b.saturating_sub(*a),
            _ => 0,
        }
    }
}

fn is_kick(e: &Event, a: &Anchors) -> bool {
    e.tid == a.vcpu_tid
        && ((e.name == "kvm_mmio"
            && e.fields.starts_with("mmio write")
            && a.notify_val.is_none_or(|v| {
                e.fields.split_whitespace().last() == Some(format!("0x{v:x}").as_str())
            }))
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

fn pid_of(e: &Event, field: &str) -> Option<u32> {
    e.field(field).and_then(|p| p.parse().ok())
}

/// The first event of `after` at which `task` runs: switched in, or an event of its
/// own other than being switched out (it had not slept).
fn runs(after: &[Event], task: u32) -> Option<usize> {
    after.iter().position(|e| {
        (e.name == "sched_switch" && pid_of(e, "next_pid") == Some(task))
            || (e.tid == task && e.name != "sched_switch")
    })
}

/// Whether `task`, running at the start of `span`, is still on a CPU at its end (not
/// switched out, or switched back in).
fn on_cpu(span: &[Event], task: u32) -> bool {
    span.iter()
        .filter(|e| e.name == "sched_switch")
        .fold(true, |on, e| {
            if pid_of(e, "prev_pid") == Some(task) {
                false
            } else if pid_of(e, "next_pid") == Some(task) {
                true
            } else {
                on
            }
        })
}

fn one(events: &[Event], n: usize, k: usize, end: usize, a: &Anchors) -> Option<Request> {
    let kick = &events[k];
    let window = &events[k + 1..end];
    let mut at = 0;
    let mut marks = vec![kick.tsc];
    // signal
    let wi = window.iter().position(|e| {
        e.name == "sched_waking"
            && e.tid == a.vcpu_tid
            && pid_of(e, "pid") != Some(a.vcpu_tid)
            && !e.field("comm").unwrap_or("").starts_with("kworker")
    })?;
    let woken = &window[wi];
    let consumer = pid_of(woken, "pid")?;
    marks.push(woken.tsc);
    at += wi + 1;
    // wakeup
    at += runs(&window[at..], consumer)?;
    marks.push(window[at].tsc);
    if let Some(echo) = &a.echo {
        // tx: the frame enters the host's stack from the tap.
        at += window[at..]
            .iter()
            .position(|e| e.name == "netif_receive_skb" || e.name == "netif_rx")?;
        marks.push(window[at].tsc);
        let frame_sent = at;
        // echo wakeup: the echo runs.
        at += window[at..]
            .iter()
            .position(|e| e.name == "sched_waking" && e.field("comm") == Some(echo.as_str()))?;
        let echo_pid = pid_of(&window[at], "pid")?;
        at += 1;
        at += runs(&window[at..], echo_pid)?;
        marks.push(window[at].tsc);
        // echo: its answer is queued on the tap.
        at += window[at..]
            .iter()
            .position(|e| e.name == "net_dev_queue" && e.tid == echo_pid)?;
        marks.push(window[at].tsc);
        // rx wakeup: the consumer runs: at once if it is still on a CPU, else when it
        // is switched in (woken, or preempted meanwhile).
        if !on_cpu(&window[frame_sent..at], consumer) {
            at += 1;
            at += runs(&window[at..], consumer)?;
        }
        marks.push(window[at].tsc);
    }
    // work (or rx): until the system call that raises the interrupt (the irqfd's
    // write, QEMU's KVM_IRQ_LINE) enters, or until the consumer hands its completion
    // to a task that raises it (a kernel vhost worker signalling a VMM that has no
    // irqfd for it: the VMM's loop is the relay); raise: until the interrupt is
    // raised (a kernel thread makes no system call: without a relay its raise is empty).
    let level1 = format!("gsi {} level 1", a.gsi);
    let raises = |e: &Event, by: u32| {
        e.tid == by
            && ((e.name == "sched_waking" && e.field("comm").unwrap_or("").starts_with("kworker"))
                || (e.name == "kvm_set_irq" && e.fields.starts_with(&level1))
                || e.name == "kvm_msi_set_irq")
    };
    let handoff = at
        + window[at..].iter().position(|e| {
            raises(e, consumer)
                || (e.tid == consumer
                    && e.name == "sched_waking"
                    && !e.field("comm").unwrap_or("").starts_with("kworker")
                    && pid_of(e, "pid") != Some(a.vcpu_tid))
        })?;
    let entered = window[at..handoff]
        .iter()
        .rev()
        .find(|e| e.tid == consumer && e.name == "sys_enter")
        .map_or(window[handoff].tsc, |e| e.tsc);
    marks.push(entered);
    at = handoff;
    if !raises(&window[at], consumer) {
        let relay = pid_of(&window[at], "pid")?;
        at += window[at..].iter().position(|e| raises(e, relay))?;
    }
    marks.push(window[at].tsc);
    // inject
    at += window[at..].iter().position(|e| {
        (e.name == "kvm_set_irq" && e.fields.starts_with(&level1)) || e.name == "kvm_msi_set_irq"
    })?;
    marks.push(window[at].tsc);
    // deliver
    let after = &window[at + 1..];
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
    marks.push(handler.tsc);
    Some(Request {
        kick: n,
        tsc: marks,
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
        notify_val: None,
        gsi: 5,
        echo: None,
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
evmm-blk-9 [000] ..... 280: sys_enter: NR 1 (3, 7ffd1000, 8, 0, 0, 0)
evmm-blk-9 [000] ..... 285: sys_enter: NR 1 (6, 7ffd1000, 8, 0, 0, 0)
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
        assert_eq!(r[0].tsc, [204, 212, 250, 285, 290, 300, 340]);
        assert_eq!(r[0].stages(), [8, 38, 35, 5, 10, 40]);
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
        assert_eq!(r[0].tsc, [204, 212, 290, 290, 290, 300, 340]);
    }

    #[test]
    fn a_consumer_that_raises_the_line_itself_is_its_own_injector() {
        // QEMU's loop: KVM_IRQ_LINE from its own thread, no kworker.
        let t = "\
vcpu0-7 [001] ..... 200: kvm_exit: reason npf
vcpu0-7 [001] ..... 204: kvm_fast_mmio: fast mmio at gpa 0xc0000050
vcpu0-7 [001] d..5. 212: sched_waking: comm=qemu-system-x86 pid=5 prio=120 target_cpu=000
x-3 [000] d..2. 250: sched_switch: prev_comm=x prev_pid=3 prev_prio=120 prev_state=R ==> next_comm=qemu-system-x86 next_pid=5 next_prio=120
qemu-system-x86-5 [000] ..... 280: sys_enter: NR 16 (9, ae03, 7ffd1000, 0, 0, 0)
qemu-system-x86-5 [000] ..... 290: kvm_set_irq: gsi 5 level 1 source 0
vcpu0-7 [001] ..... 320: kvm_inj_virq: IRQ 0x40
vcpu0-7 [001] ..... 330: kvm_entry: vcpu 0
";
        let r = requests(&parse(t), &A());
        assert_eq!(r.len(), 1, "{r:?}");
        assert_eq!(r[0].tsc, [204, 212, 250, 280, 290, 290, 330]);
    }

    fn net() -> Anchors {
        Anchors {
            notify_val: Some(1),
            echo: Some("evmm-net-echo".into()),
            ..A()
        }
    }

    /// A receive-queue refill kick (queue 0) is not a request; the transmit kick's
    /// frame crosses the tap to the echo and back to the sleeping worker.
    #[test]
    fn a_network_request_is_cut_where_the_frame_crosses_the_tap() {
        let t = "\
vcpu0-7 [001] ..... 100: kvm_mmio: mmio write len 4 gpa 0xc0000050 val 0x0
vcpu0-7 [001] d..5. 101: sched_waking: comm=evmm-net pid=9 prio=120 target_cpu=000
vcpu0-7 [001] ..... 204: kvm_mmio: mmio write len 4 gpa 0xc0000050 val 0x1
vcpu0-7 [001] d..5. 212: sched_waking: comm=evmm-net pid=9 prio=120 target_cpu=000
rustc-3 [000] d..2. 250: sched_switch: prev_comm=rustc prev_pid=3 prev_prio=120 prev_state=R ==> next_comm=evmm-net next_pid=9 next_prio=120
evmm-net-9 [000] ..... 258: netif_receive_skb: dev=evmmn0 skbaddr=00000000a1b2c3d4 len=74
evmm-net-9 [000] d..4. 260: sched_waking: comm=evmm-net-echo pid=12 prio=120 target_cpu=000
evmm-net-9 [000] d..2. 262: sched_switch: prev_comm=evmm-net prev_pid=9 prev_prio=120 prev_state=S ==> next_comm=evmm-net-echo next_pid=12 next_prio=120
evmm-net-echo-12 [000] ..... 278: net_dev_queue: dev=evmmn0 skbaddr=00000000a1b2c3d5 len=74
evmm-net-echo-12 [000] d..4. 280: sched_waking: comm=evmm-net pid=9 prio=120 target_cpu=000
evmm-net-echo-12 [000] d..2. 281: sched_switch: prev_comm=evmm-net-echo prev_pid=12 prev_prio=120 prev_state=S ==> next_comm=evmm-net next_pid=9 next_prio=120
evmm-net-9 [000] ..... 288: sys_enter: NR 1 (6, 7ffd1000, 8, 0, 0, 0)
evmm-net-9 [000] d..4. 290: sched_waking: comm=kworker/0:0 pid=10 prio=120 target_cpu=000
kworker/0:0-10 [000] ..... 300: kvm_set_irq: gsi 5 level 1 source 0
vcpu0-7 [001] ..... 340: kvm_emulate_insn: 0:1000c0:0f 31 (prot64)
";
        let r = requests(&parse(t), &net());
        assert_eq!(r.len(), 1, "{r:?}");
        assert_eq!(r[0].kick, 0, "the refill kick is not counted");
        assert_eq!(
            r[0].tsc,
            [204, 212, 250, 258, 262, 278, 281, 288, 290, 300, 340]
        );
        assert_eq!(r[0].stages().len(), NET_STAGES.len());
        assert_eq!(r[0].total(), 136);
        assert_eq!(r[0].consumer, "evmm-net");
    }

    /// A kernel vhost worker preempted and back on its CPU when the answer arrives:
    /// no wake-up; it makes no system call, so its raise is empty.
    #[test]
    fn an_answer_that_finds_the_consumer_awake_needs_no_wakeup() {
        let t = "\
vcpu0-7 [001] ..... 204: kvm_mmio: mmio write len 4 gpa 0xc0000050 val 0x1
vcpu0-7 [001] d..5. 212: sched_waking: comm=vhost-6 pid=9 prio=120 target_cpu=000
x-3 [000] d..2. 250: sched_switch: prev_comm=x prev_pid=3 prev_prio=120 prev_state=R ==> next_comm=vhost-6 next_pid=9 next_prio=120
vhost-6-9 [000] ..... 258: netif_receive_skb: dev=evmmn0 skbaddr=00000000a1b2c3d4 len=74
vhost-6-9 [000] d..4. 260: sched_waking: comm=evmm-net-echo pid=12 prio=120 target_cpu=001
vhost-6-9 [000] d..2. 262: sched_switch: prev_comm=vhost-6 prev_pid=9 prev_prio=120 prev_state=R ==> next_comm=y next_pid=4 next_prio=120
y-4 [000] d..2. 263: sched_switch: prev_comm=y prev_pid=4 prev_prio=120 prev_state=S ==> next_comm=vhost-6 next_pid=9 next_prio=120
z-5 [001] d..2. 270: sched_switch: prev_comm=z prev_pid=5 prev_prio=120 prev_state=R ==> next_comm=evmm-net-echo next_pid=12 next_prio=120
evmm-net-echo-12 [001] ..... 275: net_dev_queue: dev=evmmn0 skbaddr=00000000a1b2c3d5 len=74
vhost-6-9 [000] d..4. 290: sched_waking: comm=kworker/0:0 pid=10 prio=120 target_cpu=000
kworker/0:0-10 [000] ..... 300: kvm_set_irq: gsi 5 level 1 source 0
vcpu0-7 [001] ..... 320: kvm_inj_virq: IRQ 0x40
vcpu0-7 [001] ..... 330: kvm_entry: vcpu 0
";
        let r = requests(&parse(t), &net());
        assert_eq!(r.len(), 1, "{r:?}");
        assert_eq!(
            r[0].tsc,
            [204, 212, 250, 258, 270, 275, 275, 290, 290, 300, 330]
        );
    }

    /// QEMU with vhost=on on virtio-mmio: the vhost worker signals the call eventfd,
    /// QEMU's loop (no irqfd) raises the line itself.
    #[test]
    fn a_completion_handed_to_a_relay_is_raised_by_the_relay() {
        let t = "\
vcpu0-7 [001] ..... 204: kvm_mmio: mmio write len 4 gpa 0xc0000050 val 0x1
vcpu0-7 [001] d..5. 212: sched_waking: comm=vhost-5 pid=9 prio=120 target_cpu=000
x-3 [000] d..2. 250: sched_switch: prev_comm=x prev_pid=3 prev_prio=120 prev_state=S ==> next_comm=vhost-5 next_pid=9 next_prio=120
vhost-5-9 [000] ..... 258: netif_receive_skb: dev=evmmn0 skbaddr=00000000a1b2c3d4 len=74
vhost-5-9 [000] d..4. 260: sched_waking: comm=evmm-net-echo pid=12 prio=120 target_cpu=001
vhost-5-9 [000] d..2. 262: sched_switch: prev_comm=vhost-5 prev_pid=9 prev_prio=120 prev_state=S ==> next_comm=x next_pid=3 next_prio=120
z-4 [001] d..2. 270: sched_switch: prev_comm=z prev_pid=4 prev_prio=120 prev_state=S ==> next_comm=evmm-net-echo next_pid=12 next_prio=120
evmm-net-echo-12 [001] ..... 275: net_dev_queue: dev=evmmn0 skbaddr=00000000a1b2c3d5 len=74
evmm-net-echo-12 [001] d..4. 276: sched_waking: comm=vhost-5 pid=9 prio=120 target_cpu=000
x-3 [000] d..2. 280: sched_switch: prev_comm=x prev_pid=3 prev_prio=120 prev_state=S ==> next_comm=vhost-5 next_pid=9 next_prio=120
vhost-5-9 [000] d..4. 286: sched_waking: comm=qemu-system-x86 pid=5 prio=120 target_cpu=000
qemu-system-x86-5 [000] ..... 295: sys_enter: NR 16 (9, ae03, 7ffd1000, 0, 0, 0)
qemu-system-x86-5 [000] ..... 298: kvm_set_irq: gsi 5 level 1 source 0
vcpu0-7 [001] ..... 320: kvm_inj_virq: IRQ 0x40
vcpu0-7 [001] ..... 330: kvm_entry: vcpu 0
";
        let r = requests(&parse(t), &net());
        assert_eq!(r.len(), 1, "{r:?}");
        assert_eq!(
            r[0].tsc,
            [204, 212, 250, 258, 270, 275, 280, 286, 298, 298, 330]
        );
    }
}
