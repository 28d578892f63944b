//! QEMU guests for tests: a Debian cloud kernel with a busybox initramfs carrying fio and the test
//! scripts of `tests/guest/scripts`, booted under TCG with vstor devices attached.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// One guest at a time per test binary: TCG guests are heavy on a 2-core machine.
pub static GUEST_LOCK: Mutex<()> = Mutex::new(());

fn kernel() -> Option<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir("/boot")
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("vmlinuz-") && n.contains("cloud"))
        })
        .collect();
    v.sort();
    v.pop()
}

/// Whether guests can run here. With `VSTOR_REQUIRE_GUEST=1` (CI) a missing QEMU or kernel fails
/// the test instead of skipping it.
pub fn available() -> bool {
    let qemu = Command::new("qemu-system-x86_64").arg("--version").output().is_ok_and(|o| o.status.success());
    let ok = qemu && kernel().is_some();
    if !ok {
        assert!(
            std::env::var("VSTOR_REQUIRE_GUEST").as_deref() != Ok("1"),
            "QEMU or the guest kernel is missing but VSTOR_REQUIRE_GUEST=1"
        );
        eprintln!(
            "QEMU or /boot/vmlinuz-*cloud* missing: skipping guest test (set VSTOR_REQUIRE_GUEST=1 to fail instead)"
        );
    }
    ok
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// Builds the initramfs once per test binary.
pub fn initramfs() -> PathBuf {
    static ONCE: OnceLock<PathBuf> = OnceLock::new();
    ONCE.get_or_init(|| {
        let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("vstor-guest.cpio");
        let st = Command::new(repo().join("tests/guest/mkinitramfs.sh")).arg(&out).status().expect("mkinitramfs.sh");
        assert!(st.success(), "building the guest initramfs failed");
        out
    })
    .clone()
}

/// How to run a guest.
pub struct GuestOpts {
    pub test: String,
    pub arg: String,
    pub smp: u32,
    pub mem_mb: u32,
    /// Boot with qboot (no firmware disk access) instead of SeaBIOS.
    pub qboot: bool,
    /// Let the guest reboot (otherwise `-no-reboot`).
    pub allow_reboot: bool,
    /// Device arguments (`-chardev ... -device ...`).
    pub devices: Vec<String>,
    pub timeout: Duration,
    pub extra: Vec<String>,
    /// Console file name (default: console-<test>.log).
    pub console: Option<String>,
}

impl GuestOpts {
    pub fn new(test: &str) -> Self {
        Self {
            test: test.into(),
            arg: String::new(),
            smp: 2,
            mem_mb: 1024,
            qboot: false,
            allow_reboot: false,
            devices: Vec::new(),
            timeout: Duration::from_secs(600),
            extra: Vec::new(),
            console: None,
        }
    }

    /// Adds a vhost-user-blk device on `sock`.
    pub fn blk(mut self, sock: &Path, opts: &str) -> Self {
        let id = format!("c{}", self.devices.len());
        self.devices.push("-chardev".into());
        self.devices.push(format!("socket,id={id},path={}", sock.display()));
        self.devices.push("-device".into());
        self.devices.push(format!("vhost-user-blk-pci,chardev={id}{opts}"));
        self
    }
}

/// What the guest printed.
pub struct GuestRun {
    pub console: String,
    /// (test name, exit code) for every `VSTOR-RESULT` line, in order.
    pub results: Vec<(String, i32)>,
    pub qemu_status: Option<i32>,
}

impl GuestRun {
    pub fn assert_ok(&self, runs: usize) {
        let ok = self.results.len() == runs && self.results.iter().all(|(_, rc)| *rc == 0);
        assert!(ok, "guest results {:?} (want {runs} x rc=0)\n--- console ---\n{}", self.results, self.tail(120));
    }

    pub fn tail(&self, lines: usize) -> String {
        let v: Vec<&str> = self.console.lines().collect();
        v[v.len().saturating_sub(lines)..].join("\n")
    }
}

/// A guest still running.
pub struct RunningGuest {
    child: std::process::Child,
    console: PathBuf,
    deadline: Instant,
}

impl RunningGuest {
    /// The console so far.
    pub fn console(&self) -> String {
        std::fs::read_to_string(&self.console).unwrap_or_default()
    }

    /// Waits until the console contains `needle` (or the guest exits / times out).
    pub fn wait_for(&mut self, needle: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.console().contains(needle) {
                return true;
            }
            if self.child.try_wait().ok().flatten().is_some() {
                return self.console().contains(needle);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }

    /// Whether QEMU has exited.
    pub fn exited(&mut self) -> bool {
        self.child.try_wait().ok().flatten().is_some()
    }

    /// Kills QEMU (after a migration, the paused source).
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits for the guest to power off and collects its results.
    pub fn finish(mut self) -> GuestRun {
        let status = loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                break st.code();
            }
            if Instant::now() > self.deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        collect(&self.console, status, &mut self.child)
    }
}

impl Drop for RunningGuest {
    /// A test that fails (panics) mid-way must not leave QEMU running.
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Boots a guest and returns at once.
pub fn spawn(o: &GuestOpts, workdir: &Path) -> RunningGuest {
    let console = workdir.join(o.console.clone().unwrap_or_else(|| format!("console-{}.log", o.test)));
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args(["-machine", "q35,accel=tcg", "-cpu", "max", "-nodefaults", "-display", "none"])
        .args(["-smp", &o.smp.to_string(), "-m", &format!("{}M", o.mem_mb)])
        .args(["-object", &format!("memory-backend-memfd,id=mem,size={}M,share=on", o.mem_mb)])
        .args(["-machine", "memory-backend=mem"])
        .args(["-kernel", kernel().unwrap().to_str().unwrap()])
        .args(["-initrd", initramfs().to_str().unwrap()])
        .args(["-append", &format!("console=ttyS0 panic=-1 vstor.test={} vstor.arg={}", o.test, o.arg)])
        .args(["-serial", &format!("file:{}", console.display())])
        .args(&o.devices)
        .args(&o.extra)
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    if o.qboot {
        cmd.args(["-bios", "/usr/share/qemu/qboot.rom"]);
    }
    if !o.allow_reboot {
        cmd.arg("-no-reboot");
    }
    let child = cmd.spawn().expect("start qemu");
    RunningGuest { child, console, deadline: Instant::now() + o.timeout }
}

/// Boots a guest and waits for it to power off (or the timeout).
pub fn run(o: &GuestOpts, workdir: &Path) -> GuestRun {
    spawn(o, workdir).finish()
}

fn collect(console: &Path, status: Option<i32>, child: &mut std::process::Child) -> GuestRun {
    let mut stderr = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = std::io::Read::read_to_string(&mut e, &mut stderr);
    }
    let mut text = std::fs::read_to_string(console).unwrap_or_default();
    if !stderr.is_empty() {
        text.push_str("\n--- qemu stderr ---\n");
        text.push_str(&stderr);
    }
    if status.is_none() {
        text.push_str("\n--- guest timed out ---\n");
    }
    let results = text
        .lines()
        .filter_map(|l| {
            let rest = l.trim().strip_prefix("VSTOR-RESULT ")?;
            let (name, rc) = rest.split_once(" rc=")?;
            Some((name.to_string(), rc.trim().parse().ok()?))
        })
        .collect();
    GuestRun { console: text, results, qemu_status: status }
}
