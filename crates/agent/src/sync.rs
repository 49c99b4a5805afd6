//! `nftpolicy sync --once`: read the datastore, program this node's kernel
//! in one transaction, exit.

use anyhow::{bail, Context};
use clap::Args;
use tracing::info;

use crate::dataplane::{load_datastore, Backend, DataplaneArgs, EtcdTlsArgs};

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

/// Returns false if some object had to be skipped (the rest is programmed).
pub fn run(args: &SyncArgs) -> anyhow::Result<bool> {
    if !args.once {
        bail!("sync without --once is `nftpolicy run`");
    }
    let (state, skipped) = load_datastore(&args.datastore, &args.tls)?;
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
///
/// The legacy tools read x_tables through a raw socket (CAP_NET_RAW), which
/// an nftables agent otherwise never needs; so first look, without any
/// privilege, whether this namespace can hold legacy leftovers at all: our
/// `cali-` chains live in the `filter` table, which ip_tables_names (and
/// ip6_tables_names) in /proc/thread-self/net list only once it exists in
/// this thread's namespace (/proc/net is the main thread's). Without it only our ipsets
/// can be left (an iptables apply killed between its `ipset restore` and its
/// `iptables-restore`), and `ipset` needs only CAP_NET_ADMIN.
pub fn remove_iptables(args: &crate::dataplane::DataplaneArgs) -> anyhow::Result<()> {
    let backend = args.iptables_backend.programmer_backend();
    let mut ipt = programmer::iptables::IptablesProgrammer::new(backend);
    let tool = ipt.tools().save_v4.clone();
    if which(&tool).is_none() {
        return Ok(());
    }
    if backend == programmer::iptables::Backend::Legacy && !legacy_filter_table_exists()? {
        return remove_our_ipsets(&ipt.tools().ipset);
    }
    let report = match ipt.remove_all() {
        Ok(report) => report,
        Err(e) if backend == programmer::iptables::Backend::Legacy && !has_cap_net_raw() => {
            return Err(anyhow::Error::new(e).context(format!(
                "removing the iptables backend's chains and sets: this network namespace \
                 has a legacy iptables filter table, and reading it ({tool}) needs \
                 CAP_NET_RAW, which this process lacks; grant CAP_NET_RAW, or remove \
                 the iptables backend's state once with a privileged \
                 `nftpolicy sync --once`"
            )));
        }
        Err(e) => {
            return Err(
                anyhow::Error::new(e).context("removing the iptables backend's chains and sets")
            )
        }
    };
    if !report.chains_deleted.is_empty() || !report.sets_destroyed.is_empty() {
        info!(
            chains = report.chains_deleted.len(),
            sets = report.sets_destroyed.len(),
            "iptables backend state removed"
        );
    }
    Ok(())
}

/// Whether the legacy (x_tables) `filter` table exists in this network
/// namespace, IPv4 or IPv6. A missing /proc file means x_tables is not
/// loaded at all.
fn legacy_filter_table_exists() -> anyhow::Result<bool> {
    for names in [
        "/proc/thread-self/net/ip_tables_names",
        "/proc/thread-self/net/ip6_tables_names",
    ] {
        match std::fs::read_to_string(names) {
            Ok(text) => {
                if text.lines().any(|t| t.trim() == "filter") {
                    return Ok(true);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(anyhow::Error::new(e).context(format!("reading {names}"))),
        }
    }
    Ok(false)
}

/// Destroys the ipsets named as ours (`cali…`), with one `ipset list -n`
/// and, if there are any, one `ipset restore`. Nothing can reference them:
/// the chains that did live in a filter table that does not exist.
fn remove_our_ipsets(ipset: &str) -> anyhow::Result<()> {
    if which(ipset).is_none() {
        return Ok(());
    }
    let listed = std::process::Command::new(ipset)
        .args(["list", "-n"])
        .stdin(std::process::Stdio::null())
        .output()
        .with_context(|| format!("running {ipset} list -n"))?;
    if !listed.status.success() {
        bail!(
            "{ipset} list -n ({}): {}",
            listed.status,
            String::from_utf8_lossy(&listed.stderr).trim()
        );
    }
    let ours: Vec<String> = String::from_utf8_lossy(&listed.stdout)
        .lines()
        .map(str::trim)
        .filter(|name| programmer::iptables::owns_set(name))
        .map(str::to_owned)
        .collect();
    if ours.is_empty() {
        return Ok(());
    }
    let script: String = ours.iter().map(|s| format!("destroy {s}\n")).collect();
    let mut child = std::process::Command::new(ipset)
        .arg("restore")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("running {ipset} restore"))?;
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().expect("stdin is piped");
        // A failing ipset closes its stdin early: its status tells more.
        let _ = stdin.write_all(script.as_bytes());
    }
    let out = child
        .wait_with_output()
        .with_context(|| format!("waiting for {ipset} restore"))?;
    if !out.status.success() {
        bail!(
            "destroying the iptables backend's ipsets with {ipset} restore ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    info!(sets = ours.len(), "iptables backend ipsets removed");
    Ok(())
}

/// Whether CAP_NET_RAW (13) is in this process's effective set.
fn has_cap_net_raw() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        })
        .is_some_and(|caps| caps & (1 << 13) != 0)
}

fn which(tool: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(tool))
            .find(|p| p.is_file())
    })
}
