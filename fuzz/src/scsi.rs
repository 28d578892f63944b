//! `scsi_cdb`: SCSI commands (CDB, data-out bytes, data-in buffer size) into a LUN over a RAM
//! disk, through `vstor_scsi::LunChannel` on a local reactor, as the virtio-scsi transport submits
//! them.
//!
//! Input layout:
//!
//! ```text
//! u8 lun     L_* below
//! then commands, until the input ends (at most MAX_COMMANDS):
//!   u8  kind     K_* below
//!   u8  cdb_len  % 33 (a CDB shorter than its opcode needs is an error vstor must report)
//!   cdb_len bytes of CDB
//!   u16 out_len  data-out bytes; taken from the input (zero-filled past its end)
//!   out_len bytes of data-out
//!   u16 in_len   data-in buffer bytes
//!   u8  seg      how the buffers are cut into iovecs (see `cut`)
//! ```

use std::cell::{Cell, RefCell};
use std::rc::Rc;

use vstor_bdev::IoVecs;
use vstor_reactor::{Mode, Reactor, ReactorConfig};
use vstor_scsi::{
    lun_not_present, Lun, LunChannel, LunOptions, ScsiStatus, ScsiTask, TaskCallback, TaskResult, TaskSink,
};

use crate::bdevs;
use crate::{Reader, Writer};

/// Bits 0-1: the bdev kind (`bdevs::Kind::from_bits`).
pub const L_KIND: u8 = 3;
/// 4096-byte blocks (else 512).
pub const L_4K: u8 = 4;
/// Small limits (transfer, unmap, write same), so the limit checks are reached.
pub const L_SMALL_LIMITS: u8 = 8;
pub const L_LBPRZ: u8 = 16;
pub const L_READ_ONLY: u8 = 32;

/// Low 3 bits of `kind`: what to do with the command.
pub const K_SUBMIT: u8 = 0;
/// LOGICAL UNIT RESET (the CDB is still read from the input, and ignored).
pub const K_RESET: u8 = 6;
/// Answer as a LUN that does not exist.
pub const K_NOT_PRESENT: u8 = 7;
/// Bit 3 of `kind`: run the reactor until everything submitted so far completed.
pub const K_WAIT: u8 = 8;

pub const MAX_COMMANDS: usize = 32;
const DISK_BYTES: u64 = 1 << 20;

thread_local! {
    static REACTOR: RefCell<Option<Reactor>> = const { RefCell::new(None) };
}

#[derive(Default)]
struct Recorder {
    done: RefCell<Vec<(u64, TaskResult)>>,
    in_call: Cell<bool>,
}

impl TaskSink for Recorder {
    fn task_done(&self, tag: u64, result: TaskResult) {
        assert!(!self.in_call.get(), "command {tag} completed inside submit/reset");
        assert!(self.done.borrow().iter().all(|(t, _)| *t != tag), "command {tag} completed twice");
        self.done.borrow_mut().push((tag, result));
    }
}

/// Cuts `buf` into iovecs of sizes from pattern `seg`.
fn cut(buf: &mut [u8], seg: u8) -> IoVecs {
    const PATTERNS: [&[usize]; 4] = [&[usize::MAX], &[1, 7, 500, 13, 1031, 3, 4093], &[512], &[4096, 1]];
    let sizes = PATTERNS[usize::from(seg % 4)];
    let mut v = IoVecs::new();
    let (mut off, mut i) = (0, 0);
    while off < buf.len() {
        let n = sizes[i % sizes.len()].min(buf.len() - off);
        // SAFETY: `off + n <= buf.len()`. The buffer is owned by the harness's `bufs` list, not
        // touched until every command has completed, and dropped only after that.
        unsafe { v.push_raw(buf.as_mut_ptr().add(off), n) };
        off += n;
        i += 1;
    }
    v
}

struct Expect {
    tag: u64,
    in_len: u64,
}

fn check(done: &[(u64, TaskResult)], expect: &[Expect]) {
    for (tag, r) in done {
        assert_eq!(r.status == ScsiStatus::CheckCondition, r.sense.is_some(), "command {tag}: {r:?}");
        if let Some(e) = expect.iter().find(|e| e.tag == *tag) {
            assert!(u64::from(r.data_in_len) <= e.in_len, "command {tag}: {r:?} but a {}-byte buffer", e.in_len);
        }
    }
}

fn run_until_done(r: &mut Reactor, rec: &Recorder, submitted: u64) {
    for _ in 0..100_000 {
        if rec.done.borrow().len() as u64 >= submitted {
            return;
        }
        r.run_once();
    }
    panic!("{} of {submitted} commands completed", rec.done.borrow().len());
}

pub fn cdb(data: &[u8]) {
    let mut rd = Reader::new(data);
    let l = rd.u8();
    REACTOR.with(|reactor| {
        let mut reactor = reactor.borrow_mut();
        let r = reactor.get_or_insert_with(|| {
            Reactor::new_local(ReactorConfig { mode: Mode::Poll, pin: false, ..Default::default() })
                .expect("local reactor")
                .0
        });
        let bs = if l & L_4K != 0 { 4096 } else { 512 };
        let bdev = bdevs::create(bdevs::Kind::from_bits(l & L_KIND), "fuzz0", bs, DISK_BYTES, l & L_READ_ONLY != 0);
        let opts = if l & L_SMALL_LIMITS != 0 {
            LunOptions {
                max_transfer_bytes: 64 << 10,
                max_unmap_blocks: 64,
                max_unmap_descriptors: 4,
                max_write_same_blocks: 300,
                unmap_reads_zeroes: l & L_LBPRZ != 0,
                ..Default::default()
            }
        } else {
            LunOptions { unmap_reads_zeroes: l & L_LBPRZ != 0, ..Default::default() }
        };
        let lun = Lun::new(bdev, 0, opts);
        let mut ch = LunChannel::new(lun, r).expect("LUN channel");
        let rec = Rc::new(Recorder::default());
        let mut bufs: Vec<Vec<u8>> = Vec::new();
        let mut expect = Vec::new();
        let mut tag = 0u64;
        for _ in 0..MAX_COMMANDS {
            if rd.is_empty() {
                break;
            }
            let kind = rd.u8();
            let cdb_len = usize::from(rd.u8() % 33);
            let cdb = rd.take(cdb_len).to_vec();
            let out_len = usize::from(rd.u16());
            let mut out = rd.take(out_len).to_vec();
            out.resize(out_len, 0);
            let in_len = usize::from(rd.u16());
            let mut inb = vec![0xEEu8; in_len];
            let seg = rd.u8();
            let task = ScsiTask::new(&cdb, cut(&mut out, seg), cut(&mut inb, seg >> 2));
            bufs.push(out);
            bufs.push(inb);
            match kind & 7 {
                K_NOT_PRESENT => {
                    let res = lun_not_present(&task);
                    check(&[(0, res)], &[Expect { tag: 0, in_len: in_len as u64 }]);
                }
                K_RESET => {
                    tag += 1;
                    rec.in_call.set(true);
                    ch.reset(TaskCallback { sink: rec.clone(), tag });
                    rec.in_call.set(false);
                }
                _ => {
                    tag += 1;
                    expect.push(Expect { tag, in_len: in_len as u64 });
                    rec.in_call.set(true);
                    ch.submit(task, TaskCallback { sink: rec.clone(), tag });
                    rec.in_call.set(false);
                }
            }
            if kind & K_WAIT != 0 {
                run_until_done(r, &rec, tag);
            }
        }
        run_until_done(r, &rec, tag);
        assert_eq!(ch.inflight(), 0, "commands still in flight after all completed");
        check(&rec.done.borrow(), &expect);
        if crate::trace() {
            for (t, res) in rec.done.borrow().iter() {
                let sense = res.sense_bytes().map(|b| format!(" sense {:x}/{:02x}/{:02x}", b[2] & 15, b[12], b[13]));
                eprintln!("scsi {t}: {:?} {} bytes{}", res.status, res.data_in_len, sense.unwrap_or_default());
            }
        }
        drop(ch);
        // Buffers go only now, after every command that used them completed.
        drop(bufs);
        r.run_once();
    });
}

/// One command in the input layout (for seeds).
pub fn command(w: &mut Writer, kind: u8, cdb: &[u8], out: &[u8], in_len: u16, seg: u8) {
    w.u8(kind).u8(u8::try_from(cdb.len()).expect("CDB of at most 32 bytes")).bytes(cdb);
    w.u16(u16::try_from(out.len()).expect("data-out under 64 KiB")).bytes(out).u16(in_len).u8(seg);
}
