//! The bdev registry: every bdev by name (and UUID), with delete refused while claimed.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use crate::bdev::Bdev;
use crate::BdevError;

/// All bdevs of a vstor instance. Control-plane only: the I/O path holds `Arc<Bdev>` directly.
#[derive(Default)]
pub struct BdevRegistry {
    // BTreeMap keeps listings in a stable (sorted) order, as operators expect from RPC output.
    bdevs: Mutex<BTreeMap<String, Arc<Bdev>>>,
    /// Creation order, so `framework_get_config` replays bdevs in the order they were made.
    order: Mutex<Vec<String>>,
}

impl std::fmt::Debug for BdevRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "BdevRegistry({} bdevs)", self.lock().len())
    }
}

impl BdevRegistry {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Arc<Bdev>>> {
        self.bdevs.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn order(&self) -> std::sync::MutexGuard<'_, Vec<String>> {
        self.order.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds `bdev`. Names and UUIDs must be unique.
    pub fn register(&self, bdev: Arc<Bdev>) -> Result<Arc<Bdev>, BdevError> {
        let mut m = self.lock();
        if m.contains_key(bdev.name()) {
            return Err(BdevError::Exists(bdev.name().to_string()));
        }
        if let Some(other) = m.values().find(|b| b.uuid() == bdev.uuid()) {
            return Err(BdevError::InvalidParam {
                param: "uuid",
                msg: format!("{} is already used by bdev {}", bdev.uuid(), other.name()),
            });
        }
        tracing::info!(
            name = bdev.name(),
            product = bdev.product_name(),
            blocks = bdev.num_blocks(),
            block_size = bdev.block_size(),
            "bdev created"
        );
        m.insert(bdev.name().to_string(), bdev.clone());
        self.order().push(bdev.name().to_string());
        Ok(bdev)
    }

    /// Finds a bdev by name or by UUID (SPDK accepts either where a bdev name is expected).
    pub fn get(&self, name: &str) -> Option<Arc<Bdev>> {
        let m = self.lock();
        if let Some(b) = m.get(name) {
            return Some(b.clone());
        }
        let u = uuid::Uuid::parse_str(name).ok()?;
        m.values().find(|b| b.uuid() == u).cloned()
    }

    /// Like [`get`](Self::get), with a "not found" error naming the bdev.
    pub fn lookup(&self, name: &str) -> Result<Arc<Bdev>, BdevError> {
        self.get(name).ok_or_else(|| BdevError::NotFound(name.to_string()))
    }

    /// Every bdev, sorted by name.
    pub fn list(&self) -> Vec<Arc<Bdev>> {
        self.lock().values().cloned().collect()
    }

    /// Every bdev in creation order.
    pub fn list_in_creation_order(&self) -> Vec<Arc<Bdev>> {
        let m = self.lock();
        self.order().iter().filter_map(|n| m.get(n).cloned()).collect()
    }

    /// Removes `name` if `accept` approves of its backend (so `bdev_malloc_delete` cannot delete
    /// a null bdev). Refused while the bdev is claimed.
    ///
    /// A claimed bdev's users are first asked to let go ([`Bdev::request_remove`]): a SCSI target
    /// hot-removes its LUN, say. Claims that remain (a vhost-blk controller, an NVMe namespace)
    /// refuse the delete with [`BdevError::Claimed`] naming the holder.
    pub fn unregister(&self, name: &str, product: &str) -> Result<Arc<Bdev>, BdevError> {
        let b = self.lock().get(name).cloned().ok_or_else(|| BdevError::NotFound(name.to_string()))?;
        if b.product_name() != product {
            return Err(BdevError::WrongType {
                name: name.to_string(),
                is: b.product_name(),
                expected: product.to_string(),
            });
        }
        if b.is_claimed() {
            // Without the registry lock: holders may take a while (in-flight I/O drains).
            b.request_remove();
        }
        let mut m = self.lock();
        if !m.get(name).is_some_and(|x| Arc::ptr_eq(x, &b)) {
            return Err(BdevError::NotFound(name.to_string()));
        }
        if let Some(c) = b.claims().first() {
            return Err(BdevError::Claimed { name: name.to_string(), owner: c.owner.clone() });
        }
        m.remove(name);
        self.order().retain(|n| n != name);
        drop(m);
        b.on_delete();
        tracing::info!(name, "bdev deleted");
        Ok(b)
    }
}
