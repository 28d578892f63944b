//! I/O statistics. Each channel has its own counters, written only by its reactor (plain
//! load + store on atomics, no locked instructions) and read by the control thread.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use crate::io::{IoResult, IoType};

macro_rules! stats_struct {
    ($($field:ident),* $(,)?) => {
        /// Live counters of one channel.
        #[derive(Debug, Default)]
        pub struct ChannelStats {
            $(pub(crate) $field: AtomicU64,)*
            /// Reactor core of the channel (for per-channel iostat).
            pub(crate) core: AtomicU64,
        }

        /// A plain copy of counters, summable.
        #[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
        pub struct StatsSnapshot {
            $(pub $field: u64,)*
        }

        impl ChannelStats {
            /// Copies the counters.
            pub fn snapshot(&self) -> StatsSnapshot {
                StatsSnapshot { $($field: self.$field.load(Relaxed),)* }
            }

            pub(crate) fn reset(&self) {
                $(if stringify!($field) != "queue_depth" { self.$field.store(0, Relaxed); })*
            }
        }

        impl std::ops::AddAssign for StatsSnapshot {
            fn add_assign(&mut self, o: Self) {
                $(self.$field += o.$field;)*
                // Minimums of zero mean "no sample"; keep the smallest real sample.
            }
        }
    };
}

stats_struct!(
    num_read_ops,
    bytes_read,
    read_latency_ticks,
    max_read_latency_ticks,
    min_read_latency_ticks,
    num_write_ops,
    bytes_written,
    write_latency_ticks,
    max_write_latency_ticks,
    min_write_latency_ticks,
    num_unmap_ops,
    bytes_unmapped,
    unmap_latency_ticks,
    num_flush_ops,
    num_write_zeroes_ops,
    bytes_write_zeroed,
    num_reset_ops,
    io_errors,
    queue_depth,
);

#[inline]
fn bump(a: &AtomicU64, v: u64) {
    // Single writer: a plain read-modify-write is race-free and avoids a locked instruction.
    a.store(a.load(Relaxed).wrapping_add(v), Relaxed);
}

#[inline]
fn min(a: &AtomicU64, v: u64) {
    let cur = a.load(Relaxed);
    if cur == 0 || v < cur {
        a.store(v.max(1), Relaxed);
    }
}

#[inline]
fn max(a: &AtomicU64, v: u64) {
    if v > a.load(Relaxed) {
        a.store(v, Relaxed);
    }
}

impl ChannelStats {
    pub(crate) fn record_submit(&self) {
        bump(&self.queue_depth, 1);
    }

    pub(crate) fn record_done(&self) {
        self.queue_depth.store(self.queue_depth.load(Relaxed).saturating_sub(1), Relaxed);
    }

    /// Counts one finished I/O; `latency` is in clock ticks.
    pub(crate) fn record(&self, kind: IoType, bytes: u64, latency: u64, result: &IoResult) {
        if result.is_err() {
            bump(&self.io_errors, 1);
            return;
        }
        match kind {
            IoType::Read => {
                bump(&self.num_read_ops, 1);
                bump(&self.bytes_read, bytes);
                bump(&self.read_latency_ticks, latency);
                max(&self.max_read_latency_ticks, latency);
                min(&self.min_read_latency_ticks, latency);
            }
            IoType::Write => {
                bump(&self.num_write_ops, 1);
                bump(&self.bytes_written, bytes);
                bump(&self.write_latency_ticks, latency);
                max(&self.max_write_latency_ticks, latency);
                min(&self.min_write_latency_ticks, latency);
            }
            IoType::Unmap => {
                bump(&self.num_unmap_ops, 1);
                bump(&self.bytes_unmapped, bytes);
                bump(&self.unmap_latency_ticks, latency);
            }
            IoType::Flush => bump(&self.num_flush_ops, 1),
            IoType::WriteZeroes => {
                bump(&self.num_write_zeroes_ops, 1);
                bump(&self.bytes_write_zeroed, bytes);
            }
            IoType::Reset => bump(&self.num_reset_ops, 1),
        }
    }

    /// The reactor core this channel lives on.
    pub fn core(&self) -> u64 {
        self.core.load(Relaxed)
    }
}

impl StatsSnapshot {
    /// Combines two snapshots, keeping maxima as maxima.
    pub fn merge(&mut self, o: &StatsSnapshot) {
        let (mr, mw) = (
            self.max_read_latency_ticks.max(o.max_read_latency_ticks),
            self.max_write_latency_ticks.max(o.max_write_latency_ticks),
        );
        *self += *o;
        self.max_read_latency_ticks = mr;
        self.max_write_latency_ticks = mw;
    }
}
