//! `cargo xtask apiserver`: the fake Kubernetes API server — a TEST DOUBLE
//! (crates/testkit/src/apiserver), not a cluster — served until Ctrl-C, with
//! a kubeconfig for `kubectl` and `nftpolicy --datastore kubernetes:FILE`.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use testkit::apiserver::{FakeApiServer, Options};

#[derive(clap::Args)]
pub struct ApiserverArgs {
    /// Where to listen (loopback only; port 0 picks a free one).
    #[arg(long, default_value = "127.0.0.1:6443")]
    addr: SocketAddr,
    /// Where to write the kubeconfig.
    #[arg(long, default_value = "target/apiserver.kubeconfig")]
    kubeconfig: PathBuf,
}

pub fn run(args: &ApiserverArgs) -> anyhow::Result<bool> {
    anyhow::ensure!(
        args.addr.ip().is_loopback(),
        "--addr {}: the test double listens on loopback only",
        args.addr
    );
    let server = FakeApiServer::start_on(args.addr, Options::default())
        .context("starting the fake API server")?;
    let kubeconfig = if args.kubeconfig.is_relative() {
        crate::root().join(&args.kubeconfig)
    } else {
        args.kubeconfig.clone()
    };
    if let Some(dir) = kubeconfig.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    server.write_kubeconfig(&kubeconfig, None)?;
    println!(
        "fake Kubernetes API server (a TEST DOUBLE, not a cluster) on {}\n\
         kubeconfig: {}\n\n  \
         export KUBECONFIG={}\n  \
         kubectl create namespace demo\n  \
         nftpolicy run --node node1 --datastore kubernetes:{}\n\n\
         Ctrl-C stops it (its state is kept in memory only).",
        server.url(),
        kubeconfig.display(),
        kubeconfig.display(),
        kubeconfig.display(),
    );
    let (tx, rx) = std::sync::mpsc::channel();
    ctrlc::set_handler(move || {
        let _ = tx.send(());
    })
    .context("installing the Ctrl-C handler")?;
    let _ = rx.recv();
    println!("stopping");
    drop(server);
    Ok(true)
}
