//! A small QMP client for driving QEMU in tests.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

pub struct Qmp {
    w: UnixStream,
    r: BufReader<UnixStream>,
    /// Events seen while waiting for replies.
    pub events: Vec<Value>,
}

impl Qmp {
    /// Connects (retrying while QEMU starts) and negotiates capabilities.
    pub fn connect(path: &Path) -> Qmp {
        let deadline = Instant::now() + Duration::from_secs(60);
        let s = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) => {
                    assert!(Instant::now() < deadline, "QMP {}: {e}", path.display());
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        };
        s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
        let mut q = Qmp { w: s.try_clone().unwrap(), r: BufReader::new(s), events: Vec::new() };
        let greeting = q.read();
        assert!(greeting.get("QMP").is_some(), "{greeting}");
        q.cmd("qmp_capabilities", json!({}));
        q
    }

    fn read(&mut self) -> Value {
        self.try_read().unwrap_or_else(|e| panic!("QMP read: {e}"))
    }

    /// The next message; an error once QEMU has closed the connection (it quit or died).
    fn try_read(&mut self) -> Result<Value, String> {
        let mut line = String::new();
        match self.r.read_line(&mut line) {
            Ok(0) => Err("QEMU closed the QMP connection".into()),
            Ok(_) => serde_json::from_str(&line).map_err(|e| format!("QMP reply {line:?}: {e}")),
            Err(e) => Err(e.to_string()),
        }
    }

    /// Runs a command; returns its "return" value (panics on "error").
    pub fn cmd(&mut self, name: &str, args: Value) -> Value {
        self.try_cmd(name, args).unwrap_or_else(|e| panic!("QMP {name}: {e}"))
    }

    /// Runs a command; an "error" reply, or a QEMU that is gone, is returned as `Err`.
    pub fn try_cmd(&mut self, name: &str, args: Value) -> Result<Value, Value> {
        let req = json!({"execute": name, "arguments": args});
        if let Err(e) = self.w.write_all(format!("{req}\n").as_bytes()) {
            return Err(json!({"desc": format!("QMP write: {e}")}));
        }
        loop {
            let v = self.try_read().map_err(|e| json!({ "desc": e }))?;
            if v.get("event").is_some() {
                self.events.push(v);
                continue;
            }
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            return Err(v.get("error").cloned().unwrap_or(v));
        }
    }
}
