//! userfaultfd for vhost-user postcopy migration (protocol feature PAGEFAULT).
//!
//! In postcopy, the destination VM runs before all of its memory has arrived. vstor registers its
//! mappings of guest memory with a userfaultfd and hands the fd to QEMU (POSTCOPY_ADVISE). When a
//! reactor (or the kernel, for io_uring) touches a page that has not arrived, the touching thread
//! sleeps in the kernel; QEMU reads the fault from the fd, fetches the page from the source,
//! places it in the shared memory and wakes the thread. Nothing in vstor reads the fd.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};

use crate::Region;

const UFFD_API: u64 = 0xAA;
/// `_IOWR(0xAA, 0x3F, struct uffdio_api)`.
const UFFDIO_API: libc::c_ulong = 0xc018_aa3f;
/// `_IOWR(0xAA, 0x00, struct uffdio_register)`.
const UFFDIO_REGISTER: libc::c_ulong = 0xc020_aa00;
/// `_IOR(0xAA, 0x01, struct uffdio_range)`.
const UFFDIO_UNREGISTER: libc::c_ulong = 0x8010_aa01;
const UFFDIO_REGISTER_MODE_MISSING: u64 = 1;

#[repr(C)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct UffdioRange {
    start: u64,
    len: u64,
}

#[repr(C)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

/// A userfaultfd with the API handshake done.
#[derive(Debug)]
pub struct Userfault {
    file: File,
}

impl Userfault {
    /// Opens a userfaultfd. Fails without CAP_SYS_PTRACE when `vm.unprivileged_userfaultfd` is 0.
    pub fn new() -> io::Result<Self> {
        // SAFETY: the userfaultfd syscall takes flags only and returns a new fd or -1.
        let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let fd = i32::try_from(fd).map_err(|_| io::Error::other("userfaultfd returned an fd out of range"))?;
        // SAFETY: `fd` was just returned by the kernel and is owned by nobody else.
        let file = unsafe { File::from_raw_fd(fd) };
        let mut api = UffdioApi { api: UFFD_API, features: 0, ioctls: 0 };
        // SAFETY: UFFDIO_API reads and writes one `uffdio_api`, which `api` is (repr(C)).
        if unsafe { libc::ioctl(file.as_raw_fd(), UFFDIO_API, &mut api) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Self { file })
    }

    /// Whether this process may use userfaultfd at all.
    pub fn available() -> bool {
        Self::new().is_ok()
    }

    /// A second handle on the same fd, to send to the frontend.
    pub fn try_clone_file(&self) -> io::Result<File> {
        self.file.try_clone()
    }

    /// Reports faults on missing pages of `region`'s whole mapping.
    pub fn register(&self, region: &Region) -> io::Result<()> {
        let range = region.page_range();
        // SAFETY: madvise on a mapping the region owns; it changes no contents (advice only).
        unsafe { libc::madvise(range.0 as *mut libc::c_void, range.1, libc::MADV_NOHUGEPAGE) };
        let mut reg = UffdioRegister {
            range: UffdioRange { start: range.0 as u64, len: range.1 as u64 },
            mode: UFFDIO_REGISTER_MODE_MISSING,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_REGISTER reads and writes one `uffdio_register` (repr(C)); the range is
        // a mapping owned by `region`.
        if unsafe { libc::ioctl(self.file.as_raw_fd(), UFFDIO_REGISTER, &mut reg) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Stops reporting faults for `region`.
    pub fn unregister(&self, region: &Region) -> io::Result<()> {
        let range = region.page_range();
        let mut r = UffdioRange { start: range.0 as u64, len: range.1 as u64 };
        // SAFETY: UFFDIO_UNREGISTER reads one `uffdio_range` (repr(C)).
        if unsafe { libc::ioctl(self.file.as_raw_fd(), UFFDIO_UNREGISTER, &mut r) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{memfd, GuestMemory, Region};

    /// What QEMU does for a shared-memory backend: a thread touching a missing page sleeps;
    /// the fault is read from the fd; the page is filled through another mapping of the same
    /// memfd and the thread is woken with UFFDIO_WAKE.
    #[test]
    fn missing_page_blocks_until_filled_and_woken() {
        let Ok(u) = Userfault::new() else {
            eprintln!("userfaultfd is not available here; skipping");
            return;
        };
        let f = memfd("uffd-test", 1 << 20).unwrap();
        let r = Region::map(&f, 0, 1 << 20, 0, 0).unwrap();
        let base = r.host() as u64;
        u.register(&r).unwrap();
        let mem = std::sync::Arc::new(GuestMemory::new(vec![r.clone()]).unwrap());
        let m = mem.clone();
        let reader = std::thread::spawn(move || {
            let mut b = [0u8; 5];
            m.read(2 * 4096 + 10, &mut b).unwrap();
            b
        });
        let mut pfd = libc::pollfd { fd: u.file.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: poll on one valid pollfd.
        let n = unsafe { libc::poll(&mut pfd, 1, 10_000) };
        assert_eq!(n, 1, "no fault reported for the missing page");
        let mut msg = [0u8; 32];
        // SAFETY: reads one 32-byte uffd_msg into `msg`.
        let got = unsafe { libc::read(u.file.as_raw_fd(), msg.as_mut_ptr().cast(), msg.len()) };
        assert_eq!(got, 32);
        assert_eq!(msg[0], 0x12, "UFFD_EVENT_PAGEFAULT");
        let addr = u64::from_ne_bytes(msg[16..24].try_into().unwrap());
        assert_eq!(addr & !4095, base + 2 * 4096);
        assert!(!reader.is_finished());
        // Fill the page through an unregistered mapping, then wake the sleeper.
        let other = GuestMemory::new(vec![Region::map(&f, 0, 1 << 20, 0, 0).unwrap()]).unwrap();
        other.write(2 * 4096 + 10, b"hello").unwrap();
        let mut range = UffdioRange { start: base + 2 * 4096, len: 4096 };
        // SAFETY: UFFDIO_WAKE (_IOR(0xAA, 0x02, struct uffdio_range)) reads one range.
        assert_eq!(unsafe { libc::ioctl(u.file.as_raw_fd(), 0x8010_aa02, &mut range) }, 0);
        assert_eq!(&reader.join().unwrap(), b"hello");
        u.unregister(&r).unwrap();
        // Once unregistered, missing pages are served normally.
        mem.write(100 * 4096, b"abc").unwrap();
    }
}
