//! The PCI function: configuration space, BARs, MSI-X masking and pending bits, INTx, FLR, the
//! mappable doorbell page.

use std::time::Duration;

use vstor_reactor::Mode;

use super::driver::*;
use crate::spec::*;

fn cfg8(d: &Driver, off: u64) -> u8 {
    let mut b = [0u8; 1];
    d.ctrl.pci_config_read(off, &mut b);
    b[0]
}

fn cfg16(d: &Driver, off: u64) -> u16 {
    let mut b = [0u8; 2];
    d.ctrl.pci_config_read(off, &mut b);
    u16::from_le_bytes(b)
}

fn cfg32(d: &Driver, off: u64) -> u32 {
    let mut b = [0u8; 4];
    d.ctrl.pci_config_read(off, &mut b);
    u32::from_le_bytes(b)
}

fn set_cfg32(d: &Driver, off: u64, v: u32) {
    d.ctrl.pci_config_write(off, &v.to_le_bytes());
}

fn bar4_u32(d: &Driver, off: u64) -> u32 {
    let mut b = [0u8; 4];
    d.ctrl.bar_read(4, off, &mut b);
    u32::from_le_bytes(b)
}

#[test]
fn config_space_is_an_nvme_function_with_a_linked_capability_list() {
    let d = Driver::new(Opts { max_io_queues: 4, ..Default::default() });
    assert_eq!(cfg16(&d, 0), 0x4e58);
    assert_eq!(cfg16(&d, 2), 0x0001);
    // Class code: mass storage / NVM / NVM Express.
    assert_eq!((cfg8(&d, 0xb), cfg8(&d, 0xa), cfg8(&d, 0x9)), (0x01, 0x08, 0x02));
    assert_eq!(cfg8(&d, 0x0e), 0, "type 0 header");
    assert_ne!(cfg16(&d, 0x06) & (1 << 4), 0, "capabilities list bit");
    assert_eq!(cfg8(&d, 0x3d), 1, "INTA#");
    // Walk the list.
    let mut caps = Vec::new();
    let mut p = cfg8(&d, 0x34);
    while p != 0 {
        assert!(caps.len() < 16, "capability list loops");
        caps.push((p, cfg8(&d, u64::from(p))));
        p = cfg8(&d, u64::from(p) + 1);
    }
    assert_eq!(caps, vec![(0x40, 0x01), (0x50, 0x11), (0x60, 0x10)]);
    // MSI-X: table size N-1, table in BAR4 at 0, PBA in BAR4 after it.
    let nvec = d.ctrl.msix_vectors();
    assert_eq!(nvec, 5);
    assert_eq!(cfg16(&d, 0x52) & 0x7ff, nvec - 1);
    assert_eq!(cfg32(&d, 0x54), 4);
    let pba = cfg32(&d, 0x58);
    assert_eq!(pba & 7, 4);
    assert!(u64::from(pba & !7) >= u64::from(nvec) * 16);
    // PCI Express: endpoint, FLR capable.
    assert_eq!(cfg16(&d, 0x62) & 0xf0, 0);
    assert_ne!(cfg32(&d, 0x64) & (1 << 28), 0);
    // PM: D0, No_Soft_Reset.
    assert_eq!(cfg16(&d, 0x44), 1 << 3);
    // No extended capabilities; past the space reads all-ones.
    assert_eq!(cfg32(&d, 0x100), 0);
    assert_eq!(cfg32(&d, 4096), 0xffff_ffff);
}

#[test]
fn bars_size_by_writing_all_ones() {
    let d = Driver::new(Opts { max_io_queues: 4, ..Default::default() });
    let bars = d.ctrl.bars();
    assert_eq!(bars.iter().map(|b| b.index).collect::<Vec<_>>(), vec![0, 4]);
    let bar0 = bars[0].size;
    assert!(bar0.is_power_of_two() && bar0 >= 0x4000);
    assert!(bars[0].mmap_areas.is_empty(), "doorbells are not mappable by default");
    for (off, size) in [(0x10u64, bar0), (0x20, bars[1].size)] {
        set_cfg32(&d, off, 0xffff_ffff);
        set_cfg32(&d, off + 4, 0xffff_ffff);
        let lo = cfg32(&d, off);
        assert_eq!(lo & 0xf, 0x4, "64-bit memory BAR, not prefetchable");
        let mask = (u64::from(cfg32(&d, off + 4)) << 32) | u64::from(lo & !0xf);
        assert_eq!((!mask).wrapping_add(1), size, "BAR at {off:#x}");
        set_cfg32(&d, off, 0xfe00_0000);
        set_cfg32(&d, off + 4, 0x1);
        assert_eq!(cfg32(&d, off), 0xfe00_0004);
        assert_eq!(cfg32(&d, off + 4), 1);
    }
    // Unimplemented BARs size to zero.
    for off in [0x18u64, 0x1c] {
        set_cfg32(&d, off, 0xffff_ffff);
        assert_eq!(cfg32(&d, off), 0);
    }
    // Command register: memory, bus master and INTx disable stick; I/O space does not exist.
    d.ctrl.pci_config_write(0x04, &0x0407u16.to_le_bytes());
    assert_eq!(cfg16(&d, 0x04), 0x0406);
    // Read-only identity.
    set_cfg32(&d, 0, 0);
    assert_eq!(cfg16(&d, 0), 0x4e58);
}

#[test]
fn masked_vector_sets_its_pending_bit_and_unmask_delivers_it() {
    let mut d = Driver::enabled(Opts::default());
    let pba_off = u64::from(cfg32(&d, 0x58) & !7);
    assert_eq!(d.irq.count(0), 0);
    d.admin(Cmd::new(ADM_KEEP_ALIVE)).ok();
    wait_until("vector 0", || d.irq.count(0) == 1);
    // Mask vector 0 in the table: the next completion only sets the pending bit.
    d.ctrl.bar_write(4, 12, &1u32.to_le_bytes());
    assert_eq!(bar4_u32(&d, 12), 1);
    d.admin(Cmd::new(ADM_KEEP_ALIVE)).ok();
    wait_until("pending bit", || bar4_u32(&d, pba_off) & 1 == 1);
    assert!(d.ctrl.msix_pending(0));
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(d.irq.count(0), 1, "a masked vector does not fire");
    d.ctrl.bar_write(4, 12, &0u32.to_le_bytes());
    assert_eq!(d.irq.count(0), 2, "unmasking delivers the pending message");
    assert_eq!(bar4_u32(&d, pba_off) & 1, 0);
    // Function mask in Message Control does the same for every vector.
    d.ctrl.pci_config_write(0x52, &0xc000u16.to_le_bytes());
    d.admin(Cmd::new(ADM_KEEP_ALIVE)).ok();
    wait_until("pending bit", || d.ctrl.msix_pending(0));
    assert_eq!(d.irq.count(0), 2);
    d.ctrl.pci_config_write(0x52, &0x8000u16.to_le_bytes());
    assert_eq!(d.irq.count(0), 3);
    // The transport-level mask (vfio-user SET_IRQS) works the same way.
    d.ctrl.set_msix_vector_masked(0, true);
    d.admin(Cmd::new(ADM_KEEP_ALIVE)).ok();
    wait_until("pending bit", || d.ctrl.msix_pending(0));
    d.ctrl.set_msix_vector_masked(0, false);
    assert_eq!(d.irq.count(0), 4);
    // Message address and data are stored.
    d.ctrl.bar_write(4, 16, &0xfee0_1000u64.to_le_bytes());
    d.ctrl.bar_write(4, 24, &0x4041u32.to_le_bytes());
    assert_eq!((bar4_u32(&d, 16), bar4_u32(&d, 20), bar4_u32(&d, 24)), (0xfee0_1000, 0, 0x4041));
}

#[test]
fn intx_is_asserted_while_completions_are_unconsumed() {
    let mut d = Driver::new(Opts { msix: false, ..Default::default() });
    d.enable(32);
    d.auto_ack = false;
    let cid = d.submit(0, Cmd::new(ADM_KEEP_ALIVE));
    let c = d.wait(0, cid);
    assert!(c.status.is_success());
    wait_until("INTx asserted", || d.irq.intx());
    assert_ne!(cfg16(&d, 0x06) & (1 << 3), 0, "Status.Interrupt Status");
    assert_eq!(d.irq.total(), 0, "no MSI-X while it is disabled");
    // INTMS masks the pin; INTMC unmasks it.
    d.set_reg32(REG_INTMS, 1);
    assert!(!d.irq.intx());
    assert_eq!(d.reg32(REG_INTMS), 1);
    d.set_reg32(REG_INTMC, 1);
    assert!(d.irq.intx());
    // Command.INTx Disable masks it too.
    d.ctrl.pci_config_write(0x04, &(0x0006u16 | (1 << 10)).to_le_bytes());
    assert!(!d.irq.intx());
    d.ctrl.pci_config_write(0x04, &0x0006u16.to_le_bytes());
    assert!(d.irq.intx());
    // Consuming the entry (CQ head doorbell) deasserts.
    d.ring_cq(0);
    wait_until("INTx deasserted", || !d.irq.intx());
    assert_eq!(cfg16(&d, 0x06) & (1 << 3), 0);
    // Enabling MSI-X takes over from INTx.
    d.ctrl.pci_config_write(0x52, &0x8000u16.to_le_bytes());
    d.ctrl.bar_write(4, 12, &0u32.to_le_bytes());
    d.auto_ack = true;
    d.admin(Cmd::new(ADM_KEEP_ALIVE)).ok();
    wait_until("MSI-X", || d.irq.count(0) == 1);
    assert!(!d.irq.intx());
}

#[test]
fn function_level_reset_clears_the_function_and_the_controller() {
    let mut d = Driver::enabled(Opts::default());
    set_cfg32(&d, 0x10, 0xfe00_0000);
    d.setup_io(1, 16, false);
    assert_ne!(d.csts() & CSTS_RDY, 0);
    // Initiate FLR (PCIe Device Control bit 15).
    d.ctrl.pci_config_write(0x68, &(0x2810u16 | 0x8000).to_le_bytes());
    assert_eq!(d.csts(), 0);
    assert_eq!(d.reg32(REG_CC), 0);
    assert_eq!(cfg16(&d, 0x04), 0, "command register cleared");
    assert_eq!(cfg32(&d, 0x10), 0x4, "BAR address cleared");
    assert_eq!(cfg16(&d, 0x52) & 0x8000, 0, "MSI-X disabled");
    assert_eq!(cfg16(&d, 0x68) & 0x8000, 0, "Initiate FLR reads as zero");
    assert_eq!(bar4_u32(&d, 12), 1, "vectors masked");
    // The function comes back up.
    d.pci_setup();
    d.enable(32);
    d.setup_io(1, 16, false);
    d.add_ns(1, malloc_bdev("flr0", 512, 64));
    let data = pattern(5, 4096);
    d.write(1, 1, 0, &data, 512, None).ok();
    assert_eq!(d.read(1, 1, 0, 8, 512, None), data);
}

#[test]
fn mappable_doorbells_are_a_sparse_area_the_client_writes_directly() {
    // Stores into the mapped page cannot wake a sleeping reactor: the pollers keep their
    // reactors polling while queues exist, even in adaptive mode.
    let mut d = Driver::enabled(Opts { mappable: true, mode: Mode::Adaptive, ..Default::default() });
    let bars = d.ctrl.bars();
    let area = &bars[0].mmap_areas[0];
    assert_eq!(
        (area.offset, area.fd_offset),
        (DOORBELL_BASE, DOORBELL_BASE),
        "doorbells at their BAR offset in the file"
    );
    assert!(area.len >= 4096 && area.offset + area.len <= bars[0].size);
    assert!(d.mapped.is_some());
    d.add_ns(1, malloc_bdev("map0", 512, 512));
    d.setup_io(2, 64, false);
    for i in 0..20u64 {
        let data = pattern(i, 8192);
        d.write(1 + (i as usize % 2), 1, i * 16, &data, 512, None).ok();
        assert_eq!(d.read(1 + (i as usize % 2), 1, i * 16, 16, 512, None), data);
    }
    // Trapped writes land in the same page the client maps, and reads see the client's stores.
    let tail = d.io[0].tail;
    d.ctrl.bar_write(0, DOORBELL_BASE + 8, &tail.to_le_bytes());
    assert_eq!(d.reg32(DOORBELL_BASE + 8), tail);
    assert_eq!(d.reg32(DOORBELL_BASE + 12), d.io[0].head, "CQ 1 head doorbell as the client wrote it");
}
