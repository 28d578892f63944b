//! Transport-free SCSI target emulation (SPC-4 / SBC-3) over bdevs.
//!
//! This layer turns SCSI commands into bdev I/O and answers, with no knowledge of how commands
//! arrive: a transport (virtio-scsi over vhost-user, later perhaps iSCSI) hands each command over
//! as a [`ScsiTask`] (CDB plus host scatter-gather lists for data-out and data-in) and gets back a
//! [`TaskResult`] (status, fixed-format sense, bytes placed in data-in) through a [`TaskSink`].
//! Residuals, response codes and virtio-scsi events are the transport's business.
//!
//! ```text
//!   transport (virtio-scsi queue poller)          one reactor
//!        │ ScsiTask + TaskCallback                     │
//!        ▼                                             │
//!   LunChannel::submit ── parse (cdb.rs) ─ Command ─ execute ──► BdevChannel::submit
//!        │                  │ sense on error            │             │
//!        │                  ▼                           ▼             ▼ IoSink::io_done
//!        │            deferred queue (poller) ◄── immediate answers   multi-step state machines
//!        ▼                                                            (VERIFY, WRITE SAME)
//!   TaskSink::task_done(tag, TaskResult)   — always on this reactor, never inside submit
//! ```
//!
//! - [`Lun`] (shared, `Arc`): the bdev, identity (vendor `VSTOR`, product, serial and NAA/T10
//!   designators derived from the bdev UUID), limits ([`LunOptions`]), the write-cache state and a
//!   capacity generation bumped on every bdev resize.
//! - [`LunChannel`] (one per reactor): owns a [`BdevChannel`](vstor_bdev::BdevChannel), decodes
//!   each CDB once into a validated `Command` (the checks sit next to the SPC/SBC clauses that
//!   demand them), runs it and completes it exactly once. Answers that need no I/O are queued to a
//!   per-reactor poller so that completions are never delivered from inside
//!   [`LunChannel::submit`]. After a resize the next command on each channel gets UNIT
//!   ATTENTION, CAPACITY DATA HAS CHANGED, once. [`LunChannel::reset`] (LOGICAL UNIT RESET)
//!   completes when every command submitted before it has completed.
//! - [`lun_not_present`]: the answers for a LUN that does not exist.
//!
//! Commands: TEST UNIT READY, REQUEST SENSE, INQUIRY (standard; VPD 00h, 80h, 83h, B0h, B1h, B2h),
//! MODE SENSE(6/10) and MODE SELECT(6/10) (caching and control pages), START STOP UNIT, READ
//! CAPACITY(10/16), READ and WRITE (6/10/12/16), VERIFY (10/12/16), SYNCHRONIZE CACHE (10/16),
//! WRITE SAME (10/16), UNMAP, REPORT LUNS, REPORT SUPPORTED OPERATION CODES. Anything else is
//! CHECK CONDITION, ILLEGAL REQUEST, INVALID COMMAND OPERATION CODE.
//!
//! Policies where the standards leave a choice:
//! - A data-in (READ) or data-out (WRITE, VERIFY with BYTCHK, UNMAP, MODE SELECT, WRITE SAME)
//!   buffer smaller than the CDB asks for is the transport's or initiator's inconsistency: CHECK
//!   CONDITION, ILLEGAL REQUEST, INVALID FIELD IN CDB, pointing at the CDB's length field when it
//!   has one. Nothing is transferred. Larger buffers are fine; `data_in_len` says what was used.
//!   (A transport that prefers virtio-scsi's OVERRUN response can check before submitting.)
//! - Parameter data (INQUIRY, MODE SENSE, ...) is cut to the allocation length and to the data-in
//!   buffer, whichever is smaller (SPC-4, allocation length).
//! - WRITE SAME: all-zero data (or NDOB) with UNMAP=1 unmaps when the bdev can; all-zero data
//!   otherwise uses the bdev's write-zeroes; any other pattern is written, 256 blocks per bdev
//!   write, with iovecs that repeat the one data-out block.
//! - With the write cache disabled (MODE SELECT WCE=0) every write is FUA and write-zeroes/unmap
//!   done for WRITE SAME is followed by a flush.
//! - Check order: UNIT ATTENTION (before anything else, except for INQUIRY, REPORT LUNS and
//!   REQUEST SENSE), then the CDB (opcode, length, reserved bits, fields), then limits, then the
//!   LBA range, then write protection, then the data buffers.
//! - VERIFY with BYTCHK reads and compares 1 MiB at a time; a miscompare reports the offset of the
//!   first differing byte (from the start of the verified range) in the INFORMATION field.
//!
//! Not implemented: persistent reservations, protection information, ALUA, COMPARE AND WRITE,
//! power conditions and a stopped state (START STOP UNIT flushes on stop and is otherwise a
//! no-op), saved mode pages, the POWER ON/RESET and MODE PARAMETERS CHANGED unit attentions (a LUN
//! reset establishes none), and the IMMED bit of SYNCHRONIZE CACHE (accepted; the command still
//! completes after the flush).

mod cdb;
mod channel;
mod lun;
mod mode;
mod sense;
mod spc;

#[cfg(test)]
mod tests;

use std::rc::Rc;

use vstor_bdev::IoVecs;

pub use cdb::opcode;
pub use channel::LunChannel;
pub use lun::{Lun, LunOptions};
pub use sense::{Asc, FieldPointer, ScsiStatus, Sense, SenseKey, FIXED_SENSE_LEN};
pub use spc::{naa_designator, revision, VENDOR};

use cdb::{parse, Command};

/// Largest CDB a task carries (virtio-scsi's default `cdb_size`).
pub const MAX_CDB_LEN: usize = 32;

/// One SCSI command as received by the transport.
///
/// The memory behind `data_out` and `data_in` must stay valid, and must not be touched by anyone
/// else, until the command's [`TaskSink::task_done`] has run (the contract of
/// [`IoVecs::push_raw`]).
#[derive(Debug)]
pub struct ScsiTask {
    /// The CDB as received; only the first `cdb_len` bytes are meaningful.
    pub cdb: [u8; MAX_CDB_LEN],
    /// Valid bytes in `cdb` (virtio-scsi gives 32). Each opcode's own length is honoured; a
    /// shorter `cdb_len` is an error, bytes beyond the opcode's length are ignored.
    pub cdb_len: usize,
    /// Initiator → target data (WRITE, UNMAP parameters, MODE SELECT, VERIFY with BYTCHK).
    pub data_out: IoVecs,
    /// Target → initiator buffer (READ, INQUIRY, ...). Its size is the transport's allocation.
    pub data_in: IoVecs,
}

impl ScsiTask {
    /// A task with `cdb` (at most [`MAX_CDB_LEN`] bytes are kept).
    pub fn new(cdb: &[u8], data_out: IoVecs, data_in: IoVecs) -> Self {
        let mut c = [0u8; MAX_CDB_LEN];
        let n = cdb.len().min(MAX_CDB_LEN);
        c[..n].copy_from_slice(&cdb[..n]);
        Self { cdb: c, cdb_len: n, data_out, data_in }
    }

    /// The valid part of the CDB.
    pub fn cdb(&self) -> &[u8] {
        &self.cdb[..self.cdb_len.min(MAX_CDB_LEN)]
    }
}

/// Receives command completions. Called on the reactor that owns the [`LunChannel`], never from
/// inside [`LunChannel::submit`] or [`LunChannel::reset`].
pub trait TaskSink {
    /// Command (or reset) `tag` finished with `result`.
    fn task_done(&self, tag: u64, result: TaskResult);
}

/// Where a completion goes: a sink and the transport's tag for the command.
#[derive(Clone)]
pub struct TaskCallback {
    pub sink: Rc<dyn TaskSink>,
    pub tag: u64,
}

impl std::fmt::Debug for TaskCallback {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TaskCallback(tag {})", self.tag)
    }
}

/// The outcome of one command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TaskResult {
    /// SAM status (GOOD, CHECK CONDITION, BUSY, ...).
    pub status: ScsiStatus,
    /// Sense data, present exactly when the status is CHECK CONDITION.
    pub sense: Option<Sense>,
    /// Bytes placed at the start of `data_in` (the transport computes residuals).
    pub data_in_len: u32,
}

impl TaskResult {
    /// GOOD with `data_in_len` bytes of data-in.
    pub fn good(data_in_len: u32) -> Self {
        Self { status: ScsiStatus::Good, sense: None, data_in_len }
    }

    /// CHECK CONDITION with `sense`; no data.
    pub fn check_condition(sense: Sense) -> Self {
        Self { status: ScsiStatus::CheckCondition, sense: Some(sense), data_in_len: 0 }
    }

    /// BUSY (retry later); no data.
    pub fn busy() -> Self {
        Self { status: ScsiStatus::Busy, sense: None, data_in_len: 0 }
    }

    /// Fixed-format sense bytes, if any.
    pub fn sense_bytes(&self) -> Option<[u8; FIXED_SENSE_LEN]> {
        self.sense.map(|s| s.to_bytes())
    }
}

/// Copies what fits of `data` (at most `alloc_len` bytes, SPC-4 allocation length) into `data_in`.
pub(crate) fn put_data(task: &ScsiTask, data: &[u8], alloc_len: u32) -> TaskResult {
    let room = usize::try_from(task.data_in.total_len()).unwrap_or(usize::MAX);
    let n = data.len().min(usize::try_from(alloc_len).unwrap_or(usize::MAX)).min(room);
    let copied = task.data_in.copy_from(&data[..n]);
    TaskResult::good(u32::try_from(copied).unwrap_or(u32::MAX))
}

/// The answer for a LUN that does not exist, whether or not its target does (SPC-4: logical
/// units not accessible; INQUIRY, REPORT LUNS and REQUEST SENSE). Synchronous: nothing is queued.
///
/// - INQUIRY (standard): peripheral qualifier 011b, device type 1Fh. VPD pages: CHECK CONDITION,
///   LOGICAL UNIT NOT SUPPORTED.
/// - REPORT LUNS: an empty list. (When the target has a LUN 0, send REPORT LUNS to its
///   [`LunChannel`] instead, which lists it.)
/// - REQUEST SENSE: GOOD with sense data ILLEGAL REQUEST, LOGICAL UNIT NOT SUPPORTED.
/// - Anything else: CHECK CONDITION, ILLEGAL REQUEST, LOGICAL UNIT NOT SUPPORTED (25h/00h).
///
/// The three commands above are still validated: a malformed CDB gets its INVALID FIELD IN CDB.
pub fn lun_not_present(task: &ScsiTask) -> TaskResult {
    let not_supported = Sense::illegal(Asc::LOGICAL_UNIT_NOT_SUPPORTED);
    let cdb = task.cdb();
    match cdb.first().copied() {
        Some(opcode::INQUIRY | opcode::REPORT_LUNS | opcode::REQUEST_SENSE) => match parse(cdb) {
            Ok(Command::Inquiry { evpd: false, alloc_len, .. }) => {
                put_data(task, &spc::not_present_inquiry(), alloc_len)
            }
            Ok(Command::ReportLuns { select, alloc_len }) => {
                put_data(task, &spc::report_luns(select, false), alloc_len)
            }
            Ok(Command::RequestSense { desc, alloc_len }) => {
                let data = if desc { not_supported.to_descriptor_bytes() } else { not_supported.to_bytes().to_vec() };
                put_data(task, &data, alloc_len)
            }
            Ok(_) => TaskResult::check_condition(not_supported),
            Err(s) => TaskResult::check_condition(s),
        },
        _ => TaskResult::check_condition(not_supported),
    }
}
