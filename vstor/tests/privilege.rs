//! Least privilege: vstor runs as an unprivileged user (here `nobody`, uid 65534) and still serves
//! a file-backed disk; its sockets get the modes the operator asked for, so another local user
//! cannot attach to a controller or drive the RPC socket.
#![allow(clippy::cast_possible_truncation)]

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;
use vstor::blkclient::{BlkClient, ClientOptions};

const NOBODY: u32 = 65534;

/// Runs `python3 -c` as uid/gid `uid`: whether a connect to `path` succeeded.
fn can_connect_as(uid: u32, path: &std::path::Path) -> bool {
    let code = format!(
        "import socket,sys\ns=socket.socket(socket.AF_UNIX)\ntry:\n s.connect({:?})\nexcept OSError as e:\n sys.exit(1)\n",
        path.to_str().unwrap()
    );
    let st = Command::new("setpriv")
        .args([
            "--reuid",
            &uid.to_string(),
            "--regid",
            &uid.to_string(),
            "--clear-groups",
            "--",
            "/usr/bin/python3",
            "-c",
            &code,
        ])
        .status()
        .unwrap();
    st.success()
}

#[test]
fn runs_as_an_unprivileged_user_and_its_sockets_keep_other_users_out() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 || Command::new("setpriv").arg("--help").output().is_err() {
        eprintln!("needs root (to drop to nobody) and setpriv; skipping");
        return;
    }
    let dir = test_dir();
    let d = dir.path();
    let img = d.join("disk.img");
    std::fs::File::create(&img).unwrap().set_len(16 << 20).unwrap();
    for p in [d, img.as_path()] {
        std::os::unix::fs::chown(p, Some(NOBODY), Some(NOBODY)).unwrap();
    }
    std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).unwrap();
    // A copy of the binary, so `nobody` can run it wherever the checkout lives (e.g. under /root).
    let bin = d.join("vstor");
    std::fs::copy(vstor_bin(), &bin).unwrap();
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    let sock = d.join("rpc.sock");
    let log = std::fs::File::create(d.join("vstor.log")).unwrap();
    let mut child = Command::new("setpriv")
        .args(["--reuid", "65534", "--regid", "65534", "--clear-groups", "--"])
        .arg(&bin)
        .arg("serve")
        .arg("--rpc-socket")
        .arg(&sock)
        .arg("-S")
        .arg(d)
        .args(["--cpumask", "0x1"])
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while UnixStream::connect(&sock).is_err() {
        assert!(
            child.try_wait().unwrap().is_none(),
            "vstor exited: {}",
            std::fs::read_to_string(d.join("vstor.log")).unwrap()
        );
        assert!(Instant::now() < deadline, "no RPC socket");
        std::thread::sleep(Duration::from_millis(20));
    }
    let status = std::fs::read_to_string(format!("/proc/{}/status", child.id())).unwrap();
    let uid_line = status.lines().find(|l| l.starts_with("Uid:")).unwrap().to_string();
    assert!(uid_line.split_whitespace().skip(1).all(|u| u == "65534"), "{uid_line}");

    rpc_at(&sock, "bdev_uring_create", json!({"name": "U0", "filename": img.to_str().unwrap()})).unwrap();
    rpc_at(&sock, "vhost_create_blk_controller", json!({"ctrlr": "vb", "dev_name": "U0"})).unwrap();
    let vsock = d.join("vb");
    let (m, r) = (std::fs::metadata(&vsock).unwrap(), std::fs::metadata(&sock).unwrap());
    assert_eq!((m.uid(), m.mode() & 0o777), (NOBODY, 0o660), "controller socket: owner and default mode");
    assert_eq!((r.uid(), r.mode() & 0o777), (NOBODY, 0o600), "RPC socket: owner and default mode");
    assert!(!can_connect_as(4242, &vsock), "another user must not attach to the controller");
    assert!(!can_connect_as(4242, &sock), "another user must not drive the RPC socket");
    assert!(can_connect_as(NOBODY, &vsock), "the owner can");

    // A guest (libblkio, as root here) gets a working disk from the unprivileged daemon.
    let path = vsock.to_string_lossy().into_owned();
    let mut c = BlkClient::connect(&ClientOptions { path, ..Default::default() }).unwrap();
    c.buf()[..4096].fill(0x3c);
    assert_eq!(c.sync(0, |c| c.write(0, 8192, 0, 4096, 1)).unwrap(), 0);
    assert_eq!(c.sync(0, |c| c.flush(0, 2)).unwrap(), 0);
    c.buf()[..4096].fill(0);
    assert_eq!(c.sync(0, |c| c.read(0, 8192, 0, 4096, 3)).unwrap(), 0);
    assert!(c.buf()[..4096].iter().all(|&b| b == 0x3c));
    drop(c);
    let on_disk = std::fs::read(&img).unwrap();
    assert!(on_disk[8192..12288].iter().all(|&b| b == 0x3c), "the write reached the file");
    // SAFETY: kill on our own child's pid.
    unsafe { libc::kill(i32::try_from(child.id()).unwrap(), libc::SIGTERM) };
    let st = child.wait().unwrap();
    assert!(st.success(), "clean exit on SIGTERM: {st}");
}
