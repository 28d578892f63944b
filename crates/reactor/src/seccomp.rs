//! Optional seccomp filter for reactor threads (`vstor serve --seccomp`).
//!
//! Reactor threads run the code that touches guest-controlled data: ring walking, request
//! parsing, bdev I/O. With the filter on, each reactor thread, once set up, may only make the
//! system calls that work needs; anything else (execve, socket, ptrace, open of new files, ...)
//! kills the process. The control threads (RPC, vhost-user and vfio-user connections), which open
//! files, map memory tables and accept sockets, are not filtered.
//!
//! Built with rust-vmm's `seccompiler`; the list is x86_64's.

use std::collections::BTreeMap;

use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, TargetArch};

/// System calls a reactor thread makes after it started (found by running the whole test suite
/// under the filter and by reading the code paths: polling, eventfds, epoll, io_uring, memory
/// allocation, futexes, logging, thread exit).
const ALLOWED: &[libc::c_long] = &[
    // Memory (the allocator; userfaultfd waits happen inside page faults, not syscalls).
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_mprotect,
    libc::SYS_madvise,
    libc::SYS_brk,
    // Eventfds, timerfds, epoll, io_uring.
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_ctl,
    libc::SYS_timerfd_settime,
    libc::SYS_eventfd2,
    libc::SYS_io_uring_setup,
    libc::SYS_io_uring_enter,
    libc::SYS_io_uring_register,
    libc::SYS_fdatasync,
    libc::SYS_fsync,
    libc::SYS_fallocate,
    libc::SYS_fcntl,
    libc::SYS_fstat,
    libc::SYS_newfstatat,
    libc::SYS_statx,
    libc::SYS_lseek,
    libc::SYS_close,
    libc::SYS_dup,
    // Synchronisation, time, identity.
    libc::SYS_futex,
    libc::SYS_sched_yield,
    libc::SYS_nanosleep,
    libc::SYS_clock_nanosleep,
    libc::SYS_clock_gettime,
    libc::SYS_gettid,
    libc::SYS_getpid,
    libc::SYS_getrandom,
    libc::SYS_sched_getaffinity,
    // Signals and thread exit.
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigaction,
    libc::SYS_sigaltstack,
    libc::SYS_tgkill,
    libc::SYS_exit,
    libc::SYS_exit_group,
];

/// Compiles the filter.
pub fn filter() -> Result<BpfProgram, String> {
    let rules: BTreeMap<i64, Vec<seccompiler::SeccompRule>> = ALLOWED.iter().map(|&n| (n, Vec::new())).collect();
    let f = SeccompFilter::new(rules, SeccompAction::KillProcess, SeccompAction::Allow, TargetArch::x86_64)
        .map_err(|e| format!("seccomp filter: {e}"))?;
    f.try_into().map_err(|e: seccompiler::BackendError| format!("seccomp filter: {e}"))
}

/// Applies the filter to the calling thread only.
pub fn apply(prog: &BpfProgram) -> Result<(), String> {
    seccompiler::apply_filter(prog).map_err(|e| format!("seccomp: {e}"))
}
