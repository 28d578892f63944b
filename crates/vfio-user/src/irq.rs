//! Interrupt delivery to the client: the [`IrqSink`] given to the NVMe controller, backed by the
//! eventfds the client passes with `VFIO_USER_DEVICE_SET_IRQS`.
//!
//! MSI-X: one slot per vector, each a mutex around the eventfd (the reactor writing an interrupt
//! and the connection thread replacing the descriptor never race on a closed or reused number).
//! A vector is *deliverable* when the client assigned an eventfd and did not mask it with a
//! `MASK` action; the connection thread mirrors that into the controller's per-vector mask
//! ([`NvmeController::set_msix_vector_masked`](vstor_nvme::NvmeController::set_msix_vector_masked)),
//! so interrupts raised while a vector is not deliverable become pending bits that the controller
//! replays on unmask. Clients such as QEMU virtualize the MSI-X table themselves and never forward
//! table writes, which is why the eventfd assignment, not the table, decides.
//!
//! INTx follows VFIO's level model: the trigger eventfd fires when the line rises while unmasked,
//! and the pin then masks itself (AUTOMASKED) until the client sends `UNMASK`; unmasking with the
//! line still asserted fires again.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Mutex, MutexGuard};

use vstor_nvme::IrqSink;

use crate::sock::eventfd_signal;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[derive(Default)]
struct Vector {
    fd: Option<OwnedFd>,
    /// Masked by the client's `MASK` action.
    masked: bool,
}

#[derive(Default)]
struct Intx {
    fd: Option<OwnedFd>,
    masked: bool,
    asserted: bool,
}

/// The eventfds of one controller's interrupts. Shared between the controller (as its
/// [`IrqSink`]) and the vfio-user connection thread.
pub struct VfuIrqs {
    msix: Box<[Mutex<Vector>]>,
    intx: Mutex<Intx>,
}

impl std::fmt::Debug for VfuIrqs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "VfuIrqs({} MSI-X vectors)", self.msix.len())
    }
}

impl IrqSink for VfuIrqs {
    fn msix(&self, vector: u16) {
        if let Some(slot) = self.msix.get(usize::from(vector)) {
            if let Some(fd) = lock(slot).fd.as_ref() {
                eventfd_signal(fd.as_fd());
            }
        }
    }

    fn intx(&self, asserted: bool) {
        let mut x = lock(&self.intx);
        x.asserted = asserted;
        if asserted && !x.masked {
            if let Some(fd) = x.fd.as_ref() {
                eventfd_signal(fd.as_fd());
                x.masked = true;
            }
        }
    }
}

impl VfuIrqs {
    /// Slots for `nvec` MSI-X vectors and the INTx pin, all without eventfds.
    pub fn new(nvec: u16) -> VfuIrqs {
        VfuIrqs { msix: (0..nvec).map(|_| Mutex::new(Vector::default())).collect(), intx: Mutex::new(Intx::default()) }
    }

    /// Number of MSI-X vectors.
    pub fn nvec(&self) -> u16 {
        u16::try_from(self.msix.len()).unwrap_or(u16::MAX)
    }

    /// Whether vector `v` has an eventfd and is not masked by the client.
    pub(crate) fn msix_deliverable(&self, v: u16) -> bool {
        self.msix.get(usize::from(v)).is_some_and(|s| {
            let s = lock(s);
            s.fd.is_some() && !s.masked
        })
    }

    /// Assigns (or with `None`, de-assigns) vector `v`'s eventfd.
    pub(crate) fn set_msix_fd(&self, v: u16, fd: Option<OwnedFd>) {
        if let Some(s) = self.msix.get(usize::from(v)) {
            lock(s).fd = fd;
        }
    }

    pub(crate) fn set_msix_masked(&self, v: u16, masked: bool) {
        if let Some(s) = self.msix.get(usize::from(v)) {
            lock(s).masked = masked;
        }
    }

    /// Fires vector `v`'s eventfd, if it has one (a client-requested trigger).
    pub(crate) fn trigger_msix(&self, v: u16) {
        self.msix(v);
    }

    pub(crate) fn set_intx_fd(&self, fd: Option<OwnedFd>) {
        let mut x = lock(&self.intx);
        x.fd = fd;
        x.masked = false;
    }

    /// Masks or unmasks the INTx pin; unmasking while the line is asserted fires again.
    pub(crate) fn set_intx_masked(&self, masked: bool) {
        let mut x = lock(&self.intx);
        x.masked = masked;
        if !masked && x.asserted {
            if let Some(fd) = x.fd.as_ref() {
                eventfd_signal(fd.as_fd());
                x.masked = true;
            }
        }
    }

    /// Fires the INTx eventfd, if any (a client-requested trigger).
    pub(crate) fn trigger_intx(&self) {
        if let Some(fd) = lock(&self.intx).fd.as_ref() {
            eventfd_signal(fd.as_fd());
        }
    }

    /// Drops every eventfd and mask (the client went away).
    pub(crate) fn clear(&self) {
        for s in self.msix.iter() {
            *lock(s) = Vector::default();
        }
        let mut x = lock(&self.intx);
        x.fd = None;
        x.masked = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;
    use vmm_sys_util::eventfd::EventFd;

    fn dup(e: &EventFd) -> OwnedFd {
        use std::os::fd::{FromRawFd, IntoRawFd};
        // SAFETY: `into_raw_fd` hands over a fresh descriptor (the clone) that nobody else owns.
        unsafe { OwnedFd::from_raw_fd(e.try_clone().unwrap().into_raw_fd()) }
    }

    #[test]
    fn vectors_fire_their_eventfd_and_intx_automasks() {
        let irqs = VfuIrqs::new(4);
        let e = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        irqs.msix(1); // no eventfd: dropped
        irqs.set_msix_fd(1, Some(dup(&e)));
        assert!(irqs.msix_deliverable(1));
        irqs.msix(1);
        irqs.msix(9); // out of range: ignored
        assert_eq!(e.read().unwrap(), 1);
        irqs.set_msix_masked(1, true);
        assert!(!irqs.msix_deliverable(1));

        let x = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        irqs.set_intx_fd(Some(dup(&x)));
        irqs.intx(true);
        assert_eq!(x.read().unwrap(), 1);
        irqs.intx(false);
        irqs.intx(true);
        assert!(x.read().is_err(), "automasked until the client unmasks");
        irqs.set_intx_masked(false);
        assert_eq!(x.read().unwrap(), 1, "unmasking an asserted line fires again");
        irqs.clear();
        irqs.intx(true);
        assert!(x.read().is_err());
        assert!(x.as_raw_fd() >= 0);
    }
}
