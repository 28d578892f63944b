//! Data pointers: PRP entries and lists, SGL descriptors and segments, turned into iovecs over
//! guest memory.
//!
//! Every address is checked against the DMA-mapped memory (`GuestMemory::append_iovecs`), lists
//! and segments are copied out of guest memory once and validated from the copy, all arithmetic
//! is checked, and every walk is bounded (by the transfer length for PRP lists, by descriptor and
//! segment limits for SGLs). Errors are NVMe statuses.

use vstor_bdev::IoVecs;
use vstor_mem::GuestMemory;

use crate::spec::*;

/// Most descriptors in one SGL segment (a 4 KiB segment, as Linux builds them).
pub(crate) const MAX_SGL_SEGMENT_DESCRIPTORS: u64 = 256;
/// Most segments one SGL may chain.
pub(crate) const MAX_SGL_SEGMENTS: u32 = 64;

const SGL_DATA_BLOCK: u8 = 0x0;
const SGL_SEGMENT: u8 = 0x2;
const SGL_LAST_SEGMENT: u8 = 0x3;

/// Maps the data buffer of `cmd` (`len` bytes) with memory page size `page`. `sgl_ok` is false for
/// admin commands, which must use PRPs.
pub(crate) fn map_data(
    mem: &GuestMemory,
    cmd: &Command,
    len: u64,
    page: u64,
    sgl_ok: bool,
    out: &mut IoVecs,
) -> Result<(), Status> {
    match cmd.psdt() {
        0 => map_prp(mem, cmd.prp1(), cmd.prp2(), len, page, out),
        1 | 2 if sgl_ok => map_sgl(mem, &cmd.sgl(), len, out),
        _ => Err(SC_INVALID_FIELD),
    }
}

fn push(mem: &GuestMemory, addr: u64, len: u64, out: &mut IoVecs) -> Result<(), Status> {
    mem.append_iovecs(addr, len, out).map_err(|_| SC_DATA_TRANSFER_ERROR)
}

/// PRP Entry 1 may start anywhere dword-aligned in a page; every later page (PRP Entry 2 as data,
/// or the entries of a PRP list) must have offset 0. PRP Entry 2 as a list pointer may start
/// anywhere qword-aligned; the last entry of a list page that is not enough points to the next
/// list page, which must be page aligned.
pub(crate) fn map_prp(
    mem: &GuestMemory,
    prp1: u64,
    prp2: u64,
    len: u64,
    page: u64,
    out: &mut IoVecs,
) -> Result<(), Status> {
    if len == 0 {
        return Ok(());
    }
    let mask = page - 1;
    if prp1 & 3 != 0 {
        return Err(SC_PRP_OFFSET_INVALID);
    }
    let first = len.min(page - (prp1 & mask));
    push(mem, prp1, first, out)?;
    let mut rem = len - first;
    if rem == 0 {
        return Ok(());
    }
    if rem <= page {
        if prp2 & mask != 0 {
            return Err(SC_PRP_OFFSET_INVALID);
        }
        return push(mem, prp2, rem, out);
    }
    if prp2 & 7 != 0 {
        return Err(SC_PRP_OFFSET_INVALID);
    }
    let mut list = prp2;
    // Each list page after the first is page aligned and so describes at least page/8 - 1 pages:
    // the walk ends within rem/page + 2 list pages.
    let max_lists = rem / page + 2;
    let mut lists = 0u64;
    let mut buf = [0u8; 512];
    loop {
        lists += 1;
        if lists > max_lists {
            return Err(SC_PRP_OFFSET_INVALID);
        }
        let slots = (page - (list & mask)) / 8;
        let needed = rem.div_ceil(page);
        let (data_entries, chained) = if needed > slots { (slots - 1, true) } else { (needed, false) };
        // Read the entries of this list page in chunks into a local copy, then validate.
        let total_entries = data_entries + u64::from(chained);
        let mut idx = 0u64;
        let mut next_list = None;
        while idx < total_entries {
            let n = (total_entries - idx).min(64);
            let nbytes = usize::try_from(n * 8).map_err(|_| SC_INTERNAL_ERROR)?;
            let at = list.checked_add(idx * 8).ok_or(SC_DATA_TRANSFER_ERROR)?;
            if mem.read(at, &mut buf[..nbytes]).is_err() {
                return Err(SC_DATA_TRANSFER_ERROR);
            }
            for (k, e) in buf[..nbytes].chunks_exact(8).enumerate() {
                let entry = u64::from_le_bytes([e[0], e[1], e[2], e[3], e[4], e[5], e[6], e[7]]);
                let i = idx + k as u64;
                if entry & mask != 0 {
                    return Err(SC_PRP_OFFSET_INVALID);
                }
                if i < data_entries {
                    let chunk = rem.min(page);
                    push(mem, entry, chunk, out)?;
                    rem -= chunk;
                } else {
                    next_list = Some(entry);
                }
            }
            idx += n;
        }
        match next_list {
            Some(l) if rem > 0 => list = l,
            _ => break,
        }
    }
    if rem != 0 {
        return Err(SC_INTERNAL_ERROR);
    }
    Ok(())
}

struct Desc {
    addr: u64,
    len: u32,
    kind: u8,
    subtype: u8,
}

fn parse_desc(b: &[u8]) -> Desc {
    let addr = u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]);
    let len = u32::from_le_bytes([b[8], b[9], b[10], b[11]]);
    Desc { addr, len, kind: b[15] >> 4, subtype: b[15] & 0xf }
}

/// Walks an SGL: the descriptor in DPTR is a Data Block, or a (Last) Segment pointing to a list
/// of descriptors whose last entry may chain the next segment. Only Data Block, Segment and Last
/// Segment descriptors with the Address subtype are supported (SGLS = 1h).
pub(crate) fn map_sgl(mem: &GuestMemory, first: &[u8; 16], len: u64, out: &mut IoVecs) -> Result<(), Status> {
    let mut total = 0u64;
    let mut add = |d: &Desc, out: &mut IoVecs| -> Result<(), Status> {
        if d.subtype != 0 {
            return Err(SC_SGL_TYPE_INVALID);
        }
        let l = u64::from(d.len);
        total = total.checked_add(l).ok_or(SC_DATA_SGL_LENGTH_INVALID)?;
        if total > len {
            return Err(SC_DATA_SGL_LENGTH_INVALID);
        }
        push(mem, d.addr, l, out)
    };
    let d = parse_desc(first);
    let mut seg = match d.kind {
        SGL_DATA_BLOCK => {
            add(&d, out)?;
            None
        }
        SGL_SEGMENT | SGL_LAST_SEGMENT => Some(d),
        _ => return Err(SC_SGL_TYPE_INVALID),
    };
    let mut segments = 0u32;
    let mut buf = vec![0u8; 0];
    while let Some(s) = seg.take() {
        segments += 1;
        if segments > MAX_SGL_SEGMENTS {
            return Err(SC_SGL_NUM_DESCRIPTORS_INVALID);
        }
        if s.subtype != 0 {
            return Err(SC_SGL_TYPE_INVALID);
        }
        let slen = u64::from(s.len);
        if slen == 0 || !slen.is_multiple_of(16) {
            return Err(SC_SGL_SEGMENT_INVALID);
        }
        let n = slen / 16;
        if n > MAX_SGL_SEGMENT_DESCRIPTORS {
            return Err(SC_SGL_NUM_DESCRIPTORS_INVALID);
        }
        let is_last = s.kind == SGL_LAST_SEGMENT;
        buf.resize(usize::try_from(slen).map_err(|_| SC_SGL_SEGMENT_INVALID)?, 0);
        if mem.read(s.addr, &mut buf).is_err() {
            return Err(SC_DATA_TRANSFER_ERROR);
        }
        let count = buf.len() / 16;
        for (i, raw) in buf.chunks_exact(16).enumerate() {
            let d = parse_desc(raw);
            match d.kind {
                SGL_DATA_BLOCK => add(&d, out)?,
                SGL_SEGMENT | SGL_LAST_SEGMENT => {
                    // Only the last descriptor of a segment may chain, and a Last Segment may not.
                    if i + 1 != count || is_last {
                        return Err(SC_SGL_SEGMENT_INVALID);
                    }
                    seg = Some(d);
                }
                _ => return Err(SC_SGL_TYPE_INVALID),
            }
        }
    }
    if total != len {
        return Err(SC_DATA_SGL_LENGTH_INVALID);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use vstor_mem::{memfd, Region};

    fn mem() -> Arc<GuestMemory> {
        let f = memfd("dptr", 1 << 20).unwrap();
        Arc::new(GuestMemory::new(vec![Region::map(&f, 0x10_0000, 1 << 20, 0x10_0000, 0).unwrap()]).unwrap())
    }

    fn put_u64s(m: &GuestMemory, at: u64, v: &[u64]) {
        let b: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        m.write(at, &b).unwrap();
    }

    const B: u64 = 0x10_0000;
    const P: u64 = 4096;

    #[test]
    fn prp_single_pages_and_offsets() {
        let m = mem();
        let mut v = IoVecs::new();
        map_prp(&m, B + 0x200, 0, 512, P, &mut v).unwrap();
        assert_eq!(v.total_len(), 512);
        let mut v = IoVecs::new();
        map_prp(&m, B + 0x800, B + 2 * P, P, P, &mut v).unwrap();
        assert_eq!((v.len(), v.total_len()), (2, P));
        let mut v = IoVecs::new();
        assert_eq!(map_prp(&m, B + 2, 0, 512, P, &mut v), Err(SC_PRP_OFFSET_INVALID));
        assert_eq!(map_prp(&m, B + 0x800, B + 2 * P + 8, P, P, &mut v), Err(SC_PRP_OFFSET_INVALID));
        assert_eq!(map_prp(&m, 0x1000, 0, 512, P, &mut v), Err(SC_DATA_TRANSFER_ERROR));
    }

    #[test]
    fn prp_lists_chain_at_the_last_slot() {
        let m = mem();
        // List starting 16 bytes before the end of a page: one data entry and a chain pointer.
        let list = B + 10 * P - 16;
        put_u64s(&m, list, &[B + 20 * P, B + 11 * P]);
        put_u64s(&m, B + 11 * P, &[B + 21 * P, B + 22 * P]);
        let mut v = IoVecs::new();
        map_prp(&m, B + 19 * P, list, 4 * P, P, &mut v).unwrap();
        assert_eq!((v.len(), v.total_len()), (4, 4 * P));
        // The chain pointer must be page aligned.
        put_u64s(&m, list, &[B + 20 * P, B + 11 * P + 8]);
        let mut v = IoVecs::new();
        assert_eq!(map_prp(&m, B + 19 * P, list, 4 * P, P, &mut v), Err(SC_PRP_OFFSET_INVALID));
        // A list that runs past guest memory.
        let mut v = IoVecs::new();
        assert_eq!(map_prp(&m, B, B + 256 * P - 8, 3 * P, P, &mut v), Err(SC_DATA_TRANSFER_ERROR));
    }

    fn desc(addr: u64, len: u32, kind: u8) -> [u8; 16] {
        let mut d = [0u8; 16];
        d[..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[15] = kind << 4;
        d
    }

    #[test]
    fn sgl_segments_and_errors() {
        let m = mem();
        let mut v = IoVecs::new();
        map_sgl(&m, &desc(B + 3, 1000, 0), 1000, &mut v).unwrap();
        assert_eq!(v.total_len(), 1000);
        // Segment with two data blocks and a chained last segment with one.
        let seg1 = B + 40 * P;
        let seg2 = B + 41 * P;
        let s1: Vec<u8> = [desc(B, 100, 0), desc(B + P, 200, 0), desc(seg2, 16, 3)].concat();
        m.write(seg1, &s1).unwrap();
        m.write(seg2, &desc(B + 2 * P, 300, 0)).unwrap();
        let mut v = IoVecs::new();
        map_sgl(&m, &desc(seg1, 48, 2), 600, &mut v).unwrap();
        assert_eq!((v.len(), v.total_len()), (3, 600));
        let mut v = IoVecs::new();
        assert_eq!(map_sgl(&m, &desc(seg1, 48, 2), 601, &mut v), Err(SC_DATA_SGL_LENGTH_INVALID));
        assert_eq!(map_sgl(&m, &desc(seg1, 48, 2), 599, &mut v), Err(SC_DATA_SGL_LENGTH_INVALID));
        assert_eq!(map_sgl(&m, &desc(seg1, 40, 2), 600, &mut v), Err(SC_SGL_SEGMENT_INVALID));
        // A last segment may not chain.
        assert_eq!(map_sgl(&m, &desc(seg1, 48, 3), 600, &mut v), Err(SC_SGL_SEGMENT_INVALID));
        // Keyed data block (fabrics) and bit bucket are not supported.
        assert_eq!(map_sgl(&m, &desc(B, 512, 4), 512, &mut v), Err(SC_SGL_TYPE_INVALID));
        assert_eq!(map_sgl(&m, &desc(B, 512, 1), 512, &mut v), Err(SC_SGL_TYPE_INVALID));
        // A segment that points to itself forever.
        m.write(seg1, &desc(seg1, 16, 2)).unwrap();
        assert_eq!(map_sgl(&m, &desc(seg1, 16, 2), 512, &mut v), Err(SC_SGL_NUM_DESCRIPTORS_INVALID));
    }
}
