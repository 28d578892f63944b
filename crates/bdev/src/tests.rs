#![allow(clippy::cast_possible_truncation)] // test sizes are small
use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vstor_reactor::{Mode, Reactor, ReactorConfig};

use crate::mem::AlignedBuf;
use crate::*;

/// Records completions and checks that none arrives while a submit call is running.
#[derive(Default)]
struct Recorder {
    done: RefCell<Vec<(u64, IoResult)>>,
    in_submit: Cell<bool>,
    reentered: Cell<bool>,
}

impl IoSink for Recorder {
    fn io_done(&self, tag: u64, result: IoResult) {
        if self.in_submit.get() {
            self.reentered.set(true);
        }
        self.done.borrow_mut().push((tag, result));
    }
}

struct Harness {
    r: Reactor,
    rec: Rc<Recorder>,
    next_tag: u64,
}

impl Harness {
    fn new() -> Self {
        let (r, _h) = Reactor::new_local(ReactorConfig { mode: Mode::Poll, ..Default::default() }).unwrap();
        Self { r, rec: Rc::new(Recorder::default()), next_tag: 0 }
    }

    fn channel(&mut self, b: &Arc<Bdev>) -> BdevChannel {
        BdevChannel::new(b.clone(), &mut self.r).expect("channel")
    }

    fn submit(&mut self, ch: &mut BdevChannel, op: IoOp) -> u64 {
        self.next_tag += 1;
        let tag = self.next_tag;
        self.rec.in_submit.set(true);
        ch.submit(op, IoCallback { sink: self.rec.clone(), tag });
        self.rec.in_submit.set(false);
        tag
    }

    /// Runs the reactor until `tag` completes; returns its result.
    fn wait(&mut self, tag: u64) -> IoResult {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some((_, r)) = self.rec.done.borrow().iter().find(|(t, _)| *t == tag) {
                assert!(!self.rec.reentered.get(), "completion ran inside submit");
                return *r;
            }
            assert!(Instant::now() < deadline, "I/O {tag} did not complete");
            self.r.run_once();
        }
    }

    fn run(&mut self, ch: &mut BdevChannel, op: IoOp) -> IoResult {
        let t = self.submit(ch, op);
        self.wait(t)
    }
}

fn params(name: &str, block_size: u32, num_blocks: u64) -> BdevParams {
    BdevParams { name: name.into(), uuid: None, block_size, num_blocks, read_only: false }
}

/// iovecs over `buf`, split into pieces of `seg` bytes.
fn iovs(buf: &mut AlignedBuf, seg: usize) -> IoVecs {
    let mut v = IoVecs::new();
    let len = buf.len();
    let mut off = 0;
    while off < len {
        let n = seg.min(len - off);
        // SAFETY: the buffer outlives the I/O in every test (each test waits for completion
        // before dropping it) and no reference to it is held meanwhile.
        unsafe { v.push_raw(buf.as_mut_ptr().add(off), n) };
        off += n;
    }
    v
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn buf_with(data: &[u8], align: usize) -> AlignedBuf {
    let mut b = AlignedBuf::zeroed(data.len(), align).unwrap();
    b.as_mut_slice().copy_from_slice(data);
    b
}

fn read(h: &mut Harness, ch: &mut BdevChannel, off: u64, blocks: u64, seg: usize) -> Vec<u8> {
    let bs = u64::from(ch.bdev().block_size());
    let mut b = AlignedBuf::zeroed((blocks * bs) as usize, 4096).unwrap();
    b.as_mut_slice().fill(0xAA);
    let r = h.run(ch, IoOp::Read { offset_blocks: off, num_blocks: blocks, iovs: iovs(&mut b, seg) });
    assert_eq!(r, Ok(()));
    b.as_slice().to_vec()
}

fn write(h: &mut Harness, ch: &mut BdevChannel, off: u64, data: &[u8], seg: usize) {
    let bs = u64::from(ch.bdev().block_size());
    let mut b = buf_with(data, 4096);
    let r = h.run(
        ch,
        IoOp::Write { offset_blocks: off, num_blocks: data.len() as u64 / bs, iovs: iovs(&mut b, seg), fua: false },
    );
    assert_eq!(r, Ok(()));
}

#[test]
fn null_reads_return_zeroes_and_writes_succeed() {
    let mut h = Harness::new();
    let b = null::create(params("n0", 512, 1024)).unwrap();
    let mut ch = h.channel(&b);
    write(&mut h, &mut ch, 0, &pattern(1, 4096), 4096);
    assert!(read(&mut h, &mut ch, 0, 8, 1000).iter().all(|&x| x == 0));
    assert_eq!(h.run(&mut ch, IoOp::Flush), Ok(()));
}

#[test]
fn malloc_reads_back_what_was_written_across_split_buffers() {
    let mut h = Harness::new();
    let b = malloc::create(params("m0", 512, 2048), false).unwrap();
    let mut ch = h.channel(&b);
    let data = pattern(7, 64 * 512);
    write(&mut h, &mut ch, 100, &data, 3000);
    assert_eq!(read(&mut h, &mut ch, 100, 64, 777), data);
    // Neighbouring blocks are untouched.
    assert!(read(&mut h, &mut ch, 99, 1, 512).iter().all(|&x| x == 0));
}

#[test]
fn malloc_memfd_works_like_anonymous_memory() {
    let mut h = Harness::new();
    let b = malloc::create(params("m1", 4096, 64), true).unwrap();
    let mut ch = h.channel(&b);
    let data = pattern(3, 8192);
    write(&mut h, &mut ch, 10, &data, 8192);
    assert_eq!(read(&mut h, &mut ch, 10, 2, 4096), data);
    assert_eq!(b.config().unwrap().1["memfd"], serde_json::json!(true));
}

#[test]
fn unmap_and_write_zeroes_clear_data_on_malloc() {
    let mut h = Harness::new();
    let b = malloc::create(params("m2", 512, 256), false).unwrap();
    let mut ch = h.channel(&b);
    write(&mut h, &mut ch, 0, &pattern(9, 256 * 512), 65536);
    let r = h.run(
        &mut ch,
        IoOp::Unmap {
            ranges: smallvec![
                BlockRange { offset_blocks: 10, num_blocks: 5 },
                BlockRange { offset_blocks: 100, num_blocks: 1 }
            ],
        },
    );
    assert_eq!(r, Ok(()));
    assert_eq!(h.run(&mut ch, IoOp::WriteZeroes { offset_blocks: 200, num_blocks: 56 }), Ok(()));
    let all = read(&mut h, &mut ch, 0, 256, 65536);
    let zero = |from: usize, n: usize| all[from * 512..(from + n) * 512].iter().all(|&x| x == 0);
    assert!(zero(10, 5) && zero(100, 1) && zero(200, 56));
    assert!(!zero(9, 1) && !zero(15, 1) && !zero(199, 1));
}

#[test]
fn bad_requests_complete_with_errors_not_panics() {
    let mut h = Harness::new();
    let b = malloc::create(params("m3", 512, 100), false).unwrap();
    let mut ch = h.channel(&b);
    let mut buf = AlignedBuf::zeroed(1024, 512).unwrap();
    let past_end = IoOp::Read { offset_blocks: 99, num_blocks: 2, iovs: iovs(&mut buf, 1024) };
    assert_eq!(h.run(&mut ch, past_end), Err(IoError::OutOfRange));
    let wraps = IoOp::Read { offset_blocks: u64::MAX, num_blocks: 2, iovs: iovs(&mut buf, 1024) };
    assert_eq!(h.run(&mut ch, wraps), Err(IoError::OutOfRange));
    let short_buffer = IoOp::Write { offset_blocks: 0, num_blocks: 3, iovs: iovs(&mut buf, 1024), fua: false };
    assert_eq!(h.run(&mut ch, short_buffer), Err(IoError::InvalidLength));
    let huge = IoOp::WriteZeroes { offset_blocks: 1, num_blocks: u64::MAX };
    assert_eq!(h.run(&mut ch, huge), Err(IoError::OutOfRange));
    let unmap = IoOp::Unmap { ranges: smallvec![BlockRange { offset_blocks: 50, num_blocks: 51 }] };
    assert_eq!(h.run(&mut ch, unmap), Err(IoError::OutOfRange));
    // The channel still works afterwards, and the errors were counted.
    assert_eq!(h.run(&mut ch, IoOp::Flush), Ok(()));
    assert_eq!(b.stats().io_errors, 5);
}

#[test]
fn read_only_bdevs_refuse_writes_unmaps_and_write_zeroes() {
    let mut h = Harness::new();
    let b = malloc::create(BdevParams { read_only: true, ..params("ro", 512, 16) }, false).unwrap();
    let mut ch = h.channel(&b);
    let mut buf = AlignedBuf::zeroed(512, 512).unwrap();
    assert_eq!(
        h.run(&mut ch, IoOp::Write { offset_blocks: 0, num_blocks: 1, iovs: iovs(&mut buf, 512), fua: false }),
        Err(IoError::ReadOnly)
    );
    assert_eq!(h.run(&mut ch, IoOp::WriteZeroes { offset_blocks: 0, num_blocks: 1 }), Err(IoError::ReadOnly));
    assert_eq!(
        h.run(&mut ch, IoOp::Unmap { ranges: smallvec![BlockRange { offset_blocks: 0, num_blocks: 1 }] }),
        Err(IoError::ReadOnly)
    );
    assert!(!b.io_type_supported(IoType::Write));
    assert_eq!(h.run(&mut ch, IoOp::Read { offset_blocks: 0, num_blocks: 1, iovs: iovs(&mut buf, 512) }), Ok(()));
}

#[test]
fn statistics_count_ops_and_bytes_per_type() {
    let mut h = Harness::new();
    let b = malloc::create(params("st", 512, 64), false).unwrap();
    let mut ch = h.channel(&b);
    write(&mut h, &mut ch, 0, &pattern(1, 2048), 2048);
    read(&mut h, &mut ch, 0, 4, 2048);
    read(&mut h, &mut ch, 4, 2, 1024);
    h.run(&mut ch, IoOp::Unmap { ranges: smallvec![BlockRange { offset_blocks: 0, num_blocks: 8 }] }).unwrap();
    let s = b.stats();
    assert_eq!((s.num_write_ops, s.bytes_written), (1, 2048));
    assert_eq!((s.num_read_ops, s.bytes_read), (2, 3072));
    assert_eq!((s.num_unmap_ops, s.bytes_unmapped), (1, 4096));
    assert_eq!(s.queue_depth, 0);
    drop(ch);
    // Closed channels keep counting toward the bdev's totals.
    assert_eq!(b.stats().num_read_ops, 2);
    assert!(b.channel_stats().is_empty());
}

#[test]
fn registry_names_are_unique_and_claimed_bdevs_cannot_be_deleted() {
    let reg = BdevRegistry::new();
    let b = reg.register(malloc::create(params("Malloc0", 512, 8), false).unwrap()).unwrap();
    let dup = reg.register(malloc::create(params("Malloc0", 512, 8), false).unwrap());
    assert!(matches!(dup, Err(BdevError::Exists(_))));
    assert_eq!(reg.get(&b.uuid().to_string()).unwrap().name(), "Malloc0");
    b.claim("vhost.0", true).unwrap();
    assert!(matches!(b.claim("other", false), Err(BdevError::Claimed { .. })));
    let e = reg.unregister("Malloc0", malloc::PRODUCT).unwrap_err();
    assert!(e.to_string().contains("vhost.0"), "{e}");
    let e = reg.unregister("Malloc0", null::PRODUCT).unwrap_err();
    assert!(matches!(e, BdevError::WrongType { .. }));
    b.release("vhost.0");
    reg.unregister("Malloc0", malloc::PRODUCT).unwrap();
    assert!(reg.get("Malloc0").is_none());
    assert!(matches!(reg.unregister("Malloc0", malloc::PRODUCT), Err(BdevError::NotFound(_))));
}

#[test]
fn deleting_a_claimed_bdev_asks_its_holders_and_proceeds_only_if_they_let_go() {
    let reg = BdevRegistry::new();
    let b = reg.register(malloc::create(params("Malloc1", 512, 8), false).unwrap()).unwrap();
    // A holder that lets go when asked (a SCSI target hot-removing its LUN), and one that
    // does not (a vhost-blk controller).
    let asked = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    b.claim("blk", true).unwrap();
    let e = reg.unregister("Malloc1", malloc::PRODUCT).unwrap_err();
    assert!(e.to_string().contains("blk"), "{e}");
    b.release("blk");
    b.claim("lun", true).unwrap();
    let weak = Arc::downgrade(&b);
    let a2 = asked.clone();
    b.listen(move |e| {
        if *e == BdevEvent::RemoveRequested {
            a2.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            if let Some(b) = weak.upgrade() {
                b.release("lun");
            }
        }
    });
    reg.unregister("Malloc1", malloc::PRODUCT).unwrap();
    assert_eq!(asked.load(std::sync::atomic::Ordering::SeqCst), 1, "asked once, when it held a claim");
    assert!(reg.get("Malloc1").is_none());
}

#[test]
fn shared_claims_coexist_but_exclude_an_exclusive_one() {
    let b = null::create(params("n1", 512, 8)).unwrap();
    b.claim("a", false).unwrap();
    b.claim("b", false).unwrap();
    assert!(b.claim("c", true).is_err());
    b.release("a");
    b.release("b");
    b.claim("c", true).unwrap();
}

#[test]
fn invalid_geometry_is_refused_naming_the_parameter() {
    let e = null::create(params("x", 1000, 8)).unwrap_err();
    assert_eq!(e.param(), Some("block_size"));
    let e = null::create(params("x", 512, 0)).unwrap_err();
    assert_eq!(e.param(), Some("num_blocks"));
    let e = null::create(params("bad name", 512, 8)).unwrap_err();
    assert_eq!(e.param(), Some("name"));
    let e = null::create(params("x", 4096, u64::MAX / 2)).unwrap_err();
    assert_eq!(e.param(), Some("num_blocks"));
}

#[test]
fn resize_notifies_listeners_and_moves_the_end() {
    let mut h = Harness::new();
    let b = null::create(params("n2", 512, 8)).unwrap();
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let s2 = seen.clone();
    b.listen(move |e| s2.lock().unwrap().push(e.clone()));
    b.resize(16).unwrap();
    assert_eq!(*seen.lock().unwrap(), vec![BdevEvent::Resized { num_blocks: 16 }]);
    let mut ch = h.channel(&b);
    assert_eq!(h.run(&mut ch, IoOp::WriteZeroes { offset_blocks: 15, num_blocks: 1 }), Ok(()));
}

fn temp_file(blocks: u64, bs: u64) -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir_in(std::env::var("VSTOR_TEST_DIR").unwrap_or_else(|_| "/var/tmp".into())).unwrap();
    let path = dir.path().join("disk.img");
    let f = std::fs::File::create(&path).unwrap();
    f.set_len(blocks * bs).unwrap();
    (dir, path.to_string_lossy().into_owned())
}

fn uring_opts(name: &str, path: &str) -> uring::UringOptions {
    uring::UringOptions {
        name: name.into(),
        filename: path.into(),
        block_size: None,
        uuid: None,
        readonly: false,
        flavor: uring::Flavor::Uring,
        fallocate: true,
    }
}

#[test]
fn uring_round_trips_data_including_misaligned_buffers() {
    let mut h = Harness::new();
    let (_d, path) = temp_file(4096, 512);
    let b = uring::create(uring_opts("u0", &path)).unwrap();
    assert_eq!(b.num_blocks() * u64::from(b.block_size()), 4096 * 512);
    let mut ch = h.channel(&b);
    let bs = b.block_size() as usize;
    let data = pattern(11, 16 * bs);
    write(&mut h, &mut ch, 8, &data, 4096);
    assert_eq!(read(&mut h, &mut ch, 8, 16, 4096), data);
    // Buffers at odd addresses go through a bounce buffer and still land right.
    let mut raw = vec![0u8; 16 * bs + 1];
    raw[1..].copy_from_slice(&pattern(12, 16 * bs));
    let mut v = IoVecs::new();
    // SAFETY: `raw` outlives the I/O and is not borrowed while it runs.
    unsafe { v.push_raw(raw.as_mut_ptr().add(1), 16 * bs) };
    assert_eq!(h.run(&mut ch, IoOp::Write { offset_blocks: 100, num_blocks: 16, iovs: v, fua: true }), Ok(()));
    assert_eq!(read(&mut h, &mut ch, 100, 16, 100_000), pattern(12, 16 * bs));
    let mut out = vec![0u8; 16 * bs + 3];
    let mut v = IoVecs::new();
    // SAFETY: as above.
    unsafe { v.push_raw(out.as_mut_ptr().add(3), 16 * bs) };
    assert_eq!(h.run(&mut ch, IoOp::Read { offset_blocks: 8, num_blocks: 16, iovs: v }), Ok(()));
    assert_eq!(&out[3..], &data[..]);
    assert_eq!(h.run(&mut ch, IoOp::Flush), Ok(()));
    // What was written is in the file itself.
    let file = std::fs::read(&path).unwrap();
    assert_eq!(&file[8 * bs..24 * bs], &data[..]);
}

#[test]
fn uring_unmap_and_write_zeroes_leave_zeroes_in_the_file() {
    let mut h = Harness::new();
    let (_d, path) = temp_file(2048, 512);
    let b = uring::create(uring_opts("u1", &path)).unwrap();
    let bs = b.block_size() as u64;
    let n = 2048 * 512 / bs;
    let mut ch = h.channel(&b);
    let data = pattern(5, (n * bs) as usize);
    write(&mut h, &mut ch, 0, &data, 1 << 20);
    let blocks_4k = 4096 / bs;
    assert_eq!(
        h.run(
            &mut ch,
            IoOp::Unmap { ranges: smallvec![BlockRange { offset_blocks: blocks_4k, num_blocks: blocks_4k * 2 }] }
        ),
        Ok(())
    );
    assert_eq!(h.run(&mut ch, IoOp::WriteZeroes { offset_blocks: blocks_4k * 10, num_blocks: blocks_4k * 3 }), Ok(()));
    let file = std::fs::read(&path).unwrap();
    assert!(file[4096..3 * 4096].iter().all(|&x| x == 0), "punched range reads zero");
    assert!(file[10 * 4096..13 * 4096].iter().all(|&x| x == 0), "zeroed range reads zero");
    assert_eq!(&file[..4096], &data[..4096]);
    assert_eq!(&file[3 * 4096..10 * 4096], &data[3 * 4096..10 * 4096]);
}

#[test]
fn uring_handles_more_ios_than_the_ring_holds() {
    let mut h = Harness::new();
    let (_d, path) = temp_file(8192, 512);
    let b = uring::create(uring_opts("u2", &path)).unwrap();
    let bs = b.block_size() as usize;
    let blocks = 8192 * 512 / bs;
    let mut ch = h.channel(&b);
    // 3000 single-block writes at once: more than the SQ (1024) and the op table (2048).
    let n = 3000.min(blocks);
    let mut bufs: Vec<AlignedBuf> = (0..n).map(|i| buf_with(&pattern(i as u64, bs), 4096)).collect();
    let tags: Vec<u64> = (0..n)
        .map(|i| {
            let v = iovs(&mut bufs[i], bs);
            h.submit(&mut ch, IoOp::Write { offset_blocks: i as u64, num_blocks: 1, iovs: v, fua: false })
        })
        .collect();
    for t in tags {
        assert_eq!(h.wait(t), Ok(()));
    }
    for i in [0, 1023, 1024, 2047, 2048, n - 1] {
        assert_eq!(read(&mut h, &mut ch, i as u64, 1, bs), pattern(i as u64, bs), "block {i}");
    }
}

#[test]
fn uring_refuses_missing_files_and_blocks_bigger_than_the_file() {
    let e = uring::create(uring_opts("u3", "/nonexistent/disk.img")).unwrap_err();
    assert!(e.to_string().contains("/nonexistent/disk.img"), "{e}");
    let (_d, path) = temp_file(1, 512);
    let e = uring::create(uring::UringOptions { block_size: Some(4096), ..uring_opts("u4", &path) }).unwrap_err();
    assert_eq!(e.param(), Some("filename"));
}

#[test]
fn reset_completes_after_earlier_io() {
    let mut h = Harness::new();
    let (_d, path) = temp_file(1024, 512);
    let b = uring::create(uring_opts("u5", &path)).unwrap();
    let bs = b.block_size() as usize;
    let mut ch = h.channel(&b);
    let mut bufs: Vec<AlignedBuf> = (0..8).map(|i| buf_with(&pattern(i, bs), 4096)).collect();
    let writes: Vec<u64> = (0..8)
        .map(|i| {
            let v = iovs(&mut bufs[i], bs);
            h.submit(&mut ch, IoOp::Write { offset_blocks: i as u64, num_blocks: 1, iovs: v, fua: false })
        })
        .collect();
    let reset = h.submit(&mut ch, IoOp::Reset);
    assert_eq!(h.wait(reset), Ok(()));
    // Every write submitted before the reset has completed by the time the reset does.
    let done = h.rec.done.borrow();
    let pos = |t: u64| done.iter().position(|(x, _)| *x == t).expect("completed");
    for w in writes {
        assert!(pos(w) < pos(reset));
    }
}

#[test]
fn iovec_sub_and_offset_copies_agree_with_byte_arithmetic_for_every_range() {
    let mut buf = AlignedBuf::zeroed(100, 8).unwrap();
    for (i, b) in buf.as_mut_slice().iter_mut().enumerate() {
        *b = i as u8;
    }
    for seg in [1usize, 7, 30, 100] {
        let v = iovs(&mut buf, seg);
        for off in 0..=100u64 {
            for len in 0..=(100 - off) {
                let s = v.sub(off, len).unwrap_or_else(|| panic!("sub({off}, {len}) of segments of {seg}"));
                let mut out = vec![0u8; len as usize];
                assert_eq!(s.copy_to(&mut out), len as usize);
                let want: Vec<u8> = (off..off + len).map(|b| b as u8).collect();
                assert_eq!(out, want, "sub({off}, {len}) of segments of {seg}");
                assert_eq!(s.total_len(), len);
                assert!(s.as_slice().iter().all(|i| i.iov_len > 0), "no empty segments");
                let mut at = vec![0u8; len as usize];
                assert_eq!(v.copy_to_at(off, &mut at), len as usize);
                assert_eq!(at, want, "copy_to_at({off}, {len})");
            }
            assert!(v.sub(off, 101 - off).is_none(), "past the end");
        }
    }
    let v = iovs(&mut buf, 30);
    assert!(v.set_last_byte(0xAB));
    assert_eq!(buf.as_slice()[99], 0xAB, "the last byte of the last segment");
    assert!(!IoVecs::new().set_last_byte(1));
}

#[test]
fn iovec_sub_ranges_cover_exactly_the_bytes_asked_for() {
    let mut buf = AlignedBuf::zeroed(100, 8).unwrap();
    for (i, b) in buf.as_mut_slice().iter_mut().enumerate() {
        *b = i as u8;
    }
    let v = iovs(&mut buf, 30); // segments of 30, 30, 30, 10
    let s = v.sub(25, 40).unwrap();
    assert_eq!((s.len(), s.total_len()), (3, 40));
    let mut out = vec![0u8; 40];
    s.copy_to(&mut out);
    assert_eq!(out, (25u8..65).collect::<Vec<_>>());
    assert!(v.sub(90, 11).is_none());
    assert!(v.sub(u64::MAX, 2).is_none());
    assert_eq!(v.sub(100, 0).unwrap().total_len(), 0);
    let mut four = [0u8; 4];
    assert_eq!(v.copy_to_at(98, &mut four), 2);
    assert_eq!(&four[..2], &[98, 99]);
    assert_eq!(v.copy_from_at(10, &[0xEE; 3]), 3);
    assert_eq!(&buf.as_slice()[9..14], &[9, 0xEE, 0xEE, 0xEE, 13]);
}

#[test]
fn delay_bdevs_hold_io_for_their_latency_then_pass_it_on() {
    let mut h = Harness::new();
    let base = malloc::create(params("dbase", 512, 64), false).unwrap();
    let lat = delay::Latencies { avg_read: 5_000, p99_read: 5_000, avg_write: 20_000, p99_write: 20_000 };
    let d = delay::create("slow", None, base.clone(), lat).unwrap();
    assert!(base.is_claimed(), "the base is claimed by the delay bdev");
    let mut ch = h.channel(&d);
    let t0 = Instant::now();
    write(&mut h, &mut ch, 4, &pattern(3, 1024), 1024);
    let w = t0.elapsed();
    let t1 = Instant::now();
    assert_eq!(read(&mut h, &mut ch, 4, 2, 512), pattern(3, 1024));
    let r = t1.elapsed();
    assert!(w >= Duration::from_millis(20) && r >= Duration::from_millis(5), "write {w:?}, read {r:?}");
    assert!(r < w, "reads use the read latency");
    delay::update(&d, delay::LatencyType::AvgRead, 0).unwrap();
    let t2 = Instant::now();
    read(&mut h, &mut ch, 4, 2, 512);
    assert!(t2.elapsed() < Duration::from_millis(5));
    // The data went to the base.
    let mut bch = h.channel(&base);
    assert_eq!(read(&mut h, &mut bch, 4, 2, 512), pattern(3, 1024));
    drop(ch);
    d.on_delete();
    assert!(!base.is_claimed(), "deleting the delay bdev releases its base");
}

#[test]
fn error_bdevs_fail_hold_and_corrupt_exactly_the_io_they_are_told_to() {
    use error::{ErrorType, Injection, Target};
    let mut h = Harness::new();
    let base = malloc::create(params("ebase", 512, 64), false).unwrap();
    let e = error::create(None, base.clone()).unwrap();
    assert_eq!(e.name(), "EE_ebase");
    assert!(base.is_claimed());
    let mut ch = h.channel(&e);
    write(&mut h, &mut ch, 0, &pattern(1, 1024), 512);
    let inj = |target, kind, num| Injection { target, kind, num, queue_depth: 0, corrupt_offset: 0, corrupt_value: 0 };

    // Two failed reads, then reads work again; writes were never affected.
    error::inject(&e, inj(Target::One(IoType::Read), ErrorType::Failure, 2)).unwrap();
    let mut b = AlignedBuf::zeroed(512, 4096).unwrap();
    for _ in 0..2 {
        let r = h.run(&mut ch, IoOp::Read { offset_blocks: 0, num_blocks: 1, iovs: iovs(&mut b, 512) });
        assert_eq!(r, Err(IoError::Os(libc::EIO)));
    }
    write(&mut h, &mut ch, 2, &pattern(2, 512), 512);
    assert_eq!(read(&mut h, &mut ch, 0, 2, 512), pattern(1, 1024));

    // A pending write is held until resumed, then lands.
    error::inject(&e, inj(Target::One(IoType::Write), ErrorType::Pending, 1)).unwrap();
    let mut wb = buf_with(&pattern(9, 512), 4096);
    let held = h.submit(&mut ch, IoOp::Write { offset_blocks: 5, num_blocks: 1, iovs: iovs(&mut wb, 512), fua: false });
    for _ in 0..1000 {
        h.r.run_once();
    }
    assert!(h.rec.done.borrow().iter().all(|(t, _)| *t != held), "a pending I/O does not complete by itself");
    error::resume_pending(&e).unwrap();
    assert_eq!(h.wait(held), Ok(()));
    assert_eq!(read(&mut h, &mut ch, 5, 1, 512), pattern(9, 512));

    // A pending read is aborted by a reset, which then completes.
    error::inject(&e, inj(Target::One(IoType::Read), ErrorType::Pending, 1)).unwrap();
    let held = h.submit(&mut ch, IoOp::Read { offset_blocks: 0, num_blocks: 1, iovs: iovs(&mut b, 512) });
    let reset = h.submit(&mut ch, IoOp::Reset);
    assert_eq!(h.wait(reset), Ok(()));
    assert_eq!(h.wait(held), Err(IoError::Aborted));

    // Corruption: byte 3 of the next read is XORed; a corrupted write lands corrupted on the
    // base but leaves the submitter's buffer as it was.
    let c = Injection { corrupt_offset: 3, corrupt_value: 0xff, ..inj(Target::All, ErrorType::CorruptData, 1) };
    error::inject(&e, c).unwrap();
    let mut want = pattern(1, 512);
    want[3] ^= 0xff;
    assert_eq!(read(&mut h, &mut ch, 0, 1, 512), want);
    assert_eq!(read(&mut h, &mut ch, 0, 1, 512), pattern(1, 512), "only one read was corrupted");
    error::inject(&e, Injection { target: Target::One(IoType::Write), ..c }).unwrap();
    let data = pattern(4, 512);
    let mut wb = buf_with(&data, 4096);
    let r = h.run(&mut ch, IoOp::Write { offset_blocks: 7, num_blocks: 1, iovs: iovs(&mut wb, 512), fua: false });
    assert_eq!(r, Ok(()));
    assert_eq!(wb.as_slice(), &data[..], "the submitter's buffer is untouched");
    let mut stored = data.clone();
    stored[3] ^= 0xff;
    assert_eq!(read(&mut h, &mut ch, 7, 1, 512), stored);

    // Queue-depth trigger: only a read submitted while another I/O is in flight fails.
    error::inject(&e, Injection { queue_depth: 1, ..inj(Target::One(IoType::Read), ErrorType::Failure, 1) }).unwrap();
    assert_eq!(read(&mut h, &mut ch, 0, 1, 512), pattern(1, 512), "nothing in flight: not triggered");
    let (mut b1, mut b2) = (AlignedBuf::zeroed(512, 4096).unwrap(), AlignedBuf::zeroed(512, 4096).unwrap());
    error::inject(&e, inj(Target::One(IoType::Write), ErrorType::Pending, 1)).unwrap();
    let w = h.submit(&mut ch, IoOp::Write { offset_blocks: 9, num_blocks: 1, iovs: iovs(&mut b1, 512), fua: false });
    let r = h.run(&mut ch, IoOp::Read { offset_blocks: 0, num_blocks: 1, iovs: iovs(&mut b2, 512) });
    assert_eq!(r, Err(IoError::Os(libc::EIO)), "one in flight: triggered");
    error::resume_pending(&e).unwrap();
    assert_eq!(h.wait(w), Ok(()));

    // Clear stops everything; bad values are refused naming the parameter.
    error::inject(&e, inj(Target::All, ErrorType::Failure, 100)).unwrap();
    error::inject(&e, inj(Target::Clear, ErrorType::Failure, 0)).unwrap();
    assert_eq!(read(&mut h, &mut ch, 0, 1, 512), pattern(1, 512));
    let bad = error::inject(&e, Injection { corrupt_value: 0, ..c }).unwrap_err();
    assert_eq!(bad.param(), Some("corrupt_value"));
    assert!("nomem".parse::<ErrorType>().unwrap_err().contains("not supported"));
    drop(ch);
    e.on_delete();
    assert!(!base.is_claimed());
}
