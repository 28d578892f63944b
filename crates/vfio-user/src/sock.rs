//! OS plumbing: `recvmsg`/`sendmsg` with `SCM_RIGHTS`, `poll`, eventfds. Every `unsafe` block of
//! the server side lives here (plus [`crate::proto::read_wire`]).

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

/// Receives into `buf` (one `recvmsg`), appending received descriptors to `fds`. Room is made for
/// `max_fds` descriptors; the kernel closes any beyond that and reports it as truncation (the
/// returned flag). Received descriptors are close-on-exec. `EINTR` is retried.
pub(crate) fn recv_with_fds(
    fd: RawFd,
    buf: &mut [u8],
    fds: &mut Vec<OwnedFd>,
    max_fds: usize,
) -> io::Result<(usize, bool)> {
    let fd_bytes = u32::try_from(max_fds.max(1) * std::mem::size_of::<libc::c_int>())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: CMSG_SPACE is a pure size computation.
    let space = unsafe { libc::CMSG_SPACE(fd_bytes) } as usize;
    // u64 elements keep the control buffer aligned for `cmsghdr`.
    let mut control = vec![0u64; space.div_ceil(8)];
    loop {
        let mut iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
        // SAFETY: an all-zero msghdr is a valid (empty) value.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = space;
        // SAFETY: `msg` points at `iov` (describing `buf`) and `control` (of `space` bytes), all
        // of which outlive the call; the kernel writes at most those lengths.
        let n = unsafe { libc::recvmsg(fd, &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        let truncated = msg.msg_flags & libc::MSG_CTRUNC != 0;
        // SAFETY: `msg` was filled by a successful recvmsg; CMSG_FIRSTHDR/NXTHDR stay inside
        // `msg_control`/`msg_controllen` by construction.
        let mut cmsg = unsafe { libc::CMSG_FIRSTHDR(&msg) };
        while !cmsg.is_null() {
            // SAFETY: `cmsg` is non-null and points at a header inside the control buffer.
            let hdr = unsafe { std::ptr::read_unaligned(cmsg) };
            if hdr.cmsg_level == libc::SOL_SOCKET && hdr.cmsg_type == libc::SCM_RIGHTS {
                // SAFETY: CMSG_LEN is a pure size computation.
                let data_len = hdr.cmsg_len.saturating_sub(unsafe { libc::CMSG_LEN(0) } as usize);
                let count = data_len / std::mem::size_of::<libc::c_int>();
                // SAFETY: CMSG_DATA points just past the header, inside the control buffer.
                let data = unsafe { libc::CMSG_DATA(cmsg) };
                for i in 0..count {
                    // SAFETY: `i < count` ints lie within `cmsg_len`, which the kernel bounded
                    // by the control buffer; the read is unaligned-safe.
                    let raw = unsafe {
                        std::ptr::read_unaligned(data.add(i * std::mem::size_of::<libc::c_int>()).cast::<libc::c_int>())
                    };
                    if raw >= 0 {
                        // SAFETY: SCM_RIGHTS installed `raw` as a new descriptor owned by us.
                        fds.push(unsafe { OwnedFd::from_raw_fd(raw) });
                    }
                }
            }
            // SAFETY: as for CMSG_FIRSTHDR.
            cmsg = unsafe { libc::CMSG_NXTHDR(&msg, cmsg) };
        }
        let n = usize::try_from(n).unwrap_or(0);
        return Ok((n, truncated));
    }
}

/// Size of one descriptor in `SCM_RIGHTS` data.
const FD_SIZE: u32 = 4;
const _: () = assert!(std::mem::size_of::<libc::c_int>() == FD_SIZE as usize);

/// Sends `parts` as one message (one `sendmsg` unless the socket takes it in pieces), with `fd`
/// attached to the first byte. No SIGPIPE. `EINTR` is retried.
pub(crate) fn send_with_fd(sock: RawFd, parts: &[&[u8]], fd: Option<RawFd>) -> io::Result<()> {
    let total: usize = parts.iter().map(|p| p.len()).sum();
    let mut sent = 0usize;
    let mut fd = fd;
    // SAFETY: CMSG_SPACE is a pure size computation.
    let space = unsafe { libc::CMSG_SPACE(FD_SIZE) } as usize;
    let mut control = vec![0u64; space.div_ceil(8)];
    while sent < total || (total == 0 && fd.is_some()) {
        // iovecs for the unsent remainder.
        let mut iovs = Vec::with_capacity(parts.len());
        let mut skip = sent;
        for p in parts {
            if skip >= p.len() {
                skip -= p.len();
                continue;
            }
            let rest = &p[skip..];
            skip = 0;
            iovs.push(libc::iovec { iov_base: rest.as_ptr().cast_mut().cast(), iov_len: rest.len() });
        }
        // SAFETY: an all-zero msghdr is a valid (empty) value.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = iovs.as_mut_ptr();
        msg.msg_iovlen = iovs.len();
        if let Some(f) = fd {
            msg.msg_control = control.as_mut_ptr().cast();
            msg.msg_controllen = space;
            // SAFETY: the control buffer holds CMSG_SPACE(sizeof(int)) bytes, enough for one
            // header and one descriptor; CMSG_FIRSTHDR is non-null for such a buffer.
            unsafe {
                let cmsg = libc::CMSG_FIRSTHDR(&msg);
                (*cmsg).cmsg_level = libc::SOL_SOCKET;
                (*cmsg).cmsg_type = libc::SCM_RIGHTS;
                (*cmsg).cmsg_len = libc::CMSG_LEN(FD_SIZE) as usize;
                std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<libc::c_int>(), f);
            }
        }
        // SAFETY: `msg` points at `iovs` (slices of `parts`) and `control`, alive for the call;
        // the kernel only reads them.
        let n = unsafe { libc::sendmsg(sock, &msg, libc::MSG_NOSIGNAL) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        fd = None;
        sent += usize::try_from(n).unwrap_or(0);
        if total == 0 {
            break;
        }
    }
    Ok(())
}

/// Waits until one of `fds` is readable (or hung up / in error). Returns a flag per descriptor;
/// all false on timeout. `EINTR` is retried (with the full timeout again).
pub(crate) fn poll_readable(fds: &[RawFd], timeout: Option<Duration>) -> io::Result<Vec<bool>> {
    let mut pfds: Vec<libc::pollfd> =
        fds.iter().map(|&fd| libc::pollfd { fd, events: libc::POLLIN, revents: 0 }).collect();
    let ms = match timeout {
        None => -1,
        Some(t) => libc::c_int::try_from(t.as_millis()).unwrap_or(libc::c_int::MAX),
    };
    let nfds = libc::nfds_t::try_from(pfds.len()).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    loop {
        // SAFETY: `pfds` is a valid array of `nfds` pollfd structures for the duration of the call.
        let r = unsafe { libc::poll(pfds.as_mut_ptr(), nfds, ms) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        return Ok(pfds.iter().map(|p| p.revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0).collect());
    }
}

/// Adds 1 to an eventfd's counter. Returns false if the write failed (a full counter on a
/// non-blocking eventfd, or a descriptor that is not writable).
pub(crate) fn eventfd_signal(fd: BorrowedFd<'_>) -> bool {
    let one: u64 = 1;
    // SAFETY: writes 8 bytes from a live local to a descriptor we own.
    let n = unsafe { libc::write(fd.as_raw_fd(), (&one as *const u64).cast(), 8) };
    n == 8
}

/// Whether `fd` is an eventfd (interrupt descriptors must be: anything else could block or have
/// side effects when the data path writes to it).
pub(crate) fn is_eventfd(fd: BorrowedFd<'_>) -> bool {
    std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
        .map(|p| p.as_os_str() == "anon_inode:[eventfd]")
        .unwrap_or(false)
}

/// Sets `O_NONBLOCK` on a descriptor's open file description.
pub(crate) fn set_nonblocking(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: fcntl F_GETFL on a valid descriptor has no memory effects.
    let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    if flags & libc::O_NONBLOCK != 0 {
        return Ok(());
    }
    // SAFETY: fcntl F_SETFL with an integer argument on a valid descriptor.
    if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;
    use vmm_sys_util::eventfd::EventFd;

    #[test]
    fn descriptors_travel_with_data_and_excess_ones_are_reported() {
        let (a, b) = UnixStream::pair().unwrap();
        let e = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        send_with_fd(a.as_raw_fd(), &[b"hello", b" world"], Some(e.as_raw_fd())).unwrap();
        let mut buf = [0u8; 64];
        let mut fds = Vec::new();
        let (n, trunc) = recv_with_fds(b.as_raw_fd(), &mut buf, &mut fds, 4).unwrap();
        assert_eq!((&buf[..n], trunc, fds.len()), (&b"hello world"[..], false, 1));
        assert!(is_eventfd(std::os::fd::AsFd::as_fd(&fds[0])));
        assert!(eventfd_signal(std::os::fd::AsFd::as_fd(&fds[0])));
        assert_eq!(e.read().unwrap(), 1);
        assert!(!is_eventfd(std::os::fd::AsFd::as_fd(&a)));
        // Readiness.
        assert_eq!(poll_readable(&[b.as_raw_fd()], Some(Duration::from_millis(1))).unwrap(), vec![false]);
        send_with_fd(a.as_raw_fd(), &[b"x"], None).unwrap();
        assert_eq!(poll_readable(&[b.as_raw_fd()], Some(Duration::from_millis(100))).unwrap(), vec![true]);
        let (n, _) = recv_with_fds(b.as_raw_fd(), &mut buf, &mut fds, 4).unwrap();
        assert_eq!(n, 1);
        // Three descriptors where room was made for one: the rest are closed and reported.
        use vmm_sys_util::sock_ctrl_msg::ScmSocket;
        let (e1, e2, e3) = (EventFd::new(0).unwrap(), EventFd::new(0).unwrap(), EventFd::new(0).unwrap());
        a.send_with_fds(&[&b"y"[..]], &[e1.as_raw_fd(), e2.as_raw_fd(), e3.as_raw_fd()]).unwrap();
        let mut fds = Vec::new();
        let (n, trunc) = recv_with_fds(b.as_raw_fd(), &mut buf, &mut fds, 1).unwrap();
        // CMSG_SPACE rounds up: room for one may hold two; never three.
        assert!(n == 1 && trunc && (1..=2).contains(&fds.len()), "{n} {trunc} {}", fds.len());
    }
}
