//! Transport-free NVMe controller emulation (placeholder: being written).
