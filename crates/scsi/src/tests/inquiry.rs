//! INQUIRY: standard data and the VPD pages.

use super::*;

fn be16(d: &[u8], i: usize) -> usize {
    u16::from_be_bytes([d[i], d[i + 1]]) as usize
}

fn be32(d: &[u8], i: usize) -> u32 {
    u32::from_be_bytes(d[i..i + 4].try_into().unwrap())
}

fn vpd(h: &mut H, page: u8) -> Vec<u8> {
    let (r, d) = h.cmd_in(&inquiry(true, page, 0xFFFF), 1024);
    assert_eq!(r.status, ScsiStatus::Good, "page {page:#04x}");
    assert_eq!(d[0], 0x00, "qualifier and device type");
    assert_eq!(d[1], page);
    assert_eq!(d.len(), 4 + be16(&d, 2), "page {page:#04x} length");
    d
}

#[test]
fn inquiry_standard_data_identifies_a_vstor_disk() {
    let mut h = H::new(malloc_bdev(512, 64));
    let (r, d) = h.cmd_in(&inquiry(false, 0, 96), 96);
    assert_eq!(r, TaskResult::good(96));
    assert_eq!(d[0], 0x00, "connected direct-access block device");
    assert_eq!(d[1], 0x00, "not removable");
    assert_eq!(d[2], 0x06, "SPC-4");
    assert_eq!(d[3], 0x12, "HISUP, response data format 2");
    assert_eq!(d[4], 91, "additional length");
    assert_eq!((d[5], d[6], d[7]), (0, 0, 0x02), "CMDQUE, no PROTECT/TPGS/3PC");
    assert_eq!(&d[8..16], b"VSTOR   ");
    assert_eq!(&d[16..32], b"Malloc disk     ");
    let v = env!("CARGO_PKG_VERSION");
    let want: String = format!("{:<4}", v.get(..4).unwrap_or(v).trim_end_matches('.'));
    assert_eq!(&d[32..36], want.as_bytes());
    assert_eq!(&d[32..36], &revision());
    assert_eq!(&d[58..64], &[0x00, 0xA0, 0x04, 0x60, 0x04, 0xC0], "SAM-5, SPC-4, SBC-3");
}

#[test]
fn inquiry_product_and_serial_options_are_sanitised_ascii() {
    let opts = LunOptions {
        product: Some("A very long product name indeed".into()),
        serial: Some("sn-1\u{e9}\n".into()),
        ..Default::default()
    };
    let mut h = H::with_opts(malloc_bdev(512, 64), opts);
    let (_, d) = h.cmd_in(&inquiry(false, 0, 96), 96);
    assert_eq!(&d[16..32], b"A very long prod");
    let p = vpd(&mut h, 0x80);
    // Each byte of the UTF-8 é and the newline becomes '?'.
    assert_eq!(&p[4..], b"sn-1???");
    assert_eq!(h.lun.serial(), "sn-1???");
}

#[test]
fn inquiry_allocation_length_0_returns_good_without_data() {
    let mut h = H::new(malloc_bdev(512, 64));
    let (r, d) = h.cmd_in(&inquiry(false, 0, 0), 96);
    assert_eq!(r, TaskResult::good(0));
    assert!(d.is_empty());
    let (r, _) = h.cmd_in(&inquiry(true, 0x83, 0), 96);
    assert_eq!(r, TaskResult::good(0));
}

#[test]
fn inquiry_allocation_length_limits_the_data() {
    let mut h = H::new(malloc_bdev(512, 64));
    let (r, d) = h.cmd_in(&inquiry(false, 0, 36), 255);
    assert_eq!(r, TaskResult::good(36));
    assert_eq!(d[4], 91, "the additional length still describes all the data");
    let (r, _) = h.cmd_in(&inquiry(false, 0, 5), 255);
    assert_eq!(r, TaskResult::good(5));
    let (r, _) = h.cmd_in(&inquiry(false, 0, 0xFFFF), 255);
    assert_eq!(r, TaskResult::good(96));
}

#[test]
fn inquiry_data_in_smaller_than_allocation_length_is_cut_to_the_buffer() {
    let mut h = H::new(malloc_bdev(512, 64));
    let (r, d) = h.cmd_in(&inquiry(false, 0, 96), 20);
    assert_eq!(r, TaskResult::good(20));
    assert_eq!(&d[8..16], b"VSTOR   ");
    let (r, _) = h.cmd_in(&inquiry(false, 0, 96), 0);
    assert_eq!(r, TaskResult::good(0));
}

#[test]
fn inquiry_page_code_without_evpd_returns_invalid_field_in_cdb() {
    let mut h = H::new(malloc_bdev(512, 64));
    let (r, _) = h.cmd_in(&inquiry(false, 0x83, 96), 96);
    assert_check(&r, 0x05, 0x24, 0x00, Some([0xC0, 0x00, 0x02]));
}

#[test]
fn inquiry_cmddt_returns_invalid_field_in_cdb() {
    let mut h = H::new(malloc_bdev(512, 64));
    let (r, _) = h.cmd_in(&[0x12, 0x02, 0, 0, 96, 0], 96);
    assert_check(&r, 0x05, 0x24, 0x00, Some([0xC9, 0x00, 0x01]));
}

#[test]
fn inquiry_unsupported_vpd_page_returns_invalid_field_in_cdb() {
    let mut h = H::new(malloc_bdev(512, 64));
    for page in [0x01, 0x86, 0x89, 0xB3, 0xFF] {
        let (r, _) = h.cmd_in(&inquiry(true, page, 96), 96);
        assert_invalid_cdb(&r, 2, None);
    }
}

#[test]
fn vpd_supported_pages_lists_every_page_with_consistent_lengths() {
    let mut h = H::new(malloc_bdev(512, 64));
    let d = vpd(&mut h, 0x00);
    assert_eq!(d, [0x00, 0x00, 0x00, 0x06, 0x00, 0x80, 0x83, 0xB0, 0xB1, 0xB2]);
    for &page in &d[4..] {
        vpd(&mut h, page);
    }
}

#[test]
fn vpd_unit_serial_number_is_the_uuid_in_hex() {
    let mut h = H::new(malloc_bdev(512, 64));
    let d = vpd(&mut h, 0x80);
    assert_eq!(&d[..4], &[0x00, 0x80, 0x00, 32]);
    assert_eq!(&d[4..], b"00112233445566778899aabbccddeeff");
}

#[test]
fn vpd_device_identification_has_naa_and_t10_designators_derived_from_the_uuid() {
    let mut h = H::new(malloc_bdev(512, 64));
    let d = vpd(&mut h, 0x83);
    // NAA 3h (locally assigned): 60 bits = high half XOR low half of the UUID
    // 0x0011223344556677 ^ 0x8899aabbccddeeff = 0x8888888888888888.
    assert_eq!(&d[4..8], &[0x01, 0x03, 0x00, 0x08], "binary, LU association, NAA");
    assert_eq!(&d[8..16], &[0x38, 0x88, 0x88, 0x88, 0x88, 0x88, 0x88, 0x88]);
    assert_eq!(naa_designator(UUID), [0x38, 0x88, 0x88, 0x88, 0x88, 0x88, 0x88, 0x88]);
    // T10 vendor ID: vendor + the UUID as hex.
    assert_eq!(&d[16..20], &[0x02, 0x01, 0x00, 40], "ASCII, LU association, T10 vendor ID");
    assert_eq!(&d[20..60], b"VSTOR   00112233445566778899aabbccddeeff");
    assert_eq!(d.len(), 60);
    // Walking the designators lands exactly on the end of the page.
    let mut off = 4;
    let mut n = 0;
    while off < d.len() {
        off += 4 + d[off + 3] as usize;
        n += 1;
    }
    assert_eq!((off, n), (d.len(), 2));
    // Another UUID, another identifier.
    let other = malloc::create(
        BdevParams { uuid: Some(Uuid::from_u128(0xFEDC_BA98_7654_3210_1111_2222_3333_4444)), ..params(512, 8) },
        false,
    )
    .unwrap();
    let mut h2 = H::new(other);
    let d2 = vpd(&mut h2, 0x83);
    // 0xFEDCBA9876543210 ^ 0x1111222233334444 = 0xEFCD98BA45677654; NAA 3h replaces the top nibble.
    assert_eq!(&d2[8..16], &[0x3F, 0xCD, 0x98, 0xBA, 0x45, 0x67, 0x76, 0x54]);
    assert_eq!(&d2[28..60], b"fedcba98765432101111222233334444");
}

#[test]
fn vpd_block_limits_reports_transfer_unmap_and_write_same_limits() {
    let mut h = H::new(malloc_bdev(512, 64));
    let d = vpd(&mut h, 0xB0);
    assert_eq!(be16(&d, 2), 0x3C);
    assert_eq!(d[4], 0x01, "WSNZ");
    assert_eq!(d[5], 0, "no COMPARE AND WRITE");
    assert_eq!(be16(&d, 6), 8, "optimal granularity 4 KiB");
    assert_eq!(be32(&d, 8), 8192, "4 MiB maximum transfer");
    assert_eq!(be32(&d, 12), 0);
    assert_eq!(be32(&d, 20), 4 << 20, "maximum unmap LBA count");
    assert_eq!(be32(&d, 24), 256, "maximum unmap descriptors");
    assert_eq!(u64::from_be_bytes(d[36..44].try_into().unwrap()), 4 << 20, "maximum write same length");

    let opts = LunOptions {
        max_transfer_bytes: 0,
        max_unmap_blocks: 1000,
        max_unmap_descriptors: 100_000,
        max_write_same_blocks: 77,
        ..Default::default()
    };
    let mut h = H::with_opts(malloc_bdev(4096, 64), opts);
    let d = vpd(&mut h, 0xB0);
    assert_eq!(be16(&d, 6), 1);
    assert_eq!(be32(&d, 8), 0, "no limit");
    assert_eq!(be32(&d, 20), 1000);
    assert_eq!(be32(&d, 24), 4095, "capped to what a parameter list can hold");
    assert_eq!(u64::from_be_bytes(d[36..44].try_into().unwrap()), 77);
}

#[test]
fn vpd_block_device_characteristics_reports_non_rotating_medium() {
    let mut h = H::new(malloc_bdev(512, 64));
    let d = vpd(&mut h, 0xB1);
    assert_eq!(be16(&d, 2), 0x3C);
    assert_eq!(be16(&d, 4), 0x0001);
    assert!(d[6..].iter().all(|&b| b == 0));
}

#[test]
fn vpd_logical_block_provisioning_reports_unmap_support() {
    let mut h = H::new(malloc_bdev(512, 64));
    let d = vpd(&mut h, 0xB2);
    assert_eq!(d, [0x00, 0xB2, 0x00, 0x04, 0x00, 0xE0, 0x02, 0x00], "LBPU, LBPWS, LBPWS10; thin");
    let mut h = H::with_opts(malloc_bdev(512, 64), LunOptions { unmap_reads_zeroes: true, ..Default::default() });
    let d = vpd(&mut h, 0xB2);
    assert_eq!(d[5], 0xE4, "LBPRZ");
}

#[test]
fn vpd_pages_of_a_bdev_without_unmap_report_no_provisioning() {
    let (_f, b) = file_bdev(64, uring::Flavor::Aio, false);
    let mut h = H::with_opts(b, LunOptions { unmap_reads_zeroes: true, ..Default::default() });
    let d = vpd(&mut h, 0xB2);
    assert_eq!(&d[4..], &[0, 0, 0, 0]);
    let d = vpd(&mut h, 0xB0);
    assert_eq!((be32(&d, 20), be32(&d, 24)), (0, 0));
    let (_, std) = h.cmd_in(&inquiry(false, 0, 96), 96);
    assert_eq!(&std[16..32], b"AIO disk        ");
}

#[test]
fn vpd_page_with_small_allocation_length_is_truncated() {
    let mut h = H::new(malloc_bdev(512, 64));
    let (r, d) = h.cmd_in(&inquiry(true, 0x83, 4), 1024);
    assert_eq!(r, TaskResult::good(4));
    assert_eq!(d, [0x00, 0x83, 0x00, 56]);
    let (r, _) = h.cmd_in(&inquiry(true, 0xB0, 64), 10);
    assert_eq!(r, TaskResult::good(10));
}
