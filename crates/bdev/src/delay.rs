//! `delay` bdevs (SPDK's `bdev_delay_*`): a virtual bdev that holds each I/O for a set latency
//! before passing it to its base bdev. For tests and demonstrations of slow storage: requests
//! stay in flight long enough to be caught by a restart, a migration or a reset.
//!
//! Latencies are in microseconds: reads wait `avg_read`, everything else `avg_write`; one I/O in
//! a hundred waits the p99 value instead.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::rc::{Rc, Weak};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use uuid::Uuid;
use vstor_reactor::{clock, PollStatus, Poller, Reactor};

use crate::{
    Bdev, BdevBackend, BdevChannel, BdevError, BdevParams, ChannelBackend, IoCallback, IoOp, IoResult, IoSink, IoToken,
    IoType,
};

/// Product name, as SPDK prints it.
pub const PRODUCT: &str = "delay";

/// Which latency to change (`bdev_delay_update_latency`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LatencyType {
    AvgRead,
    P99Read,
    AvgWrite,
    P99Write,
}

impl std::str::FromStr for LatencyType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "avg_read" => LatencyType::AvgRead,
            "p99_read" => LatencyType::P99Read,
            "avg_write" => LatencyType::AvgWrite,
            "p99_write" => LatencyType::P99Write,
            o => return Err(format!("'{o}' is not one of avg_read, p99_read, avg_write, p99_write")),
        })
    }
}

type Lat = Arc<[AtomicU64; 4]>;

struct DelayBackend {
    base: Arc<Bdev>,
    owner: String,
    lat: Lat,
}

impl DelayBackend {
    fn us(&self, t: LatencyType) -> u64 {
        self.lat[t as usize].load(Ordering::Relaxed)
    }
}

impl BdevBackend for DelayBackend {
    fn product_name(&self) -> &'static str {
        PRODUCT
    }

    fn io_type_supported(&self, t: IoType) -> bool {
        self.base.io_type_supported(t)
    }

    fn create_channel(&self, bdev: &Arc<Bdev>, r: &mut Reactor) -> Result<Box<dyn ChannelBackend>, BdevError> {
        let base = BdevChannel::new(self.base.clone(), r)?;
        let list = r.local_or_insert_with(|r| {
            let list: Rc<RefCell<Vec<Weak<DelayChannel>>>> = Rc::default();
            r.add_poller(Box::new(DelayPoller { channels: list.clone() }));
            DelayList(list)
        });
        let _ = bdev;
        let me = Rc::new(DelayChannel {
            st: RefCell::new(ChanState {
                base,
                waiting: VecDeque::new(),
                tokens: Vec::new(),
                free: Vec::new(),
                seq: 0,
            }),
            lat: self.lat.clone(),
        });
        list.0.borrow_mut().push(Rc::downgrade(&me));
        Ok(Box::new(DelayHandle(me)))
    }

    fn write_cache(&self) -> bool {
        self.base.write_cache()
    }

    fn buf_align(&self) -> usize {
        self.base.buf_align()
    }

    fn driver_specific(&self) -> Value {
        json!({ "delay": {
            "base_bdev_name": self.base.name(),
            "avg_read_latency": self.us(LatencyType::AvgRead),
            "p99_read_latency": self.us(LatencyType::P99Read),
            "avg_write_latency": self.us(LatencyType::AvgWrite),
            "p99_write_latency": self.us(LatencyType::P99Write),
        }})
    }

    fn config(&self, bdev: &Bdev) -> Option<(&'static str, Value)> {
        Some((
            "bdev_delay_create",
            json!({
                "name": bdev.name(),
                "base_bdev_name": self.base.name(),
                "uuid": bdev.uuid().to_string(),
                "avg_read_latency": self.us(LatencyType::AvgRead),
                "p99_read_latency": self.us(LatencyType::P99Read),
                "avg_write_latency": self.us(LatencyType::AvgWrite),
                "p99_write_latency": self.us(LatencyType::P99Write),
            }),
        ))
    }

    fn on_delete(&self) {
        self.base.release(&self.owner);
    }

    fn flush_sync(&self) -> std::io::Result<()> {
        self.base.backend().flush_sync()
    }
}

struct ChanState {
    base: BdevChannel,
    /// I/O held back, in submission order, with the tick at which it may go.
    waiting: VecDeque<(u64, IoOp, IoToken)>,
    tokens: Vec<Option<IoToken>>,
    free: Vec<usize>,
    seq: u64,
}

struct DelayChannel {
    st: RefCell<ChanState>,
    lat: Lat,
}

impl IoSink for DelayChannel {
    fn io_done(&self, tag: u64, result: IoResult) {
        let token = {
            let mut st = self.st.borrow_mut();
            let i = usize::try_from(tag).unwrap_or(usize::MAX);
            let t = st.tokens.get_mut(i).and_then(Option::take);
            if t.is_some() {
                st.free.push(i);
            }
            t
        };
        if let Some(t) = token {
            t.complete(result);
        }
    }
}

struct DelayHandle(Rc<DelayChannel>);

impl ChannelBackend for DelayHandle {
    fn submit(&mut self, op: IoOp, token: IoToken) {
        let lat = |t: LatencyType| self.0.lat[t as usize].load(Ordering::Relaxed);
        let mut st = self.0.st.borrow_mut();
        st.seq += 1;
        let tail = st.seq.is_multiple_of(100);
        let us = match (op.io_type(), tail) {
            (IoType::Read, false) => lat(LatencyType::AvgRead),
            (IoType::Read, true) => lat(LatencyType::P99Read),
            (_, false) => lat(LatencyType::AvgWrite),
            (_, true) => lat(LatencyType::P99Write),
        };
        let due = clock::ticks().wrapping_add(clock::duration_to_ticks(Duration::from_micros(us)));
        st.waiting.push_back((due, op, token));
    }
}

/// Reactor-local list of the delay channels on this reactor.
struct DelayList(Rc<RefCell<Vec<Weak<DelayChannel>>>>);

/// Releases held I/O whose time has come, for every delay channel on the reactor.
struct DelayPoller {
    channels: Rc<RefCell<Vec<Weak<DelayChannel>>>>,
}

impl Poller for DelayPoller {
    fn poll(&mut self) -> PollStatus {
        let now = clock::ticks();
        let mut busy = false;
        let live: Vec<Rc<DelayChannel>> = {
            let mut v = self.channels.borrow_mut();
            v.retain(|w| w.strong_count() > 0);
            v.iter().filter_map(Weak::upgrade).collect()
        };
        for ch in live {
            let mut st = ch.st.borrow_mut();
            while st.waiting.front().is_some_and(|(due, _, _)| *due <= now) {
                let Some((_, op, token)) = st.waiting.pop_front() else { break };
                let slot = match st.free.pop() {
                    Some(i) => i,
                    None => {
                        st.tokens.push(None);
                        st.tokens.len() - 1
                    }
                };
                st.tokens[slot] = Some(token);
                let sink: Rc<dyn IoSink> = ch.clone();
                st.base.submit(op, IoCallback { sink, tag: slot as u64 });
                busy = true;
            }
            // Keep polling while I/O waits, so a sleeping reactor does not hold it forever.
            busy |= !st.waiting.is_empty();
        }
        PollStatus::from_work(busy)
    }

    fn arm(&mut self) -> bool {
        self.channels.borrow().iter().filter_map(Weak::upgrade).any(|c| !c.st.borrow().waiting.is_empty())
    }

    fn name(&self) -> &str {
        "bdev_delay"
    }
}

/// Latencies in microseconds: average and p99 for reads, then for writes.
#[derive(Debug, Clone, Copy, Default)]
pub struct Latencies {
    pub avg_read: u64,
    pub p99_read: u64,
    pub avg_write: u64,
    pub p99_write: u64,
}

/// Creates a delay bdev over `base` (claimed exclusively).
pub fn create(name: &str, uuid: Option<Uuid>, base: Arc<Bdev>, l: Latencies) -> Result<Arc<Bdev>, BdevError> {
    let owner = format!("delay:{name}");
    base.claim(&owner, true)?;
    let p = BdevParams {
        name: name.to_string(),
        uuid,
        block_size: base.block_size(),
        num_blocks: base.num_blocks(),
        read_only: base.read_only(),
    };
    let backend = DelayBackend {
        base: base.clone(),
        owner: owner.clone(),
        lat: Arc::new([
            AtomicU64::new(l.avg_read),
            AtomicU64::new(l.p99_read),
            AtomicU64::new(l.avg_write),
            AtomicU64::new(l.p99_write),
        ]),
    };
    Bdev::new(p, Box::new(backend)).inspect_err(|_| base.release(&owner))
}

/// Changes one latency of a delay bdev.
pub fn update(bdev: &Bdev, t: LatencyType, us: u64) -> Result<(), BdevError> {
    let b: &dyn std::any::Any = bdev.backend();
    let d = b.downcast_ref::<DelayBackend>().ok_or_else(|| BdevError::WrongType {
        name: bdev.name().to_string(),
        is: bdev.product_name(),
        expected: PRODUCT.to_string(),
    })?;
    d.lat[t as usize].store(us, Ordering::Relaxed);
    Ok(())
}
