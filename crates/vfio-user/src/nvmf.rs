//! SPDK's NVMe-oF target model over vfio-user: one transport (`VFIOUSER`), subsystems (NQN,
//! serial, model, namespaces over bdevs) and listeners. Each listener is a directory `traddr`
//! holding the socket `traddr/cntrl`, served by its own NVMe controller (a
//! [`VfioUserEndpoint`]); every controller of a subsystem presents all its namespaces.
//!
//! [`NvmfManager`] is the object the JSON-RPC layer drives. Its methods validate their arguments
//! and fail with an [`NvmfError`] whose [`param`](NvmfError::param) names the offending RPC
//! parameter. State is one mutex: calls are serialized, and control-plane work on controllers
//! (creation, namespace attach/detach, reset) happens under it. Call the methods from a thread that
//! is not one of the manager's reactors (the RPC thread): they wait for those reactors.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use serde_json::{json, Value};
use uuid::Uuid;
use vstor_bdev::{Bdev, BdevError};
use vstor_nvme::{NsIds, NvmeConfig, NvmeController, NvmeError, PciIds};
use vstor_reactor::ReactorHandle;

use crate::server::{EndpointError, VfioUserEndpoint};

/// The only transport type.
pub const TRTYPE: &str = "VFIOUSER";
/// The discovery subsystem SPDK always lists.
pub const DISCOVERY_NQN: &str = "nqn.2014-08.org.nvmexpress.discovery";
/// Socket file name inside a listener's directory.
pub const SOCKET_NAME: &str = "cntrl";
/// Namespace limit when a subsystem does not set one (the controller's maximum).
pub const DEFAULT_MAX_NAMESPACES: u32 = 1024;
const DEFAULT_SERIAL: &str = "00000000000000000000";
const DEFAULT_MODEL: &str = "vstor bdev Controller";
/// Longest socket path (`sun_path` less its NUL).
const MAX_SOCKET_PATH: usize = 107;

/// Errors of the manager; [`NvmfError::param`] names the RPC parameter at fault.
#[derive(Debug, thiserror::Error)]
pub enum NvmfError {
    #[error("invalid {param}: {msg}")]
    InvalidParam { param: &'static str, msg: String },
    #[error("transport {0} already exists")]
    TransportExists(String),
    #[error("transport {TRTYPE} does not exist (create it with nvmf_create_transport)")]
    NoTransport,
    #[error("subsystem {0} already exists")]
    SubsystemExists(String),
    #[error("subsystem {0} not found")]
    SubsystemNotFound(String),
    #[error("namespace {nsid} not found in subsystem {nqn}")]
    NsNotFound { nqn: String, nsid: u32 },
    #[error("namespace ID {nsid} is already in use in subsystem {nqn}")]
    NsidInUse { nqn: String, nsid: u32 },
    #[error("a listener at {0} already exists")]
    ListenerExists(String),
    #[error("no listener at {traddr} in subsystem {nqn}")]
    ListenerNotFound { nqn: String, traddr: String },
    #[error("bdev: {0}")]
    Bdev(#[from] BdevError),
    #[error("NVMe controller: {0}")]
    Nvme(#[from] NvmeError),
    #[error("listener: {0}")]
    Endpoint(#[from] EndpointError),
    #[error("the NVMe-oF target is shut down")]
    ShutDown,
}

impl NvmfError {
    /// The RPC parameter at fault, if the error is about one.
    pub fn param(&self) -> Option<&'static str> {
        match self {
            NvmfError::InvalidParam { param, .. } => Some(param),
            NvmfError::TransportExists(_) | NvmfError::NoTransport => Some("trtype"),
            NvmfError::SubsystemExists(_) | NvmfError::SubsystemNotFound(_) => Some("nqn"),
            NvmfError::NsNotFound { .. } | NvmfError::NsidInUse { .. } => Some("nsid"),
            NvmfError::ListenerExists(_) | NvmfError::ListenerNotFound { .. } | NvmfError::Endpoint(_) => {
                Some("traddr")
            }
            NvmfError::Bdev(e) => Some(e.param().unwrap_or("bdev_name")),
            NvmfError::Nvme(NvmeError::NsidOutOfRange { .. } | NvmeError::NsidInUse(_) | NvmeError::NsNotFound(_)) => {
                Some("nsid")
            }
            NvmfError::Nvme(_) | NvmfError::ShutDown => None,
        }
    }
}

fn invalid(param: &'static str, msg: impl Into<String>) -> NvmfError {
    NvmfError::InvalidParam { param, msg: msg.into() }
}

/// `nvmf_create_transport` parameters (the VFIOUSER subset).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransportOpts {
    /// Must be `VFIOUSER` (any case).
    pub trtype: String,
    /// Largest I/O queue (entries), 2..=4096. SPDK's default: 256.
    pub max_queue_depth: u16,
    /// I/O queue pairs per controller, 1..=1023. SPDK's default: 127.
    pub max_io_qpairs_per_ctrlr: u16,
    /// Trap every BAR0 access instead of letting the client map the doorbells.
    pub disable_mappable_bar0: bool,
    /// Do not offer Doorbell Buffer Config.
    pub disable_shadow_doorbells: bool,
}

impl Default for TransportOpts {
    fn default() -> Self {
        TransportOpts {
            trtype: TRTYPE.into(),
            max_queue_depth: 256,
            max_io_qpairs_per_ctrlr: 127,
            disable_mappable_bar0: false,
            disable_shadow_doorbells: false,
        }
    }
}

/// `nvmf_create_subsystem` parameters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SubsystemOpts {
    pub nqn: String,
    /// At most 20 printable ASCII characters. Default `00000000000000000000`.
    pub serial_number: Option<String>,
    /// At most 40 printable ASCII characters. Default `vstor bdev Controller`.
    pub model_number: Option<String>,
    /// Host access control is not enforced (vfio-user has no host NQN); recorded and reported.
    pub allow_any_host: bool,
    /// 1..=1024; `None` or 0: 1024.
    pub max_namespaces: Option<u32>,
}

/// `nvmf_subsystem_add_ns` namespace parameters besides the bdev.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NsOpts {
    /// 1..=max_namespaces; `None`: the lowest free.
    pub nsid: Option<u32>,
    /// Default: the bdev's UUID. A nil UUID counts as absent.
    pub uuid: Option<Uuid>,
    /// All zeroes counts as absent.
    pub nguid: Option<[u8; 16]>,
    /// All zeroes counts as absent.
    pub eui64: Option<[u8; 8]>,
}

/// A listener address (`listen_address` of the listener RPCs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenAddress {
    /// Must be `VFIOUSER` (any case).
    pub trtype: String,
    /// Directory of the socket (`traddr/cntrl`); created if missing.
    pub traddr: String,
    /// Optional and informational (IPv4, IPv6, IB, FC, INTRA_HOST; any case).
    pub adrfam: Option<String>,
    /// Optional and informational (SPDK's scripts pass `0`).
    pub trsvcid: Option<String>,
}

impl ListenAddress {
    /// A VFIOUSER address at directory `traddr`.
    pub fn vfio_user(traddr: impl Into<String>) -> ListenAddress {
        ListenAddress { trtype: TRTYPE.into(), traddr: traddr.into(), adrfam: None, trsvcid: None }
    }

    fn json(&self) -> Value {
        json!({
            "trtype": TRTYPE,
            "adrfam": self.adrfam.as_deref().unwrap_or("unknown"),
            "traddr": self.traddr,
            "trsvcid": self.trsvcid.as_deref().unwrap_or(""),
        })
    }

    fn config_json(&self) -> Value {
        let mut v = json!({ "trtype": TRTYPE, "traddr": self.traddr });
        if let Some(a) = &self.adrfam {
            v["adrfam"] = json!(a);
        }
        if let Some(s) = &self.trsvcid {
            v["trsvcid"] = json!(s);
        }
        v
    }
}

/// What a listener's endpoint is doing (for status RPCs and tests).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListenerState {
    /// A client is attached.
    pub connected: bool,
    /// Connections served to completion.
    pub sessions: u64,
    /// BAR0 offers mappable doorbells.
    pub mappable_doorbells: bool,
}

struct Ns {
    bdev: Arc<Bdev>,
    /// Effective UUID (given or the bdev's).
    uuid: Uuid,
    nguid: Option<[u8; 16]>,
    eui64: Option<[u8; 8]>,
}

impl Ns {
    fn ids(&self) -> NsIds {
        NsIds { uuid: Some(self.uuid), nguid: self.nguid, eui64: self.eui64 }
    }
}

struct Listener {
    addr: ListenAddress,
    endpoint: VfioUserEndpoint,
}

struct Subsystem {
    nqn: String,
    serial: String,
    model: String,
    allow_any_host: bool,
    max_namespaces: Option<u32>,
    namespaces: BTreeMap<u32, Ns>,
    listeners: Vec<Listener>,
    next_cntlid: u16,
}

impl Subsystem {
    fn nn(&self) -> u32 {
        self.max_namespaces.unwrap_or(DEFAULT_MAX_NAMESPACES)
    }

    fn claim_owner(&self) -> String {
        format!("NVMe-oF subsystem {}", self.nqn)
    }

    /// Stops every listener (disconnecting and resetting its controller) and releases the bdevs.
    fn destroy(&mut self) {
        for l in self.listeners.drain(..) {
            l.endpoint.stop();
        }
        let owner = self.claim_owner();
        for ns in std::mem::take(&mut self.namespaces).into_values() {
            ns.bdev.release(&owner);
        }
    }
}

#[derive(Default)]
struct State {
    transport: Option<TransportOpts>,
    subsystems: Vec<Subsystem>,
    shut_down: bool,
}

impl State {
    fn subsystem(&mut self, nqn: &str) -> Result<&mut Subsystem, NvmfError> {
        self.subsystems.iter_mut().find(|s| s.nqn == nqn).ok_or_else(|| NvmfError::SubsystemNotFound(nqn.into()))
    }
}

/// The NVMe-oF target: transport, subsystems, namespaces and vfio-user listeners.
pub struct NvmfManager {
    reactors: Vec<ReactorHandle>,
    socket_mode: u32,
    state: Mutex<State>,
}

impl std::fmt::Debug for NvmfManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NvmfManager({} reactors)", self.reactors.len())
    }
}

fn check_ascii(param: &'static str, s: &str, max: usize) -> Result<(), NvmfError> {
    if s.is_empty() || s.len() > max || !s.bytes().all(|c| (0x20..0x7f).contains(&c)) {
        return Err(invalid(param, format!("'{s}' is not 1 to {max} printable ASCII characters")));
    }
    Ok(())
}

/// Validates an NQN the way SPDK does: `nqn.2014-08.org.nvmexpress:uuid:<UUID>`, or
/// `nqn.yyyy-mm.<reverse domain>:<name>`, at most 223 bytes.
pub fn validate_nqn(nqn: &str) -> Result<(), NvmfError> {
    let bad = |msg: &str| Err(invalid("nqn", format!("'{nqn}': {msg}")));
    if nqn.len() > 223 {
        return bad("longer than 223 bytes");
    }
    if nqn.chars().any(char::is_control) {
        return bad("contains control characters");
    }
    if nqn == DISCOVERY_NQN {
        return bad("the discovery NQN is reserved");
    }
    const UUID_PREFIX: &str = "nqn.2014-08.org.nvmexpress:uuid:";
    if let Some(u) = nqn.strip_prefix(UUID_PREFIX) {
        if u.len() == 36 && Uuid::parse_str(u).is_ok() {
            return Ok(());
        }
        return bad("the UUID after 'nqn.2014-08.org.nvmexpress:uuid:' is not valid");
    }
    let Some(rest) = nqn.strip_prefix("nqn.") else { return bad("does not start with 'nqn.'") };
    let b = rest.as_bytes();
    let date_ok = b.len() > 8
        && b[..4].iter().all(u8::is_ascii_digit)
        && b[4] == b'-'
        && b[5..7].iter().all(u8::is_ascii_digit)
        && matches!(&rest[5..7], "01" | "02" | "03" | "04" | "05" | "06" | "07" | "08" | "09" | "10" | "11" | "12")
        && b[7] == b'.';
    if !date_ok {
        return bad("expected 'nqn.yyyy-mm.' with a valid year and month");
    }
    let Some((domain, name)) = rest[8..].split_once(':') else {
        return bad("expected a reverse domain name, then ':' and a name");
    };
    if name.is_empty() {
        return bad("the name after ':' is empty");
    }
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    if domain.is_empty() || !domain.split('.').all(label_ok) || !domain.starts_with(|c: char| c.is_ascii_alphabetic()) {
        return bad("the reverse domain name is not valid");
    }
    Ok(())
}

fn normalize_trtype(t: &str) -> Result<(), NvmfError> {
    if t.eq_ignore_ascii_case(TRTYPE) {
        Ok(())
    } else {
        Err(invalid("trtype", format!("'{t}' is not supported (only {TRTYPE})")))
    }
}

fn normalize_adrfam(a: &str) -> Result<String, NvmfError> {
    let n = match a.to_ascii_lowercase().as_str() {
        "ipv4" => "IPv4",
        "ipv6" => "IPv6",
        "ib" => "IB",
        "fc" => "FC",
        "intra_host" => "INTRA_HOST",
        _ => return Err(invalid("adrfam", format!("'{a}' is not one of ipv4, ipv6, ib, fc, intra_host"))),
    };
    Ok(n.into())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02X}")).collect()
}

impl NvmfManager {
    /// A manager whose controllers poll on `reactors` (the admin queue on the first) and whose
    /// sockets get permissions `socket_mode` (e.g. `0o660`).
    pub fn new(reactors: Vec<ReactorHandle>, socket_mode: u32) -> NvmfManager {
        NvmfManager { reactors, socket_mode, state: Mutex::new(State::default()) }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lock_live(&self) -> Result<MutexGuard<'_, State>, NvmfError> {
        let st = self.lock();
        if st.shut_down {
            return Err(NvmfError::ShutDown);
        }
        Ok(st)
    }

    /// `nvmf_create_transport`.
    pub fn create_transport(&self, opts: TransportOpts) -> Result<(), NvmfError> {
        normalize_trtype(&opts.trtype)?;
        if !(2..=4096).contains(&opts.max_queue_depth) {
            return Err(invalid("max_queue_depth", format!("{} is not between 2 and 4096", opts.max_queue_depth)));
        }
        if !(1..=1023).contains(&opts.max_io_qpairs_per_ctrlr) {
            return Err(invalid(
                "max_io_qpairs_per_ctrlr",
                format!("{} is not between 1 and 1023", opts.max_io_qpairs_per_ctrlr),
            ));
        }
        let mut st = self.lock_live()?;
        if st.transport.is_some() {
            return Err(NvmfError::TransportExists(TRTYPE.into()));
        }
        st.transport = Some(TransportOpts { trtype: TRTYPE.into(), ..opts });
        Ok(())
    }

    /// The transport, if created.
    pub fn transport(&self) -> Option<TransportOpts> {
        self.lock().transport.clone()
    }

    fn transport_json(t: &TransportOpts) -> Value {
        json!({
            "trtype": TRTYPE,
            "max_queue_depth": t.max_queue_depth,
            "max_io_qpairs_per_ctrlr": t.max_io_qpairs_per_ctrlr,
            "disable_mappable_bar0": t.disable_mappable_bar0,
            "disable_shadow_doorbells": t.disable_shadow_doorbells,
        })
    }

    /// `nvmf_get_transports`: the transport's parameters (an empty array before creation).
    pub fn get_transports(&self) -> Value {
        Value::Array(self.lock().transport.iter().map(Self::transport_json).collect())
    }

    /// `nvmf_create_subsystem`.
    pub fn create_subsystem(&self, opts: SubsystemOpts) -> Result<(), NvmfError> {
        validate_nqn(&opts.nqn)?;
        let serial = opts.serial_number.unwrap_or_else(|| DEFAULT_SERIAL.into());
        check_ascii("serial_number", &serial, 20)?;
        let model = opts.model_number.unwrap_or_else(|| DEFAULT_MODEL.into());
        check_ascii("model_number", &model, 40)?;
        let max_namespaces = match opts.max_namespaces {
            None | Some(0) => None,
            Some(n) if n <= DEFAULT_MAX_NAMESPACES => Some(n),
            Some(n) => return Err(invalid("max_namespaces", format!("{n} is above {DEFAULT_MAX_NAMESPACES}"))),
        };
        let mut st = self.lock_live()?;
        if st.subsystems.iter().any(|s| s.nqn == opts.nqn) {
            return Err(NvmfError::SubsystemExists(opts.nqn));
        }
        st.subsystems.push(Subsystem {
            nqn: opts.nqn,
            serial,
            model,
            allow_any_host: opts.allow_any_host,
            max_namespaces,
            namespaces: BTreeMap::new(),
            listeners: Vec::new(),
            next_cntlid: 1,
        });
        Ok(())
    }

    /// `nvmf_delete_subsystem`: stops its listeners (disconnecting clients and resetting the
    /// controllers), detaches its namespaces and releases their bdevs.
    pub fn delete_subsystem(&self, nqn: &str) -> Result<(), NvmfError> {
        let mut st = self.lock();
        let i =
            st.subsystems.iter().position(|s| s.nqn == nqn).ok_or_else(|| NvmfError::SubsystemNotFound(nqn.into()))?;
        let mut s = st.subsystems.remove(i);
        s.destroy();
        Ok(())
    }

    /// `nvmf_subsystem_add_ns`: attaches `bdev` (claimed for the subsystem) and returns the NSID.
    /// Connected hosts get a Namespace Attribute Changed event.
    pub fn add_ns(&self, nqn: &str, bdev: Arc<Bdev>, opts: NsOpts) -> Result<u32, NvmfError> {
        let mut st = self.lock_live()?;
        let s = st.subsystem(nqn)?;
        let nn = s.nn();
        let nsid = match opts.nsid {
            Some(n) if n == 0 || n > nn => return Err(invalid("nsid", format!("{n} is not between 1 and {nn}"))),
            Some(n) if s.namespaces.contains_key(&n) => return Err(NvmfError::NsidInUse { nqn: nqn.into(), nsid: n }),
            Some(n) => n,
            None => (1..=nn)
                .find(|n| !s.namespaces.contains_key(n))
                .ok_or_else(|| invalid("nsid", format!("subsystem {nqn} has no free namespace ID (max {nn})")))?,
        };
        let uuid = opts.uuid.filter(|u| !u.is_nil()).unwrap_or_else(|| bdev.uuid());
        let nguid = opts.nguid.filter(|g| g.iter().any(|&b| b != 0));
        let eui64 = opts.eui64.filter(|g| g.iter().any(|&b| b != 0));
        for (n, ns) in &s.namespaces {
            if ns.uuid == uuid {
                return Err(invalid("uuid", format!("{uuid} is already used by namespace {n}")));
            }
            if nguid.is_some() && ns.nguid == nguid {
                return Err(invalid("nguid", format!("already used by namespace {n}")));
            }
            if eui64.is_some() && ns.eui64 == eui64 {
                return Err(invalid("eui64", format!("already used by namespace {n}")));
            }
        }
        let owner = s.claim_owner();
        bdev.claim(&owner, true)?;
        let ns = Ns { bdev: bdev.clone(), uuid, nguid, eui64 };
        for (i, l) in s.listeners.iter().enumerate() {
            if let Err(e) = l.endpoint.controller().add_namespace(Some(nsid), bdev.clone(), ns.ids()) {
                for l2 in &s.listeners[..i] {
                    let _ = l2.endpoint.controller().remove_namespace(nsid);
                }
                bdev.release(&owner);
                return Err(e.into());
            }
        }
        s.namespaces.insert(nsid, ns);
        tracing::info!(nqn, nsid, bdev = bdev.name(), "namespace added");
        Ok(nsid)
    }

    /// `nvmf_subsystem_remove_ns`: detaches namespace `nsid` (hosts get a Namespace Attribute
    /// Changed event) and releases its bdev.
    pub fn remove_ns(&self, nqn: &str, nsid: u32) -> Result<(), NvmfError> {
        let mut st = self.lock();
        let s = st.subsystem(nqn)?;
        let ns = s.namespaces.remove(&nsid).ok_or_else(|| NvmfError::NsNotFound { nqn: nqn.into(), nsid })?;
        for l in &s.listeners {
            if let Err(e) = l.endpoint.controller().remove_namespace(nsid) {
                tracing::warn!(nqn, nsid, "detaching the namespace from a controller: {e}");
            }
        }
        ns.bdev.release(&s.claim_owner());
        tracing::info!(nqn, nsid, "namespace removed");
        Ok(())
    }

    /// Hot-removes every namespace backed by `bdev` (the bdev is being deleted, as SPDK does on a
    /// bdev hot-remove): hosts get a Namespace Attribute Changed event, the claims are released.
    /// Returns the (subsystem, nsid) pairs removed.
    pub fn remove_namespaces_of(&self, bdev: &Bdev) -> Vec<(String, u32)> {
        let found: Vec<(String, u32)> = self
            .lock()
            .subsystems
            .iter()
            .flat_map(|s| {
                s.namespaces.iter().filter(|(_, ns)| std::ptr::eq(&*ns.bdev, bdev)).map(|(n, _)| (s.nqn.clone(), *n))
            })
            .collect();
        for (nqn, nsid) in &found {
            tracing::info!(nqn = %nqn, nsid, bdev = bdev.name(), "bdev deleted under a namespace: hot-removing it");
            if let Err(e) = self.remove_ns(nqn, *nsid) {
                tracing::warn!(nqn = %nqn, nsid, "hot-removing the namespace failed: {e}");
            }
        }
        found
    }

    /// `nvmf_subsystem_add_listener`: creates a controller for the subsystem on the manager's
    /// reactors, attaches its namespaces and serves it at `traddr/cntrl`.
    pub fn add_listener(&self, nqn: &str, addr: &ListenAddress) -> Result<(), NvmfError> {
        normalize_trtype(&addr.trtype)?;
        let adrfam = addr.adrfam.as_deref().map(normalize_adrfam).transpose()?;
        if addr.traddr.is_empty() || addr.traddr.contains('\0') {
            return Err(invalid("traddr", "must be a directory path"));
        }
        let path = Path::new(&addr.traddr).join(SOCKET_NAME);
        if path.as_os_str().len() > MAX_SOCKET_PATH {
            return Err(invalid(
                "traddr",
                format!("socket path {} is longer than {MAX_SOCKET_PATH} bytes", path.display()),
            ));
        }
        if self.reactors.is_empty() {
            return Err(NvmfError::Nvme(NvmeError::Config("the target has no reactors".into())));
        }
        let mut st = self.lock_live()?;
        let t = st.transport.clone().ok_or(NvmfError::NoTransport)?;
        let taken = st.subsystems.iter().flat_map(|s| &s.listeners).any(|l| same_traddr(&l.addr.traddr, &addr.traddr));
        let s = st.subsystem(nqn)?;
        if taken {
            return Err(NvmfError::ListenerExists(addr.traddr.clone()));
        }
        let cfg = NvmeConfig {
            serial: s.serial.clone(),
            model: s.model.clone(),
            subnqn: s.nqn.clone(),
            max_io_queues: t.max_io_qpairs_per_ctrlr,
            max_queue_depth: t.max_queue_depth,
            shadow_doorbells: !t.disable_shadow_doorbells,
            mappable_doorbells: !t.disable_mappable_bar0,
            reactors: self.reactors.clone(),
            max_namespaces: s.nn(),
            pci_ids: PciIds::default(),
            cntlid: s.next_cntlid,
            ..NvmeConfig::default()
        };
        let namespaces: Vec<(u32, Arc<Bdev>, NsIds)> =
            s.namespaces.iter().map(|(n, ns)| (*n, ns.bdev.clone(), ns.ids())).collect();
        let endpoint = VfioUserEndpoint::start_with(cfg, &path, self.socket_mode, |ctrl: &NvmeController| {
            for (nsid, bdev, ids) in namespaces {
                ctrl.add_namespace(Some(nsid), bdev, ids)?;
            }
            Ok(())
        })?;
        s.next_cntlid = s.next_cntlid.checked_add(1).filter(|&c| c < 0xfff0).unwrap_or(1);
        let addr =
            ListenAddress { trtype: TRTYPE.into(), traddr: addr.traddr.clone(), adrfam, trsvcid: addr.trsvcid.clone() };
        tracing::info!(nqn, traddr = addr.traddr, "listener added");
        s.listeners.push(Listener { addr, endpoint });
        Ok(())
    }

    /// `nvmf_subsystem_remove_listener`: disconnects the client, stops the controller and removes
    /// the socket. Listeners are matched by `traddr`.
    pub fn remove_listener(&self, nqn: &str, addr: &ListenAddress) -> Result<(), NvmfError> {
        normalize_trtype(&addr.trtype)?;
        let mut st = self.lock();
        let s = st.subsystem(nqn)?;
        let i = s
            .listeners
            .iter()
            .position(|l| same_traddr(&l.addr.traddr, &addr.traddr))
            .ok_or_else(|| NvmfError::ListenerNotFound { nqn: nqn.into(), traddr: addr.traddr.clone() })?;
        let l = s.listeners.remove(i);
        l.endpoint.stop();
        tracing::info!(nqn, traddr = addr.traddr, "listener removed");
        Ok(())
    }

    /// State of the listener at `traddr` of subsystem `nqn`.
    pub fn listener_state(&self, nqn: &str, traddr: &str) -> Option<ListenerState> {
        let st = self.lock();
        let s = st.subsystems.iter().find(|s| s.nqn == nqn)?;
        let l = s.listeners.iter().find(|l| same_traddr(&l.addr.traddr, traddr))?;
        Some(ListenerState {
            connected: l.endpoint.is_connected(),
            sessions: l.endpoint.sessions(),
            mappable_doorbells: l.endpoint.mappable_doorbells(),
        })
    }

    /// The controller behind the listener at `traddr` of subsystem `nqn`.
    pub fn controller(&self, nqn: &str, traddr: &str) -> Option<Arc<NvmeController>> {
        let st = self.lock();
        let s = st.subsystems.iter().find(|s| s.nqn == nqn)?;
        s.listeners.iter().find(|l| same_traddr(&l.addr.traddr, traddr)).map(|l| l.endpoint.controller().clone())
    }

    /// `nvmf_get_subsystems`, in SPDK's shape: the discovery subsystem, then every subsystem in
    /// creation order.
    pub fn get_subsystems(&self) -> Value {
        let st = self.lock();
        let mut out = vec![json!({
            "nqn": DISCOVERY_NQN,
            "subtype": "Discovery",
            "listen_addresses": [],
            "allow_any_host": true,
            "hosts": [],
        })];
        for s in &st.subsystems {
            let mut v = json!({
                "nqn": s.nqn,
                "subtype": "NVMe",
                "listen_addresses": s.listeners.iter().map(|l| l.addr.json()).collect::<Vec<_>>(),
                "allow_any_host": s.allow_any_host,
                "hosts": [],
                "serial_number": s.serial,
                "model_number": s.model,
                "namespaces": s.namespaces.iter().map(|(n, ns)| {
                    let mut j = json!({
                        "nsid": n,
                        "bdev_name": ns.bdev.name(),
                        "name": ns.bdev.name(),
                        "uuid": ns.uuid.to_string(),
                    });
                    if let Some(g) = ns.nguid {
                        j["nguid"] = json!(hex(&g));
                    }
                    if let Some(e) = ns.eui64 {
                        j["eui64"] = json!(hex(&e));
                    }
                    j
                }).collect::<Vec<_>>(),
            });
            if let Some(m) = s.max_namespaces {
                v["max_namespaces"] = json!(m);
            }
            out.push(v);
        }
        Value::Array(out)
    }

    /// The RPC calls that recreate the current state, in replay order: `nvmf_create_transport`,
    /// every `nvmf_create_subsystem`, every `nvmf_subsystem_add_ns`, every
    /// `nvmf_subsystem_add_listener` (SPDK's parameter names).
    pub fn config(&self) -> Vec<Value> {
        let st = self.lock();
        let mut out = Vec::new();
        if let Some(t) = &st.transport {
            out.push(json!({ "method": "nvmf_create_transport", "params": Self::transport_json(t) }));
        }
        for s in &st.subsystems {
            let mut p = json!({
                "nqn": s.nqn,
                "allow_any_host": s.allow_any_host,
                "serial_number": s.serial,
                "model_number": s.model,
            });
            if let Some(m) = s.max_namespaces {
                p["max_namespaces"] = json!(m);
            }
            out.push(json!({ "method": "nvmf_create_subsystem", "params": p }));
        }
        for s in &st.subsystems {
            for (n, ns) in &s.namespaces {
                let mut nsj = json!({ "nsid": n, "bdev_name": ns.bdev.name(), "uuid": ns.uuid.to_string() });
                if let Some(g) = ns.nguid {
                    nsj["nguid"] = json!(hex(&g));
                }
                if let Some(e) = ns.eui64 {
                    nsj["eui64"] = json!(hex(&e));
                }
                out.push(json!({ "method": "nvmf_subsystem_add_ns", "params": { "nqn": s.nqn, "namespace": nsj } }));
            }
        }
        for s in &st.subsystems {
            for l in &s.listeners {
                out.push(json!({
                    "method": "nvmf_subsystem_add_listener",
                    "params": { "nqn": s.nqn, "listen_address": l.addr.config_json() },
                }));
            }
        }
        out
    }

    /// Bdevs in use by subsystem namespaces (bdev name, subsystem NQN).
    pub fn bdevs_in_use(&self) -> Vec<(String, String)> {
        let st = self.lock();
        st.subsystems
            .iter()
            .flat_map(|s| s.namespaces.values().map(|ns| (ns.bdev.name().to_string(), s.nqn.clone())))
            .collect()
    }

    /// Deletes every subsystem (stopping listeners, resetting controllers, releasing bdevs) and
    /// refuses further changes. Call before stopping the reactors. Idempotent.
    pub fn shutdown(&self) {
        let mut st = self.lock();
        st.shut_down = true;
        for mut s in std::mem::take(&mut st.subsystems) {
            s.destroy();
        }
    }
}

impl Drop for NvmfManager {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Whether two traddr strings name the same directory (textually, ignoring trailing slashes).
fn same_traddr(a: &str, b: &str) -> bool {
    PathBuf::from(a).components().eq(PathBuf::from(b).components())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nqns_are_validated_like_spdk() {
        for ok in [
            "nqn.2016-06.io.spdk:cnode1",
            "nqn.2019-07.io.spdk:cnode-1.x",
            "nqn.2014-08.org.nvmexpress:uuid:11111111-2222-3333-4444-555555555555",
        ] {
            validate_nqn(ok).unwrap();
        }
        for bad in [
            "",
            "nqn.",
            "iqn.2016-06.io.spdk:a",
            "nqn.2016-13.io.spdk:a",
            "nqn.16-06.io.spdk:a",
            "nqn.2016-06.io.spdk",
            "nqn.2016-06.io.spdk:",
            "nqn.2016-06.-io.spdk:a",
            "nqn.2016-06..spdk:a",
            "nqn.2014-08.org.nvmexpress:uuid:not-a-uuid",
            DISCOVERY_NQN,
        ] {
            let e = validate_nqn(bad).unwrap_err();
            assert_eq!(e.param(), Some("nqn"), "{bad}");
        }
        let long = format!("nqn.2016-06.io.spdk:{}", "a".repeat(210));
        assert!(validate_nqn(&long).is_err());
    }

    #[test]
    fn traddrs_compare_as_paths() {
        assert!(same_traddr("/var/run/x/", "/var/run/x"));
        assert!(same_traddr("/var//run/x", "/var/run/x"));
        assert!(!same_traddr("/var/run/x", "/var/run/y"));
    }
}
