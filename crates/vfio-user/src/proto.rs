//! vfio-user wire format (protocol 0.x, QEMU's `docs/interop/vfio-user.rst`): command numbers,
//! header flags, the `#[repr(C)]` payload structures and the VFIO constants they carry.
//!
//! Every structure here is plain integers without padding ([`Wire`]). Incoming bytes are decoded
//! with [`read_wire`], which checks the length first and then copies with `read_unaligned`; the
//! caller validates the fields. Outgoing structures are encoded with [`wire_bytes`].

#![allow(dead_code)] // a definitions table: not every value is referenced

/// Size of the message header.
pub const HEADER_SIZE: usize = 16;

// ---- Commands ----
pub const CMD_VERSION: u16 = 1;
pub const CMD_DMA_MAP: u16 = 2;
pub const CMD_DMA_UNMAP: u16 = 3;
pub const CMD_DEVICE_GET_INFO: u16 = 4;
pub const CMD_DEVICE_GET_REGION_INFO: u16 = 5;
pub const CMD_DEVICE_GET_REGION_IO_FDS: u16 = 6;
pub const CMD_DEVICE_GET_IRQ_INFO: u16 = 7;
pub const CMD_DEVICE_SET_IRQS: u16 = 8;
pub const CMD_REGION_READ: u16 = 9;
pub const CMD_REGION_WRITE: u16 = 10;
pub const CMD_DMA_READ: u16 = 11;
pub const CMD_DMA_WRITE: u16 = 12;
pub const CMD_DEVICE_RESET: u16 = 13;
pub const CMD_DIRTY_PAGES: u16 = 14;
pub const CMD_REGION_WRITE_MULTI: u16 = 15;
pub const CMD_DEVICE_FEATURE: u16 = 16;
pub const CMD_MIG_DATA_READ: u16 = 17;
pub const CMD_MIG_DATA_WRITE: u16 = 18;

// ---- Header flags ----
pub const FLAG_TYPE_MASK: u32 = 0xf;
pub const TYPE_COMMAND: u32 = 0;
pub const TYPE_REPLY: u32 = 1;
pub const FLAG_NO_REPLY: u32 = 1 << 4;
pub const FLAG_ERROR: u32 = 1 << 5;

// ---- Device info ----
pub const VFIO_DEVICE_FLAGS_RESET: u32 = 1 << 0;
pub const VFIO_DEVICE_FLAGS_PCI: u32 = 1 << 1;

// ---- PCI region indexes ----
pub const BAR0_REGION: u32 = 0;
pub const BAR4_REGION: u32 = 4;
pub const ROM_REGION: u32 = 6;
pub const CONFIG_REGION: u32 = 7;
pub const VGA_REGION: u32 = 8;
pub const NUM_REGIONS: u32 = 9;

// ---- Region info ----
pub const REGION_INFO_FLAG_READ: u32 = 1 << 0;
pub const REGION_INFO_FLAG_WRITE: u32 = 1 << 1;
pub const REGION_INFO_FLAG_MMAP: u32 = 1 << 2;
pub const REGION_INFO_FLAG_CAPS: u32 = 1 << 3;
pub const REGION_INFO_CAP_SPARSE_MMAP: u16 = 1;

// ---- PCI interrupt indexes ----
pub const INTX_IRQ: u32 = 0;
pub const MSI_IRQ: u32 = 1;
pub const MSIX_IRQ: u32 = 2;
pub const ERR_IRQ: u32 = 3;
pub const REQ_IRQ: u32 = 4;
pub const NUM_IRQS: u32 = 5;

// ---- IRQ info flags ----
pub const IRQ_INFO_EVENTFD: u32 = 1 << 0;
pub const IRQ_INFO_MASKABLE: u32 = 1 << 1;
pub const IRQ_INFO_AUTOMASKED: u32 = 1 << 2;
pub const IRQ_INFO_NORESIZE: u32 = 1 << 3;

// ---- SET_IRQS flags ----
pub const IRQ_SET_DATA_NONE: u32 = 1 << 0;
pub const IRQ_SET_DATA_BOOL: u32 = 1 << 1;
pub const IRQ_SET_DATA_EVENTFD: u32 = 1 << 2;
pub const IRQ_SET_ACTION_MASK: u32 = 1 << 3;
pub const IRQ_SET_ACTION_UNMASK: u32 = 1 << 4;
pub const IRQ_SET_ACTION_TRIGGER: u32 = 1 << 5;
pub const IRQ_SET_DATA_MASK: u32 = IRQ_SET_DATA_NONE | IRQ_SET_DATA_BOOL | IRQ_SET_DATA_EVENTFD;
pub const IRQ_SET_ACTION_MASK_ALL: u32 = IRQ_SET_ACTION_MASK | IRQ_SET_ACTION_UNMASK | IRQ_SET_ACTION_TRIGGER;

// ---- DMA map / unmap flags ----
pub const DMA_MAP_FLAG_READ: u32 = 1 << 0;
pub const DMA_MAP_FLAG_WRITE: u32 = 1 << 1;
pub const DMA_UNMAP_FLAG_GET_DIRTY_BITMAP: u32 = 1 << 1;
pub const DMA_UNMAP_FLAG_ALL: u32 = 1 << 2;

/// Plain-integer wire structures: `#[repr(C)]`, every field an integer, no padding, so any byte
/// pattern of the right length is a valid value.
///
/// # Safety
/// Implement only for `#[repr(C)]` structs whose fields are all integers with no padding bytes.
pub unsafe trait Wire: Copy + Default {}

/// Decodes a `T` from the start of `bytes`, or `None` if `bytes` is too short.
pub fn read_wire<T: Wire>(bytes: &[u8]) -> Option<T> {
    if bytes.len() < std::mem::size_of::<T>() {
        return None;
    }
    // SAFETY: `bytes` holds at least `size_of::<T>()` bytes (checked above); `read_unaligned`
    // has no alignment requirement, and `T: Wire` is valid for every bit pattern.
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) })
}

/// The bytes of a wire structure.
pub fn wire_bytes<T: Wire>(v: &T) -> &[u8] {
    // SAFETY: `T: Wire` has no padding, so all `size_of::<T>()` bytes behind the reference are
    // initialized; the slice borrows `v` and cannot outlive it.
    unsafe { std::slice::from_raw_parts((v as *const T).cast::<u8>(), std::mem::size_of::<T>()) }
}

/// The header of every message.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub id: u16,
    pub command: u16,
    /// Size of the whole message, header included.
    pub size: u32,
    pub flags: u32,
    /// errno of a failed command (replies with [`FLAG_ERROR`]).
    pub error: u32,
}

/// `VFIO_USER_VERSION` payload (followed by optional NUL-terminated JSON).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct Version {
    pub major: u16,
    pub minor: u16,
}

/// `VFIO_USER_DMA_MAP` request payload.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct DmaMap {
    pub argsz: u32,
    pub flags: u32,
    pub offset: u64,
    pub address: u64,
    pub size: u64,
}

/// `VFIO_USER_DMA_UNMAP` request and reply payload.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct DmaUnmap {
    pub argsz: u32,
    pub flags: u32,
    pub address: u64,
    pub size: u64,
}

/// `VFIO_USER_DEVICE_GET_INFO` request and reply payload.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct DeviceInfo {
    pub argsz: u32,
    pub flags: u32,
    pub num_regions: u32,
    pub num_irqs: u32,
}

/// `struct vfio_region_info`: `VFIO_USER_DEVICE_GET_REGION_INFO` request and reply payload.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct RegionInfo {
    pub argsz: u32,
    pub flags: u32,
    pub index: u32,
    pub cap_offset: u32,
    pub size: u64,
    pub offset: u64,
}

/// `struct vfio_info_cap_header`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct CapHeader {
    pub id: u16,
    pub version: u16,
    pub next: u32,
}

/// Fixed part of `struct vfio_region_info_cap_sparse_mmap` (after the capability header).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct SparseMmapHeader {
    pub nr_areas: u32,
    pub reserved: u32,
}

/// `struct vfio_region_sparse_mmap_area`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct SparseArea {
    pub offset: u64,
    pub size: u64,
}

/// `VFIO_USER_REGION_READ`/`WRITE` payload (data follows).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct RegionAccess {
    pub offset: u64,
    pub region: u32,
    pub count: u32,
}

/// `struct vfio_irq_info`: `VFIO_USER_DEVICE_GET_IRQ_INFO` request and reply payload.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct IrqInfo {
    pub argsz: u32,
    pub flags: u32,
    pub index: u32,
    pub count: u32,
}

/// `struct vfio_irq_set` without its data: `VFIO_USER_DEVICE_SET_IRQS` request payload.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct IrqSet {
    pub argsz: u32,
    pub flags: u32,
    pub index: u32,
    pub start: u32,
    pub count: u32,
}

// SAFETY: repr(C), integer fields only: u16 u16 u32 u32 u32 (16 bytes, no padding).
unsafe impl Wire for Header {}
// SAFETY: repr(C), u16 u16 (4 bytes, no padding).
unsafe impl Wire for Version {}
// SAFETY: repr(C), u32 u32 u64 u64 u64 (32 bytes, no padding).
unsafe impl Wire for DmaMap {}
// SAFETY: repr(C), u32 u32 u64 u64 (24 bytes, no padding).
unsafe impl Wire for DmaUnmap {}
// SAFETY: repr(C), four u32 (16 bytes, no padding).
unsafe impl Wire for DeviceInfo {}
// SAFETY: repr(C), four u32 then two u64 (32 bytes, no padding).
unsafe impl Wire for RegionInfo {}
// SAFETY: repr(C), u16 u16 u32 (8 bytes, no padding).
unsafe impl Wire for CapHeader {}
// SAFETY: repr(C), two u32 (8 bytes, no padding).
unsafe impl Wire for SparseMmapHeader {}
// SAFETY: repr(C), two u64 (16 bytes, no padding).
unsafe impl Wire for SparseArea {}
// SAFETY: repr(C), u64 u32 u32 (16 bytes, no padding).
unsafe impl Wire for RegionAccess {}
// SAFETY: repr(C), four u32 (16 bytes, no padding).
unsafe impl Wire for IrqInfo {}
// SAFETY: repr(C), five u32 (20 bytes, no padding).
unsafe impl Wire for IrqSet {}

const _: () = {
    assert!(std::mem::size_of::<Header>() == HEADER_SIZE);
    assert!(std::mem::size_of::<Version>() == 4);
    assert!(std::mem::size_of::<DmaMap>() == 32);
    assert!(std::mem::size_of::<DmaUnmap>() == 24);
    assert!(std::mem::size_of::<DeviceInfo>() == 16);
    assert!(std::mem::size_of::<RegionInfo>() == 32);
    assert!(std::mem::size_of::<CapHeader>() == 8);
    assert!(std::mem::size_of::<SparseMmapHeader>() == 8);
    assert!(std::mem::size_of::<SparseArea>() == 16);
    assert!(std::mem::size_of::<RegionAccess>() == 16);
    assert!(std::mem::size_of::<IrqInfo>() == 16);
    assert!(std::mem::size_of::<IrqSet>() == 20);
};

/// Appends the bytes of `v` to `out`.
pub fn push_wire<T: Wire>(out: &mut Vec<u8>, v: &T) {
    out.extend_from_slice(wire_bytes(v));
}

/// Size of a wire structure as the `u32` the protocol's size fields use.
pub fn wire_len<T: Wire>() -> u32 {
    // Every wire structure is at most 32 bytes.
    u32::try_from(std::mem::size_of::<T>()).unwrap_or(u32::MAX)
}

/// A command name for logs.
pub fn command_name(cmd: u16) -> &'static str {
    match cmd {
        CMD_VERSION => "VERSION",
        CMD_DMA_MAP => "DMA_MAP",
        CMD_DMA_UNMAP => "DMA_UNMAP",
        CMD_DEVICE_GET_INFO => "DEVICE_GET_INFO",
        CMD_DEVICE_GET_REGION_INFO => "DEVICE_GET_REGION_INFO",
        CMD_DEVICE_GET_REGION_IO_FDS => "DEVICE_GET_REGION_IO_FDS",
        CMD_DEVICE_GET_IRQ_INFO => "DEVICE_GET_IRQ_INFO",
        CMD_DEVICE_SET_IRQS => "DEVICE_SET_IRQS",
        CMD_REGION_READ => "REGION_READ",
        CMD_REGION_WRITE => "REGION_WRITE",
        CMD_DMA_READ => "DMA_READ",
        CMD_DMA_WRITE => "DMA_WRITE",
        CMD_DEVICE_RESET => "DEVICE_RESET",
        CMD_DIRTY_PAGES => "DIRTY_PAGES",
        CMD_REGION_WRITE_MULTI => "REGION_WRITE_MULTI",
        CMD_DEVICE_FEATURE => "DEVICE_FEATURE",
        CMD_MIG_DATA_READ => "MIG_DATA_READ",
        CMD_MIG_DATA_WRITE => "MIG_DATA_WRITE",
        _ => "unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_input_is_refused_and_fields_decode_little_endian() {
        assert!(read_wire::<Header>(&[0u8; 15]).is_none());
        let mut b = [0u8; 17];
        b[0..2].copy_from_slice(&7u16.to_ne_bytes());
        b[2..4].copy_from_slice(&CMD_REGION_READ.to_ne_bytes());
        b[4..8].copy_from_slice(&32u32.to_ne_bytes());
        // Decoding from an odd offset exercises the unaligned read.
        let h: Header = read_wire(&b[..]).unwrap();
        assert_eq!((h.id, h.command, h.size), (7, CMD_REGION_READ, 32));
        let mut odd = vec![0u8; 1];
        odd.extend_from_slice(wire_bytes(&h));
        assert_eq!(read_wire::<Header>(&odd[1..]), Some(h));
    }
}
