#![allow(clippy::cast_possible_wrap, clippy::cast_possible_truncation, clippy::cast_sign_loss)] // small test values
//! The daemon as operators and tools see it: JSON-RPC over its socket with `vstor rpc`, raw
//! sockets and SPDK's own `spdk-rpc`, config files, signals, idle CPU.

mod common;

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

#[test]
fn bdevs_are_created_listed_measured_and_deleted_over_vstor_rpc() {
    let d = Daemon::start(&[]);
    let img = d.dir.path().join("disk.img");
    std::fs::File::create(&img).unwrap().set_len(8 << 20).unwrap();
    let img_s = img.to_str().unwrap();

    let (code, out, err) = vstor_rpc(
        &d.sock,
        &["bdev_malloc_create", "--name", "Malloc0", "--num_blocks", "16384", "--block_size", "512"],
    );
    assert_eq!((code, out.trim()), (0, "Malloc0"), "{err}");
    let (code, out, _) = vstor_rpc(&d.sock, &["bdev_malloc_create", "--num-blocks", "64", "--block-size", "4096"]);
    assert_eq!((code, out.trim()), (0, "Malloc1"), "a name is generated when none is given");
    d.rpc_ok("bdev_null_create", json!({"name": "Null0", "num_blocks": 1000, "block_size": 4096}));
    d.rpc_ok("bdev_uring_create", json!({"name": "Uring0", "filename": img_s}));
    d.rpc_ok("bdev_aio_create", json!({"name": "Aio0", "filename": img_s, "block_size": 4096, "readonly": true}));

    let list = d.rpc_ok("bdev_get_bdevs", Value::Null);
    let names: Vec<&str> = list.as_array().unwrap().iter().map(|b| b["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["Aio0", "Malloc0", "Malloc1", "Null0", "Uring0"]);
    let m0 = &d.rpc_ok("bdev_get_bdevs", json!({"name": "Malloc0"}))[0];
    assert_eq!((m0["num_blocks"].as_u64(), m0["block_size"].as_u64()), (Some(16384), Some(512)));
    assert_eq!(m0["product_name"], "Malloc disk");
    assert_eq!(m0["supported_io_types"]["unmap"], true);
    let aio = &d.rpc_ok("bdev_get_bdevs", json!({"name": "Aio0"}))[0];
    assert_eq!(aio["num_blocks"].as_u64(), Some(2048));
    assert_eq!(aio["supported_io_types"]["write"], false, "read-only aio bdev");
    let u = &d.rpc_ok("bdev_get_bdevs", json!({"name": "Uring0"}))[0];
    assert_eq!(u["product_name"], "URING bdev");
    assert_eq!(u["driver_specific"]["uring"]["filename"], img_s);

    // Lookup by UUID works where a name is expected.
    let uuid = m0["uuid"].as_str().unwrap();
    assert_eq!(d.rpc_ok("bdev_get_bdevs", json!({"name": uuid}))[0]["name"], "Malloc0");

    let st = d.rpc_ok("bdev_get_iostat", json!({"names": ["Malloc0", "Null0"]}));
    assert!(st["tick_rate"].as_u64().unwrap() >= 1_000_000, "ticks per second: {st}");
    assert_eq!(st["bdevs"].as_array().unwrap().len(), 2);
    assert_eq!(st["bdevs"][0]["num_read_ops"], 0);

    let err = d.rpc("bdev_malloc_delete", json!({"name": "Null0"})).unwrap_err();
    assert!(err["message"].as_str().unwrap().contains("not a Malloc disk"), "{err}");
    for (m, n) in [
        ("bdev_malloc_delete", "Malloc0"),
        ("bdev_null_delete", "Null0"),
        ("bdev_uring_delete", "Uring0"),
        ("bdev_aio_delete", "Aio0"),
    ] {
        assert_eq!(d.rpc_ok(m, json!({"name": n})), json!(true));
    }
    let err = d.rpc("bdev_malloc_delete", json!({"name": "Malloc0"})).unwrap_err();
    assert_eq!(err["code"], -libc::ENODEV, "{err}");
    let (code, _, err) = vstor_rpc(&d.sock, &["bdev_malloc_delete", "--name", "Malloc0"]);
    assert_eq!(code, 1);
    assert!(err.contains("Malloc0") && err.contains("not found"), "{err}");
    assert_eq!(d.rpc_ok("bdev_get_bdevs", Value::Null).as_array().unwrap().len(), 1);
}

#[test]
fn bad_parameters_are_refused_with_messages_naming_them() {
    let d = Daemon::start(&[]);
    let cases = [
        ("bdev_malloc_create", json!({"num_blocks": 16}), "block_size"),
        ("bdev_malloc_create", json!({"num_blocks": "many", "block_size": 512}), "num_blocks"),
        ("bdev_malloc_create", json!({"num_blocks": 16, "block_size": 500}), "block_size"),
        ("bdev_malloc_create", json!({"num_blocks": 16, "block_size": 512, "bogus": 1}), "bogus"),
        ("bdev_malloc_create", json!({"num_blocks": 16, "block_size": 512, "md_size": 8}), "md_size"),
        ("bdev_malloc_create", json!({"num_blocks": 16, "block_size": 512, "uuid": "xyz"}), "uuid"),
        ("bdev_null_create", json!({"name": "N", "num_blocks": 0, "block_size": 512}), "num_blocks"),
        ("bdev_uring_create", json!({"name": "U"}), "filename"),
        ("bdev_get_iostat", json!({"reset_mode": "sometimes"}), "reset_mode"),
        ("framework_get_config", json!({}), "name"),
        ("spdk_kill_instance", json!({"sig_name": "SIGFOO"}), "sig_name"),
    ];
    for (m, p, param) in cases {
        let e = d.rpc(m, p.clone()).expect_err(m);
        assert_eq!(e["code"], -32602, "{m} {p}: {e}");
        assert!(e["message"].as_str().unwrap().contains(param), "{m} {p}: message should name '{param}': {e}");
    }
    let e = d.rpc("bdev_uring_create", json!({"name": "U", "filename": "/no/such/file"})).unwrap_err();
    assert_eq!(e["code"], -libc::ENOENT);
    assert!(e["message"].as_str().unwrap().contains("/no/such/file"));
    let e = d.rpc("no_such_method", Value::Null).unwrap_err();
    assert_eq!(e["code"], -32601);
    d.rpc_ok("bdev_null_create", json!({"name": "N", "num_blocks": 8, "block_size": 512}));
    let e = d.rpc("bdev_null_create", json!({"name": "N", "num_blocks": 8, "block_size": 512})).unwrap_err();
    assert_eq!(e["code"], -libc::EEXIST);
}

#[test]
fn malformed_oversized_and_abandoned_requests_leave_the_daemon_serving() {
    let d = Daemon::start(&[]);
    // Malformed JSON: a parse error, then the connection closes.
    let mut s = UnixStream::connect(&d.sock).unwrap();
    s.write_all(b"{\"jsonrpc\": \"2.0\", \"method\": ]").unwrap();
    let r = read_one(&mut s).unwrap();
    assert_eq!(r["error"]["code"], -32700);
    // Not an object / no method.
    let mut s = UnixStream::connect(&d.sock).unwrap();
    s.write_all(b"42 {\"id\": 3}").unwrap();
    assert_eq!(read_one(&mut s).unwrap()["error"]["code"], -32600);
    // Params of the wrong shape.
    let mut s = UnixStream::connect(&d.sock).unwrap();
    s.write_all(br#"{"jsonrpc":"2.0","id":1,"method":"bdev_get_bdevs","params":[1,2]}"#).unwrap();
    assert_eq!(read_one(&mut s).unwrap()["error"]["code"], -32602);

    // A 10 MB request: refused with an error, connection closed.
    let mut s = UnixStream::connect(&d.sock).unwrap();
    let big = format!(
        r#"{{"jsonrpc":"2.0","id":1,"method":"bdev_get_bdevs","params":{{"name":"{}"}}}}"#,
        "x".repeat(10 << 20)
    );
    let _ = s.write_all(big.as_bytes());
    let r = read_one(&mut s).unwrap();
    assert_eq!(r["error"]["code"], -32600, "{r}");
    assert!(r["error"]["message"].as_str().unwrap().contains("limit"));

    // Half a request, left hanging, and a client that leaves mid-request.
    let mut half = UnixStream::connect(&d.sock).unwrap();
    half.write_all(br#"{"jsonrpc":"2.0","id":1,"method":"bdev_get"#).unwrap();
    {
        let mut gone = UnixStream::connect(&d.sock).unwrap();
        gone.write_all(br#"{"jsonrpc":"2.0","id":1,"method":"#).unwrap();
    }
    // Two requests back to back without a separator, as SPDK's client can send them.
    let mut s = UnixStream::connect(&d.sock).unwrap();
    s.write_all(b"{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"spdk_get_version\"}{\"jsonrpc\":\"2.0\",\"id\":2,\"method\":\"rpc_get_methods\"}").unwrap();
    assert_eq!(read_one(&mut s).unwrap()["id"], 1);
    // A notification (no id) gets no answer; a batch gets an array.
    let mut s = UnixStream::connect(&d.sock).unwrap();
    s.write_all(br#"{"jsonrpc":"2.0","method":"spdk_get_version"} [{"jsonrpc":"2.0","id":5,"method":"spdk_get_version"},{"jsonrpc":"2.0","id":6,"method":"nope"}]"#).unwrap();
    let r = read_one(&mut s).unwrap();
    assert_eq!(r[0]["id"], 5);
    assert_eq!(r[1]["error"]["code"], -32601);

    // The daemon still answers, with the half request still open.
    assert_eq!(d.rpc_ok("spdk_get_version", Value::Null)["fields"]["major"], 0);
    drop(half);
}

#[test]
fn a_hundred_concurrent_clients_are_all_answered() {
    let d = Daemon::start(&[]);
    let sock = d.sock.clone();
    let threads: Vec<_> = (0..100)
        .map(|i| {
            let sock = sock.clone();
            std::thread::spawn(move || {
                let name = format!("N{i}");
                rpc_at(&sock, "bdev_null_create", json!({"name": name, "num_blocks": 8, "block_size": 512})).unwrap();
                rpc_at(&sock, "bdev_get_bdevs", json!({"name": name})).unwrap()
            })
        })
        .collect();
    for t in threads {
        assert_eq!(t.join().unwrap().as_array().unwrap().len(), 1);
    }
    assert_eq!(d.rpc_ok("bdev_get_bdevs", Value::Null).as_array().unwrap().len(), 100);
}

#[test]
fn framework_methods_answer_in_spdk_shapes() {
    let d = Daemon::start(&["--cpumask", "0x1"]);
    let methods = d.rpc_ok("rpc_get_methods", Value::Null);
    for m in [
        "rpc_get_methods",
        "spdk_get_version",
        "framework_get_subsystems",
        "framework_get_config",
        "framework_get_reactors",
        "framework_wait_init",
        "bdev_malloc_create",
        "bdev_malloc_delete",
        "bdev_null_create",
        "bdev_null_delete",
        "bdev_aio_create",
        "bdev_aio_delete",
        "bdev_uring_create",
        "bdev_uring_delete",
        "bdev_get_bdevs",
        "bdev_get_iostat",
        "spdk_kill_instance",
    ] {
        assert!(methods.as_array().unwrap().contains(&json!(m)), "{m} missing from rpc_get_methods");
    }
    let v = d.rpc_ok("spdk_get_version", Value::Null);
    assert_eq!(v["version"], format!("vstor v{}", env!("CARGO_PKG_VERSION")));
    let r = d.rpc_ok("framework_get_reactors", Value::Null);
    assert_eq!(r["reactors"][0]["lcore"], 0);
    assert_eq!(r["pid"], d.pid());
    assert_eq!(d.rpc_ok("framework_wait_init", Value::Null), json!(true));
    let subs = d.rpc_ok("framework_get_subsystems", Value::Null);
    assert_eq!(subs[0]["subsystem"], "bdev");
}

#[test]
fn config_files_load_at_start_and_errors_name_file_method_and_parameter() {
    let dir = test_dir();
    let cfg = dir.path().join("bad.json");
    std::fs::write(
        &cfg,
        r#"{"subsystems":[{"subsystem":"bdev","config":[
            {"method":"bdev_malloc_create","params":{"name":"M0","num_blocks":32,"block_size":512}},
            {"method":"bdev_null_create","params":{"name":"N0","num_blocks":32,"block_size":513}}]}]}"#,
    )
    .unwrap();
    let out = std::process::Command::new(vstor_bin())
        .args(["serve", "--config"])
        .arg(&cfg)
        .arg("--rpc-socket")
        .arg(dir.path().join("s.sock"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    for want in ["bad.json", "bdev_null_create", "block_size", "entry 1"] {
        assert!(err.contains(want), "error should mention {want}: {err}");
    }
    let out = std::process::Command::new(vstor_bin()).args(["serve", "--cpumask", "0xZ"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("0xZ"));

    let good = dir.path().join("good.json");
    std::fs::write(&good, r#"{"subsystems":[{"subsystem":"bdev","config":[{"method":"bdev_malloc_create","params":{"name":"M0","num_blocks":32,"block_size":512}}, {"method":"bdev_wait_for_examine"}]}]}"#).unwrap();
    let d = Daemon::start(&["--config", good.to_str().unwrap()]);
    assert_eq!(d.rpc_ok("bdev_get_bdevs", json!({"name": "M0"}))[0]["num_blocks"], 32);
}

#[test]
fn sigterm_and_kill_instance_stop_the_daemon_cleanly() {
    let mut d = Daemon::start(&[]);
    d.signal(libc::SIGTERM);
    let st = d.wait_exit(Duration::from_secs(20)).expect("exits after SIGTERM");
    assert_eq!(st.code(), Some(0), "{}", d.log());
    assert!(!d.sock.exists(), "socket file removed");

    let mut d = Daemon::start(&[]);
    assert_eq!(d.rpc_ok("spdk_kill_instance", json!({"sig_name": "SIGTERM"})), json!(true));
    let st = d.wait_exit(Duration::from_secs(20)).expect("exits after spdk_kill_instance");
    assert_eq!(st.code(), Some(0), "{}", d.log());

    // A controller whose socket file someone removed (an operator's cleanup script, a tmpfiles
    // run) still lets the daemon stop: the connection thread is woken without the socket.
    let mut d = Daemon::start(&["--default-config"]);
    d.rpc_ok("vhost_create_scsi_controller", json!({"ctrlr": "vs"}));
    for c in ["vhost.0", "vs"] {
        std::fs::remove_file(d.dir.path().join(c)).unwrap();
    }
    d.signal(libc::SIGTERM);
    let st = d.wait_exit(Duration::from_secs(20)).expect("exits after SIGTERM with its sockets removed");
    assert_eq!(st.code(), Some(0), "{}", d.log());
}

#[test]
fn an_idle_daemon_uses_almost_no_cpu() {
    let d = Daemon::start(&["--cpumask", "0x3", "--default-config"]);
    std::thread::sleep(Duration::from_millis(500));
    let t0 = d.cpu_ticks();
    std::thread::sleep(Duration::from_secs(10));
    let used = d.cpu_ticks() - t0;
    // 100 ticks per second: two spinning reactors would use ~2000 ticks in 10 s. Allow 5%.
    assert!(used < 50, "idle daemon used {used} ticks in 10 s");
}

#[test]
fn spdk_rpc_manages_bdevs_and_save_config_round_trips() {
    let Some(spdk) = spdk_rpc() else { return };
    let d = Daemon::start(&[]);
    let img = d.dir.path().join("disk.img");
    std::fs::File::create(&img).unwrap().set_len(4 << 20).unwrap();
    let ok = |args: &[&str]| {
        let (code, out, err) = run_spdk(&spdk, &d.sock, args);
        assert_eq!(code, 0, "spdk-rpc {args:?}: {out} {err}");
        out
    };
    assert_eq!(ok(&["bdev_malloc_create", "-b", "Malloc0", "64", "512"]).trim(), "Malloc0");
    assert_eq!(ok(&["bdev_null_create", "Null0", "16", "4096"]).trim(), "Null0");
    assert_eq!(ok(&["bdev_uring_create", img.to_str().unwrap(), "Uring0"]).trim(), "Uring0");
    assert_eq!(ok(&["bdev_aio_create", img.to_str().unwrap(), "Aio0", "4096"]).trim(), "Aio0");
    let list: Value = serde_json::from_str(&ok(&["bdev_get_bdevs"])).unwrap();
    assert_eq!(list.as_array().unwrap().len(), 4);
    let m: Value = serde_json::from_str(&ok(&["bdev_get_bdevs", "-b", "Malloc0"])).unwrap();
    assert_eq!(m[0]["num_blocks"], 131072);
    let st: Value = serde_json::from_str(&ok(&["bdev_get_iostat"])).unwrap();
    assert_eq!(st["bdevs"].as_array().unwrap().len(), 4);
    let st: Value = serde_json::from_str(&ok(&["bdev_get_iostat", "-c"])).unwrap();
    assert!(st["bdevs"][0]["channels"].is_array());
    ok(&["framework_get_reactors"]);
    ok(&["spdk_get_version"]);

    // Errors come back as failures with vstor's message.
    let (code, out, _) = run_spdk(&spdk, &d.sock, &["bdev_malloc_delete", "Nope"]);
    assert_ne!(code, 0);
    assert!(out.contains("Nope"), "{out}");

    let saved = ok(&["save_config"]);
    let cfg = d.dir.path().join("saved.json");
    std::fs::write(&cfg, &saved).unwrap();
    ok(&["bdev_null_delete", "Null0"]);
    ok(&["bdev_aio_delete", "Aio0"]);

    // A fresh daemon from the saved file has the same bdevs (names, UUIDs, geometry).
    let d2 = Daemon::start(&["--config", cfg.to_str().unwrap()]);
    let key = |v: &Value| -> Vec<(String, String, u64, u64)> {
        let mut k: Vec<_> = v
            .as_array()
            .unwrap()
            .iter()
            .map(|b| {
                (
                    b["name"].as_str().unwrap().into(),
                    b["uuid"].as_str().unwrap().into(),
                    b["num_blocks"].as_u64().unwrap(),
                    b["block_size"].as_u64().unwrap(),
                )
            })
            .collect();
        k.sort();
        k
    };
    let before: Value = serde_json::from_str(&saved).unwrap();
    assert!(before["subsystems"][0]["config"].as_array().unwrap().len() >= 4);
    let restored = d2.rpc_ok("bdev_get_bdevs", Value::Null);
    assert_eq!(key(&restored), key(&list));
    // And spdk-rpc load_config replays the same file into a running empty daemon.
    let d3 = Daemon::start(&[]);
    let (code, out, err) = run_spdk(&spdk, &d3.sock, &["load_config", "-j", cfg.to_str().unwrap()]);
    assert_eq!(code, 0, "{out} {err}");
    assert_eq!(key(&d3.rpc_ok("bdev_get_bdevs", Value::Null)), key(&list));
    // spdk_kill_instance through SPDK's client stops it.
    ok(&["spdk_kill_instance", "SIGTERM"]);
}
