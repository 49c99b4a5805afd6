//! The iptables backend: [`iptables::IptablesProgrammer`] behind
//! [`Dataplane`], and the removal of iptables-mode leftovers (what the
//! nftables backend cleans up after a backend switch).

use compiler::render_iptables::to_iptables;
use iptables::IptablesProgrammer;
use tracing::info;

use crate::{Dataplane, Desired, Error, Kind, Op, Stats};

/// iptables-restore + ipset restore, felix-style: only changed chains are
/// rewritten and set members are changed in place. Every apply renders the
/// whole logical ruleset; the programmer diffs it against what it believes
/// the kernel holds (read back after a failure or [`Dataplane::invalidate`]).
#[derive(Debug)]
pub struct IptablesDataplane {
    programmer: IptablesProgrammer,
}

impl IptablesDataplane {
    pub fn new(tools: iptables::Backend) -> IptablesDataplane {
        IptablesDataplane::with_programmer(IptablesProgrammer::new(tools))
    }

    /// A backend driving `programmer` (a command prefix, other binaries).
    pub fn with_programmer(programmer: IptablesProgrammer) -> IptablesDataplane {
        IptablesDataplane { programmer }
    }
}

impl Dataplane for IptablesDataplane {
    fn kind(&self) -> Kind {
        Kind::Iptables
    }

    fn apply(&mut self, desired: &Desired<'_>) -> Result<(), Error> {
        self.programmer
            .apply(&to_iptables(desired.logical))
            .map(|_| ())
            .map_err(Error::iptables(Op::Program))
    }

    fn has_drift(&mut self, desired: &Desired<'_>) -> Result<bool, Error> {
        let report = self
            .programmer
            .drift(&to_iptables(desired.logical))
            .map_err(Error::iptables(Op::ReadBack))?;
        Ok(!report.is_noop())
    }

    fn invalidate(&mut self) -> Result<(), Error> {
        self.programmer.invalidate();
        Ok(())
    }

    fn remove_other(&mut self) -> Result<(), Error> {
        crate::remove_nftables_state()
    }

    /// With the legacy tools: [`legacy_filter_marker`]. The nft-based tools
    /// have no such summary here.
    fn change_marker(&self) -> Option<u64> {
        if self.programmer.backend() != iptables::Backend::Legacy {
            return None;
        }
        legacy_filter_marker()
    }

    fn stats(&self) -> Stats {
        let s = self.programmer.stats();
        Stats {
            iptables_restore_calls: s.iptables_restore_calls,
            iptables_restore_errors: s.iptables_restore_errors,
            iptables_save_calls: s.iptables_save_calls,
            ipset_calls: s.ipset_calls,
            ipset_errors: s.ipset_errors,
            ..Stats::default()
        }
    }
}

/// The legacy `filter` table's entry count and size in both families
/// (`iptables::table_size`, one getsockopt each), hashed: it changes when
/// anyone adds, removes or flushes rules. `None` when they cannot be read.
pub fn legacy_filter_marker() -> Option<u64> {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for f in compiler::render_iptables::IpFamily::ALL {
        match iptables::table_size::legacy_table_size(f, compiler::render_iptables::TABLE) {
            Ok(size) => size.hash(&mut h),
            Err(e) => {
                tracing::debug!("reading the size of the {f:?} filter table: {e}");
                return None;
            }
        }
    }
    Some(h.finish())
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
pub fn remove_iptables_state(backend: iptables::Backend) -> Result<(), Error> {
    let mut ipt = iptables::IptablesProgrammer::new(backend);
    let tool = ipt.tools().save_v4.clone();
    if which(&tool).is_none() {
        return Ok(());
    }
    if backend == iptables::Backend::Legacy && !legacy_filter_table_exists()? {
        return remove_our_ipsets(&ipt.tools().ipset);
    }
    let report = match ipt.remove_all() {
        Ok(report) => report,
        Err(source) if backend == iptables::Backend::Legacy && !has_cap_net_raw() => {
            return Err(Error::Iptables {
                op: Op::Remove,
                hint: Some(format!(
                    "this network namespace has a legacy iptables filter table, and reading \
                     it ({tool}) needs CAP_NET_RAW, which this process lacks; grant \
                     CAP_NET_RAW, or remove the iptables backend's state once with a \
                     privileged `nftpolicy sync --once`"
                )),
                source: Box::new(source),
            });
        }
        Err(source) => return Err(Error::iptables(Op::Remove)(source)),
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
fn legacy_filter_table_exists() -> Result<bool, Error> {
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
            Err(e) => return Err(Error::RemoveIpsets(format!("reading {names}: {e}"))),
        }
    }
    Ok(false)
}

/// Destroys the ipsets named as ours (`cali…`), with one `ipset list -n`
/// and, if there are any, one `ipset restore`. Nothing can reference them:
/// the chains that did live in a filter table that does not exist.
fn remove_our_ipsets(ipset: &str) -> Result<(), Error> {
    if which(ipset).is_none() {
        return Ok(());
    }
    let listed = std::process::Command::new(ipset)
        .args(["list", "-n"])
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| Error::RemoveIpsets(format!("running {ipset} list -n: {e}")))?;
    if !listed.status.success() {
        return Err(failed(&format!("{ipset} list -n"), &listed));
    }
    let ours: Vec<String> = String::from_utf8_lossy(&listed.stdout)
        .lines()
        .map(str::trim)
        .filter(|name| iptables::owns_set(name))
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
        .map_err(|e| Error::RemoveIpsets(format!("running {ipset} restore: {e}")))?;
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().expect("stdin is piped");
        // A failing ipset closes its stdin early: its status tells more.
        let _ = stdin.write_all(script.as_bytes());
    }
    let out = child
        .wait_with_output()
        .map_err(|e| Error::RemoveIpsets(format!("waiting for {ipset} restore: {e}")))?;
    if !out.status.success() {
        return Err(failed(&format!("{ipset} restore"), &out));
    }
    info!(sets = ours.len(), "iptables backend ipsets removed");
    Ok(())
}

/// `command` ran and failed: its status and what it said.
fn failed(command: &str, out: &std::process::Output) -> Error {
    Error::RemoveIpsets(format!(
        "{command} ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    ))
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
