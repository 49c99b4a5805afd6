//! `nftpolicy explain`: which policy and rule decide a connection, and the
//! path through the chains, from the reference semantics.

use std::net::IpAddr;

use anyhow::{anyhow, bail};
use clap::Args;
use model::calico::{PolicyType, Protocol};
use model::semantics::{EndpointVerdict, Evaluator, Packet};
use model::state::ClusterState;

use crate::dataplane::{load_datastore, EtcdTlsArgs};

#[derive(Debug, Clone, Args)]
pub struct ExplainArgs {
    /// Source: NAMESPACE/POD or an IP address.
    #[arg(long)]
    pub from: String,
    /// Destination: NAMESPACE/POD or an IP address.
    #[arg(long)]
    pub to: String,
    /// Destination port, optionally with protocol: 80, 53/UDP.
    #[arg(long)]
    pub port: String,
    /// Use the pods' IPv6 addresses.
    #[arg(long)]
    pub ipv6: bool,
    /// Where the cluster state comes from, read once: `file:PATH`,
    /// `etcd://HOST:2379[,…]` (also `etcds://`, `https://`), `kubernetes`
    /// (in-cluster, or the kubeconfig in KUBECONFIG) or
    /// `kubernetes:KUBECONFIG`.
    #[arg(long, env = "NFTPOLICY_DATASTORE")]
    pub datastore: String,
    #[command(flatten)]
    pub tls: EtcdTlsArgs,
    #[command(flatten)]
    pub encap: crate::dataplane::WorkloadEncapArgs,
    #[command(flatten)]
    pub kernel: crate::explain_kernel::KernelArgs,
}

/// Prints the explanation; returns whether the connection is allowed.
pub fn run(args: &ExplainArgs) -> anyhow::Result<bool> {
    let (state, _skipped) = load_datastore(&args.datastore, &args.tls)?;
    let (port, protocol) = match args.port.split_once('/') {
        Some((p, proto)) => (
            p,
            proto
                .to_ascii_uppercase()
                .parse::<Protocol>()
                .map_err(|e| anyhow!("--port {:?}: {e}", args.port))?,
        ),
        None => (args.port.as_str(), Protocol::Tcp),
    };
    let port: u16 = port
        .parse()
        .map_err(|_| anyhow!("--port {:?}: not a port number", args.port))?;
    let src = resolve(&state, &args.from, args.ipv6)?;
    let dst = resolve(&state, &args.to, args.ipv6)?;
    if src.is_ipv6() != dst.is_ipv6() {
        bail!("{src} and {dst} are of different address families");
    }
    let eval = Evaluator::with_encap(&state, args.encap.encap());
    let verdict = eval.evaluate(&Packet {
        src,
        dst,
        protocol,
        src_port: None,
        dst_port: Some(port),
        icmp: None,
    });
    println!(
        "{} ({src}) -> {} ({dst}) {port}/{protocol}: {}",
        args.from,
        args.to,
        if verdict.allowed() {
            "ALLOWED"
        } else {
            "DENIED"
        }
    );
    for (v, who) in [(&verdict.egress, &args.from), (&verdict.ingress, &args.to)] {
        match v {
            Some(v) => print_direction(&state, v, who, dst),
            None => println!(
                "{:<7} {who}: not a workload endpoint, no policy applies",
                if std::ptr::eq(v, &verdict.egress) {
                    "egress"
                } else {
                    "ingress"
                }
            ),
        }
    }
    if args.kernel.kernel {
        return crate::explain_kernel::run(
            &args.kernel,
            &state,
            &verdict,
            src,
            dst,
            protocol,
            port,
        );
    }
    Ok(verdict.allowed())
}

fn print_direction(state: &ClusterState, v: &EndpointVerdict, who: &str, dst: IpAddr) {
    let dir = match v.direction {
        PolicyType::Egress => "egress",
        PolicyType::Ingress => "ingress",
    };
    println!(
        "{dir:<7} {who}: {} — {}",
        if v.allowed { "allowed" } else { "denied" },
        v.decision
    );
    println!("        {}", compiler::explain::chain_path(state, v, dst));
}

/// NAMESPACE/POD → the pod's address (from its WorkloadEndpoint); an IP as is.
fn resolve(state: &ClusterState, what: &str, ipv6: bool) -> anyhow::Result<IpAddr> {
    if let Ok(ip) = what.parse::<IpAddr>() {
        return Ok(ip);
    }
    let Some((ns, pod)) = what.split_once('/') else {
        bail!("{what:?} is neither NAMESPACE/POD nor an IP address");
    };
    let wep = state
        .workload_endpoints()
        .find(|(key, w)| {
            key.namespace.as_deref() == Some(ns)
                && model::convert::workload_endpoint_pod(&key.name, &w.spec.node).as_deref()
                    == Some(pod)
        })
        .map(|(_, w)| w)
        .ok_or_else(|| anyhow!("no workload endpoint for pod {what}"))?;
    wep.spec
        .ip_networks
        .iter()
        .map(|n| n.addr())
        .find(|ip| ip.is_ipv6() == ipv6)
        .ok_or_else(|| {
            anyhow!(
                "pod {what} has no {} address",
                if ipv6 { "IPv6" } else { "IPv4" }
            )
        })
}
