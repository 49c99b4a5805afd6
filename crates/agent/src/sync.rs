//! `nftpolicy sync --once`: read the datastore, program this node's kernel
//! in one transaction, exit.

use anyhow::{bail, Context};
use clap::Args;
use tracing::info;

use crate::dataplane::{load_datastore, Backend, DataplaneArgs};

#[derive(Debug, Clone, Args)]
pub struct SyncArgs {
    #[command(flatten)]
    pub dataplane: DataplaneArgs,
    /// Where the cluster state comes from (file:PATH).
    #[arg(long, env = "NFTPOLICY_DATASTORE")]
    pub datastore: String,
    /// Program once and exit (the long-running agent is `nftpolicy run`).
    #[arg(long)]
    pub once: bool,
}

/// Returns false if some object had to be skipped (the rest is programmed).
pub fn run(args: &SyncArgs) -> anyhow::Result<bool> {
    if !args.once {
        bail!("sync without --once is `nftpolicy run`");
    }
    let (state, skipped) = load_datastore(&args.datastore)?;
    let opts = args.dataplane.compile_options();
    let logical = compiler::compile(&state, &opts)?;
    for (key, why) in &logical.rejected {
        eprintln!("error: skipped {key}: {why}");
    }
    let summary = format!(
        "node {}: {} endpoints, {} active policies",
        opts.node,
        logical.endpoints.len(),
        logical.active_policies.len()
    );
    match args.dataplane.backend {
        Backend::Nftables => {
            let ruleset = compiler::lower_nft::to_nftables(&logical);
            let mut nft =
                programmer::NftProgrammer::new().context("opening the nf_tables netlink socket")?;
            // Start from what the kernel holds, so the transaction is a diff
            // and unchanged chains keep their counters.
            nft.adopt()
                .context("reading our tables back from the kernel")?;
            let report = nft
                .apply(&ruleset)
                .context("programming the nftables ruleset")?;
            info!(
                messages = report.messages,
                bytes = report.bytes,
                "{summary}: nftables programmed"
            );
            // Only now that nftables enforces, remove the other backend's state.
            remove_iptables(&args.dataplane)?;
        }
        Backend::Iptables => {
            let rendered = compiler::render_iptables::to_iptables(&logical);
            let mut ipt = programmer::iptables::IptablesProgrammer::new(
                args.dataplane.iptables_backend.programmer_backend(),
            );
            let report = ipt
                .apply(&rendered)
                .context("programming the iptables ruleset")?;
            info!(
                chains_written = report.chains_written.len(),
                sets_created = report.sets_created.len(),
                members_added = report.members_added,
                members_removed = report.members_removed,
                "{summary}: iptables programmed"
            );
            let mut nft =
                programmer::NftProgrammer::new().context("opening the nf_tables netlink socket")?;
            nft.remove_all()
                .context("removing the nftables backend's tables")?;
        }
    }
    Ok(skipped == 0 && logical.rejected.is_empty())
}

/// Removes iptables-mode state left by an earlier run with `--backend
/// iptables`. A node without the iptables tools cannot have any.
pub fn remove_iptables(args: &crate::dataplane::DataplaneArgs) -> anyhow::Result<()> {
    let mut ipt =
        programmer::iptables::IptablesProgrammer::new(args.iptables_backend.programmer_backend());
    let tool = ipt.tools().save_v4.clone();
    if which(&tool).is_none() {
        return Ok(());
    }
    let report = ipt
        .remove_all()
        .context("removing the iptables backend's chains and sets")?;
    if !report.chains_deleted.is_empty() || !report.sets_destroyed.is_empty() {
        info!(
            chains = report.chains_deleted.len(),
            sets = report.sets_destroyed.len(),
            "iptables backend state removed"
        );
    }
    Ok(())
}

fn which(tool: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(tool))
            .find(|p| p.is_file())
    })
}
