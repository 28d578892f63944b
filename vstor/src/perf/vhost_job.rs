//! `vstor perf --vhost-user SOCK`: drives any vhost-user-blk target (vstor, qemu-storage-daemon,
//! SPDK) through libblkio from one thread, keeping `--queue-depth` requests in flight on each queue.
//! With `--target-pid` it also reports the target's CPU time per I/O (sum over all its threads,
//! from `/proc/PID/task/*/schedstat`).

use std::time::{Duration, Instant};

use super::workload::{check, fill, OpGen, Pattern};
use super::Tally;
use super::{PerfArgs, Report};
use crate::blkclient::{BlkClient, ClientOptions};

/// CPU time of every thread of `pid`, in nanoseconds.
pub fn process_cpu_ns(pid: u32) -> Option<u64> {
    let mut total = 0u64;
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).ok()? {
        let p = t.ok()?.path().join("schedstat");
        if let Ok(s) = std::fs::read_to_string(p) {
            total += s.split_whitespace().next().and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        }
    }
    Some(total)
}

struct Slot {
    submitted: Instant,
    unit: u64,
    write: bool,
    verifying: bool,
    generation: u64,
}

pub fn run(a: &PerfArgs, sock: &str) -> Result<Report, String> {
    let qd = a.queue_depth as usize;
    let nq = a.queues.max(1) as usize;
    let io = a.io_size as usize;
    let opts = ClientOptions {
        path: sock.to_string(),
        num_queues: i32::try_from(nq).unwrap_or(1),
        // libblkio uses 3 descriptors per request and no indirect tables.
        queue_size: i32::try_from((qd * 3).next_power_of_two().max(64)).unwrap_or(256),
        read_only: matches!(a.workload, Pattern::Read | Pattern::RandRead),
        buf_size: nq * qd * io,
    };
    let mut c = BlkClient::connect(&opts)?;
    let units = c.capacity / io as u64;
    if units < (nq * qd) as u64 {
        return Err(format!("the device holds {units} I/Os of {io} bytes: too few for {nq} x QD {qd}"));
    }
    let per_q = units / nq as u64;
    let mut gens: Vec<OpGen> =
        (0..nq).map(|q| OpGen::new(a.workload, a.rwmixread, q as u64 * per_q, per_q, a.seed + q as u64)).collect();
    let mut slots: Vec<Vec<Slot>> = (0..nq)
        .map(|_| {
            (0..qd)
                .map(|_| Slot { submitted: Instant::now(), unit: 0, write: false, verifying: false, generation: 0 })
                .collect()
        })
        .collect();
    let mut tally = Tally::default();
    let mut next_gen = 0u64;
    let buf_off = |q: usize, s: usize| (q * qd + s) * io;

    let submit =
        |c: &mut BlkClient, gens: &mut [OpGen], slots: &mut [Vec<Slot>], next_gen: &mut u64, q: usize, s: usize| {
            let slot = &mut slots[q][s];
            let (mut write, mut unit) = gens[q].next_op();
            if a.workload == Pattern::Verify {
                if slot.verifying {
                    write = false;
                    unit = slot.unit;
                } else {
                    unit = unit - unit % qd as u64 + s as u64;
                    *next_gen += 1;
                    slot.generation = *next_gen;
                    let off = buf_off(q, s);
                    fill(&mut c.buf()[off..off + io], unit, slot.generation);
                }
            }
            slot.unit = unit;
            slot.write = write;
            slot.submitted = Instant::now();
            let tag = q * qd + s;
            if write {
                c.write(q, unit * io as u64, buf_off(q, s), io, tag);
            } else {
                c.read(q, unit * io as u64, buf_off(q, s), io, tag);
            }
        };

    let cpu0 = a.target_pid.and_then(process_cpu_ns);
    let t0 = Instant::now();
    let deadline = t0 + Duration::from_secs_f64(a.time);
    for q in 0..nq {
        for s in 0..qd {
            submit(&mut c, &mut gens, &mut slots, &mut next_gen, q, s);
        }
    }
    let mut outstanding = nq * qd;
    let mut done = Vec::with_capacity(qd);
    while outstanding > 0 {
        let now = Instant::now();
        if now > deadline + Duration::from_secs(30) {
            return Err(format!("{outstanding} requests did not complete within 30 s after the run"));
        }
        for q in 0..nq {
            done.clear();
            c.poll(q, &mut done, qd)?;
            for &(tag, ret) in &done {
                let s = tag % qd;
                let slot = &mut slots[q][s];
                let now = Instant::now();
                tally.done(slot.submitted, now, io as u64, ret == 0);
                if a.workload == Pattern::Verify {
                    let off = buf_off(q, s);
                    let buf = &c.buf()[off..off + io];
                    if super::verify_step(&mut slot.verifying, ret == 0, || check(buf, slot.unit, slot.generation)) {
                        tally.miscompares += 1;
                    }
                }
                if now < deadline || slots[q][s].verifying {
                    submit(&mut c, &mut gens, &mut slots, &mut next_gen, q, s);
                } else {
                    outstanding -= 1;
                }
            }
        }
    }
    let elapsed = t0.elapsed();
    let target_cpu = match (cpu0, a.target_pid.and_then(process_cpu_ns)) {
        (Some(a0), Some(a1)) => Duration::from_nanos(a1.saturating_sub(a0)),
        _ => Duration::ZERO,
    };
    Ok(Report {
        label: format!(
            "vhost-user {sock}: {:?} {} B, {} queue(s) x QD {}, {:.1} s{}",
            a.workload,
            io,
            nq,
            qd,
            a.time,
            if a.target_pid.is_some() {
                " (CPU per I/O: target)"
            } else {
                " (CPU per I/O: not measured; pass --target-pid)"
            }
        ),
        tally,
        elapsed,
        cpu: target_cpu,
    })
}
