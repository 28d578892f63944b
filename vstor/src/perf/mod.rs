//! `vstor perf`: a load generator with one report format for every path it can drive.
//!
//! - a bdev inside this process (`--bdev null|malloc[:MiB]|uring:PATH|aio:PATH`), like SPDK's bdevperf;
//! - any vhost-user-blk target through libblkio (`--vhost-user SOCK`), with the target's CPU time
//!   per I/O when `--target-pid` is given;
//! - an NVMe controller over vfio-user (`--nvme-vfio-user DIR`, the listener's traddr) through
//!   the NVMe client library;
//!
//! It prints IOPS, MiB/s, mean/p50/p99/p99.9 latency and the CPU time the process spent per I/O.

// Benchmark arithmetic on small, trusted values: the cast lints are relaxed here only.
#![allow(clippy::cast_possible_truncation, clippy::cast_sign_loss, clippy::cast_possible_wrap)]

mod bdev_job;
pub mod hist;
mod nvme_job;
pub mod vhost_job;
pub mod workload;

use std::time::{Duration, Instant};

use clap::Args;
use serde_json::json;

use hist::Histogram;
use workload::Pattern;

#[derive(Args, Debug, Clone)]
pub struct PerfArgs {
    /// The bdev to drive in-process: `null[:MiB]`, `malloc[:MiB]`, `uring:PATH` or `aio:PATH`.
    #[arg(long, value_name = "SPEC", default_value = "null:1024")]
    pub bdev: String,

    /// Workload: read, write, randread, randwrite, randrw, verify.
    #[arg(short = 'w', long, value_name = "PATTERN", default_value = "randread")]
    pub workload: Pattern,

    /// Percentage of reads in randrw.
    #[arg(long, value_name = "PCT", default_value_t = 70)]
    pub rwmixread: u8,

    /// I/O size in bytes.
    #[arg(short = 'o', long, value_name = "BYTES", default_value_t = 4096)]
    pub io_size: u32,

    /// Queue depth per core (per queue for client modes).
    #[arg(short = 'q', long, value_name = "N", default_value_t = 32)]
    pub queue_depth: u32,

    /// Seconds to run.
    #[arg(short = 't', long, value_name = "SECONDS", default_value_t = 5.0)]
    pub time: f64,

    /// Cores to run on (one job per core).
    #[arg(short = 'm', long, value_name = "MASK", default_value = "0x1")]
    pub cpumask: String,

    /// Block size of bdevs created by `--bdev null/malloc`.
    #[arg(long, value_name = "BYTES", default_value_t = 512)]
    pub block_size: u32,

    /// Reactor mode while measuring.
    #[arg(long, value_name = "MODE", default_value = "poll")]
    pub reactor_mode: vstor_reactor::Mode,

    /// Seed for random offsets and verify patterns.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,

    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,

    /// Drive a vhost-user-blk socket (vstor, qemu-storage-daemon, SPDK...) instead of an in-process bdev.
    #[arg(long, value_name = "SOCK", conflicts_with = "bdev")]
    pub vhost_user: Option<String>,

    /// Drive an NVMe controller over vfio-user: DIR is the listener's traddr (socket DIR/cntrl).
    #[arg(long, value_name = "DIR", conflicts_with_all = ["bdev", "vhost_user"])]
    pub nvme_vfio_user: Option<String>,

    /// Namespace to use with --nvme-vfio-user (default: the first active one).
    #[arg(long, value_name = "NSID")]
    pub nsid: Option<u32>,

    /// With --nvme-vfio-user: do not use Doorbell Buffer Config (every doorbell is an MMIO write).
    #[arg(long)]
    pub no_shadow_doorbells: bool,

    /// With --nvme-vfio-user: complete through MSI-X eventfds instead of polling the CQs.
    #[arg(long)]
    pub interrupts: bool,

    /// Queues to use with --vhost-user or --nvme-vfio-user (each kept at --queue-depth).
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub queues: u32,

    /// PID of the target process, to report its CPU time per I/O (--vhost-user, --nvme-vfio-user).
    #[arg(long, value_name = "PID")]
    pub target_pid: Option<u32>,
}

/// What a job counts as its requests complete; jobs on several cores merge theirs.
#[derive(Default, Clone)]
pub struct Tally {
    pub hist: Histogram,
    pub ios: u64,
    pub bytes: u64,
    pub errors: u64,
    pub miscompares: u64,
}

impl Tally {
    /// One request of `bytes` submitted at `submitted` completed at `now`, successfully or not.
    pub fn done(&mut self, submitted: Instant, now: Instant, bytes: u64, ok: bool) {
        self.hist.record(u64::try_from(now.saturating_duration_since(submitted).as_nanos()).unwrap_or(u64::MAX));
        self.ios += 1;
        self.bytes += bytes;
        if !ok {
            self.errors += 1;
        }
    }

    pub fn merge(&mut self, o: &Tally) {
        self.hist.merge(&o.hist);
        self.ios += o.ios;
        self.bytes += o.bytes;
        self.errors += o.errors;
        self.miscompares += o.miscompares;
    }
}

/// What one run measured.
#[derive(Default)]
pub struct Report {
    pub label: String,
    pub tally: Tally,
    pub elapsed: Duration,
    /// CPU time of the measuring process (or target, when known) over the window.
    pub cpu: Duration,
}

impl Report {
    pub fn iops(&self) -> f64 {
        self.tally.ios as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    pub fn mib_s(&self) -> f64 {
        self.tally.bytes as f64 / (1 << 20) as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    pub fn cpu_ns_per_io(&self) -> f64 {
        if self.tally.ios == 0 {
            0.0
        } else {
            self.cpu.as_nanos() as f64 / self.tally.ios as f64
        }
    }

    pub fn to_json(&self) -> serde_json::Value {
        json!({
            "label": self.label,
            "ios": self.tally.ios,
            "iops": self.iops(),
            "mib_s": self.mib_s(),
            "mean_us": self.tally.hist.mean() / 1000.0,
            "p50_us": self.tally.hist.quantile(0.50) as f64 / 1000.0,
            "p99_us": self.tally.hist.quantile(0.99) as f64 / 1000.0,
            "p999_us": self.tally.hist.quantile(0.999) as f64 / 1000.0,
            "max_us": self.tally.hist.max() as f64 / 1000.0,
            "cpu_ns_per_io": self.cpu_ns_per_io(),
            "errors": self.tally.errors,
            "miscompares": self.tally.miscompares,
            "seconds": self.elapsed.as_secs_f64(),
        })
    }

    pub fn print(&self) {
        println!("{}", self.label);
        println!(
            "  {:>12} {:>10} {:>9} {:>9} {:>9} {:>9} {:>10} {:>7} {:>7}",
            "IOPS", "MiB/s", "mean_us", "p50_us", "p99_us", "p99.9_us", "cpu_ns/IO", "errors", "miscmp"
        );
        println!(
            "  {:>12.1} {:>10.1} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>10.0} {:>7} {:>7}",
            self.iops(),
            self.mib_s(),
            self.tally.hist.mean() / 1000.0,
            self.tally.hist.quantile(0.50) as f64 / 1000.0,
            self.tally.hist.quantile(0.99) as f64 / 1000.0,
            self.tally.hist.quantile(0.999) as f64 / 1000.0,
            self.cpu_ns_per_io(),
            self.tally.errors,
            self.tally.miscompares
        );
    }
}

/// One completion under the verify pattern, for every job kind: a write that completes starts
/// its read-back (if it succeeded); a read-back that completes ends it. Returns whether the
/// read-back succeeded but `matches` says its data is not what was written.
pub(crate) fn verify_step(verifying: &mut bool, ok: bool, matches: impl FnOnce() -> bool) -> bool {
    if *verifying {
        *verifying = false;
        ok && !matches()
    } else {
        *verifying = ok;
        false
    }
}

/// CPU time (user + system) of this process so far.
pub fn process_cpu() -> Duration {
    let mut ru = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage writes a rusage into the valid pointer.
    let r = unsafe { libc::getrusage(libc::RUSAGE_SELF, ru.as_mut_ptr()) };
    if r != 0 {
        return Duration::ZERO;
    }
    // SAFETY: getrusage succeeded and initialised the struct.
    let ru = unsafe { ru.assume_init() };
    let tv = |t: libc::timeval| {
        Duration::from_secs(u64::try_from(t.tv_sec).unwrap_or(0))
            + Duration::from_micros(u64::try_from(t.tv_usec).unwrap_or(0))
    };
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

pub fn run(a: PerfArgs) -> i32 {
    crate::init_logging("warn");
    if a.io_size == 0 || a.queue_depth == 0 || a.time <= 0.0 {
        eprintln!("vstor perf: --io-size, --queue-depth and --time must be greater than zero");
        return 2;
    }
    let result = match (&a.vhost_user, &a.nvme_vfio_user) {
        (Some(sock), _) => vhost_job::run(&a, sock),
        (None, Some(dir)) => nvme_job::run(&a, dir),
        (None, None) => bdev_job::run(&a),
    };
    match result {
        Ok(rep) => {
            if a.json {
                println!("{}", rep.to_json());
            } else {
                rep.print();
            }
            if rep.tally.errors > 0 || rep.tally.miscompares > 0 {
                1
            } else {
                0
            }
        }
        Err(e) => {
            eprintln!("vstor perf: {e}");
            2
        }
    }
}
