//! bdev methods (SPDK names and parameters) and the `bdev` subsystem's config dump.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::{json, Value};
use uuid::Uuid;
use vstor_bdev::{delay, error as err_bdev, malloc, null, uring, Bdev, BdevParams, IoType, StatsSnapshot};

use super::{Methods, NoParams};
use crate::app::App;
use crate::error::RpcError;

pub(crate) fn register(m: &mut Methods) {
    m.add("bdev_malloc_create", bdev_malloc_create);
    m.add("bdev_malloc_delete", |app: &Arc<App>, p: ByName| delete(app, &p.name, malloc::PRODUCT));
    m.add("bdev_null_create", bdev_null_create);
    m.add("bdev_null_delete", |app: &Arc<App>, p: ByName| delete(app, &p.name, null::PRODUCT));
    m.add("bdev_null_resize", bdev_null_resize);
    m.add("bdev_aio_create", bdev_aio_create);
    m.add("bdev_aio_delete", |app: &Arc<App>, p: ByName| delete(app, &p.name, uring::PRODUCT_AIO));
    m.add("bdev_uring_create", bdev_uring_create);
    m.add("bdev_uring_delete", |app: &Arc<App>, p: ByName| delete(app, &p.name, uring::PRODUCT_URING));
    m.add("bdev_delay_create", bdev_delay_create);
    m.add("bdev_delay_delete", |app: &Arc<App>, p: ByName| delete(app, &p.name, delay::PRODUCT));
    m.add("bdev_delay_update_latency", bdev_delay_update_latency);
    m.add("bdev_error_create", bdev_error_create);
    m.add("bdev_error_delete", |app: &Arc<App>, p: ByName| delete(app, &p.name, err_bdev::PRODUCT));
    m.add("bdev_error_inject_error", bdev_error_inject_error);
    m.add("bdev_error_resume_pending", |app: &Arc<App>, p: ByName| {
        let b = app.bdevs.lookup(&p.name)?;
        err_bdev::resume_pending(&b)?;
        Ok(json!(true))
    });
    m.add("bdev_get_bdevs", bdev_get_bdevs);
    m.add("bdev_get_iostat", bdev_get_iostat);
    m.add("bdev_reset_iostat", bdev_reset_iostat);
    // SPDK puts these two in every saved bdev config; accept them so such files load.
    m.add("bdev_wait_for_examine", |_app: &Arc<App>, _: NoParams| Ok(json!(true)));
    m.add("bdev_set_options", |_app: &Arc<App>, _: SetOptions| Ok(json!(true)));
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ByName {
    name: String,
}

/// SPDK defines metadata and protection-information parameters vstor does not implement. They
/// are accepted when they ask for nothing (the SPDK client sends `false`/0 defaults).
fn check_no_metadata(md_size: Option<u32>, dif_type: Option<i32>) -> Result<(), RpcError> {
    if md_size.unwrap_or(0) != 0 {
        return Err(RpcError::bad_param("md_size", "separate or interleaved metadata is not supported by vstor"));
    }
    if dif_type.unwrap_or(0) != 0 {
        return Err(RpcError::bad_param("dif_type", "protection information is not supported by vstor"));
    }
    Ok(())
}

fn parse_uuid(u: &Option<String>) -> Result<Option<Uuid>, RpcError> {
    u.as_deref().map(|s| Uuid::parse_str(s).map_err(|e| RpcError::bad_param("uuid", format!("'{s}': {e}")))).transpose()
}

fn check_physical_block_size(pbs: Option<u32>, block_size: u32) -> Result<(), RpcError> {
    if let Some(p) = pbs {
        if p != 0 && (!p.is_power_of_two() || p < block_size) {
            return Err(RpcError::bad_param(
                "physical_block_size",
                format!("{p} must be a power of two no smaller than block_size {block_size}"),
            ));
        }
    }
    Ok(())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MallocCreate {
    name: Option<String>,
    block_size: u32,
    num_blocks: u64,
    uuid: Option<String>,
    optimal_io_boundary: Option<u32>,
    physical_block_size: Option<u32>,
    numa_id: Option<i32>,
    /// vstor: back the RAM disk by a memfd (shareable).
    #[serde(default)]
    memfd: bool,
    md_size: Option<u32>,
    md_interleave: Option<bool>,
    dif_type: Option<i32>,
    dif_is_head_of_md: Option<bool>,
    dif_pi_format: Option<u32>,
}

fn bdev_malloc_create(app: &Arc<App>, p: MallocCreate) -> Result<Value, RpcError> {
    check_no_metadata(p.md_size, p.dif_type)?;
    check_physical_block_size(p.physical_block_size, p.block_size)?;
    let _ = (p.optimal_io_boundary, p.numa_id, p.md_interleave, p.dif_is_head_of_md, p.dif_pi_format);
    let name = match p.name {
        Some(n) => n,
        None => loop {
            let n = format!("Malloc{}", app.next_malloc_index());
            if app.bdevs.get(&n).is_none() {
                break n;
            }
        },
    };
    if app.bdevs.get(&name).is_some() {
        return Err(vstor_bdev::BdevError::Exists(name).into());
    }
    let bp = BdevParams {
        name,
        uuid: parse_uuid(&p.uuid)?,
        block_size: p.block_size,
        num_blocks: p.num_blocks,
        read_only: false,
    };
    let b = app.bdevs.register(malloc::create(bp, p.memfd)?)?;
    Ok(json!(b.name()))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NullCreate {
    name: String,
    block_size: u32,
    num_blocks: u64,
    uuid: Option<String>,
    physical_block_size: Option<u32>,
    preferred_write_alignment: Option<u32>,
    preferred_write_granularity: Option<u32>,
    optimal_write_size: Option<u32>,
    preferred_unmap_alignment: Option<u32>,
    preferred_unmap_granularity: Option<u32>,
    md_size: Option<u32>,
    dif_type: Option<i32>,
    dif_is_head_of_md: Option<bool>,
    dif_pi_format: Option<u32>,
}

fn bdev_null_create(app: &Arc<App>, p: NullCreate) -> Result<Value, RpcError> {
    check_no_metadata(p.md_size, p.dif_type)?;
    check_physical_block_size(p.physical_block_size, p.block_size)?;
    let _ = (
        p.dif_is_head_of_md,
        p.dif_pi_format,
        p.preferred_write_alignment,
        p.preferred_write_granularity,
        p.optimal_write_size,
        p.preferred_unmap_alignment,
        p.preferred_unmap_granularity,
    );
    if app.bdevs.get(&p.name).is_some() {
        return Err(vstor_bdev::BdevError::Exists(p.name).into());
    }
    let bp = BdevParams {
        name: p.name,
        uuid: parse_uuid(&p.uuid)?,
        block_size: p.block_size,
        num_blocks: p.num_blocks,
        read_only: false,
    };
    let b = app.bdevs.register(null::create(bp)?)?;
    Ok(json!(b.name()))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NullResize {
    name: String,
    /// New size in MiB.
    new_size: u64,
}

fn bdev_null_resize(app: &Arc<App>, p: NullResize) -> Result<Value, RpcError> {
    let b = app.bdevs.lookup(&p.name)?;
    if b.product_name() != null::PRODUCT {
        return Err(RpcError::bad_param(
            "name",
            format!("bdev '{}' is a {}, not a null bdev", p.name, b.product_name()),
        ));
    }
    let bytes = p.new_size.checked_mul(1 << 20).ok_or_else(|| RpcError::bad_param("new_size", "too large"))?;
    let blocks = bytes / u64::from(b.block_size());
    if blocks < b.num_blocks() {
        return Err(RpcError::bad_param(
            "new_size",
            format!("{} MiB is smaller than the current size; null bdevs only grow", p.new_size),
        ));
    }
    b.resize(blocks)?;
    Ok(json!(true))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AioCreate {
    name: String,
    filename: String,
    block_size: Option<u32>,
    #[serde(default)]
    readonly: bool,
    #[serde(default)]
    fallocate: bool,
    uuid: Option<String>,
    #[serde(default)]
    nowait: bool,
}

fn bdev_aio_create(app: &Arc<App>, p: AioCreate) -> Result<Value, RpcError> {
    let _ = p.nowait;
    if app.bdevs.get(&p.name).is_some() {
        return Err(vstor_bdev::BdevError::Exists(p.name).into());
    }
    let o = uring::UringOptions {
        name: p.name,
        filename: p.filename,
        block_size: p.block_size.filter(|&b| b != 0),
        uuid: parse_uuid(&p.uuid)?,
        readonly: p.readonly,
        flavor: uring::Flavor::Aio,
        fallocate: p.fallocate,
    };
    let b = app.bdevs.register(uring::create(o)?)?;
    Ok(json!(b.name()))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UringCreate {
    name: String,
    filename: String,
    block_size: Option<u32>,
    uuid: Option<String>,
}

fn bdev_uring_create(app: &Arc<App>, p: UringCreate) -> Result<Value, RpcError> {
    if app.bdevs.get(&p.name).is_some() {
        return Err(vstor_bdev::BdevError::Exists(p.name).into());
    }
    let o = uring::UringOptions {
        name: p.name,
        filename: p.filename,
        block_size: p.block_size.filter(|&b| b != 0),
        uuid: parse_uuid(&p.uuid)?,
        readonly: false,
        flavor: uring::Flavor::Uring,
        fallocate: true,
    };
    let b = app.bdevs.register(uring::create(o)?)?;
    Ok(json!(b.name()))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DelayCreate {
    name: String,
    base_bdev_name: String,
    avg_read_latency: u64,
    p99_read_latency: u64,
    avg_write_latency: u64,
    p99_write_latency: u64,
    uuid: Option<String>,
}

fn bdev_delay_create(app: &Arc<App>, p: DelayCreate) -> Result<Value, RpcError> {
    if app.bdevs.get(&p.name).is_some() {
        return Err(vstor_bdev::BdevError::Exists(p.name).into());
    }
    let base = app
        .bdevs
        .lookup(&p.base_bdev_name)
        .map_err(|e| RpcError::errno(libc::ENODEV, format!("base_bdev_name: {e}")))?;
    let lat = delay::Latencies {
        avg_read: p.avg_read_latency,
        p99_read: p.p99_read_latency,
        avg_write: p.avg_write_latency,
        p99_write: p.p99_write_latency,
    };
    let b = delay::create(&p.name, parse_uuid(&p.uuid)?, base.clone(), lat)?;
    match app.bdevs.register(b) {
        Ok(b) => Ok(json!(b.name())),
        Err(e) => {
            base.release(&format!("delay:{}", p.name));
            Err(e.into())
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DelayUpdate {
    delay_bdev_name: String,
    latency_type: String,
    latency_us: u64,
}

fn bdev_delay_update_latency(app: &Arc<App>, p: DelayUpdate) -> Result<Value, RpcError> {
    let t: delay::LatencyType = p.latency_type.parse().map_err(|e| RpcError::bad_param("latency_type", e))?;
    let b = app.bdevs.lookup(&p.delay_bdev_name)?;
    delay::update(&b, t, p.latency_us)?;
    Ok(json!(true))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ErrorCreate {
    base_name: String,
    uuid: Option<String>,
}

fn bdev_error_create(app: &Arc<App>, p: ErrorCreate) -> Result<Value, RpcError> {
    let name = format!("{}{}", err_bdev::PREFIX, p.base_name);
    if app.bdevs.get(&name).is_some() {
        return Err(vstor_bdev::BdevError::Exists(name).into());
    }
    let base = app.bdevs.lookup(&p.base_name).map_err(|e| RpcError::errno(libc::ENODEV, format!("base_name: {e}")))?;
    let b = err_bdev::create(parse_uuid(&p.uuid)?, base.clone())?;
    match app.bdevs.register(b) {
        Ok(b) => Ok(json!(b.name())),
        Err(e) => {
            base.release(&format!("error:{name}"));
            Err(e.into())
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ErrorInject {
    name: String,
    io_type: String,
    error_type: String,
    #[serde(default = "one")]
    num: u32,
    #[serde(default)]
    queue_depth: u64,
    #[serde(default)]
    corrupt_offset: u64,
    #[serde(default)]
    corrupt_value: u8,
    // Accepted for SPDK's client (it sends them for nvme_failure, which vstor refuses).
    #[serde(default)]
    nvme_sct: Option<u32>,
    #[serde(default)]
    nvme_sc: Option<u32>,
}

fn one() -> u32 {
    1
}

fn bdev_error_inject_error(app: &Arc<App>, p: ErrorInject) -> Result<Value, RpcError> {
    let target: err_bdev::Target = p.io_type.parse().map_err(|e| RpcError::bad_param("io_type", e))?;
    let kind: err_bdev::ErrorType = p.error_type.parse().map_err(|e| RpcError::bad_param("error_type", e))?;
    let _ = (p.nvme_sct, p.nvme_sc);
    let b = app.bdevs.lookup(&p.name)?;
    let i = err_bdev::Injection {
        target,
        kind,
        num: p.num,
        queue_depth: p.queue_depth,
        corrupt_offset: p.corrupt_offset,
        corrupt_value: p.corrupt_value,
    };
    err_bdev::inject(&b, i)?;
    tracing::info!(bdev = %p.name, io_type = %p.io_type, error_type = %p.error_type, num = p.num, "error injection set");
    Ok(json!(true))
}

fn delete(app: &Arc<App>, name: &str, product: &str) -> Result<Value, RpcError> {
    // A bdev deleted under a live user is hot-removed from it where the user allows it, as in
    // SPDK: NVMe namespaces here, SCSI targets through the bdev's RemoveRequested event. A
    // vhost-blk controller keeps its claim, and the delete is refused naming it.
    if let Ok(b) = app.bdevs.lookup(name) {
        if b.product_name() == product && b.is_claimed() {
            app.nvmf.remove_namespaces_of(&b);
        }
    }
    let b = app.bdevs.unregister(name, product)?;
    if let Err(e) = b.backend().flush_sync() {
        tracing::warn!(name, "flush on delete failed: {e}");
    }
    Ok(json!(true))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GetBdevs {
    name: Option<String>,
    /// Milliseconds to wait for `name` to appear.
    #[serde(default)]
    timeout: u64,
}

/// One bdev as `bdev_get_bdevs` shows it (SPDK's field names).
pub fn bdev_info(b: &Bdev) -> Value {
    let mut io = serde_json::Map::new();
    for t in IoType::ALL {
        io.insert(t.spdk_name().into(), json!(b.io_type_supported(t)));
    }
    for t in [
        "nvme_admin",
        "nvme_io",
        "nvme_io_md",
        "compare",
        "compare_and_write",
        "abort",
        "seek_hole",
        "seek_data",
        "copy",
        "nvme_iov_md",
    ] {
        io.insert(t.into(), json!(false));
    }
    let claims = b.claims();
    let mut v = json!({
        "name": b.name(),
        "aliases": [],
        "product_name": b.product_name(),
        "block_size": b.block_size(),
        "num_blocks": b.num_blocks(),
        "uuid": b.uuid().to_string(),
        "assigned_rate_limits": {
            "rw_ios_per_sec": 0, "rw_mbytes_per_sec": 0, "r_mbytes_per_sec": 0, "w_mbytes_per_sec": 0
        },
        "claimed": !claims.is_empty(),
        "zoned": false,
        "supported_io_types": io,
        "driver_specific": b.driver_specific(),
    });
    if let Some(c) = claims.first() {
        v["claim_type"] = json!(if c.exclusive { "exclusive_write" } else { "read_many_write_shared" });
        v["claimed_by"] = json!(claims.iter().map(|c| c.owner.clone()).collect::<Vec<_>>());
    }
    v
}

fn bdev_get_bdevs(app: &Arc<App>, p: GetBdevs) -> Result<Value, RpcError> {
    let Some(name) = p.name else {
        return Ok(Value::Array(app.bdevs.list().iter().map(|b| bdev_info(b)).collect()));
    };
    let deadline = Instant::now() + Duration::from_millis(p.timeout.min(60_000));
    loop {
        if let Some(b) = app.bdevs.get(&name) {
            return Ok(json!([bdev_info(&b)]));
        }
        if Instant::now() >= deadline {
            return Err(RpcError::errno(libc::ENODEV, format!("bdev '{name}' not found")));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn stat_json(name: &str, s: &StatsSnapshot) -> Value {
    json!({
        "name": name,
        "bytes_read": s.bytes_read,
        "num_read_ops": s.num_read_ops,
        "bytes_written": s.bytes_written,
        "num_write_ops": s.num_write_ops,
        "bytes_unmapped": s.bytes_unmapped,
        "num_unmap_ops": s.num_unmap_ops,
        "bytes_copied": 0,
        "num_copy_ops": 0,
        "read_latency_ticks": s.read_latency_ticks,
        "max_read_latency_ticks": s.max_read_latency_ticks,
        "min_read_latency_ticks": s.min_read_latency_ticks,
        "write_latency_ticks": s.write_latency_ticks,
        "max_write_latency_ticks": s.max_write_latency_ticks,
        "min_write_latency_ticks": s.min_write_latency_ticks,
        "unmap_latency_ticks": s.unmap_latency_ticks,
        "max_unmap_latency_ticks": 0,
        "min_unmap_latency_ticks": 0,
        "copy_latency_ticks": 0,
        "max_copy_latency_ticks": 0,
        "min_copy_latency_ticks": 0,
        "num_flush_ops": s.num_flush_ops,
        "num_write_zeroes_ops": s.num_write_zeroes_ops,
        "queue_depth": s.queue_depth,
        "io_error": { "total": s.io_errors },
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GetIostat {
    name: Option<String>,
    names: Option<Vec<String>>,
    #[serde(default)]
    per_channel: bool,
    reset_mode: Option<String>,
}

fn bdev_get_iostat(app: &Arc<App>, p: GetIostat) -> Result<Value, RpcError> {
    let mut wanted: Vec<String> = p.names.unwrap_or_default();
    wanted.extend(p.name);
    let bdevs: Vec<Arc<Bdev>> = if wanted.is_empty() {
        app.bdevs.list()
    } else {
        wanted.iter().map(|n| app.bdevs.lookup(n).map_err(RpcError::from)).collect::<Result<_, _>>()?
    };
    let reset = match p.reset_mode.as_deref() {
        None | Some("none") => false,
        Some("all") | Some("maxmin") => true,
        Some(other) => {
            return Err(RpcError::bad_param("reset_mode", format!("'{other}' is not one of all, maxmin, none")))
        }
    };
    let ticks = vstor_reactor::clock::ticks();
    let list: Vec<Value> = bdevs
        .iter()
        .map(|b| {
            if p.per_channel {
                let chans: Vec<Value> = b
                    .channel_stats()
                    .iter()
                    .map(|(core, s)| {
                        let mut v = stat_json(b.name(), s);
                        v["thread_id"] = json!(core + 1);
                        v["core"] = json!(core);
                        v
                    })
                    .collect();
                json!({ "name": b.name(), "channels": chans })
            } else {
                stat_json(b.name(), &b.stats())
            }
        })
        .collect();
    if reset {
        bdevs.iter().for_each(|b| b.reset_stats());
    }
    Ok(json!({ "tick_rate": vstor_reactor::clock::ticks_per_sec(), "ticks": ticks, "bdevs": list }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ResetIostat {
    name: Option<String>,
    mode: Option<String>,
}

fn bdev_reset_iostat(app: &Arc<App>, p: ResetIostat) -> Result<Value, RpcError> {
    match p.mode.as_deref() {
        None | Some("all") | Some("maxmin") | Some("none") => {}
        Some(other) => return Err(RpcError::bad_param("mode", format!("'{other}' is not one of all, maxmin, none"))),
    }
    match p.name {
        Some(n) => app.bdevs.lookup(&n)?.reset_stats(),
        None => app.bdevs.list().iter().for_each(|b| b.reset_stats()),
    }
    Ok(json!(true))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct SetOptions {
    bdev_io_pool_size: Option<u32>,
    bdev_io_cache_size: Option<u32>,
    bdev_auto_examine: Option<bool>,
    iobuf_small_cache_size: Option<u32>,
    iobuf_large_cache_size: Option<u32>,
}

/// The `bdev` subsystem's config: one create call per bdev, in creation order.
pub fn dump_config(app: &App) -> Vec<Value> {
    app.bdevs
        .list_in_creation_order()
        .iter()
        .filter_map(|b| b.config())
        .map(|(method, params)| json!({ "method": method, "params": params }))
        .collect()
}

/// Makes every bdev's completed writes durable (shutdown).
pub fn flush_all(app: &App) {
    for b in app.bdevs.list() {
        if b.write_cache() {
            if let Err(e) = b.backend().flush_sync() {
                tracing::error!(bdev = b.name(), "flush at shutdown failed: {e}");
            }
        }
    }
}
