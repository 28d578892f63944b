//! Status codes (SAM-5) and sense data (SPC-4).
//!
//! vstor always reports sense in fixed format (response code 70h, current error): the control mode
//! page says D_SENSE = 0. REQUEST SENSE may ask for descriptor format, which
//! [`Sense::to_descriptor_bytes`] produces.

/// Command status (SAM-5), the byte the transport returns with each command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum ScsiStatus {
    Good = 0x00,
    CheckCondition = 0x02,
    ConditionMet = 0x04,
    Busy = 0x08,
    ReservationConflict = 0x18,
    TaskSetFull = 0x28,
    AcaActive = 0x30,
    TaskAborted = 0x40,
}

impl ScsiStatus {
    /// The status byte.
    pub fn as_u8(self) -> u8 {
        self as u8
    }
}

/// Sense keys (SPC-4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum SenseKey {
    NoSense = 0x0,
    RecoveredError = 0x1,
    NotReady = 0x2,
    MediumError = 0x3,
    HardwareError = 0x4,
    IllegalRequest = 0x5,
    UnitAttention = 0x6,
    DataProtect = 0x7,
    BlankCheck = 0x8,
    VendorSpecific = 0x9,
    CopyAborted = 0xA,
    AbortedCommand = 0xB,
    VolumeOverflow = 0xD,
    Miscompare = 0xE,
    Completed = 0xF,
}

impl SenseKey {
    /// The 4-bit code.
    pub fn as_u8(self) -> u8 {
        self as u8
    }
}

/// An additional sense code and qualifier (SPC-4). The constants are the ones vstor uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Asc {
    pub asc: u8,
    pub ascq: u8,
}

impl Asc {
    pub const NO_ADDITIONAL_SENSE: Asc = Asc { asc: 0x00, ascq: 0x00 };
    pub const WRITE_ERROR: Asc = Asc { asc: 0x0C, ascq: 0x00 };
    pub const UNRECOVERED_READ_ERROR: Asc = Asc { asc: 0x11, ascq: 0x00 };
    pub const PARAMETER_LIST_LENGTH_ERROR: Asc = Asc { asc: 0x1A, ascq: 0x00 };
    pub const MISCOMPARE_DURING_VERIFY: Asc = Asc { asc: 0x1D, ascq: 0x00 };
    pub const INVALID_COMMAND_OPERATION_CODE: Asc = Asc { asc: 0x20, ascq: 0x00 };
    pub const LBA_OUT_OF_RANGE: Asc = Asc { asc: 0x21, ascq: 0x00 };
    pub const INVALID_FIELD_IN_CDB: Asc = Asc { asc: 0x24, ascq: 0x00 };
    pub const LOGICAL_UNIT_NOT_SUPPORTED: Asc = Asc { asc: 0x25, ascq: 0x00 };
    pub const INVALID_FIELD_IN_PARAMETER_LIST: Asc = Asc { asc: 0x26, ascq: 0x00 };
    pub const WRITE_PROTECTED: Asc = Asc { asc: 0x27, ascq: 0x00 };
    pub const SPACE_ALLOCATION_FAILED_WRITE_PROTECT: Asc = Asc { asc: 0x27, ascq: 0x07 };
    pub const CAPACITY_DATA_HAS_CHANGED: Asc = Asc { asc: 0x2A, ascq: 0x09 };
    pub const SAVING_PARAMETERS_NOT_SUPPORTED: Asc = Asc { asc: 0x39, ascq: 0x00 };
    pub const INTERNAL_TARGET_FAILURE: Asc = Asc { asc: 0x44, ascq: 0x00 };
}

/// The sense-key-specific field pointer of an ILLEGAL REQUEST (SPC-4): which byte (and
/// optionally which bit) of the CDB or of the parameter list is wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FieldPointer {
    /// C/D: true for the CDB, false for the parameter list (data-out).
    pub in_cdb: bool,
    /// Byte offset of the field (its most significant byte).
    pub byte: u16,
    /// The left-most bit of the field within `byte` (BPV=1), or `None` for a whole-byte field.
    pub bit: Option<u8>,
}

impl FieldPointer {
    /// The three sense-key-specific bytes (SKSV set).
    pub fn to_bytes(self) -> [u8; 3] {
        let mut b0 = 0x80;
        if self.in_cdb {
            b0 |= 0x40;
        }
        if let Some(bit) = self.bit {
            b0 |= 0x08 | (bit & 0x07);
        }
        let [hi, lo] = self.byte.to_be_bytes();
        [b0, hi, lo]
    }
}

/// Sense data for one error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Sense {
    pub key: SenseKey,
    pub asc: Asc,
    /// INFORMATION field (VALID bit set when present): the miscompare offset for VERIFY.
    pub information: Option<u32>,
    /// Sense-key-specific field pointer (ILLEGAL REQUEST only).
    pub field: Option<FieldPointer>,
}

/// Length of fixed-format sense data as vstor produces it.
pub const FIXED_SENSE_LEN: usize = 18;

impl Sense {
    /// Sense with no INFORMATION and no field pointer.
    pub const fn new(key: SenseKey, asc: Asc) -> Self {
        Self { key, asc, information: None, field: None }
    }

    /// ILLEGAL REQUEST with `asc` and no field pointer.
    pub const fn illegal(asc: Asc) -> Self {
        Self::new(SenseKey::IllegalRequest, asc)
    }

    /// ILLEGAL REQUEST, INVALID FIELD IN CDB, pointing at `byte` (and `bit`, the field's left-most
    /// bit, for fields narrower than a byte).
    pub fn invalid_cdb_field(byte: u16, bit: Option<u8>) -> Self {
        Self { field: Some(FieldPointer { in_cdb: true, byte, bit }), ..Self::illegal(Asc::INVALID_FIELD_IN_CDB) }
    }

    /// ILLEGAL REQUEST, INVALID FIELD IN PARAMETER LIST, pointing into the data-out buffer.
    pub fn invalid_param_field(byte: u16, bit: Option<u8>) -> Self {
        Self {
            field: Some(FieldPointer { in_cdb: false, byte, bit }),
            ..Self::illegal(Asc::INVALID_FIELD_IN_PARAMETER_LIST)
        }
    }

    /// ILLEGAL REQUEST, INVALID COMMAND OPERATION CODE, pointing at byte 0 of the CDB.
    pub fn invalid_opcode() -> Self {
        Self {
            field: Some(FieldPointer { in_cdb: true, byte: 0, bit: None }),
            ..Self::illegal(Asc::INVALID_COMMAND_OPERATION_CODE)
        }
    }

    /// ILLEGAL REQUEST, LOGICAL BLOCK ADDRESS OUT OF RANGE.
    pub const fn lba_out_of_range() -> Self {
        Self::illegal(Asc::LBA_OUT_OF_RANGE)
    }

    /// DATA PROTECT, WRITE PROTECTED.
    pub const fn write_protected() -> Self {
        Self::new(SenseKey::DataProtect, Asc::WRITE_PROTECTED)
    }

    /// Fixed-format sense data (SPC-4): response code 70h (current), additional sense
    /// length 10.
    pub fn to_bytes(&self) -> [u8; FIXED_SENSE_LEN] {
        let mut b = [0u8; FIXED_SENSE_LEN];
        b[0] = 0x70;
        if let Some(info) = self.information {
            b[0] |= 0x80;
            b[3..7].copy_from_slice(&info.to_be_bytes());
        }
        b[2] = self.key.as_u8();
        b[7] = 10; // FIXED_SENSE_LEN - 8
        b[12] = self.asc.asc;
        b[13] = self.asc.ascq;
        if let Some(f) = self.field {
            b[15..18].copy_from_slice(&f.to_bytes());
        }
        b
    }

    /// Descriptor-format sense data (SPC-4): response code 72h, then an information
    /// descriptor and a sense-key-specific descriptor when there is something to put in them.
    pub fn to_descriptor_bytes(&self) -> Vec<u8> {
        let mut b = vec![0x72, self.key.as_u8(), self.asc.asc, self.asc.ascq, 0, 0, 0, 0];
        if let Some(info) = self.information {
            // Information descriptor (SPC-4): type 00h, length 0Ah, VALID, 8-byte value.
            b.extend_from_slice(&[0x00, 0x0A, 0x80, 0x00]);
            b.extend_from_slice(&u64::from(info).to_be_bytes());
        }
        if let Some(f) = self.field {
            // Sense key specific descriptor (SPC-4): type 02h, length 06h.
            b.extend_from_slice(&[0x02, 0x06, 0x00, 0x00]);
            b.extend_from_slice(&f.to_bytes());
            b.push(0);
        }
        // At most 8 + 12 + 8 bytes: the additional length always fits a byte.
        b[7] = u8::try_from(b.len() - 8).unwrap_or(u8::MAX);
        b
    }
}
