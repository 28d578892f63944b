//! Runs every committed seed through its harness (no libFuzzer needed): the seeds must not crash,
//! and these tests keep the harnesses building and working on the stable toolchain.
//!
//! `VSTOR_FUZZ_LOG=debug cargo test -- --nocapture` shows what vstor logged for each seed.

fn logs() {
    if let Ok(level) = std::env::var("VSTOR_FUZZ_LOG") {
        let _ = tracing_subscriber::fmt().with_env_filter(level).with_test_writer().try_init();
    }
}

fn seeds(target: &str, f: fn(&[u8])) {
    logs();
    let n = vstor_fuzz::run_seeds(target, f);
    assert!(n > 0, "no seeds for {target}");
}

#[test]
fn virtio_split_chain() {
    seeds("virtio_split_chain", vstor_fuzz::virtio::split_chain);
}

#[test]
fn virtio_packed_chain() {
    seeds("virtio_packed_chain", vstor_fuzz::virtio::packed_chain);
}

#[test]
fn virtio_blk_request() {
    seeds("virtio_blk_request", vstor_fuzz::blk::request);
}

#[test]
fn scsi_cdb() {
    seeds("scsi_cdb", vstor_fuzz::scsi::cdb);
}

#[test]
fn nvme_cmd() {
    seeds("nvme_cmd", vstor_fuzz::nvme::cmd);
}

#[test]
fn jsonrpc() {
    seeds("jsonrpc", vstor_fuzz::rpc::jsonrpc);
}

#[test]
fn config() {
    seeds("config", vstor_fuzz::rpc::config);
}

#[test]
fn vhost_user_msgs() {
    seeds("vhost_user_msgs", vstor_fuzz::vhost_user::msgs);
}

#[test]
fn vfio_user_msgs() {
    seeds("vfio_user_msgs", vstor_fuzz::vfio_user::msgs);
}
