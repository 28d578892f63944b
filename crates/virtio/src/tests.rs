#![allow(clippy::cast_possible_truncation)] // small test indices
//! Mock drivers for split and packed rings over memfd guest memory, and the malformed-chain cases.

use std::sync::Arc;

use vstor_mem::{memfd, GuestMemory, Region};

use crate::driver::*;
use crate::*;

/// Guest memory: region A [0, 1 MiB), region B [1 MiB, 2 MiB) adjacent to A, region C at 256 MiB.
fn guest_mem() -> Arc<GuestMemory> {
    let f = memfd("guest", 3 << 20).unwrap();
    let a = Region::map(&f, 0, 1 << 20, 0x7000_0000_0000, 0).unwrap();
    let b = Region::map(&f, 1 << 20, 1 << 20, 0x7000_0010_0000, 1 << 20).unwrap();
    let c = Region::map(&f, 256 << 20, 1 << 20, 0x7000_1000_0000, 2 << 20).unwrap();
    Arc::new(GuestMemory::new(vec![a, b, c]).unwrap())
}

const REGION_B: u64 = 1 << 20;
const REGION_C: u64 = 256 << 20;
const DATA: u64 = 0x8_0000; // data buffers live from here in region A

fn chain_err(r: Option<Result<DescChain, PopError>>) -> ChainError {
    match r {
        Some(Err(PopError::Chain { kind, .. })) => kind,
        other => panic!("expected a chain error, got {other:?}"),
    }
}

fn fatal(r: Option<Result<DescChain, PopError>>) -> FatalError {
    match r {
        Some(Err(PopError::Fatal(f))) => f,
        other => panic!("expected a fatal error, got {other:?}"),
    }
}

#[test]
fn split_round_trip_reads_and_writes_the_right_bytes() {
    let m = guest_mem();
    let mut d = SplitDriver::new(m.clone(), 8);
    let mut q = Virtqueue::new(&d.params(false, false), m.clone()).unwrap();
    assert!(q.pop().is_none());
    m.write(DATA, b"header-bytes----").unwrap();
    d.add(0, &[(DATA, 16, false), (DATA + 512, 512, true), (DATA + 1024, 1, true)]);
    let c = q.pop().unwrap().unwrap();
    assert_eq!((c.head, c.readable.total_len(), c.writable.total_len()), (0, 16, 513));
    let mut hdr = [0u8; 16];
    c.readable.copy_to(&mut hdr);
    assert_eq!(&hdr, b"header-bytes----");
    c.writable.copy_from_at(512, &[0x5a]);
    q.push_used(c.head, c.ndesc, 513);
    assert_eq!(d.used(), vec![(0, 513)]);
    let mut s = [0u8; 1];
    m.read(DATA + 1024, &mut s).unwrap();
    assert_eq!(s, [0x5a]);
    assert!(q.needs_call(), "no suppression: every completion interrupts");
}

#[test]
fn split_buffers_may_span_adjacent_regions_but_not_leave_memory() {
    let m = guest_mem();
    let mut d = SplitDriver::new(m.clone(), 8);
    let mut q = Virtqueue::new(&d.params(false, false), m.clone()).unwrap();
    d.add(0, &[(REGION_B - 100, 200, true)]);
    let c = q.pop().unwrap().unwrap();
    assert_eq!((c.writable.len(), c.writable.total_len()), (2, 200), "split at the region boundary");
    q.push_used(c.head, 1, 0);
    d.add(1, &[(REGION_B + (1 << 20) - 100, 200, true)]);
    assert_eq!(chain_err(q.pop()), ChainError::BadBuffer { gpa: REGION_B + (1 << 20) - 100, len: 200 });
    d.add(2, &[(REGION_C + (1 << 20) - 1, 2, false)]);
    assert!(matches!(chain_err(q.pop()), ChainError::BadBuffer { .. }), "straddles the end of the last region");
    d.add(3, &[(64 << 20, 16, false)]);
    assert!(matches!(chain_err(q.pop()), ChainError::BadBuffer { .. }), "between regions");
    d.add(4, &[(u64::MAX - 4, 16, false)]);
    assert!(matches!(chain_err(q.pop()), ChainError::BadBuffer { .. }), "wraps the address space");
}

#[test]
fn split_rejects_loops_bad_indices_and_readable_after_writable() {
    let m = guest_mem();
    let mut d = SplitDriver::new(m.clone(), 8);
    let mut q = Virtqueue::new(&d.params(false, true), m.clone()).unwrap();
    d.set_desc(0, DATA, 16, 1, 1);
    d.set_desc(1, DATA, 16, 1, 0); // 0 -> 1 -> 0 -> ...
    d.publish(0);
    assert_eq!(chain_err(q.pop()), ChainError::TooLong);
    d.set_desc(2, DATA, 16, 1, 200);
    d.publish(2);
    assert_eq!(chain_err(q.pop()), ChainError::NextOutOfRange(200));
    d.add(3, &[(DATA, 16, true), (DATA + 16, 16, false)]);
    assert_eq!(chain_err(q.pop()), ChainError::ReadableAfterWritable);
    // Zero-length buffers are skipped, not refused.
    d.add(5, &[(DATA, 0, false), (DATA, 16, false), (DATA + 32, 0, true)]);
    let c = q.pop().unwrap().unwrap();
    assert_eq!((c.readable.total_len(), c.writable.total_len()), (16, 0));
    // The queue still serves a good chain after bad ones were returned.
    for h in [0, 2, 3] {
        q.push_used(h, 1, 0);
    }
}

#[test]
fn split_indirect_tables_are_followed_and_checked() {
    let m = guest_mem();
    let mut d = SplitDriver::new(m.clone(), 8);
    let table = 0x4_0000;
    let mut t = Vec::new();
    t.extend_from_slice(&desc_bytes(DATA, 16, 1, 1));
    t.extend_from_slice(&desc_bytes(DATA + 4096, 4096, 2 | 1, 2));
    t.extend_from_slice(&desc_bytes(DATA + 8192, 1, 2, 0));
    m.write(table, &t).unwrap();
    let mut q = Virtqueue::new(&d.params(false, true), m.clone()).unwrap();
    d.set_desc(0, table, 48, 4, 0);
    d.publish(0);
    let c = q.pop().unwrap().unwrap();
    assert_eq!((c.readable.total_len(), c.writable.total_len()), (16, 4097));
    q.push_used(0, 1, 4097);

    // Indirect inside indirect.
    let nested = 0x4_1000;
    m.write(nested, &desc_bytes(table, 48, 4, 0)).unwrap();
    d.set_desc(1, nested, 16, 4, 0);
    d.publish(1);
    assert_eq!(chain_err(q.pop()), ChainError::NestedIndirect);
    // A table that is not whole descriptors, or far too large.
    d.set_desc(2, table, 40, 4, 0);
    d.publish(2);
    assert_eq!(chain_err(q.pop()), ChainError::BadIndirectLen(40));
    d.set_desc(3, table, 16 * (MAX_INDIRECT + 1), 4, 0);
    d.publish(3);
    assert!(matches!(chain_err(q.pop()), ChainError::BadIndirectLen(_)));
    // INDIRECT together with NEXT.
    d.set_desc(4, table, 48, 4 | 1, 5);
    d.publish(4);
    assert_eq!(chain_err(q.pop()), ChainError::IndirectWithNext);
    // A loop inside the table.
    let looped = 0x4_2000;
    let mut t = Vec::new();
    t.extend_from_slice(&desc_bytes(DATA, 16, 1, 1));
    t.extend_from_slice(&desc_bytes(DATA, 16, 1, 0));
    m.write(looped, &t).unwrap();
    d.set_desc(5, looped, 32, 4, 0);
    d.publish(5);
    assert_eq!(chain_err(q.pop()), ChainError::TooLong);
    // Table outside guest memory.
    d.set_desc(6, 64 << 20, 32, 4, 0);
    d.publish(6);
    assert_eq!(chain_err(q.pop()), ChainError::IndirectNotMapped(64 << 20));

    // Without the feature, indirect descriptors are refused.
    let m2 = guest_mem();
    let mut d2 = SplitDriver::new(m2.clone(), 8);
    let mut q2 = Virtqueue::new(&d2.params(false, false), m2.clone()).unwrap();
    d2.set_desc(0, table, 48, 4, 0);
    d2.publish(0);
    assert_eq!(chain_err(q2.pop()), ChainError::IndirectNotNegotiated);
}

#[test]
fn split_fatal_errors_for_index_jumps_bad_heads_and_duplicates() {
    let m = guest_mem();
    let mut d = SplitDriver::new(m.clone(), 8);
    let mut q = Virtqueue::new(&d.params(false, false), m.clone()).unwrap();
    w16(&m, d.avail + 2, 9); // 9 new buffers in an 8-entry queue
    assert_eq!(fatal(q.pop()), FatalError::AvailJump { last: 0, idx: 9 });

    let mut q = Virtqueue::new(&d.params(false, false), m.clone()).unwrap();
    d.avail_idx = 0;
    d.publish(77);
    assert_eq!(fatal(q.pop()), FatalError::HeadOutOfRange(77));

    let m = guest_mem();
    let mut d = SplitDriver::new(m.clone(), 8);
    let mut q = Virtqueue::new(&d.params(false, false), m.clone()).unwrap();
    d.add(0, &[(DATA, 16, false)]);
    d.publish(0);
    assert!(q.pop().unwrap().is_ok());
    assert_eq!(fatal(q.pop()), FatalError::DuplicateHead(0));
}

#[test]
fn split_event_idx_suppresses_calls_and_kicks() {
    let m = guest_mem();
    let mut d = SplitDriver::new(m.clone(), 8);
    let mut q = Virtqueue::new(&d.params(true, false), m.clone()).unwrap();
    let used_event = d.avail + 4 + 2 * 8;
    let avail_event = d.used + 4 + 8 * 8;
    // The driver asks for an interrupt only after used index 3 has passed.
    w16(&m, used_event, 2);
    for h in 0..4u16 {
        d.add(h, &[(DATA, 16, false)]);
    }
    let mut calls = Vec::new();
    for _ in 0..4 {
        let c = q.pop().unwrap().unwrap();
        q.push_used(c.head, 1, 0);
        calls.push(q.needs_call());
    }
    assert_eq!(calls, vec![true, false, true, false], "first call, then only when crossing used_event");
    // Arming publishes where the driver must kick next and reports nothing pending.
    assert!(!q.enable_kicks());
    assert_eq!(r16(&m, avail_event), 4);
    d.add(4, &[(DATA, 16, false)]);
    assert!(q.has_available());
    assert!(q.enable_kicks(), "work that raced with arming is reported");
}

#[test]
fn split_without_event_idx_uses_flags() {
    let m = guest_mem();
    let mut d = SplitDriver::new(m.clone(), 8);
    let mut q = Virtqueue::new(&d.params(false, false), m.clone()).unwrap();
    q.disable_kicks();
    assert_eq!(r16(&m, d.used), 1, "NO_NOTIFY set while polling");
    q.enable_kicks();
    assert_eq!(r16(&m, d.used), 0);
    w16(&m, d.avail, 1); // driver sets NO_INTERRUPT
    d.add(0, &[(DATA, 16, false)]);
    let c = q.pop().unwrap().unwrap();
    q.push_used(c.head, 1, 0);
    assert!(!q.needs_call());
}

#[test]
fn split_resumes_at_base_and_reports_it() {
    let m = guest_mem();
    let mut d = SplitDriver::new(m.clone(), 8);
    let mut q = Virtqueue::new(&d.params(false, false), m.clone()).unwrap();
    for round in 0..20u16 {
        let h = round % 8;
        d.add(h, &[(DATA, 16, false)]);
        let c = q.pop().unwrap().unwrap();
        q.push_used(c.head, 1, 0);
    }
    assert_eq!(q.base(), 20);
    // A new queue (reconnect) at base 20 continues from the used index in memory.
    let mut p = d.params(false, false);
    p.base = q.base();
    let mut q2 = Virtqueue::new(&p, m.clone()).unwrap();
    d.add(3, &[(DATA, 16, false)]);
    let c = q2.pop().unwrap().unwrap();
    assert_eq!(c.head, 3);
    q2.push_used(c.head, 1, 7);
    assert_eq!(d.used().last(), Some(&(3, 7)));
    assert_eq!(q2.base(), 21);
}

#[test]
fn queue_setup_refuses_bad_sizes_and_unmapped_or_misaligned_rings() {
    let m = guest_mem();
    let d = SplitDriver::new(m.clone(), 8);
    let mut p = d.params(false, false);
    p.size = 6;
    assert_eq!(Virtqueue::new(&p, m.clone()).unwrap_err(), QueueError::BadSize(6));
    let mut p = d.params(false, false);
    p.addrs.desc = 8; // not 16-aligned
    assert!(matches!(Virtqueue::new(&p, m.clone()).unwrap_err(), QueueError::Misaligned { .. }));
    let mut p = d.params(false, false);
    p.addrs.device = 64 << 20;
    assert!(matches!(Virtqueue::new(&p, m.clone()).unwrap_err(), QueueError::NotMapped { .. }));
    let mut p = d.params(false, false);
    p.addrs.desc = (1 << 20) - 64; // table crossing into region B: must be one region
    assert!(matches!(Virtqueue::new(&p, m).unwrap_err(), QueueError::NotMapped { .. }));
}

#[test]
fn packed_round_trips_through_many_wraps() {
    let m = guest_mem();
    let mut d = PackedDriver::new(m.clone(), 5); // not a power of two: allowed for packed rings
    let mut q = Virtqueue::new(&d.params(false, false), m.clone()).unwrap();
    let mut returned = 0;
    for round in 0..40u32 {
        let id = (round % 3) as u16;
        d.add(id, &[(DATA, 16, 0), (DATA + 4096, 8, 2)]);
        let c = q.pop().unwrap().unwrap();
        assert_eq!((c.head, c.ndesc, c.readable.total_len(), c.writable.total_len()), (id, 2, 16, 8));
        assert!(q.pop().is_none());
        q.push_used(c.head, c.ndesc, round);
        let u = d.used();
        assert_eq!(u, vec![(id, round)], "round {round}");
        returned += 1;
    }
    assert_eq!(returned, 40);
    // 80 slots used in a 5-entry ring: 16 wraps, so the wrap counter is back to its start.
    assert_eq!(q.base(), u32::from(d.next) | (u32::from(d.wrap) << 15));
}

#[test]
fn packed_completions_may_come_out_of_order() {
    let m = guest_mem();
    let mut d = PackedDriver::new(m.clone(), 8);
    let mut q = Virtqueue::new(&d.params(false, false), m.clone()).unwrap();
    d.add(1, &[(DATA, 16, 0)]);
    d.add(2, &[(DATA, 16, 0), (DATA, 1, 2)]);
    let a = q.pop().unwrap().unwrap();
    let b = q.pop().unwrap().unwrap();
    q.push_used(b.head, b.ndesc, 1);
    q.push_used(a.head, a.ndesc, 0);
    assert_eq!(d.used(), vec![(2, 1), (1, 0)]);
}

#[test]
fn packed_indirect_and_malformed_chains() {
    let m = guest_mem();
    let mut d = PackedDriver::new(m.clone(), 8);
    let table = 0x4_0000;
    let mut t = Vec::new();
    t.extend_from_slice(&desc_bytes(DATA, 16, 0, 0));
    t.extend_from_slice(&desc_bytes(DATA + 4096, 512, 0, 2));
    m.write(table, &t).unwrap();
    let mut q = Virtqueue::new(&d.params(false, true), m.clone()).unwrap();
    d.add(4, &[(table, 32, 4)]);
    let c = q.pop().unwrap().unwrap();
    assert_eq!((c.head, c.ndesc, c.readable.total_len(), c.writable.total_len()), (4, 1, 16, 512));
    q.push_used(4, 1, 0);
    // A bad buffer inside a chain: the whole chain is consumed and returned as one error.
    d.add(5, &[(DATA, 16, 0), (64 << 20, 16, 2), (DATA, 1, 2)]);
    match q.pop() {
        Some(Err(PopError::Chain { head: 5, ndesc: 3, kind: ChainError::BadBuffer { .. } })) => {}
        other => panic!("{other:?}"),
    }
    q.push_used(5, 3, 0);
    d.add(6, &[(DATA, 16, 0)]);
    assert_eq!(q.pop().unwrap().unwrap().head, 6, "the ring stays in step after a bad chain");
    // Buffer ids beyond the queue size are refused.
    d.add(100, &[(DATA, 16, 0)]);
    assert_eq!(fatal(q.pop()), FatalError::HeadOutOfRange(100));
}

#[test]
fn packed_duplicate_ids_and_cut_chains_are_fatal() {
    let m = guest_mem();
    let mut d = PackedDriver::new(m.clone(), 8);
    let mut q = Virtqueue::new(&d.params(false, false), m.clone()).unwrap();
    d.add(1, &[(DATA, 16, 0)]);
    d.add(1, &[(DATA, 16, 0)]);
    assert!(q.pop().unwrap().is_ok());
    assert_eq!(fatal(q.pop()), FatalError::DuplicateHead(1));
    // A head whose NEXT leads to a slot the driver never made available.
    let m = guest_mem();
    let mut d = PackedDriver::new(m.clone(), 8);
    let mut q = Virtqueue::new(&d.params(false, false), m.clone()).unwrap();
    m.write(d.desc, &desc_bytes(DATA, 16, 0, 1 | (1 << 7))).unwrap();
    d.next = 1;
    assert_eq!(fatal(q.pop()), FatalError::ChainCut(1));
}

#[test]
fn packed_event_suppression() {
    let m = guest_mem();
    let mut d = PackedDriver::new(m.clone(), 8);
    let mut q = Virtqueue::new(&d.params(true, false), m.clone()).unwrap();
    q.disable_kicks();
    assert_eq!(r16(&m, d.dev + 2), 1);
    assert!(!q.enable_kicks());
    assert_eq!(r16(&m, d.dev + 2), 0);
    // Driver: no interrupts.
    w16(&m, d.drv + 2, 1);
    d.add(0, &[(DATA, 16, 0)]);
    let c = q.pop().unwrap().unwrap();
    q.push_used(c.head, c.ndesc, 0);
    assert!(!q.needs_call());
    // Driver: interrupt when the used index passes 2 (wrap counter 1).
    w16(&m, d.drv, 2 | (1 << 15));
    w16(&m, d.drv + 2, 2);
    let mut calls = Vec::new();
    for id in 1..4u16 {
        d.add(id, &[(DATA, 16, 0)]);
        let c = q.pop().unwrap().unwrap();
        q.push_used(c.head, c.ndesc, 0);
        calls.push(q.needs_call());
    }
    assert_eq!(calls, vec![false, true, false], "only the completion that moves the used index past 2");
}

/// The shared in-flight region of a queue of 8 (here inside guest memory, for convenience): its
/// guest address, and a maker of views of it.
fn inflight_region(m: &GuestMemory) -> (u64, impl Fn() -> crate::inflight::QueueRegion) {
    let region = 0x6_0000;
    let host = m.translate(region, crate::inflight::queue_region_size(8)).unwrap();
    // SAFETY: `host` maps `queue_region_size(8)` bytes of guest memory that outlive every queue
    // of the test; it is 8-aligned.
    (region, move || unsafe { crate::inflight::QueueRegion::new(host, 8) })
}

#[test]
fn inflight_records_survive_a_device_restart_and_resubmit_in_order() {
    let m = guest_mem();
    let mut d = SplitDriver::new(m.clone(), 8);
    let (_, log) = inflight_region(&m);
    let mut q = Virtqueue::new(&d.params(false, false), m.clone()).unwrap();
    assert!(q.attach_inflight(log(), 7).unwrap().is_empty(), "a fresh region has nothing in flight");
    for h in [2u16, 0, 5] {
        d.add(h, &[(DATA, 16, false)]);
    }
    let taken: Vec<u16> = (0..3).map(|_| q.pop().unwrap().unwrap().head).collect();
    assert_eq!(taken, vec![2, 0, 5]);
    q.push_used(0, 1, 0);
    drop(q); // the device dies with 2 and 5 in flight

    let mut p = d.params(false, false);
    p.base = 1; // what the frontend restores: its used index
    let mut q2 = Virtqueue::new(&p, m.clone()).unwrap();
    assert_eq!(q2.attach_inflight(log(), 7).unwrap(), vec![2, 5], "in the order they were taken");
    for h in [2u16, 5] {
        let c = q2.resubmit(h).unwrap();
        q2.push_used(c.head, 1, 0);
    }
    d.add(6, &[(DATA, 16, false)]);
    assert_eq!(q2.pop().unwrap().unwrap().head, 6, "new requests continue after the recovered ones");
    let mut used: Vec<u32> = d.used().iter().map(|u| u.0).collect();
    used.sort_unstable();
    assert_eq!(used, vec![0, 2, 5]);
}

#[test]
fn inflight_recovery_clears_a_completion_published_before_the_crash() {
    let m = guest_mem();
    let mut d = SplitDriver::new(m.clone(), 8);
    let (region, log) = inflight_region(&m);
    let mut q = Virtqueue::new(&d.params(false, false), m.clone()).unwrap();
    q.attach_inflight(log(), 0).unwrap();
    d.add(3, &[(DATA, 16, false)]);
    let c = q.pop().unwrap().unwrap();
    q.push_used(c.head, 1, 0);
    // Simulate a crash between publishing the used element and clearing the record.
    m.write(region + 16 + 16 * 3, &[1]).unwrap();
    assert_eq!(crate::driver::r16(&m, region + 12), 3, "last_batch_head names the completion");
    m.write(region + 14, &0u16.to_le_bytes()).unwrap();
    drop(q);
    let mut p = d.params(false, false);
    p.base = 1;
    let mut q2 = Virtqueue::new(&p, m).unwrap();
    assert!(q2.attach_inflight(log(), 0).unwrap().is_empty(), "the completed head is not resubmitted");
}

#[test]
fn split_inflight_order_numbers_at_the_top_of_the_range_do_not_overflow() {
    // Found by fuzzing: a region whose in-flight head carries the largest order number.
    let m = guest_mem();
    let mut d = SplitDriver::new(m.clone(), 8);
    let (region, log) = inflight_region(&m);
    let mut q = Virtqueue::new(&d.params(false, false), m.clone()).unwrap();
    q.attach_inflight(log(), 0).unwrap();
    d.add(3, &[(DATA, 16, false)]);
    q.pop().unwrap().unwrap();
    drop(q);
    m.write(region + 16 + 16 * 3 + 8, &u64::MAX.to_le_bytes()).unwrap();
    let mut q2 = Virtqueue::new(&d.params(false, false), m.clone()).unwrap();
    assert_eq!(q2.attach_inflight(log(), 0).unwrap(), vec![3]);
    assert_eq!(q2.resubmit(3).unwrap().head, 3);
}

const PACKED: u64 = features::RING_PACKED;

#[test]
fn packed_inflight_resubmits_from_copies_after_out_of_order_completion() {
    let m = guest_mem();
    let mut d = PackedDriver::new(m.clone(), 8);
    let (_, log) = inflight_region(&m);
    let mut q = Virtqueue::new(&d.params(false, false), m.clone()).unwrap();
    assert!(q.attach_inflight(log(), PACKED).unwrap().is_empty(), "a fresh region has nothing in flight");
    d.add(0, &[(DATA, 16, 0), (DATA + 0x100, 512, 2), (DATA + 0x300, 1, 2)]);
    d.add(1, &[(DATA + 0x400, 16, 0), (DATA + 0x500, 1, 2)]);
    d.add(2, &[(DATA + 0x600, 32, 0)]);
    let taken: Vec<(u16, u16)> = (0..3).map(|_| q.pop().unwrap().unwrap()).map(|c| (c.head, c.ndesc)).collect();
    assert_eq!(taken, vec![(0, 3), (1, 2), (2, 1)]);
    // Chain 1 completes first: its used element goes over slot 0, chain 0's first descriptor.
    q.push_used(1, 2, 7);
    assert_eq!(d.used(), vec![(1, 7)]);
    drop(q); // the device dies with chains 0 and 2 in flight

    // The frontend cannot know where a packed ring stands after a crash: it sends its stale base
    // (slot 0, wrap 1); the position comes from the region.
    let mut q2 = Virtqueue::new(&d.params(false, false), m.clone()).unwrap();
    assert_eq!(q2.attach_inflight(log(), PACKED).unwrap(), vec![0, 2], "in the order they were taken");
    assert_eq!(q2.base(), 6 | 1 << 15, "next slot: 2 used + 4 still in flight");
    let c = q2.resubmit(0).unwrap();
    assert_eq!(
        (c.head, c.ndesc, c.readable.total_len(), c.writable.total_len()),
        (0, 3, 16, 513),
        "chain 0 rebuilt from its copies"
    );
    let c2 = q2.resubmit(2).unwrap();
    assert_eq!((c2.head, c2.ndesc, c2.readable.total_len()), (2, 1, 32));
    assert!(q2.resubmit(2).is_err(), "a chain is resubmitted once");
    q2.push_used(2, 1, 0);
    q2.push_used(0, 3, 513);
    d.add(1, &[(DATA + 0x700, 16, 0)]);
    let c = q2.pop().unwrap().unwrap();
    assert_eq!((c.head, c.readable.total_len()), (1, 16), "new requests continue after the recovered ones");
    q2.push_used(1, 1, 0);
    assert_eq!(d.used(), vec![(2, 0), (0, 513), (1, 0)]);
    drop(q2);
    // Nothing is left in flight for a third instance.
    let mut q3 = Virtqueue::new(&d.params(false, false), m.clone()).unwrap();
    assert!(q3.attach_inflight(log(), PACKED).unwrap().is_empty());
    assert_eq!(q3.base(), q3.base() & 0x8000 | 7, "resumes after the last chain");
}

#[test]
fn packed_inflight_keeps_order_numbers_across_two_crashes() {
    let m = guest_mem();
    let mut d = PackedDriver::new(m.clone(), 8);
    let (_, log) = inflight_region(&m);
    let mut q = Virtqueue::new(&d.params(false, false), m.clone()).unwrap();
    q.attach_inflight(log(), PACKED).unwrap();
    d.add(5, &[(DATA, 16, 0)]);
    q.pop().unwrap().unwrap();
    drop(q);
    let mut q2 = Virtqueue::new(&d.params(false, false), m.clone()).unwrap();
    assert_eq!(q2.attach_inflight(log(), PACKED).unwrap(), vec![5]);
    q2.resubmit(5).unwrap();
    d.add(3, &[(DATA, 16, 0)]);
    assert_eq!(q2.pop().unwrap().unwrap().head, 3);
    drop(q2);
    let mut q3 = Virtqueue::new(&d.params(false, false), m.clone()).unwrap();
    assert_eq!(q3.attach_inflight(log(), PACKED).unwrap(), vec![5, 3], "the first-taken chain stays first");
}

#[test]
fn inflight_region_of_the_other_layout_or_size_is_refused() {
    let m = guest_mem();
    let d = PackedDriver::new(m.clone(), 8);
    let (_, log) = inflight_region(&m);
    let mut q = Virtqueue::new(&d.params(false, false), m.clone()).unwrap();
    q.attach_inflight(log(), PACKED).unwrap();
    drop(q);
    let s = SplitDriver::new(m.clone(), 8);
    let mut split = Virtqueue::new(&s.params(false, false), m.clone()).unwrap();
    assert!(split.attach_inflight(log(), 0).unwrap_err().contains("other ring layout"));
    let host = m.translate(0x6_0000, crate::inflight::queue_region_size(16)).unwrap();
    let d16 = PackedDriver::new(m.clone(), 16);
    let mut q16 = Virtqueue::new(&d16.params(false, false), m.clone()).unwrap();
    // SAFETY: as in `packed_region`, for a 16-entry queue.
    let r16 = unsafe { crate::inflight::QueueRegion::new(host, 16) };
    assert!(q16.attach_inflight(r16, PACKED).unwrap_err().contains("different queue size"));
}
