//! Controller tests over a fake transport: `driver` plays the NVMe host driver against guest
//! memory in a memfd, the registers through `bar_read`/`bar_write`, and counts interrupts.
#![allow(clippy::cast_possible_truncation, clippy::cast_sign_loss, clippy::cast_possible_wrap)]

mod admin;
mod driver;
mod io;
mod pci;
