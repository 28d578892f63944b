//! Registers, the controller state machine and every admin command, with the exact status of each
//! malformed variant.

use std::time::Duration;

use uuid::Uuid;

use super::driver::*;
use crate::spec::*;
use crate::{NsIds, NvmeError};

fn u16_at(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}
fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}
fn u64_at(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().unwrap())
}

fn cq_cmd(qid: u16, size: u32, flags: u32, iv: u16, base: u64) -> Cmd {
    Cmd::new(ADM_CREATE_CQ).prp(base, 0).d(10, ((size - 1) << 16) | u32::from(qid)).d(11, (u32::from(iv) << 16) | flags)
}

fn sq_cmd(qid: u16, size: u32, flags: u32, cqid: u16, base: u64) -> Cmd {
    Cmd::new(ADM_CREATE_SQ)
        .prp(base, 0)
        .d(10, ((size - 1) << 16) | u32::from(qid))
        .d(11, (u32::from(cqid) << 16) | flags)
}

#[test]
fn registers_and_the_enable_disable_shutdown_state_machine() {
    let mut d = Driver::new(Opts { max_io_queues: 4, depth: 128, ..Default::default() });
    let cap = d.reg64(REG_CAP);
    assert_eq!(cap & 0xffff, 127, "MQES");
    assert_ne!(cap & (1 << 16), 0, "CQR");
    assert!((cap >> 24) & 0xff > 0, "TO");
    assert_eq!((cap >> 32) & 0xf, 0, "DSTRD");
    assert_ne!(cap & (1 << 37), 0, "CSS: NVM command set");
    assert_eq!((cap >> 48) & 0xff, 0, "MPSMIN = MPSMAX = 4 KiB");
    assert_eq!(u64::from(d.reg32(0)) | (u64::from(d.reg32(4)) << 32), cap);
    assert_eq!(d.reg32(REG_VS), 0x0001_0400);
    assert_eq!(d.csts(), 0);
    // Writable fields keep their bits; read-only registers ignore writes.
    d.set_reg32(REG_AQA, 0xffff_ffff);
    assert_eq!(d.reg32(REG_AQA), 0x0fff_0fff);
    d.set_reg64(REG_ASQ, 0x1234_5678_9abc_d000);
    assert_eq!(d.reg64(REG_ASQ), 0x1234_5678_9abc_d000);
    d.set_reg32(REG_ACQ + 4, 0x42);
    d.set_reg32(REG_ACQ, 0x5000);
    assert_eq!(d.reg64(REG_ACQ), 0x42_0000_5000);
    d.set_reg32(REG_VS, 0);
    d.set_reg32(REG_CSTS, 0xffff_ffff);
    d.set_reg64(REG_CAP, 0);
    assert_eq!((d.reg32(REG_VS), d.csts(), d.reg64(REG_CAP)), (0x0001_0400, 0, cap));
    // Unaligned or odd-sized register writes are ignored.
    d.ctrl.bar_write(0, REG_CC + 1, &[1]);
    d.ctrl.bar_write(0, REG_CC, &[1, 0]);
    assert_eq!(d.reg32(REG_CC), 0);

    d.enable(32);
    assert_eq!(d.csts(), CSTS_RDY);
    d.admin(Cmd::new(ADM_KEEP_ALIVE)).ok();
    // While enabled only SHN may change.
    let cc = d.reg32(REG_CC);
    d.set_reg32(REG_CC, cc | (1 << CC_MPS_SHIFT));
    assert_eq!(d.reg32(REG_CC), cc);
    d.disable();
    assert_eq!(d.csts(), 0);

    // Invalid configurations end in CSTS.CFS, cleared by CC.EN = 0.
    let asq = d.alloc(PAGE);
    let acq = d.alloc(PAGE);
    let ok_cc = CC_EN | (6 << CC_IOSQES_SHIFT) | (4 << CC_IOCQES_SHIFT);
    let cases: [(u32, u64, u64, u32); 5] = [
        (0x000f_000f, asq, acq, ok_cc | (1 << CC_MPS_SHIFT)), // 8 KiB pages: MPSMAX is 4 KiB
        (0x000f_000f, asq, acq, ok_cc | (1 << CC_CSS_SHIFT)), // unknown command set
        (0x0000_000f, asq, acq, ok_cc),                       // admin CQ of one entry
        (0x000f_000f, asq + 0x100, acq, ok_cc),               // admin SQ not page aligned
        (0x000f_000f, 0x2000, acq, ok_cc),                    // admin SQ not in DMA memory
    ];
    for (aqa, sq, cq, cc) in cases {
        d.set_reg32(REG_AQA, aqa);
        d.set_reg64(REG_ASQ, sq);
        d.set_reg64(REG_ACQ, cq);
        d.set_reg32(REG_CC, cc);
        d.wait_csts("CSTS.CFS", CSTS_CFS | CSTS_RDY, CSTS_CFS);
        d.set_reg32(REG_CC, 0);
        d.wait_csts("CSTS cleared", u32::MAX, 0);
    }

    // Shutdown: SHST goes 01b -> 10b; RDY stays; a reset is needed to run again.
    d.enable(32);
    d.add_ns(1, malloc_bdev("sd1", 512, 64));
    d.setup_io(1, 16, false);
    d.write(1, 1, 0, &pattern(1, 512), 512, None).ok();
    let cc = d.reg32(REG_CC);
    d.set_reg32(REG_CC, cc | (1 << CC_SHN_SHIFT));
    d.wait_csts("SHST complete", CSTS_SHST_MASK, SHST_COMPLETE << CSTS_SHST_SHIFT);
    assert_ne!(d.csts() & CSTS_RDY, 0);
    d.disable();
    assert_eq!(d.csts(), 0);
    // Shutdown notification while disabled completes at once.
    d.set_reg32(REG_CC, 1 << CC_SHN_SHIFT);
    d.wait_csts("SHST complete", CSTS_SHST_MASK, SHST_COMPLETE << CSTS_SHST_SHIFT);
    d.set_reg32(REG_CC, 0);
    d.enable(32);
    assert_eq!(d.csts(), CSTS_RDY);
    d.setup_io(1, 16, false);
    assert_eq!(d.read(1, 1, 0, 1, 512, None), pattern(1, 512));
}

#[test]
fn shutdown_waits_for_io_and_flushes_cached_namespaces() {
    let mut d = Driver::enabled(Opts::default());
    let (u, _dir) = uring_bdev("sdu", 4 << 20, vstor_bdev::uring::Flavor::Uring, true);
    d.add_ns(1, u.clone());
    d.setup_io(1, 32, true);
    d.write(1, 1, 0, &pattern(2, 8192), 4096, None).ok();
    let before = u.stats().num_flush_ops;
    let cc = d.reg32(REG_CC);
    d.set_reg32(REG_CC, cc | (1 << CC_SHN_SHIFT));
    d.wait_csts("SHST complete", CSTS_SHST_MASK, SHST_COMPLETE << CSTS_SHST_SHIFT);
    assert!(u.stats().num_flush_ops > before, "shutdown flushes volatile caches");
    d.disable();
}

#[test]
fn identify_controller_namespaces_lists_and_descriptors() {
    let mut d = Driver::enabled(Opts { nn: 8, max_io_queues: 4, ..Default::default() });
    let uuid = Uuid::from_u128(0x1122_3344_5566_7788_99aa_bbcc_ddee_ff00);
    let b1 = malloc_bdev("id1", 512, 1000);
    let ids = NsIds { uuid: Some(uuid), nguid: Some([7; 16]), eui64: Some([9; 8]) };
    assert_eq!(d.ctrl.add_namespace(Some(1), b1, ids).unwrap(), 1);
    let b3 = malloc_bdev("id3", 4096, 50);
    d.add_ns(3, b3.clone());

    let (c, id) = d.identify(1, 0);
    c.ok();
    assert_eq!(u16_at(&id, 0), 0x4e58);
    assert_eq!(&id[4..19], b"VSTOR0000000001");
    assert_eq!(id[23], b' ', "serial padded with spaces");
    assert!(id[24..64].starts_with(b"vstor NVMe controller"));
    assert_eq!(id[77], 8, "MDTS: 1 MiB");
    assert_eq!(u16_at(&id, 78), 1, "CNTLID");
    assert_eq!(u32_at(&id, 80), 0x0001_0400);
    assert_ne!(u32_at(&id, 92) & (1 << 8), 0, "OAES: namespace attribute notices");
    assert_ne!(u16_at(&id, 256) & (1 << 8), 0, "OACS: doorbell buffer config");
    assert_eq!((id[258], id[259]), (3, 3), "ACL, AERL");
    assert_eq!((id[512], id[513]), (0x66, 0x44));
    assert_eq!(u32_at(&id, 516), 8, "NN");
    assert_eq!(u16_at(&id, 520), 0x0d, "ONCS: compare, DSM, write zeroes");
    assert_eq!(id[525], 7, "VWC");
    assert_eq!(u32_at(&id, 536), 1, "SGLS");
    assert!(id[768..].starts_with(b"nqn.2024-01.io.vstor:nvme0\0"));

    let (c, ns) = d.identify(0, 1);
    c.ok();
    assert_eq!((u64_at(&ns, 0), u64_at(&ns, 8), u64_at(&ns, 16)), (1000, 1000, 1000));
    assert_eq!((ns[25], ns[26]), (0, 0), "one LBA format, in use");
    assert_eq!((u32_at(&ns, 128) >> 16) & 0xff, 9, "LBADS 512");
    assert_eq!(&ns[104..120], &[7; 16]);
    assert_eq!(&ns[120..128], &[9; 8]);
    assert_eq!(ns[33], 1, "DLFEAT: deallocated blocks read zeroes");
    let (_, ns3) = d.identify(0, 3);
    assert_eq!(u64_at(&ns3, 0), 50);
    assert_eq!((u32_at(&ns3, 128) >> 16) & 0xff, 12);
    // An inactive but valid NSID returns zeroes; invalid NSIDs fail.
    let (c, ns2) = d.identify(0, 2);
    c.ok();
    assert!(ns2.iter().all(|&b| b == 0));
    for nsid in [0, 9, NSID_ALL] {
        assert_eq!(d.identify(0, nsid).0.sc(), sc(SC_INVALID_NAMESPACE), "nsid {nsid:#x}");
    }
    // Active namespace lists.
    let list = |d: &mut Driver, after: u32| {
        let (c, b) = d.identify(2, after);
        c.ok();
        b.chunks(4).map(|w| u32::from_le_bytes(w.try_into().unwrap())).take_while(|&n| n != 0).collect::<Vec<_>>()
    };
    assert_eq!(list(&mut d, 0), vec![1, 3]);
    assert_eq!(list(&mut d, 1), vec![3]);
    assert_eq!(list(&mut d, 3), Vec::<u32>::new());
    assert_eq!(d.identify(2, 0xffff_fffe).0.sc(), sc(SC_INVALID_NAMESPACE));
    // Identification descriptors.
    let (c, desc) = d.identify(3, 1);
    c.ok();
    assert_eq!((desc[0], desc[1]), (1, 8));
    assert_eq!(&desc[4..12], &[9; 8]);
    assert_eq!((desc[12], desc[13]), (2, 16));
    assert_eq!(&desc[16..32], &[7; 16]);
    assert_eq!((desc[32], desc[33]), (3, 16));
    assert_eq!(&desc[36..52], uuid.as_bytes());
    assert_eq!(desc[52], 0, "list ends");
    let (_, desc3) = d.identify(3, 3);
    assert_eq!((desc3[0], desc3[1]), (3, 16));
    assert_eq!(&desc3[4..20], b3.uuid().as_bytes(), "the UUID defaults to the bdev's");
    assert_eq!(d.identify(3, 2).0.sc(), sc(SC_INVALID_NAMESPACE));
    assert_eq!(d.identify(0x10, 0).0.sc(), sc(SC_INVALID_FIELD));

    // Data pointer rules for admin commands.
    let buf = d.alloc(2 * PAGE);
    let id_cmd = Cmd::new(ADM_IDENTIFY).d(10, 1);
    assert_eq!(d.admin(id_cmd.prp(buf + 2, 0)).sc(), sc(SC_PRP_OFFSET_INVALID));
    assert_eq!(d.admin(id_cmd.prp(buf + 0x800, buf + PAGE + 0x10)).sc(), sc(SC_PRP_OFFSET_INVALID));
    assert_eq!(d.admin(id_cmd.prp(0x3000, 0)).sc(), sc(SC_DATA_TRANSFER_ERROR));
    assert_eq!(d.admin(id_cmd.sgl(desc_block(buf))).sc(), sc(SC_INVALID_FIELD), "no SGLs for admin commands");
    assert_eq!(d.admin(id_cmd.prp(buf, 0).fuse(1)).sc(), sc(SC_INVALID_FIELD), "no fused admin commands");
    assert_eq!(d.admin(Cmd::new(0x80)).sc(), sc(SC_INVALID_OPCODE));
    // A page-crossing PRP pair splits the structure correctly.
    let second = d.alloc(PAGE);
    d.admin(id_cmd.prp(buf + 0x800, second)).ok();
    let mut a = vec![0u8; 0x800];
    let mut b = vec![0u8; 0x800];
    d.mem.read(buf + 0x800, &mut a).unwrap();
    d.mem.read(second, &mut b).unwrap();
    assert_eq!([a, b].concat(), id);
}

fn desc_block(addr: u64) -> [u8; 16] {
    desc(addr, 4096, 0)
}

#[test]
fn queue_creation_and_deletion_errors_have_exact_status_codes() {
    let mut d = Driver::enabled(Opts { max_io_queues: 4, depth: 64, ..Default::default() });
    d.add_ns(1, malloc_bdev("q1", 512, 64));
    let cq1 = d.alloc(64 * 16);
    let sq1 = d.alloc(64 * 64);
    let sq2 = d.alloc(64 * 64);
    const PC_IEN: u32 = 3;
    let cases = [
        (cq_cmd(0, 16, PC_IEN, 0, cq1), SC_INVALID_QID),
        (cq_cmd(5, 16, PC_IEN, 0, cq1), SC_INVALID_QID),
        (cq_cmd(1, 1, PC_IEN, 0, cq1), SC_INVALID_QSIZE),
        (cq_cmd(1, 65, PC_IEN, 0, cq1), SC_INVALID_QSIZE),
        (cq_cmd(1, 16, 2, 0, cq1), SC_INVALID_FIELD),
        (cq_cmd(1, 16, PC_IEN, 5, cq1), SC_INVALID_INT_VECTOR),
        (cq_cmd(1, 16, PC_IEN, 1, cq1 + 0x100), SC_PRP_OFFSET_INVALID),
        (cq_cmd(1, 16, PC_IEN, 1, 0x8000), SC_INVALID_FIELD),
        (sq_cmd(1, 16, 1, 1, sq1), SC_CQ_INVALID),
    ];
    for (cmd, want) in cases {
        assert_eq!(d.admin(cmd).sc(), sc(want), "{cmd:?}");
    }
    d.admin(cq_cmd(1, 64, PC_IEN, 1, cq1)).ok();
    let cases = [
        (cq_cmd(1, 16, PC_IEN, 1, cq1), SC_INVALID_QID),
        (sq_cmd(1, 16, 1, 2, sq1), SC_CQ_INVALID),
        (sq_cmd(1, 16, 1, 0, sq1), SC_CQ_INVALID),
        (sq_cmd(1, 16, 1, 9, sq1), SC_CQ_INVALID),
        (sq_cmd(0, 16, 1, 1, sq1), SC_INVALID_QID),
        (sq_cmd(5, 16, 1, 1, sq1), SC_INVALID_QID),
        (sq_cmd(1, 1, 1, 1, sq1), SC_INVALID_QSIZE),
        (sq_cmd(1, 65, 1, 1, sq1), SC_INVALID_QSIZE),
        (sq_cmd(1, 16, 0, 1, sq1), SC_INVALID_FIELD),
        (sq_cmd(1, 16, 1, 1, sq1 + 8), SC_PRP_OFFSET_INVALID),
    ];
    for (cmd, want) in cases {
        assert_eq!(d.admin(cmd).sc(), sc(want), "{cmd:?}");
    }
    // Two submission queues share completion queue 1.
    d.admin(sq_cmd(1, 64, 1, 1, sq1)).ok();
    d.admin(sq_cmd(2, 64, 1, 1, sq2)).ok();
    assert_eq!(d.admin(sq_cmd(2, 64, 1, 1, sq2)).sc(), sc(SC_INVALID_QID), "SQ exists");
    let del = |op: u8, qid: u16| Cmd::new(op).d(10, u32::from(qid));
    assert_eq!(d.admin(del(ADM_DELETE_CQ, 1)).sc(), sc(SC_INVALID_QUEUE_DELETION));
    for (op, qid) in
        [(ADM_DELETE_CQ, 0), (ADM_DELETE_CQ, 3), (ADM_DELETE_SQ, 0), (ADM_DELETE_SQ, 3), (ADM_DELETE_SQ, 9)]
    {
        assert_eq!(d.admin(del(op, qid)).sc(), sc(SC_INVALID_QID), "opcode {op} qid {qid}");
    }
    assert_eq!(d.set_feature(FEAT_NUM_QUEUES, 0).sc(), sc(SC_COMMAND_SEQUENCE_ERROR));
    // A command on SQ 2 completes on CQ 1 with SQID 2.
    d.io.push(Queue::new(1, 64, sq1, cq1, false));
    let flush = Cmd::new(IO_FLUSH).ns(1).d(0, u32::from(IO_FLUSH) | (0x77 << 16));
    d.mem.write(sq2, &flush.0.to_bytes()).unwrap();
    d.mmio_doorbell(4, 1);
    let c = d.wait(1, 0x77).ok();
    assert_eq!((c.sqid, c.sqhd), (2, 1));
    let c = d.run(1, Cmd::new(IO_FLUSH).ns(1)).ok();
    assert_eq!(c.sqid, 1);
    // Delete in the right order, then recreate.
    d.admin(del(ADM_DELETE_SQ, 1)).ok();
    d.admin(del(ADM_DELETE_SQ, 2)).ok();
    d.admin(del(ADM_DELETE_CQ, 1)).ok();
    d.io.clear();
    d.admin(Cmd::new(ADM_SET_FEATURES).d(10, u32::from(FEAT_NUM_QUEUES)).d(11, 0)).ok();
    assert_eq!(d.admin(cq_cmd(2, 16, PC_IEN, 2, cq1)).sc(), sc(SC_INVALID_QID), "beyond the allocated count");
    d.create_queue_pair(1, 32);
    d.run(1, Cmd::new(IO_FLUSH).ns(1)).ok();
    // I/O queue entry sizes must be set in CC.
    let mut d2 = Driver::new(Opts::default());
    let (asq, acq) = (d2.alloc(PAGE), d2.alloc(PAGE));
    d2.admin = Queue::new(0, 16, asq, acq, false);
    d2.set_reg32(REG_AQA, 0x000f_000f);
    d2.set_reg64(REG_ASQ, asq);
    d2.set_reg64(REG_ACQ, acq);
    d2.set_reg32(REG_CC, CC_EN);
    d2.wait_csts("RDY", CSTS_RDY, CSTS_RDY);
    let cq = d2.alloc(PAGE);
    assert_eq!(d2.admin(cq_cmd(1, 16, PC_IEN, 1, cq)).sc(), sc(SC_INVALID_FIELD), "CC.IOCQES unset");
}

#[test]
fn get_and_set_features() {
    let mut d = Driver::enabled(Opts { max_io_queues: 8, ..Default::default() });
    let get = |d: &mut Driver, fid: u8, sel: u32, cdw11: u32| {
        d.admin(Cmd::new(ADM_GET_FEATURES).d(10, u32::from(fid) | (sel << 8)).d(11, cdw11)).ok().dw0
    };
    // Arbitration.
    assert_eq!(get(&mut d, FEAT_ARBITRATION, 0, 0), 0);
    d.set_feature(FEAT_ARBITRATION, 0x0302_01ff).ok();
    assert_eq!(get(&mut d, FEAT_ARBITRATION, 0, 0), 0x0302_0107);
    assert_eq!(get(&mut d, FEAT_ARBITRATION, 1, 0), 0, "default");
    assert_eq!(get(&mut d, FEAT_ARBITRATION, 2, 0), 0, "saved = default");
    assert_eq!(get(&mut d, FEAT_ARBITRATION, 3, 0), 1 << 2, "changeable, not saveable");
    // Power management: only power state 0.
    assert_eq!(d.set_feature(FEAT_POWER_MGMT, 1).sc(), sc(SC_INVALID_FIELD));
    d.set_feature(FEAT_POWER_MGMT, 0x20).ok();
    assert_eq!(get(&mut d, FEAT_POWER_MGMT, 0, 0), 0x20);
    // Temperature threshold of the composite sensor.
    assert_eq!(get(&mut d, FEAT_TEMP_THRESHOLD, 0, 0), 343);
    d.set_feature(FEAT_TEMP_THRESHOLD, 350).ok();
    d.set_feature(FEAT_TEMP_THRESHOLD, (1 << 20) | 270).ok();
    assert_eq!(get(&mut d, FEAT_TEMP_THRESHOLD, 0, 0), 350);
    assert_eq!(get(&mut d, FEAT_TEMP_THRESHOLD, 0, 1 << 20), 270);
    assert_eq!(d.set_feature(FEAT_TEMP_THRESHOLD, (1 << 16) | 300).sc(), sc(SC_INVALID_FIELD), "no sensor 1");
    assert_eq!(d.set_feature(FEAT_TEMP_THRESHOLD, (2 << 20) | 300).sc(), sc(SC_INVALID_FIELD));
    // Error recovery.
    d.set_feature(FEAT_ERROR_RECOVERY, 10).ok();
    assert_eq!(get(&mut d, FEAT_ERROR_RECOVERY, 0, 0), 10);
    assert_eq!(d.set_feature(FEAT_ERROR_RECOVERY, 1 << 16).sc(), sc(SC_INVALID_FIELD), "DULBE");
    // Volatile write cache.
    assert_eq!(get(&mut d, FEAT_VOLATILE_WC, 0, 0), 1);
    d.set_feature(FEAT_VOLATILE_WC, 0).ok();
    assert_eq!(get(&mut d, FEAT_VOLATILE_WC, 0, 0), 0);
    // Number of queues.
    assert_eq!(get(&mut d, FEAT_NUM_QUEUES, 0, 0), 7 | (7 << 16));
    assert_eq!(d.set_feature(FEAT_NUM_QUEUES, 0xffff).sc(), sc(SC_INVALID_FIELD));
    assert_eq!(d.set_feature(FEAT_NUM_QUEUES, 0xffff << 16).sc(), sc(SC_INVALID_FIELD));
    assert_eq!(d.set_feature(FEAT_NUM_QUEUES, 1000 | (1000 << 16)).ok().dw0, 7 | (7 << 16));
    assert_eq!(d.set_feature(FEAT_NUM_QUEUES, 1 | (2 << 16)).ok().dw0, 1 | (2 << 16));
    assert_eq!(get(&mut d, FEAT_NUM_QUEUES, 0, 0), 1 | (2 << 16));
    // Interrupt coalescing and vector configuration.
    d.set_feature(FEAT_INT_COALESCING, 0x0a05).ok();
    assert_eq!(get(&mut d, FEAT_INT_COALESCING, 0, 0), 0x0a05);
    assert_eq!(get(&mut d, FEAT_INT_VECTOR_CONFIG, 0, 1), 1);
    d.set_feature(FEAT_INT_VECTOR_CONFIG, (1 << 16) | 1).ok();
    assert_eq!(get(&mut d, FEAT_INT_VECTOR_CONFIG, 0, 1), (1 << 16) | 1);
    assert_eq!(get(&mut d, FEAT_INT_VECTOR_CONFIG, 1, 1), 1, "default: coalescing applies");
    assert_eq!(d.get_feature(FEAT_INT_VECTOR_CONFIG, 9).sc(), sc(SC_INVALID_FIELD));
    assert_eq!(d.set_feature(FEAT_INT_VECTOR_CONFIG, 9).sc(), sc(SC_INVALID_FIELD));
    // Write atomicity, async event configuration, keep alive timer.
    d.set_feature(FEAT_WRITE_ATOMICITY, 1).ok();
    assert_eq!(get(&mut d, FEAT_WRITE_ATOMICITY, 0, 0), 1);
    d.set_feature(FEAT_ASYNC_EVENT_CONFIG, 0x1ff).ok();
    assert_eq!(get(&mut d, FEAT_ASYNC_EVENT_CONFIG, 0, 0), 0x1ff);
    d.set_feature(FEAT_KEEP_ALIVE_TIMER, 150_000).ok();
    assert_eq!(get(&mut d, FEAT_KEEP_ALIVE_TIMER, 0, 0), 150_000);
    d.set_feature(FEAT_KEEP_ALIVE_TIMER, 120_050).ok();
    assert_eq!(get(&mut d, FEAT_KEEP_ALIVE_TIMER, 0, 0), 120_100, "rounded up to KAS granularity");
    d.set_feature(FEAT_KEEP_ALIVE_TIMER, 0).ok();
    // Errors.
    let save = Cmd::new(ADM_SET_FEATURES).d(10, u32::from(FEAT_ARBITRATION) | (1 << 31));
    assert_eq!(d.admin(save).sc(), sc(SC_FEATURE_NOT_SAVEABLE));
    let per_ns = Cmd::new(ADM_SET_FEATURES).ns(1).d(10, u32::from(FEAT_VOLATILE_WC)).d(11, 1);
    assert_eq!(d.admin(per_ns).sc(), sc(SC_FEATURE_NOT_NS_SPECIFIC));
    d.admin(Cmd::new(ADM_SET_FEATURES).ns(NSID_ALL).d(10, u32::from(FEAT_VOLATILE_WC)).d(11, 1)).ok();
    assert_eq!(d.get_feature(0x7e, 0).sc(), sc(SC_INVALID_FIELD));
    assert_eq!(d.set_feature(0x7e, 0).sc(), sc(SC_INVALID_FIELD));
    let bad_sel = Cmd::new(ADM_GET_FEATURES).d(10, u32::from(FEAT_ARBITRATION) | (4 << 8));
    assert_eq!(d.admin(bad_sel).sc(), sc(SC_INVALID_FIELD));
    // A controller reset restores defaults.
    d.disable();
    d.enable(32);
    assert_eq!(get(&mut d, FEAT_INT_COALESCING, 0, 0), 0);
    assert_eq!(get(&mut d, FEAT_ARBITRATION, 0, 0), 0);
    assert_eq!(get(&mut d, FEAT_NUM_QUEUES, 0, 0), 7 | (7 << 16));
    assert_eq!(get(&mut d, FEAT_INT_VECTOR_CONFIG, 0, 1), 1);
}

#[test]
fn log_pages() {
    let mut d = Driver::enabled(Opts::default());
    d.add_ns(1, malloc_bdev("lp1", 512, 1024));
    d.setup_io(1, 32, false);
    // Error information: newest first.
    let bad = d.admin(Cmd::new(0x80));
    let bad_io = d.run(1, Cmd::new(IO_READ).ns(1).lba(1020, 8).prp(d.io[0].sq, 0));
    assert_eq!(bad_io.sc(), sc(SC_LBA_OUT_OF_RANGE));
    let (c, log) = d.log_page(LOG_ERROR, 128, 0, true);
    c.ok();
    let (e0, e1) = (&log[0..64], &log[64..128]);
    assert!(u64_at(e0, 0) > u64_at(e1, 0), "error counts increase");
    assert_eq!((u16_at(e0, 8), u16_at(e0, 10)), (1, bad_io.cid));
    assert_eq!((u16_at(e0, 12) >> 1) & 0xff, 0x80);
    assert_eq!((u64_at(e0, 16), u32_at(e0, 24)), (1020, 1));
    assert_eq!((u16_at(e1, 8), u16_at(e1, 10)), (0, bad.cid));
    assert_eq!((u16_at(e1, 12) >> 1) & 0xff, 0x01);
    // SMART / health.
    for i in 0..3 {
        d.write(1, 1, i * 8, &pattern(i, 4096), 512, None).ok();
    }
    d.read(1, 1, 0, 8, 512, None);
    d.read(1, 1, 8, 8, 512, None);
    let (c, smart) = d.log_page(LOG_SMART, 512, 0, false);
    c.ok();
    assert_eq!(smart[0], 0, "no critical warning");
    assert_eq!(u16_at(&smart, 1), 313);
    assert_eq!((smart[3], smart[4]), (100, 10));
    assert_eq!(u64_at(&smart, 32), 1, "data units read (thousands of 512 bytes, rounded up)");
    assert_eq!(u64_at(&smart, 48), 1);
    assert_eq!((u64_at(&smart, 64), u64_at(&smart, 80)), (2, 3), "host read / write commands");
    assert!(u64_at(&smart, 176) >= 2, "error log entries");
    let smart_ns1 = Cmd::new(ADM_GET_LOG_PAGE).ns(1).d(10, u32::from(LOG_SMART) | (127 << 16));
    let buf = d.alloc(PAGE);
    assert_eq!(d.admin(smart_ns1.prp(buf, 0)).sc(), sc(SC_INVALID_FIELD), "no per-namespace SMART");
    // Offsets and lengths.
    let (c, part) = d.log_page(LOG_SMART, 4, 4, false);
    c.ok();
    assert_eq!(part, smart[4..8]);
    let (c, long) = d.log_page(LOG_SMART, 1024, 0, false);
    c.ok();
    assert_eq!(&long[..176], &smart[..176], "(the error count moved on)");
    assert!(long[512..].iter().all(|&b| b == 0), "past the log: zeroes");
    assert_eq!(d.log_page(LOG_SMART, 8, 2, false).0.sc(), sc(SC_INVALID_FIELD), "offset not dword aligned");
    assert_eq!(d.log_page(LOG_SMART, 8, 512, false).0.sc(), sc(SC_INVALID_FIELD), "offset past the log");
    assert_eq!(d.log_page(0x7f, 512, 0, false).0.sc(), sc(SC_INVALID_LOG_PAGE));
    // Firmware slot information.
    let (c, fw) = d.log_page(LOG_FIRMWARE_SLOT, 512, 0, false);
    c.ok();
    assert_eq!(fw[0], 1);
    assert!(fw[8..16].starts_with(b"v0."));
    // Commands supported and effects.
    let (c, fx) = d.log_page(LOG_COMMAND_EFFECTS, 4096, 0, false);
    c.ok();
    assert_eq!(u32_at(&fx, 4 * usize::from(ADM_IDENTIFY)), 1);
    assert_eq!(u32_at(&fx, 4 * usize::from(ADM_DOORBELL_BUFFER_CONFIG)), 1);
    assert_eq!(u32_at(&fx, 4 * 0x80), 0);
    assert_eq!(u32_at(&fx, 1024 + 4 * usize::from(IO_WRITE)), 3);
    assert_eq!(u32_at(&fx, 1024 + 4 * usize::from(IO_READ)), 1);
    // Changed namespace list (empty here: the list was cleared by nothing yet, holds NSID 1).
    let (c, ch) = d.log_page(LOG_CHANGED_NS, 4096, 0, false);
    c.ok();
    assert_eq!(u32_at(&ch, 0), 1);
    let (_, ch) = d.log_page(LOG_CHANGED_NS, 4096, 0, false);
    assert_eq!(u32_at(&ch, 0), 0, "reading with RAE = 0 clears the list");
}

#[test]
fn namespace_changes_raise_async_events_with_the_changed_list() {
    let mut d = Driver::enabled(Opts { nn: 16, ..Default::default() });
    d.setup_io(1, 32, false);
    d.log_page(LOG_CHANGED_NS, 4096, 0, false).0.ok();
    d.set_feature(FEAT_ASYNC_EVENT_CONFIG, 1 << 8).ok();
    let a1 = d.submit(0, Cmd::new(ADM_ASYNC_EVENT));
    assert!(d.completion_within(0, Duration::from_millis(50)).is_none(), "AER waits for an event");
    // Hot add.
    d.add_ns(2, malloc_bdev("ae2", 512, 128));
    let c = d.wait(0, a1).ok();
    assert_eq!(c.dw0, 0x0004_0002, "notice / namespace attribute changed / log 04h");
    let (_, ch) = d.log_page(LOG_CHANGED_NS, 4096, 0, true);
    assert_eq!((u32_at(&ch, 0), u32_at(&ch, 4)), (2, 0));
    d.write(1, 2, 0, &pattern(3, 1024), 512, None).ok();
    // Masked until the log is read with RAE = 0: no new event for namespace 3.
    let a2 = d.submit(0, Cmd::new(ADM_ASYNC_EVENT));
    let b3 = malloc_bdev("ae3", 4096, 16);
    d.add_ns(3, b3.clone());
    assert!(d.completion_within(0, Duration::from_millis(50)).is_none());
    let (_, ch) = d.log_page(LOG_CHANGED_NS, 4096, 0, false);
    assert_eq!((u32_at(&ch, 0), u32_at(&ch, 4), u32_at(&ch, 8)), (2, 3, 0));
    // Hot remove.
    let removed = d.ctrl.remove_namespace(2).unwrap();
    assert_eq!(removed.name(), "ae2");
    let c = d.wait(0, a2).ok();
    assert_eq!(c.dw0, 0x0004_0002);
    let (_, ch) = d.log_page(LOG_CHANGED_NS, 4096, 0, false);
    assert_eq!((u32_at(&ch, 0), u32_at(&ch, 4)), (2, 0));
    assert_eq!(d.write(1, 2, 0, &pattern(3, 512), 512, None).sc(), sc(SC_INVALID_NAMESPACE));
    // Resize.
    let a3 = d.submit(0, Cmd::new(ADM_ASYNC_EVENT));
    b3.resize(32).unwrap();
    assert_eq!(d.wait(0, a3).ok().dw0, 0x0004_0002);
    let (_, ns) = d.identify(0, 3);
    assert_eq!(u64_at(&ns, 0), 32);
    d.log_page(LOG_CHANGED_NS, 4096, 0, false).0.ok();
    // Namespace notices disabled: no event.
    d.set_feature(FEAT_ASYNC_EVENT_CONFIG, 0).ok();
    let a4 = d.submit(0, Cmd::new(ADM_ASYNC_EVENT));
    d.add_ns(4, malloc_bdev("ae4", 512, 8));
    assert!(d.completion_within(0, Duration::from_millis(50)).is_none());
    // At most AERL + 1 = 4 outstanding.
    let more: Vec<u16> = (0..3).map(|_| d.submit(0, Cmd::new(ADM_ASYNC_EVENT))).collect();
    assert_eq!(d.admin(Cmd::new(ADM_ASYNC_EVENT)).sc(), sc(SC_AER_LIMIT_EXCEEDED));
    // Abort an outstanding AER; Abort of anything else reports "not aborted".
    let c = d.admin(Cmd::new(ADM_ABORT).d(10, u32::from(more[1]) << 16)).ok();
    assert_eq!(c.dw0 & 1, 0, "aborted");
    assert_eq!(d.wait(0, more[1]).sc(), sc(SC_ABORT_REQUESTED));
    let c = d.admin(Cmd::new(ADM_ABORT).d(10, (0x1234 << 16) | 1)).ok();
    assert_eq!(c.dw0 & 1, 1, "not aborted");
    let _ = a4;
    // Namespace management errors.
    assert!(matches!(
        d.ctrl.add_namespace(Some(0), malloc_bdev("x", 512, 8), NsIds::default()),
        Err(NvmeError::NsidOutOfRange { .. })
    ));
    assert!(matches!(
        d.ctrl.add_namespace(Some(17), malloc_bdev("x", 512, 8), NsIds::default()),
        Err(NvmeError::NsidOutOfRange { .. })
    ));
    assert!(matches!(
        d.ctrl.add_namespace(Some(3), malloc_bdev("x", 512, 8), NsIds::default()),
        Err(NvmeError::NsidInUse(3))
    ));
    assert_eq!(d.ctrl.add_namespace(None, malloc_bdev("x", 512, 8), NsIds::default()).unwrap(), 1);
    assert!(matches!(d.ctrl.remove_namespace(9), Err(NvmeError::NsNotFound(9))));
    let names: Vec<(u32, String)> = d.ctrl.namespaces().iter().map(|(n, b)| (*n, b.name().to_string())).collect();
    assert_eq!(names, vec![(1, "x".into()), (3, "ae3".into()), (4, "ae4".into())]);
}

#[test]
fn keep_alive_timer_expiry_is_fatal() {
    let mut d = Driver::enabled(Opts::default());
    d.set_feature(FEAT_KEEP_ALIVE_TIMER, 200).ok();
    for _ in 0..10 {
        std::thread::sleep(Duration::from_millis(40));
        d.admin(Cmd::new(ADM_KEEP_ALIVE)).ok();
    }
    assert_eq!(d.csts() & CSTS_CFS, 0, "keep alive commands keep the controller alive");
    d.wait_csts("CSTS.CFS", CSTS_CFS, CSTS_CFS);
    d.disable();
    assert_eq!(d.csts(), 0);
    d.enable(32);
    d.admin(Cmd::new(ADM_KEEP_ALIVE)).ok();
}

#[test]
fn invalid_doorbell_writes_raise_asynchronous_errors() {
    let mut d = Driver::enabled(Opts { max_io_queues: 4, ..Default::default() });
    d.add_ns(1, malloc_bdev("db1", 512, 64));
    d.setup_io(2, 16, false);
    let a1 = d.submit(0, Cmd::new(ADM_ASYNC_EVENT));
    // SQ 1 tail = queue size: invalid value.
    d.mmio_doorbell(2, 16);
    let c = d.wait(0, a1).ok();
    assert_eq!(c.dw0, 0x0001_0100, "error / invalid doorbell write value / log 01h");
    let (_, log) = d.log_page(LOG_ERROR, 64, 0, false);
    assert_eq!((u16_at(&log, 8), u16_at(&log, 10)), (1, 0xffff));
    // The queue is dead; queue 2 still works.
    d.io[0].tail = 0;
    d.submit(1, Cmd::new(IO_FLUSH).ns(1));
    assert!(d.completion_within(1, Duration::from_millis(50)).is_none());
    d.run(2, Cmd::new(IO_FLUSH).ns(1)).ok();
    // A doorbell of a queue that does not exist.
    let a2 = d.submit(0, Cmd::new(ADM_ASYNC_EVENT));
    d.mmio_doorbell(2 * 3, 1);
    assert_eq!(d.wait(0, a2).ok().dw0, 0x0001_0000, "write to invalid doorbell register");
    d.log_page(LOG_ERROR, 64, 0, false).0.ok();
    // A completion queue head past the entries posted.
    let a3 = d.submit(0, Cmd::new(ADM_ASYNC_EVENT));
    d.mmio_doorbell(2 * 2 + 1, 5);
    assert_eq!(d.wait(0, a3).ok().dw0, 0x0001_0100);
    // The admin queue's doorbells are fatal.
    d.mmio_doorbell(1, 999);
    d.wait_csts("CSTS.CFS", CSTS_CFS, CSTS_CFS);
    d.disable();
    d.enable(32);
    d.setup_io(1, 16, false);
    d.run(1, Cmd::new(IO_FLUSH).ns(1)).ok();
}

#[test]
fn doorbell_buffer_config_validates_and_switches_existing_queues() {
    let mut d = Driver::enabled(Opts::default());
    d.add_ns(1, malloc_bdev("dbb", 512, 256));
    d.setup_io(2, 16, false);
    for i in 0..4 {
        d.write(1 + i % 2, 1, i as u64 * 8, &pattern(i as u64, 4096), 512, None).ok();
    }
    let (a, b) = (d.alloc(PAGE), d.alloc(PAGE));
    let cfg = |p1, p2| Cmd::new(ADM_DOORBELL_BUFFER_CONFIG).prp(p1, p2);
    for (p1, p2) in [(a + 0x100, b), (a, b + 8), (a, a), (0, b), (a, 0), (0x5000, b)] {
        assert_eq!(d.admin(cfg(p1, p2)).sc(), sc(SC_INVALID_FIELD), "{p1:#x} {p2:#x}");
    }
    // Switch the live queues to shadow doorbells: the current tails carry over.
    d.configure_shadow();
    let (db, _ei) = d.shadow.unwrap();
    let mut v = [0u8; 4];
    d.mem.read(db + 8, &mut v).unwrap();
    assert_eq!(u32::from_le_bytes(v), d.io[0].tail);
    for i in 0..40u64 {
        let q = 1 + (i % 2) as usize;
        d.write(q, 1, (i % 32) * 8, &pattern(i, 4096), 512, None).ok();
        assert_eq!(d.read(q, 1, (i % 32) * 8, 8, 512, None), pattern(i, 4096));
    }
    // Without the option the opcode does not exist.
    let mut d2 = Driver::enabled(Opts { shadow: false, ..Default::default() });
    let (a, b) = (d2.alloc(PAGE), d2.alloc(PAGE));
    assert_eq!(d2.admin(cfg(a, b)).sc(), sc(SC_INVALID_OPCODE));
    let (_, id) = d2.identify(1, 0);
    assert_eq!(u16_at(&id, 256) & (1 << 8), 0);
}
