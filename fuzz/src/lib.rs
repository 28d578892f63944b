//! Fuzz harnesses for vstor. Each fuzz target in `fuzz_targets/` is a one-line wrapper around a
//! function here, so the same harnesses run the committed seeds under `cargo test` (stable, no
//! libFuzzer needed) and the seed generator (`examples/gen_seeds.rs`) shares their input layouts.
//!
//! Every harness drives a crate's public API the way a guest or client reaches it: guest memory a
//! driver wrote, CDBs a SCSI initiator sent, NVMe submission entries, JSON-RPC bytes on the socket,
//! vhost-user messages on the socket. A harness panics only when vstor misbehaves (an iovec outside
//! guest memory, a command that never completes, ...); libFuzzer reports that panic as a crash.

pub mod bdevs;
pub mod blk;
pub mod guest;
pub mod nvme;
pub mod rpc;
pub mod scsi;
pub mod vfio_user;
pub mod vhost_user;
pub mod virtio;

/// Whether `VSTOR_FUZZ_TRACE` is set: harnesses then print what happened to each command (for
/// checking that seeds reach what they are meant to).
pub fn trace() -> bool {
    static T: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *T.get_or_init(|| std::env::var_os("VSTOR_FUZZ_TRACE").is_some())
}

/// A directory of this process under the temporary directory (`$TMPDIR`), removed at exit.
pub fn sandbox(what: &str) -> std::path::PathBuf {
    static DIRS: std::sync::Mutex<Vec<std::path::PathBuf>> = std::sync::Mutex::new(Vec::new());
    extern "C" fn remove_all() {
        for d in DIRS.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            let _ = std::fs::remove_dir_all(d);
        }
    }
    let dir = std::env::temp_dir().join(format!("vstor-fuzz-{what}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("sandbox directory");
    let mut dirs = DIRS.lock().unwrap_or_else(|e| e.into_inner());
    if dirs.is_empty() {
        // SAFETY: registers a function with no arguments that only touches a static; it runs at
        // normal process exit (libFuzzer's -max_total_time, the end of `cargo test`).
        unsafe { libc::atexit(remove_all) };
    }
    dirs.push(dir.clone());
    dir
}

/// Reads an input front to back; reads past the end give zeroes (so every input is usable).
#[derive(Debug, Clone)]
pub struct Reader<'a> {
    data: &'a [u8],
}

impl<'a> Reader<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Self { data }
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    pub fn len(&self) -> usize {
        self.data.len()
    }

    /// Up to `n` bytes (fewer at the end of the input).
    pub fn take(&mut self, n: usize) -> &'a [u8] {
        let n = n.min(self.data.len());
        let (a, b) = self.data.split_at(n);
        self.data = b;
        a
    }

    /// Everything left.
    pub fn rest(&mut self) -> &'a [u8] {
        self.take(self.data.len())
    }

    pub fn array<const N: usize>(&mut self) -> [u8; N] {
        let mut a = [0u8; N];
        let b = self.take(N);
        a[..b.len()].copy_from_slice(b);
        a
    }

    pub fn u8(&mut self) -> u8 {
        self.array::<1>()[0]
    }

    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.array())
    }

    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.array())
    }

    pub fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.array())
    }
}

/// Builds inputs in the layouts the harnesses read (for the seed generator and tests).
#[derive(Debug, Default, Clone)]
pub struct Writer(pub Vec<u8>);

impl Writer {
    pub fn u8(&mut self, v: u8) -> &mut Self {
        self.0.push(v);
        self
    }
    pub fn u16(&mut self, v: u16) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn bytes(&mut self, b: &[u8]) -> &mut Self {
        self.0.extend_from_slice(b);
        self
    }
}

/// Runs every seed of `target` (files under `seeds/<target>/`) through `f`. For tests.
pub fn run_seeds(target: &str, f: impl Fn(&[u8])) -> usize {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("seeds").join(target);
    let mut n = 0;
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("dir entry").path())
        .collect();
    files.sort();
    for p in files {
        let data = std::fs::read(&p).expect("seed");
        f(&data);
        n += 1;
    }
    n
}
