//! NVMe definitions this controller uses (NVM Express Base Specification 1.4): register offsets and
//! bits, opcodes, status codes, feature and log page identifiers, and the submission/completion
//! entry layouts. Plain data; no behaviour.

#![allow(dead_code)] // a definitions table: not every value is referenced

// ---- Controller registers (BAR0) ----
pub const REG_CAP: u64 = 0x00;
pub const REG_VS: u64 = 0x08;
pub const REG_INTMS: u64 = 0x0c;
pub const REG_INTMC: u64 = 0x10;
pub const REG_CC: u64 = 0x14;
pub const REG_CSTS: u64 = 0x1c;
pub const REG_NSSR: u64 = 0x20;
pub const REG_AQA: u64 = 0x24;
pub const REG_ASQ: u64 = 0x28;
pub const REG_ACQ: u64 = 0x30;
/// Start of the doorbell registers.
pub const DOORBELL_BASE: u64 = 0x1000;

/// Version 1.4.0.
pub const NVME_VERSION: u32 = 0x0001_0400;

pub const CC_EN: u32 = 1;
pub const CC_CSS_SHIFT: u32 = 4;
pub const CC_MPS_SHIFT: u32 = 7;
pub const CC_AMS_SHIFT: u32 = 11;
pub const CC_SHN_SHIFT: u32 = 14;
pub const CC_IOSQES_SHIFT: u32 = 16;
pub const CC_IOCQES_SHIFT: u32 = 20;
/// Bits of CC the host may write (EN, CSS, MPS, AMS, SHN, IOSQES, IOCQES).
pub const CC_WRITABLE: u32 = 0x00ff_fff1;

pub const CSTS_RDY: u32 = 1;
pub const CSTS_CFS: u32 = 1 << 1;
pub const CSTS_SHST_SHIFT: u32 = 2;
pub const CSTS_SHST_MASK: u32 = 3 << 2;
pub const SHST_NORMAL: u32 = 0;
pub const SHST_OCCURRING: u32 = 1;
pub const SHST_COMPLETE: u32 = 2;

// ---- Opcodes ----
pub const ADM_DELETE_SQ: u8 = 0x00;
pub const ADM_CREATE_SQ: u8 = 0x01;
pub const ADM_GET_LOG_PAGE: u8 = 0x02;
pub const ADM_DELETE_CQ: u8 = 0x04;
pub const ADM_CREATE_CQ: u8 = 0x05;
pub const ADM_IDENTIFY: u8 = 0x06;
pub const ADM_ABORT: u8 = 0x08;
pub const ADM_SET_FEATURES: u8 = 0x09;
pub const ADM_GET_FEATURES: u8 = 0x0a;
pub const ADM_ASYNC_EVENT: u8 = 0x0c;
pub const ADM_KEEP_ALIVE: u8 = 0x18;
pub const ADM_DOORBELL_BUFFER_CONFIG: u8 = 0x7c;

pub const IO_FLUSH: u8 = 0x00;
pub const IO_WRITE: u8 = 0x01;
pub const IO_READ: u8 = 0x02;
pub const IO_COMPARE: u8 = 0x05;
pub const IO_WRITE_ZEROES: u8 = 0x08;
pub const IO_DSM: u8 = 0x09;

// ---- Identify CNS values ----
pub const CNS_NAMESPACE: u8 = 0x00;
pub const CNS_CONTROLLER: u8 = 0x01;
pub const CNS_ACTIVE_NS_LIST: u8 = 0x02;
pub const CNS_NS_ID_DESCRIPTORS: u8 = 0x03;

// ---- Feature identifiers ----
pub const FEAT_ARBITRATION: u8 = 0x01;
pub const FEAT_POWER_MGMT: u8 = 0x02;
pub const FEAT_TEMP_THRESHOLD: u8 = 0x04;
pub const FEAT_ERROR_RECOVERY: u8 = 0x05;
pub const FEAT_VOLATILE_WC: u8 = 0x06;
pub const FEAT_NUM_QUEUES: u8 = 0x07;
pub const FEAT_INT_COALESCING: u8 = 0x08;
pub const FEAT_INT_VECTOR_CONFIG: u8 = 0x09;
pub const FEAT_WRITE_ATOMICITY: u8 = 0x0a;
pub const FEAT_ASYNC_EVENT_CONFIG: u8 = 0x0b;
pub const FEAT_KEEP_ALIVE_TIMER: u8 = 0x0f;

// ---- Log pages ----
pub const LOG_ERROR: u8 = 0x01;
pub const LOG_SMART: u8 = 0x02;
pub const LOG_FIRMWARE_SLOT: u8 = 0x03;
pub const LOG_CHANGED_NS: u8 = 0x04;
pub const LOG_COMMAND_EFFECTS: u8 = 0x05;

// ---- Asynchronous events ----
pub const AER_TYPE_ERROR: u8 = 0x0;
pub const AER_TYPE_NOTICE: u8 = 0x2;
/// Error event: write to an invalid doorbell register.
pub const AER_ERR_INVALID_DB_REGISTER: u8 = 0x00;
/// Error event: invalid doorbell write value.
pub const AER_ERR_INVALID_DB_VALUE: u8 = 0x01;
/// Notice: namespace attribute changed.
pub const AER_NOTICE_NS_CHANGED: u8 = 0x00;

/// Broadcast namespace ID.
pub const NSID_ALL: u32 = 0xffff_ffff;

/// Submission queue entry size (CC.IOSQES = 6) and completion entry size (CC.IOCQES = 4).
pub const SQE_SIZE: u64 = 64;
pub const CQE_SIZE: u64 = 16;

/// A completion status: status code type, status code and the Do Not Retry bit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Status {
    pub sct: u8,
    pub sc: u8,
    pub dnr: bool,
}

impl Status {
    pub const SUCCESS: Status = Status { sct: 0, sc: 0, dnr: false };

    /// A generic (SCT 0) status with DNR set.
    pub const fn generic(sc: u8) -> Status {
        Status { sct: 0, sc, dnr: true }
    }

    /// A command-specific (SCT 1) status with DNR set.
    pub const fn specific(sc: u8) -> Status {
        Status { sct: 1, sc, dnr: true }
    }

    /// A media and data integrity (SCT 2) status with DNR set.
    pub const fn media(sc: u8) -> Status {
        Status { sct: 2, sc, dnr: true }
    }

    /// The same status with DNR cleared (the host may retry).
    pub const fn retryable(self) -> Status {
        Status { dnr: false, ..self }
    }

    pub fn is_success(self) -> bool {
        self.sct == 0 && self.sc == 0
    }

    /// Bits 31:17 of completion dword 3 (the status field without the phase tag).
    pub fn dw3_bits(self) -> u32 {
        (u32::from(self.sc) << 17) | (u32::from(self.sct & 7) << 25) | (u32::from(self.dnr) << 31)
    }

    /// Decodes completion dword 3.
    pub fn from_dw3(dw3: u32) -> Status {
        Status { sc: lo8(dw3 >> 17), sct: lo8(dw3 >> 25) & 7, dnr: dw3 >> 31 != 0 }
    }
}

// Generic command status (SCT 0).
pub const SC_INVALID_OPCODE: Status = Status::generic(0x01);
pub const SC_INVALID_FIELD: Status = Status::generic(0x02);
pub const SC_DATA_TRANSFER_ERROR: Status = Status::generic(0x04);
pub const SC_INTERNAL_ERROR: Status = Status::generic(0x06);
pub const SC_ABORT_REQUESTED: Status = Status::generic(0x07);
pub const SC_ABORTED_SQ_DELETION: Status = Status::generic(0x08);
pub const SC_INVALID_NAMESPACE: Status = Status::generic(0x0b);
pub const SC_COMMAND_SEQUENCE_ERROR: Status = Status::generic(0x0c);
pub const SC_SGL_SEGMENT_INVALID: Status = Status::generic(0x0d);
pub const SC_SGL_NUM_DESCRIPTORS_INVALID: Status = Status::generic(0x0e);
pub const SC_DATA_SGL_LENGTH_INVALID: Status = Status::generic(0x0f);
pub const SC_SGL_TYPE_INVALID: Status = Status::generic(0x11);
pub const SC_PRP_OFFSET_INVALID: Status = Status::generic(0x13);
pub const SC_NS_WRITE_PROTECTED: Status = Status::generic(0x20);
pub const SC_LBA_OUT_OF_RANGE: Status = Status::generic(0x80);
pub const SC_CAPACITY_EXCEEDED: Status = Status::generic(0x81);

// Command specific status (SCT 1).
pub const SC_CQ_INVALID: Status = Status::specific(0x00);
pub const SC_INVALID_QID: Status = Status::specific(0x01);
pub const SC_INVALID_QSIZE: Status = Status::specific(0x02);
pub const SC_AER_LIMIT_EXCEEDED: Status = Status::specific(0x05);
pub const SC_INVALID_INT_VECTOR: Status = Status::specific(0x08);
pub const SC_INVALID_LOG_PAGE: Status = Status::specific(0x09);
pub const SC_INVALID_QUEUE_DELETION: Status = Status::specific(0x0c);
pub const SC_FEATURE_NOT_SAVEABLE: Status = Status::specific(0x0d);
pub const SC_FEATURE_NOT_NS_SPECIFIC: Status = Status::specific(0x0f);

// Media and data integrity errors (SCT 2).
pub const SC_WRITE_FAULT: Status = Status::media(0x80);
pub const SC_UNRECOVERED_READ: Status = Status::media(0x81);
pub const SC_COMPARE_FAILURE: Status = Status::media(0x85);

/// A submission queue entry, copied out of guest memory (never read twice).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Command {
    pub dw: [u32; 16],
}

impl Command {
    pub fn from_bytes(b: &[u8; 64]) -> Command {
        let mut dw = [0u32; 16];
        for (i, d) in dw.iter_mut().enumerate() {
            *d = u32::from_le_bytes([b[i * 4], b[i * 4 + 1], b[i * 4 + 2], b[i * 4 + 3]]);
        }
        Command { dw }
    }

    pub fn to_bytes(self) -> [u8; 64] {
        let mut b = [0u8; 64];
        for (i, d) in self.dw.iter().enumerate() {
            b[i * 4..i * 4 + 4].copy_from_slice(&d.to_le_bytes());
        }
        b
    }

    pub fn opc(&self) -> u8 {
        lo8(self.dw[0])
    }
    /// Fused operation (bits 9:8).
    pub fn fuse(&self) -> u8 {
        lo8(self.dw[0] >> 8) & 3
    }
    /// PRP or SGL for data transfer (bits 15:14).
    pub fn psdt(&self) -> u8 {
        lo8(self.dw[0] >> 14) & 3
    }
    pub fn cid(&self) -> u16 {
        hi16(self.dw[0])
    }
    pub fn nsid(&self) -> u32 {
        self.dw[1]
    }
    pub fn prp1(&self) -> u64 {
        u64::from(self.dw[6]) | (u64::from(self.dw[7]) << 32)
    }
    pub fn prp2(&self) -> u64 {
        u64::from(self.dw[8]) | (u64::from(self.dw[9]) << 32)
    }
    /// The SGL descriptor in DPTR (dwords 6..9).
    pub fn sgl(&self) -> [u8; 16] {
        let mut b = [0u8; 16];
        for i in 0..4 {
            b[i * 4..i * 4 + 4].copy_from_slice(&self.dw[6 + i].to_le_bytes());
        }
        b
    }
    pub fn cdw10(&self) -> u32 {
        self.dw[10]
    }
    pub fn cdw11(&self) -> u32 {
        self.dw[11]
    }
    pub fn cdw12(&self) -> u32 {
        self.dw[12]
    }
    pub fn cdw13(&self) -> u32 {
        self.dw[13]
    }
    /// Starting LBA of read/write-like commands (dwords 10..11).
    pub fn slba(&self) -> u64 {
        u64::from(self.dw[10]) | (u64::from(self.dw[11]) << 32)
    }
    /// Number of logical blocks (1-based) of read/write-like commands.
    pub fn nlb(&self) -> u64 {
        u64::from(self.dw[12] & 0xffff) + 1
    }
}

/// A completion queue entry.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Completion {
    pub dw0: u32,
    pub sqhd: u16,
    pub sqid: u16,
    pub cid: u16,
    pub status: u32,
}

/// Number of bits to shift for a memory page size of `4096 << mps`.
pub fn page_size(mps: u32) -> u64 {
    4096u64 << mps.min(15)
}

/// The low byte of `v`.
#[allow(clippy::cast_possible_truncation, reason = "masked to the target width first")]
pub const fn lo8(v: u32) -> u8 {
    (v & 0xff) as u8
}

/// The low 16 bits of `v`.
#[allow(clippy::cast_possible_truncation, reason = "masked to the target width first")]
pub const fn lo16(v: u32) -> u16 {
    (v & 0xffff) as u16
}

/// The high 16 bits of `v`.
#[allow(clippy::cast_possible_truncation, reason = "shifted to the target width first")]
pub const fn hi16(v: u32) -> u16 {
    (v >> 16) as u16
}

/// The low 32 bits of `v`.
#[allow(clippy::cast_possible_truncation, reason = "masked to the target width first")]
pub const fn lo32(v: u64) -> u32 {
    (v & 0xffff_ffff) as u32
}

/// The high 32 bits of `v`.
#[allow(clippy::cast_possible_truncation, reason = "shifted to the target width first")]
pub const fn hi32(v: u64) -> u32 {
    (v >> 32) as u32
}
