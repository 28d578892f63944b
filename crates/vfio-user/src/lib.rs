//! vfio-user for vstor: the NVMe controller of `vstor-nvme` served to VMMs over vfio-user, an
//! SPDK-style NVMe-oF target model on top of it, and an NVMe host library that talks to it.
//!
//! ```text
//!  RPC thread ──► NvmfManager ──(per listener)──► VfioUserEndpoint ──► NvmeController
//!                 transport, subsystems,            socket <traddr>/cntrl     │ pollers on
//!                 namespaces (bdev claims)          + connection thread       ▼ the reactors
//!  VMM / NvmeClient ──unix socket──► connection thread: VERSION, regions, DMA maps, IRQs
//!                  ◄──eventfds────── VfuIrqs (IrqSink) ◄── completions on reactors
//!                  ──mapped doorbells / shared DMA memory── (no socket on the data path)
//! ```
//!
//! # Threads and ownership
//!
//! - The **RPC thread** calls [`NvmfManager`]; each call takes the manager's mutex and does its
//!   control-plane work (controller creation, namespace attach/detach, listener stop) under it.
//!   It must not be one of the reactors: those calls wait for them.
//! - Each listener has a **connection thread** ([`server`]) owning the socket, the client's
//!   connection and its protocol state (DMA map table, negotiated capabilities). It calls the
//!   controller's transport methods (register accesses, `set_dma_memory`, `reset`, vector
//!   masks); one client at a time, a second is accepted and closed at once.
//! - The **reactors** run the controller's pollers (queues, bdev I/O). Interrupts reach the
//!   client through [`VfuIrqs`] (an eventfd write per MSI-X vector); doorbells arrive as trapped
//!   `REGION_WRITE`s, or as stores into the doorbell page when the client maps it.
//! - The controller is owned by its endpoint (`Arc`); the manager owns endpoints, namespaces
//!   (`Arc<Bdev>` with an exclusive claim per subsystem) and the transport settings.
//!
//! # Validation and `unsafe`
//!
//! The client side of a socket is untrusted. [`server`] checks framing, then every payload's
//! length before decoding its `#[repr(C)]` structure ([`proto::read_wire`], `read_unaligned`),
//! then every field; allocations are bounded ([`server::MAX_MSG_SIZE`],
//! [`server::MAX_MSG_FDS`], [`server::MAX_DMA_MAPS`], [`server::MAX_DATA_XFER`]); errors are
//! error replies, and framing errors close that connection only. `unsafe` lives in `proto`
//! (`read_unaligned` of plain-integer structures and their byte views), `sock` (`recvmsg`,
//! `sendmsg`, `poll`, eventfd writes, `fcntl`) and [`client`] (its memfd and doorbell mappings
//! and volatile accesses to them); guest memory mapping itself is `vstor_mem`'s.
//!
//! # Client library
//!
//! [`NvmeClient`] plays VMM and guest driver at once, through rust-vmm's `vfio_user::Client`,
//! for tests, `vstor perf --nvme-vfio-user` and debugging.
//!
//! # Limitations
//!
//! - Mappable doorbells need the controller's doorbell file laid out the vfio-user way (doorbells
//!   at file offset = their BAR offset 0x1000, as `vstor-nvme` does); a controller whose areas
//!   cannot be described that way is served with trapped doorbells (with a warning).
//! - DMA maps must come with a file descriptor (no `DMA_READ`/`DMA_WRITE` messages) and be 4 KiB
//!   aligned; maps that are not read-write are tracked but invisible to the controller.
//! - No migration, dirty page logging, twin socket, `REGION_WRITE_MULTI`,
//!   `DEVICE_GET_REGION_IO_FDS`, MSI, or mask/unmask eventfds; host NQN access control is not
//!   enforced (vfio-user has no host NQN).
//! - A client that shrinks a DMA file it shared after mapping can fault the process with SIGBUS
//!   unless the file is sealed (`vstor_mem` seals memfds that allow it, as QEMU's do).

pub mod client;
mod irq;
pub mod nvmf;
pub mod proto;
pub mod server;
mod sock;

pub use client::{ClientError, ClientOptions, Completion, NsInfo, NvmeClient, ResetKind};
pub use irq::VfuIrqs;
pub use nvmf::{
    ListenAddress, ListenerState, NsOpts, NvmfError, NvmfManager, SubsystemOpts, TransportOpts, DISCOVERY_NQN, TRTYPE,
};
pub use server::{EndpointError, VfioUserEndpoint};

#[cfg(test)]
mod tests;
