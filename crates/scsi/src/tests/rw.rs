//! READ CAPACITY, READ, WRITE, VERIFY and SYNCHRONIZE CACHE.

use super::*;

fn rc16(alloc: u32) -> Vec<u8> {
    let mut c = vec![0u8; 16];
    c[0] = 0x9E;
    c[1] = 0x10;
    c[10..14].copy_from_slice(&alloc.to_be_bytes());
    c
}

const RC10: [u8; 10] = [0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0];

#[test]
fn read_capacity_10_reports_last_lba_and_block_size_512() {
    let mut h = H::new(malloc_bdev(512, 2048));
    let (r, d) = h.cmd_in(&RC10, 8);
    assert_eq!(r, TaskResult::good(8));
    assert_eq!(d, [0x00, 0x00, 0x07, 0xFF, 0x00, 0x00, 0x02, 0x00]);
}

#[test]
fn read_capacity_10_reports_last_lba_and_block_size_4096() {
    let mut h = H::new(malloc_bdev(4096, 256));
    let (r, d) = h.cmd_in(&RC10, 64);
    assert_eq!(r, TaskResult::good(8));
    assert_eq!(d, [0x00, 0x00, 0x00, 0xFF, 0x00, 0x00, 0x10, 0x00]);
}

#[test]
fn read_capacity_10_returns_ffffffff_when_the_last_lba_does_not_fit() {
    for (blocks, last) in
        [((1u64 << 32) - 1, [0xFF, 0xFF, 0xFF, 0xFE]), (1 << 32, [0xFF; 4]), ((1 << 40) + 5, [0xFF; 4])]
    {
        let mut h = H::new(null_bdev(512, blocks));
        let (r, d) = h.cmd_in(&RC10, 8);
        assert_eq!(r, TaskResult::good(8));
        assert_eq!(&d[..4], &last, "{blocks} blocks");
        assert_eq!(&d[4..], &[0, 0, 2, 0]);
        // READ CAPACITY(16) has the real value.
        let (_, d) = h.cmd_in(&rc16(32), 32);
        assert_eq!(u64::from_be_bytes(d[..8].try_into().unwrap()), blocks - 1);
    }
}

#[test]
fn read_capacity_10_with_lba_and_no_pmi_returns_invalid_field_in_cdb() {
    let mut h = H::new(malloc_bdev(512, 64));
    let mut c = RC10;
    c[5] = 1;
    let (r, _) = h.cmd_in(&c, 8);
    assert_check(&r, 0x05, 0x24, 0x00, Some([0xC0, 0x00, 0x02]));
    // With PMI the (obsolete) LBA is accepted.
    c[8] = 1;
    assert_eq!(h.cmd_in(&c, 8).0, TaskResult::good(8));
    // Data-in smaller than the 8 bytes: what fits.
    assert_eq!(h.cmd_in(&RC10, 3).0, TaskResult::good(3));
}

#[test]
fn read_capacity_16_reports_capacity_and_provisioning() {
    let mut h = H::new(malloc_bdev(4096, 1000));
    let (r, d) = h.cmd_in(&rc16(32), 64);
    assert_eq!(r, TaskResult::good(32));
    let mut want = [0u8; 32];
    want[..8].copy_from_slice(&999u64.to_be_bytes());
    want[8..12].copy_from_slice(&4096u32.to_be_bytes());
    want[14] = 0x80; // LBPME
    assert_eq!(d, want);

    let mut h = H::with_opts(malloc_bdev(512, 1000), LunOptions { unmap_reads_zeroes: true, ..Default::default() });
    let (_, d) = h.cmd_in(&rc16(32), 64);
    assert_eq!(d[14], 0xC0, "LBPME and LBPRZ");
    assert_eq!(&d[8..12], &[0, 0, 2, 0]);

    let (_f, b) = file_bdev(64, uring::Flavor::Aio, false);
    let mut h = H::new(b);
    let (_, d) = h.cmd_in(&rc16(32), 64);
    assert_eq!(d[14], 0x00, "no unmap, no LBPME");
    assert_eq!(u64::from_be_bytes(d[..8].try_into().unwrap()), 63);
}

#[test]
fn read_capacity_16_allocation_length_limits_the_data() {
    let mut h = H::new(malloc_bdev(512, 64));
    let (r, d) = h.cmd_in(&rc16(12), 64);
    assert_eq!(r, TaskResult::good(12));
    assert_eq!(&d[..12], &[0, 0, 0, 0, 0, 0, 0, 63, 0, 0, 2, 0]);
    assert_eq!(h.cmd_in(&rc16(0), 64).0, TaskResult::good(0));
    assert_eq!(h.cmd_in(&rc16(u32::MAX), 64).0, TaskResult::good(32));
    let mut c = rc16(32);
    c[9] = 1;
    assert_invalid_cdb(&h.cmd_in(&c, 64).0, 2, None);
}

type CdbFn = fn(u64, u32) -> Vec<u8>;

fn r6(lba: u64, n: u32) -> Vec<u8> {
    cdb6(0x08, lba as u32, n as u8)
}
fn r10(lba: u64, n: u32) -> Vec<u8> {
    cdb10(0x28, 0, lba as u32, n as u16)
}
fn r12(lba: u64, n: u32) -> Vec<u8> {
    cdb12(0xA8, 0, lba as u32, n)
}
fn r16(lba: u64, n: u32) -> Vec<u8> {
    cdb16(0x88, 0, lba, n)
}
fn w6(lba: u64, n: u32) -> Vec<u8> {
    cdb6(0x0A, lba as u32, n as u8)
}
fn w10(lba: u64, n: u32) -> Vec<u8> {
    cdb10(0x2A, 0, lba as u32, n as u16)
}
fn w12(lba: u64, n: u32) -> Vec<u8> {
    cdb12(0xAA, 0, lba as u32, n)
}
fn w16(lba: u64, n: u32) -> Vec<u8> {
    cdb16(0x8A, 0, lba, n)
}

const READS: [CdbFn; 4] = [r6, r10, r12, r16];
const WRITES: [CdbFn; 4] = [w6, w10, w12, w16];

#[test]
fn write_then_read_round_trips_across_odd_iovecs_for_every_cdb_size() {
    for bs in [512usize, 4096] {
        let mut h = H::new(malloc_bdev(bs as u32, 256));
        for (i, (w, r)) in WRITES.iter().zip(READS.iter().rev()).enumerate() {
            let lba = 3 + 17 * i as u64;
            let data = pattern(i as u64 + 1, 9 * bs);
            assert_eq!(h.cmd_out(&w(lba, 9), &data), TaskResult::good(0), "write {i}");
            let (res, back) = h.cmd_in(&r(lba, 9), 9 * bs);
            assert_eq!(res, TaskResult::good(9 * bs as u32), "read {i}");
            assert_eq!(back, data, "round trip {i} at block size {bs}");
            // Neighbours are untouched.
            assert!(h.read(lba - 1, 1).iter().all(|&b| b == 0));
            assert!(h.read(lba + 9, 1).iter().all(|&b| b == 0));
        }
    }
}

#[test]
fn write_then_read_round_trips_on_a_uring_file() {
    let (_f, b) = file_bdev(1024, uring::Flavor::Uring, true);
    let mut h = H::new(b);
    let data = pattern(42, 33 * 512);
    assert_eq!(h.cmd_out(&w10(100, 33), &data), TaskResult::good(0));
    assert_eq!(h.read(100, 33), data);
    assert_eq!(h.cmd(&cdb10(0x35, 0, 0, 0)), TaskResult::good(0), "SYNCHRONIZE CACHE");
}

#[test]
fn read_6_and_write_6_transfer_length_0_means_256_blocks() {
    let mut h = H::new(malloc_bdev(512, 1024));
    let data = pattern(6, 256 * 512);
    assert_eq!(h.cmd_out(&cdb6(0x0A, 300, 0), &data), TaskResult::good(0));
    assert_eq!(h.read(300, 256), data);
    let (r, back) = h.cmd_in(&cdb6(0x08, 300, 0), 256 * 512);
    assert_eq!(r, TaskResult::good(256 * 512));
    assert_eq!(back, data);
    // 21-bit LBA.
    let (r, _) = h.cmd_in(&cdb6(0x08, 0x1F_FFFF, 1), 512);
    assert_lba_out_of_range(&r);
}

#[test]
fn read_and_write_with_transfer_length_0_transfer_nothing() {
    let mut h = H::new(malloc_bdev(512, 64));
    for c in [r10(5, 0), r12(5, 0), r16(5, 0), w10(5, 0), w12(5, 0), w16(5, 0), r16(64, 0)] {
        let (r, _) = h.cmd_in(&c, 4096);
        assert_eq!(r, TaskResult::good(0), "{c:02x?}");
    }
    assert!(logged().is_empty(), "no bdev I/O");
}

#[test]
fn read_10_past_capacity_returns_lba_out_of_range() {
    let mut h = H::new(malloc_bdev(512, 64));
    let (r, _) = h.cmd_in(&r10(63, 2), 1024);
    assert_check(&r, 0x05, 0x21, 0x00, None);
    let (r, _) = h.cmd_in(&r10(64, 1), 512);
    assert_lba_out_of_range(&r);
    // Transfer length 0 but the LBA is past the end.
    let (r, _) = h.cmd_in(&r10(65, 0), 512);
    assert_lba_out_of_range(&r);
    // The last block itself is fine.
    assert_eq!(h.cmd_in(&r10(63, 1), 512).0, TaskResult::good(512));
    assert!(logged().iter().all(|l| l.offset == 63), "{:?}", logged());
}

#[test]
fn read_16_with_lba_overflowing_returns_lba_out_of_range() {
    let mut h = H::new(malloc_bdev(512, 64));
    let (r, _) = h.cmd_in(&r16(u64::MAX, 2), 1024);
    assert_lba_out_of_range(&r);
    let (r, _) = h.cmd_in(&r16(1 << 63, 1), 1024);
    assert_lba_out_of_range(&r);
}

#[test]
fn write_past_capacity_returns_lba_out_of_range_for_every_cdb_size() {
    let mut h = H::new(malloc_bdev(512, 64));
    for w in WRITES {
        assert_lba_out_of_range(&h.cmd_out(&w(60, 5), &[0u8; 5 * 512]));
    }
    let r = h.cmd_out(&w16(u64::MAX, 1), &[0u8; 512]);
    assert_lba_out_of_range(&r);
    assert!(logged().is_empty());
}

#[test]
fn read_and_write_with_protection_fields_return_invalid_field_in_cdb() {
    let mut h = H::new(malloc_bdev(512, 64));
    for (op, b1) in [(0x28u8, 0x20u8), (0x2A, 0x40), (0x88, 0xE0), (0x8A, 0x20), (0xA8, 0x80), (0xAA, 0x60)] {
        let c = if op >= 0xA0 {
            cdb12(op, b1, 0, 1)
        } else if op >= 0x80 {
            cdb16(op, b1, 0, 1)
        } else {
            cdb10(op, b1, 0, 1)
        };
        let (r, _) = h.cmd_in(&c, 512);
        assert_check(&r, 0x05, 0x24, 0x00, Some([0xCF, 0x00, 0x01]));
    }
}

#[test]
fn read_and_write_reserved_bits_return_invalid_field_in_cdb() {
    let mut h = H::new(malloc_bdev(512, 64));
    // READ(6) byte 1 bit 5 (the old LUN field).
    let mut c = r6(0, 1);
    c[1] |= 0x20;
    assert_check(&h.cmd_in(&c, 512).0, 0x05, 0x24, 0x00, Some([0xCD, 0x00, 0x01]));
    // READ(10) byte 6 bit 7 (reserved above GROUP NUMBER).
    let mut c = r10(0, 1);
    c[6] = 0x80;
    assert_invalid_cdb(&h.cmd_in(&c, 512).0, 6, Some(7));
    // WRITE(10) byte 1 bit 2 (reserved; RARC exists only for reads).
    assert_invalid_cdb(&h.cmd_out(&cdb10(0x2A, 0x04, 0, 1), &[0; 512]), 1, Some(2));
    // WRITE(16) byte 1 bit 0.
    assert_invalid_cdb(&h.cmd_out(&cdb16(0x8A, 0x01, 0, 1), &[0; 512]), 1, Some(0));
    // DPO, FUA, RARC and GROUP NUMBER are accepted.
    let mut c = r10(0, 1);
    c[1] = 0x1C;
    c[6] = 0x1F;
    assert_eq!(h.cmd_in(&c, 512).0, TaskResult::good(512));
}

#[test]
fn read_with_data_in_smaller_than_the_transfer_returns_invalid_field_in_cdb() {
    let mut h = H::new(malloc_bdev(512, 64));
    for (c, field) in [(r6(0, 8), 4u8), (r10(0, 8), 7), (r12(0, 8), 6), (r16(0, 8), 10)] {
        let (r, _) = h.cmd_in(&c, 8 * 512 - 1);
        assert_check(&r, 0x05, 0x24, 0x00, Some([0xC0, 0x00, field]));
    }
    assert!(logged().is_empty(), "nothing was read");
}

#[test]
fn read_with_larger_data_in_reports_the_bytes_transferred() {
    let mut h = H::new(malloc_bdev(512, 64));
    let data = pattern(1, 4 * 512);
    h.write(10, &data);
    let (r, back) = h.cmd_in(&r10(10, 4), 8192);
    assert_eq!(r, TaskResult::good(2048));
    assert_eq!(back, data);
}

#[test]
fn write_with_data_out_shorter_than_the_transfer_returns_invalid_field_in_cdb() {
    let mut h = H::new(malloc_bdev(512, 64));
    for (c, field) in [(w6(0, 4), 4u8), (w10(0, 4), 7), (w12(0, 4), 6), (w16(0, 4), 10)] {
        let r = h.cmd_out(&c, &pattern(3, 4 * 512 - 100));
        assert_check(&r, 0x05, 0x24, 0x00, Some([0xC0, 0x00, field]));
    }
    assert!(h.read(0, 4).iter().all(|&b| b == 0), "nothing was written");
    // A longer data-out buffer is fine: only the transfer length is written.
    let data = pattern(4, 3 * 512);
    assert_eq!(h.cmd_out(&w10(0, 2), &data), TaskResult::good(0));
    assert_eq!(h.read(0, 3)[..1024], data[..1024]);
    assert!(h.read(2, 1).iter().all(|&b| b == 0));
}

#[test]
fn transfer_beyond_the_maximum_transfer_length_returns_invalid_field_in_cdb() {
    let mut h = H::with_opts(malloc_bdev(512, 64), LunOptions { max_transfer_bytes: 4096, ..Default::default() });
    assert_eq!(h.lun.max_transfer_blocks(), 8);
    let (r, _) = h.cmd_in(&r10(0, 9), 9 * 512);
    assert_check(&r, 0x05, 0x24, 0x00, Some([0xC0, 0x00, 0x07]));
    assert_invalid_cdb(&h.cmd_out(&w16(0, 9), &[0; 9 * 512]), 10, None);
    assert_invalid_cdb(&h.cmd(&cdb10(0x2F, 0, 0, 9)), 7, None);
    assert_eq!(h.cmd_in(&r10(0, 8), 8 * 512).0, TaskResult::good(4096));
}

#[test]
fn write_to_a_read_only_bdev_returns_data_protect() {
    let b = malloc::create(BdevParams { read_only: true, ..params(512, 64) }, false).unwrap();
    let mut h = H::new(b);
    for w in WRITES {
        let r = h.cmd_out(&w(0, 1), &[1u8; 512]);
        assert_check(&r, 0x07, 0x27, 0x00, None);
    }
    assert_eq!(h.cmd_in(&r10(0, 1), 512).0, TaskResult::good(512));
    // The range is checked first.
    assert_lba_out_of_range(&h.cmd_out(&w10(64, 1), &[1u8; 512]));
}

#[test]
fn write_fua_bit_is_passed_to_the_bdev() {
    let (_f, b) = file_bdev(64, uring::Flavor::Uring, true);
    let mut h = H::new(b);
    assert!(h.lun.write_cache_enabled(), "a file has a write cache");
    assert_eq!(h.cmd_out(&w10(0, 1), &[1u8; 512]), TaskResult::good(0));
    assert_eq!(h.cmd_out(&cdb10(0x2A, 0x08, 1, 1), &[2u8; 512]), TaskResult::good(0));
    assert_eq!(h.cmd_out(&cdb16(0x8A, 0x08, 2, 1), &[3u8; 512]), TaskResult::good(0));
    assert_eq!(h.cmd_out(&cdb12(0xAA, 0x08, 3, 1), &[4u8; 512]), TaskResult::good(0));
    let fua: Vec<bool> = logged().iter().map(|l| l.fua).collect();
    assert_eq!(fua, [false, true, true, true]);
}

fn verify10(bytchk: u8, lba: u32, n: u16) -> Vec<u8> {
    cdb10(0x2F, bytchk << 1, lba, n)
}

fn verify16(bytchk: u8, lba: u64, n: u32) -> Vec<u8> {
    cdb16(0x8F, bytchk << 1, lba, n)
}

#[test]
fn verify_without_bytchk_checks_the_range_only() {
    let mut h = H::new(malloc_bdev(512, 64));
    assert_eq!(h.cmd(&verify10(0, 0, 64)), TaskResult::good(0));
    assert_eq!(h.cmd(&verify16(0, 63, 1)), TaskResult::good(0));
    assert_eq!(h.cmd(&cdb12(0xAF, 0, 10, 5)), TaskResult::good(0));
    assert_eq!(h.cmd(&verify10(0, 64, 0)), TaskResult::good(0), "length 0 verifies nothing");
    assert!(logged().is_empty(), "no bdev I/O");
    assert_lba_out_of_range(&h.cmd(&verify10(0, 60, 5)));
    assert_lba_out_of_range(&h.cmd(&verify16(0, u64::MAX, 1)));
    assert_lba_out_of_range(&h.cmd(&verify16(0, 65, 0)));
}

#[test]
fn verify_with_bytchk_and_matching_data_returns_good() {
    let mut h = H::new(malloc_bdev(512, 4096));
    // More than one 1 MiB compare step.
    let data = pattern(9, 2100 * 512);
    h.write(7, &data);
    clear_log();
    assert_eq!(h.cmd_out(&verify16(1, 7, 2100), &data), TaskResult::good(0));
    let reads: Vec<(u64, u64)> = logged().iter().map(|l| (l.offset, l.blocks)).collect();
    assert_eq!(reads, [(7, 2048), (7 + 2048, 52)]);
    assert_eq!(h.cmd_out(&verify10(1, 7, 3), &data[..3 * 512]), TaskResult::good(0));
    assert_eq!(h.cmd_out(&cdb12(0xAF, 0x02, 7, 3), &data[..3 * 512]), TaskResult::good(0));
}

#[test]
fn verify_with_bytchk_and_different_data_returns_miscompare_with_the_offset() {
    let mut h = H::new(malloc_bdev(512, 4096));
    let data = pattern(9, 2100 * 512);
    h.write(7, &data);
    let mut other = data.clone();
    other[1_050_000] ^= 0x01;
    let r = h.cmd_out(&verify16(1, 7, 2100), &other);
    assert_eq!(r.status, ScsiStatus::CheckCondition);
    let s = r.sense_bytes().unwrap();
    assert_eq!(s[0], 0xF0, "VALID, current, fixed");
    assert_eq!(s[2], 0x0E, "MISCOMPARE");
    assert_eq!(&s[3..7], &1_050_000u32.to_be_bytes(), "INFORMATION: offset of the first difference");
    assert_eq!((s[12], s[13]), (0x1D, 0x00));
    other[1_050_000] ^= 0x01;
    other[3] ^= 0x80;
    let r = h.cmd_out(&verify10(1, 7, 1), &other[..512]);
    assert_eq!(r.sense_bytes().unwrap()[3..7], 3u32.to_be_bytes());
}

#[test]
fn verify_with_bytchk_11_compares_one_block_with_each_block() {
    let mut h = H::new(malloc_bdev(512, 64));
    let block = pattern(5, 512);
    for lba in 10..20 {
        h.write(lba, &block);
    }
    assert_eq!(h.cmd_out(&verify10(3, 10, 10), &block), TaskResult::good(0));
    h.write(15, &pattern(6, 512));
    let r = h.cmd_out(&verify16(3, 10, 10), &block);
    assert_eq!(r.status, ScsiStatus::CheckCondition);
    let s = r.sense_bytes().unwrap();
    assert_eq!((s[2], s[12], s[13]), (0x0E, 0x1D, 0x00));
    let first = block.iter().zip(&pattern(6, 512)).position(|(a, b)| a != b).unwrap();
    assert_eq!(u32::from_be_bytes(s[3..7].try_into().unwrap()) as usize, 5 * 512 + first);
    // BYTCHK 11b needs one block of data-out, not the whole range.
    assert_check(&h.cmd_out(&verify10(3, 10, 10), &block[..100]), 0x05, 0x24, 0x00, None);
}

#[test]
fn verify_with_reserved_bytchk_returns_invalid_field_in_cdb() {
    let mut h = H::new(malloc_bdev(512, 64));
    assert_check(&h.cmd(&verify10(2, 0, 1)), 0x05, 0x24, 0x00, Some([0xCA, 0x00, 0x01]));
    assert_invalid_cdb(&h.cmd(&cdb16(0x8F, 0x20, 0, 1)), 1, Some(7));
}

#[test]
fn verify_with_data_out_shorter_than_the_range_returns_invalid_field_in_cdb() {
    let mut h = H::new(malloc_bdev(512, 64));
    assert_invalid_cdb(&h.cmd_out(&verify10(1, 0, 4), &[0; 3 * 512]), 7, None);
    assert_invalid_cdb(&h.cmd_out(&verify16(1, 0, 4), &[0; 3 * 512]), 10, None);
    assert!(logged().is_empty());
}

#[test]
fn synchronize_cache_flushes_the_bdev() {
    let mut h = H::new(malloc_bdev(512, 64));
    assert_eq!(h.cmd(&cdb10(0x35, 0, 0, 0)), TaskResult::good(0));
    assert_eq!(h.cmd(&cdb16(0x91, 0, 10, 54)), TaskResult::good(0));
    // IMMED and SYNC_NV are accepted (the command still completes after the flush).
    assert_eq!(h.cmd(&cdb10(0x35, 0x06, 0, 1)), TaskResult::good(0));
    assert_eq!(logged_kinds(), [IoType::Flush; 3]);
    assert_eq!(h.lun.bdev().stats().num_flush_ops, 3);
}

#[test]
fn synchronize_cache_past_capacity_returns_lba_out_of_range() {
    let mut h = H::new(malloc_bdev(512, 64));
    assert_lba_out_of_range(&h.cmd(&cdb10(0x35, 0, 60, 5)));
    assert_lba_out_of_range(&h.cmd(&cdb16(0x91, 0, u64::MAX, 1)));
    assert_lba_out_of_range(&h.cmd(&cdb16(0x91, 0, 65, 0)));
    assert_eq!(h.cmd(&cdb16(0x91, 0, 64, 0)), TaskResult::good(0));
    // RELADR (obsolete) is refused.
    assert_check(&h.cmd(&cdb10(0x35, 0x01, 0, 0)), 0x05, 0x24, 0x00, Some([0xC8, 0x00, 0x01]));
}
