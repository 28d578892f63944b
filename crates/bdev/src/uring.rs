//! `uring` bdevs: a file or block device through io_uring. Also serves SPDK's `aio` bdevs (same
//! engine, different product name and RPC).
//!
//! Each reactor has one ring (created with the first uring channel there), shared by every uring
//! bdev on that reactor. A poller submits queued SQEs and reaps completions; in interrupt or
//! adaptive mode the ring's eventfd wakes the reactor. Buffers (guest memory or bounce buffers)
//! and iovec arrays stay owned by the engine's slot for the op until its completion arrives.
//!
//! Mapping: read/write → `readv`/`writev` (`RWF_DSYNC` for FUA), flush → `fdatasync`, unmap →
//! `fallocate(PUNCH_HOLE|KEEP_SIZE)`, write-zeroes → `fallocate(ZERO_RANGE|KEEP_SIZE)`, falling back
//! to writing zeroes when the file system cannot. Files are opened `O_DIRECT` when allowed; buffers
//! that are not aligned as O_DIRECT needs go through an aligned bounce buffer.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use io_uring::{opcode, squeue, types, IoUring};
use serde_json::{json, Value};
use uuid::Uuid;
use vstor_reactor::{EpollHandle, PollStatus, Poller, Reactor};

use crate::mem::AlignedBuf;
use crate::{
    Bdev, BdevBackend, BdevError, BdevParams, BlockRange, ChannelBackend, IoError, IoOp, IoResult, IoToken, IoType,
    IoVecs,
};

/// Product name of `bdev_uring_create` bdevs, as SPDK prints it.
pub const PRODUCT_URING: &str = "URING bdev";
/// Product name of `bdev_aio_create` bdevs, as SPDK prints it.
pub const PRODUCT_AIO: &str = "AIO disk";

/// Entries in each reactor's submission queue.
const SQ_ENTRIES: u32 = 1024;
/// Ops in flight per reactor before new ones wait in the backlog.
const MAX_OPS: usize = 2048;
/// Completions handled per poll, so one busy ring cannot starve the reactor's other pollers.
const REAP_BATCH: usize = 256;
/// Chunk size and parallelism of the write-zeroes fallback.
const ZERO_CHUNK: usize = 1 << 20;
const ZERO_PARALLEL: u32 = 4;
/// Linux's IOV_MAX: longer lists go through a bounce buffer.
const IOV_MAX: usize = 1024;

/// Which RPC made the bdev (they differ only in name and config).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavor {
    Uring,
    Aio,
}

/// What `bdev_uring_create` / `bdev_aio_create` ask for.
#[derive(Debug, Clone)]
pub struct UringOptions {
    pub name: String,
    pub filename: String,
    /// Logical block size; defaults to the device's (512 for regular files).
    pub block_size: Option<u32>,
    pub uuid: Option<Uuid>,
    pub readonly: bool,
    pub flavor: Flavor,
    /// SPDK aio's `fallocate`: only then are unmap and write-zeroes offered. Always on for uring.
    pub fallocate: bool,
}

struct FileInfo {
    file: File,
    direct: bool,
    /// Required alignment of offsets/lengths and of buffer addresses under O_DIRECT.
    offset_align: u32,
    mem_align: usize,
    size: u64,
    is_blockdev: bool,
}

struct UringBackend {
    opts: UringOptions,
    file: File,
    direct: bool,
    mem_align: usize,
    /// Cleared when the file system refuses `FALLOC_FL_ZERO_RANGE`; write-zeroes then writes zeroes.
    zero_range_ok: AtomicBool,
}

impl BdevBackend for UringBackend {
    fn product_name(&self) -> &'static str {
        match self.opts.flavor {
            Flavor::Uring => PRODUCT_URING,
            Flavor::Aio => PRODUCT_AIO,
        }
    }

    fn io_type_supported(&self, t: IoType) -> bool {
        match t {
            IoType::Read | IoType::Write | IoType::Flush | IoType::Reset => true,
            IoType::Unmap | IoType::WriteZeroes => self.opts.fallocate,
        }
    }

    fn create_channel(&self, _bdev: &Arc<Bdev>, r: &mut Reactor) -> Result<Box<dyn ChannelBackend>, BdevError> {
        let engine = engine_for(r)?;
        Ok(Box::new(UringChannel {
            engine,
            fd: self.file.as_raw_fd(),
            // The backend (and so the file) outlives every channel: the Bdev owns the backend and
            // each channel's owner holds the Arc<Bdev>. The fd is kept alive by `keep`.
            keep: _bdev.clone(),
            mem_align: if self.direct { self.mem_align } else { 1 },
            zero_flag: self as *const UringBackend,
        }))
    }

    fn write_cache(&self) -> bool {
        // Both the page cache and a device's own cache may hold completed writes until fdatasync.
        true
    }

    fn flush_sync(&self) -> std::io::Result<()> {
        self.file.sync_data()
    }

    fn buf_align(&self) -> usize {
        if self.direct {
            self.mem_align
        } else {
            1
        }
    }

    fn driver_specific(&self) -> Value {
        let key = match self.opts.flavor {
            Flavor::Uring => "uring",
            Flavor::Aio => "aio",
        };
        json!({ key: { "filename": self.opts.filename, "o_direct": self.direct, "readonly": self.opts.readonly } })
    }

    fn config(&self, bdev: &Bdev) -> Option<(&'static str, Value)> {
        let mut p = json!({
            "name": bdev.name(),
            "filename": self.opts.filename,
            "block_size": bdev.block_size(),
            "uuid": bdev.uuid().to_string(),
        });
        match self.opts.flavor {
            Flavor::Uring => Some(("bdev_uring_create", p)),
            Flavor::Aio => {
                p["readonly"] = json!(self.opts.readonly);
                p["fallocate"] = json!(self.opts.fallocate);
                Some(("bdev_aio_create", p))
            }
        }
    }
}

const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;

fn open_file(opts: &UringOptions) -> Result<FileInfo, BdevError> {
    let ctx = |what: &str| format!("{what} '{}' for bdev {}", opts.filename, opts.name);
    let open = |direct: bool| {
        let mut o = std::fs::OpenOptions::new();
        o.read(true).write(!opts.readonly);
        if direct {
            o.custom_flags(libc::O_DIRECT);
        }
        o.open(&opts.filename)
    };
    let (file, direct) = match open(true) {
        Ok(f) => (f, true),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            tracing::info!(file = opts.filename, "O_DIRECT not supported here; using the page cache");
            (open(false).map_err(|source| BdevError::Io { context: ctx("opening"), source })?, false)
        }
        Err(source) => return Err(BdevError::Io { context: ctx("opening"), source }),
    };
    let md = file.metadata().map_err(|source| BdevError::Io { context: ctx("inspecting"), source })?;
    let ft = md.file_type();
    let is_blockdev = ft.is_block_device();
    if !is_blockdev && !ft.is_file() {
        return Err(BdevError::InvalidParam {
            param: "filename",
            msg: format!("'{}' is neither a regular file nor a block device", opts.filename),
        });
    }
    let (size, dev_block) = if is_blockdev {
        let mut size: u64 = 0;
        // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which is valid.
        if unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64, &mut size) } != 0 {
            return Err(BdevError::Io { context: ctx("sizing"), source: std::io::Error::last_os_error() });
        }
        let mut bs: libc::c_int = 0;
        // SAFETY: BLKSSZGET writes one int through the pointer, which is valid.
        if unsafe { libc::ioctl(file.as_raw_fd(), libc::BLKSSZGET, &mut bs) } != 0 {
            bs = 512;
        }
        (size, u32::try_from(bs).unwrap_or(512))
    } else {
        (md.len(), 512)
    };
    let (offset_align, mem_align) = if direct { probe_direct_alignment(&file, dev_block) } else { (dev_block, 1) };
    Ok(FileInfo { file, direct, offset_align, mem_align, size, is_blockdev })
}

/// Finds the O_DIRECT alignment by trying reads: offsets of 512 then 4096 bytes; buffers aligned
/// to 512 then 4096. Files smaller than one block answer with the defaults.
fn probe_direct_alignment(file: &File, dev_block: u32) -> (u32, usize) {
    let Some(mut buf) = AlignedBuf::zeroed(8192, 4096) else {
        return (dev_block.max(4096), 4096);
    };
    let try_read = |ptr: *mut u8, len: usize| -> bool {
        // SAFETY: `ptr..ptr+len` lies inside `buf` (callers pass len <= 4096 from offsets <= 512).
        let r = unsafe { libc::pread(file.as_raw_fd(), ptr.cast(), len, 0) };
        r >= 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::EINVAL)
    };
    let base = buf.as_mut_ptr();
    let offset_align: u32 = if dev_block <= 512 && try_read(base, 512) { 512 } else { dev_block.max(4096) };
    let len = offset_align as usize;
    // SAFETY: base + 512 + len <= base + 8192 since len <= 4096... for larger device blocks we
    // skip the probe.
    let mem_align = if len <= 4096 && try_read(unsafe { base.add(512) }, len) { 512 } else { 4096 };
    (offset_align, mem_align)
}

/// Opens the file and creates the bdev (not yet registered).
pub fn create(mut opts: UringOptions) -> Result<Arc<Bdev>, BdevError> {
    crate::validate_name(&opts.name)?;
    let info = open_file(&opts)?;
    if opts.flavor == Flavor::Uring {
        opts.fallocate = true;
    }
    let block_size = opts.block_size.unwrap_or(info.offset_align.max(512));
    if block_size < info.offset_align || !block_size.is_multiple_of(info.offset_align) {
        return Err(BdevError::InvalidParam {
            param: "block_size",
            msg: format!(
                "{block_size} is smaller than or not a multiple of the {} bytes '{}' needs for direct I/O",
                info.offset_align, opts.filename
            ),
        });
    }
    let num_blocks = info.size / u64::from(block_size);
    if num_blocks == 0 {
        return Err(BdevError::InvalidParam {
            param: "filename",
            msg: format!("'{}' is {} bytes, smaller than one {block_size}-byte block", opts.filename, info.size),
        });
    }
    tracing::debug!(
        file = opts.filename,
        direct = info.direct,
        offset_align = info.offset_align,
        mem_align = info.mem_align,
        blockdev = info.is_blockdev,
        "opened"
    );
    let params =
        BdevParams { name: opts.name.clone(), uuid: opts.uuid, block_size, num_blocks, read_only: opts.readonly };
    let backend = UringBackend {
        file: info.file,
        direct: info.direct,
        mem_align: info.mem_align,
        zero_range_ok: AtomicBool::new(true),
        opts,
    };
    Bdev::new(params, Box::new(backend))
}

// ---------------------------------------------------------------------------------------------
// Per-reactor engine

enum Kind {
    Read,
    Write {
        fua: bool,
    },
    Fsync,
    Unmap,
    ZeroRange,
    /// Write-zeroes fallback: chunks of zeroes from `next` up to `end` (bytes).
    ZeroFill {
        next: u64,
        end: u64,
    },
}

struct Op {
    token: Option<IoToken>,
    fd: RawFd,
    kind: Kind,
    /// Remaining buffers and their file offset (advanced after short transfers).
    iovs: IoVecs,
    offset: u64,
    /// For misaligned buffers: the aligned copy, and the caller's buffers to copy back to.
    bounce: Option<(AlignedBuf, IoVecs)>,
    ranges: crate::SmallVec<[BlockRange; 1]>,
    block_size: u64,
    /// SQEs of this op not yet completed.
    pending: u32,
    error: Option<IoError>,
    zero_flag: *const UringBackend,
}

struct Engine {
    ring: IoUring,
    slots: Vec<Option<Op>>,
    free: Vec<u32>,
    /// Ops that could not get a slot or SQ space yet, in arrival order.
    backlog: VecDeque<Op>,
    unsubmitted: u32,
    eventfd: OwnedFd,
    zeroes: AlignedBuf,
}

type EngineRef = Rc<RefCell<Engine>>;

/// Reactor-local slot for the engine.
struct EngineLocal(Option<EngineRef>);

fn engine_for(r: &mut Reactor) -> Result<EngineRef, BdevError> {
    let epoll = r.epoll();
    let local = r.local_or_insert_with(|_| EngineLocal(None));
    if let Some(e) = &local.0 {
        return Ok(e.clone());
    }
    let engine = Rc::new(RefCell::new(Engine::new()?));
    local.0 = Some(engine.clone());
    let fd = engine.borrow().eventfd.as_raw_fd();
    epoll
        .add(fd)
        .map_err(|source| BdevError::Io { context: "adding io_uring eventfd to the reactor".into(), source })?;
    r.add_poller(Box::new(EnginePoller { engine: engine.clone(), done: Vec::new(), epoll, fd }));
    Ok(engine)
}

impl Engine {
    fn new() -> Result<Self, BdevError> {
        fn err(context: &'static str) -> impl Fn(std::io::Error) -> BdevError {
            move |source| BdevError::Io { context: context.to_string(), source }
        }
        let ring =
            IoUring::builder().setup_cqsize(SQ_ENTRIES * 4).build(SQ_ENTRIES).map_err(err("creating io_uring"))?;
        // SAFETY: eventfd takes no pointers; returns a new fd or -1.
        let efd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if efd < 0 {
            return Err(BdevError::Io { context: "creating eventfd".into(), source: std::io::Error::last_os_error() });
        }
        // SAFETY: `efd` is fresh and owned by nobody else.
        let eventfd = unsafe { OwnedFd::from_raw_fd(efd) };
        ring.submitter().register_eventfd(eventfd.as_raw_fd()).map_err(err("registering io_uring eventfd"))?;
        let zeroes = AlignedBuf::zeroed(ZERO_CHUNK, 4096).ok_or_else(|| BdevError::Io {
            context: "allocating zero buffer".into(),
            source: std::io::Error::from(std::io::ErrorKind::OutOfMemory),
        })?;
        let mut e = Self {
            ring,
            slots: Vec::new(),
            free: Vec::new(),
            backlog: VecDeque::new(),
            unsubmitted: 0,
            eventfd,
            zeroes,
        };
        e.slots.resize_with(MAX_OPS, || None);
        e.free = (0..MAX_OPS).rev().filter_map(|i| u32::try_from(i).ok()).collect();
        Ok(e)
    }

    /// Queues `op` (starts it if a slot and SQ space are free, else backlogs it).
    fn start(&mut self, op: Op) {
        if !self.backlog.is_empty() {
            self.backlog.push_back(op);
            return;
        }
        if let Err(op) = self.try_start(op) {
            self.backlog.push_back(op);
        }
    }

    #[allow(clippy::result_large_err)] // the op is handed back to go to the backlog, not an error
    fn try_start(&mut self, op: Op) -> Result<(), Op> {
        let need = match &op.kind {
            Kind::Unmap => op.ranges.len().max(1),
            Kind::ZeroFill { .. } => ZERO_PARALLEL as usize,
            _ => 1,
        };
        let sq_free = {
            let sq = self.ring.submission();
            sq.capacity() - sq.len()
        };
        if sq_free < need {
            return Err(op);
        }
        let Some(slot) = self.free.pop() else {
            return Err(op);
        };
        // The op goes into its slot first: the slot vector never reallocates, so pointers into
        // the op (its iovec array, bounce buffer) stay valid until the slot is emptied, which
        // happens only after the last completion.
        self.slots[slot as usize] = Some(op);
        let entries = self.sqes_for(slot);
        if entries.is_empty() {
            // Nothing to do (an empty unmap list): finish without touching the ring.
            if let Some(op) = self.slots[slot as usize].take() {
                self.free.push(slot);
                if let Some(t) = op.token {
                    t.defer(Ok(()));
                }
            }
            return Ok(());
        }
        if let Some(Some(op)) = self.slots.get_mut(slot as usize) {
            op.pending = u32::try_from(entries.len()).unwrap_or(u32::MAX);
        }
        self.push_sqes(&entries);
        Ok(())
    }

    fn push_sqes(&mut self, entries: &[squeue::Entry]) {
        let mut sq = self.ring.submission();
        for e in entries {
            // SAFETY: every pointer in `e` (iovec arrays, buffers) points into the op stored in
            // its slot (or into engine-owned zero buffer / guest memory the op keeps alive), and
            // the slot is not freed before the CQE for `e` is reaped. Space was checked above.
            if unsafe { sq.push(e) }.is_err() {
                tracing::error!("io_uring SQ full after a space check");
            }
        }
        drop(sq);
        self.unsubmitted += u32::try_from(entries.len()).unwrap_or(0);
    }

    /// SQEs for the first step of the op in `slot`.
    fn sqes_for(&mut self, slot: u32) -> Vec<squeue::Entry> {
        let ud = u64::from(slot);
        let zeroes = self.zeroes.as_ptr();
        let Some(Some(op)) = self.slots.get_mut(slot as usize) else {
            return Vec::new();
        };
        let fd = types::Fd(op.fd);
        match op.kind {
            Kind::Read | Kind::Write { .. } => self.rw_sqe(slot).into_iter().collect(),
            Kind::Fsync => vec![opcode::Fsync::new(fd).flags(types::FsyncFlags::DATASYNC).build().user_data(ud)],
            Kind::Unmap => op
                .ranges
                .iter()
                .map(|r| {
                    opcode::Fallocate::new(fd, r.num_blocks * op.block_size)
                        .offset(r.offset_blocks * op.block_size)
                        .mode(libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE)
                        .build()
                        .user_data(ud)
                })
                .collect(),
            Kind::ZeroRange => {
                vec![opcode::Fallocate::new(fd, op.ranges[0].num_blocks * op.block_size)
                    .offset(op.offset)
                    .mode(libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE)
                    .build()
                    .user_data(ud)]
            }
            Kind::ZeroFill { .. } => {
                let mut v = Vec::new();
                for _ in 0..ZERO_PARALLEL {
                    match next_zero_chunk(op, zeroes, ud) {
                        Some(e) => v.push(e),
                        None => break,
                    }
                }
                v
            }
        }
    }

    /// Builds the read/write SQE from the op in `slot` (its iovec array now has a stable address).
    fn rw_sqe(&self, slot: u32) -> Option<squeue::Entry> {
        let op = self.slots[slot as usize].as_ref()?;
        let fd = types::Fd(op.fd);
        let iov = op.iovs.as_slice();
        let n = u32::try_from(iov.len()).ok()?;
        let ud = u64::from(slot);
        Some(
            match op.kind {
                Kind::Read if iov.len() == 1 => {
                    opcode::Read::new(fd, iov[0].iov_base.cast(), u32::try_from(iov[0].iov_len).ok()?)
                        .offset(op.offset)
                        .build()
                }
                Kind::Read => opcode::Readv::new(fd, iov.as_ptr(), n).offset(op.offset).build(),
                Kind::Write { fua } => {
                    let flags = if fua { libc::RWF_DSYNC } else { 0 };
                    if iov.len() == 1 {
                        opcode::Write::new(fd, iov[0].iov_base.cast_const().cast(), u32::try_from(iov[0].iov_len).ok()?)
                            .offset(op.offset)
                            .rw_flags(flags)
                            .build()
                    } else {
                        opcode::Writev::new(fd, iov.as_ptr(), n).offset(op.offset).rw_flags(flags).build()
                    }
                }
                _ => return None,
            }
            .user_data(ud),
        )
    }

    fn drain_backlog(&mut self) {
        while let Some(op) = self.backlog.pop_front() {
            if let Err(op) = self.try_start(op) {
                self.backlog.push_front(op);
                break;
            }
        }
    }
}

/// The next chunk of a write-zeroes fallback, from the engine's zero buffer.
fn next_zero_chunk(op: &mut Op, zeroes: *const u8, ud: u64) -> Option<squeue::Entry> {
    let Kind::ZeroFill { next, end } = &mut op.kind else {
        return None;
    };
    if *next >= *end {
        return None;
    }
    let len = (*end - *next).min(ZERO_CHUNK as u64);
    let e = opcode::Write::new(types::Fd(op.fd), zeroes, u32::try_from(len).unwrap_or(0))
        .offset(*next)
        .build()
        .user_data(ud);
    *next += len;
    Some(e)
}

struct EnginePoller {
    engine: EngineRef,
    done: Vec<(IoToken, IoResult)>,
    epoll: EpollHandle,
    fd: RawFd,
}

impl Drop for EnginePoller {
    fn drop(&mut self) {
        self.epoll.remove(self.fd);
    }
}

impl Poller for EnginePoller {
    fn poll(&mut self) -> PollStatus {
        let mut e = self.engine.borrow_mut();
        let mut work = false;
        if e.unsubmitted > 0 {
            match e.ring.submit() {
                Ok(n) => {
                    let n = u32::try_from(n).unwrap_or(0);
                    e.unsubmitted = e.unsubmitted.saturating_sub(n);
                    work = true;
                }
                Err(err)
                    if matches!(err.raw_os_error(), Some(libc::EAGAIN) | Some(libc::EBUSY) | Some(libc::EINTR)) =>
                {
                    work = true;
                }
                Err(err) => tracing::error!("io_uring submit failed: {err}"),
            }
        }
        let mut cqes: [(u64, i32); REAP_BATCH] = [(0, 0); REAP_BATCH];
        let mut n = 0;
        {
            let cq = e.ring.completion();
            for c in cq.take(REAP_BATCH) {
                cqes[n] = (c.user_data(), c.result());
                n += 1;
            }
        }
        for &(ud, res) in &cqes[..n] {
            e.handle_cqe(ud, res, &mut self.done);
        }
        if n > 0 {
            work = true;
            e.drain_backlog();
        }
        drop(e);
        for (t, r) in self.done.drain(..) {
            t.complete(r);
        }
        PollStatus::from_work(work)
    }

    fn arm(&mut self) -> bool {
        let mut e = self.engine.borrow_mut();
        let mut v: u64 = 0;
        // SAFETY: reads 8 bytes into a valid u64 from our non-blocking eventfd (clears it).
        let _ = unsafe { libc::read(e.eventfd.as_raw_fd(), (&mut v as *mut u64).cast(), 8) };
        e.ring.completion().enable_eventfd();
        let pending = e.unsubmitted > 0;
        let mut cq = e.ring.completion();
        cq.sync();
        !cq.is_empty() || pending
    }

    fn disarm(&mut self) {
        self.engine.borrow_mut().ring.completion().disable_eventfd();
    }

    fn name(&self) -> &str {
        "uring"
    }
}

impl Engine {
    fn handle_cqe(&mut self, ud: u64, res: i32, done: &mut Vec<(IoToken, IoResult)>) {
        let Ok(slot32) = u32::try_from(ud) else {
            tracing::error!(ud, "io_uring completion with a foreign user_data");
            return;
        };
        let slot = slot32 as usize;
        let Some(Some(op)) = self.slots.get_mut(slot) else {
            tracing::error!(ud, "io_uring completion for an empty slot");
            return;
        };
        op.pending = op.pending.saturating_sub(1);
        match op.kind {
            Kind::Read | Kind::Write { .. } => {
                if res < 0 {
                    if res == -libc::EAGAIN || res == -libc::EINTR {
                        self.resubmit_rw(slot32);
                        return;
                    }
                    op.error.get_or_insert(IoError::Os(-res));
                } else {
                    let n = u64::try_from(res).unwrap_or(0);
                    if n == 0 && op.iovs.total_len() > 0 {
                        // End of file: the file shrank under us.
                        op.error.get_or_insert(IoError::Os(libc::EIO));
                    } else if n < op.iovs.total_len() {
                        op.iovs.advance(n);
                        op.offset += n;
                        self.resubmit_rw(slot32);
                        return;
                    }
                }
            }
            Kind::ZeroRange => {
                if res == -libc::EOPNOTSUPP || res == -libc::EINVAL || res == -libc::ENOTTY {
                    // The file system cannot zero a range: remember, and write zeroes instead.
                    // SAFETY: `zero_flag` points at the backend, which outlives the op (the op's
                    // token holds the channel's bdev Arc, which owns the backend).
                    unsafe { (*op.zero_flag).zero_range_ok.store(false, Ordering::Relaxed) };
                    let start = op.offset;
                    let end = start + op.ranges[0].num_blocks * op.block_size;
                    op.kind = Kind::ZeroFill { next: start, end };
                    self.continue_zero_fill(slot32);
                    return;
                } else if res < 0 {
                    op.error.get_or_insert(IoError::Os(-res));
                }
            }
            Kind::ZeroFill { .. } => {
                if res < 0 {
                    op.error.get_or_insert(IoError::Os(-res));
                } else if op.error.is_none() {
                    self.continue_zero_fill(slot32);
                }
                let Some(Some(op)) = self.slots.get(slot) else {
                    return;
                };
                if op.pending > 0 {
                    return;
                }
            }
            Kind::Fsync | Kind::Unmap => {
                if res < 0 {
                    let e = if res == -libc::EOPNOTSUPP { IoError::Unsupported } else { IoError::Os(-res) };
                    op.error.get_or_insert(e);
                }
            }
        }
        let Some(Some(op)) = self.slots.get(slot) else {
            return;
        };
        if op.pending > 0 {
            return;
        }
        let Some(mut op) = self.slots[slot].take() else {
            return;
        };
        self.free.push(slot32);
        if let (Kind::Read, Some((buf, user))) = (&op.kind, &op.bounce) {
            if op.error.is_none() {
                user.copy_from(buf.as_slice());
            }
        }
        let result = match op.error {
            Some(e) => Err(e),
            None => Ok(()),
        };
        if let Some(t) = op.token.take() {
            done.push((t, result));
        }
    }

    fn resubmit_rw(&mut self, slot: u32) {
        if let Some(Some(op)) = self.slots.get_mut(slot as usize) {
            op.pending += 1;
        }
        if let Some(e) = self.rw_sqe(slot) {
            if self.ring.submission().is_full() {
                // Rare: submit what is queued to make room.
                let _ = self.ring.submit();
                self.unsubmitted = 0;
            }
            self.push_sqes(&[e]);
        }
    }

    fn continue_zero_fill(&mut self, slot: u32) {
        let ud = u64::from(slot);
        let zeroes = self.zeroes.as_ptr();
        let Some(Some(op)) = self.slots.get_mut(slot as usize) else {
            return;
        };
        let mut entries = Vec::new();
        while op.pending + u32::try_from(entries.len()).unwrap_or(0) < ZERO_PARALLEL {
            match next_zero_chunk(op, zeroes, ud) {
                Some(e) => entries.push(e),
                None => break,
            }
        }
        op.pending += u32::try_from(entries.len()).unwrap_or(0);
        let sq_free = {
            let sq = self.ring.submission();
            sq.capacity() - sq.len()
        };
        if sq_free < entries.len() {
            let _ = self.ring.submit();
            self.unsubmitted = 0;
        }
        self.push_sqes(&entries);
    }
}

struct UringChannel {
    engine: EngineRef,
    fd: RawFd,
    keep: Arc<Bdev>,
    mem_align: usize,
    zero_flag: *const UringBackend,
}

impl ChannelBackend for UringChannel {
    fn submit(&mut self, op: IoOp, token: IoToken) {
        let bs = u64::from(self.keep.block_size());
        let mut o = Op {
            token: Some(token),
            fd: self.fd,
            kind: Kind::Fsync,
            iovs: IoVecs::new(),
            offset: 0,
            bounce: None,
            ranges: crate::SmallVec::new(),
            block_size: bs,
            pending: 0,
            error: None,
            zero_flag: self.zero_flag,
        };
        match op {
            IoOp::Read { offset_blocks, iovs, .. } | IoOp::Write { offset_blocks, iovs, .. }
                if iovs.total_len() == 0 =>
            {
                let _ = offset_blocks;
                drop(iovs);
                if let Some(t) = o.token.take() {
                    t.defer(Ok(()));
                }
                return;
            }
            IoOp::Read { offset_blocks, iovs, .. } => {
                o.kind = Kind::Read;
                o.offset = offset_blocks * bs;
                o.iovs = iovs;
            }
            IoOp::Write { offset_blocks, iovs, fua, .. } => {
                o.kind = Kind::Write { fua };
                o.offset = offset_blocks * bs;
                o.iovs = iovs;
            }
            IoOp::Flush | IoOp::Reset => o.kind = Kind::Fsync,
            IoOp::Unmap { ranges } => {
                o.kind = Kind::Unmap;
                o.ranges = ranges;
            }
            IoOp::WriteZeroes { offset_blocks, num_blocks } => {
                o.offset = offset_blocks * bs;
                o.ranges.push(BlockRange { offset_blocks, num_blocks });
                // SAFETY: `zero_flag` points at the backend, alive while `keep` is.
                let zr = unsafe { (*self.zero_flag).zero_range_ok.load(Ordering::Relaxed) };
                o.kind = if zr {
                    Kind::ZeroRange
                } else {
                    Kind::ZeroFill { next: o.offset, end: o.offset + num_blocks * bs }
                };
            }
        }
        if matches!(o.kind, Kind::Read | Kind::Write { .. })
            && (!o.iovs.is_aligned(self.mem_align) || o.iovs.len() > IOV_MAX)
        {
            let len = usize::try_from(o.iovs.total_len()).unwrap_or(usize::MAX);
            let Some(mut buf) = AlignedBuf::zeroed(len, self.mem_align.max(512)) else {
                if let Some(t) = o.token.take() {
                    t.defer(Err(IoError::NoMemory));
                }
                return;
            };
            if matches!(o.kind, Kind::Write { .. }) {
                o.iovs.copy_to(buf.as_mut_slice());
            }
            let user = std::mem::take(&mut o.iovs);
            // SAFETY: `buf` is owned by the op (moved into `bounce` below, kept in the slot until
            // completion); its heap allocation does not move when the op moves.
            unsafe { o.iovs.push_raw(buf.as_mut_ptr(), len) };
            o.bounce = Some((buf, user));
        }
        self.engine.borrow_mut().start(o);
    }
}
