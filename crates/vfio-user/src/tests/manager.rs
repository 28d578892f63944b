//! The nvmf manager: `nvmf_get_subsystems` and `config` contents (replayed into a new target),
//! argument validation naming parameters, listeners (stale and live sockets, several per
//! subsystem), subsystem deletion with a client attached.

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;

use serde_json::{json, Value};
use uuid::Uuid;

use super::*;

#[test]
fn the_manager_is_shareable_and_the_client_movable() {
    fn send_sync<T: Send + Sync>() {}
    fn send<T: Send>() {}
    send_sync::<NvmfManager>();
    send_sync::<VfioUserEndpoint>();
    send::<NvmeClient>();
}

fn trapped() -> TransportOpts {
    TransportOpts { disable_mappable_bar0: true, max_io_qpairs_per_ctrlr: 4, max_queue_depth: 64, ..Default::default() }
}

fn unhex<const N: usize>(s: &str) -> [u8; N] {
    let mut out = [0u8; N];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).unwrap();
    }
    out
}

/// Replays `config()` output into `mgr` the way the RPC layer would.
fn replay(mgr: &NvmfManager, calls: &[Value], bdevs: &HashMap<String, Arc<Bdev>>) {
    for c in calls {
        let p = &c["params"];
        let s = |k: &str| p[k].as_str().map(String::from);
        match c["method"].as_str().unwrap() {
            "nvmf_create_transport" => mgr
                .create_transport(TransportOpts {
                    trtype: s("trtype").unwrap(),
                    max_queue_depth: p["max_queue_depth"].as_u64().unwrap() as u16,
                    max_io_qpairs_per_ctrlr: p["max_io_qpairs_per_ctrlr"].as_u64().unwrap() as u16,
                    disable_mappable_bar0: p["disable_mappable_bar0"].as_bool().unwrap(),
                    disable_shadow_doorbells: p["disable_shadow_doorbells"].as_bool().unwrap(),
                })
                .unwrap(),
            "nvmf_create_subsystem" => mgr
                .create_subsystem(SubsystemOpts {
                    nqn: s("nqn").unwrap(),
                    serial_number: s("serial_number"),
                    model_number: s("model_number"),
                    allow_any_host: p["allow_any_host"].as_bool().unwrap(),
                    max_namespaces: p["max_namespaces"].as_u64().map(|n| n as u32),
                })
                .unwrap(),
            "nvmf_subsystem_add_ns" => {
                let ns = &p["namespace"];
                let bdev = bdevs[ns["bdev_name"].as_str().unwrap()].clone();
                let opts = NsOpts {
                    nsid: ns["nsid"].as_u64().map(|n| n as u32),
                    uuid: ns["uuid"].as_str().map(|u| Uuid::parse_str(u).unwrap()),
                    nguid: ns["nguid"].as_str().map(unhex::<16>),
                    eui64: ns["eui64"].as_str().map(unhex::<8>),
                };
                mgr.add_ns(&s("nqn").unwrap(), bdev, opts).unwrap();
            }
            "nvmf_subsystem_add_listener" => {
                let a = &p["listen_address"];
                let addr = ListenAddress {
                    trtype: a["trtype"].as_str().unwrap().into(),
                    traddr: a["traddr"].as_str().unwrap().into(),
                    adrfam: a["adrfam"].as_str().map(String::from),
                    trsvcid: a["trsvcid"].as_str().map(String::from),
                };
                mgr.add_listener(&s("nqn").unwrap(), &addr).unwrap();
            }
            m => panic!("unexpected method {m}"),
        }
    }
}

#[test]
fn get_subsystems_and_config_describe_the_state_and_replay() {
    let t = Target::new(trapped());
    let extra = malloc_bdev("Malloc7", 4096, 128);
    let u = Uuid::from_u128(0x0102_0304_0506_0708_090a_0b0c_0d0e_0f10);
    let nguid = [0xab; 16];
    let eui64 = [1, 2, 3, 4, 5, 6, 7, 0xfe];
    let opts = NsOpts { nsid: Some(7), uuid: Some(u), nguid: Some(nguid), eui64: Some(eui64) };
    assert_eq!(t.mgr.add_ns(NQN, extra.clone(), opts).unwrap(), 7);
    let second = t.dir.path().join("second").to_string_lossy().into_owned();
    let addr =
        ListenAddress { adrfam: Some("ipv4".into()), trsvcid: Some("0".into()), ..ListenAddress::vfio_user(&second) };
    t.mgr.add_listener(NQN, &addr).unwrap();

    let subs = t.mgr.get_subsystems();
    let subs = subs.as_array().unwrap();
    assert_eq!(subs.len(), 2);
    assert_eq!(
        subs[0],
        json!({"nqn": DISCOVERY_NQN, "subtype": "Discovery", "listen_addresses": [], "allow_any_host": true, "hosts": []})
    );
    let s = &subs[1];
    assert_eq!(s["nqn"], NQN);
    assert_eq!(s["subtype"], "NVMe");
    assert_eq!(s["allow_any_host"], true);
    assert_eq!(s["hosts"], json!([]));
    assert_eq!(s["serial_number"], "VSTORTEST01");
    assert_eq!(s["model_number"], "vstor test controller");
    assert_eq!(s["max_namespaces"], 16);
    assert_eq!(
        s["listen_addresses"],
        json!([
            {"trtype": "VFIOUSER", "adrfam": "unknown", "traddr": t.traddr(), "trsvcid": ""},
            {"trtype": "VFIOUSER", "adrfam": "IPv4", "traddr": second, "trsvcid": "0"},
        ])
    );
    assert_eq!(
        s["namespaces"],
        json!([
            {"nsid": 1, "bdev_name": "Malloc0", "name": "Malloc0", "uuid": t.malloc.uuid().to_string()},
            {"nsid": 2, "bdev_name": "Uring0", "name": "Uring0", "uuid": t.uring.uuid().to_string()},
            {"nsid": 7, "bdev_name": "Malloc7", "name": "Malloc7", "uuid": u.to_string(),
             "nguid": "ABABABABABABABABABABABABABABABAB", "eui64": "01020304050607FE"},
        ])
    );
    assert_eq!(
        t.mgr.get_transports(),
        json!([{"trtype": "VFIOUSER", "max_queue_depth": 64, "max_io_qpairs_per_ctrlr": 4,
                "disable_mappable_bar0": true, "disable_shadow_doorbells": false}])
    );

    let config = t.mgr.config();
    let methods: Vec<&str> = config.iter().map(|c| c["method"].as_str().unwrap()).collect();
    assert_eq!(
        methods,
        [
            "nvmf_create_transport",
            "nvmf_create_subsystem",
            "nvmf_subsystem_add_ns",
            "nvmf_subsystem_add_ns",
            "nvmf_subsystem_add_ns",
            "nvmf_subsystem_add_listener",
            "nvmf_subsystem_add_listener"
        ]
    );
    assert_eq!(
        config[1]["params"],
        json!({"nqn": NQN, "allow_any_host": true, "serial_number": "VSTORTEST01",
               "model_number": "vstor test controller", "max_namespaces": 16})
    );
    assert_eq!(
        config[4]["params"],
        json!({"nqn": NQN, "namespace": {"nsid": 7, "bdev_name": "Malloc7", "uuid": u.to_string(),
               "nguid": "ABABABABABABABABABABABABABABABAB", "eui64": "01020304050607FE"}})
    );
    assert_eq!(
        config[6]["params"],
        json!({"nqn": NQN, "listen_address": {"trtype": "VFIOUSER", "traddr": second, "adrfam": "IPv4", "trsvcid": "0"}})
    );

    // Replay into a new target once this one is down: same configuration, and it serves.
    t.mgr.shutdown();
    assert!(!extra.is_claimed() && !t.malloc.is_claimed(), "shutdown releases the bdevs");
    assert!(!t.socket().exists(), "shutdown removes the sockets");
    let reactors =
        Reactors::start(&CpuMask::from_cores([0]), ReactorConfig { pin: false, ..Default::default() }).unwrap();
    let mgr2 = NvmfManager::new(reactors.handles().to_vec(), 0o600);
    let bdevs: HashMap<String, Arc<Bdev>> =
        [&t.malloc, &t.uring, &extra].iter().map(|b| (b.name().to_string(), Arc::clone(b))).collect();
    replay(&mgr2, &config, &bdevs);
    assert_eq!(mgr2.config(), config);
    let mut c = NvmeClient::connect(&ClientOptions { dir: second.into(), ..t.client_opts() }).unwrap();
    assert_eq!(c.namespaces().iter().map(|n| n.nsid).collect::<Vec<_>>(), vec![1, 2, 7]);
    verify_data(&mut c, 50, 2);
    drop(c);
    mgr2.shutdown();
}

#[test]
fn arguments_are_validated_and_errors_name_the_parameter() {
    let reactors =
        Reactors::start(&CpuMask::from_cores([0]), ReactorConfig { pin: false, ..Default::default() }).unwrap();
    let mgr = NvmfManager::new(reactors.handles().to_vec(), 0o660);
    let dir = tempfile::tempdir().unwrap();
    let traddr = |n: &str| dir.path().join(n).to_string_lossy().into_owned();
    let param = |r: Result<(), NvmfError>| r.unwrap_err().param();
    let sub = |nqn: &str| SubsystemOpts { nqn: nqn.into(), ..Default::default() };

    mgr.create_subsystem(sub(NQN)).unwrap();
    assert!(matches!(mgr.add_listener(NQN, &ListenAddress::vfio_user(traddr("a"))), Err(NvmfError::NoTransport)));
    assert_eq!(
        param(mgr.create_transport(TransportOpts { trtype: "TCP".into(), ..Default::default() })),
        Some("trtype")
    );
    assert_eq!(
        param(mgr.create_transport(TransportOpts { max_queue_depth: 1, ..Default::default() })),
        Some("max_queue_depth")
    );
    assert_eq!(
        param(mgr.create_transport(TransportOpts { max_io_qpairs_per_ctrlr: 0, ..Default::default() })),
        Some("max_io_qpairs_per_ctrlr")
    );
    mgr.create_transport(TransportOpts { trtype: "vfiouser".into(), ..trapped() }).unwrap();
    assert_eq!(param(mgr.create_transport(trapped())), Some("trtype"), "one transport");

    assert_eq!(param(mgr.create_subsystem(sub("nqn.bad"))), Some("nqn"));
    assert_eq!(param(mgr.create_subsystem(sub(NQN))), Some("nqn"), "duplicate");
    let nqn2 = "nqn.2024-01.io.vstor:two";
    let long_sn = SubsystemOpts { serial_number: Some("x".repeat(21)), ..sub(nqn2) };
    assert_eq!(param(mgr.create_subsystem(long_sn)), Some("serial_number"));
    let bad_mn = SubsystemOpts { model_number: Some("mødel".into()), ..sub(nqn2) };
    assert_eq!(param(mgr.create_subsystem(bad_mn)), Some("model_number"));
    let many = SubsystemOpts { max_namespaces: Some(5000), ..sub(nqn2) };
    assert_eq!(param(mgr.create_subsystem(many)), Some("max_namespaces"));
    mgr.create_subsystem(SubsystemOpts { max_namespaces: Some(4), ..sub(nqn2) }).unwrap();

    let b1 = malloc_bdev("M1", 512, 64);
    let b2 = malloc_bdev("M2", 512, 64);
    let add = |nqn: &str, b: &Arc<Bdev>, o: NsOpts| mgr.add_ns(nqn, b.clone(), o).map(|_| ());
    let nsid = |n| NsOpts { nsid: Some(n), ..Default::default() };
    assert_eq!(param(add("nqn.2024-01.io.vstor:none", &b1, NsOpts::default())), Some("nqn"));
    assert_eq!(param(add(nqn2, &b1, nsid(0))), Some("nsid"));
    assert_eq!(param(add(nqn2, &b1, nsid(5))), Some("nsid"), "above max_namespaces");
    add(nqn2, &b1, nsid(4)).unwrap();
    assert_eq!(param(add(nqn2, &b2, nsid(4))), Some("nsid"), "in use");
    assert_eq!(param(add(NQN, &b1, NsOpts::default())), Some("bdev_name"), "claimed by the other subsystem");
    assert_eq!(param(add(nqn2, &b2, NsOpts { uuid: Some(b1.uuid()), ..Default::default() })), Some("uuid"));
    add(nqn2, &b2, NsOpts { nguid: Some([1; 16]), eui64: Some([2; 8]), ..Default::default() }).unwrap();
    let b3 = malloc_bdev("M3", 512, 64);
    assert_eq!(param(add(nqn2, &b3, NsOpts { nguid: Some([1; 16]), ..Default::default() })), Some("nguid"));
    assert_eq!(param(add(nqn2, &b3, NsOpts { eui64: Some([2; 8]), ..Default::default() })), Some("eui64"));
    assert!(!b3.is_claimed(), "a refused namespace leaves its bdev unclaimed");
    assert_eq!(mgr.add_ns(nqn2, b3.clone(), NsOpts::default()).unwrap(), 2, "lowest free NSID (1 went to M2)");
    let b4 = malloc_bdev("M4", 512, 64);
    add(nqn2, &b4, NsOpts::default()).unwrap();
    let b5 = malloc_bdev("M5", 512, 64);
    assert_eq!(param(add(nqn2, &b5, NsOpts::default())), Some("nsid"), "no free NSID");
    mgr.remove_ns(nqn2, 3).unwrap();
    assert!(!b4.is_claimed());
    assert_eq!(param(mgr.remove_ns(nqn2, 3)), Some("nsid"));
    assert_eq!(param(mgr.remove_ns("nqn.2024-01.io.vstor:none", 1)), Some("nqn"));

    let la = |t: &str| ListenAddress::vfio_user(t);
    assert_eq!(
        param(mgr.add_listener(NQN, &ListenAddress { trtype: "RDMA".into(), ..la(&traddr("a")) })),
        Some("trtype")
    );
    assert_eq!(
        param(mgr.add_listener(NQN, &ListenAddress { adrfam: Some("x25".into()), ..la(&traddr("a")) })),
        Some("adrfam")
    );
    assert_eq!(param(mgr.add_listener(NQN, &la(""))), Some("traddr"));
    assert_eq!(param(mgr.add_listener(NQN, &la(&format!("/tmp/{}", "d".repeat(120))))), Some("traddr"));
    assert_eq!(param(mgr.add_listener("nqn.2024-01.io.vstor:none", &la(&traddr("a")))), Some("nqn"));
    mgr.add_listener(NQN, &la(&traddr("a"))).unwrap();
    assert_eq!(param(mgr.add_listener(nqn2, &la(&(traddr("a") + "/")))), Some("traddr"), "taken by another subsystem");
    assert_eq!(param(mgr.remove_listener(NQN, &la(&traddr("b")))), Some("traddr"));
    mgr.remove_listener(NQN, &la(&traddr("a"))).unwrap();
    assert!(!dir.path().join("a/cntrl").exists());
    assert_eq!(param(mgr.delete_subsystem("nqn.2024-01.io.vstor:none")), Some("nqn"));

    mgr.delete_subsystem(nqn2).unwrap();
    assert!(![&b1, &b2, &b3, &b4].iter().any(|b| b.is_claimed()), "deletion releases every bdev");
    mgr.shutdown();
    assert!(matches!(mgr.create_subsystem(sub(nqn2)), Err(NvmfError::ShutDown)));
    assert_eq!(mgr.get_subsystems().as_array().unwrap().len(), 1, "only discovery is left");
}

#[test]
fn stale_and_live_sockets_and_deletion_with_a_client_attached() {
    let reactors =
        Reactors::start(&CpuMask::from_cores([0, 1]), ReactorConfig { pin: false, ..Default::default() }).unwrap();
    let mgr = NvmfManager::new(reactors.handles().to_vec(), 0o660);
    mgr.create_transport(trapped()).unwrap();
    mgr.create_subsystem(SubsystemOpts { nqn: NQN.into(), ..Default::default() }).unwrap();
    let b = malloc_bdev("S1", 512, 4096);
    mgr.add_ns(NQN, b.clone(), NsOpts::default()).unwrap();
    let dir = tempfile::tempdir().unwrap();

    // A live socket is refused, a regular file too.
    let live_dir = dir.path().join("live");
    std::fs::create_dir(&live_dir).unwrap();
    let live = UnixListener::bind(live_dir.join("cntrl")).unwrap();
    let e = mgr.add_listener(NQN, &ListenAddress::vfio_user(live_dir.to_string_lossy())).unwrap_err();
    assert_eq!(e.param(), Some("traddr"), "{e}");
    assert!(matches!(e, NvmfError::Endpoint(EndpointError::InUse(_))), "{e}");
    drop(live);
    let file_dir = dir.path().join("file");
    std::fs::create_dir(&file_dir).unwrap();
    std::fs::write(file_dir.join("cntrl"), b"not a socket").unwrap();
    let e = mgr.add_listener(NQN, &ListenAddress::vfio_user(file_dir.to_string_lossy())).unwrap_err();
    assert!(matches!(e, NvmfError::Endpoint(EndpointError::NotASocket(_))), "{e}");
    assert!(file_dir.join("cntrl").exists(), "a file that is not a socket is left alone");

    // The stale socket left by the dropped listener is replaced; the socket gets the mode.
    assert!(live_dir.join("cntrl").exists());
    mgr.add_listener(NQN, &ListenAddress::vfio_user(live_dir.to_string_lossy())).unwrap();
    let mode = std::fs::metadata(live_dir.join("cntrl")).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o660);
    // A missing directory is created.
    let deep = dir.path().join("x/y/z");
    mgr.add_listener(NQN, &ListenAddress::vfio_user(deep.to_string_lossy())).unwrap();

    // Two clients on the two listeners of one subsystem at once; both see hot-add.
    let o = |d: &std::path::Path| ClientOptions {
        dir: d.to_path_buf(),
        io_queues: 2,
        buf_size: 4 << 20,
        ..Default::default()
    };
    let mut c1 = NvmeClient::connect(&o(&live_dir)).unwrap();
    let mut c2 = NvmeClient::connect(&o(&deep)).unwrap();
    verify_data(&mut c1, 60, 2);
    verify_data(&mut c2, 61, 2);
    let b2 = malloc_bdev("S2", 4096, 64);
    mgr.add_ns(NQN, b2.clone(), NsOpts::default()).unwrap();
    for c in [&mut c1, &mut c2] {
        wait_until("the namespace to appear", || {
            c.take_async_events().unwrap();
            c.namespaces().len() == 2
        });
    }

    // Removing one listener disconnects only its client.
    mgr.remove_listener(NQN, &ListenAddress::vfio_user(deep.to_string_lossy())).unwrap();
    assert!(c2.submit_read(1, 1, 0, 1, 0, 1).and_then(|_| c2.wait(1, 1, Duration::from_secs(2))).is_err());
    verify_data(&mut c1, 62, 2);

    // Deleting the subsystem with a client attached: disconnected, bdevs released, socket gone.
    mgr.delete_subsystem(NQN).unwrap();
    assert!(!b.is_claimed() && !b2.is_claimed());
    assert!(!live_dir.join("cntrl").exists());
    assert!(c1.submit_read(1, 1, 0, 1, 0, 1).and_then(|_| c1.wait(1, 1, Duration::from_secs(2))).is_err());
    drop((c1, c2));
    mgr.shutdown();
}
