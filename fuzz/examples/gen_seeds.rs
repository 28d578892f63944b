//! Writes the seed corpora under `fuzz/seeds/<target>/`: a handful of valid (and a few
//! deliberately malformed) inputs per target, in the layouts the harnesses in `src/` read.
//!
//! `cd fuzz && cargo run --example gen_seeds` (deterministic: rerunning rewrites the same files).
#![allow(clippy::cast_possible_truncation)]

use std::path::{Path, PathBuf};

use vstor_fuzz::virtio::{
    self, desc, Image, PackedRing, SplitRing, DATA, F_COMPLETE_AT_ONCE, F_EVENT_IDX, F_INDIRECT, F_INFLIGHT, F_RESTART,
    PACKED_BASE, VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_WRITE,
};
use vstor_fuzz::{blk, nvme, scsi, vfio_user as vfu, vhost_user as vu, Writer};

struct Out {
    dir: PathBuf,
    n: usize,
}

impl Out {
    fn new(root: &Path, target: &str) -> Self {
        let dir = root.join(target);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("seed directory");
        Self { dir, n: 0 }
    }

    fn put(&mut self, name: &str, data: &[u8]) {
        self.n += 1;
        std::fs::write(self.dir.join(format!("{:02}-{name}", self.n)), data).expect("write seed");
    }
}

// ---- virtio chains -------------------------------------------------------------------------------

fn split_seeds(root: &Path) {
    let mut o = Out::new(root, "virtio_split_chain");
    let size_sel = 3; // 8 entries
                      // Header + 512-byte data-in + status: the shape of a block read.
    let mut r = SplitRing::new(8);
    r.chain(&[(DATA, 16, false), (DATA + 0x100, 512, true), (DATA + 0x300, 1, true)]);
    r.chain(&[(DATA + 0x400, 16, false), (DATA + 0x500, 4096, false), (DATA + 0x1500, 1, true)]);
    o.put("direct", &virtio::input(0, size_sel, 0, &r.img));
    // Buffers crossing the A/B boundary (two iovecs), and one in region C.
    let mut r = SplitRing::new(8);
    r.chain(&[(0x3f00, 0x200, false), (vstor_fuzz::guest::C + 0x10, 64, true)]);
    o.put("regions", &virtio::input(F_COMPLETE_AT_ONCE, size_sel, 0, &r.img));
    // Indirect tables (and one chain that is direct).
    let mut r = SplitRing::new(8);
    r.indirect(DATA + 0x800, &[(DATA, 16, false), (DATA + 0x100, 512, true), (DATA + 0x300, 1, true)]);
    r.chain(&[(DATA, 16, false), (DATA + 0x300, 1, true)]);
    r.indirect(DATA + 0x900, &[(DATA, 8, false)]);
    o.put("indirect", &virtio::input(F_INDIRECT | F_EVENT_IDX, size_sel, 0, &r.img));
    // A loop (0 -> 1 -> 0), a next index out of range, readable after writable.
    let mut r = SplitRing::new(8);
    r.set_desc(0, DATA, 16, 1, 1);
    r.set_desc(1, DATA, 16, 1, 0);
    r.publish(0);
    r.set_desc(2, DATA, 16, 1, 200);
    r.publish(2);
    r.set_desc(3, DATA, 16, 3, 4);
    r.set_desc(4, DATA, 16, 0, 0);
    r.publish(3);
    o.put("malformed", &virtio::input(F_RESTART, size_sel, 0, &r.img));
    // The ring index wrapping: resume at 0xfffe with two chains published at 0xfffe and 0xffff
    // (slots 6 and 7), the available index now 0.
    let mut img = Image::new(DATA as usize);
    img.put(virtio::DESC, &desc(DATA, 16, 0, 0));
    img.put(virtio::DESC + 16, &desc(DATA + 0x300, 1, VIRTQ_DESC_F_WRITE, 0));
    img.u16(virtio::DRIVER + 4 + 2 * 6, 0).u16(virtio::DRIVER + 4 + 2 * 7, 1).u16(virtio::DRIVER + 2, 0);
    img.u16(virtio::SPLIT_DEVICE + 2, 0xfffe);
    o.put("wrap", &virtio::input(F_EVENT_IDX | F_COMPLETE_AT_ONCE | F_RESTART, size_sel, 0xfffe, &img));
    // An in-flight region from a previous backend: heads 1 and 0 in flight (taken in that order).
    let mut r = SplitRing::new(8);
    r.chain(&[(DATA, 16, false), (DATA + 0x300, 1, true)]);
    r.chain(&[(DATA + 0x400, 16, false), (DATA + 0x700, 1, true)]);
    let mut inflight = vec![0u8; vstor_virtio::inflight::queue_region_size(8) as usize];
    inflight[8..10].copy_from_slice(&1u16.to_le_bytes()); // version
    inflight[10..12].copy_from_slice(&8u16.to_le_bytes()); // desc_num
    inflight[16] = 1; // head 0 in flight
    inflight[16 + 8..16 + 16].copy_from_slice(&2u64.to_le_bytes());
    inflight[32] = 1; // head 1 in flight, taken first
    inflight[32 + 8..32 + 16].copy_from_slice(&1u64.to_le_bytes());
    let mut w = Writer::default();
    w.u8(F_INFLIGHT).u8(size_sel).u16(2).u32(0).u32(0).u32(0).bytes(&inflight).bytes(&r.img.0);
    o.put("inflight", &w.0);
    // Custom ring addresses (the used ring in region B).
    let mut img = Image::new(0x4010);
    img.put(0x3800, &desc(DATA, 16, 0, 0));
    img.u16(0x3c00 + 2, 1);
    let mut w = Writer::default();
    w.u8(virtio::F_CUSTOM_ADDRS).u8(1).u16(0).u32(0x3800).u32(0x3c00).u32(0x4000).bytes(&img.0);
    o.put("custom-addrs", &w.0);
}

fn packed_seeds(root: &Path) {
    let mut o = Out::new(root, "virtio_packed_chain");
    let mut r = PackedRing::new(8);
    r.chain(0, &[(DATA, 16, 0), (DATA + 0x100, 512, VIRTQ_DESC_F_WRITE), (DATA + 0x300, 1, VIRTQ_DESC_F_WRITE)]);
    r.chain(1, &[(DATA + 0x400, 16, 0), (DATA + 0x1500, 1, VIRTQ_DESC_F_WRITE)]);
    o.put("direct", &virtio::input(0, 8, PACKED_BASE, &r.img));
    // Indirect table.
    let mut r = PackedRing::new(8);
    let mut t = Vec::new();
    t.extend_from_slice(&desc(DATA, 16, 0, 0));
    t.extend_from_slice(&desc(DATA + 0x100, 512, 0, VIRTQ_DESC_F_WRITE));
    t.extend_from_slice(&desc(DATA + 0x300, 1, 0, VIRTQ_DESC_F_WRITE));
    r.img.put(DATA + 0x800, &t);
    r.chain(3, &[(DATA + 0x800, 48, VIRTQ_DESC_F_INDIRECT)]);
    r.chain(4, &[(0x3f00, 0x200, 0), (vstor_fuzz::guest::C, 16, VIRTQ_DESC_F_WRITE)]);
    o.put("indirect", &virtio::input(F_INDIRECT | F_EVENT_IDX, 8, PACKED_BASE, &r.img));
    // Wrapping: a 4-entry ring, starting at slot 3; a chain of 3 crosses the end.
    let mut r = PackedRing::new(4);
    r.chain(0, &[(DATA, 16, 0)]);
    r.chain(1, &[(DATA, 16, 0)]);
    r.chain(2, &[(DATA, 16, 0)]);
    r.chain(3, &[(DATA, 16, 0), (DATA, 16, 0), (DATA + 0x300, 1, VIRTQ_DESC_F_WRITE)]);
    o.put("wrap", &virtio::input(F_COMPLETE_AT_ONCE | F_RESTART, 4, PACKED_BASE, &r.img));
    // An odd size, a chain cut short, duplicate ids.
    let mut r = PackedRing::new(5);
    r.chain(2, &[(DATA, 16, 0)]);
    r.chain(2, &[(DATA, 16, 0)]);
    r.chain(4, &[(DATA, 16, 0), (DATA, 16, 0)]);
    r.img.put(virtio::DESC + 16 * 4, &[0; 16]);
    o.put("malformed", &virtio::input(F_EVENT_IDX, 5, PACKED_BASE, &r.img));
    o.put("inflight", &packed_inflight_seed());
}

/// A packed ring after a crash, with the in-flight region a previous backend left: chain 0
/// (slots 0-2) and chain 2 (slot 5) in flight, chain 1 (slots 3-4) completed out of order, its
/// used element over slot 0. A new chain (id 1 again) waits at slot 6. The frontend's base is
/// stale (slot 0), as QEMU's is after a crash.
fn packed_inflight_seed() -> Vec<u8> {
    let chain0 = [(DATA, 16, 0), (DATA + 0x100, 512, VIRTQ_DESC_F_WRITE), (DATA + 0x300, 1, VIRTQ_DESC_F_WRITE)];
    let chain1 = [(DATA + 0x400, 16, 0), (DATA + 0x700, 1, VIRTQ_DESC_F_WRITE)];
    let chain2 = [(DATA + 0x800, 16, 0)];
    let mut r = PackedRing::new(8);
    r.chain(0, &chain0);
    r.chain(1, &chain1);
    r.chain(2, &chain2);
    r.chain(1, &[(DATA + 0x900, 16, 0), (DATA + 0xa00, 1, VIRTQ_DESC_F_WRITE)]);
    let used = virtio::PACKED_F_AVAIL | virtio::PACKED_F_USED;
    r.img.put(virtio::DESC, &desc(0, 1, 1, used));
    // Region: 32-byte header, 32-byte entries.
    let mut g = vec![0u8; vstor_virtio::inflight::queue_region_size(8) as usize];
    let mut put = |off: usize, b: &[u8]| g[off..off + b.len()].copy_from_slice(b);
    put(0, &vstor_virtio::features::RING_PACKED.to_le_bytes());
    for (off, v) in [(8, 1u16), (10, 8), (12, 3), (14, 3), (16, 2), (18, 2)] {
        put(off, &v.to_le_bytes()); // version, desc_num, free heads, used indices
    }
    put(20, &[1, 1]); // wrap counters
    let entry = |i: usize| 32 + 32 * i;
    // Entries 0-2: chain 0; 3-4: chain 1 (freed); 5: chain 2. Free list 3 -> 4 -> 6 -> 7.
    let next = [1u16, 2, 3, 4, 6, 6, 7, 8];
    for (i, n) in next.iter().enumerate() {
        put(entry(i) + 2, &n.to_le_bytes());
    }
    let copies = [(0usize, 0u16, chain0[0]), (1, 0, chain0[1]), (2, 0, chain0[2]), (5, 2, chain2[0])];
    for (i, id, (addr, len, extra)) in copies {
        let flags = extra | virtio::PACKED_F_AVAIL | if i < 2 { 1 } else { 0 };
        put(entry(i) + 16, &id.to_le_bytes());
        put(entry(i) + 18, &flags.to_le_bytes());
        put(entry(i) + 20, &len.to_le_bytes());
        put(entry(i) + 24, &addr.to_le_bytes());
    }
    for (head, last, num, counter) in [(0usize, 2u16, 3u16, 1u64), (5, 5, 1, 3)] {
        put(entry(head), &[1]);
        put(entry(head) + 4, &last.to_le_bytes());
        put(entry(head) + 6, &num.to_le_bytes());
        put(entry(head) + 8, &counter.to_le_bytes());
    }
    let mut w = Writer::default();
    w.u8(F_INFLIGHT | F_COMPLETE_AT_ONCE).u8(8).u16(PACKED_BASE).u32(0).u32(0).u32(0).bytes(&g).bytes(&r.img.0);
    w.0
}

// ---- virtio-blk -----------------------------------------------------------------------------------

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
const T_DISCARD: u32 = 11;
const T_WRITE_ZEROES: u32 = 13;

fn blk_hdr(t: u32, sector: u64) -> Vec<u8> {
    let mut h = Vec::new();
    h.extend_from_slice(&t.to_le_bytes());
    h.extend_from_slice(&0u32.to_le_bytes());
    h.extend_from_slice(&sector.to_le_bytes());
    h
}

fn seg(sector: u64, num: u32, flags: u32) -> Vec<u8> {
    let mut s = sector.to_le_bytes().to_vec();
    s.extend_from_slice(&num.to_le_bytes());
    s.extend_from_slice(&flags.to_le_bytes());
    s
}

/// A batch of requests: (header bytes incl. segments, data-out len, data-in len). Requests at
/// DATA + 0x400 * k, data at 0x4000 + 0x1000 * k (region B, so some data buffers are a
/// separate mapping from the headers).
fn blk_batch(packed: bool, reqs: &[(Vec<u8>, u32, u32)]) -> Image {
    let size = 16u16;
    let mut split = SplitRing::new(size);
    let mut pk = PackedRing::new(size);
    for (k, (hdr, out, inl)) in reqs.iter().enumerate() {
        let h = DATA + 0x100 * k as u64;
        let data = 0x4000 + 0x1000 * (k as u64 % 4);
        let status = DATA + 0xf00 + k as u64;
        if packed {
            pk.img.put(h, hdr);
        } else {
            split.img.put(h, hdr);
        }
        let mut bufs = vec![(h, hdr.len() as u32, false)];
        if *out > 0 {
            bufs.push((data, *out, false));
        }
        if *inl > 0 {
            bufs.push((data, *inl, true));
        }
        bufs.push((status, 1, true));
        if packed {
            let pb: Vec<(u64, u32, u16)> =
                bufs.iter().map(|&(a, l, w)| (a, l, if w { VIRTQ_DESC_F_WRITE } else { 0 })).collect();
            pk.chain(k as u16, &pb);
        } else {
            split.chain(&bufs);
        }
    }
    if packed {
        pk.img
    } else {
        split.img
    }
}

fn blk_input(flags: u8, g: u8, img: &Image) -> Vec<u8> {
    let mut w = Writer::default();
    let size_sel = if flags & blk::F_PACKED != 0 { 16 } else { 4 };
    w.u8(flags).u8(size_sel).u8(g).u8(0).bytes(&img.0);
    w.0
}

fn blk_seeds(root: &Path) {
    let mut o = Out::new(root, "virtio_blk_request");
    let rw = vec![
        (blk_hdr(T_OUT, 8), 4096, 0),
        (blk_hdr(T_IN, 8), 0, 4096),
        (blk_hdr(T_IN, 2047), 0, 512),
        (blk_hdr(T_FLUSH, 0), 0, 0),
        (blk_hdr(T_GET_ID, 0), 0, 20),
    ];
    o.put("rw-split", &blk_input(0, 0, &blk_batch(false, &rw)));
    o.put("rw-packed-4k", &blk_input(blk::F_PACKED | blk::F_4K | blk::F_DIRTY_LOG, 2, &blk_batch(true, &rw)));
    let mut dz = vec![(blk_hdr(T_DISCARD, 0), 0, 0), (blk_hdr(T_WRITE_ZEROES, 0), 0, 0)];
    dz[0].0.extend(seg(0, 8, 0));
    dz[0].0.extend(seg(64, 16, 0));
    dz[1].0.extend(seg(128, 8, 1));
    o.put("discard-wz", &blk_input(blk::F_DISCARD | blk::F_WRITE_ZEROES, 0, &blk_batch(false, &dz)));
    let bad = vec![
        (blk_hdr(T_IN, u64::MAX / 256), 0, 512),
        (blk_hdr(T_OUT, 3), 100, 0),
        (blk_hdr(99, 0), 0, 0),
        (blk_hdr(T_IN, 2048), 0, 512),
        (vec![0; 8], 0, 0),
    ];
    o.put("bad-requests", &blk_input(blk::F_EVENT | blk::F_4K, 1, &blk_batch(false, &bad)));
    o.put("readonly", &blk_input(blk::F_READONLY | blk::F_DISCARD, 0, &blk_batch(false, &rw)));
    o.put("null-bdev-packed", &blk_input(blk::F_PACKED | blk::F_EVENT, 1, &blk_batch(true, &rw)));
}

// ---- SCSI ------------------------------------------------------------------------------------------

fn cdb10(op: u8, b1: u8, lba: u32, len: u16) -> Vec<u8> {
    let mut c = vec![0u8; 10];
    c[0] = op;
    c[1] = b1;
    c[2..6].copy_from_slice(&lba.to_be_bytes());
    c[7..9].copy_from_slice(&len.to_be_bytes());
    c
}

fn cdb16(op: u8, b1: u8, lba: u64, len: u32) -> Vec<u8> {
    let mut c = vec![0u8; 16];
    c[0] = op;
    c[1] = b1;
    c[2..10].copy_from_slice(&lba.to_be_bytes());
    c[10..14].copy_from_slice(&len.to_be_bytes());
    c
}

fn scsi_seeds(root: &Path) {
    use vstor_scsi::opcode as op;
    let mut o = Out::new(root, "scsi_cdb");
    let w8 = scsi::K_WAIT;
    // Identity and capacity.
    let mut w = Writer::default();
    w.u8(0);
    scsi::command(&mut w, w8, &[op::TEST_UNIT_READY, 0, 0, 0, 0, 0], &[], 0, 0);
    scsi::command(&mut w, w8, &[op::INQUIRY, 0, 0, 0, 96, 0], &[], 96, 1);
    for page in [0x00, 0x80, 0x83, 0xb0, 0xb1, 0xb2] {
        scsi::command(&mut w, 0, &[op::INQUIRY, 1, page, 1, 0, 0], &[], 256, 0);
    }
    scsi::command(&mut w, w8, &cdb10(op::READ_CAPACITY_10, 0, 0, 0), &[], 8, 0);
    scsi::command(&mut w, w8, &cdb16(op::SERVICE_ACTION_IN_16, 0x10, 0, 32), &[], 32, 0);
    scsi::command(&mut w, w8, &[op::REPORT_LUNS, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0], &[], 256, 0);
    scsi::command(&mut w, w8, &[op::REQUEST_SENSE, 0, 0, 0, 18, 0], &[], 18, 0);
    let mut rsoc = vec![op::MAINTENANCE_IN, 0x0c, 0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0];
    scsi::command(&mut w, w8, &rsoc, &[], 4096, 0);
    rsoc[2] = 1;
    rsoc[3] = op::WRITE_16;
    scsi::command(&mut w, w8, &rsoc, &[], 64, 0);
    o.put("identify", &w.0);
    // Reads and writes of every size, some concurrent.
    let mut w = Writer::default();
    w.u8(scsi::L_SMALL_LIMITS);
    let data: Vec<u8> = (0..4096u32).map(|i| (i * 7) as u8).collect();
    scsi::command(&mut w, 0, &[op::WRITE_6, 0, 0, 1, 1, 0], &data[..512], 0, 1);
    scsi::command(&mut w, 0, &cdb10(op::WRITE_10, 0x08, 2, 2), &data[..1024], 0, 2);
    scsi::command(&mut w, 0, &cdb16(op::WRITE_16, 0, 4, 8), &data, 0, 3);
    scsi::command(&mut w, w8, &[op::READ_6, 0, 0, 1, 1, 0], &[], 512, 1);
    let mut r12 = vec![op::READ_12, 0, 0, 0, 0, 2, 0, 0, 0, 2, 0, 0];
    scsi::command(&mut w, 0, &r12, &[], 1024, 2);
    r12[0] = op::WRITE_12;
    scsi::command(&mut w, 0, &r12, &data[..1024], 0, 2);
    scsi::command(&mut w, w8, &cdb16(op::READ_16, 0, 4, 8), &[], 4096, 5);
    scsi::command(&mut w, w8, &cdb16(op::READ_16, 0, 2047, 2), &[], 1024, 0);
    scsi::command(&mut w, w8, &cdb10(op::VERIFY_10, 0x02, 4, 8), &data, 0, 0);
    scsi::command(&mut w, w8, &cdb16(op::VERIFY_16, 0, 4, 8), &[], 0, 0);
    scsi::command(&mut w, w8, &cdb10(op::SYNCHRONIZE_CACHE_10, 0, 0, 0), &[], 0, 0);
    scsi::command(&mut w, w8, &cdb16(op::SYNCHRONIZE_CACHE_16, 0, 0, 0), &[], 0, 0);
    o.put("read-write", &w.0);
    // Provisioning on a cached disk: UNMAP, WRITE SAME (zeroes, pattern, UNMAP bit).
    let mut w = Writer::default();
    w.u8(2 | scsi::L_LBPRZ);
    let mut unmap = vec![0u8; 8 + 32];
    unmap[0..2].copy_from_slice(&38u16.to_be_bytes());
    unmap[2..4].copy_from_slice(&32u16.to_be_bytes());
    unmap[8..16].copy_from_slice(&10u64.to_be_bytes());
    unmap[16..20].copy_from_slice(&4u32.to_be_bytes());
    unmap[24..32].copy_from_slice(&100u64.to_be_bytes());
    unmap[32..36].copy_from_slice(&16u32.to_be_bytes());
    scsi::command(&mut w, w8, &cdb10(op::UNMAP, 0, 0, 40), &unmap, 0, 0);
    scsi::command(&mut w, w8, &cdb10(op::WRITE_SAME_10, 0x08, 0, 16), &[0; 512], 0, 0);
    scsi::command(&mut w, w8, &cdb16(op::WRITE_SAME_16, 0, 32, 300), &data[..512], 0, 1);
    scsi::command(&mut w, w8, &cdb16(op::WRITE_SAME_16, 0x01, 64, 8), &[], 0, 0);
    scsi::command(&mut w, scsi::K_RESET | w8, &[], &[], 0, 0);
    scsi::command(&mut w, w8, &[op::START_STOP_UNIT, 0, 0, 0, 0, 0], &[], 0, 0);
    o.put("provisioning", &w.0);
    // Mode pages: sense all, select caching with WCE off, then a write (FUA).
    let mut w = Writer::default();
    w.u8(2 | scsi::L_4K);
    scsi::command(&mut w, w8, &[op::MODE_SENSE_6, 0, 0x3f, 0, 255, 0], &[], 255, 0);
    scsi::command(&mut w, w8, &[op::MODE_SENSE_10, 0, 0x08, 0, 0, 0, 0, 0, 255, 0], &[], 255, 0);
    scsi::command(&mut w, w8, &[op::MODE_SENSE_10, 0x08, 0x0a, 0, 0, 0, 0, 0, 255, 0], &[], 255, 0);
    let mut sel = vec![0u8; 4 + 20];
    sel[4] = 0x08;
    sel[5] = 0x12;
    scsi::command(&mut w, w8, &[op::MODE_SELECT_6, 0x10, 0, 0, 24, 0], &sel, 0, 0);
    let mut sel10 = vec![0u8; 8 + 12];
    sel10[8] = 0x0a;
    sel10[9] = 0x0a;
    scsi::command(&mut w, w8, &[op::MODE_SELECT_10, 0x10, 0, 0, 0, 0, 0, 0, 20, 0], &sel10, 0, 0);
    scsi::command(&mut w, w8, &cdb10(op::WRITE_10, 0, 1, 1), &data, 0, 3);
    o.put("mode-pages", &w.0);
    // Malformed CDBs, short CDBs, out of range, a LUN that does not exist, a read-only disk.
    let mut w = Writer::default();
    w.u8(scsi::L_READ_ONLY);
    scsi::command(&mut w, 0, &[0xff; 16], &[], 64, 0);
    scsi::command(&mut w, 0, &[op::READ_16, 0, 0], &[], 512, 0);
    scsi::command(&mut w, 0, &cdb16(op::READ_16, 0, u64::MAX, 1), &[], 512, 0);
    scsi::command(&mut w, 0, &cdb16(op::READ_16, 0, 0, 64), &[], 512, 0);
    scsi::command(&mut w, 0, &cdb10(op::WRITE_10, 0, 0, 1), &data[..512], 0, 0);
    scsi::command(&mut w, scsi::K_NOT_PRESENT, &[op::INQUIRY, 0, 0, 0, 36, 0], &[], 36, 0);
    scsi::command(&mut w, scsi::K_NOT_PRESENT, &[op::REPORT_LUNS, 0, 0, 0, 0, 0, 0, 0, 0, 64, 0, 0], &[], 64, 0);
    scsi::command(&mut w, scsi::K_NOT_PRESENT, &[op::REQUEST_SENSE, 1, 0, 0, 64, 0], &[], 64, 0);
    o.put("malformed", &w.0);
}

// ---- NVMe -------------------------------------------------------------------------------------------

fn nvme_seeds(root: &Path) {
    use nvme::*;
    let mut o = Out::new(root, "nvme_cmd");
    let buf = DATA + 0x1000;
    // Admin: identify, logs, features, queue management, doorbell buffer config, AER, abort.
    let mut w = input(&[]);
    op_cmd(&mut w, 0, &sqe(ADM_IDENTIFY, 0, buf, 0, [1, 0, 0, 0, 0, 0]));
    op_cmd(&mut w, 0, &sqe(ADM_IDENTIFY, 1, buf, 0, [0, 0, 0, 0, 0, 0]));
    op_cmd(&mut w, 0, &sqe(ADM_IDENTIFY, 0, buf, 0, [2, 0, 0, 0, 0, 0]));
    op_cmd(&mut w, 0, &sqe(ADM_IDENTIFY, 1, buf, 0, [3, 0, 0, 0, 0, 0]));
    for lid in [1u32, 2, 3, 4, 5] {
        let numd = 512 / 4 - 1;
        op_cmd(&mut w, 0, &sqe(ADM_GET_LOG_PAGE, 0xffff_ffff, buf, 0, [lid | (numd << 16), 0, 0, 0, 0, 0]));
    }
    op_cmd(&mut w, 0, &sqe(ADM_SET_FEATURES, 0, 0, 0, [0x07, 0x0003_0003, 0, 0, 0, 0]));
    op_cmd(&mut w, 0, &sqe(ADM_GET_FEATURES, 0, 0, 0, [0x06, 0, 0, 0, 0, 0]));
    op_cmd(&mut w, 0, &sqe(ADM_SET_FEATURES, 0, 0, 0, [0x08, 0x0000_0a04, 0, 0, 0, 0]));
    op_cmd(&mut w, 0, &sqe(ADM_SET_FEATURES, 0, 0, 0, [0x0b, 0xffff_ffff, 0, 0, 0, 0]));
    op_cmd(&mut w, 0, &sqe(ADM_ASYNC_EVENT, 0, 0, 0, [0; 6]));
    op_cmd(&mut w, 0, &sqe(ADM_KEEP_ALIVE, 0, 0, 0, [0; 6]));
    op_cmd(&mut w, 0, &sqe(ADM_ABORT, 0, 0, 0, [5, 0, 0, 0, 0, 0]));
    // Create queue pair 2 (vector 2) and delete it again.
    op_cmd(&mut w, 0, &sqe(ADM_CREATE_CQ, 0, 0x4000, 0, [(15 << 16) | 2, (2 << 16) | 3, 0, 0, 0, 0]));
    op_cmd(&mut w, 0, &sqe(ADM_CREATE_SQ, 0, 0x5000, 0, [(15 << 16) | 2, (2 << 16) | 1, 0, 0, 0, 0]));
    op_cmd(&mut w, 0, &sqe(ADM_DELETE_SQ, 0, 0, 0, [2, 0, 0, 0, 0, 0]));
    op_cmd(&mut w, 0, &sqe(ADM_DELETE_CQ, 0, 0, 0, [2, 0, 0, 0, 0, 0]));
    o.put("admin", &w.0);
    // I/O over PRPs: one page, two pages, a PRP list; then read back; flush, compare, zeroes, DSM.
    let mut img = vec![0u8; 0x3000];
    let list = [DATA + 0x2000, DATA + 0x3000, DATA + 0x4000];
    for (i, a) in list.iter().enumerate() {
        img[0x800 + i * 8..0x808 + i * 8].copy_from_slice(&a.to_le_bytes());
    }
    // DSM ranges at DATA + 0x900: (attributes, nlb, slba).
    let mut r = Vec::new();
    r.extend_from_slice(&0u32.to_le_bytes());
    r.extend_from_slice(&8u32.to_le_bytes());
    r.extend_from_slice(&16u64.to_le_bytes());
    img[0x900..0x910].copy_from_slice(&r);
    for (i, b) in img[0x1000..0x3000].iter_mut().enumerate() {
        *b = (i * 13) as u8;
    }
    let mut w = input(&img);
    op_cmd(&mut w, 1, &sqe(IO_WRITE, 1, DATA + 0x1000, 0, [0, 0, 7, 0, 0, 0]));
    op_cmd(&mut w, 1, &sqe(IO_WRITE, 1, DATA + 0x1200, DATA + 0x2000, [8, 0, 15, 0, 0, 0]));
    op_cmd(&mut w, 1, &sqe(IO_WRITE, 2, DATA + 0x1000, DATA + 0x800, [0, 0, 3, 0, 0, 0]));
    op_cmd(&mut w, 1 | OP_NO_RING, &sqe(IO_READ, 1, DATA + 0x1000, 0, [0, 0, 7, 0, 0, 0]));
    op_cmd(&mut w, 1, &sqe(IO_READ, 2, DATA + 0x1000, DATA + 0x800, [0, 0, 3, 0, 0, 0]));
    op_cmd(&mut w, 1, &sqe(IO_COMPARE, 1, DATA + 0x1000, 0, [0, 0, 7, 0, 0, 0]));
    op_cmd(&mut w, 1, &sqe(IO_WRITE_ZEROES, 1, 0, 0, [100, 0, 31, 0, 0, 0]));
    op_cmd(&mut w, 1, &sqe(IO_DSM, 1, DATA + 0x900, 0, [0, 1 << 2, 0, 0, 0, 0]));
    op_cmd(&mut w, 1, &sqe(IO_FLUSH, 0xffff_ffff, 0, 0, [0; 6]));
    op_cmd(&mut w, 1, &sqe(IO_READ, 1, 0xffff_ffff_ffff_f000, 0, [0, 0, 0, 0, 0, 0]));
    op_cmd(&mut w, 1, &sqe(IO_READ, 1, HIGH + 0x200, 0, [0, 0, 1, 0, 0, 0]));
    o.put("io-prp", &w.0);
    // SGLs: a data block; a last segment of two data blocks; a segment chain.
    let sgl = |addr: u64, len: u32, kind: u8| {
        let mut d = [0u8; 16];
        d[..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[15] = kind << 4;
        d
    };
    let mut img = vec![0u8; 0x3000];
    img[0x100..0x110].copy_from_slice(&sgl(DATA + 0x1000, 0x200, 0));
    img[0x110..0x120].copy_from_slice(&sgl(DATA + 0x2000, 0x200, 0));
    img[0x200..0x210].copy_from_slice(&sgl(DATA + 0x1000, 0x100, 0));
    img[0x210..0x220].copy_from_slice(&sgl(DATA + 0x300, 32, 3));
    img[0x300..0x310].copy_from_slice(&sgl(DATA + 0x2000, 0x300, 0));
    img[0x310..0x320].copy_from_slice(&sgl(DATA + 0x2800, 0x100, 0));
    let with_sgl = |opc: u8, nsid: u32, d: [u8; 16], nlb: u32| {
        let mut e = sqe(opc, nsid, 0, 0, [0, 0, nlb, 0, 0, 0]);
        e[1] = 1 << 6; // PSDT: SGL
        e[24..40].copy_from_slice(&d);
        e
    };
    let mut w = input(&img);
    op_cmd(&mut w, 1, &with_sgl(IO_WRITE, 1, sgl(DATA + 0x1000, 0x400, 0), 1));
    op_cmd(&mut w, 1, &with_sgl(IO_READ, 1, sgl(DATA + 0x100, 32, 3), 1));
    op_cmd(&mut w, 1, &with_sgl(IO_READ, 1, sgl(DATA + 0x200, 32, 2), 1));
    op_cmd(&mut w, 1, &with_sgl(IO_READ, 1, sgl(DATA + 0x200, 48, 2), 1));
    op_cmd(&mut w, 0, &with_sgl(ADM_IDENTIFY, 0, sgl(DATA + 0x1000, 4096, 0), 1));
    o.put("io-sgl", &w.0);
    // Shadow doorbells, a bad doorbell, register writes.
    let mut w = input(&[]);
    op_cmd(&mut w, 0, &sqe(ADM_DOORBELL_BUFFER_CONFIG, 0, 0x6000, 0x7000, [0; 6]));
    op_cmd(&mut w, 1, &sqe(IO_READ, 1, DATA, 0, [0, 0, 0, 0, 0, 0]));
    op_cmd(&mut w, 1, &sqe(IO_FLUSH, 1, 0, 0, [0; 6]));
    w.u8(OP_DOORBELL).u8(3).u32(1000);
    w.u8(OP_REGISTER).u8(0).u32(1);
    w.u8(OP_REGISTER).u8(1).u32(1);
    w.u8(OP_REGISTER).u8(3 | (4 << 2)).u32(1);
    w.u8(OP_REGISTER).u8(2).u32(1 | (1 << 14));
    o.put("doorbells", &w.0);
}

// ---- JSON-RPC and config -----------------------------------------------------------------------------

fn rpc_seeds(root: &Path) {
    let mut o = Out::new(root, "jsonrpc");
    o.put("get-methods", br#"{"jsonrpc":"2.0","id":1,"method":"rpc_get_methods"}"#);
    o.put(
        "bdevs",
        br#"{"jsonrpc":"2.0","id":1,"method":"bdev_malloc_create","params":{"name":"m0","num_blocks":256,"block_size":512}}
{"jsonrpc":"2.0","id":2,"method":"bdev_null_create","params":{"name":"n0","num_blocks":1024,"block_size":4096,"uuid":"11111111-2222-3333-4444-555555555555"}}
{"jsonrpc":"2.0","id":3,"method":"bdev_get_bdevs"}
{"jsonrpc":"2.0","id":4,"method":"bdev_null_resize","params":{"name":"n0","new_size":8}}
{"jsonrpc":"2.0","id":5,"method":"bdev_get_iostat","params":{"name":"m0"}}
{"jsonrpc":"2.0","id":6,"method":"bdev_reset_iostat"}
{"jsonrpc":"2.0","id":7,"method":"bdev_delay_create","params":{"name":"d0","base_bdev_name":"m0","avg_read_latency":1,"p99_read_latency":2,"avg_write_latency":1,"p99_write_latency":2}}
{"jsonrpc":"2.0","id":8,"method":"bdev_delay_update_latency","params":{"delay_bdev_name":"d0","latency_type":"avg_read","latency_us":5}}
{"jsonrpc":"2.0","id":9,"method":"bdev_aio_create","params":{"name":"a0","filename":"disk.img","block_size":512}}
{"jsonrpc":"2.0","id":10,"method":"bdev_uring_create","params":{"name":"u0","filename":"disk.img"}}
{"jsonrpc":"2.0","id":11,"method":"bdev_malloc_delete","params":{"name":"m0"}}
{"jsonrpc":"2.0","id":12,"method":"bdev_delay_delete","params":{"name":"d0"}}
"#,
    );
    o.put(
        "vhost",
        br#"{"jsonrpc":"2.0","id":1,"method":"bdev_malloc_create","params":{"name":"m0","num_blocks":256,"block_size":512}}
{"jsonrpc":"2.0","id":2,"method":"vhost_create_blk_controller","params":{"ctrlr":"vb0","dev_name":"m0","packed_ring":true,"cpumask":"0x1"}}
{"jsonrpc":"2.0","id":3,"method":"vhost_controller_set_coalescing","params":{"ctrlr":"vb0","delay_base_us":10,"iops_threshold":1000}}
{"jsonrpc":"2.0","id":4,"method":"vhost_create_scsi_controller","params":{"ctrlr":"vs0","delay":true}}
{"jsonrpc":"2.0","id":5,"method":"bdev_null_create","params":{"name":"n0","num_blocks":64,"block_size":512}}
{"jsonrpc":"2.0","id":6,"method":"vhost_scsi_controller_add_target","params":{"ctrlr":"vs0","scsi_target_num":-1,"bdev_name":"n0"}}
{"jsonrpc":"2.0","id":7,"method":"vhost_start_scsi_controller","params":{"ctrlr":"vs0"}}
{"jsonrpc":"2.0","id":8,"method":"vhost_get_controllers"}
{"jsonrpc":"2.0","id":9,"method":"framework_get_config","params":{"name":"vhost_blk"}}
{"jsonrpc":"2.0","id":10,"method":"vhost_scsi_controller_remove_target","params":{"ctrlr":"vs0","scsi_target_num":0}}
{"jsonrpc":"2.0","id":11,"method":"vhost_delete_controller","params":{"ctrlr":"vb0"}}
"#,
    );
    o.put(
        "nvmf",
        br#"{"jsonrpc":"2.0","id":1,"method":"bdev_malloc_create","params":{"name":"m0","num_blocks":256,"block_size":512}}
{"jsonrpc":"2.0","id":2,"method":"nvmf_create_transport","params":{"trtype":"VFIOUSER"}}
{"jsonrpc":"2.0","id":3,"method":"nvmf_create_subsystem","params":{"nqn":"nqn.2016-06.io.spdk:cnode1","allow_any_host":true,"serial_number":"S1"}}
{"jsonrpc":"2.0","id":4,"method":"nvmf_subsystem_add_ns","params":{"nqn":"nqn.2016-06.io.spdk:cnode1","namespace":{"bdev_name":"m0"}}}
{"jsonrpc":"2.0","id":5,"method":"nvmf_subsystem_add_listener","params":{"nqn":"nqn.2016-06.io.spdk:cnode1","listen_address":{"trtype":"VFIOUSER","traddr":"vfu0","adrfam":"IPv4","trsvcid":"0"}}}
{"jsonrpc":"2.0","id":6,"method":"nvmf_get_subsystems"}
{"jsonrpc":"2.0","id":7,"method":"nvmf_get_transports"}
{"jsonrpc":"2.0","id":8,"method":"nvmf_subsystem_remove_listener","params":{"nqn":"nqn.2016-06.io.spdk:cnode1","listen_address":{"trtype":"VFIOUSER","traddr":"vfu0"}}}
{"jsonrpc":"2.0","id":9,"method":"nvmf_subsystem_remove_ns","params":{"nqn":"nqn.2016-06.io.spdk:cnode1","nsid":1}}
{"jsonrpc":"2.0","id":10,"method":"nvmf_delete_subsystem","params":{"nqn":"nqn.2016-06.io.spdk:cnode1"}}
"#,
    );
    o.put(
        "batch",
        br#"[{"jsonrpc":"2.0","id":1,"method":"spdk_get_version"},{"jsonrpc":"2.0","method":"framework_get_reactors"},{"id":"x","method":"framework_get_subsystems"},5,[]]"#,
    );
    o.put(
        "pretty-no-separator",
        b"{\n  \"jsonrpc\": \"2.0\",\n  \"method\": \"bdev_get_bdevs\",\n  \"id\": 1\n}{\n  \"jsonrpc\": \"2.0\",\n  \"method\": \"framework_get_config\",\n  \"params\": {\"name\": \"bdev\"},\n  \"id\": 2\n}",
    );
    o.put(
        "errors",
        br#"{"jsonrpc":"1.0","id":1,"method":"x"}{"jsonrpc":"2.0","id":null,"method":7}{"jsonrpc":"2.0","id":[1],"method":"bdev_malloc_create","params":[1,2]}{"jsonrpc":"2.0","id":3,"method":"bdev_malloc_create","params":{"num_blocks":1,"block_size":513,"bogus":1}}[]{"method":"nope","id":4}{"#,
    );
    let mut o = Out::new(root, "config");
    o.put(
        "full",
        br#"{
  "subsystems": [
    {
      "subsystem": "vhost_scsi",
      "config": [
        {"method": "vhost_create_scsi_controller", "params": {"ctrlr": "cs0", "cpumask": "0x1"}},
        {"method": "vhost_scsi_controller_add_target", "params": {"ctrlr": "cs0", "scsi_target_num": 0, "bdev_name": "Malloc0"}}
      ]
    },
    {
      "subsystem": "bdev",
      "config": [
        {"method": "bdev_set_options", "params": {"bdev_io_pool_size": 65535, "bdev_io_cache_size": 256, "bdev_auto_examine": true}},
        {"method": "bdev_malloc_create", "params": {"name": "Malloc0", "num_blocks": 2048, "block_size": 512, "uuid": "7d1a5a4e-9a4b-4bd3-a2fd-3a5f38c0e0a1"}},
        {"method": "bdev_null_create", "params": {"name": "Null0", "num_blocks": 4096, "block_size": 4096}},
        {"method": "bdev_aio_create", "params": {"name": "Aio0", "filename": "disk.img", "block_size": 512}},
        [{"method": "bdev_malloc_create", "params": {"name": "Malloc1", "num_blocks": 16, "block_size": 4096}}],
        {"method": "bdev_wait_for_examine"}
      ]
    },
    {
      "subsystem": "vhost_blk",
      "config": [
        {"method": "vhost_create_blk_controller", "params": {"ctrlr": "cb0", "dev_name": "Null0", "readonly": true}}
      ]
    }
  ]
}
"#,
    );
    o.put("empty", br#"{"subsystems": []}"#);
    o.put("null-config", br#"{"subsystems": [{"subsystem": "bdev", "config": null}, {"subsystem": "vhost_blk"}]}"#);
    o.put(
        "bad-entry",
        br#"{"subsystems": [{"subsystem": "bdev", "config": [{"method": "bdev_malloc_create", "params": {"name": "x", "num_blocks": 0, "block_size": 512}}]}]}"#,
    );
}

// ---- vhost-user --------------------------------------------------------------------------------------

const F_VERSION_1: u64 = 1 << 32;
const F_RING_PACKED: u64 = 1 << 34;
const F_INDIRECT_DESC: u64 = 1 << 28;
const F_EVENT_IDX_BIT: u64 = 1 << 29;
const F_PROTOCOL: u64 = 1 << 30;
const F_LOG_ALL: u64 = 1 << 26;

fn u32s(v: &[u32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn u64s(v: &[u64]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// `VhostUserInflight` (repr(C), 24 bytes): mmap size, offset, one queue of 16 entries.
fn inflight_msg(size: u64, offset: u64) -> Vec<u8> {
    let mut m = u64s(&[size, offset]);
    m.extend_from_slice(&1u16.to_le_bytes());
    m.extend_from_slice(&16u16.to_le_bytes());
    m.extend_from_slice(&[0; 4]);
    m
}

/// SET_MEM_TABLE with one region: the guest memfd at guest address 0.
fn mem_table(w: &mut Writer) {
    let mut p = u32s(&[1, 0]);
    p.extend(u64s(&[0, vu::GUEST_SIZE, vu::USER_ADDR, 0]));
    vu::msg(w, 1 | (vu::FD_GUEST << 2), vu::SET_MEM_TABLE, 0, &p);
}

/// Ring `index` of `size` entries at the default layout, kick and call eventfds; with protocol
/// features the ring is enabled explicitly.
fn start_ring(w: &mut Writer, index: u32, size: u32, packed: bool, protocol: bool) {
    vu::msg(w, 0, vu::SET_VRING_NUM, 0, &u32s(&[index, size]));
    let device = if packed { virtio::PACKED_DEVICE } else { virtio::SPLIT_DEVICE };
    let mut p = u32s(&[index, 0]);
    p.extend(u64s(&[vu::USER_ADDR + virtio::DESC, vu::USER_ADDR + device, vu::USER_ADDR + virtio::DRIVER, 0]));
    vu::msg(w, 0, vu::SET_VRING_ADDR, 0, &p);
    let base = if packed { u32::from(PACKED_BASE) } else { 0 };
    vu::msg(w, 0, vu::SET_VRING_BASE, 0, &u32s(&[index, base]));
    let ev = 1 | (vu::FD_EVENT << 2);
    vu::msg(w, ev, vu::SET_VRING_CALL, 0, &u64s(&[u64::from(index)]));
    vu::msg(w, ev, vu::SET_VRING_ERR, 0, &u64s(&[u64::from(index)]));
    if protocol {
        vu::msg(w, ev, vu::SET_VRING_KICK, 0, &u64s(&[u64::from(index)]));
        vu::msg(w, vu::CTL_KICK, vu::SET_VRING_ENABLE, vu::NEED_REPLY, &u32s(&[index, 1]));
    } else {
        // The ring starts with its kick fd; then the guest kicks.
        vu::msg(w, ev | vu::CTL_KICK, vu::SET_VRING_KICK, 0, &u64s(&[u64::from(index)]));
    }
}

/// A virtio-scsi command request at `at` (51 bytes): LUN (target 0, LUN 0), tag, CDB.
fn scsi_req(cdb: &[u8]) -> Vec<u8> {
    let mut r = vec![0u8; 51];
    r[0] = 1;
    r[8] = 7; // tag
    r[19..19 + cdb.len()].copy_from_slice(cdb);
    r
}

fn vhost_seeds(root: &Path) {
    let mut o = Out::new(root, "vhost_user_msgs");
    let rw = vec![
        (blk_hdr(T_OUT, 8), 4096, 0),
        (blk_hdr(T_IN, 8), 0, 4096),
        (blk_hdr(T_FLUSH, 0), 0, 0),
        (blk_hdr(T_GET_ID, 0), 0, 20),
    ];
    // blk, split ring, no protocol features (QEMU without them).
    let img = blk_batch(false, &rw);
    let mut w = vu::input(false, &img.0);
    vu::msg(&mut w, 0, vu::SET_OWNER, 0, &[]);
    vu::msg(&mut w, 0, vu::GET_FEATURES, 0, &[]);
    vu::msg(&mut w, 0, vu::SET_FEATURES, 0, &u64s(&[F_VERSION_1 | F_INDIRECT_DESC]));
    mem_table(&mut w);
    start_ring(&mut w, 0, 16, false, false);
    vu::msg(&mut w, 0, vu::GET_VRING_BASE, 0, &u32s(&[0, 0]));
    o.put("blk-split", &w.0);
    // blk, packed ring, protocol features: config space, in-flight region, log base, slots.
    let img = blk_batch(true, &rw);
    let mut w = vu::input(false, &img.0);
    vu::msg(&mut w, 0, vu::SET_OWNER, 0, &[]);
    vu::msg(&mut w, 0, vu::GET_FEATURES, 0, &[]);
    vu::msg(&mut w, 0, vu::SET_FEATURES, 0, &u64s(&[F_VERSION_1 | F_RING_PACKED | F_EVENT_IDX_BIT | F_PROTOCOL]));
    vu::msg(&mut w, 0, vu::GET_PROTOCOL_FEATURES, 0, &[]);
    // MQ, REPLY_ACK, CONFIG, CONFIGURE_MEM_SLOTS, RESET_DEVICE, INFLIGHT_SHMFD, LOG_SHMFD.
    let proto: u64 = (1 << 0) | (1 << 1) | (1 << 3) | (1 << 9) | (1 << 12) | (1 << 13) | (1 << 15);
    vu::msg(&mut w, 0, vu::SET_PROTOCOL_FEATURES, 0, &u64s(&[proto]));
    vu::msg(&mut w, 0, vu::GET_QUEUE_NUM, 0, &[]);
    vu::msg(&mut w, 0, vu::GET_MAX_MEM_SLOTS, 0, &[]);
    let mut cfg = u32s(&[0, 60, 0]);
    cfg.extend(vec![0u8; 60]);
    vu::msg(&mut w, 0, vu::GET_CONFIG, 0, &cfg);
    mem_table(&mut w);
    start_ring(&mut w, 0, 16, true, true);
    vu::msg(&mut w, 0, vu::GET_VRING_BASE, 0, &u32s(&[0, 0]));
    vu::msg(&mut w, 0, vu::RESET_DEVICE, 0, &[]);
    o.put("blk-packed-protocol", &w.0);
    // blk, split, in-flight region and dirty logging (migration).
    let img = blk_batch(false, &rw);
    let mut w = vu::input(false, &img.0);
    vu::msg(&mut w, 0, vu::GET_FEATURES, 0, &[]);
    vu::msg(&mut w, 0, vu::SET_FEATURES, 0, &u64s(&[F_VERSION_1 | F_PROTOCOL | F_LOG_ALL]));
    vu::msg(&mut w, 0, vu::SET_PROTOCOL_FEATURES, 0, &u64s(&[(1 << 1) | (1 << 3) | (1 << 12) | (1 << 15)]));
    // GET_INFLIGHT_FD: mmap_size, mmap_offset, num_queues, queue_size.
    vu::msg(&mut w, 0, vu::GET_INFLIGHT_FD, 0, &inflight_msg(0, 0));
    vu::msg(&mut w, 1 | (vu::FD_AUX << 2), vu::SET_INFLIGHT_FD, 0, &inflight_msg(4096, 0));
    mem_table(&mut w);
    vu::msg(&mut w, 1 | (vu::FD_AUX << 2), vu::SET_LOG_BASE, 0, &u64s(&[8192, 8192]));
    start_ring(&mut w, 0, 16, false, true);
    vu::msg(&mut w, 0, vu::GET_VRING_BASE, 0, &u32s(&[0, 0]));
    o.put("blk-inflight-log", &w.0);
    // blk, memory added as a slot (ADD_MEM_REG) then removed.
    let img = blk_batch(false, &rw);
    let mut w = vu::input(false, &img.0);
    vu::msg(&mut w, 0, vu::GET_FEATURES, 0, &[]);
    vu::msg(&mut w, 0, vu::SET_FEATURES, 0, &u64s(&[F_VERSION_1 | F_PROTOCOL]));
    vu::msg(&mut w, 0, vu::SET_PROTOCOL_FEATURES, 0, &u64s(&[(1 << 3) | (1 << 15)]));
    let mut reg = u64s(&[0]);
    reg.extend(u64s(&[0, vu::GUEST_SIZE, vu::USER_ADDR, 0]));
    vu::msg(&mut w, 1 | (vu::FD_GUEST << 2), vu::ADD_MEM_REG, vu::NEED_REPLY, &reg);
    start_ring(&mut w, 0, 16, false, true);
    vu::msg(&mut w, 0, vu::SET_VRING_ENABLE, 0, &u32s(&[0, 0]));
    vu::msg(&mut w, 0, vu::REM_MEM_REG, 0, &reg);
    o.put("blk-mem-slots", &w.0);
    // SCSI: request queue 2 with INQUIRY, READ CAPACITY, WRITE/READ(10); the event queue (1) and
    // the control queue (0) with a LUN reset.
    let mut r = SplitRing::new(16);
    let reqs: Vec<(Vec<u8>, u32, u32)> = vec![
        (scsi_req(&[0x12, 0, 0, 0, 96, 0]), 0, 96),
        (scsi_req(&[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0]), 0, 8),
        (scsi_req(&cdb10(0x2a, 0, 4, 2)), 1024, 0),
        (scsi_req(&cdb10(0x28, 0, 4, 2)), 0, 1024),
    ];
    for (k, (req, out, inl)) in reqs.iter().enumerate() {
        let h = DATA + 0x100 * k as u64;
        let resp = DATA + 0x800 + 0x80 * k as u64;
        r.img.put(h, req);
        let mut bufs = vec![(h, 51, false)];
        if *out > 0 {
            bufs.push((0x4000, *out, false));
        }
        bufs.push((resp, 108, true));
        if *inl > 0 {
            bufs.push((0x5000, *inl, true));
        }
        r.chain(&bufs);
    }
    let mut w = vu::input(true, &r.img.0);
    vu::msg(&mut w, 0, vu::GET_FEATURES, 0, &[]);
    vu::msg(&mut w, 0, vu::SET_FEATURES, 0, &u64s(&[F_VERSION_1 | F_INDIRECT_DESC | F_PROTOCOL]));
    vu::msg(&mut w, 0, vu::SET_PROTOCOL_FEATURES, 0, &u64s(&[(1 << 0) | (1 << 3) | (1 << 9)]));
    mem_table(&mut w);
    start_ring(&mut w, 2, 16, false, true);
    let mut cfg = u32s(&[0, 36, 0]);
    cfg.extend(vec![0u8; 36]);
    vu::msg(&mut w, 0, vu::GET_CONFIG, 0, &cfg);
    vu::msg(&mut w, 0, vu::GET_VRING_BASE, 0, &u32s(&[2, 0]));
    o.put("scsi-requests", &w.0);
    // Malformed: wrong sizes, fd counts, ring indices, a NOFD kick, an oversized header.
    let mut w = vu::input(false, &[]);
    vu::msg(&mut w, 0, vu::SET_FEATURES, 0, &[1, 2, 3]);
    vu::msg(&mut w, 0, vu::SET_VRING_NUM, vu::NEED_REPLY, &u32s(&[99, 16]));
    vu::msg(&mut w, 0, vu::SET_VRING_NUM, vu::NEED_REPLY, &u32s(&[0, 0]));
    vu::msg(&mut w, 1, vu::SET_VRING_KICK, 0, &u64s(&[vu::NOFD]));
    let mut p = u32s(&[2, 0]);
    p.extend(u64s(&[0, vu::GUEST_SIZE, vu::USER_ADDR, 0, vu::GUEST_SIZE, 4096, 0, 0]));
    vu::msg(&mut w, 1, vu::SET_MEM_TABLE, 0, &p);
    o.put("malformed", &w.0);
}

fn vfio_user_seeds(root: &Path) {
    let mut o = Out::new(root, "vfio_user_msgs");
    let read = |w: &mut Writer, region: u32, offset: u64, count: u32| {
        vfu::msg(w, 0, vfu::CMD_REGION_READ, 0, &vfu::access(region, offset, count, &[]));
    };
    let write32 = |w: &mut Writer, region: u32, offset: u64, v: u32| {
        vfu::msg(w, 0, vfu::CMD_REGION_WRITE, 0, &vfu::access(region, offset, 4, &v.to_le_bytes()));
    };
    let write64 = |w: &mut Writer, region: u32, offset: u64, v: u64| {
        vfu::msg(w, 0, vfu::CMD_REGION_WRITE, 0, &vfu::access(region, offset, 8, &v.to_le_bytes()));
    };
    // What a client asks before it touches the device.
    let mut w = vfu::input(true);
    vfu::msg(&mut w, 0, vfu::CMD_DEVICE_GET_INFO, 0, &vfu::info(16, 0)[..16]);
    for region in 0..9 {
        let mut p = vfu::info(32, region);
        p.extend([0u8; 16]);
        vfu::msg(&mut w, 0, vfu::CMD_DEVICE_GET_REGION_INFO, 0, &p);
    }
    for irq in 0..5 {
        vfu::msg(&mut w, 0, vfu::CMD_DEVICE_GET_IRQ_INFO, 0, &vfu::info(16, irq));
    }
    read(&mut w, vfu::REGION_CONFIG, 0, 256);
    read(&mut w, vfu::REGION_BAR0, 0, 64);
    read(&mut w, vfu::REGION_BAR4, 0, 64);
    o.put("probe", &w.0);
    // DMA memory, MSI-X eventfds, PCI command and MSI-X enable, controller enable with the admin
    // queues in DMA memory, one (zeroed: DELETE SQ 0) admin command, unmap and reset under it.
    let mut w = vfu::input(true);
    let dma = vfu::dma_map(3, 0, vfu::DMA_IOVA, vfu::DMA_SIZE);
    vfu::msg(&mut w, 1 | (vfu::FD_DMA << 2), vfu::CMD_DMA_MAP, 0, &dma);
    let set = vfu::irq_set(vfu::IRQ_DATA_EVENTFD | vfu::IRQ_ACTION_TRIGGER, vfu::IRQ_MSIX, 0, 2);
    vfu::msg(&mut w, 2 | (vfu::FD_EVENT << 2) | vfu::CTL_SAME_KIND, vfu::CMD_DEVICE_SET_IRQS, 0, &set);
    write32(&mut w, vfu::REGION_CONFIG, 0x04, 0x0006);
    vfu::msg(&mut w, 0, vfu::CMD_REGION_WRITE, 0, &vfu::access(vfu::REGION_CONFIG, 0x52, 2, &0x8000u16.to_le_bytes()));
    write32(&mut w, vfu::REGION_BAR0, 0x24, (15 << 16) | 15);
    write64(&mut w, vfu::REGION_BAR0, 0x28, vfu::DMA_IOVA);
    write64(&mut w, vfu::REGION_BAR0, 0x30, vfu::DMA_IOVA + 0x1000);
    write32(&mut w, vfu::REGION_BAR0, 0x14, 1 | (6 << 16) | (4 << 20));
    read(&mut w, vfu::REGION_BAR0, 0x1c, 4);
    write32(&mut w, vfu::REGION_BAR0, 0x1000, 1);
    read(&mut w, vfu::REGION_BAR0, 0x1c, 4);
    let mask = vfu::irq_set(vfu::IRQ_DATA_NONE | vfu::IRQ_ACTION_MASK, vfu::IRQ_MSIX, 0, 1);
    vfu::msg(&mut w, 0, vfu::CMD_DEVICE_SET_IRQS, 0, &mask);
    let unmask = vfu::irq_set(vfu::IRQ_DATA_NONE | vfu::IRQ_ACTION_UNMASK, vfu::IRQ_MSIX, 0, 1);
    vfu::msg(&mut w, 0, vfu::CMD_DEVICE_SET_IRQS, 0, &unmask);
    vfu::msg(&mut w, 0, vfu::CMD_DMA_UNMAP, 0, &vfu::dma_unmap(0, vfu::DMA_IOVA, vfu::DMA_SIZE));
    vfu::msg(&mut w, 0, vfu::CMD_DEVICE_RESET, 0, &[]);
    o.put("enable-admin", &w.0);
    // INTx, a no-reply write, two maps side by side and a partial unmap.
    let mut w = vfu::input(true);
    let set = vfu::irq_set(vfu::IRQ_DATA_EVENTFD | vfu::IRQ_ACTION_TRIGGER, vfu::IRQ_INTX, 0, 1);
    vfu::msg(&mut w, 1 | (vfu::FD_EVENT << 2), vfu::CMD_DEVICE_SET_IRQS, 0, &set);
    let half = vfu::DMA_SIZE / 2;
    vfu::msg(&mut w, 1, vfu::CMD_DMA_MAP, 0, &vfu::dma_map(3, 0, 0, half));
    vfu::msg(&mut w, 1, vfu::CMD_DMA_MAP, 0, &vfu::dma_map(3, half, half, half));
    vfu::msg(&mut w, 1, vfu::CMD_DMA_MAP, 0, &vfu::dma_map(1, 0, 1 << 40, 4096));
    vfu::msg(&mut w, 0, vfu::CMD_DMA_UNMAP, 0, &vfu::dma_unmap(0, half, half));
    vfu::msg(
        &mut w,
        0,
        vfu::CMD_REGION_WRITE,
        vfu::FLAG_NO_REPLY,
        &vfu::access(vfu::REGION_BAR0, 0x0c, 4, &1u32.to_le_bytes()),
    );
    o.put("intx-maps", &w.0);
    // Malformed: no VERSION, wrong fds, bad sizes, out-of-range regions and IRQs.
    let mut w = vfu::input(false);
    vfu::msg(&mut w, 0, vfu::CMD_DEVICE_GET_INFO, 0, &vfu::info(16, 0));
    o.put("no-version", &w.0);
    let mut w = vfu::input(true);
    vfu::msg(&mut w, 1 | (vfu::FD_FILE << 2), vfu::CMD_DMA_MAP, 0, &vfu::dma_map(3, 0, 0, 4096));
    vfu::msg(&mut w, 1 | (vfu::FD_FILE << 2), vfu::CMD_DEVICE_SET_IRQS, 0, &set);
    vfu::msg(&mut w, 3, vfu::CMD_DMA_MAP, 0, &vfu::dma_map(3, 4096, 0, u64::MAX - 4095));
    read(&mut w, vfu::REGION_BAR0, u64::MAX - 2, 4);
    read(&mut w, 8, 0, 4);
    read(&mut w, vfu::REGION_CONFIG, 0, 2 << 20);
    vfu::msg(&mut w, 0, 99, 0, &[1, 2, 3]);
    vfu::msg(&mut w, 0, vfu::CMD_DEVICE_SET_IRQS, 0, &vfu::irq_set(vfu::IRQ_DATA_NONE, 9, 0, 1));
    vfu::msg(&mut w, 0, vfu::CMD_DEVICE_SET_IRQS, 0, &vfu::irq_set(vfu::IRQ_DATA_NONE, vfu::IRQ_MSIX, 60, 9));
    vfu::msg_raw_size(&mut w, 0, vfu::CMD_REGION_WRITE, 0, 12, &[0; 8]);
    o.put("malformed", &w.0);
    let mut w = vfu::input(true);
    vfu::msg_raw_size(&mut w, 0, vfu::CMD_REGION_WRITE, 0, 64 << 20, &[0; 32]);
    o.put("oversized", &w.0);
}

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("seeds");
    split_seeds(&root);
    packed_seeds(&root);
    blk_seeds(&root);
    scsi_seeds(&root);
    nvme_seeds(&root);
    rpc_seeds(&root);
    vhost_seeds(&root);
    vfio_user_seeds(&root);
    for e in std::fs::read_dir(&root).expect("seeds") {
        let e = e.expect("entry");
        let n = std::fs::read_dir(e.path()).expect("dir").count();
        println!("{}: {n} seeds", e.file_name().to_string_lossy());
    }
}
