//! In-process bdev benchmark: one job per reactor, each with its own channel and queue depth.

use std::cell::RefCell;
use std::rc::{Rc, Weak};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vstor_bdev::mem::AlignedBuf;
use vstor_bdev::{malloc, null, uring, Bdev, BdevChannel, BdevParams, IoCallback, IoOp, IoResult, IoSink, IoVecs};
use vstor_reactor::{CpuMask, PollStatus, Poller, Reactor, ReactorConfig, Reactors};

use super::workload::{check, fill, OpGen, Pattern};
use super::Tally;
use super::{process_cpu, PerfArgs, Report};

fn size_mb(spec: Option<&str>, default: u64) -> Result<u64, String> {
    match spec {
        None | Some("") => Ok(default),
        Some(s) => s.parse::<u64>().map_err(|_| format!("'{s}' is not a size in MiB")),
    }
}

/// Creates the bdev a `--bdev` spec names.
pub fn make_bdev(spec: &str, block_size: u32) -> Result<Arc<Bdev>, String> {
    let (kind, arg) = match spec.split_once(':') {
        Some((k, a)) => (k, Some(a)),
        None => (spec, None),
    };
    let geometry = |mb: u64| BdevParams {
        name: "Perf0".into(),
        uuid: None,
        block_size,
        num_blocks: mb * (1 << 20) / u64::from(block_size),
        read_only: false,
    };
    let r = match kind {
        "null" => null::create(geometry(size_mb(arg, 1024)?)),
        "malloc" => malloc::create(geometry(size_mb(arg, 256)?), false),
        "uring" | "aio" => {
            let path = arg.ok_or_else(|| format!("--bdev {kind}:PATH needs a file or block device"))?;
            uring::create(uring::UringOptions {
                name: "Perf0".into(),
                filename: path.into(),
                block_size: None,
                uuid: None,
                readonly: false,
                flavor: if kind == "aio" { uring::Flavor::Aio } else { uring::Flavor::Uring },
                fallocate: true,
            })
        }
        other => return Err(format!("--bdev '{other}' is not one of null, malloc, uring:PATH, aio:PATH")),
    };
    r.map_err(|e| e.to_string())
}

struct Slot {
    buf: AlignedBuf,
    submitted: Instant,
    unit: u64,
    /// Verify: the generation written, and whether the read-back is under way.
    generation: u64,
    verifying: bool,
}

struct JobState {
    ch: BdevChannel,
    slots: Vec<Slot>,
    gen: OpGen,
    pattern: Pattern,
    qd: u64,
    io_blocks: u64,
    io_bytes: u64,
    deadline: Instant,
    started: Option<Instant>,
    finished: Option<Instant>,
    outstanding: u64,
    next_generation: u64,
    tally: Tally,
}

struct Job {
    st: RefCell<JobState>,
    me: RefCell<Weak<Job>>,
}

impl Job {
    fn submit(&self, st: &mut JobState, slot: usize) {
        let Some(me) = self.me.borrow().upgrade() else { return };
        let (mut write, mut unit) = st.gen.next_op();
        let s = &mut st.slots[slot];
        if st.pattern == Pattern::Verify {
            if s.verifying {
                write = false;
                unit = s.unit;
            } else {
                // Each slot owns the units congruent to it, so two slots never race on one unit.
                unit = unit - unit % st.qd + slot as u64;
                st.next_generation += 1;
                s.generation = st.next_generation;
                fill(s.buf.as_mut_slice(), unit, s.generation);
            }
        }
        s.unit = unit;
        s.submitted = Instant::now();
        let mut iovs = IoVecs::new();
        // SAFETY: the slot's buffer lives in the job, which outlives every I/O it submits (the
        // job is dropped only after `outstanding` reaches zero), and no reference to it is held
        // while the I/O runs.
        unsafe { iovs.push_raw(s.buf.as_mut_ptr(), s.buf.len()) };
        let offset_blocks = unit * st.io_blocks;
        let op = if write {
            IoOp::Write { offset_blocks, num_blocks: st.io_blocks, iovs, fua: false }
        } else {
            IoOp::Read { offset_blocks, num_blocks: st.io_blocks, iovs }
        };
        st.ch.submit(op, IoCallback { sink: me, tag: slot as u64 });
    }
}

impl IoSink for Job {
    fn io_done(&self, tag: u64, result: IoResult) {
        let mut st = self.st.borrow_mut();
        let st = &mut *st;
        let slot = tag as usize;
        let now = Instant::now();
        st.tally.done(st.slots[slot].submitted, now, st.io_bytes, result.is_ok());
        if st.pattern == Pattern::Verify {
            let s = &mut st.slots[slot];
            if super::verify_step(&mut s.verifying, result.is_ok(), || check(s.buf.as_slice(), s.unit, s.generation)) {
                st.tally.miscompares += 1;
            }
        }
        if now < st.deadline || st.slots[slot].verifying {
            self.submit(st, slot);
        } else {
            st.outstanding -= 1;
            if st.outstanding == 0 {
                st.finished = Some(now);
            }
        }
    }
}

struct JobPoller {
    job: Rc<Job>,
    kicked: bool,
}

impl Poller for JobPoller {
    fn poll(&mut self) -> PollStatus {
        if !self.kicked {
            self.kicked = true;
            let mut st = self.job.st.borrow_mut();
            st.started = Some(Instant::now());
            let n = st.slots.len();
            st.outstanding = n as u64;
            for slot in 0..n {
                self.job.submit(&mut st, slot);
            }
            return PollStatus::Busy;
        }
        PollStatus::Idle
    }

    fn name(&self) -> &str {
        "perf_job"
    }
}

/// Per-job results carried back to the main thread.
struct JobResult {
    tally: Tally,
    elapsed: Duration,
}

pub fn run(a: &PerfArgs) -> Result<Report, String> {
    let bdev = make_bdev(&a.bdev, a.block_size)?;
    let bs = bdev.block_size();
    if !a.io_size.is_multiple_of(bs) {
        return Err(format!("--io-size {} is not a multiple of the bdev's {bs}-byte blocks", a.io_size));
    }
    let mask = CpuMask::parse(&a.cpumask).map_err(|e| e.to_string())?;
    let cfg = ReactorConfig { mode: a.reactor_mode, ..Default::default() };
    let reactors = Reactors::start(&mask, cfg).map_err(|e| e.to_string())?;
    let io_blocks = u64::from(a.io_size / bs);
    let units = bdev.num_blocks() / io_blocks;
    let per_core = units / mask.len() as u64;
    if per_core < u64::from(a.queue_depth) {
        return Err(format!(
            "the bdev holds {units} I/Os of {} bytes: too few for QD {} on {} core(s)",
            a.io_size,
            a.queue_depth,
            mask.len()
        ));
    }
    let dur = Duration::from_secs_f64(a.time);
    let cpu0 = process_cpu();
    let t0 = Instant::now();
    let mut ids = Vec::new();
    for (i, h) in reactors.handles().iter().enumerate() {
        let (bdev, a2) = (bdev.clone(), a.clone());
        let id = h
            .call(move |r: &mut Reactor| -> Result<_, String> {
                let ch = BdevChannel::new(bdev, r).map_err(|e| e.to_string())?;
                let align = ch.bdev().buf_align().max(4096);
                let slots = (0..a2.queue_depth)
                    .map(|_| Slot {
                        buf: AlignedBuf::zeroed(a2.io_size as usize, align).expect("I/O buffer"),
                        submitted: Instant::now(),
                        unit: 0,
                        generation: 0,
                        verifying: false,
                    })
                    .collect();
                let st = JobState {
                    ch,
                    slots,
                    gen: OpGen::new(a2.workload, a2.rwmixread, i as u64 * per_core, per_core, a2.seed + i as u64),
                    pattern: a2.workload,
                    qd: u64::from(a2.queue_depth),
                    io_blocks,
                    io_bytes: u64::from(a2.io_size),
                    deadline: Instant::now() + dur,
                    started: None,
                    finished: None,
                    outstanding: 0,
                    next_generation: 0,
                    tally: Tally::default(),
                };
                let job = Rc::new(Job { st: RefCell::new(st), me: RefCell::new(Weak::new()) });
                *job.me.borrow_mut() = Rc::downgrade(&job);
                Ok(r.add_poller(Box::new(JobPoller { job, kicked: false })))
            })
            .map_err(|e| e.to_string())??;
        ids.push(id);
    }
    std::thread::sleep(dur);
    let mut results = Vec::new();
    for (h, id) in reactors.handles().iter().zip(ids) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let r = h
                .call(move |r: &mut Reactor| {
                    let p = r.poller_mut::<JobPoller>(id)?;
                    let st = p.job.st.borrow();
                    let fin = st.finished?;
                    Some(JobResult { tally: st.tally.clone(), elapsed: fin - st.started.unwrap_or(fin) })
                })
                .map_err(|e| e.to_string())?;
            if let Some(r) = r {
                let _ = h.call(move |r: &mut Reactor| drop(r.remove_poller(id)));
                results.push(r);
                break;
            }
            if Instant::now() > deadline {
                return Err("I/O did not drain within 30 s after the run".into());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    let cpu = process_cpu().saturating_sub(cpu0);
    let wall = t0.elapsed();
    reactors.stop();
    let mut rep = Report {
        label: format!(
            "bdev {} ({}, {} B blocks): {:?} {} B, QD {}, {} core(s), {:.1} s",
            a.bdev,
            bdev.product_name(),
            bs,
            a.workload,
            a.io_size,
            a.queue_depth,
            mask.len(),
            a.time
        ),
        ..Default::default()
    };
    let mut longest = Duration::ZERO;
    for r in &results {
        rep.tally.merge(&r.tally);
        longest = longest.max(r.elapsed);
    }
    rep.elapsed = longest;
    // CPU per I/O counts the whole process over the window (reactors at full spin in poll mode).
    rep.cpu = cpu.min(wall * mask.len() as u32);
    Ok(rep)
}
