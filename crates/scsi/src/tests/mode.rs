//! MODE SENSE(6/10) and MODE SELECT(6/10).

use super::*;

fn ms6(dbd: bool, pc: u8, page: u8, subpage: u8, alloc: u8) -> Vec<u8> {
    vec![0x1A, u8::from(dbd) << 3, pc << 6 | page, subpage, alloc, 0]
}

fn ms10(llbaa: bool, dbd: bool, pc: u8, page: u8, alloc: u16) -> Vec<u8> {
    let a = alloc.to_be_bytes();
    vec![0x5A, u8::from(llbaa) << 4 | u8::from(dbd) << 3, pc << 6 | page, 0, 0, 0, 0, a[0], a[1], 0]
}

fn msel6(len: u8) -> Vec<u8> {
    vec![0x15, 0x10, 0, 0, len, 0]
}

fn msel10(len: u16) -> Vec<u8> {
    let a = len.to_be_bytes();
    vec![0x55, 0x10, 0, 0, 0, 0, 0, a[0], a[1], 0]
}

fn caching(wce: bool) -> Vec<u8> {
    let mut p = vec![0u8; 20];
    p[0] = 0x08;
    p[1] = 0x12;
    p[2] = u8::from(wce) << 2;
    p
}

const CONTROL: [u8; 12] = [0x0A, 0x0A, 0x02, 0x10, 0, 0, 0, 0, 0, 0, 0, 0];

/// A MODE SELECT(6) parameter list: header without block descriptors, then `pages`.
fn list6(pages: &[u8]) -> Vec<u8> {
    let mut l = vec![0, 0, 0, 0];
    l.extend_from_slice(pages);
    l
}

fn list10(pages: &[u8]) -> Vec<u8> {
    let mut l = vec![0u8; 8];
    l.extend_from_slice(pages);
    l
}

fn cached_file_lun() -> (TempFile, H) {
    let (f, b) = file_bdev(64, uring::Flavor::Uring, true);
    (f, H::new(b))
}

#[test]
fn mode_sense_6_caching_page_reports_wce_as_the_bdev_has_it() {
    let mut h = H::new(malloc_bdev(512, 64));
    let (r, d) = h.cmd_in(&ms6(true, 0, 0x08, 0, 255), 255);
    assert_eq!(r, TaskResult::good(24));
    let mut want = vec![23, 0, 0x10, 0];
    want.extend(caching(false));
    assert_eq!(d, want, "no cache, WCE=0; DPOFUA");

    let (_f, mut h) = cached_file_lun();
    let (_, d) = h.cmd_in(&ms6(true, 0, 0x08, 0, 255), 255);
    assert_eq!(&d[4..], &caching(true)[..]);
}

#[test]
fn mode_sense_6_all_pages_with_block_descriptor() {
    let mut h = H::new(malloc_bdev(512, 64));
    let (r, d) = h.cmd_in(&ms6(false, 0, 0x3F, 0, 255), 255);
    assert_eq!(r, TaskResult::good(44));
    assert_eq!(&d[..4], &[43, 0, 0x10, 8]);
    assert_eq!(&d[4..12], &[0, 0, 0, 64, 0, 0, 0x02, 0x00], "short block descriptor");
    assert_eq!(&d[12..32], &caching(false)[..]);
    assert_eq!(&d[32..44], &CONTROL);
    // All pages and subpages: the same.
    let (_, d2) = h.cmd_in(&ms6(false, 0, 0x3F, 0xFF, 255), 255);
    assert_eq!(d2, d);
}

#[test]
fn mode_sense_6_short_block_descriptor_saturates_the_block_count() {
    let mut h = H::new(null_bdev(4096, 1 << 33));
    let (_, d) = h.cmd_in(&ms6(false, 0, 0x08, 0, 255), 255);
    assert_eq!(&d[4..12], &[0xFF, 0xFF, 0xFF, 0xFF, 0, 0, 0x10, 0x00]);
}

#[test]
fn mode_sense_10_llbaa_returns_a_long_block_descriptor() {
    let mut h = H::new(malloc_bdev(4096, 64));
    let (r, d) = h.cmd_in(&ms10(true, false, 0, 0x08, 512), 512);
    assert_eq!(r, TaskResult::good(44));
    assert_eq!(&d[..8], &[0, 42, 0, 0x10, 0x01, 0, 0, 16], "LONGLBA, 16-byte descriptor");
    assert_eq!(&d[8..24], &[0, 0, 0, 0, 0, 0, 0, 64, 0, 0, 0, 0, 0, 0, 0x10, 0]);
    assert_eq!(&d[24..], &caching(false)[..]);
    let (r, d) = h.cmd_in(&ms10(false, false, 0, 0x08, 512), 512);
    assert_eq!(r, TaskResult::good(36));
    assert_eq!(&d[..8], &[0, 34, 0, 0x10, 0, 0, 0, 8]);
}

#[test]
fn mode_sense_10_control_page() {
    let mut h = H::new(malloc_bdev(512, 64));
    let (r, d) = h.cmd_in(&ms10(false, true, 0, 0x0A, 512), 512);
    assert_eq!(r, TaskResult::good(20));
    assert_eq!(&d[..8], &[0, 18, 0, 0x10, 0, 0, 0, 0]);
    assert_eq!(&d[8..], &CONTROL);
}

#[test]
fn mode_sense_reports_write_protect_for_a_read_only_bdev() {
    let b = malloc::create(BdevParams { read_only: true, ..params(512, 64) }, false).unwrap();
    let mut h = H::new(b);
    let (_, d) = h.cmd_in(&ms6(true, 0, 0x3F, 0, 255), 255);
    assert_eq!(d[2], 0x90, "WP and DPOFUA");
    let (_, d) = h.cmd_in(&ms10(false, true, 0, 0x3F, 255), 255);
    assert_eq!(d[3], 0x90);
}

#[test]
fn mode_sense_changeable_and_default_values() {
    let (_f, mut h) = cached_file_lun();
    let (_, d) = h.cmd_in(&ms6(false, 1, 0x3F, 0, 255), 255);
    assert_eq!(&d[4..12], &[0; 8], "nothing in the block descriptor is changeable");
    assert_eq!(&d[12..32], &caching(true)[..], "WCE is changeable");
    assert_eq!(&d[32..44], &[0x0A, 0x0A, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    let (_, d) = h.cmd_in(&ms6(true, 2, 0x08, 0, 255), 255);
    assert_eq!(&d[4..], &caching(true)[..], "default: cache on");

    let mut h = H::new(malloc_bdev(512, 64));
    let (_, d) = h.cmd_in(&ms6(true, 1, 0x08, 0, 255), 255);
    assert_eq!(&d[4..], &caching(false)[..], "no cache: nothing changeable");
}

#[test]
fn mode_sense_saved_values_return_saving_parameters_not_supported() {
    let mut h = H::new(malloc_bdev(512, 64));
    let (r, _) = h.cmd_in(&ms6(true, 3, 0x08, 0, 255), 255);
    assert_check(&r, 0x05, 0x39, 0x00, Some([0xCF, 0x00, 0x02]));
    let (r, _) = h.cmd_in(&ms10(false, true, 3, 0x3F, 255), 255);
    assert_check(&r, 0x05, 0x39, 0x00, Some([0xCF, 0x00, 0x02]));
}

#[test]
fn mode_sense_unsupported_page_returns_invalid_field_in_cdb() {
    let mut h = H::new(malloc_bdev(512, 64));
    for page in [0x00, 0x01, 0x1C, 0x19, 0x3E] {
        let (r, _) = h.cmd_in(&ms6(true, 0, page, 0, 255), 255);
        assert_check(&r, 0x05, 0x24, 0x00, Some([0xCD, 0x00, 0x02]));
    }
}

#[test]
fn mode_sense_unsupported_subpage_returns_invalid_field_in_cdb() {
    let mut h = H::new(malloc_bdev(512, 64));
    let (r, _) = h.cmd_in(&ms6(true, 0, 0x0A, 0x01, 255), 255);
    assert_check(&r, 0x05, 0x24, 0x00, Some([0xC0, 0x00, 0x03]));
    let (r, d) = h.cmd_in(&ms6(true, 0, 0x0A, 0xFF, 255), 255);
    assert_eq!(r, TaskResult::good(16));
    assert_eq!(&d[4..], &CONTROL);
}

#[test]
fn mode_sense_reserved_bits_return_invalid_field_in_cdb() {
    let mut h = H::new(malloc_bdev(512, 64));
    // LLBAA does not exist in MODE SENSE(6).
    let mut c = ms6(true, 0, 0x08, 0, 255);
    c[1] |= 0x10;
    assert_check(&h.cmd_in(&c, 255).0, 0x05, 0x24, 0x00, Some([0xCC, 0x00, 0x01]));
    let mut c = ms10(false, true, 0, 0x08, 255);
    c[5] = 1;
    assert_invalid_cdb(&h.cmd_in(&c, 255).0, 5, Some(0));
}

#[test]
fn mode_sense_allocation_length_limits_the_data_but_not_the_mode_data_length() {
    let mut h = H::new(malloc_bdev(512, 64));
    let (r, d) = h.cmd_in(&ms6(false, 0, 0x3F, 0, 4), 255);
    assert_eq!(r, TaskResult::good(4));
    assert_eq!(d, [43, 0, 0x10, 8]);
    assert_eq!(h.cmd_in(&ms6(false, 0, 0x3F, 0, 0), 255).0, TaskResult::good(0));
    assert_eq!(h.cmd_in(&ms10(false, false, 0, 0x3F, 0xFFFF), 255).0, TaskResult::good(48));
    assert_eq!(h.cmd_in(&ms10(false, false, 0, 0x3F, 0xFFFF), 30).0, TaskResult::good(30));
}

#[test]
fn mode_select_clearing_wce_flushes_and_makes_writes_fua() {
    let (_f, mut h) = cached_file_lun();
    assert!(h.lun.write_cache_enabled());
    let l = list10(&caching(false));
    assert_eq!(h.cmd_out(&msel10(l.len() as u16), &l), TaskResult::good(0));
    assert_eq!(logged_kinds(), [IoType::Flush], "the cache is flushed as it is turned off");
    assert!(!h.lun.write_cache_enabled());
    let (_, d) = h.cmd_in(&ms6(true, 0, 0x08, 0, 255), 255);
    assert_eq!(&d[4..], &caching(false)[..]);
    clear_log();
    assert_eq!(h.cmd_out(&cdb10(0x2A, 0, 0, 1), &[7u8; 512]), TaskResult::good(0));
    assert_eq!(h.cmd_out(&cdb6(0x0A, 1, 1), &[7u8; 512]), TaskResult::good(0));
    assert!(logged().iter().all(|l| l.fua), "every write is FUA: {:?}", logged());
    // WRITE SAME of zeroes: write-zeroes, then a flush.
    clear_log();
    assert_eq!(h.cmd_out(&cdb10(0x41, 0, 4, 4), &[0u8; 512]), TaskResult::good(0));
    assert_eq!(logged_kinds(), [IoType::WriteZeroes, IoType::Flush]);

    // And back on: no flush, writes are not FUA.
    clear_log();
    let l = list6(&caching(true));
    assert_eq!(h.cmd_out(&msel6(l.len() as u8), &l), TaskResult::good(0));
    assert!(h.lun.write_cache_enabled());
    assert_eq!(h.cmd_out(&cdb10(0x2A, 0, 0, 1), &[7u8; 512]), TaskResult::good(0));
    assert_eq!(
        logged().iter().map(|l| (l.kind, l.offset, l.blocks, l.fua)).collect::<Vec<_>>(),
        [(IoType::Write, 0, 1, false)]
    );
}

#[test]
fn mode_select_wce_is_shared_by_every_channel() {
    let (_f, mut h) = cached_file_lun();
    let mut other = h.channel();
    let l = list6(&caching(false));
    assert_eq!(h.cmd_out(&msel6(l.len() as u8), &l), TaskResult::good(0));
    clear_log();
    let mut buf = vec![1u8; 512];
    let t = h.submit_on(&mut other, ScsiTask::new(&cdb10(0x2A, 0, 0, 1), iovs(&mut buf, &[512]), IoVecs::new()));
    assert_eq!(h.wait(t), TaskResult::good(0));
    assert!(logged()[0].fua);
}

#[test]
fn mode_select_enabling_wce_without_a_cache_returns_invalid_field_in_parameter_list() {
    let mut h = H::new(malloc_bdev(512, 64));
    let l = list6(&caching(true));
    let r = h.cmd_out(&msel6(l.len() as u8), &l);
    assert_check(&r, 0x05, 0x26, 0x00, Some([0x8A, 0x00, 0x06]));
    assert!(!h.lun.write_cache_enabled());
    // WCE=0 is what it already is: accepted, nothing to flush.
    let l = list6(&caching(false));
    assert_eq!(h.cmd_out(&msel6(l.len() as u8), &l), TaskResult::good(0));
    assert!(logged().is_empty());
}

#[test]
fn mode_select_changing_an_unchangeable_field_returns_invalid_field_in_parameter_list() {
    let (_f, mut h) = cached_file_lun();
    // RCD (byte 2 bit 0).
    let mut p = caching(true);
    p[2] |= 0x01;
    let l = list6(&p);
    assert_invalid_param(&h.cmd_out(&msel6(l.len() as u8), &l), 6, Some(0));
    // FSW (byte 12 bit 7).
    let mut p = caching(false);
    p[12] = 0x80;
    let l = list6(&p);
    assert_check(&h.cmd_out(&msel6(l.len() as u8), &l), 0x05, 0x26, 0x00, Some([0x8F, 0x00, 16]));
    assert!(h.lun.write_cache_enabled(), "nothing was applied");
    // Control page: D_SENSE.
    let mut c = CONTROL;
    c[2] |= 0x04;
    let l = list10(&[&caching(false)[..], &c[..]].concat());
    assert_invalid_param(&h.cmd_out(&msel10(l.len() as u16), &l), 8 + 20 + 2, Some(2));
    assert!(h.lun.write_cache_enabled(), "a later bad page leaves the earlier one unapplied");
    // A wrong page length.
    let mut p = caching(false);
    p[1] = 0x10;
    let l = list6(&p[..18]);
    assert_invalid_param(&h.cmd_out(&msel6(l.len() as u8), &l), 5, None);
}

#[test]
fn mode_select_control_page_with_current_values_is_accepted() {
    let mut h = H::new(malloc_bdev(512, 64));
    let l = list6(&CONTROL);
    assert_eq!(h.cmd_out(&msel6(l.len() as u8), &l), TaskResult::good(0));
    // The PS bit is ignored.
    let mut c = CONTROL;
    c[0] |= 0x80;
    let l = list10(&c);
    assert_eq!(h.cmd_out(&msel10(l.len() as u16), &l), TaskResult::good(0));
}

#[test]
fn mode_select_save_pages_or_vendor_format_returns_invalid_field_in_cdb() {
    let mut h = H::new(malloc_bdev(512, 64));
    let l = list6(&caching(false));
    let mut c = msel6(l.len() as u8);
    c[1] |= 0x01;
    assert_check(&h.cmd_out(&c, &l), 0x05, 0x24, 0x00, Some([0xC8, 0x00, 0x01]));
    let mut c = msel10(l.len() as u16);
    c[1] = 0;
    assert_check(&h.cmd_out(&c, &l), 0x05, 0x24, 0x00, Some([0xCC, 0x00, 0x01]));
}

#[test]
fn mode_select_truncated_list_returns_parameter_list_length_error() {
    let mut h = H::new(malloc_bdev(512, 64));
    // A page cut short.
    let l = list6(&caching(false)[..6]);
    assert_check(&h.cmd_out(&msel6(l.len() as u8), &l), 0x05, 0x1A, 0x00, None);
    // A header cut short.
    assert_check(&h.cmd_out(&msel6(3), &[0, 0, 0]), 0x05, 0x1A, 0x00, None);
    assert_check(&h.cmd_out(&msel10(6), &[0; 6]), 0x05, 0x1A, 0x00, None);
    // A page header cut short.
    let l = list6(&[0x08]);
    assert_check(&h.cmd_out(&msel6(l.len() as u8), &l), 0x05, 0x1A, 0x00, None);
    // A block descriptor length beyond the list.
    assert_check(&h.cmd_out(&msel6(8), &[0, 0, 0, 8, 0, 0, 0, 0]), 0x05, 0x1A, 0x00, None);
}

#[test]
fn mode_select_parameter_list_length_0_is_good() {
    let mut h = H::new(malloc_bdev(512, 64));
    assert_eq!(h.cmd(&msel6(0)), TaskResult::good(0));
    assert_eq!(h.cmd(&msel10(0)), TaskResult::good(0));
    // Just a header.
    assert_eq!(h.cmd_out(&msel6(4), &[0; 4]), TaskResult::good(0));
}

#[test]
fn mode_select_data_out_shorter_than_the_parameter_list_returns_invalid_field_in_cdb() {
    let mut h = H::new(malloc_bdev(512, 64));
    let l = list6(&caching(false));
    assert_check(&h.cmd_out(&msel6(l.len() as u8 + 1), &l), 0x05, 0x24, 0x00, Some([0xC0, 0x00, 0x04]));
    let l = list10(&caching(false));
    assert_invalid_cdb(&h.cmd_out(&msel10(l.len() as u16 + 100), &l), 7, None);
}

#[test]
fn mode_select_block_descriptor_must_match_the_geometry() {
    let mut h = H::new(malloc_bdev(512, 64));
    let with_desc = |desc: &[u8]| {
        let mut l = vec![0, 0, 0, desc.len() as u8];
        l.extend_from_slice(desc);
        l.extend(caching(false));
        l
    };
    let l = with_desc(&[0, 0, 0, 64, 0, 0, 0x02, 0x00]);
    assert_eq!(h.cmd_out(&msel6(l.len() as u8), &l), TaskResult::good(0));
    let l = with_desc(&[0, 0, 0, 0, 0, 0, 0, 0]);
    assert_eq!(h.cmd_out(&msel6(l.len() as u8), &l), TaskResult::good(0), "zeroes mean no change");
    let l = with_desc(&[0, 0, 0, 64, 0, 0, 0x10, 0x00]);
    assert_check(&h.cmd_out(&msel6(l.len() as u8), &l), 0x05, 0x26, 0x00, Some([0x80, 0x00, 0x09]));
    let l = with_desc(&[0, 0, 0, 65, 0, 0, 0x02, 0x00]);
    assert_invalid_param(&h.cmd_out(&msel6(l.len() as u8), &l), 4, None);
    let l = with_desc(&[0, 0, 0, 64, 0, 0, 0x02]);
    assert_invalid_param(&h.cmd_out(&msel6(l.len() as u8), &l), 3, None);
    // MODE SELECT(10) with a long descriptor.
    let mut l = vec![0, 0, 0, 0, 0x01, 0, 0, 16];
    l.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 64, 0, 0, 0, 0, 0, 0, 0x02, 0x00]);
    l.extend(caching(false));
    assert_eq!(h.cmd_out(&msel10(l.len() as u16), &l), TaskResult::good(0));
    l[8 + 14] = 0x10;
    assert_invalid_param(&h.cmd_out(&msel10(l.len() as u16), &l), 8 + 12, None);
    l[8 + 14] = 0x02;
    l[8 + 6] = 0x01;
    assert_invalid_param(&h.cmd_out(&msel10(l.len() as u16), &l), 8, None);
}

#[test]
fn mode_select_unsupported_page_returns_invalid_field_in_parameter_list() {
    let mut h = H::new(malloc_bdev(512, 64));
    let mut p = vec![0u8; 12];
    p[0] = 0x1C;
    p[1] = 0x0A;
    let l = list6(&p);
    assert_check(&h.cmd_out(&msel6(l.len() as u8), &l), 0x05, 0x26, 0x00, Some([0x8D, 0x00, 0x04]));
    // A subpage format page.
    let l = list6(&[0x48, 0x01, 0x00, 0x04, 0, 0, 0, 0]);
    assert_invalid_param(&h.cmd_out(&msel6(l.len() as u8), &l), 4, Some(6));
    // A non-zero medium type.
    let mut l = list6(&caching(false));
    l[1] = 0x05;
    assert_invalid_param(&h.cmd_out(&msel6(l.len() as u8), &l), 1, None);
}
