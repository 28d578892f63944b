//! Surviving a VMM that truncates the file behind guest memory.
//!
//! vstor maps files the VMM hands over (memfds, tmpfs or hugetlbfs files). It asks the kernel to
//! seal them against shrinking, but a file that does not allow sealing can still be truncated by
//! the VMM, and the next access to a page past the new end raises SIGBUS — by default killing
//! vstor and every VM it serves. vstor installs a SIGBUS handler: a fault inside a registered
//! guest mapping gets a private zero page mapped over the lost page (the access then completes;
//! the data was gone anyway) and is reported by a logging thread; any other SIGBUS gets the default
//! action (the faulting access repeats and the process dies as it would have).
//!
//! The registry is a fixed array of atomics so the handler reads it without locks or allocation.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Once;

const SLOTS: usize = 4096;
/// `end` of a slot being filled in (not yet matchable).
const CLAIMED: usize = usize::MAX;

struct Slot {
    start: AtomicUsize,
    /// 0: free; CLAIMED: being set up; else the end of the mapping.
    end: AtomicUsize,
    lost: AtomicBool,
}

#[allow(clippy::declare_interior_mutable_const)] // used only to initialise the static array
const FREE: Slot = Slot { start: AtomicUsize::new(0), end: AtomicUsize::new(0), lost: AtomicBool::new(false) };
static SLOTS_TABLE: [Slot; SLOTS] = [FREE; SLOTS];
static LOST_PAGES: AtomicU64 = AtomicU64::new(0);
/// Write end of the pipe the handler pokes so the reporter thread logs (-1 until installed).
static REPORT_FD: AtomicUsize = AtomicUsize::new(usize::MAX);
static INSTALL: Once = Once::new();

/// Pages replaced by zero pages since start.
pub fn lost_pages() -> u64 {
    LOST_PAGES.load(Ordering::Relaxed)
}

/// A registered mapping; unregisters on drop.
#[derive(Debug)]
pub(crate) struct Registration(Option<usize>);

impl Registration {
    /// Whether a page of this mapping was lost (the file was truncated under it).
    pub fn lost(&self) -> bool {
        self.0.is_some_and(|i| SLOTS_TABLE[i].lost.load(Ordering::Relaxed))
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let Some(i) = self.0 {
            let s = &SLOTS_TABLE[i];
            s.lost.store(false, Ordering::Relaxed);
            s.start.store(0, Ordering::Relaxed);
            s.end.store(0, Ordering::Release);
        }
    }
}

/// Registers `[start, start + len)`. With every slot taken the mapping is simply not protected.
pub(crate) fn register(start: usize, len: usize) -> Registration {
    INSTALL.call_once(install);
    let Some(end) = start.checked_add(len) else { return Registration(None) };
    for (i, s) in SLOTS_TABLE.iter().enumerate() {
        if s.end.compare_exchange(0, CLAIMED, Ordering::Acquire, Ordering::Relaxed).is_ok() {
            s.start.store(start, Ordering::Relaxed);
            s.lost.store(false, Ordering::Relaxed);
            s.end.store(end, Ordering::Release);
            return Registration(Some(i));
        }
    }
    Registration(None)
}

fn install() {
    let mut fds = [0i32; 2];
    // SAFETY: pipe2 writes two fds into the array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } == 0 {
        let (r, w) = (fds[0], fds[1]);
        REPORT_FD.store(usize::try_from(w).unwrap_or(usize::MAX), Ordering::Relaxed);
        let _ = std::thread::Builder::new().name("sigbus-report".into()).spawn(move || report(r));
    }
    // SAFETY: a zeroed sigaction is valid; we fill the handler, flags and an empty mask.
    let mut sa: libc::sigaction = unsafe { std::mem::zeroed() };
    sa.sa_sigaction = handler as *const () as usize;
    sa.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
    // SAFETY: `sa.sa_mask` is a valid sigset_t to empty; sigaction installs a handler that only
    // uses async-signal-safe operations (atomics, mmap, write, sigaction).
    unsafe {
        libc::sigemptyset(&mut sa.sa_mask);
        libc::sigaction(libc::SIGBUS, &sa, std::ptr::null_mut());
    }
}

extern "C" fn handler(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for SA_SIGINFO handlers; si_addr is the fault.
    let addr = unsafe { (*info).si_addr() } as usize;
    let page = addr & !4095;
    for s in SLOTS_TABLE.iter() {
        let end = s.end.load(Ordering::Acquire);
        if end == 0 || end == CLAIMED {
            continue;
        }
        let start = s.start.load(Ordering::Relaxed);
        if addr >= start && addr < end {
            // SAFETY: replaces one page inside a mapping vstor owns (it is registered, so not yet
            // unmapped) with private anonymous memory; nothing else lives at that address.
            let p = unsafe {
                libc::mmap(
                    page as *mut libc::c_void,
                    4096,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_FIXED | libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
            if p != libc::MAP_FAILED {
                s.lost.store(true, Ordering::Relaxed);
                LOST_PAGES.fetch_add(1, Ordering::Relaxed);
                let w = REPORT_FD.load(Ordering::Relaxed);
                if let Ok(w) = i32::try_from(w) {
                    let b = 1u8;
                    // SAFETY: write(2) of one byte from a valid buffer; async-signal-safe.
                    let _ = unsafe { libc::write(w, (&b as *const u8).cast(), 1) };
                }
                return;
            }
            break;
        }
    }
    // Not ours (or the page could not be replaced): default action; the access faults again and
    // the process dies as it would have without this handler.
    // SAFETY: restoring SIG_DFL with a zeroed sigaction is async-signal-safe.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = libc::SIG_DFL;
        libc::sigaction(libc::SIGBUS, &sa, std::ptr::null_mut());
    }
}

/// Logs lost pages, at most once a second.
fn report(r: i32) {
    let mut buf = [0u8; 64];
    let mut logged = 0;
    loop {
        // SAFETY: read(2) into a local buffer from the pipe this thread owns.
        let n = unsafe { libc::read(r, buf.as_mut_ptr().cast(), buf.len()) };
        if n <= 0 {
            return;
        }
        let now = lost_pages();
        if now != logged {
            tracing::error!(
                lost_pages = now,
                "a VMM truncated the file behind guest memory: the lost pages now read as zeroes (the guest's data there is gone)"
            );
            logged = now;
        }
        std::thread::sleep(std::time::Duration::from_secs(1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncated_file_pages_read_as_zeroes_instead_of_killing_the_process() {
        // SAFETY: memfd_create with a NUL-terminated name, without sealing.
        let fd = unsafe { libc::memfd_create(c"sigbus-test".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: `fd` is new and owned by nobody else.
        let f = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        f.set_len(1 << 20).unwrap();
        let r = crate::Region::map(&f, 0, 1 << 20, 0, 0).unwrap();
        let mem = crate::GuestMemory::new(vec![r]).unwrap();
        mem.write(8192, b"hello").unwrap();
        let before = lost_pages();
        f.set_len(4096).unwrap();
        let mut b = [7u8; 5];
        mem.read(8192, &mut b).unwrap();
        assert_eq!(b, [0; 5], "the lost page reads as zeroes");
        mem.write(8192, b"again").unwrap();
        mem.read(8192, &mut b).unwrap();
        assert_eq!(&b, b"again", "and is private memory from now on");
        assert!(lost_pages() > before);
        assert!(mem.regions()[0].lost());
    }
}
