//! Interrupt semantics of SET_IRQS (INTx automask/unmask, MSI-X mask/unmask with pending replay)
//! and BAR0's sparse-mmap description as a client maps it.

use std::os::fd::OwnedFd;
use std::os::unix::fs::FileExt;

use vmm_sys_util::eventfd::EventFd;
use vstor_nvme::{BarInfo, MmapArea, NvmeConfig};

use super::*;
use crate::client::MappedDoorbells;
use crate::server::{sparse_layout, SparseLayout};

fn trapped() -> TransportOpts {
    TransportOpts { disable_mappable_bar0: true, max_io_qpairs_per_ctrlr: 4, ..Default::default() }
}

/// Waits for the eventfd to count at least once; returns the count.
fn wait_event(e: &EventFd, what: &str) -> u64 {
    let mut n = 0;
    wait_until(what, || {
        n = e.read().unwrap_or(0);
        n > 0
    });
    n
}

#[test]
fn intx_fires_through_its_eventfd_and_automasks_until_unmasked() {
    let t = Target::new(trapped());
    // Polling client: MSI-X stays disabled, so the admin queue's interrupts use INTx.
    let mut c = NvmeClient::connect(&t.client_opts()).unwrap();
    let e = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    c.vfio_user().set_irqs(INTX_IRQ, IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_TRIGGER, 0, 1, &[e.as_raw_fd()]).unwrap();
    c.rescan_namespaces().unwrap();
    wait_event(&e, "INTx for admin completions");
    // Automasked: more completions raise nothing until the client unmasks.
    c.rescan_namespaces().unwrap();
    std::thread::sleep(Duration::from_millis(20));
    assert!(e.read().is_err(), "INTx is automasked after firing");
    c.vfio_user().set_irqs(INTX_IRQ, IRQ_SET_DATA_NONE | IRQ_SET_ACTION_UNMASK, 0, 1, &[]).unwrap();
    c.rescan_namespaces().unwrap();
    wait_event(&e, "INTx after unmask");
    // The client can trigger it itself once unmasked (loopback), and disable it.
    c.vfio_user().set_irqs(INTX_IRQ, IRQ_SET_DATA_NONE | IRQ_SET_ACTION_TRIGGER, 0, 1, &[]).unwrap();
    assert_eq!(e.read().unwrap(), 1);
    c.vfio_user().set_irqs(INTX_IRQ, IRQ_SET_DATA_NONE | IRQ_SET_ACTION_TRIGGER, 0, 0, &[]).unwrap();
    c.vfio_user().set_irqs(INTX_IRQ, IRQ_SET_DATA_NONE | IRQ_SET_ACTION_UNMASK, 0, 1, &[]).unwrap();
    c.rescan_namespaces().unwrap();
    std::thread::sleep(Duration::from_millis(20));
    assert!(e.read().is_err(), "no eventfd after disabling");
    verify_data(&mut c, 70, 2);
}

#[test]
fn msix_vectors_masked_through_set_irqs_hold_and_replay_interrupts() {
    let t = Target::new(trapped());
    let mut c = NvmeClient::connect(&ClientOptions { interrupts: true, ..t.client_opts() }).unwrap();
    verify_data(&mut c, 71, 2);
    c.take_interrupts(1);
    c.vfio_user().set_irqs(MSIX_IRQ, IRQ_SET_DATA_NONE | IRQ_SET_ACTION_MASK, 1, 1, &[]).unwrap();
    c.buf()[..512].copy_from_slice(&pattern(72, 512));
    c.submit_write(1, 1, 7, 1, 0, 1).unwrap();
    let deadline = Instant::now() + TIMEOUT;
    let mut done = Vec::new();
    while done.is_empty() {
        assert!(Instant::now() < deadline, "completion while the vector is masked");
        c.poll(1, &mut done).unwrap();
    }
    assert_eq!(done, vec![(1, 0)]);
    std::thread::sleep(Duration::from_millis(10));
    assert_eq!(c.take_interrupts(1), 0, "a masked vector does not fire");
    c.vfio_user().set_irqs(MSIX_IRQ, IRQ_SET_DATA_NONE | IRQ_SET_ACTION_UNMASK, 1, 1, &[]).unwrap();
    assert_eq!(c.take_interrupts(1), 1, "the pending interrupt is delivered on unmask");
    // De-assigning the eventfd (no descriptors) masks the vector; re-assigning restores it.
    c.vfio_user().set_irqs(MSIX_IRQ, IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_TRIGGER, 1, 1, &[]).unwrap();
    c.submit_read(1, 1, 7, 1, 0, 2).unwrap();
    let mut done = Vec::new();
    while done.is_empty() {
        assert!(Instant::now() < deadline + TIMEOUT, "completion without an eventfd");
        c.poll(1, &mut done).unwrap();
    }
    let fresh = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    c.vfio_user()
        .set_irqs(MSIX_IRQ, IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_TRIGGER, 1, 1, &[fresh.as_raw_fd()])
        .unwrap();
    assert_eq!(fresh.read().unwrap(), 1, "the interrupt raised without an eventfd was pending");
}

fn memfd_owned(len: u64) -> (std::fs::File, Arc<OwnedFd>) {
    let f = vstor_mem::memfd("bar0", len).unwrap();
    let fd = Arc::new(OwnedFd::from(f.try_clone().unwrap()));
    (f, fd)
}

#[test]
fn sparse_layouts_need_one_file_and_one_base_offset() {
    let (_f, fd) = memfd_owned(0x4000);
    let (_g, other) = memfd_owned(0x4000);
    let area = |offset, len, fd_offset, fd: &Arc<OwnedFd>| MmapArea { offset, len, fd: fd.clone(), fd_offset };
    let bar = |mmap_areas| BarInfo { index: 0, size: 0x4000, mmap_areas };
    assert!(sparse_layout(&bar(vec![])).is_none());
    assert!(sparse_layout(&bar(vec![area(0x1000, 0x1000, 0, &fd)])).is_none(), "file offset below the BAR offset");
    let l = sparse_layout(&bar(vec![area(0x1000, 0x1000, 0x1000, &fd)])).unwrap();
    assert_eq!((l.region_offset, l.areas.len(), l.areas[0].offset, l.areas[0].size), (0, 1, 0x1000, 0x1000));
    let l = sparse_layout(&bar(vec![area(0x1000, 0x1000, 0x3000, &fd), area(0x3000, 0x1000, 0x5000, &fd)])).unwrap();
    assert_eq!((l.region_offset, l.areas.len()), (0x2000, 2));
    assert!(sparse_layout(&bar(vec![area(0x1000, 0x1000, 0x1000, &fd), area(0x2000, 0x1000, 0x1000, &fd)])).is_none());
    assert!(
        sparse_layout(&bar(vec![area(0x1000, 0x1000, 0x1000, &fd), area(0x2000, 0x1000, 0x2000, &other)])).is_none()
    );
    assert!(sparse_layout(&bar(vec![area(0x3000, 0x2000, 0x3000, &fd)])).is_none(), "beyond the BAR");
    assert!(sparse_layout(&bar(vec![area(0x1000, 0x800, 0x1000, &fd)])).is_none(), "not page sized");
}

#[test]
fn bar0_sparse_mmap_is_described_and_mapped_the_vfio_user_way() {
    // A file laid out the vfio-user way: the doorbells at file offset = BAR offset.
    let (file, fd) = memfd_owned(0x2000);
    let sparse = SparseLayout { fd, region_offset: 0, areas: vec![SparseArea { offset: 0x1000, size: 0x1000 }] };
    let reactors =
        Reactors::start(&CpuMask::from_cores([0]), ReactorConfig { pin: false, ..Default::default() }).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cntrl");
    let cfg = NvmeConfig { reactors: reactors.handles().to_vec(), max_io_queues: 2, ..Default::default() };
    let ep = VfioUserEndpoint::start_inner(cfg, &path, 0o600, |_| Ok(()), Some(sparse)).unwrap();
    assert!(ep.mappable_doorbells());

    let ri = |argsz| wire_bytes(&RegionInfo { argsz, index: BAR0_REGION, ..Default::default() }).to_vec();
    let mut r = Raw::connect(&path);
    r.version();
    // Too small for the capability: the size needed, no capability, no descriptor.
    let b = r.expect_ok(CMD_DEVICE_GET_REGION_INFO, &ri(32), &[]);
    let info: RegionInfo = read_wire(&b).unwrap();
    let rw = REGION_INFO_FLAG_READ | REGION_INFO_FLAG_WRITE;
    assert_eq!((b.len(), info.argsz, info.cap_offset), (32, 64, 0));
    assert_eq!(info.flags, rw | REGION_INFO_FLAG_MMAP | REGION_INFO_FLAG_CAPS);
    assert!(r.fds.is_empty());
    // Large enough: the capability chain and the descriptor.
    let b = r.expect_ok(CMD_DEVICE_GET_REGION_INFO, &ri(4096), &[]);
    assert_eq!(b.len(), 64);
    let info: RegionInfo = read_wire(&b).unwrap();
    assert_eq!((info.argsz, info.cap_offset, info.offset, info.size), (64, 32, 0, ep.controller().bars()[0].size));
    let cap: CapHeader = read_wire(&b[32..]).unwrap();
    assert_eq!((cap.id, cap.version, cap.next), (REGION_INFO_CAP_SPARSE_MMAP, 1, 0));
    let sh: SparseMmapHeader = read_wire(&b[40..]).unwrap();
    assert_eq!(sh.nr_areas, 1);
    let a: SparseArea = read_wire(&b[48..]).unwrap();
    assert_eq!((a.offset, a.size), (0x1000, 0x1000));
    assert_eq!(r.fds.len(), 1, "the descriptor to map");
    drop(r);
    wait_until("the raw session to end", || !ep.is_connected() && ep.sessions() == 1);

    // rust-vmm's client parses it, and the NVMe client maps the doorbells from it.
    let client = vfio_user::Client::new(&path).unwrap();
    let r0 = client.region(BAR0_REGION).unwrap();
    assert_eq!(r0.sparse_areas.iter().map(|a| (a.offset, a.size)).collect::<Vec<_>>(), vec![(0x1000, 0x1000)]);
    assert_eq!(r0.file_offset.as_ref().map(|f| f.start()), Some(0));
    let m = MappedDoorbells::map(&client).unwrap();
    assert!(m.write(0x1008, 0x1234_5678));
    assert!(!m.write(0x800, 1), "registers are not mapped");
    assert!(!m.write(0x2000, 1), "past the area");
    let mut w = [0u8; 4];
    file.read_exact_at(&mut w, 0x1008).unwrap();
    assert_eq!(u32::from_le_bytes(w), 0x1234_5678, "the store landed at file offset 0x1008");
    drop(m);
    drop(client);
    ep.stop();
    assert!(!path.exists());
}
