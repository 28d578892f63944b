//! `vstor perf --nvme-vfio-user DIR`: drives an NVMe controller over vfio-user (vstor's, or
//! SPDK's nvmf target with the VFIOUSER transport) through the NVMe client library, from one
//! thread, keeping `--queue-depth` commands in flight on each of `--queues` I/O queues. The client
//! rides on rust-vmm's vfio-user client, not on vstor's server code. With `--target-pid` it also
//! reports the target's CPU time per I/O.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use vstor_vfio_user::{ClientOptions, NvmeClient};

use super::vhost_job::process_cpu_ns;
use super::workload::{check, fill, OpGen, Pattern};
use super::Tally;
use super::{PerfArgs, Report};

struct Slot {
    submitted: Instant,
    unit: u64,
    verifying: bool,
    generation: u64,
}

pub fn run(a: &PerfArgs, dir: &str) -> Result<Report, String> {
    let qd = a.queue_depth as usize;
    let nq = u16::try_from(a.queues.max(1)).map_err(|_| format!("--queues {} is too many", a.queues))?;
    let io = a.io_size as usize;
    if qd > 4095 {
        return Err(format!("--queue-depth {qd}: an NVMe queue holds at most 4095 commands"));
    }
    let opts = ClientOptions {
        dir: PathBuf::from(dir),
        io_queues: nq,
        // A queue of N entries holds N - 1 commands.
        queue_depth: u16::try_from(qd + 1).unwrap_or(u16::MAX),
        shadow_doorbells: !a.no_shadow_doorbells,
        interrupts: a.interrupts,
        buf_size: usize::from(nq) * qd * io,
        defer_doorbells: true,
        ..Default::default()
    };
    let mut c = NvmeClient::connect(&opts).map_err(|e| format!("connecting to {dir}/cntrl: {e}"))?;
    if c.io_queues() < nq {
        return Err(format!("the controller granted {} I/O queues, fewer than the {nq} asked for", c.io_queues()));
    }
    let ns = match a.nsid {
        Some(n) => c.namespace(n).ok_or_else(|| format!("--nsid {n}: no such active namespace"))?,
        None => *c.namespaces().first().ok_or("the controller has no active namespace")?,
    };
    let bs = ns.block_size as usize;
    if !io.is_multiple_of(bs) || io == 0 || io > c.max_transfer() {
        return Err(format!(
            "--io-size {io}: must be a multiple of the namespace's {bs}-byte blocks and at most {} bytes",
            c.max_transfer()
        ));
    }
    let blocks = u32::try_from(io / bs).map_err(|_| "--io-size too large".to_string())?;
    let units = ns.blocks * bs as u64 / io as u64;
    if units < (usize::from(nq) * qd) as u64 {
        return Err(format!("namespace {} holds {units} I/Os of {io} bytes: too few for {nq} x QD {qd}", ns.nsid));
    }
    let per_q = units / u64::from(nq);
    let mut gens: Vec<OpGen> =
        (0..u64::from(nq)).map(|q| OpGen::new(a.workload, a.rwmixread, q * per_q, per_q, a.seed + q)).collect();
    let mut slots: Vec<Vec<Slot>> = (0..nq)
        .map(|_| {
            (0..qd).map(|_| Slot { submitted: Instant::now(), unit: 0, verifying: false, generation: 0 }).collect()
        })
        .collect();
    let mut tally = Tally::default();
    let mut next_gen = 0u64;
    let buf_off = |q: usize, s: usize| (q * qd + s) * io;
    let nsid = ns.nsid;

    let mut submit = |c: &mut NvmeClient, slots: &mut [Vec<Slot>], q: usize, s: usize| -> Result<(), String> {
        let slot = &mut slots[q][s];
        let (mut write, mut unit) = gens[q].next_op();
        if a.workload == Pattern::Verify {
            if slot.verifying {
                write = false;
                unit = slot.unit;
            } else {
                unit = unit - unit % qd as u64 + s as u64;
                next_gen += 1;
                slot.generation = next_gen;
                let off = buf_off(q, s);
                fill(&mut c.buf()[off..off + io], unit, slot.generation);
            }
        }
        slot.unit = unit;
        slot.submitted = Instant::now();
        let (qid, tag) = (u16::try_from(q + 1).unwrap_or(1), u16::try_from(s).unwrap_or(0));
        let lba = unit * u64::from(blocks);
        let r = if write {
            c.submit_write(qid, nsid, lba, blocks, buf_off(q, s), tag)
        } else {
            c.submit_read(qid, nsid, lba, blocks, buf_off(q, s), tag)
        };
        r.map_err(|e| format!("submit: {e}"))
    };

    let cpu0 = a.target_pid.and_then(process_cpu_ns);
    let t0 = Instant::now();
    let deadline = t0 + Duration::from_secs_f64(a.time);
    for q in 0..usize::from(nq) {
        for s in 0..qd {
            submit(&mut c, &mut slots, q, s)?;
        }
        c.ring(u16::try_from(q + 1).unwrap_or(1)).map_err(|e| e.to_string())?;
    }
    let mut outstanding = usize::from(nq) * qd;
    let mut done = Vec::with_capacity(qd);
    while outstanding > 0 {
        if Instant::now() > deadline + Duration::from_secs(30) {
            return Err(format!("{outstanding} commands did not complete within 30 s after the run"));
        }
        for q in 0..usize::from(nq) {
            let qid = u16::try_from(q + 1).unwrap_or(1);
            done.clear();
            c.poll(qid, &mut done).map_err(|e| e.to_string())?;
            if done.is_empty() {
                continue;
            }
            let now = Instant::now();
            for &(tag, status) in &done {
                let s = usize::from(tag);
                let slot = &mut slots[q][s];
                tally.done(slot.submitted, now, io as u64, status == 0);
                if a.workload == Pattern::Verify {
                    let off = buf_off(q, s);
                    let buf = &c.buf()[off..off + io];
                    if super::verify_step(&mut slot.verifying, status == 0, || check(buf, slot.unit, slot.generation)) {
                        tally.miscompares += 1;
                    }
                }
                if now < deadline || slots[q][s].verifying {
                    submit(&mut c, &mut slots, q, s)?;
                } else {
                    outstanding -= 1;
                }
            }
            c.ring(qid).map_err(|e| e.to_string())?;
        }
    }
    let elapsed = t0.elapsed();
    let target_cpu = match (cpu0, a.target_pid.and_then(process_cpu_ns)) {
        (Some(a0), Some(a1)) => Duration::from_nanos(a1.saturating_sub(a0)),
        _ => Duration::ZERO,
    };
    let doorbells = match (c.shadow_doorbells_active(), c.doorbells_mapped()) {
        (true, _) => "shadow doorbells",
        (false, true) => "mapped doorbells",
        (false, false) => "trapped doorbells",
    };
    let _ = c.shutdown();
    Ok(Report {
        label: format!(
            "NVMe/vfio-user {dir} ns {nsid}: {:?} {io} B, {nq} queue(s) x QD {qd}, {:.1} s, {doorbells}, {}{}",
            a.workload,
            a.time,
            if a.interrupts { "MSI-X" } else { "polled" },
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
