//! `nftpolicy sync --once`: read the datastore, program this node's kernel
//! in one transaction, exit.

use ::dataplane::{Changes, Pipeline};
use anyhow::bail;
use clap::Args;
use tracing::info;

use crate::dataplane::{load_datastore, DataplaneArgs, EtcdTlsArgs};

#[derive(Debug, Clone, Args)]
pub struct SyncArgs {
    #[command(flatten)]
    pub dataplane: DataplaneArgs,
    /// Where the cluster state comes from, read once: `file:PATH`,
    /// `etcd://HOST:2379[,…]` (also `etcds://`, `https://`), `kubernetes`
    /// (in-cluster, or the kubeconfig in KUBECONFIG) or
    /// `kubernetes:KUBECONFIG`.
    #[arg(long, env = "NFTPOLICY_DATASTORE")]
    pub datastore: String,
    #[command(flatten)]
    pub tls: EtcdTlsArgs,
    /// Program once and exit (the long-running agent is `nftpolicy run`).
    #[arg(long)]
    pub once: bool,
}

/// Returns false if some object was rejected or skipped (the rest is
/// programmed; rejected objects fail closed).
pub fn run(args: &SyncArgs) -> anyhow::Result<bool> {
    if !args.once {
        bail!("sync without --once is `nftpolicy run`");
    }
    let (state, skipped) = load_datastore(&args.datastore, &args.tls)?;
    let opts = args.dataplane.compile_options()?;
    let node = opts.node.clone();
    // The nftables backend starts from what the kernel holds, so the
    // transaction is a diff and unchanged chains keep their counters.
    let backend = args.dataplane.open()?;
    let mut pipeline = Pipeline::new(opts, backend);
    let applied = pipeline.apply(&state, &Changes::new());
    if let Some(logical) = pipeline.logical() {
        for (key, why) in &logical.rejected {
            eprintln!("error: rejected {key}: {why}");
        }
    }
    applied?;
    let logical = pipeline.logical().expect("applied");
    let rejected = logical.rejected.len();
    info!(
        "node {node}: {} endpoints, {} active policies: {:?} programmed",
        logical.endpoints.len(),
        logical.active_policies.len(),
        args.dataplane.kind(),
    );
    // Only now that this backend enforces, remove the other backend's state.
    pipeline.dataplane_mut().remove_other()?;
    Ok(skipped == 0 && rejected == 0)
}
