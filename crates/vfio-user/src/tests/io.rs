//! Data on both namespaces in every doorbell and completion mode, the other I/O commands,
//! resets mid-run, namespace hot-add/remove with asynchronous events.

use std::time::{Duration, Instant};

use super::*;

fn trapped() -> TransportOpts {
    TransportOpts { disable_mappable_bar0: true, max_io_qpairs_per_ctrlr: 8, ..Default::default() }
}

#[test]
fn one_queue_polling_without_shadow_doorbells() {
    let t = Target::new(trapped());
    let mut c = NvmeClient::connect(&ClientOptions { shadow_doorbells: false, ..t.client_opts() }).unwrap();
    assert_eq!(c.io_queues(), 1);
    assert!(!c.shadow_doorbells_active());
    assert!(!c.doorbells_mapped());
    let ns = c.namespaces().to_vec();
    assert_eq!(ns.len(), 2);
    assert_eq!(ns[0], NsInfo { nsid: 1, block_size: 512, blocks: 16384 });
    assert_eq!(ns[1], NsInfo { nsid: 2, block_size: 4096, blocks: 4096 });
    verify_data(&mut c, 1, 8);
    assert_eq!(c.interrupts_received(), 0);
    c.shutdown().unwrap();
}

#[test]
fn four_queues_msix_and_shadow_doorbells() {
    let t = Target::new(trapped());
    let o = ClientOptions { io_queues: 4, interrupts: true, shadow_doorbells: true, ..t.client_opts() };
    let mut c = NvmeClient::connect(&o).unwrap();
    assert_eq!(c.io_queues(), 4);
    assert!(c.shadow_doorbells_active(), "the controller offers Doorbell Buffer Config");
    verify_data(&mut c, 2, 4);
    assert!(c.interrupts_received() > 0, "completions arrived through MSI-X eventfds");
}

#[test]
fn four_queues_polling_with_shadow_doorbells_on_the_default_transport() {
    // SPDK's defaults: mappable BAR0 requested, and offered: the client maps the doorbells.
    let t = Target::new(TransportOpts::default());
    let mut c = NvmeClient::connect(&ClientOptions { io_queues: 4, ..t.client_opts() }).unwrap();
    assert!(t.state().mappable_doorbells, "the endpoint offers BAR0's doorbells as a sparse mmap area");
    assert!(c.doorbells_mapped());
    assert!(c.shadow_doorbells_active());
    verify_data(&mut c, 3, 6);
}

#[test]
fn mapped_doorbells_without_shadow_doorbells_carry_the_io() {
    // Every doorbell is a plain store into the mapped page; no REGION_WRITE reaches the server.
    let t = Target::new(TransportOpts { disable_shadow_doorbells: true, ..TransportOpts::default() });
    let mut c =
        NvmeClient::connect(&ClientOptions { io_queues: 2, shadow_doorbells: false, ..t.client_opts() }).unwrap();
    assert!(c.doorbells_mapped() && !c.shadow_doorbells_active());
    verify_data(&mut c, 5, 8);
}

#[test]
fn one_queue_msix_without_shadow_doorbells() {
    let t = Target::new(trapped());
    let o = ClientOptions { interrupts: true, shadow_doorbells: false, ..t.client_opts() };
    let mut c = NvmeClient::connect(&o).unwrap();
    verify_data(&mut c, 4, 16);
    assert!(c.interrupts_received() > 0);
}

#[test]
fn shadow_doorbells_can_be_disabled_by_the_transport() {
    let t = Target::new(TransportOpts { disable_shadow_doorbells: true, ..trapped() });
    let mut c = NvmeClient::connect(&ClientOptions { io_queues: 2, ..t.client_opts() }).unwrap();
    assert!(!c.shadow_doorbells_active(), "OACS does not offer Doorbell Buffer Config");
    verify_data(&mut c, 5, 4);
}

#[test]
fn flush_write_zeroes_deallocate_and_errors() {
    let t = Target::new(trapped());
    let mut c = NvmeClient::connect(&ClientOptions { io_queues: 2, ..t.client_opts() }).unwrap();
    for ns in c.namespaces().to_vec() {
        let bs = ns.block_size as usize;
        let len = 8 * bs;
        // Write Zeroes over written data.
        c.buf()[..len].copy_from_slice(&pattern(9, len));
        assert_eq!(run1(&mut c, 1, |c| c.submit_write(1, ns.nsid, 100, 8, 0, 1)), 0);
        assert_eq!(run1(&mut c, 2, |c| c.submit_write_zeroes(2, ns.nsid, 102, 4, 2)), 0);
        c.buf()[..len].fill(0xaa);
        assert_eq!(run1(&mut c, 1, |c| c.submit_read(1, ns.nsid, 100, 8, 0, 3)), 0);
        let expect: Vec<u8> = pattern(9, len)
            .iter()
            .enumerate()
            .map(|(i, &b)| if (2 * bs..6 * bs).contains(&i) { 0 } else { b })
            .collect();
        assert!(c.buf()[..len] == expect[..], "write zeroes on namespace {}", ns.nsid);
        // Deallocate reads back zeroes (DLFEAT).
        assert_eq!(run1(&mut c, 1, |c| c.submit_deallocate(1, ns.nsid, &[(100, 2), (106, 2)], 4)), 0);
        c.buf()[..len].fill(0xaa);
        assert_eq!(run1(&mut c, 2, |c| c.submit_read(2, ns.nsid, 100, 8, 0, 5)), 0);
        let expect: Vec<u8> = expect
            .iter()
            .enumerate()
            .map(|(i, &b)| if (0..2 * bs).contains(&i) || (6 * bs..8 * bs).contains(&i) { 0 } else { b })
            .collect();
        assert!(c.buf()[..len] == expect[..], "deallocate on namespace {}", ns.nsid);
        assert_eq!(run1(&mut c, 1, |c| c.submit_flush(1, ns.nsid, 6)), 0);
        // Out of range: LBA Out of Range (SCT 0, SC 80h).
        let st = run1(&mut c, 1, |c| c.submit_read(1, ns.nsid, ns.blocks - 1, 2, 0, 7));
        assert_eq!(st & 0x7ff, 0x80, "read past the end");
    }
    // Invalid namespace (SC 0Bh), for an NSID the client does not know: go through flush.
    assert_eq!(run1(&mut c, 1, |c| c.submit_flush(1, 9, 8)) & 0x7ff, 0x0b);
    // Client-side argument checks.
    assert!(matches!(c.submit_read(3, 1, 0, 1, 0, 0), Err(ClientError::InvalidArg { param: "q", .. })));
    assert!(matches!(c.submit_read(1, 7, 0, 1, 0, 0), Err(ClientError::InvalidArg { param: "nsid", .. })));
    assert!(matches!(c.submit_read(1, 1, 0, 1, 2, 0), Err(ClientError::InvalidArg { param: "buf_off", .. })));
    let big = (c.max_transfer() / 512 + 1) as u32;
    assert!(matches!(c.submit_read(1, 1, 0, big, 0, 0), Err(ClientError::InvalidArg { param: "blocks", .. })));
    // A full queue is reported, and drains.
    let depth = usize::from(c.queue_depth());
    for i in 0..depth - 1 {
        c.submit_read(1, 1, i as u64, 1, i * 512, i as u16).unwrap();
    }
    assert!(matches!(c.submit_read(1, 1, 0, 1, 0, 999), Err(ClientError::QueueFull(1))));
    assert_eq!(c.wait(1, depth - 1, TIMEOUT).unwrap().len(), depth - 1);
    assert_eq!(c.outstanding(1), 0);
}

#[test]
fn deferred_doorbells_submit_in_batches() {
    let t = Target::new(trapped());
    let o = ClientOptions { defer_doorbells: true, shadow_doorbells: false, ..t.client_opts() };
    let mut c = NvmeClient::connect(&o).unwrap();
    c.buf()[..64 * 512].copy_from_slice(&pattern(11, 64 * 512));
    for i in 0..64u16 {
        c.submit_write(1, 1, u64::from(i) * 3, 1, usize::from(i) * 512, i).unwrap();
    }
    // Nothing moves before the doorbell.
    std::thread::sleep(Duration::from_millis(50));
    let mut out = Vec::new();
    c.poll(1, &mut out).unwrap();
    assert!(out.is_empty());
    c.ring(1).unwrap();
    assert_eq!(c.wait(1, 64, TIMEOUT).unwrap().len(), 64);
    c.buf()[..64 * 512].fill(0);
    for i in 0..64u16 {
        c.submit_read(1, 1, u64::from(i) * 3, 1, usize::from(i) * 512, i).unwrap();
    }
    c.ring(1).unwrap();
    assert!(c.wait(1, 64, TIMEOUT).unwrap().iter().all(|&(_, s)| s == 0));
    assert!(c.buf()[..64 * 512] == pattern(11, 64 * 512)[..]);
}

#[test]
fn controller_and_function_resets_mid_run() {
    let t = Target::new(trapped());
    let o = ClientOptions { io_queues: 2, interrupts: true, ..t.client_opts() };
    let mut c = NvmeClient::connect(&o).unwrap();
    verify_data(&mut c, 20, 4);
    for kind in [ResetKind::Controller, ResetKind::Function, ResetKind::Flr, ResetKind::Controller] {
        // I/O in flight when the reset comes.
        let per = 32usize;
        c.buf()[..per * 4096].copy_from_slice(&pattern(21, per * 4096));
        for i in 0..per {
            c.submit_write(1 + (i % 2) as u16, 2, 1000 + i as u64, 1, i * 4096, i as u16).unwrap();
        }
        c.reset_and_reinit(kind).unwrap();
        assert_eq!(c.io_queues(), 2);
        assert_eq!(c.namespaces().len(), 2);
        assert_eq!(c.outstanding(1) + c.outstanding(2), 0);
        verify_data(&mut c, 22, 4);
        let before = c.interrupts_received();
        verify_data(&mut c, 23, 2);
        assert!(c.interrupts_received() > before, "interrupts work after a {kind:?} reset");
    }
    assert_eq!(t.state().sessions, 0, "the connection survived every reset");
}

/// Polls asynchronous events until one arrives.
fn next_event(c: &mut NvmeClient) -> u32 {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let ev = c.take_async_events().unwrap();
        if let Some(&e) = ev.first() {
            assert_eq!(ev.len(), 1, "one event: {ev:x?}");
            return e;
        }
        assert!(Instant::now() < deadline, "no asynchronous event");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn namespace_hot_add_and_remove_raise_async_events() {
    let t = Target::new(trapped());
    let mut c = NvmeClient::connect(&ClientOptions { io_queues: 2, interrupts: true, ..t.client_opts() }).unwrap();
    assert!(c.take_async_events().unwrap().is_empty());
    let b = malloc_bdev("Malloc9", 4096, 256);
    assert_eq!(t.mgr.add_ns(NQN, b.clone(), NsOpts { nsid: Some(5), ..Default::default() }).unwrap(), 5);
    let ev = next_event(&mut c);
    // Notice (type 2), namespace attribute changed (0), log page 04h.
    assert_eq!((ev & 7, (ev >> 8) & 0xff, (ev >> 16) & 0xff), (2, 0, 4), "event {ev:#x}");
    assert_eq!(c.namespaces().iter().map(|n| n.nsid).collect::<Vec<_>>(), vec![1, 2, 5]);
    assert_eq!(c.namespace(5), Some(NsInfo { nsid: 5, block_size: 4096, blocks: 256 }));
    c.buf()[..8192].copy_from_slice(&pattern(30, 8192));
    assert_eq!(run1(&mut c, 2, |c| c.submit_write(2, 5, 10, 2, 0, 1)), 0);
    c.buf()[..8192].fill(0);
    assert_eq!(run1(&mut c, 1, |c| c.submit_read(1, 5, 10, 2, 0, 2)), 0);
    assert!(c.buf()[..8192] == pattern(30, 8192)[..]);
    assert!(b.is_claimed());

    t.mgr.remove_ns(NQN, 5).unwrap();
    let ev = next_event(&mut c);
    assert_eq!((ev & 7, (ev >> 16) & 0xff), (2, 4));
    assert_eq!(c.namespaces().len(), 2);
    assert!(!b.is_claimed(), "removal releases the bdev");
    // The removed NSID is now invalid (SC 0Bh).
    assert_eq!(run1(&mut c, 1, |c| c.submit_flush(1, 5, 3)) & 0x7ff, 0x0b);
    verify_data(&mut c, 31, 2);
}
