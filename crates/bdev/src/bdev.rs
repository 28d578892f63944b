//! The shared block device: geometry, identity, backend, claims, statistics and events.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use serde_json::Value;
use uuid::Uuid;
use vstor_reactor::Reactor;

use crate::channel::ChannelBackend;
use crate::io::IoType;
use crate::stats::{ChannelStats, StatsSnapshot};
use crate::BdevError;

/// What a backend module implements (SPDK's `spdk_bdev_fn_table`, reduced). Shared by all
/// reactors; per-reactor state lives in the channels it creates.
pub trait BdevBackend: std::any::Any + Send + Sync {
    /// `product_name` in `bdev_get_bdevs` (SPDK: "Malloc disk", "Null disk", "URING bdev", "AIO disk").
    fn product_name(&self) -> &'static str;

    /// Whether the backend can do `t` at all.
    fn io_type_supported(&self, t: IoType) -> bool;

    /// Creates this reactor's channel for the bdev. Runs on reactor `r`.
    fn create_channel(&self, bdev: &Arc<Bdev>, r: &mut Reactor) -> Result<Box<dyn ChannelBackend>, BdevError>;

    /// Whether writes may sit in a volatile cache until a flush (drives virtio-blk FLUSH, SCSI
    /// WCE and NVMe VWC).
    fn write_cache(&self) -> bool {
        false
    }

    /// Required alignment of buffer addresses and lengths, in bytes (O_DIRECT). 1 = none.
    fn buf_align(&self) -> usize {
        1
    }

    /// `driver_specific` in `bdev_get_bdevs`.
    fn driver_specific(&self) -> Value {
        Value::Object(Default::default())
    }

    /// The RPC call that recreates this bdev: (method, params). `None` if it cannot be replayed.
    fn config(&self, bdev: &Bdev) -> Option<(&'static str, Value)>;

    /// Called once when the bdev is unregistered.
    fn on_delete(&self) {}

    /// Makes completed writes durable from a control thread (used at shutdown).
    fn flush_sync(&self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Geometry and identity given when a bdev is created.
#[derive(Debug, Clone)]
pub struct BdevParams {
    pub name: String,
    pub uuid: Option<Uuid>,
    pub block_size: u32,
    pub num_blocks: u64,
    pub read_only: bool,
}

/// Something a bdev tells those who use it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BdevEvent {
    /// The capacity changed to this many blocks.
    Resized { num_blocks: u64 },
    /// The operator asked to delete the bdev (a `bdev_*_delete` RPC). Holders that can let go
    /// (a SCSI target: hot-remove the LUN and tell the guest) release their claims before the
    /// listener returns; the delete goes ahead only if no claim is left.
    RemoveRequested,
}

/// Who holds a bdev. A bdev with any claim cannot be deleted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    pub owner: String,
    pub exclusive: bool,
}

type Listener = (u64, Arc<dyn Fn(&BdevEvent) + Send + Sync>);

#[derive(Default)]
struct StatsSet {
    live: Vec<Weak<ChannelStats>>,
    /// Totals of channels that have been closed, so counts survive queue restarts.
    retired: StatsSnapshot,
}

/// A block device. Cheap to share (`Arc<Bdev>`); all I/O goes through a per-reactor
/// [`BdevChannel`](crate::BdevChannel).
pub struct Bdev {
    name: String,
    uuid: Uuid,
    block_size: u32,
    num_blocks: AtomicU64,
    read_only: bool,
    backend: Box<dyn BdevBackend>,
    claims: Mutex<Vec<Claim>>,
    stats: Mutex<StatsSet>,
    listeners: Mutex<Vec<Listener>>,
    next_listener: AtomicU64,
    /// Who is doing I/O now (owner, users) when several owners share the bdev.
    active: Mutex<Option<(String, u32)>>,
}

impl std::fmt::Debug for Bdev {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Bdev({} {}x{})", self.name, self.num_blocks(), self.block_size)
    }
}

/// Largest block size accepted (a power of two up to 64 KiB, like SPDK's limit for most modules).
pub const MAX_BLOCK_SIZE: u32 = 65536;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Bdev {
    /// Creates a bdev over `backend`. Validates the geometry.
    pub fn new(p: BdevParams, backend: Box<dyn BdevBackend>) -> Result<Arc<Bdev>, BdevError> {
        validate_name(&p.name)?;
        if p.block_size < 512 || p.block_size > MAX_BLOCK_SIZE || !p.block_size.is_power_of_two() {
            return Err(BdevError::InvalidParam {
                param: "block_size",
                msg: format!("{} is not a power of two between 512 and {MAX_BLOCK_SIZE}", p.block_size),
            });
        }
        if p.num_blocks == 0 {
            return Err(BdevError::InvalidParam { param: "num_blocks", msg: "must be greater than 0".into() });
        }
        if p.num_blocks.checked_mul(u64::from(p.block_size)).is_none() {
            return Err(BdevError::InvalidParam {
                param: "num_blocks",
                msg: format!("{} blocks of {} bytes overflow a 64-bit byte size", p.num_blocks, p.block_size),
            });
        }
        Ok(Arc::new(Bdev {
            name: p.name,
            uuid: p.uuid.unwrap_or_else(Uuid::new_v4),
            block_size: p.block_size,
            num_blocks: AtomicU64::new(p.num_blocks),
            read_only: p.read_only,
            backend,
            claims: Mutex::new(Vec::new()),
            stats: Mutex::new(StatsSet::default()),
            listeners: Mutex::new(Vec::new()),
            next_listener: AtomicU64::new(1),
            active: Mutex::new(None),
        }))
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn uuid(&self) -> Uuid {
        self.uuid
    }

    /// Logical block size in bytes.
    pub fn block_size(&self) -> u32 {
        self.block_size
    }

    /// Capacity in blocks (may change on resize).
    pub fn num_blocks(&self) -> u64 {
        self.num_blocks.load(Ordering::Acquire)
    }

    /// Capacity in bytes.
    pub fn size_bytes(&self) -> u64 {
        self.num_blocks().saturating_mul(u64::from(self.block_size))
    }

    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// Whether I/O of type `t` can be submitted (backend support and read-only state).
    pub fn io_type_supported(&self, t: IoType) -> bool {
        if self.read_only && t.modifies() {
            return false;
        }
        self.backend.io_type_supported(t)
    }

    pub fn product_name(&self) -> &'static str {
        self.backend.product_name()
    }

    pub fn write_cache(&self) -> bool {
        self.backend.write_cache()
    }

    pub fn buf_align(&self) -> usize {
        self.backend.buf_align()
    }

    pub fn backend(&self) -> &dyn BdevBackend {
        self.backend.as_ref()
    }

    pub fn driver_specific(&self) -> Value {
        self.backend.driver_specific()
    }

    /// The RPC call that recreates this bdev.
    pub fn config(&self) -> Option<(&'static str, Value)> {
        self.backend.config(self)
    }

    /// Current claims.
    pub fn claims(&self) -> Vec<Claim> {
        lock(&self.claims).clone()
    }

    /// Whether anyone holds the bdev.
    pub fn is_claimed(&self) -> bool {
        !lock(&self.claims).is_empty()
    }

    /// Takes a claim for `owner`. An exclusive claim excludes every other claim; shared claims
    /// coexist (used to serve one disk on two controllers during a migration handover).
    pub fn claim(&self, owner: &str, exclusive: bool) -> Result<(), BdevError> {
        let mut c = lock(&self.claims);
        if let Some(held) = c.iter().find(|c| c.exclusive || exclusive) {
            return Err(BdevError::Claimed { name: self.name.clone(), owner: held.owner.clone() });
        }
        c.push(Claim { owner: owner.to_string(), exclusive });
        Ok(())
    }

    /// Releases `owner`'s claim. Releasing a claim that is not held does nothing.
    pub fn release(&self, owner: &str) {
        let mut c = lock(&self.claims);
        if let Some(i) = c.iter().position(|c| c.owner == owner) {
            c.remove(i);
        }
    }

    /// Marks `owner` as the one doing I/O (counted: each queue activates once). Refused while
    /// another owner is active: with a bdev shared by two controllers (a migration handover)
    /// only one side may run at a time.
    pub fn activate(&self, owner: &str) -> Result<(), String> {
        let mut a = lock(&self.active);
        match a.as_mut() {
            None => {
                *a = Some((owner.to_string(), 1));
                Ok(())
            }
            Some((o, n)) if o == owner => {
                *n += 1;
                Ok(())
            }
            Some((o, _)) => Err(o.clone()),
        }
    }

    /// Ends one activation of `owner`.
    pub fn deactivate(&self, owner: &str) {
        let mut a = lock(&self.active);
        if let Some((o, n)) = a.as_mut() {
            if o == owner {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    *a = None;
                }
            }
        }
    }

    /// Changes the capacity and tells every listener.
    pub fn resize(&self, num_blocks: u64) -> Result<(), BdevError> {
        if num_blocks == 0 || num_blocks.checked_mul(u64::from(self.block_size)).is_none() {
            return Err(BdevError::InvalidParam {
                param: "new_size",
                msg: format!("{num_blocks} blocks is not a valid size"),
            });
        }
        self.num_blocks.store(num_blocks, Ordering::Release);
        self.notify(&BdevEvent::Resized { num_blocks });
        Ok(())
    }

    /// Registers `f` for events; returns an id for [`unlisten`](Self::unlisten).
    pub fn listen(&self, f: impl Fn(&BdevEvent) + Send + Sync + 'static) -> u64 {
        let id = self.next_listener.fetch_add(1, Ordering::Relaxed);
        lock(&self.listeners).push((id, Arc::new(f)));
        id
    }

    pub fn unlisten(&self, id: u64) {
        lock(&self.listeners).retain(|(i, _)| *i != id);
    }

    /// Calls every listener, outside the listener lock (a listener may unlisten itself).
    fn notify(&self, ev: &BdevEvent) {
        let listeners: Vec<_> = lock(&self.listeners).iter().map(|(_, f)| f.clone()).collect();
        for f in listeners {
            f(ev);
        }
    }

    /// Tells the bdev's users that the operator wants it deleted (see
    /// [`BdevEvent::RemoveRequested`]). Returns once every listener has run.
    pub fn request_remove(&self) {
        self.notify(&BdevEvent::RemoveRequested);
    }

    pub(crate) fn register_stats(&self, s: &Arc<ChannelStats>) {
        let mut set = lock(&self.stats);
        set.live.retain(|w| w.strong_count() > 0);
        set.live.push(Arc::downgrade(s));
    }

    pub(crate) fn retire_stats(&self, s: &Arc<ChannelStats>) {
        let mut set = lock(&self.stats);
        set.live.retain(|w| w.strong_count() > 0 && !std::ptr::eq(w.as_ptr(), Arc::as_ptr(s)));
        let snap = s.snapshot();
        set.retired.merge(&snap);
    }

    /// Totals over every channel, open or closed.
    pub fn stats(&self) -> StatsSnapshot {
        let set = lock(&self.stats);
        let mut total = set.retired;
        for s in set.live.iter().filter_map(Weak::upgrade) {
            total.merge(&s.snapshot());
        }
        total
    }

    /// Counters of each open channel, with its core.
    pub fn channel_stats(&self) -> Vec<(u64, StatsSnapshot)> {
        let set = lock(&self.stats);
        set.live.iter().filter_map(Weak::upgrade).map(|s| (s.core(), s.snapshot())).collect()
    }

    /// Resets statistics to zero (`bdev_reset_iostat`). Live channels are zeroed by their owner's
    /// next writes racing with this; the result is approximate, as in SPDK.
    pub fn reset_stats(&self) {
        let mut set = lock(&self.stats);
        set.retired = StatsSnapshot::default();
        for s in set.live.iter().filter_map(Weak::upgrade) {
            s.reset();
        }
    }

    pub(crate) fn on_delete(&self) {
        self.backend.on_delete();
    }
}

/// Bdev names: 1..=255 printable characters without whitespace or `/`.
pub fn validate_name(name: &str) -> Result<(), BdevError> {
    if name.is_empty() || name.len() > 255 {
        return Err(BdevError::InvalidParam { param: "name", msg: "must be 1 to 255 characters".into() });
    }
    if name.chars().any(|c| c.is_whitespace() || c.is_control() || c == '/') {
        return Err(BdevError::InvalidParam {
            param: "name",
            msg: format!("'{name}' contains whitespace, '/' or control characters"),
        });
    }
    Ok(())
}
