//! The PCI function: type-0 configuration space of an NVMe controller (class 01h/08h/02h), its
//! capabilities (Power Management at 40h, MSI-X at 50h, PCI Express at 60h), BAR sizing, and the
//! interrupt model (MSI-X table and pending bits in BAR4, INTx fallback).
//!
//! Configuration space is a byte array with a per-byte write mask and write-1-to-clear mask, so
//! BAR sizing (write all-ones, read the size mask back) falls out of the BAR's write mask. Side
//! effects of writes (MSI-X enable or function mask, INTx disable, Function Level Reset) are
//! reported to the caller, which owns the controller.
//!
//! Interrupt delivery: reactors call [`Interrupts::signal`] for a completion queue's vector. If
//! MSI-X is enabled and the vector (or the function) is masked, the pending bit is set instead and
//! delivered when it is unmasked. With MSI-X disabled, completion queues with unacknowledged
//! entries are INTx *sources*; the pin is asserted while any source exists and it is not masked
//! (INTMS bit 0, Command.INTx Disable). All state is atomics except the INTx level, whose rare
//! transitions take a mutex so the sink sees assert/deassert in order.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::spec::{hi32, lo32};

/// Where interrupts go. Implemented by the transport (eventfds of the VMM).
pub trait IrqSink: Send + Sync {
    /// Fire MSI-X vector `vector` (it is enabled and unmasked).
    fn msix(&self, vector: u16);
    /// Set the level of the INTx pin (INTA#).
    fn intx(&self, asserted: bool);
}

/// Size of the configuration space presented (PCI Express: 4 KiB).
pub const PCI_CONFIG_SIZE: u64 = 4096;

pub(crate) const CAP_PM: usize = 0x40;
pub(crate) const CAP_MSIX: usize = 0x50;
pub(crate) const CAP_PCIE: usize = 0x60;
const CAP_PM_U8: u8 = 0x40;
const CAP_MSIX_U8: u8 = 0x50;
const CAP_PCIE_U8: u8 = 0x60;

pub(crate) const CMD_MEMORY: u16 = 1 << 1;
pub(crate) const CMD_BUS_MASTER: u16 = 1 << 2;
pub(crate) const CMD_INTX_DISABLE: u16 = 1 << 10;

const MSIX_ENABLE: u16 = 1 << 15;
const MSIX_FMASK: u16 = 1 << 14;

/// BAR layout decided when the controller is created.
#[derive(Debug, Clone, Copy)]
pub(crate) struct BarLayout {
    pub bar0_size: u64,
    pub bar4_size: u64,
    pub pba_offset: u64,
    pub nvec: u16,
}

impl BarLayout {
    pub fn new(doorbell_bytes: u64, nvec: u16) -> BarLayout {
        let bar0_size = (0x1000 + doorbell_bytes).next_power_of_two().max(0x4000);
        let table = u64::from(nvec) * 16;
        let pba_offset = table.div_ceil(4096) * 4096;
        let pba = u64::from(nvec).div_ceil(64) * 8;
        let bar4_size = (pba_offset + pba.div_ceil(4096) * 4096).next_power_of_two().max(0x1000);
        BarLayout { bar0_size, bar4_size, pba_offset, nvec }
    }
}

/// PCI identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PciIds {
    pub vendor: u16,
    pub device: u16,
    pub subsystem_vendor: u16,
    pub subsystem: u16,
    pub revision: u8,
}

impl Default for PciIds {
    fn default() -> Self {
        // The vendor/device pair used by vfio-user NVMe targets (SPDK's); guest drivers bind by
        // class code and have no quirks for it.
        PciIds { vendor: 0x4e58, device: 0x0001, subsystem_vendor: 0x0000, subsystem: 0x0000, revision: 0 }
    }
}

/// What a configuration write changed.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct ConfigEffects {
    pub msix_changed: bool,
    pub intx_disable_changed: bool,
    pub flr: bool,
}

pub(crate) struct PciConfig {
    data: Box<[u8; 4096]>,
    wmask: Box<[u8; 4096]>,
    w1c: Box<[u8; 4096]>,
    ids: PciIds,
    layout: BarLayout,
}

impl PciConfig {
    pub fn new(ids: PciIds, layout: BarLayout) -> PciConfig {
        let mut c =
            PciConfig { data: Box::new([0; 4096]), wmask: Box::new([0; 4096]), w1c: Box::new([0; 4096]), ids, layout };
        c.reset();
        c
    }

    fn set16(&mut self, off: usize, v: u16) {
        self.data[off..off + 2].copy_from_slice(&v.to_le_bytes());
    }
    fn set32(&mut self, off: usize, v: u32) {
        self.data[off..off + 4].copy_from_slice(&v.to_le_bytes());
    }
    fn wm16(&mut self, off: usize, v: u16) {
        self.wmask[off..off + 2].copy_from_slice(&v.to_le_bytes());
    }
    fn wm32(&mut self, off: usize, v: u32) {
        self.wmask[off..off + 4].copy_from_slice(&v.to_le_bytes());
    }
    pub fn get16(&self, off: usize) -> u16 {
        u16::from_le_bytes([self.data[off], self.data[off + 1]])
    }

    /// Power-on / Function Level Reset state.
    pub fn reset(&mut self) {
        self.data.fill(0);
        self.wmask.fill(0);
        self.w1c.fill(0);
        let ids = self.ids;
        let l = self.layout;
        self.set16(0x00, ids.vendor);
        self.set16(0x02, ids.device);
        // Command: memory space, bus master, parity, SERR, INTx disable are writable.
        self.wm16(0x04, CMD_MEMORY | CMD_BUS_MASTER | (1 << 6) | (1 << 8) | CMD_INTX_DISABLE);
        // Status: capabilities list; error bits are write-1-to-clear.
        self.set16(0x06, 1 << 4);
        self.w1c[0x07] = 0xf9;
        self.data[0x08] = ids.revision;
        self.data[0x09] = 0x02; // programming interface: NVM Express
        self.data[0x0a] = 0x08; // subclass: non-volatile memory controller
        self.data[0x0b] = 0x01; // class: mass storage
        self.wmask[0x0c] = 0xff; // cache line size
                                 // BAR0: 64-bit memory, not prefetchable. BAR4 likewise (MSI-X table and PBA).
        for (bar, size) in [(0x10usize, l.bar0_size), (0x20, l.bar4_size)] {
            self.set32(bar, 0x4);
            self.wm32(bar, lo32(!(size - 1)) & !0xf);
            self.wm32(bar + 4, hi32(!(size - 1)));
        }
        self.set16(0x2c, ids.subsystem_vendor);
        self.set16(0x2e, ids.subsystem);
        self.data[0x34] = CAP_PM_U8;
        self.wmask[0x3c] = 0xff; // interrupt line
        self.data[0x3d] = 1; // INTA#

        // Power management: version 3, no PME; PMCSR power state writable, No_Soft_Reset set.
        self.data[CAP_PM] = 0x01;
        self.data[CAP_PM + 1] = CAP_MSIX_U8;
        self.set16(CAP_PM + 2, 0x0003);
        self.set16(CAP_PM + 4, 1 << 3);
        self.wm16(CAP_PM + 4, 0x0003);

        // MSI-X: table at BAR4 offset 0, PBA after it.
        self.data[CAP_MSIX] = 0x11;
        self.data[CAP_MSIX + 1] = CAP_PCIE_U8;
        self.set16(CAP_MSIX + 2, l.nvec - 1);
        self.wm16(CAP_MSIX + 2, MSIX_ENABLE | MSIX_FMASK);
        self.set32(CAP_MSIX + 4, 4);
        self.set32(CAP_MSIX + 8, lo32(l.pba_offset) | 4);

        // PCI Express capability, version 2, endpoint.
        self.data[CAP_PCIE] = 0x10;
        self.data[CAP_PCIE + 1] = 0;
        self.set16(CAP_PCIE + 2, 0x0002);
        // Device capabilities: 128-byte max payload, role-based error reporting, FLR.
        self.set32(CAP_PCIE + 4, (1 << 15) | (1 << 28));
        // Device control: relaxed ordering, no snoop, 512-byte max read request.
        self.set16(CAP_PCIE + 8, 0x2810);
        self.wm16(CAP_PCIE + 8, 0x781f);
        self.w1c[CAP_PCIE + 0xa] = 0x0f;
        // Link: 2.5 GT/s x1.
        self.set32(CAP_PCIE + 0xc, 0x0000_0011);
        self.wm16(CAP_PCIE + 0x10, 0x00cb);
        self.set16(CAP_PCIE + 0x12, 0x0011);
        self.wm16(CAP_PCIE + 0x28, 0x0010);
        self.set32(CAP_PCIE + 0x2c, 1 << 1);
        self.set16(CAP_PCIE + 0x30, 0x0001);
        self.wm16(CAP_PCIE + 0x30, 0x000f);
    }

    pub fn command(&self) -> u16 {
        self.get16(0x04)
    }

    pub fn msix_control(&self) -> u16 {
        self.get16(CAP_MSIX + 2)
    }

    /// Reads `buf.len()` bytes at `offset`; bytes past the space read as 0xff. `intx` is the
    /// current INTx status (Status bit 3).
    pub fn read(&self, offset: u64, buf: &mut [u8], intx: bool) {
        for (i, b) in buf.iter_mut().enumerate() {
            let off = offset.checked_add(i as u64).and_then(|o| usize::try_from(o).ok()).filter(|&o| o < 4096);
            *b = match off {
                Some(0x06) => self.data[0x06] | if intx { 1 << 3 } else { 0 },
                Some(o) => self.data[o],
                None => 0xff,
            };
        }
    }

    /// Applies a write and reports its side effects.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> ConfigEffects {
        let cmd_before = self.command();
        let msix_before = self.msix_control();
        let mut fx = ConfigEffects::default();
        for (i, &v) in data.iter().enumerate() {
            let Some(o) = offset.checked_add(i as u64).and_then(|o| usize::try_from(o).ok()).filter(|&o| o < 4096)
            else {
                break;
            };
            if o == CAP_PCIE + 9 && v & 0x80 != 0 {
                fx.flr = true;
            }
            let old = self.data[o];
            let mut new = (old & !self.wmask[o]) | (v & self.wmask[o]);
            new &= !(v & self.w1c[o]);
            self.data[o] = new;
        }
        // Only D0 and D3hot exist: a write of D1/D2 leaves the state as it was.
        let pmcsr = self.get16(CAP_PM + 4);
        if matches!(pmcsr & 3, 1 | 2) {
            self.set16(CAP_PM + 4, pmcsr & !3);
        }
        fx.msix_changed = self.msix_control() != msix_before;
        fx.intx_disable_changed = (self.command() ^ cmd_before) & CMD_INTX_DISABLE != 0;
        fx
    }
}

struct Intx {
    sources: u32,
    intms: bool,
    disabled: bool,
    asserted: bool,
}

/// MSI-X table, pending bits and the INTx level.
pub(crate) struct Interrupts {
    sink: Arc<dyn IrqSink>,
    nvec: u16,
    /// Per vector: message address low, high, data, vector control.
    table: Box<[[AtomicU32; 4]]>,
    pba: Box<[AtomicU64]>,
    enabled: AtomicBool,
    fmask: AtomicBool,
    intx: Mutex<Intx>,
}

impl Interrupts {
    pub fn new(sink: Arc<dyn IrqSink>, nvec: u16) -> Interrupts {
        let table = (0..nvec).map(|_| Default::default()).collect::<Vec<[AtomicU32; 4]>>().into_boxed_slice();
        let pba = (0..usize::from(nvec).div_ceil(64)).map(|_| AtomicU64::new(0)).collect();
        let irq = Interrupts {
            sink,
            nvec,
            table,
            pba,
            enabled: AtomicBool::new(false),
            fmask: AtomicBool::new(false),
            intx: Mutex::new(Intx { sources: 0, intms: false, disabled: false, asserted: false }),
        };
        irq.reset();
        irq
    }

    /// Function reset: every vector masked, nothing pending, MSI-X off, INTx deasserted.
    pub fn reset(&self) {
        for e in self.table.iter() {
            for (i, w) in e.iter().enumerate() {
                w.store(if i == 3 { 1 } else { 0 }, Ordering::SeqCst);
            }
        }
        for p in self.pba.iter() {
            p.store(0, Ordering::SeqCst);
        }
        self.enabled.store(false, Ordering::SeqCst);
        self.fmask.store(false, Ordering::SeqCst);
        let mut x = self.lock_intx();
        x.sources = 0;
        x.intms = false;
        x.disabled = false;
        self.update_intx(&mut x);
    }

    pub fn nvec(&self) -> u16 {
        self.nvec
    }

    pub fn msix_enabled(&self) -> bool {
        self.enabled.load(Ordering::SeqCst)
    }

    fn masked(&self, v: u16) -> bool {
        self.fmask.load(Ordering::SeqCst) || self.table[usize::from(v)][3].load(Ordering::SeqCst) & 1 != 0
    }

    fn pba_bit(v: u16) -> (usize, u64) {
        (usize::from(v) / 64, 1u64 << (v % 64))
    }

    fn take_pending(&self, v: u16) -> bool {
        let (w, bit) = Self::pba_bit(v);
        self.pba[w].fetch_and(!bit, Ordering::SeqCst) & bit != 0
    }

    /// Whether vector `v`'s pending bit is set.
    pub fn pending(&self, v: u16) -> bool {
        let (w, bit) = Self::pba_bit(v);
        v < self.nvec && self.pba[w].load(Ordering::SeqCst) & bit != 0
    }

    /// Fires MSI-X vector `v`, or sets its pending bit if masked. Returns false when MSI-X is off
    /// (the caller then uses INTx).
    pub fn signal(&self, v: u16) -> bool {
        if !self.msix_enabled() {
            return false;
        }
        if v >= self.nvec {
            return true;
        }
        if !self.masked(v) {
            self.sink.msix(v);
            return true;
        }
        let (w, bit) = Self::pba_bit(v);
        self.pba[w].fetch_or(bit, Ordering::SeqCst);
        // An unmask may have raced with us: whoever clears the pending bit delivers it.
        if !self.masked(v) && self.take_pending(v) {
            self.sink.msix(v);
        }
        true
    }

    /// Delivers vector `v` if it is pending and now deliverable.
    fn replay(&self, v: u16) {
        if self.msix_enabled() && !self.masked(v) && self.take_pending(v) {
            self.sink.msix(v);
        }
    }

    /// Applies the MSI-X Message Control of configuration space.
    pub fn set_msix_control(&self, ctrl: u16) {
        let en = ctrl & MSIX_ENABLE != 0;
        self.enabled.store(en, Ordering::SeqCst);
        self.fmask.store(ctrl & MSIX_FMASK != 0, Ordering::SeqCst);
        {
            let mut x = self.lock_intx();
            self.update_intx(&mut x);
        }
        if en {
            for v in 0..self.nvec {
                self.replay(v);
            }
        }
    }

    /// Sets or clears the mask bit of vector `v` (as a table write would).
    pub fn set_vector_masked(&self, v: u16, masked: bool) {
        if v >= self.nvec {
            return;
        }
        let ctl = &self.table[usize::from(v)][3];
        if masked {
            ctl.fetch_or(1, Ordering::SeqCst);
        } else {
            ctl.fetch_and(!1, Ordering::SeqCst);
            self.replay(v);
        }
    }

    /// Reads BAR4 (MSI-X table, then PBA at `pba_offset`).
    pub fn bar_read(&self, layout: &BarLayout, offset: u64, buf: &mut [u8]) {
        for (i, b) in buf.iter_mut().enumerate() {
            let Some(o) = offset.checked_add(i as u64) else {
                *b = 0;
                continue;
            };
            let dword = self.dword(layout, o & !3);
            *b = dword.to_le_bytes()[usize::try_from(o & 3).unwrap_or(0)];
        }
    }

    fn dword(&self, layout: &BarLayout, o: u64) -> u32 {
        let table_len = u64::from(self.nvec) * 16;
        if o < table_len {
            let (v, w) = (o / 16, (o % 16) / 4);
            return self.table[usize::try_from(v).unwrap_or(0)][usize::try_from(w).unwrap_or(0)].load(Ordering::SeqCst);
        }
        if o >= layout.pba_offset {
            let rel = o - layout.pba_offset;
            if let Some(p) = usize::try_from(rel / 8).ok().and_then(|i| self.pba.get(i)) {
                let v = p.load(Ordering::SeqCst);
                return if rel.is_multiple_of(8) { lo32(v) } else { hi32(v) };
            }
        }
        0
    }

    /// Writes BAR4: dword or qword writes to the table; the PBA is read-only.
    pub fn bar_write(&self, offset: u64, data: &[u8]) {
        if !(data.len() == 4 || data.len() == 8) || !offset.is_multiple_of(4) {
            return;
        }
        let table_len = u64::from(self.nvec) * 16;
        for (k, chunk) in data.chunks_exact(4).enumerate() {
            let Some(o) = offset.checked_add(k as u64 * 4) else { return };
            if o >= table_len {
                continue;
            }
            let val = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
            let v = u16::try_from(o / 16).unwrap_or(0);
            let w = usize::try_from((o % 16) / 4).unwrap_or(0);
            if w == 3 {
                self.set_vector_masked(v, val & 1 != 0);
            } else {
                self.table[usize::from(v)][w].store(val, Ordering::SeqCst);
            }
        }
    }

    fn lock_intx(&self) -> std::sync::MutexGuard<'_, Intx> {
        self.intx.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn update_intx(&self, x: &mut Intx) {
        let level = x.sources > 0 && !x.intms && !x.disabled && !self.msix_enabled();
        if level != x.asserted {
            x.asserted = level;
            self.sink.intx(level);
        }
    }

    /// A completion queue starts (`true`) or stops being an INTx source.
    pub fn intx_source(&self, active: bool) {
        let mut x = self.lock_intx();
        if active {
            x.sources += 1;
        } else {
            x.sources = x.sources.saturating_sub(1);
        }
        self.update_intx(&mut x);
    }

    /// INTMS bit 0 (pin-based interrupts masked by the controller registers).
    pub fn set_intms(&self, masked: bool) {
        let mut x = self.lock_intx();
        x.intms = masked;
        self.update_intx(&mut x);
    }

    /// Command register INTx Disable.
    pub fn set_intx_disabled(&self, disabled: bool) {
        let mut x = self.lock_intx();
        x.disabled = disabled;
        self.update_intx(&mut x);
    }

    /// Whether an INTx source exists (Status.Interrupt Status), regardless of masking.
    pub fn intx_status(&self) -> bool {
        self.lock_intx().sources > 0
    }
}
