//! NVMe over vfio-user from the daemon's side: SPDK's nvmf RPCs (through SPDK's own client when
//! installed), the NVMe client library bringing the controller up over the socket, data on two
//! namespaces, config save and replay across a restart, claims, a client dying mid-I/O.
#![allow(clippy::cast_possible_truncation)]

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use serde_json::json;
use vstor::perf::workload::{check, fill};
use vstor_vfio_user::client::{ClientOptions, NvmeClient};

const NQN: &str = "nqn.2019-07.io.spdk:cnode0";
const T: Duration = Duration::from_secs(20);

/// Connects, retrying while the previous client's session is still being torn down (vstor
/// serves one client per controller and refuses a second one meanwhile).
fn client(dir: &Path, io_queues: u16, interrupts: bool) -> NvmeClient {
    let o = ClientOptions { dir: dir.to_path_buf(), io_queues, interrupts, buf_size: 4 << 20, ..Default::default() };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        match NvmeClient::connect(&o) {
            Ok(c) => return c,
            Err(e) if std::time::Instant::now() > deadline => panic!("NVMe client: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// Writes `gen`'s pattern to the first 64 KiB chunks of every namespace from every queue, or
/// checks it is there.
fn io(c: &mut NvmeClient, generation: u64, write: bool) {
    const CHUNK: usize = 64 << 10;
    let nq = c.io_queues();
    for ns in c.namespaces().to_vec() {
        let blocks = (CHUNK / ns.block_size as usize) as u32;
        for q in 1..=nq {
            for i in 0..4usize {
                let unit = u64::from(q) * 16 + i as u64;
                let off = (usize::from(q - 1) * 4 + i) * CHUNK;
                let lba = unit * u64::from(blocks);
                if write {
                    fill(&mut c.buf()[off..off + CHUNK], unit ^ u64::from(ns.nsid) << 40, generation);
                    c.submit_write(q, ns.nsid, lba, blocks, off, i as u16).unwrap();
                } else {
                    c.buf()[off..off + CHUNK].fill(0);
                    c.submit_read(q, ns.nsid, lba, blocks, off, i as u16).unwrap();
                }
            }
        }
        for q in 1..=nq {
            for (tag, status) in c.wait(q, 4, T).unwrap() {
                assert_eq!(status, 0, "ns {} queue {q} tag {tag}", ns.nsid);
            }
        }
        if !write {
            for q in 1..=nq {
                for i in 0..4usize {
                    let unit = u64::from(q) * 16 + i as u64;
                    let off = (usize::from(q - 1) * 4 + i) * CHUNK;
                    assert!(
                        check(&c.buf()[off..off + CHUNK], unit ^ u64::from(ns.nsid) << 40, generation),
                        "ns {} unit {unit}: data differs",
                        ns.nsid
                    );
                }
            }
        }
    }
}

fn setup(d: &Daemon, img: &Path, traddr: &Path) {
    let calls = [
        ("bdev_malloc_create", json!({"name": "M0", "num_blocks": 32768, "block_size": 512})),
        ("bdev_uring_create", json!({"name": "U0", "filename": img.to_str().unwrap(), "block_size": 4096})),
        ("nvmf_create_transport", json!({"trtype": "VFIOUSER"})),
        ("nvmf_create_subsystem", json!({"nqn": NQN, "allow_any_host": true, "serial_number": "VSTOR0001"})),
        ("nvmf_subsystem_add_ns", json!({"nqn": NQN, "namespace": {"bdev_name": "M0"}})),
        ("nvmf_subsystem_add_ns", json!({"nqn": NQN, "namespace": {"bdev_name": "U0", "nsid": 5}})),
        (
            "nvmf_subsystem_add_listener",
            json!({"nqn": NQN, "listen_address": {"trtype": "VFIOUSER", "traddr": traddr.to_str().unwrap(), "adrfam": "IPv4", "trsvcid": "0"}}),
        ),
    ];
    for (m, p) in calls {
        d.rpc_ok(m, p);
    }
}

#[test]
fn subsystems_over_rpc_serve_data_and_survive_save_and_replay() {
    let dir = test_dir();
    let img = dir.path().join("ns.img");
    std::fs::File::create(&img).unwrap().set_len(32 << 20).unwrap();
    let traddr = dir.path().join("nvme0");
    let mut d = Daemon::start_in(dir, &["--cpumask", "0x3"]);
    setup(&d, &img, &traddr);
    assert!(traddr.join("cntrl").exists(), "the socket is <traddr>/cntrl");

    let subs = d.rpc_ok("nvmf_get_subsystems", json!({}));
    assert_eq!(subs[0]["subtype"], "Discovery");
    assert_eq!(subs[1]["nqn"], NQN);
    assert_eq!(subs[1]["serial_number"], "VSTOR0001");
    assert_eq!(subs[1]["namespaces"][1]["nsid"], 5);
    assert_eq!(subs[1]["listen_addresses"][0]["trtype"], "VFIOUSER");

    let mut c = client(&traddr, 4, false);
    let ns = c.namespaces().to_vec();
    assert_eq!(
        ns.iter().map(|n| (n.nsid, n.block_size, n.blocks)).collect::<Vec<_>>(),
        [(1, 512, 32768), (5, 4096, 8192)]
    );
    assert!(c.shadow_doorbells_active() && c.doorbells_mapped(), "SPDK's transport defaults");
    io(&mut c, 1, true);
    io(&mut c, 1, false);

    // Namespace hot-add, then hot-remove by deleting its bdev (as SPDK does on a bdev
    // hot-remove): the connected host is told each time and rescans.
    d.rpc_ok("bdev_malloc_create", json!({"name": "M9", "num_blocks": 2048, "block_size": 512}));
    d.rpc_ok("nvmf_subsystem_add_ns", json!({"nqn": NQN, "namespace": {"bdev_name": "M9", "nsid": 7}}));
    let nsids = |c: &NvmeClient| c.namespaces().iter().map(|n| n.nsid).collect::<Vec<_>>();
    let deadline = std::time::Instant::now() + T;
    while nsids(&c) != [1, 5, 7] {
        assert!(std::time::Instant::now() < deadline, "the host never saw namespace 7: {:?}", nsids(&c));
        c.take_async_events().unwrap();
        std::thread::sleep(Duration::from_millis(20));
    }
    d.rpc_ok("bdev_malloc_delete", json!({"name": "M9"}));
    while nsids(&c) != [1, 5] {
        assert!(std::time::Instant::now() < deadline, "namespace 7 outlived its bdev: {:?}", nsids(&c));
        c.take_async_events().unwrap();
        std::thread::sleep(Duration::from_millis(20));
    }
    let subs = d.rpc_ok("nvmf_get_subsystems", json!({}));
    assert_eq!(subs[1]["namespaces"].as_array().unwrap().len(), 2, "{subs}");
    assert!(d.log().contains("hot-removing"), "the log says what happened");
    // Errors name what is wrong.
    let e = d.rpc("nvmf_subsystem_add_ns", json!({"nqn": NQN, "namespace": {"bdev_name": "nope"}})).unwrap_err();
    assert!(e["message"].as_str().unwrap().contains("bdev_name"), "{e}");
    let e = d.rpc("nvmf_create_subsystem", json!({"nqn": "not-an-nqn"})).unwrap_err();
    assert!(e["message"].as_str().unwrap().contains("nqn"), "{e}");
    let e = d.rpc("nvmf_create_transport", json!({"trtype": "TCP"})).unwrap_err();
    assert!(e["message"].as_str().unwrap().contains("TCP"), "{e}");

    // A client that vanishes with I/O in flight leaves the controller usable for the next one.
    for q in 1..=4u16 {
        for i in 0..8u16 {
            c.submit_read(q, 1, u64::from(i) * 8, 8, usize::from(q * 8 + i) * 4096, i).unwrap();
        }
    }
    drop(c);
    let mut c = client(&traddr, 2, true);
    io(&mut c, 1, false);
    assert!(c.interrupts_received() > 0, "MSI-X completions");
    drop(c);

    // save_config, restart from it: the file-backed namespace keeps its data.
    let cfg = d.rpc_ok("framework_get_config", json!({"name": "nvmf"}));
    let methods: Vec<&str> = cfg.as_array().unwrap().iter().map(|e| e["method"].as_str().unwrap()).collect();
    assert_eq!(
        methods,
        [
            "nvmf_create_transport",
            "nvmf_create_subsystem",
            "nvmf_subsystem_add_ns",
            "nvmf_subsystem_add_ns",
            "nvmf_subsystem_add_listener"
        ]
    );
    let (code, out, err) = vstor_rpc(&d.sock, &["save_config"]);
    assert_eq!(code, 0, "{err}");
    let path = d.dir.path().join("saved.json");
    std::fs::write(&path, out).unwrap();
    d.kill_and_restart(Some(&["--cpumask", "0x3", "--config", path.to_str().unwrap()]));
    let mut c = client(&traddr, 1, false);
    assert_eq!(c.namespaces().len(), 2);
    let u = c.namespaces()[1];
    assert_eq!((u.nsid, u.block_size), (5, 4096));
    // Namespace 5 is the file: generation 1 is still there. (M0 is a new RAM disk.)
    const CHUNK: usize = 64 << 10;
    c.submit_read(1, 5, 16 * 16, 16, 0, 1).unwrap();
    assert_eq!(c.wait(1, 1, T).unwrap()[0].1, 0);
    assert!(check(&c.buf()[..CHUNK], 16 ^ 5u64 << 40, 1), "file namespace data survived the restart");
    drop(c);

    // Deleting the subsystem releases the bdevs and removes the socket.
    d.rpc_ok("nvmf_delete_subsystem", json!({"nqn": NQN}));
    assert!(!traddr.join("cntrl").exists());
    d.rpc_ok("bdev_malloc_delete", json!({"name": "M0"}));
}

#[test]
fn spdk_rpc_client_drives_the_nvmf_methods() {
    let Some(spdk) = spdk_rpc() else { return };
    let dir = test_dir();
    let traddr = dir.path().join("vfu");
    let d = Daemon::start_in(dir, &[]);
    let sock = d.sock.clone();
    let ok = |args: &[&str]| {
        let (code, out, err) = run_spdk(&spdk, &sock, args);
        assert_eq!(code, 0, "spdk-rpc {args:?}: {err}");
        out
    };
    ok(&["bdev_malloc_create", "-b", "Malloc0", "16", "512"]);
    ok(&["nvmf_create_transport", "-t", "VFIOUSER", "-S"]);
    ok(&["nvmf_create_subsystem", NQN, "-a", "-s", "SPDK00000000000001", "-m", "8"]);
    let nsid = ok(&["nvmf_subsystem_add_ns", NQN, "Malloc0", "-n", "3", "-g", "0123456789abcdef0123456789abcdef"]);
    // spdk-rpc prints the new nsid in some releases and nothing in others (26.9).
    assert!(matches!(nsid.trim(), "" | "3"), "nvmf_subsystem_add_ns printed {nsid:?}");
    ok(&["nvmf_subsystem_add_listener", NQN, "-t", "VFIOUSER", "-a", traddr.to_str().unwrap(), "-s", "0"]);
    let subs: serde_json::Value = serde_json::from_str(&ok(&["nvmf_get_subsystems"])).unwrap();
    assert_eq!(subs[1]["namespaces"][0]["nsid"], 3, "{subs}");
    let nguid = subs[1]["namespaces"][0]["nguid"].as_str().unwrap_or_default().replace('-', "");
    assert_eq!(nguid.to_lowercase(), "0123456789abcdef0123456789abcdef", "{subs}");
    let t: serde_json::Value = serde_json::from_str(&ok(&["nvmf_get_transports"])).unwrap();
    assert_eq!(t[0]["trtype"], "VFIOUSER");
    assert_eq!(t[0]["disable_shadow_doorbells"], true);
    let mut c = client(&traddr, 1, false);
    assert!(!c.shadow_doorbells_active(), "-S turned shadow doorbells off");
    assert_eq!(c.namespaces()[0].nsid, 3);
    io(&mut c, 7, true);
    io(&mut c, 7, false);
    drop(c);
    ok(&["nvmf_subsystem_remove_ns", NQN, "3"]);
    ok(&["nvmf_delete_subsystem", NQN]);
    ok(&["bdev_malloc_delete", "Malloc0"]);
}

#[test]
fn perf_drives_the_controller_and_verifies_data() {
    let dir = test_dir();
    let img = dir.path().join("ns.img");
    std::fs::File::create(&img).unwrap().set_len(32 << 20).unwrap();
    let traddr = dir.path().join("nvme0");
    let d = Daemon::start_in(dir, &["--cpumask", "0x1"]);
    setup(&d, &img, &traddr);
    for (extra, nsid) in [(vec!["--no-shadow-doorbells"], "1"), (vec!["--interrupts"], "5")] {
        let pid = d.pid().to_string();
        let mut args = vec!["perf", "--nvme-vfio-user", traddr.to_str().unwrap(), "--nsid", nsid, "-w", "verify"];
        args.extend(["-q", "16", "--queues", "2", "-t", "1", "-o", "8192", "--json", "--target-pid", &pid]);
        args.extend(extra.iter().copied());
        let out = std::process::Command::new(vstor_bin()).args(&args).output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{args:?}: {stdout} {}", String::from_utf8_lossy(&out.stderr));
        let r: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
        assert!(r["ios"].as_u64().unwrap() > 100, "{r}");
        assert_eq!((r["errors"].as_u64(), r["miscompares"].as_u64()), (Some(0), Some(0)), "{r}");
        assert!(r["cpu_ns_per_io"].as_f64().unwrap() > 0.0, "target CPU measured: {r}");
        let label = r["label"].as_str().unwrap();
        assert!(label.contains(&format!("ns {nsid}")), "{label}");
    }
    // A bad size is refused naming the option.
    let out = std::process::Command::new(vstor_bin())
        .args(["perf", "--nvme-vfio-user", traddr.to_str().unwrap(), "--nsid", "5", "-o", "512", "-t", "1"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--io-size 512"));
}
