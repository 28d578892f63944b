//! A vhost-user-blk client built on libblkio's Rust crate (`blkio`, driver
//! `virtio-blk-vhost-user`): the load generator of `vstor perf --vhost-user` and the client of the
//! integration tests. It is an independent implementation of the driver side, so it checks vstor's
//! device side rather than mirroring it.

use std::mem::MaybeUninit;
use std::time::Duration;

use blkio::{Blkio, Blkioq, Completion, MemoryRegion, ReqFlags};

/// How to connect.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    pub path: String,
    pub num_queues: i32,
    pub queue_size: i32,
    pub read_only: bool,
    /// Bytes of shared memory for I/O buffers.
    pub buf_size: usize,
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self { path: String::new(), num_queues: 1, queue_size: 256, read_only: false, buf_size: 16 << 20 }
    }
}

/// A connected client with its queues and one buffer region.
pub struct BlkClient {
    pub queues: Vec<Blkioq>,
    region: MemoryRegion,
    /// Device size in bytes.
    pub capacity: u64,
    // Dropped last: the queues and region belong to this instance.
    b: Blkio,
}

fn e(what: &str, err: blkio::Error) -> String {
    format!("{what}: {} ({:?})", err.message(), err.errno())
}

impl BlkClient {
    pub fn connect(o: &ClientOptions) -> Result<Self, String> {
        let mut b = Blkio::new("virtio-blk-vhost-user").map_err(|x| e("new", x))?;
        b.set_str("path", &o.path).map_err(|x| e("path", x))?;
        b.set_bool("read-only", o.read_only).map_err(|x| e("read-only", x))?;
        b.connect().map_err(|x| e("connect", x))?;
        b.set_i32("num-queues", o.num_queues).map_err(|x| e("num-queues", x))?;
        b.set_i32("queue-size", o.queue_size).map_err(|x| e("queue-size", x))?;
        let started = b.start().map_err(|x| e("start", x))?;
        let align = usize::try_from(b.get_u64("mem-region-alignment").map_err(|x| e("alignment", x))?).unwrap_or(4096);
        let len = o.buf_size.div_ceil(align) * align;
        let region = b.alloc_mem_region(len).map_err(|x| e("alloc_mem_region", x))?;
        b.map_mem_region(&region).map_err(|x| e("map_mem_region", x))?;
        let capacity = b.get_u64("capacity").map_err(|x| e("capacity", x))?;
        Ok(Self { queues: started.queues, region, capacity, b })
    }

    /// A driver property (e.g. "max-queues", "request-alignment").
    pub fn get_i32(&self, name: &str) -> Result<i32, String> {
        self.b.get_i32(name).map_err(|x| e(name, x))
    }

    /// The shared buffer.
    pub fn buf(&mut self) -> &mut [u8] {
        // SAFETY: the region is `len` bytes mapped read-write by blkio for this instance's
        // lifetime; `&mut self` makes this the only reference the client hands out. The device
        // writes into it only for reads this client submitted and waits for.
        unsafe { std::slice::from_raw_parts_mut(self.region.addr as *mut u8, self.region.len) }
    }

    fn ptr(&self, off: usize, len: usize) -> *mut u8 {
        assert!(off + len <= self.region.len, "buffer range outside the region");
        (self.region.addr + off) as *mut u8
    }

    pub fn read(&mut self, q: usize, offset: u64, buf_off: usize, len: usize, tag: usize) {
        let p = self.ptr(buf_off, len);
        self.queues[q].read(offset, p, len, tag, ReqFlags::empty());
    }

    pub fn write(&mut self, q: usize, offset: u64, buf_off: usize, len: usize, tag: usize) {
        let p = self.ptr(buf_off, len);
        self.queues[q].write(offset, p, len, tag, ReqFlags::empty());
    }

    pub fn discard(&mut self, q: usize, offset: u64, len: u64, tag: usize) {
        self.queues[q].discard(offset, len, tag, ReqFlags::empty());
    }

    pub fn write_zeroes(&mut self, q: usize, offset: u64, len: u64, tag: usize) {
        self.queues[q].write_zeroes(offset, len, tag, ReqFlags::empty());
    }

    pub fn flush(&mut self, q: usize, tag: usize) {
        self.queues[q].flush(tag, ReqFlags::empty());
    }

    /// Submits queued requests and waits for at least `min` completions (up to `max`), or until
    /// `timeout` passes. Returns (tag, result) pairs; result is 0 or a negative errno.
    pub fn wait(&mut self, q: usize, min: usize, max: usize, timeout: Duration) -> Result<Vec<(usize, i32)>, String> {
        let mut c: Vec<MaybeUninit<Completion>> = (0..max.max(1)).map(|_| MaybeUninit::uninit()).collect();
        let mut t = timeout;
        let n = self.queues[q].do_io(&mut c, min, Some(&mut t), None).map_err(|x| e("do_io", x))?;
        if n < min {
            return Err(format!("only {n} of {min} completions within {timeout:?}"));
        }
        Ok(c[..n]
            .iter()
            .map(|x| {
                // SAFETY: do_io initialised the first `n` completions.
                let x = unsafe { x.assume_init_ref() };
                (x.user_data, x.ret)
            })
            .collect())
    }

    /// Submits what is queued and returns completions already available, without waiting.
    pub fn poll(&mut self, q: usize, out: &mut Vec<(usize, i32)>, max: usize) -> Result<(), String> {
        let mut c: Vec<MaybeUninit<Completion>> = (0..max.max(1)).map(|_| MaybeUninit::uninit()).collect();
        let n = self.queues[q].do_io(&mut c, 0, None, None).map_err(|x| e("do_io", x))?;
        for x in &c[..n] {
            // SAFETY: do_io initialised the first `n` completions.
            let x = unsafe { x.assume_init_ref() };
            out.push((x.user_data, x.ret));
        }
        Ok(())
    }

    /// Runs one request to completion on queue `q` (10 s timeout); returns its result.
    pub fn sync(&mut self, q: usize, submit: impl FnOnce(&mut Self)) -> Result<i32, String> {
        submit(self);
        let r = self.wait(q, 1, 1, Duration::from_secs(10))?;
        Ok(r[0].1)
    }
}

impl Drop for BlkClient {
    fn drop(&mut self) {
        self.queues.clear();
        self.b.unmap_mem_region(&self.region);
        self.b.free_mem_region(&self.region);
    }
}
