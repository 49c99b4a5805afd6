//! Options shared by every subcommand that renders or programs a dataplane
//! (they choose and configure the `dataplane` crate's backend), and loading
//! the cluster state from a datastore.

use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::{Args, ValueEnum};
use compiler::groups::TableGroups;
use compiler::{CompileOptions, EndpointToHostAction};
use model::state::ClusterState;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Backend {
    Nftables,
    Iptables,
}

impl Backend {
    pub fn kind(self) -> ::dataplane::Kind {
        match self {
            Backend::Nftables => ::dataplane::Kind::Nftables,
            Backend::Iptables => ::dataplane::Kind::Iptables,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum IptablesTools {
    /// iptables-legacy-restore, ip6tables-legacy-restore (felix's default).
    Legacy,
    /// iptables-nft-restore, ip6tables-nft-restore.
    Nft,
}

impl IptablesTools {
    pub fn programmer_backend(self) -> iptables::Backend {
        match self {
            IptablesTools::Legacy => iptables::Backend::Legacy,
            IptablesTools::Nft => iptables::Backend::Nft,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ToHost {
    Accept,
    Drop,
    Return,
}

#[derive(Debug, Clone, Args)]
pub struct DataplaneArgs {
    /// Which dataplane to render or program.
    #[arg(
        long,
        env = "NFTPOLICY_BACKEND",
        value_enum,
        default_value = "nftables"
    )]
    pub backend: Backend,
    /// Which iptables tools the iptables backend uses.
    #[arg(
        long,
        env = "NFTPOLICY_IPTABLES_BACKEND",
        value_enum,
        default_value = "legacy"
    )]
    pub iptables_backend: IptablesTools,
    /// This node's name (as in WorkloadEndpoint spec.node).
    #[arg(long, env = "NFTPOLICY_NODE", value_parser = non_empty)]
    pub node: String,
    /// Packet-mark bits nftpolicy may use (accept, pass, scratch0, scratch1
    /// are taken lowest-first).
    #[arg(long, env = "NFTPOLICY_MARK_MASK", default_value = "0xffff0000", value_parser = parse_mask)]
    pub mark_mask: u32,
    /// What happens to traffic from a workload to this host once its egress
    /// policy allowed it (felix's DefaultEndpointToHostAction).
    #[arg(
        long,
        env = "NFTPOLICY_ENDPOINT_TO_HOST_ACTION",
        value_enum,
        default_value = "accept"
    )]
    pub endpoint_to_host: ToHost,
    /// Log denied packets (rate limited) to an NFLOG group, with a prefix
    /// naming the policy: `DROP <policy-id> <direction> …`.
    #[arg(long, env = "NFTPOLICY_LOG_DENIED", value_parser = clap::builder::FalseyValueParser::new(), default_value = "false")]
    pub log_denied: bool,
    /// The NFLOG group of `--log-denied` records (ulogd, `nft monitor` readers).
    #[arg(long, env = "NFTPOLICY_LOG_GROUP", default_value_t = 1)]
    pub log_group: u16,
    /// At most this many `--log-denied` records per second per rule.
    #[arg(long, env = "NFTPOLICY_LOG_RATE", default_value_t = 10)]
    pub log_rate: u32,
    /// Fuse the policies of a tier that are plain Allow lists (Kubernetes
    /// NetworkPolicies) into one set lookup per endpoint chain, so the cost
    /// of a new connection stays flat as policies grow (nftables backend
    /// only; its sets hold an element per peer address and port, far more
    /// than the chain walk's at large scale: see the README).
    #[arg(long, env = "NFTPOLICY_FUSED_LOOKUP", value_parser = clap::builder::FalseyValueParser::new(), default_value = "false")]
    pub fused_lookup: bool,
    /// Cut the nftables ruleset into this many tables per family, one per
    /// group of namespaces (`nftpolicy-g0` …; a namespace's group is a
    /// hash of its name). The kernel validates a whole table whenever a
    /// commit adds a rule, so a policy change then costs in proportion to
    /// its group's table, not the node's; each group costs a new connection
    /// about 0.8 µs (README, Table groups). 1: one table, `nftpolicy`.
    /// `auto`: one table while every family's table holds fewer than
    /// 10,000 rules, else one group per 2,500 rules (at most 8), chosen at
    /// the first apply and kept until the agent restarts (which keeps the
    /// count its tables have while that still nearly fits). Changing the
    /// count replaces the tables.
    #[arg(long, env = "NFTPOLICY_TABLE_GROUPS", value_name = "N|auto", default_value = "auto", value_parser = clap::builder::ValueParser::new(parse_table_groups))]
    pub table_groups: TableGroups,
    #[command(flatten)]
    pub encap: WorkloadEncapArgs,
}

/// Encapsulated packets workloads may send: felix drops VXLAN and IP-in-IP
/// sent by workloads (first thing in every `cali-fw-` chain) unless allowed.
#[derive(Debug, Clone, Args)]
pub struct WorkloadEncapArgs {
    /// Let workloads send VXLAN packets (UDP to --vxlan-port), which are
    /// otherwise dropped whatever policy says (felix's
    /// AllowVXLANPacketsFromWorkloads).
    #[arg(long, env = "NFTPOLICY_ALLOW_VXLAN_PACKETS_FROM_WORKLOADS", value_parser = clap::builder::FalseyValueParser::new(), default_value = "false")]
    pub allow_vxlan_packets_from_workloads: bool,
    /// Let workloads send IP-in-IP packets (IP protocol 4), which are
    /// otherwise dropped whatever policy says (felix's
    /// AllowIPIPPacketsFromWorkloads).
    #[arg(long, env = "NFTPOLICY_ALLOW_IPIP_PACKETS_FROM_WORKLOADS", value_parser = clap::builder::FalseyValueParser::new(), default_value = "false")]
    pub allow_ipip_packets_from_workloads: bool,
    /// The UDP port of VXLAN packets workloads may not send (felix's VXLANPort).
    #[arg(long, env = "NFTPOLICY_VXLAN_PORT", default_value_t = 4789, value_parser = clap::value_parser!(u16).range(1..))]
    pub vxlan_port: u16,
}

impl WorkloadEncapArgs {
    pub fn encap(&self) -> model::state::WorkloadEncap {
        model::state::WorkloadEncap {
            allow_vxlan: self.allow_vxlan_packets_from_workloads,
            allow_ipip: self.allow_ipip_packets_from_workloads,
            vxlan_port: self.vxlan_port,
        }
    }
}

fn non_empty(s: &str) -> Result<String, String> {
    if s.trim().is_empty() {
        Err("must not be empty".into())
    } else {
        Ok(s.to_owned())
    }
}

fn parse_table_groups(s: &str) -> Result<TableGroups, String> {
    s.parse()
}

fn parse_mask(s: &str) -> Result<u32, String> {
    let t = s.trim();
    let r = match t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => t.parse(),
    };
    r.map_err(|e| format!("{s:?} is not a 32-bit mask: {e}"))
}

impl DataplaneArgs {
    pub fn kind(&self) -> ::dataplane::Kind {
        self.backend.kind()
    }

    pub fn iptables_tools(&self) -> iptables::Backend {
        self.iptables_backend.programmer_backend()
    }

    /// The compiler's options; `--fused-lookup` or `--table-groups` above
    /// 1 with the iptables backend is an error (iptables mode has neither).
    pub fn compile_options(&self) -> anyhow::Result<CompileOptions> {
        if self.fused_lookup && self.backend == Backend::Iptables {
            bail!("--fused-lookup needs the nftables backend: iptables mode has no fused form");
        }
        // `auto` means one table whenever there is nothing to cut.
        if matches!(self.table_groups, TableGroups::Fixed(n) if n > 1)
            && self.backend == Backend::Iptables
        {
            bail!(
                "--table-groups {} needs the nftables backend: iptables mode has one filter table",
                self.table_groups
            );
        }
        Ok(CompileOptions {
            node: self.node.clone(),
            mark_mask: self.mark_mask,
            endpoint_to_host: match self.endpoint_to_host {
                ToHost::Accept => EndpointToHostAction::Accept,
                ToHost::Drop => EndpointToHostAction::Drop,
                ToHost::Return => EndpointToHostAction::Return,
            },
            log_denied: self.log_denied.then_some(compiler::logical::LogDenied {
                group: self.log_group,
                rate_per_second: self.log_rate,
            }),
            encap: self.encap.encap(),
            fused_lookup: self.fused_lookup,
        })
    }
}

impl DataplaneArgs {
    /// Opens the chosen backend in the current network namespace (the
    /// nftables one cut into `--table-groups`).
    pub fn open(&self) -> anyhow::Result<Box<dyn ::dataplane::Dataplane>> {
        Ok(::dataplane::open_grouped(
            self.kind(),
            self.iptables_tools(),
            self.table_groups,
        )?)
    }

    /// The ruleset as text, cut into `--table-groups` for nftables (`auto`
    /// chooses as the agent would at its first apply of this ruleset).
    pub fn render(&self, logical: &compiler::LogicalRuleset) -> String {
        if self.backend == Backend::Nftables {
            let whole = compiler::lower_nft::to_nftables(logical);
            let groups = self.table_groups.resolve(&whole);
            if groups > 1 {
                let (_, cut) = compiler::groups::cut_by_namespace(logical, &whole, groups);
                return compiler::render_nft::render(&cut);
            }
            return compiler::render_nft::render(&whole);
        }
        ::dataplane::render(self.kind(), logical)
    }
}

/// Client TLS files for an etcd datastore (all optional).
#[derive(Debug, Clone, Default, Args)]
pub struct EtcdTlsArgs {
    /// CA certificate for etcd over TLS.
    #[arg(long, env = "NFTPOLICY_ETCD_CA")]
    pub etcd_ca: Option<PathBuf>,
    /// Client certificate for etcd over TLS.
    #[arg(long, env = "NFTPOLICY_ETCD_CERT")]
    pub etcd_cert: Option<PathBuf>,
    /// Client key for etcd over TLS.
    #[arg(long, env = "NFTPOLICY_ETCD_KEY")]
    pub etcd_key: Option<PathBuf>,
}

/// Reads a `--datastore` once (`file:PATH`, etcd, Kubernetes): the
/// cluster state and how many objects were skipped because they could not
/// be read. See [`crate::datastore`].
pub fn load_datastore(url: &str, tls: &EtcdTlsArgs) -> anyhow::Result<(ClusterState, usize)> {
    crate::datastore::Datastore::parse(url, tls)?.load(url)
}

pub fn load_files(paths: &[PathBuf]) -> anyhow::Result<(ClusterState, usize)> {
    // A datastore that cannot be read must never look like an empty
    // cluster: that would program a ruleset without any policy.
    for p in paths {
        if !p.exists() {
            bail!(
                "datastore {}: no such file or directory; the dataplane is left as it is",
                p.display()
            );
        }
    }
    let loaded = watcher::files::load(paths).context("reading manifests")?;
    for e in &loaded.errors {
        eprintln!("error: skipped: {e}");
    }
    Ok((loaded.state, loaded.errors.len()))
}
