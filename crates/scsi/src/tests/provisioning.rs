//! UNMAP and WRITE SAME.

use super::*;

fn unmap_cdb(len: u16) -> Vec<u8> {
    let l = len.to_be_bytes();
    vec![0x42, 0, 0, 0, 0, 0, 0, l[0], l[1], 0]
}

fn unmap_list(descs: &[(u64, u32)]) -> Vec<u8> {
    let n = descs.len() * 16;
    let mut l = Vec::new();
    l.extend_from_slice(&((n + 6) as u16).to_be_bytes());
    l.extend_from_slice(&(n as u16).to_be_bytes());
    l.extend_from_slice(&[0; 4]);
    for &(lba, blocks) in descs {
        l.extend_from_slice(&lba.to_be_bytes());
        l.extend_from_slice(&blocks.to_be_bytes());
        l.extend_from_slice(&[0; 4]);
    }
    l
}

fn unmap(h: &mut H, descs: &[(u64, u32)]) -> TaskResult {
    let l = unmap_list(descs);
    h.cmd_out(&unmap_cdb(l.len() as u16), &l)
}

fn ws10(b1: u8, lba: u32, n: u16) -> Vec<u8> {
    cdb10(0x41, b1, lba, n)
}

fn ws16(b1: u8, lba: u64, n: u32) -> Vec<u8> {
    cdb16(0x93, b1, lba, n)
}

const UNMAP_BIT: u8 = 0x08;
const NDOB: u8 = 0x01;

fn is_zero(d: &[u8]) -> bool {
    d.iter().all(|&b| b == 0)
}

#[test]
fn unmap_then_read_returns_zeroes() {
    let mut h = H::new(malloc_bdev(512, 128));
    let data = pattern(1, 128 * 512);
    h.write(0, &data);
    clear_log();
    assert_eq!(unmap(&mut h, &[(4, 4), (20, 8)]), TaskResult::good(0));
    assert_eq!(logged(), [Logged { kind: IoType::Unmap, offset: 4, blocks: 12, fua: false, segments: 2 }]);
    let all = h.read(0, 128);
    for b in 0..128usize {
        let blk = &all[b * 512..(b + 1) * 512];
        if (4..8).contains(&b) || (20..28).contains(&b) {
            assert!(is_zero(blk), "block {b} unmapped");
        } else {
            assert_eq!(blk, &data[b * 512..(b + 1) * 512], "block {b} kept");
        }
    }
}

#[test]
fn unmap_on_a_file_punches_holes_that_read_as_zeroes() {
    let (_f, b) = file_bdev(256, uring::Flavor::Uring, true);
    let mut h = H::new(b);
    let data = pattern(2, 256 * 512);
    h.write(0, &data);
    assert_eq!(unmap(&mut h, &[(8, 16), (64, 3)]), TaskResult::good(0));
    let all = h.read(0, 256);
    assert!(is_zero(&all[8 * 512..24 * 512]));
    assert!(is_zero(&all[64 * 512..67 * 512]));
    assert_eq!(&all[..8 * 512], &data[..8 * 512]);
    assert_eq!(&all[67 * 512..], &data[67 * 512..]);
}

#[test]
fn unmap_parameter_list_length_0_is_good() {
    let mut h = H::new(malloc_bdev(512, 64));
    assert_eq!(h.cmd(&unmap_cdb(0)), TaskResult::good(0));
    // Group number accepted.
    let mut c = unmap_cdb(0);
    c[6] = 0x1F;
    assert_eq!(h.cmd(&c), TaskResult::good(0));
    assert!(logged().is_empty());
}

#[test]
fn unmap_parameter_list_shorter_than_its_header_returns_parameter_list_length_error() {
    let mut h = H::new(malloc_bdev(512, 64));
    for len in [1usize, 6, 7] {
        let r = h.cmd_out(&unmap_cdb(len as u16), &unmap_list(&[(0, 1)])[..len]);
        assert_check(&r, 0x05, 0x1A, 0x00, None);
    }
}

#[test]
fn unmap_descriptor_data_beyond_the_list_returns_parameter_list_length_error() {
    let mut h = H::new(malloc_bdev(512, 64));
    let mut l = unmap_list(&[(0, 1)]);
    l[0..2].copy_from_slice(&38u16.to_be_bytes());
    l[2..4].copy_from_slice(&32u16.to_be_bytes());
    let r = h.cmd_out(&unmap_cdb(l.len() as u16), &l);
    assert_check(&r, 0x05, 0x1A, 0x00, None);
    assert!(logged().is_empty());
}

#[test]
fn unmap_data_length_too_small_for_the_descriptors_returns_invalid_field_in_parameter_list() {
    let mut h = H::new(malloc_bdev(512, 64));
    let mut l = unmap_list(&[(0, 1)]);
    l[0..2].copy_from_slice(&4u16.to_be_bytes());
    let r = h.cmd_out(&unmap_cdb(l.len() as u16), &l);
    assert_check(&r, 0x05, 0x26, 0x00, Some([0x80, 0x00, 0x00]));
}

#[test]
fn unmap_too_many_descriptors_returns_invalid_field_in_parameter_list() {
    let mut h = H::with_opts(malloc_bdev(512, 64), LunOptions { max_unmap_descriptors: 2, ..Default::default() });
    assert_eq!(unmap(&mut h, &[(0, 1), (2, 1)]), TaskResult::good(0));
    let r = unmap(&mut h, &[(0, 1), (2, 1), (4, 1)]);
    assert_check(&r, 0x05, 0x26, 0x00, Some([0x80, 0x00, 0x02]));
}

#[test]
fn unmap_past_capacity_returns_lba_out_of_range() {
    let mut h = H::new(malloc_bdev(512, 64));
    assert_lba_out_of_range(&unmap(&mut h, &[(0, 1), (60, 5)]));
    assert_lba_out_of_range(&unmap(&mut h, &[(u64::MAX, 1)]));
    assert_lba_out_of_range(&unmap(&mut h, &[(64, 1)]));
    assert!(logged().is_empty(), "nothing unmapped when any descriptor is bad");
    assert_eq!(unmap(&mut h, &[(63, 1)]), TaskResult::good(0));
}

#[test]
fn unmap_more_than_the_maximum_lba_count_returns_invalid_field_in_parameter_list() {
    let mut h = H::with_opts(malloc_bdev(512, 64), LunOptions { max_unmap_blocks: 16, ..Default::default() });
    assert_eq!(unmap(&mut h, &[(0, 8), (20, 8)]), TaskResult::good(0));
    let r = unmap(&mut h, &[(0, 10), (20, 10)]);
    assert_check(&r, 0x05, 0x26, 0x00, Some([0x80, 0x00, 32]));
}

#[test]
fn unmap_incomplete_trailing_descriptor_is_ignored() {
    let mut h = H::new(malloc_bdev(512, 64));
    let mut l = unmap_list(&[(4, 4), (10, 1)]);
    l.truncate(8 + 24);
    l[0..2].copy_from_slice(&30u16.to_be_bytes());
    l[2..4].copy_from_slice(&24u16.to_be_bytes());
    assert_eq!(h.cmd_out(&unmap_cdb(l.len() as u16), &l), TaskResult::good(0));
    assert_eq!(logged().iter().map(|l| (l.kind, l.offset, l.blocks)).collect::<Vec<_>>(), [(IoType::Unmap, 4, 4)]);
}

#[test]
fn unmap_descriptors_of_zero_blocks_are_skipped() {
    let mut h = H::new(malloc_bdev(512, 64));
    assert_eq!(unmap(&mut h, &[(0, 0), (1000, 0)]), TaskResult::good(0));
    assert!(logged().is_empty());
    // A parameter list with a header only.
    assert_eq!(unmap(&mut h, &[]), TaskResult::good(0));
}

#[test]
fn unmap_with_anchor_or_reserved_bits_returns_invalid_field_in_cdb() {
    let mut h = H::new(malloc_bdev(512, 64));
    let l = unmap_list(&[(0, 1)]);
    let mut c = unmap_cdb(l.len() as u16);
    c[1] = 0x01;
    assert_check(&h.cmd_out(&c, &l), 0x05, 0x24, 0x00, Some([0xC8, 0x00, 0x01]));
    let mut c = unmap_cdb(l.len() as u16);
    c[2] = 0x01;
    assert_invalid_cdb(&h.cmd_out(&c, &l), 2, Some(0));
}

#[test]
fn unmap_with_data_out_shorter_than_the_parameter_list_returns_invalid_field_in_cdb() {
    let mut h = H::new(malloc_bdev(512, 64));
    let l = unmap_list(&[(0, 1)]);
    let r = h.cmd_out(&unmap_cdb(l.len() as u16 + 1), &l);
    assert_check(&r, 0x05, 0x24, 0x00, Some([0xC0, 0x00, 0x07]));
}

#[test]
fn unmap_on_a_bdev_without_unmap_returns_invalid_command_operation_code() {
    let (_f, b) = file_bdev(64, uring::Flavor::Aio, false);
    let mut h = H::new(b);
    let r = unmap(&mut h, &[(0, 1)]);
    assert_check(&r, 0x05, 0x20, 0x00, Some([0xC0, 0x00, 0x00]));
}

#[test]
fn unmap_on_a_read_only_bdev_returns_data_protect() {
    let b = malloc::create(BdevParams { read_only: true, ..params(512, 64) }, false).unwrap();
    let mut h = H::new(b);
    assert_check(&unmap(&mut h, &[(0, 1)]), 0x07, 0x27, 0x00, None);
}

#[test]
fn write_same_16_with_unmap_zeroes_the_range() {
    let mut h = H::new(malloc_bdev(512, 64));
    let data = pattern(3, 64 * 512);
    h.write(0, &data);
    clear_log();
    assert_eq!(h.cmd_out(&ws16(UNMAP_BIT, 10, 20), &[0u8; 512]), TaskResult::good(0));
    assert_eq!(logged().iter().map(|l| (l.kind, l.offset, l.blocks)).collect::<Vec<_>>(), [(IoType::Unmap, 10, 20)]);
    let all = h.read(0, 64);
    assert!(is_zero(&all[10 * 512..30 * 512]));
    assert_eq!(&all[..10 * 512], &data[..10 * 512]);
    assert_eq!(&all[30 * 512..], &data[30 * 512..]);
    // WRITE SAME(10) with UNMAP as well.
    clear_log();
    assert_eq!(h.cmd_out(&ws10(UNMAP_BIT, 40, 2), &[0u8; 512]), TaskResult::good(0));
    assert_eq!(logged_kinds(), [IoType::Unmap]);
    assert!(is_zero(&h.read(40, 2)));
}

#[test]
fn write_same_of_a_zero_block_without_unmap_uses_write_zeroes() {
    let mut h = H::new(malloc_bdev(512, 64));
    h.write(0, &pattern(4, 64 * 512));
    clear_log();
    assert_eq!(h.cmd_out(&ws10(0, 5, 7), &[0u8; 512]), TaskResult::good(0));
    assert_eq!(
        logged().iter().map(|l| (l.kind, l.offset, l.blocks)).collect::<Vec<_>>(),
        [(IoType::WriteZeroes, 5, 7)]
    );
    assert!(is_zero(&h.read(5, 7)));
    assert!(!is_zero(&h.read(4, 1)) && !is_zero(&h.read(12, 1)));
}

#[test]
fn write_same_16_writes_a_pattern_to_every_block() {
    let mut h = H::new(malloc_bdev(512, 1024));
    let block = pattern(5, 512);
    // The data-out block arrives in 4 segments (1, 7, 500, 4): 256 blocks per bdev write.
    assert_eq!(h.cmd_out(&ws16(0, 100, 600), &block), TaskResult::good(0));
    let writes: Vec<(IoType, u64, u64, usize)> =
        logged().iter().map(|l| (l.kind, l.offset, l.blocks, l.segments)).collect();
    assert_eq!(
        writes,
        [(IoType::Write, 100, 256, 1024), (IoType::Write, 356, 256, 1024), (IoType::Write, 612, 88, 352)]
    );
    let all = h.read(99, 602);
    assert!(is_zero(&all[..512]) && is_zero(&all[601 * 512..]));
    for b in 1..601 {
        assert_eq!(&all[b * 512..(b + 1) * 512], &block[..], "block {}", 99 + b);
    }
}

#[test]
fn write_same_pattern_in_many_segments_keeps_writes_within_1024_segments() {
    let mut h = H::new(malloc_bdev(512, 64));
    let mut block = pattern(6, 512);
    let t = h.submit(ScsiTask::new(&ws10(0, 0, 5), iovs(&mut block, &[1]), IoVecs::new()));
    assert_eq!(h.wait(t), TaskResult::good(0));
    let writes: Vec<(u64, usize)> = logged().iter().map(|l| (l.blocks, l.segments)).collect();
    assert_eq!(writes, [(2, 1024), (2, 1024), (1, 512)]);
    let all = h.read(0, 5);
    assert!(all.chunks(512).all(|b| b == &block[..]));
}

#[test]
fn write_same_with_unmap_and_a_nonzero_pattern_writes_the_pattern() {
    let mut h = H::new(malloc_bdev(512, 64));
    let block = pattern(7, 512);
    assert_eq!(h.cmd_out(&ws10(UNMAP_BIT, 8, 3), &block), TaskResult::good(0));
    assert_eq!(logged_kinds(), [IoType::Write]);
    assert!(h.read(8, 3).chunks(512).all(|b| b == &block[..]));
}

#[test]
fn write_same_16_ndob_writes_zeroes_without_data_out() {
    let mut h = H::new(malloc_bdev(512, 64));
    h.write(0, &pattern(8, 64 * 512));
    clear_log();
    assert_eq!(h.cmd(&ws16(NDOB, 2, 3)), TaskResult::good(0));
    assert_eq!(h.cmd(&ws16(NDOB | UNMAP_BIT, 10, 3)), TaskResult::good(0));
    assert_eq!(logged_kinds(), [IoType::WriteZeroes, IoType::Unmap]);
    assert!(is_zero(&h.read(2, 3)) && is_zero(&h.read(10, 3)));
}

#[test]
fn write_same_on_a_bdev_without_unmap_or_write_zeroes_writes_zero_blocks() {
    let (_f, b) = file_bdev(64, uring::Flavor::Aio, false);
    let mut h = H::new(b);
    h.write(0, &pattern(9, 64 * 512));
    clear_log();
    assert_eq!(h.cmd(&ws16(NDOB | UNMAP_BIT, 3, 20)), TaskResult::good(0));
    assert_eq!(h.cmd_out(&ws10(UNMAP_BIT, 30, 4), &[0u8; 512]), TaskResult::good(0));
    assert_eq!(logged_kinds(), [IoType::Write, IoType::Write]);
    assert!(is_zero(&h.read(3, 20)) && is_zero(&h.read(30, 4)));
    assert!(!is_zero(&h.read(2, 1)) && !is_zero(&h.read(23, 1)));
}

#[test]
fn write_same_with_anchor_returns_invalid_field_in_cdb() {
    let mut h = H::new(malloc_bdev(512, 64));
    assert_check(&h.cmd_out(&ws10(0x10 | UNMAP_BIT, 0, 1), &[0; 512]), 0x05, 0x24, 0x00, Some([0xCC, 0x00, 0x01]));
    assert_invalid_cdb(&h.cmd_out(&ws16(0x10, 0, 1), &[0; 512]), 1, Some(4));
}

#[test]
fn write_same_with_protection_pbdata_or_lbdata_returns_invalid_field_in_cdb() {
    let mut h = H::new(malloc_bdev(512, 64));
    assert_check(&h.cmd_out(&ws10(0x20, 0, 1), &[0; 512]), 0x05, 0x24, 0x00, Some([0xCF, 0x00, 0x01]));
    assert_invalid_cdb(&h.cmd_out(&ws10(0x04, 0, 1), &[0; 512]), 1, Some(2));
    assert_invalid_cdb(&h.cmd_out(&ws16(0x02, 0, 1), &[0; 512]), 1, Some(1));
    // NDOB does not exist in WRITE SAME(10).
    assert_invalid_cdb(&h.cmd_out(&ws10(0x01, 0, 1), &[0; 512]), 1, Some(0));
}

#[test]
fn write_same_with_zero_blocks_returns_invalid_field_in_cdb() {
    let mut h = H::new(malloc_bdev(512, 64));
    // WSNZ=1: no "to the end of the medium".
    assert_check(&h.cmd_out(&ws10(0, 0, 0), &[0; 512]), 0x05, 0x24, 0x00, Some([0xC0, 0x00, 0x07]));
    assert_invalid_cdb(&h.cmd_out(&ws16(UNMAP_BIT, 0, 0), &[0; 512]), 10, None);
}

#[test]
fn write_same_past_capacity_returns_lba_out_of_range() {
    let mut h = H::new(malloc_bdev(512, 64));
    assert_lba_out_of_range(&h.cmd_out(&ws10(0, 60, 5), &[1; 512]));
    assert_lba_out_of_range(&h.cmd_out(&ws16(UNMAP_BIT, u64::MAX, 1), &[0; 512]));
    assert!(logged().is_empty());
}

#[test]
fn write_same_beyond_the_maximum_length_returns_invalid_field_in_cdb() {
    let mut h = H::with_opts(malloc_bdev(512, 64), LunOptions { max_write_same_blocks: 8, ..Default::default() });
    assert_eq!(h.cmd_out(&ws10(0, 0, 8), &[1; 512]), TaskResult::good(0));
    assert_check(&h.cmd_out(&ws10(0, 0, 9), &[1; 512]), 0x05, 0x24, 0x00, Some([0xC0, 0x00, 0x07]));
    assert_invalid_cdb(&h.cmd_out(&ws16(0, 0, 9), &[1; 512]), 10, None);
}

#[test]
fn write_same_without_a_data_out_block_returns_invalid_field_in_cdb() {
    let mut h = H::new(malloc_bdev(512, 64));
    assert_check(&h.cmd(&ws10(0, 0, 1)), 0x05, 0x24, 0x00, None);
    assert_check(&h.cmd_out(&ws16(UNMAP_BIT, 0, 1), &[0; 511]), 0x05, 0x24, 0x00, None);
}

#[test]
fn write_same_on_a_read_only_bdev_returns_data_protect() {
    let b = malloc::create(BdevParams { read_only: true, ..params(512, 64) }, false).unwrap();
    let mut h = H::new(b);
    assert_check(&h.cmd_out(&ws10(0, 0, 1), &[0; 512]), 0x07, 0x27, 0x00, None);
    assert_check(&h.cmd(&ws16(NDOB | UNMAP_BIT, 0, 1)), 0x07, 0x27, 0x00, None);
}
