//! `nftpolicy explain --kernel`: the kernel's own walk of a real packet
//! beside the model's. Marks new connections matching the question with
//! nftrace (programmer::trace), waits for the operator (or a test) to
//! start one, and prints the chains the kernel went through, with the
//! comments of the rules that matched, and its verdict.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::IpAddr;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use model::calico::Protocol;
use model::semantics::{EndpointVerdict, Verdict};
use model::state::ClusterState;
use programmer::trace::{TraceEvent, TraceFilter, TraceKind, TraceSession};

use crate::dataplane::Backend;

#[derive(Debug, Clone, Args)]
pub struct KernelArgs {
    /// Also trace a real packet through this node's nftables ruleset
    /// (run inside the node's network namespace) and compare.
    #[arg(long)]
    pub kernel: bool,
    /// With --kernel: how long to wait for a matching new connection.
    #[arg(long, default_value_t = 30.0)]
    pub wait: f64,
    /// With --kernel: this node's name; only its endpoints' directions are
    /// compared (the other node sees the rest).
    #[arg(long, env = "NFTPOLICY_NODE")]
    pub node: Option<String>,
    /// The node's dataplane; kernel tracing needs nftables.
    #[arg(
        long,
        env = "NFTPOLICY_BACKEND",
        value_enum,
        default_value = "nftables"
    )]
    pub backend: Backend,
}

/// What stderr says once the trace rule is in place: connections started
/// after this line are traced.
pub const READY_LINE: &str = "tracing:";

pub fn run(
    args: &KernelArgs,
    state: &ClusterState,
    verdict: &Verdict,
    src: IpAddr,
    dst: IpAddr,
    protocol: Protocol,
    port: u16,
) -> anyhow::Result<bool> {
    if !args.backend.kind().can_trace() {
        bail!("kernel tracing is nftables-only (this node runs --backend iptables)");
    }
    let filter = TraceFilter {
        src,
        dst,
        protocol: protocol.number(),
        dst_port: matches!(protocol, Protocol::Tcp | Protocol::Udp | Protocol::Sctp)
            .then_some(port),
    };
    let wait = Duration::from_secs_f64(args.wait.max(0.0));
    // Our tables in the packet's family: one, or one per namespace group
    // (--table-groups); the packet walks each in turn.
    let tables = programmer::NftProgrammer::new()
        .and_then(|mut p| p.our_table_names(filter.family()))
        .context("listing nftpolicy's tables")?;
    if tables.is_empty() {
        bail!(
            "this node has no nftpolicy table in family {} (is the agent running here, with --backend nftables?)",
            filter.family().keyword()
        );
    }
    let mut session = TraceSession::start(filter).context("installing the trace rule")?;
    eprintln!(
        "{READY_LINE} new {protocol} connections {src} -> {dst} port {port}; waiting up to {wait:?} for one (start it now)"
    );
    let _ = std::io::stderr().flush();
    let events = session
        .wait_for_packet(&tables, wait)
        .context("reading trace events")?;
    session.stop().context("removing the trace rule")?;
    let Some(events) = events else {
        bail!("no new connection {src} -> {dst} port {port}/{protocol} passed this node within {wait:?}");
    };

    let ours: Vec<&TraceEvent> = events
        .iter()
        .filter(|e| tables.contains(&e.table))
        .collect();
    let comments = rule_comments(filter.family(), &ours);
    println!("kernel  trace {:#010x}:", events[0].id);
    for e in &ours {
        let what = match e.kind {
            TraceKind::Rule => format!("rule {}", e.verdict_text()),
            TraceKind::Return => "end of chain, return".into(),
            TraceKind::Policy => "end of base chain, policy".into(),
            TraceKind::Other(k) => format!("event type {k}"),
        };
        let comment = e
            .rule_handle
            .and_then(|h| comments.get(&(e.table.clone(), e.chain.clone(), h)))
            .map(|c| format!(" \"{c}\""))
            .unwrap_or_default();
        if tables.len() > 1 {
            println!("        {:<15} {:<28} {what}{comment}", e.table, e.chain);
        } else {
            println!("        {:<28} {what}{comment}", e.chain);
        }
    }
    let kernel_chains = chain_list(&ours);
    let kernel_verdict = ours
        .iter()
        .rev()
        .find_map(|e| e.final_verdict())
        .expect("wait_for_packet returns a walk with a verdict");
    println!("kernel  {} → {kernel_verdict}", kernel_chains.join(" → "));

    let mut legs = model_legs(state, verdict, args.node.as_deref(), dst);
    let model_verdict = if verdict.allowed() { "accept" } else { "drop" };
    // Under --fused-lookup (a fused rule in a chain the packet walked) the
    // policies fused into a set lookup have no chain on the kernel's path:
    // their chains are left out of the comparison, the rest (endpoint
    // chains, policies that did not fuse, the verdict) must still agree.
    if comments
        .values()
        .any(|c| c.starts_with(compiler::fused::MARKER))
    {
        let fused: Vec<String> = legs
            .iter()
            .flat_map(|l| &l.chains)
            .filter(|c| {
                (c.starts_with("cali-pi-") || c.starts_with("cali-po-"))
                    && !kernel_chains.contains(c)
            })
            .cloned()
            .collect();
        if !fused.is_empty() {
            println!(
                "fused   decided by a fused lookup (--fused-lookup), not walked: {}",
                fused.join(", ")
            );
            for l in &mut legs {
                l.chains.retain(|c| !fused.contains(c));
            }
        }
    }
    let model_chains: Vec<String> = model_walk(&legs);
    let in_order = if tables.len() > 1 {
        legs_in_kernel_order(&legs, &ours)
    } else {
        is_subsequence(&model_chains, &kernel_chains)
    };
    if in_order && model_verdict == kernel_verdict {
        if tables.len() > 1 {
            println!(
                "agree   model and kernel: {kernel_verdict}, each direction's chains in order in its group's table"
            );
        } else {
            println!("agree   model and kernel: {kernel_verdict}, same chains in the same order");
        }
        Ok(kernel_verdict == "accept")
    } else {
        bail!(
            "model and kernel disagree: model {} → {model_verdict}, kernel {} → {kernel_verdict}",
            model_chains.join(" → "),
            kernel_chains.join(" → ")
        )
    }
}

/// The chains of the events in order, consecutive repeats merged.
pub fn chain_list(events: &[&TraceEvent]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for e in events {
        if out.last() != Some(&e.chain) {
            out.push(e.chain.clone());
        }
    }
    out
}

/// One direction of the model's verdict on this node: the chains its
/// endpoint's walk goes through, and whether it allows the packet.
struct Leg {
    chains: Vec<String>,
    allowed: bool,
}

/// The model's directions on this node, egress then ingress, only for
/// endpoints on `node` if given; both even when the first denies (with
/// table groups the kernel may judge the other first).
fn model_legs(
    state: &ClusterState,
    verdict: &Verdict,
    node: Option<&str>,
    dst: IpAddr,
) -> Vec<Leg> {
    [&verdict.egress, &verdict.ingress]
        .into_iter()
        .flatten()
        .filter(|v| is_local(state, v, node))
        .map(|v| Leg {
            chains: compiler::explain::chain_path(state, v, dst).chains,
            allowed: v.allowed,
        })
        .collect()
}

/// The model's walk through one table: egress, then ingress unless
/// egress denied.
fn model_walk(legs: &[Leg]) -> Vec<String> {
    let mut out = Vec::new();
    for l in legs {
        out.extend(l.chains.iter().cloned());
        if !l.allowed {
            break;
        }
    }
    out
}

fn is_local(state: &ClusterState, v: &EndpointVerdict, node: Option<&str>) -> bool {
    let Some(node) = node else { return true };
    state
        .endpoint(&v.endpoint)
        .is_some_and(|w| w.spec.node == node)
}

fn is_subsequence(needle: &[String], hay: &[String]) -> bool {
    let mut it = hay.iter();
    needle.iter().all(|n| it.any(|h| h == n))
}

/// With several tables of ours (namespace groups), whether each of the
/// model's directions was walked, in order, within one table.
///
/// The packet walks each group's table in turn, in the kernel's order of
/// their base chains, not the model's: the receiver's table (ingress) may
/// come before the sender's (egress), and a drop there ends the packet
/// before the sender's table sees it. So each direction's chains must be
/// found in order in the table holding its endpoint's chain, directions
/// in one table in the model's order; a direction whose table the packet
/// never reached is fine only if the kernel dropped it and the model
/// denies it in a direction that was walked.
fn legs_in_kernel_order(legs: &[Leg], events: &[&TraceEvent]) -> bool {
    // Each table's walk, tables in the order the packet reached them.
    let mut tables: Vec<&str> = Vec::new();
    for e in events {
        if !tables.contains(&e.table.as_str()) {
            tables.push(&e.table);
        }
    }
    let segments: Vec<Vec<String>> = tables
        .iter()
        .map(|t| {
            let in_table: Vec<&TraceEvent> =
                events.iter().copied().filter(|e| e.table == *t).collect();
            chain_list(&in_table)
        })
        .collect();
    let endpoint_chain = |l: &Leg| {
        l.chains
            .iter()
            .find(|c| c.starts_with("cali-fw-") || c.starts_with("cali-tw-"))
            .cloned()
    };
    // Per table, how far into its walk the directions found there reach.
    let mut cursor = vec![0usize; segments.len()];
    let mut denied_and_walked = false;
    let mut unreached = false;
    for l in legs {
        let Some(chain) = endpoint_chain(l) else {
            return false;
        };
        let Some(s) = segments.iter().position(|c| c.contains(&chain)) else {
            unreached = true;
            continue;
        };
        let walk = &segments[s];
        let mut at = cursor[s];
        for c in &l.chains {
            match walk[at..].iter().position(|k| k == c) {
                Some(i) => at += i + 1,
                None => return false,
            }
        }
        cursor[s] = at;
        denied_and_walked |= !l.allowed;
    }
    !unreached || denied_and_walked
}

/// (table, chain, rule handle) → rule comment, read back from our tables.
fn rule_comments(
    family: compiler::nft::TableFamily,
    events: &[&TraceEvent],
) -> BTreeMap<(String, String, u64), String> {
    let mut out = BTreeMap::new();
    let Ok(mut nft) = programmer::NftProgrammer::new() else {
        return out;
    };
    let mut chains: Vec<(&str, &str)> = events
        .iter()
        .map(|e| (e.table.as_str(), e.chain.as_str()))
        .collect();
    chains.sort();
    chains.dedup();
    for (table, chain) in chains {
        // Best effort: comments only decorate the path.
        if let Ok(rules) = nft.read_counters(family, table, chain) {
            for r in rules {
                if let Some(c) = r.comment {
                    out.insert((table.to_owned(), chain.to_owned(), r.handle), c);
                }
            }
        }
    }
    out
}
