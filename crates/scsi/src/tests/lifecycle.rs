//! Unit attentions after a resize, LUN reset, completion delivery, bdev error mapping and random
//! CDBs.

use super::*;

const TUR: [u8; 6] = [0x00, 0, 0, 0, 0, 0];

fn rc16() -> Vec<u8> {
    let mut c = vec![0u8; 16];
    c[0] = 0x9E;
    c[1] = 0x10;
    c[13] = 32;
    c
}

#[track_caller]
fn assert_capacity_changed(r: &TaskResult) {
    assert_check(r, 0x06, 0x2A, 0x09, None);
}

#[test]
fn resize_raises_capacity_data_has_changed_once_per_channel() {
    let b = malloc_bdev(512, 64);
    let mut h = H::new(b.clone());
    let mut other = h.channel();
    assert_eq!(h.lun.capacity_generation(), 0);
    b.resize(32).unwrap();
    assert_eq!(h.lun.num_blocks(), 32, "for the transport's PARAM_CHANGE event");
    assert_eq!(h.lun.capacity_generation(), 1);

    assert_capacity_changed(&h.cmd(&TUR));
    assert_eq!(h.cmd(&TUR), TaskResult::good(0), "reported once");

    // The other channel has its own unit attention, reported on its next command whatever it is.
    let mut buf = vec![0u8; 32];
    let t = h.submit_on(&mut other, ScsiTask::new(&rc16(), IoVecs::new(), iovs(&mut buf, &ODD)));
    assert_capacity_changed(&h.wait(t));
    let t = h.submit_on(&mut other, ScsiTask::new(&rc16(), IoVecs::new(), iovs(&mut buf, &ODD)));
    assert_eq!(h.wait(t), TaskResult::good(32));
    assert_eq!(u64::from_be_bytes(buf[..8].try_into().unwrap()), 31);
}

#[test]
fn unit_attention_is_reported_before_cdb_errors() {
    let b = malloc_bdev(512, 64);
    let mut h = H::new(b.clone());
    b.resize(128).unwrap();
    assert_capacity_changed(&h.cmd(&cdb10(0x28, 0xE0, 0, 1)));
    assert_invalid_cdb(&h.cmd(&cdb10(0x28, 0xE0, 0, 1)), 1, Some(7));
}

#[test]
fn several_resizes_give_one_unit_attention() {
    let b = malloc_bdev(512, 64);
    let mut h = H::new(b.clone());
    b.resize(100).unwrap();
    b.resize(120).unwrap();
    assert_capacity_changed(&h.cmd(&TUR));
    assert_eq!(h.cmd(&TUR), TaskResult::good(0));
    b.resize(64).unwrap();
    assert_capacity_changed(&h.cmd(&TUR));
}

#[test]
fn inquiry_and_report_luns_neither_report_nor_clear_the_unit_attention() {
    let b = malloc_bdev(512, 64);
    let mut h = H::new(b.clone());
    b.resize(100).unwrap();
    assert_eq!(h.cmd_in(&inquiry(false, 0, 96), 96).0, TaskResult::good(96));
    assert_eq!(h.cmd_in(&inquiry(true, 0x80, 96), 96).0.status, ScsiStatus::Good);
    assert_eq!(h.cmd_in(&[0xA0, 0, 0, 0, 0, 0, 0, 0, 0, 16, 0, 0], 16).0, TaskResult::good(16));
    assert_capacity_changed(&h.cmd(&TUR));
    assert_eq!(h.cmd(&TUR), TaskResult::good(0));
}

#[test]
fn request_sense_reports_and_clears_the_unit_attention() {
    let b = malloc_bdev(512, 64);
    let mut h = H::new(b.clone());
    b.resize(100).unwrap();
    // A malformed REQUEST SENSE fails and leaves the condition pending.
    assert_invalid_cdb(&h.cmd_in(&[0x03, 0x80, 0, 0, 18, 0], 18).0, 1, Some(7));
    let (r, d) = h.cmd_in(&[0x03, 0, 0, 0, 18, 0], 18);
    assert_eq!(r, TaskResult::good(18));
    assert_eq!(d, [0x70, 0, 0x06, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x2A, 0x09, 0, 0, 0, 0]);
    assert_eq!(h.cmd(&TUR), TaskResult::good(0));
    let (_, d) = h.cmd_in(&[0x03, 0, 0, 0, 18, 0], 18);
    assert_eq!(d[2], 0x00, "nothing pending any more");
}

#[test]
fn a_channel_opened_after_a_resize_has_no_unit_attention() {
    let b = malloc_bdev(512, 64);
    let mut h = H::new(b.clone());
    b.resize(100).unwrap();
    let mut late = h.channel();
    let t = h.submit_on(&mut late, ScsiTask::new(&TUR, IoVecs::new(), IoVecs::new()));
    assert_eq!(h.wait(t), TaskResult::good(0));
    assert_capacity_changed(&h.cmd(&TUR));
}

#[test]
fn lun_reset_waits_for_in_flight_io() {
    let mut h = H::new(malloc_bdev(512, 64));
    faults(|f| f.hold = true);
    let mut bufs: Vec<Vec<u8>> = (0..4).map(|i| pattern(i, 512)).collect();
    let mut tags = Vec::new();
    for (i, b) in bufs.iter_mut().take(3).enumerate() {
        tags.push(h.submit(ScsiTask::new(&cdb10(0x2A, 0, i as u32, 1), iovs(b, &ODD), IoVecs::new())));
    }
    assert_eq!((h.ch.inflight(), held_count()), (3, 3));
    let reset = h.reset();
    // A command after the reset does not hold it up.
    let late = h.submit(ScsiTask::new(&cdb10(0x28, 0, 10, 1), IoVecs::new(), iovs(&mut bufs[3], &ODD)));
    h.poll(200);
    assert!(h.result(reset).is_none(), "reset must wait for the writes");
    assert_eq!(h.ch.inflight(), 4);
    release_first(2, Ok(()));
    h.poll(10);
    assert!(h.result(reset).is_none(), "one write is still in flight");
    assert_eq!(h.ch.inflight(), 2);
    release_first(1, Ok(()));
    assert_eq!(h.wait(reset), TaskResult::good(0));
    for t in &tags {
        assert_eq!(h.result(*t), Some(TaskResult::good(0)));
        assert!(h.position(*t) < h.position(reset));
    }
    assert!(h.result(late).is_none(), "the later read is still held");
    assert_eq!(h.ch.inflight(), 1);
    release_held(Ok(()));
    assert_eq!(h.wait(late), TaskResult::good(512));
    assert_eq!(h.ch.inflight(), 0);
}

#[test]
fn lun_reset_with_nothing_in_flight_completes_on_the_next_pass() {
    let mut h = H::new(malloc_bdev(512, 64));
    let reset = h.reset();
    h.poll(1);
    assert_eq!(h.result(reset), Some(TaskResult::good(0)));
    // Immediate answers still queued count as in flight.
    let inq = h.submit(ScsiTask::new(&inquiry(false, 0, 0), IoVecs::new(), IoVecs::new()));
    assert_eq!(h.ch.inflight(), 1);
    let reset = h.reset();
    h.poll(1);
    assert!(h.position(inq) < h.position(reset));
    assert_eq!(h.ch.inflight(), 0);
}

#[test]
fn lun_reset_waits_for_in_flight_uring_io() {
    let (_f, b) = file_bdev(4096, uring::Flavor::Uring, true);
    let mut h = H::new(b);
    let mut bufs: Vec<Vec<u8>> = (0..32).map(|i| pattern(i, 64 * 512)).collect();
    let tags: Vec<u64> = bufs
        .iter_mut()
        .enumerate()
        .map(|(i, b)| h.submit(ScsiTask::new(&cdb16(0x8A, 0x08, i as u64 * 64, 64), iovs(b, &ODD), IoVecs::new())))
        .collect();
    assert_eq!(h.ch.inflight(), 32);
    let reset = h.reset();
    assert_eq!(h.wait(reset), TaskResult::good(0));
    for t in &tags {
        assert_eq!(h.result(*t), Some(TaskResult::good(0)), "completed before the reset");
        assert!(h.position(*t) < h.position(reset));
    }
    assert_eq!(h.ch.inflight(), 0);
    for i in [0u64, 17, 31] {
        assert_eq!(h.read(i * 64, 64), pattern(i, 64 * 512));
    }
}

#[test]
fn no_completion_is_delivered_inside_submit() {
    // `H::submit` asserts it for every command of every test; here explicitly for each path.
    let mut h = H::new(malloc_bdev(512, 64));
    let mut buf = vec![0u8; 4096];
    let cases: Vec<Vec<u8>> = vec![
        inquiry(false, 0, 96), // immediate data
        vec![0xFF; 16],        // bad opcode
        vec![],                // empty CDB
        cdb10(0x28, 0, 0, 8),  // bdev I/O
        cdb10(0x28, 0, 64, 1), // range error
        cdb10(0x35, 0, 0, 0),  // flush
    ];
    for c in cases {
        let t = h.submit(ScsiTask::new(&c, IoVecs::new(), iovs(&mut buf, &ODD)));
        assert!(h.result(t).is_none());
        assert_eq!(h.ch.inflight(), 1);
        h.wait(t);
        assert_eq!(h.ch.inflight(), 0);
    }
    assert!(!h.rec.reentered.get());
}

#[test]
fn a_dropped_channel_still_completes_its_commands() {
    let mut h = H::new(malloc_bdev(512, 64));
    let mut ch = h.channel();
    faults(|f| f.hold = true);
    let mut buf = pattern(1, 512);
    let t = h.submit_on(&mut ch, ScsiTask::new(&cdb10(0x2A, 0, 0, 1), iovs(&mut buf, &ODD), IoVecs::new()));
    let t2 = h.submit_on(&mut ch, ScsiTask::new(&TUR, IoVecs::new(), IoVecs::new()));
    drop(ch);
    release_held(Ok(()));
    assert_eq!(h.wait(t), TaskResult::good(0));
    assert_eq!(h.wait(t2), TaskResult::good(0));
}

/// Runs `cdb` with the test target failing operations of type `kind` with `e`.
fn failing(kind: IoType, e: IoError, cdb: &[u8], data_out: &[u8], data_in: usize) -> TaskResult {
    let mut h = H::new(malloc_bdev(512, 64));
    faults(|f| f.fail = Some((kind, e)));
    let mut out = data_out.to_vec();
    let mut inb = vec![0u8; data_in];
    let t = h.submit(ScsiTask::new(cdb, iovs(&mut out, &ODD), iovs(&mut inb, &ODD)));
    h.wait(t)
}

#[test]
fn bdev_read_errors_return_medium_error() {
    let r = failing(IoType::Read, IoError::Os(5), &cdb10(0x28, 0, 0, 2), &[], 1024);
    assert_check(&r, 0x03, 0x11, 0x00, None);
    // VERIFY reads too.
    let r = failing(IoType::Read, IoError::Os(5), &cdb10(0x2F, 0x02, 0, 2), &[0; 1024], 0);
    assert_check(&r, 0x03, 0x11, 0x00, None);
}

#[test]
fn bdev_write_errors_return_medium_error() {
    let r = failing(IoType::Write, IoError::Os(5), &cdb10(0x2A, 0, 0, 2), &[1; 1024], 0);
    assert_check(&r, 0x03, 0x0C, 0x00, None);
    // A WRITE SAME pattern write, and a flush.
    let r = failing(IoType::Write, IoError::Os(5), &cdb10(0x41, 0, 0, 2), &[1; 512], 0);
    assert_check(&r, 0x03, 0x0C, 0x00, None);
    let r = failing(IoType::Flush, IoError::Os(5), &cdb10(0x35, 0, 0, 0), &[], 0);
    assert_check(&r, 0x03, 0x0C, 0x00, None);
    let r = failing(IoType::WriteZeroes, IoError::Os(5), &cdb10(0x41, 0, 0, 2), &[0; 512], 0);
    assert_check(&r, 0x03, 0x0C, 0x00, None);
}

#[test]
fn bdev_out_of_space_returns_space_allocation_failed() {
    for errno in [28, 122] {
        let r = failing(IoType::Write, IoError::Os(errno), &cdb10(0x2A, 0, 0, 1), &[1; 512], 0);
        assert_check(&r, 0x07, 0x27, 0x07, None);
    }
}

#[test]
fn bdev_read_only_errors_return_write_protected() {
    let r = failing(IoType::Write, IoError::ReadOnly, &cdb10(0x2A, 0, 0, 1), &[1; 512], 0);
    assert_check(&r, 0x07, 0x27, 0x00, None);
    let r = failing(IoType::Write, IoError::Os(30), &cdb10(0x2A, 0, 0, 1), &[1; 512], 0);
    assert_check(&r, 0x07, 0x27, 0x00, None);
}

#[test]
fn bdev_resource_shortage_returns_busy() {
    for e in [IoError::NoMemory, IoError::Os(11), IoError::Os(12)] {
        let r = failing(IoType::Read, e, &cdb10(0x28, 0, 0, 1), &[], 512);
        assert_eq!(r, TaskResult { status: ScsiStatus::Busy, sense: None, data_in_len: 0 });
    }
}

#[test]
fn bdev_aborted_io_returns_aborted_command() {
    let r = failing(IoType::Read, IoError::Aborted, &cdb10(0x28, 0, 0, 1), &[], 512);
    assert_check(&r, 0x0B, 0x00, 0x00, None);
}

#[test]
fn bdev_unsupported_or_invalid_requests_map_to_illegal_request_or_hardware_error() {
    let r = failing(
        IoType::Unmap,
        IoError::Os(95),
        &[0x42, 0, 0, 0, 0, 0, 0, 0, 24, 0],
        &{
            let mut l = vec![0, 22, 0, 16, 0, 0, 0, 0];
            l.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 0]);
            l
        },
        0,
    );
    assert_check(&r, 0x05, 0x20, 0x00, Some([0xC0, 0, 0]));
    let r = failing(IoType::Write, IoError::Unsupported, &cdb10(0x2A, 0, 0, 1), &[1; 512], 0);
    assert_check(&r, 0x05, 0x20, 0x00, Some([0xC0, 0, 0]));
    let r = failing(IoType::Read, IoError::OutOfRange, &cdb10(0x28, 0, 0, 1), &[], 512);
    assert_lba_out_of_range(&r);
    let r = failing(IoType::Read, IoError::InvalidLength, &cdb10(0x28, 0, 0, 1), &[], 512);
    assert_check(&r, 0x04, 0x44, 0x00, None);
}

#[test]
fn reading_past_the_end_of_a_shrunken_file_returns_medium_error() {
    let (f, b) = file_bdev(64, uring::Flavor::Uring, true);
    let mut h = H::new(b);
    std::fs::OpenOptions::new().write(true).open(&f.0).unwrap().set_len(0).unwrap();
    let (r, _) = h.cmd_in(&cdb10(0x28, 0, 8, 2), 1024);
    assert_check(&r, 0x03, 0x11, 0x00, None);
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Random CDBs (mostly supported opcodes with random fields, often small enough to execute),
/// random CDB lengths and buffer sizes, resizes and resets: nothing panics, every command
/// completes exactly once and outside `submit`, and results are well formed.
#[test]
fn random_cdbs_never_panic_and_always_complete_once() {
    let b = malloc_bdev(512, 64);
    let mut h = H::new(b.clone());
    let mut rng = Rng(0x1234_5678_9ABC_DEF1);
    let opcodes: Vec<u8> = crate::cdb::OPS.iter().map(|o| o.opcode).collect();
    let mut submitted = 0;
    for round in 0..600 {
        let mut batch: Vec<(u64, Vec<u8>, Vec<u8>, usize)> = Vec::new();
        for _ in 0..8 {
            let mut cdb = [0u8; 32];
            for x in cdb.iter_mut() {
                *x = rng.next() as u8;
            }
            cdb[0] =
                if rng.below(6) == 0 { rng.next() as u8 } else { opcodes[rng.below(opcodes.len() as u64) as usize] };
            if rng.below(2) == 0 {
                // Mostly-zero fields: small LBAs and lengths, few reserved bits.
                let keep = rng.next() as u8 & 0x1F;
                for x in cdb[1..].iter_mut() {
                    *x &= keep & (rng.next() as u8);
                }
            }
            if cdb[0] == 0x9E {
                cdb[1] = (cdb[1] & 0xE0) | 0x10;
            }
            if cdb[0] == 0xA3 && rng.below(2) == 0 {
                cdb[1] = 0x0C;
            }
            let cdb_len = if rng.below(4) == 0 { rng.below(33) as usize } else { 32 };
            let mut out: Vec<u8> =
                (0..rng.below(9000)).map(|_| if rng.below(3) == 0 { rng.next() as u8 } else { 0 }).collect();
            let mut inb = vec![0u8; rng.below(9000) as usize];
            let mut t = ScsiTask::new(&cdb, iovs(&mut out, &ODD), iovs(&mut inb, &ODD));
            t.cdb_len = cdb_len;
            let tag = h.submit(t);
            let cap = inb.len();
            batch.push((tag, out, inb, cap));
            submitted += 1;
        }
        if round % 50 == 7 {
            b.resize(32 + rng.below(33)).unwrap();
        }
        let reset = if round % 20 == 3 { Some(h.reset()) } else { None };
        for (tag, _out, _in, cap) in &batch {
            let r = h.wait(*tag);
            assert_eq!(r.sense.is_some(), r.status == ScsiStatus::CheckCondition, "{r:?}");
            assert!(r.data_in_len as usize <= *cap);
            if r.status != ScsiStatus::Good {
                assert_eq!(r.data_in_len, 0);
            }
        }
        if let Some(reset) = reset {
            assert_eq!(h.wait(reset), TaskResult::good(0));
        }
        assert_eq!(h.ch.inflight(), 0);
    }
    let done = h.rec.done.borrow().len();
    assert!(done >= submitted, "{done} < {submitted}");
}
