//! Transport-free SCSI target emulation (placeholder: being written).
