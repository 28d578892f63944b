//! Untrusted clients: malformed messages, a second client, clients that vanish with I/O in
//! flight (dropped, or killed with SIGKILL in a child process). After each, the next client
//! works.

use std::io::{BufRead, Write};
use std::os::fd::{AsRawFd, RawFd};

use vmm_sys_util::eventfd::EventFd;

use super::*;
use crate::proto::*;

fn access(region: u32, offset: u64, count: u32) -> Vec<u8> {
    wire_bytes(&RegionAccess { offset, region, count }).to_vec()
}

fn dma_map(address: u64, size: u64, flags: u32) -> Vec<u8> {
    wire_bytes(&DmaMap { argsz: 32, flags, offset: 0, address, size }).to_vec()
}

fn irq_set(flags: u32, index: u32, start: u32, count: u32) -> Vec<u8> {
    wire_bytes(&IrqSet { argsz: 20, flags, index, start, count }).to_vec()
}

/// Runs one connection's worth of abuse, then checks that a real client still works.
#[test]
fn malformed_messages_get_errors_or_a_close_and_the_next_client_works() {
    let t =
        Target::new(TransportOpts { disable_mappable_bar0: true, max_io_qpairs_per_ctrlr: 4, ..Default::default() });
    let sock = t.socket();
    let mut sessions = 0;
    let mut next = |t: &Target| {
        t.wait_idle(sessions);
        sessions = t.state().sessions;
    };

    // Short header, then EOF.
    let mut r = Raw::connect(&sock);
    r.s.write_all(&[1, 0, 4, 0, 16, 0, 0, 0]).unwrap();
    r.s.shutdown(std::net::Shutdown::Write).unwrap();
    r.expect_eof();
    next(&t);

    // A header whose size is below the header size.
    let mut r = Raw::connect(&sock);
    let h = Header { id: 9, command: CMD_VERSION, size: 8, flags: 0, error: 0 };
    r.s.write_all(wire_bytes(&h)).unwrap();
    let (rh, _) = r.recv().unwrap();
    assert_eq!((rh.id, rh.flags & FLAG_ERROR != 0, rh.error), (9, true, libc::EINVAL as u32));
    r.expect_eof();
    next(&t);

    // An oversized message.
    let mut r = Raw::connect(&sock);
    let h = Header { id: 1, command: CMD_REGION_WRITE, size: 64 << 20, flags: 0, error: 0 };
    r.s.write_all(wire_bytes(&h)).unwrap();
    let (rh, _) = r.recv().unwrap();
    assert_eq!(rh.error, libc::E2BIG as u32);
    r.expect_eof();
    next(&t);

    // A body cut short by EOF.
    let mut r = Raw::connect(&sock);
    let h = Header { id: 1, command: CMD_VERSION, size: 100, flags: 0, error: 0 };
    r.s.write_all(wire_bytes(&h)).unwrap();
    r.s.write_all(&[0u8; 20]).unwrap();
    r.s.shutdown(std::net::Shutdown::Write).unwrap();
    r.expect_eof();
    next(&t);

    // A command before VERSION.
    let mut r = Raw::connect(&sock);
    r.expect_err(CMD_DEVICE_GET_INFO, wire_bytes(&DeviceInfo { argsz: 16, ..Default::default() }), &[], libc::EINVAL);
    r.expect_eof();
    next(&t);

    // Wrong major version.
    let mut r = Raw::connect(&sock);
    r.expect_err(CMD_VERSION, wire_bytes(&Version { major: 1, minor: 0 }), &[], libc::ENOTSUP);
    r.expect_eof();
    next(&t);

    // Capabilities that are not JSON, and a VERSION too short to hold a version.
    for payload in [&b"\0\0\x01\0{not json\0"[..], &b"\0"[..]] {
        let mut r = Raw::connect(&sock);
        r.expect_err(CMD_VERSION, payload, &[], libc::EINVAL);
        r.expect_eof();
        next(&t);
    }

    // A negotiated connection: every malformed command gets an error and the connection stays.
    let mut r = Raw::connect(&sock);
    r.version();
    r.expect_err(CMD_VERSION, wire_bytes(&Version { major: 0, minor: 0 }), &[], libc::EINVAL);
    r.expect_err(99, &[], &[], libc::EINVAL);
    r.expect_err(CMD_DMA_READ, &[0u8; 16], &[], libc::EINVAL);
    r.expect_err(CMD_DEVICE_GET_REGION_IO_FDS, &[0u8; 16], &[], libc::ENOTSUP);
    r.expect_err(CMD_DEVICE_FEATURE, &[0u8; 8], &[], libc::ENOTSUP);
    // Device info.
    r.expect_err(CMD_DEVICE_GET_INFO, &[0u8; 4], &[], libc::EINVAL);
    let b = r.expect_ok(CMD_DEVICE_GET_INFO, wire_bytes(&DeviceInfo { argsz: 16, ..Default::default() }), &[]);
    let info: DeviceInfo = read_wire(&b).unwrap();
    assert_eq!((info.flags, info.num_regions, info.num_irqs), (VFIO_DEVICE_FLAGS_RESET | VFIO_DEVICE_FLAGS_PCI, 9, 5));
    // Region info.
    let ri = |index, argsz| wire_bytes(&RegionInfo { argsz, index, ..Default::default() }).to_vec();
    r.expect_err(CMD_DEVICE_GET_REGION_INFO, &ri(20, 32), &[], libc::EINVAL);
    r.expect_err(CMD_DEVICE_GET_REGION_INFO, &ri(0, 8), &[], libc::EINVAL);
    r.expect_err(CMD_DEVICE_GET_REGION_INFO, &[0u8; 12], &[], libc::EINVAL);
    let b = r.expect_ok(CMD_DEVICE_GET_REGION_INFO, &ri(CONFIG_REGION, 32), &[]);
    let info: RegionInfo = read_wire(&b).unwrap();
    assert_eq!((info.size, info.flags), (4096, REGION_INFO_FLAG_READ | REGION_INFO_FLAG_WRITE));
    let b = r.expect_ok(CMD_DEVICE_GET_REGION_INFO, &ri(2, 32), &[]);
    assert_eq!(read_wire::<RegionInfo>(&b).unwrap().size, 0, "BAR2 does not exist");
    // Region access: out of range, oversized, empty, unknown region, short, data on a read,
    // descriptors where none belong, a write whose data does not match its count.
    r.expect_err(CMD_REGION_READ, &access(CONFIG_REGION, 4090, 16), &[], libc::EINVAL);
    r.expect_err(CMD_REGION_READ, &access(CONFIG_REGION, u64::MAX - 2, 4), &[], libc::EINVAL);
    r.expect_err(CMD_REGION_READ, &access(BAR0_REGION, 0, 2 << 20), &[], libc::EINVAL);
    r.expect_err(CMD_REGION_READ, &access(BAR0_REGION, 0, 0), &[], libc::EINVAL);
    r.expect_err(CMD_REGION_READ, &access(2, 0, 4), &[], libc::EINVAL);
    r.expect_err(CMD_REGION_READ, &access(77, 0, 4), &[], libc::EINVAL);
    r.expect_err(CMD_REGION_READ, &[0u8; 8], &[], libc::EINVAL);
    let mut with_data = access(CONFIG_REGION, 0, 4);
    with_data.extend_from_slice(&[1, 2, 3, 4]);
    r.expect_err(CMD_REGION_READ, &with_data, &[], libc::EINVAL);
    let e = EventFd::new(0).unwrap();
    r.expect_err(CMD_REGION_READ, &access(CONFIG_REGION, 0, 4), &[e.as_raw_fd()], libc::EINVAL);
    let mut short_write = access(BAR0_REGION, 0x14, 4);
    short_write.extend_from_slice(&[1, 0]);
    r.expect_err(CMD_REGION_WRITE, &short_write, &[], libc::EINVAL);
    let b = r.expect_ok(CMD_REGION_READ, &access(CONFIG_REGION, 0, 4), &[]);
    assert_eq!(&b[16..], &[0x58, 0x4e, 0x01, 0x00], "vendor and device ID");
    // A No_reply write is applied without a reply.
    let mut w = access(BAR0_REGION, 0x24, 4);
    w.extend_from_slice(&0x001f_001fu32.to_le_bytes());
    r.send(CMD_REGION_WRITE, FLAG_NO_REPLY, &w, &[]);
    let b = r.expect_ok(CMD_REGION_READ, &access(BAR0_REGION, 0x24, 4), &[]);
    assert_eq!(u32::from_le_bytes(b[16..20].try_into().unwrap()), 0x001f_001f, "AQA written");
    // DMA maps.
    let mem = vstor_mem::memfd("raw", 1 << 20).unwrap();
    r.expect_err(CMD_DMA_MAP, &dma_map(0x1000_0000, 1 << 20, 3), &[], libc::EINVAL);
    r.expect_err(CMD_DMA_MAP, &dma_map(0x1000_0100, 1 << 20, 3), &[mem.as_raw_fd()], libc::EINVAL);
    r.expect_err(CMD_DMA_MAP, &dma_map(0x1000_0000, 0, 3), &[mem.as_raw_fd()], libc::EINVAL);
    r.expect_err(CMD_DMA_MAP, &dma_map(u64::MAX - 0xfff, 0x2000, 3), &[mem.as_raw_fd()], libc::EINVAL);
    r.expect_err(CMD_DMA_MAP, &dma_map(0x1000_0000, 1 << 20, 0x80), &[mem.as_raw_fd()], libc::EINVAL);
    r.expect_err(CMD_DMA_MAP, &dma_map(0x1000_0000, 2 << 20, 3), &[mem.as_raw_fd()], libc::EINVAL);
    r.expect_err(CMD_DMA_MAP, &[0u8; 16], &[mem.as_raw_fd()], libc::EINVAL);
    r.expect_err(CMD_DMA_MAP, &dma_map(0x1000_0000, 1 << 20, 3), &[mem.as_raw_fd(), mem.as_raw_fd()], libc::EINVAL);
    r.expect_ok(CMD_DMA_MAP, &dma_map(0x1000_0000, 1 << 20, 3), &[mem.as_raw_fd()]);
    r.expect_err(CMD_DMA_MAP, &dma_map(0x100f_f000, 0x2000, 3), &[mem.as_raw_fd()], libc::EEXIST);
    r.expect_err(CMD_DMA_MAP, &dma_map(0x0ff0_0000, 0x10_1000, 3), &[mem.as_raw_fd()], libc::EEXIST);
    r.expect_ok(CMD_DMA_MAP, &dma_map(0x2000_0000, 0x1000, 1), &[mem.as_raw_fd()]);
    let unmap = |address, size, flags| wire_bytes(&DmaUnmap { argsz: 24, flags, address, size }).to_vec();
    r.expect_err(CMD_DMA_UNMAP, &unmap(0x3000_0000, 0x1000, 0), &[], libc::ENOENT);
    r.expect_err(CMD_DMA_UNMAP, &unmap(0x1000_0000, 0x1000, 0), &[], libc::ENOENT);
    r.expect_err(CMD_DMA_UNMAP, &unmap(0x1000_0000, 1 << 20, DMA_UNMAP_FLAG_GET_DIRTY_BITMAP), &[], libc::ENOTSUP);
    r.expect_err(CMD_DMA_UNMAP, &unmap(0x1000_0000, 1 << 20, 0x100), &[], libc::EINVAL);
    r.expect_err(CMD_DMA_UNMAP, &[0u8; 8], &[], libc::EINVAL);
    let b = r.expect_ok(CMD_DMA_UNMAP, &unmap(0x1000_0000, 1 << 20, 0), &[]);
    let echo: DmaUnmap = read_wire(&b).unwrap();
    assert_eq!((echo.address, echo.size), (0x1000_0000, 1 << 20));
    r.expect_err(CMD_DMA_UNMAP, &unmap(0x1000_0000, 1 << 20, 0), &[], libc::ENOENT);
    r.expect_err(CMD_DMA_UNMAP, &unmap(0x1000, 0, DMA_UNMAP_FLAG_ALL), &[], libc::EINVAL);
    r.expect_ok(CMD_DMA_UNMAP, &unmap(0, 0, DMA_UNMAP_FLAG_ALL), &[]);
    // Interrupts.
    let ii = |index| wire_bytes(&IrqInfo { argsz: 16, index, ..Default::default() }).to_vec();
    r.expect_err(CMD_DEVICE_GET_IRQ_INFO, &ii(7), &[], libc::EINVAL);
    let b = r.expect_ok(CMD_DEVICE_GET_IRQ_INFO, &ii(MSIX_IRQ), &[]);
    assert_eq!(read_wire::<IrqInfo>(&b).unwrap().count, 5, "one vector per I/O queue plus admin");
    let b = r.expect_ok(CMD_DEVICE_GET_IRQ_INFO, &ii(INTX_IRQ), &[]);
    assert_eq!(read_wire::<IrqInfo>(&b).unwrap().count, 1);
    let trig = IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_TRIGGER;
    let (e1, e2) = (EventFd::new(0).unwrap(), EventFd::new(0).unwrap());
    r.expect_err(
        CMD_DEVICE_SET_IRQS,
        &irq_set(IRQ_SET_DATA_NONE | IRQ_SET_DATA_BOOL | IRQ_SET_ACTION_TRIGGER, MSIX_IRQ, 0, 1),
        &[],
        libc::EINVAL,
    );
    r.expect_err(CMD_DEVICE_SET_IRQS, &irq_set(IRQ_SET_DATA_NONE, MSIX_IRQ, 0, 1), &[], libc::EINVAL);
    r.expect_err(CMD_DEVICE_SET_IRQS, &irq_set(trig | (1 << 9), MSIX_IRQ, 0, 1), &[], libc::EINVAL);
    r.expect_err(CMD_DEVICE_SET_IRQS, &irq_set(trig, 9, 0, 1), &[e1.as_raw_fd()], libc::EINVAL);
    r.expect_err(CMD_DEVICE_SET_IRQS, &irq_set(trig, MSIX_IRQ, 4, 2), &[e1.as_raw_fd(), e2.as_raw_fd()], libc::EINVAL);
    r.expect_err(
        CMD_DEVICE_SET_IRQS,
        &irq_set(trig, MSIX_IRQ, u32::MAX, 2),
        &[e1.as_raw_fd(), e2.as_raw_fd()],
        libc::EINVAL,
    );
    r.expect_err(CMD_DEVICE_SET_IRQS, &irq_set(trig, MSIX_IRQ, 0, 2), &[e1.as_raw_fd()], libc::EINVAL);
    r.expect_err(CMD_DEVICE_SET_IRQS, &irq_set(trig, MSI_IRQ, 0, 1), &[e1.as_raw_fd()], libc::EINVAL);
    r.expect_err(
        CMD_DEVICE_SET_IRQS,
        &irq_set(IRQ_SET_DATA_NONE | IRQ_SET_ACTION_TRIGGER, MSIX_IRQ, 0, 1),
        &[e1.as_raw_fd()],
        libc::EINVAL,
    );
    r.expect_err(
        CMD_DEVICE_SET_IRQS,
        &irq_set(IRQ_SET_DATA_BOOL | IRQ_SET_ACTION_MASK, MSIX_IRQ, 0, 2),
        &[],
        libc::EINVAL,
    );
    r.expect_err(
        CMD_DEVICE_SET_IRQS,
        &irq_set(IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_UNMASK, INTX_IRQ, 0, 1),
        &[e1.as_raw_fd()],
        libc::ENOTSUP,
    );
    r.expect_err(
        CMD_DEVICE_SET_IRQS,
        &irq_set(IRQ_SET_DATA_NONE | IRQ_SET_ACTION_MASK, MSIX_IRQ, 0, 0),
        &[],
        libc::EINVAL,
    );
    let mem_fd = vstor_mem::memfd("notev", 4096).unwrap();
    r.expect_err(CMD_DEVICE_SET_IRQS, &irq_set(trig, MSIX_IRQ, 0, 1), &[mem_fd.as_raw_fd()], libc::EINVAL);
    // Valid ones: assign, trigger from the client (loopback), mask, BOOL unmask, disable.
    r.expect_ok(CMD_DEVICE_SET_IRQS, &irq_set(trig, MSIX_IRQ, 1, 2), &[e1.as_raw_fd(), e2.as_raw_fd()]);
    r.expect_ok(CMD_DEVICE_SET_IRQS, &irq_set(IRQ_SET_DATA_NONE | IRQ_SET_ACTION_TRIGGER, MSIX_IRQ, 2, 1), &[]);
    assert_eq!(e2.read().unwrap(), 1);
    let mut bools = irq_set(IRQ_SET_DATA_BOOL | IRQ_SET_ACTION_TRIGGER, MSIX_IRQ, 1, 2);
    bools.extend_from_slice(&[1, 0]);
    r.expect_ok(CMD_DEVICE_SET_IRQS, &bools, &[]);
    assert_eq!(e1.read().unwrap(), 1);
    r.expect_ok(CMD_DEVICE_SET_IRQS, &irq_set(IRQ_SET_DATA_NONE | IRQ_SET_ACTION_MASK, MSIX_IRQ, 1, 2), &[]);
    r.expect_ok(CMD_DEVICE_SET_IRQS, &irq_set(IRQ_SET_DATA_NONE | IRQ_SET_ACTION_TRIGGER, MSIX_IRQ, 0, 0), &[]);
    // Too many descriptors in one message.
    let many: Vec<EventFd> = (0..70).map(|_| EventFd::new(0).unwrap()).collect();
    let raw: Vec<RawFd> = many.iter().map(|e| e.as_raw_fd()).collect();
    r.expect_err(CMD_DEVICE_SET_IRQS, &irq_set(trig, MSIX_IRQ, 0, 70), &raw, libc::EINVAL);
    // Still alive: a reset works.
    r.expect_ok(CMD_DEVICE_RESET, &[], &[]);
    drop(r);
    next(&t);

    // A real client works after all that.
    let mut c = NvmeClient::connect(&t.client_opts()).unwrap();
    verify_data(&mut c, 40, 4);
}

#[test]
fn a_second_client_is_refused_while_one_is_attached() {
    let t = Target::new(TransportOpts { disable_mappable_bar0: true, ..Default::default() });
    let mut c = NvmeClient::connect(&t.client_opts()).unwrap();
    wait_until("the first client to be attached", || t.state().connected);
    let second = NvmeClient::connect(&t.client_opts());
    assert!(matches!(second, Err(ClientError::Vfu(_))), "second client refused: {second:?}");
    let mut r = Raw::connect(&t.socket());
    // Closed at once: the VERSION may not even be accepted by the socket.
    let _ = r.try_send(CMD_VERSION, 0, wire_bytes(&Version { major: 0, minor: 1 }), &[]);
    r.expect_eof();
    verify_data(&mut c, 41, 4);
    assert_eq!(t.state().sessions, 0);
    drop(c);
    t.wait_idle(0);
    let mut c = NvmeClient::connect(&t.client_opts()).unwrap();
    verify_data(&mut c, 42, 2);
}

#[test]
fn a_client_dropped_with_io_in_flight_leaves_the_server_ready() {
    let t = Target::new(TransportOpts { disable_mappable_bar0: true, ..Default::default() });
    for round in 0..3u64 {
        let before = t.state().sessions;
        let o = ClientOptions { io_queues: 4, interrupts: round % 2 == 0, ..t.client_opts() };
        let mut c = NvmeClient::connect(&o).unwrap();
        // Fill every queue with large writes and reads, then vanish.
        let n = usize::from(c.queue_depth()) - 1;
        for q in 1..=4u16 {
            for i in 0..n {
                let off = (i % 16) * (64 << 10);
                if i % 2 == 0 {
                    c.submit_write(q, 2, (i * 16) as u64 % 4000, 16, off, i as u16).unwrap();
                } else {
                    c.submit_read(q, 1, (i * 128) as u64 % 16000, 128, off, i as u16).unwrap();
                }
            }
        }
        drop(c);
        t.wait_idle(before);
    }
    let mut c = NvmeClient::connect(&ClientOptions { io_queues: 4, ..t.client_opts() }).unwrap();
    verify_data(&mut c, 43, 4);
    assert_eq!(t.mgr.bdevs_in_use().len(), 2, "namespaces are untouched by clients coming and going");
}

#[test]
fn unmapping_memory_under_io_in_flight_is_safe() {
    let t = Target::new(TransportOpts { disable_mappable_bar0: true, ..Default::default() });
    for round in 0..2u64 {
        let before = t.state().sessions;
        let mut c = NvmeClient::connect(&ClientOptions { io_queues: 2, ..t.client_opts() }).unwrap();
        let n = usize::from(c.queue_depth()) - 1;
        for q in 1..=2u16 {
            for i in 0..n {
                c.submit_read(q, 2, (i * 16) as u64 % 4000, 16, (i % 16) * (64 << 10), i as u16).unwrap();
            }
        }
        // Pull the memory from under the controller while it works.
        let len = c.dma_len();
        c.vfio_user().dma_unmap(client::IOVA_BASE, len).unwrap();
        if round == 1 {
            // Keep the connection a little: the controller keeps polling without memory.
            std::thread::sleep(Duration::from_millis(50));
            let mut out = Vec::new();
            let _ = c.poll(1, &mut out);
        }
        drop(c);
        t.wait_idle(before);
    }
    let mut c = NvmeClient::connect(&ClientOptions { io_queues: 2, interrupts: true, ..t.client_opts() }).unwrap();
    verify_data(&mut c, 45, 4);
}

const CHILD_ENV: &str = "VSTOR_VFU_CHILD_DIR";

/// Body of the child process of [`a_killed_client_process_leaves_the_server_ready`]: connects,
/// fills the queues with I/O, says READY and waits to be killed.
#[test]
#[ignore = "run as a child process by a_killed_client_process_leaves_the_server_ready"]
fn child_client_holding_io() {
    let Ok(dir) = std::env::var(CHILD_ENV) else { return };
    let o = ClientOptions { dir: dir.into(), io_queues: 2, buf_size: 4 << 20, ..Default::default() };
    let mut c = NvmeClient::connect(&o).unwrap();
    let n = usize::from(c.queue_depth()) - 1;
    for q in 1..=2u16 {
        for i in 0..n {
            c.submit_write(q, 2, (i * 8) as u64 % 4000, 8, (i % 32) * 32768, i as u16).unwrap();
        }
    }
    println!("READY");
    std::io::stdout().flush().unwrap();
    std::thread::sleep(Duration::from_secs(120));
}

#[test]
fn a_killed_client_process_leaves_the_server_ready() {
    let t = Target::new(TransportOpts { disable_mappable_bar0: true, ..Default::default() });
    for round in 0..2u64 {
        let before = t.state().sessions;
        let mut child = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "tests::robust::child_client_holding_io", "--ignored", "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, t.traddr())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::inherit())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let reader = std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if line.trim_end().ends_with("READY") {
                    let _ = tx.send(());
                }
            }
        });
        let ready = rx.recv_timeout(TIMEOUT);
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        reader.join().unwrap();
        assert!(ready.is_ok(), "the child client came up (round {round})");
        t.wait_idle(before);
    }
    let mut c = NvmeClient::connect(&ClientOptions { io_queues: 2, interrupts: true, ..t.client_opts() }).unwrap();
    verify_data(&mut c, 44, 4);
}
