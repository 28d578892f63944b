//! Test helpers: start the real `vstor` binary and talk to it.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub mod frontend;
pub mod guest;
pub mod qmp;

use serde_json::{json, Value};

pub fn vstor_bin() -> &'static str {
    env!("CARGO_BIN_EXE_vstor")
}

/// A running daemon in its own temporary directory; killed on drop.
pub struct Daemon {
    pub child: Child,
    pub dir: tempfile::TempDir,
    pub sock: PathBuf,
    args: Vec<String>,
}

pub fn test_dir() -> tempfile::TempDir {
    let base = std::env::var("VSTOR_TEST_DIR").unwrap_or_else(|_| "/var/tmp".into());
    tempfile::Builder::new().prefix("vstor-test-").tempdir_in(base).expect("temp dir")
}

impl Daemon {
    pub fn start(extra: &[&str]) -> Daemon {
        Self::start_in(test_dir(), extra)
    }

    pub fn start_in(dir: tempfile::TempDir, extra: &[&str]) -> Daemon {
        let sock = dir.path().join("rpc.sock");
        let args: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        let child = Self::spawn(dir.path(), &sock, &args);
        let mut d = Daemon { child, dir, sock, args };
        d.wait_ready();
        d
    }

    fn spawn(dir: &Path, sock: &Path, args: &[String]) -> Child {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(dir.join("vstor.log")).unwrap();
        let mut cmd = Command::new(vstor_bin());
        cmd.arg("serve").arg("--rpc-socket").arg(sock).arg("-S").arg(dir).args(args);
        // VSTOR_TEST_SECCOMP=1 runs every daemon under --seccomp (to find syscalls the filter lacks).
        if std::env::var("VSTOR_TEST_SECCOMP").as_deref() == Ok("1") && !args.iter().any(|a| a == "--seccomp") {
            cmd.arg("--seccomp");
        }
        cmd.stdout(Stdio::null()).stderr(log);
        cmd.spawn().expect("spawn vstor")
    }

    /// `kill -9` the daemon and start it again with the same arguments (`extra` replaces them if
    /// given), in the same directory.
    pub fn kill_and_restart(&mut self, extra: Option<&[&str]>) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(e) = extra {
            self.args = e.iter().map(|s| s.to_string()).collect();
        }
        self.child = Self::spawn(self.dir.path(), &self.sock, &self.args);
        self.wait_ready();
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Some(st) = self.child.try_wait().unwrap() {
                panic!("vstor exited early ({st}): {}", self.log());
            }
            if UnixStream::connect(&self.sock).is_ok() && self.rpc("framework_wait_init", Value::Null).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("vstor did not open its RPC socket: {}", self.log());
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("vstor.log")).unwrap_or_default()
    }

    /// Waits until the log contains `needle`.
    pub fn wait_log(&self, needle: &str, within: Duration) -> bool {
        let deadline = std::time::Instant::now() + within;
        while !self.log().contains(needle) {
            if std::time::Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        true
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Calls a method; `Ok(result)` or `Err(error object)`.
    pub fn rpc(&self, method: &str, params: Value) -> Result<Value, Value> {
        rpc_at(&self.sock, method, params)
    }

    pub fn rpc_ok(&self, method: &str, params: Value) -> Value {
        self.rpc(method, params).unwrap_or_else(|e| panic!("{method} failed: {e}"))
    }

    /// Waits for the process to exit by itself.
    pub fn wait_exit(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Some(st) = self.child.try_wait().unwrap() {
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    pub fn signal(&self, sig: i32) {
        let pid = i32::try_from(self.child.id()).expect("pid fits in pid_t");
        // SAFETY: kill with a valid pid and signal number has no memory effects.
        unsafe { libc::kill(pid, sig) };
    }

    /// CPU time (user + system) of the daemon in clock ticks.
    pub fn cpu_ticks(&self) -> u64 {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).unwrap();
        let rest = &stat[stat.rfind(')').unwrap() + 2..];
        let f: Vec<&str> = rest.split_whitespace().collect();
        f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
    }

    pub fn fd_count(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid())).map(|d| d.count()).unwrap_or(0)
    }

    pub fn rss_kb(&self) -> u64 {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        s.lines()
            .find(|l| l.starts_with("VmRSS:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn rpc_at(sock: &Path, method: &str, params: Value) -> Result<Value, Value> {
    let mut s = UnixStream::connect(sock).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut req = json!({"jsonrpc": "2.0", "id": 7, "method": method});
    if !params.is_null() {
        req["params"] = params;
    }
    s.write_all(req.to_string().as_bytes()).unwrap();
    let resp = read_one(&mut s).expect("a response");
    assert_eq!(resp["id"], json!(7), "response id: {resp}");
    match resp.get("error") {
        Some(e) => Err(e.clone()),
        None => Ok(resp["result"].clone()),
    }
}

/// Reads one JSON value from the stream.
pub fn read_one(s: &mut UnixStream) -> Option<Value> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 65536];
    loop {
        if let Some(Ok(v)) = serde_json::Deserializer::from_slice(&buf).into_iter::<Value>().next() {
            return Some(v);
        }
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// `vstor rpc` as a process: (exit code, stdout, stderr).
pub fn vstor_rpc(sock: &Path, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(vstor_bin()).arg("rpc").arg("-s").arg(sock).args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

/// SPDK's client, if installed: from `SPDK_RPC`, else `spdk-rpc` on PATH. When
/// `VSTOR_REQUIRE_SPDK_RPC=1` (CI), a missing client fails the test instead of skipping it.
pub fn spdk_rpc() -> Option<PathBuf> {
    let found = std::env::var_os("SPDK_RPC").map(PathBuf::from).filter(|p| p.exists()).or_else(|| {
        std::env::var_os("PATH")
            .and_then(|paths| std::env::split_paths(&paths).map(|d| d.join("spdk-rpc")).find(|p| p.exists()))
    });
    if found.is_none() {
        assert!(
            std::env::var("VSTOR_REQUIRE_SPDK_RPC").as_deref() != Ok("1"),
            "spdk-rpc is required but not installed"
        );
        eprintln!("spdk-rpc not installed: skipping (set VSTOR_REQUIRE_SPDK_RPC=1 to make this an error)");
    }
    found
}

/// Runs `spdk-rpc -s SOCK args...`: (exit code, stdout, stderr).
pub fn run_spdk(spdk: &Path, sock: &Path, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(spdk).arg("-s").arg(sock).args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

/// A child process killed when dropped (peers such as qemu-storage-daemon, so a failing test does
/// not leave them running).
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
