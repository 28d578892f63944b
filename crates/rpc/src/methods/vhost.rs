//! vhost methods (SPDK names and parameters) and the `vhost_blk` subsystem's config dump.

use std::sync::Arc;

use serde::Deserialize;
use serde_json::{json, Value};
use vstor_reactor::CpuMask;
use vstor_vhost::BlkOptions;

use super::Methods;
use crate::app::App;
use crate::error::RpcError;

pub(crate) fn register(m: &mut Methods) {
    m.add("vhost_create_blk_controller", vhost_create_blk_controller);
    m.add("vhost_get_controllers", vhost_get_controllers);
    m.add("vhost_delete_controller", vhost_delete_controller);
    m.add("vhost_controller_set_coalescing", vhost_controller_set_coalescing);
    m.add("vhost_create_scsi_controller", vhost_create_scsi_controller);
    m.add("vhost_start_scsi_controller", |app: &Arc<App>, p: ByCtrlr| {
        app.vhost.start_scsi(&p.ctrlr)?;
        Ok(json!(true))
    });
    m.add("vhost_scsi_controller_add_target", vhost_scsi_controller_add_target);
    m.add("vhost_scsi_controller_remove_target", vhost_scsi_controller_remove_target);
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateScsi {
    ctrlr: String,
    cpumask: Option<String>,
    #[serde(default)]
    delay: bool,
}

fn vhost_create_scsi_controller(app: &Arc<App>, p: CreateScsi) -> Result<Value, RpcError> {
    app.vhost.create_scsi(&p.ctrlr, parse_mask(p.cpumask.as_deref())?, p.delay)?;
    Ok(json!(true))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AddTarget {
    ctrlr: String,
    scsi_target_num: i32,
    bdev_name: String,
}

fn vhost_scsi_controller_add_target(app: &Arc<App>, p: AddTarget) -> Result<Value, RpcError> {
    let target = match p.scsi_target_num {
        -1 => None,
        n => Some(
            usize::try_from(n).map_err(|_| RpcError::bad_param("scsi_target_num", format!("{n} is not 0-7 or -1")))?,
        ),
    };
    let bdev = app.bdevs.lookup(&p.bdev_name).map_err(|e| RpcError::errno(libc::ENODEV, format!("bdev_name: {e}")))?;
    Ok(json!(app.vhost.scsi_add_target(&p.ctrlr, target, bdev)?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RemoveTarget {
    ctrlr: String,
    scsi_target_num: u32,
}

fn vhost_scsi_controller_remove_target(app: &Arc<App>, p: RemoveTarget) -> Result<Value, RpcError> {
    app.vhost.scsi_remove_target(&p.ctrlr, usize::try_from(p.scsi_target_num).unwrap_or(usize::MAX))?;
    Ok(json!(true))
}

fn parse_mask(s: Option<&str>) -> Result<Option<CpuMask>, RpcError> {
    s.map(|s| CpuMask::parse(s).map_err(|e| RpcError::bad_param("cpumask", e))).transpose()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateBlk {
    ctrlr: String,
    dev_name: String,
    #[serde(default)]
    readonly: bool,
    #[serde(default)]
    packed_ring: bool,
    cpumask: Option<String>,
    transport: Option<String>,
    /// vstor: share the bdev with another controller (migration source and destination).
    #[serde(default)]
    shared: bool,
}

fn vhost_create_blk_controller(app: &Arc<App>, p: CreateBlk) -> Result<Value, RpcError> {
    if let Some(t) = p.transport.as_deref() {
        if t != "vhost_user_blk" {
            return Err(RpcError::bad_param("transport", format!("'{t}' is not supported (only vhost_user_blk)")));
        }
    }
    let bdev = app.bdevs.lookup(&p.dev_name).map_err(|e| RpcError::errno(libc::ENODEV, format!("dev_name: {e}")))?;
    let o = BlkOptions {
        readonly: p.readonly,
        packed_ring: p.packed_ring,
        cpumask: parse_mask(p.cpumask.as_deref())?,
        shared: p.shared,
    };
    app.vhost.create_blk(&p.ctrlr, bdev, o)?;
    Ok(json!(true))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GetControllers {
    name: Option<String>,
}

fn vhost_get_controllers(app: &Arc<App>, p: GetControllers) -> Result<Value, RpcError> {
    match p.name {
        Some(n) => {
            let c = app
                .vhost
                .get(&n)
                .ok_or_else(|| RpcError::errno(libc::ENODEV, format!("controller '{n}' not found")))?;
            Ok(json!([c.info()]))
        }
        None => Ok(Value::Array(app.vhost.list().iter().map(|c| c.info()).collect())),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ByCtrlr {
    ctrlr: String,
}

fn vhost_delete_controller(app: &Arc<App>, p: ByCtrlr) -> Result<Value, RpcError> {
    app.vhost.delete(&p.ctrlr)?;
    Ok(json!(true))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Coalescing {
    ctrlr: String,
    delay_base_us: u32,
    iops_threshold: u32,
}

fn vhost_controller_set_coalescing(app: &Arc<App>, p: Coalescing) -> Result<Value, RpcError> {
    app.vhost.set_coalescing(&p.ctrlr, p.delay_base_us, p.iops_threshold)?;
    Ok(json!(true))
}

/// The `vhost_blk` subsystem's config: every blk controller, in creation order.
pub fn dump_blk_config(app: &App) -> Vec<Value> {
    app.vhost.list_in_creation_order().iter().filter(|c| c.scsi().is_none()).flat_map(|c| c.config()).collect()
}

/// The `vhost_scsi` subsystem's config: every SCSI controller with its targets, in creation order.
pub fn dump_scsi_config(app: &App) -> Vec<Value> {
    app.vhost.list_in_creation_order().iter().filter(|c| c.scsi().is_some()).flat_map(|c| c.config()).collect()
}
