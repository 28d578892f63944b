//! NVMe-oF methods for the VFIOUSER transport (SPDK's names and parameters) and the `nvmf`
//! subsystem's config dump. The model (transport, subsystems, namespaces, listeners) lives in
//! `vstor_vfio_user::NvmfManager`; these functions parse parameters and map errors.

use std::sync::Arc;

use serde::Deserialize;
use serde_json::{json, Map, Value};
use vstor_vfio_user::{ListenAddress, NsOpts, NvmfError, SubsystemOpts, TransportOpts};

use super::Methods;
use crate::app::App;
use crate::error::RpcError;

pub(crate) fn register(m: &mut Methods) {
    m.add("nvmf_create_transport", nvmf_create_transport);
    m.add("nvmf_get_transports", |app: &Arc<App>, p: TgtOnly| {
        check_tgt(p.tgt_name.as_deref())?;
        Ok(app.nvmf.get_transports())
    });
    m.add("nvmf_create_subsystem", nvmf_create_subsystem);
    m.add("nvmf_delete_subsystem", |app: &Arc<App>, p: ByNqn| {
        check_tgt(p.tgt_name.as_deref())?;
        app.nvmf.delete_subsystem(&p.nqn)?;
        Ok(json!(true))
    });
    m.add("nvmf_subsystem_add_ns", nvmf_subsystem_add_ns);
    m.add("nvmf_subsystem_remove_ns", |app: &Arc<App>, p: RemoveNs| {
        check_tgt(p.tgt_name.as_deref())?;
        app.nvmf.remove_ns(&p.nqn, p.nsid)?;
        Ok(json!(true))
    });
    m.add("nvmf_subsystem_add_listener", |app: &Arc<App>, p: Listener| {
        app.nvmf.add_listener(&p.nqn, &p.listen_address.into())?;
        Ok(json!(true))
    });
    m.add("nvmf_subsystem_remove_listener", |app: &Arc<App>, p: Listener| {
        app.nvmf.remove_listener(&p.nqn, &p.listen_address.into())?;
        Ok(json!(true))
    });
    m.add("nvmf_get_subsystems", nvmf_get_subsystems);
}

impl From<NvmfError> for RpcError {
    fn from(e: NvmfError) -> Self {
        let msg = match e.param() {
            Some(p) if !e.to_string().contains(p) => format!("{p}: {e}"),
            _ => e.to_string(),
        };
        match e {
            NvmfError::InvalidParam { .. } => RpcError::invalid_params(msg),
            NvmfError::TransportExists(_) | NvmfError::SubsystemExists(_) | NvmfError::ListenerExists(_) => {
                RpcError::errno(libc::EEXIST, msg)
            }
            NvmfError::NsidInUse { .. } => RpcError::errno(libc::EEXIST, msg),
            NvmfError::NoTransport
            | NvmfError::SubsystemNotFound(_)
            | NvmfError::NsNotFound { .. }
            | NvmfError::ListenerNotFound { .. } => RpcError::errno(libc::ENODEV, msg),
            NvmfError::Bdev(b) => b.into(),
            _ => RpcError::errno(libc::EINVAL, msg),
        }
    }
}

/// SPDK's multi-target name: vstor has one target, named as SPDK's default.
fn check_tgt(tgt: Option<&str>) -> Result<(), RpcError> {
    match tgt {
        None | Some("nvmf_tgt") => Ok(()),
        Some(t) => Err(RpcError::bad_param("tgt_name", format!("'{t}': vstor has one target, 'nvmf_tgt'"))),
    }
}

/// Logs parameters SPDK's client may send that mean nothing for this transport.
fn ignored(method: &str, rest: &Map<String, Value>) {
    if !rest.is_empty() {
        let names: Vec<&str> = rest.keys().map(String::as_str).collect();
        tracing::info!(method, ignored = ?names, "parameters without effect on the VFIOUSER transport");
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TgtOnly {
    tgt_name: Option<String>,
}

#[derive(Deserialize)]
struct CreateTransport {
    trtype: String,
    max_queue_depth: Option<u16>,
    max_io_qpairs_per_ctrlr: Option<u16>,
    #[serde(default)]
    disable_mappable_bar0: bool,
    #[serde(default)]
    disable_shadow_doorbells: bool,
    tgt_name: Option<String>,
    /// Every other SPDK transport option (buffer sizes, TCP and RDMA knobs, ...).
    #[serde(flatten)]
    rest: Map<String, Value>,
}

fn nvmf_create_transport(app: &Arc<App>, p: CreateTransport) -> Result<Value, RpcError> {
    check_tgt(p.tgt_name.as_deref())?;
    ignored("nvmf_create_transport", &p.rest);
    let d = TransportOpts::default();
    app.nvmf.create_transport(TransportOpts {
        trtype: p.trtype,
        max_queue_depth: p.max_queue_depth.unwrap_or(d.max_queue_depth),
        max_io_qpairs_per_ctrlr: p.max_io_qpairs_per_ctrlr.unwrap_or(d.max_io_qpairs_per_ctrlr),
        disable_mappable_bar0: p.disable_mappable_bar0,
        disable_shadow_doorbells: p.disable_shadow_doorbells,
    })?;
    Ok(json!(true))
}

#[derive(Deserialize)]
struct CreateSubsystem {
    nqn: String,
    serial_number: Option<String>,
    model_number: Option<String>,
    #[serde(default)]
    allow_any_host: bool,
    max_namespaces: Option<u32>,
    tgt_name: Option<String>,
    #[serde(flatten)]
    rest: Map<String, Value>,
}

fn nvmf_create_subsystem(app: &Arc<App>, p: CreateSubsystem) -> Result<Value, RpcError> {
    check_tgt(p.tgt_name.as_deref())?;
    ignored("nvmf_create_subsystem", &p.rest);
    app.nvmf.create_subsystem(SubsystemOpts {
        nqn: p.nqn,
        serial_number: p.serial_number,
        model_number: p.model_number,
        allow_any_host: p.allow_any_host,
        max_namespaces: p.max_namespaces,
    })?;
    Ok(json!(true))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ByNqn {
    nqn: String,
    tgt_name: Option<String>,
}

#[derive(Deserialize)]
struct NsParams {
    bdev_name: String,
    nsid: Option<u32>,
    uuid: Option<String>,
    nguid: Option<String>,
    eui64: Option<String>,
    #[serde(flatten)]
    rest: Map<String, Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AddNs {
    nqn: String,
    namespace: NsParams,
    tgt_name: Option<String>,
}

/// `n` bytes from hex digits (dashes allowed, as SPDK prints NGUIDs).
fn parse_hex<const N: usize>(param: &str, s: &str) -> Result<[u8; N], RpcError> {
    let digits: String = s.chars().filter(|c| *c != '-').collect();
    let bad = || RpcError::bad_param(param, format!("'{s}' is not {} hex digits", N * 2));
    if digits.len() != N * 2 || !digits.is_ascii() {
        return Err(bad());
    }
    let mut out = [0u8; N];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(&digits[i * 2..i * 2 + 2], 16).map_err(|_| bad())?;
    }
    Ok(out)
}

fn nvmf_subsystem_add_ns(app: &Arc<App>, p: AddNs) -> Result<Value, RpcError> {
    check_tgt(p.tgt_name.as_deref())?;
    let ns = p.namespace;
    ignored("nvmf_subsystem_add_ns", &ns.rest);
    let bdev = app.bdevs.lookup(&ns.bdev_name).map_err(|e| RpcError::errno(libc::ENODEV, format!("bdev_name: {e}")))?;
    let uuid = match ns.uuid.as_deref() {
        None => None,
        Some(u) => Some(uuid::Uuid::parse_str(u).map_err(|e| RpcError::bad_param("namespace.uuid", e))?),
    };
    let opts = NsOpts {
        nsid: ns.nsid.filter(|&n| n != 0),
        uuid,
        nguid: ns.nguid.as_deref().map(|s| parse_hex::<16>("namespace.nguid", s)).transpose()?,
        eui64: ns.eui64.as_deref().map(|s| parse_hex::<8>("namespace.eui64", s)).transpose()?,
    };
    let nsid = app.nvmf.add_ns(&p.nqn, bdev, opts)?;
    Ok(json!(nsid))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RemoveNs {
    nqn: String,
    nsid: u32,
    tgt_name: Option<String>,
}

#[derive(Deserialize)]
struct Address {
    trtype: String,
    traddr: String,
    adrfam: Option<String>,
    trsvcid: Option<String>,
    #[serde(flatten)]
    _rest: Map<String, Value>,
}

impl From<Address> for ListenAddress {
    fn from(a: Address) -> Self {
        ListenAddress { trtype: a.trtype, traddr: a.traddr, adrfam: a.adrfam, trsvcid: a.trsvcid }
    }
}

#[derive(Deserialize)]
struct Listener {
    nqn: String,
    listen_address: Address,
    #[serde(flatten)]
    _rest: Map<String, Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GetSubsystems {
    nqn: Option<String>,
    tgt_name: Option<String>,
}

fn nvmf_get_subsystems(app: &Arc<App>, p: GetSubsystems) -> Result<Value, RpcError> {
    check_tgt(p.tgt_name.as_deref())?;
    let all = app.nvmf.get_subsystems();
    let Some(nqn) = p.nqn else { return Ok(all) };
    let one: Vec<Value> = all.as_array().into_iter().flatten().filter(|s| s["nqn"] == json!(nqn)).cloned().collect();
    if one.is_empty() {
        return Err(RpcError::errno(libc::ENODEV, format!("nqn: subsystem {nqn} not found")));
    }
    Ok(Value::Array(one))
}

/// The `nvmf` subsystem's calls for `framework_get_config` / `save_config`.
pub fn dump_config(app: &App) -> Vec<Value> {
    app.nvmf.config()
}
