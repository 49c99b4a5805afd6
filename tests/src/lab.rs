//! Building the lab's namespaces, links and routes, and keeping the pods in
//! step with a scenario.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use model::calico::Protocol;
use model::scenario::{External, PodInfo, ProbeEnd, ResolvedProbe};
use tokio::task::JoinSet;

use crate::netns::{self, Netns};
use crate::probe::{self, ProbeResult};
use crate::serve;
use crate::LabError;

/// Lab infrastructure (node links): never used by scenario pods.
pub const INFRA_V4: (Ipv4Addr, u8) = (Ipv4Addr::new(198, 18, 0, 0), 24);
pub const INFRA_V6: (Ipv6Addr, u8) = (Ipv6Addr::new(0xfd00, 0x198, 0x18, 0, 0, 0, 0, 0), 64);
/// What pods and external hosts route to their node: the whole test range,
/// and nothing else (no default route anywhere).
const TEST_NET_V4: &str = "198.18.0.0/15";
const TEST_NET_V6: &str = "fd00:198:18::/48";
/// The node end of every endpoint veth carries this link-local address, so
/// every pod has the same IPv6 next hop, as Calico does with its fixed MAC.
const GATEWAY_V6: &str = "fe80::1";
/// The node's uplink (to the other nodes) inside each node namespace.
const UPLINK: &str = "eth0";

/// Interface indexes of veth ends the lab picks itself. The kernel handles
/// a link change at once only when the two ends of a veth have different
/// indexes (it takes equal ones for a device that is its own lower link, and
/// delays those events by up to a second). Each namespace otherwise numbers
/// its devices from 2, so both ends would often be 2; these ranges never
/// meet the small automatic numbers.
const UPLINK_INDEX: usize = 100;
const FABRIC_INDEX: usize = 200;
const FIRST_ENDPOINT_INDEX: u32 = 10_000;

/// Namespace names are file names under /run/netns (at most 255 bytes).
const MAX_NETNS_NAME: usize = 200;

/// How long the kernel may take to bring new links and addresses up.
const READY_TIMEOUT: Duration = Duration::from_secs(5);
/// Default time a probe may take before it counts as denied.
pub const DEFAULT_PROBE_TIMEOUT: Duration = Duration::from_millis(1500);

pub(crate) struct Node {
    pub(crate) name: String,
    pub(crate) netns: Netns,
    v4: Ipv4Addr,
    v6: Ipv6Addr,
    /// Servers for probes aimed at the node itself (`node/NAME`), on its
    /// uplink addresses, as for an external host.
    served: BTreeSet<(u16, Protocol)>,
    servers: JoinSet<()>,
}

/// A pod or an external host: a namespace hanging off a node.
pub(crate) struct Endpoint {
    /// `ns/pod` or `ext/name`, as probes name it; servers answer with it.
    pub(crate) identity: String,
    pub(crate) netns: Netns,
    node: usize,
    /// The node end of the endpoint's veth.
    host_if: String,
    /// The interface index of the endpoint end (`eth0`).
    eth0_index: u32,
    pub(crate) ips: Vec<IpAddr>,
    /// For pods: what the lab was built from, to notice changes.
    info: Option<PodInfo>,
    /// (port, protocol) pairs with servers.
    served: BTreeSet<(u16, Protocol)>,
    /// Server tasks; dropping the set aborts them and closes their sockets.
    servers: JoinSet<()>,
}

/// A running lab. Dropping it stops the servers and removes every namespace.
pub struct Lab {
    prefix: String,
    // Declaration order is drop order after `Drop::drop`: pods and externals
    // go before the nodes they hang off.
    pods: BTreeMap<(String, String), Endpoint>,
    externals: BTreeMap<String, Endpoint>,
    pub(crate) nodes: Vec<Node>,
    fabric: Option<Netns>,
    next_ext_if: usize,
    next_endpoint_index: u32,
    sctp: bool,
    probe_timeout: Duration,
    /// `nftpolicy sync` exiting 1 because objects were rejected (and are
    /// enforced as drops) is what the scenario expects.
    rejections_expected: bool,
    pub(crate) workdir: tempfile::TempDir,
    runtime: Option<tokio::runtime::Runtime>,
}

impl Lab {
    /// Builds nodes, pods and external hosts, with servers on every declared
    /// pod port. `nodes` must name every node a pod is on; the first one
    /// also carries the external hosts.
    pub fn build(
        pods: &[PodInfo],
        externals: &[External],
        nodes: &[&str],
    ) -> Result<Lab, LabError> {
        if !nix::unistd::geteuid().is_root() {
            return Err(LabError::Setup(
                "the kernel lab needs root (it creates network namespaces)".into(),
            ));
        }
        if nodes.is_empty() {
            return Err(LabError::Setup("a lab needs at least one node".into()));
        }
        let stale = netns::remove_stale();
        if !stale.is_empty() {
            eprintln!(
                "nplab: removed {} stale namespace(s) of earlier runs: {}",
                stale.len(),
                stale.join(" ")
            );
        }
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("nplab-io")
            .enable_all()
            .build()
            .map_err(|e| LabError::io("starting the lab's I/O runtime", e))?;
        let workdir = tempfile::Builder::new()
            .prefix("nplab-")
            .tempdir()
            .map_err(|e| LabError::io("creating the lab's work directory", e))?;
        // From here on, every early return drops `lab`, which removes what
        // was made so far.
        let mut lab = Lab {
            prefix: netns::new_lab_prefix(),
            pods: BTreeMap::new(),
            externals: BTreeMap::new(),
            nodes: Vec::new(),
            fabric: None,
            next_ext_if: 0,
            next_endpoint_index: FIRST_ENDPOINT_INDEX,
            sctp: false,
            probe_timeout: DEFAULT_PROBE_TIMEOUT,
            rejections_expected: false,
            workdir,
            runtime: Some(runtime),
        };
        let started = Instant::now();
        for (i, name) in nodes.iter().enumerate() {
            lab.add_node(i, name)?;
        }
        lab.link_nodes()?;
        lab.sctp = lab.nodes[0].netns.run(probe::kernel_has_sctp)?;
        for ext in externals {
            lab.add_external(ext)?;
        }
        crate::trace(|| {
            format!(
                "{}: nodes and externals in {:?}",
                lab.prefix,
                started.elapsed()
            )
        });
        lab.sync_pods(pods)?;
        crate::trace(|| format!("{}: built in {:?}", lab.prefix, started.elapsed()));
        Ok(lab)
    }

    /// The namespace name prefix of this lab (`nplab<pid>-<n>-`).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Names of this lab's namespaces.
    pub fn namespaces(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .nodes
            .iter()
            .map(|n| n.netns.name())
            .chain(self.fabric.iter().map(|f| f.name()))
            .chain(self.pods.values().map(|p| p.netns.name()))
            .chain(self.externals.values().map(|e| e.netns.name()))
            .map(str::to_owned)
            .collect();
        names.sort();
        names
    }

    /// The namespace of a node, for `ip netns exec`.
    pub fn node_namespace(&self, node: &str) -> Option<&str> {
        self.nodes
            .iter()
            .find(|n| n.name == node)
            .map(|n| n.netns.name())
    }

    /// The namespace of a pod.
    pub fn pod_namespace(&self, namespace: &str, name: &str) -> Option<&str> {
        self.pods
            .get(&(namespace.to_owned(), name.to_owned()))
            .map(|p| p.netns.name())
    }

    /// Whether SCTP probes run (the kernel can open SCTP sockets).
    pub fn has_sctp(&self) -> bool {
        self.sctp
    }

    pub fn probe_timeout(&self) -> Duration {
        self.probe_timeout
    }

    /// How long a probe may take before it counts as denied.
    /// Whether programming may report rejected objects (exit status 1 with
    /// only `error: rejected …` lines): they are then enforced as drops,
    /// which is what a scenario listing them under `rejected:` tests.
    pub fn set_rejections_expected(&mut self, expected: bool) {
        self.rejections_expected = expected;
    }

    pub(crate) fn rejections_expected(&self) -> bool {
        self.rejections_expected
    }

    pub fn set_probe_timeout(&mut self, timeout: Duration) {
        self.probe_timeout = timeout;
    }

    /// A directory that lives as long as the lab.
    pub fn workdir(&self) -> PathBuf {
        self.workdir.path().to_owned()
    }

    fn runtime(&self) -> &tokio::runtime::Runtime {
        self.runtime.as_ref().expect("the runtime lives until drop")
    }

    // -----------------------------------------------------------------------
    // Nodes

    fn add_node(&mut self, index: usize, name: &str) -> Result<(), LabError> {
        if self.nodes.iter().any(|n| n.name == name) {
            return Err(LabError::Setup(format!("node {name} named twice")));
        }
        let host = u8::try_from(index + 1)
            .ok()
            .filter(|h| *h < 255)
            .ok_or_else(|| LabError::Setup("too many nodes".into()))?;
        let netns = Netns::create(&format!("{}{name}", self.prefix))?;
        // Routers with loose source checks; no DAD, so addresses are usable
        // as soon as links are up. Set before any link exists so every
        // interface inherits the defaults.
        netns.sysctls(&[
            ("net.ipv4.ip_forward".into(), "1"),
            ("net.ipv6.conf.all.forwarding".into(), "1"),
            ("net.ipv4.conf.all.rp_filter".into(), "0"),
            ("net.ipv4.conf.default.rp_filter".into(), "0"),
            ("net.ipv6.conf.all.accept_dad".into(), "0"),
            ("net.ipv6.conf.default.accept_dad".into(), "0"),
        ])?;
        netns.ip_batch(&["link set lo up".into()])?;
        let (v4, v6) = uplink_addresses(host);
        self.nodes.push(Node {
            name: name.to_owned(),
            netns,
            v4,
            v6,
            served: BTreeSet::new(),
            servers: JoinSet::new(),
        });
        Ok(())
    }

    /// Two nodes: one veth between them. More: a bridge in a namespace of
    /// its own, every node's uplink plugged into it. Either way the nodes
    /// share 198.18.0.0/24 and fd00:198:18::/64 on their `eth0`.
    fn link_nodes(&mut self) -> Result<(), LabError> {
        match self.nodes.len() {
            1 => return Ok(()),
            2 => {
                let peer = self.nodes[1].netns.name().to_owned();
                self.nodes[0].netns.ip_batch(&[format!(
                    "link add {UPLINK} index {} type veth peer name {UPLINK} index {} netns {peer}",
                    UPLINK_INDEX,
                    UPLINK_INDEX + 1
                )])?;
            }
            _ => {
                let fabric = Netns::create(&format!("{}fabric", self.prefix))?;
                fabric.ip_batch(&[
                    "link set lo up".into(),
                    "link add br0 type bridge".into(),
                    "link set br0 up".into(),
                ])?;
                for (i, node) in self.nodes.iter().enumerate() {
                    node.netns.ip_batch(&[format!(
                        "link add {UPLINK} index {} type veth peer name n{i} index {} netns {}",
                        UPLINK_INDEX + i,
                        FABRIC_INDEX + i,
                        fabric.name()
                    )])?;
                    fabric.ip_batch(&[
                        format!("link set n{i} master br0"),
                        format!("link set n{i} up"),
                    ])?;
                }
                self.fabric = Some(fabric);
            }
        }
        for node in &self.nodes {
            node.netns.ip_batch(&[
                format!("addr add {}/{} dev {UPLINK}", node.v4, INFRA_V4.1),
                format!("addr add {}/{} dev {UPLINK} nodad", node.v6, INFRA_V6.1),
                format!("link set {UPLINK} up"),
            ])?;
        }
        Ok(())
    }

    fn take_endpoint_index(&mut self) -> u32 {
        self.next_endpoint_index += 1;
        self.next_endpoint_index - 1
    }

    fn node_index(&self, name: &str) -> Result<usize, LabError> {
        self.nodes
            .iter()
            .position(|n| n.name == name)
            .ok_or_else(|| LabError::Setup(format!("no node {name:?} in this lab")))
    }

    // -----------------------------------------------------------------------
    // Endpoints

    /// Makes the pods those given: removes pods that are gone or changed
    /// (address, node, ports), adds the new ones with their servers.
    pub fn sync_pods(&mut self, pods: &[PodInfo]) -> Result<(), LabError> {
        let wanted: BTreeMap<(String, String), &PodInfo> = pods
            .iter()
            .map(|p| ((p.namespace.clone(), p.name.clone()), p))
            .collect();
        let outdated: Vec<(String, String)> = self
            .pods
            .iter()
            .filter(|(key, ep)| wanted.get(*key).copied() != ep.info.as_ref())
            .map(|(key, _)| key.clone())
            .collect();
        for key in outdated {
            let ep = self.pods.remove(&key).expect("listed above");
            self.remove_endpoint(ep)?;
        }
        self.check_addresses(pods)?;
        for (key, info) in wanted {
            if self.pods.contains_key(&key) {
                continue;
            }
            let ep = self.add_pod(info)?;
            self.pods.insert(key, ep);
        }
        self.wait_ready()
    }

    /// Refuses addresses the lab cannot route: outside the test ranges,
    /// inside the infrastructure ranges, or used twice.
    fn check_addresses(&self, pods: &[PodInfo]) -> Result<(), LabError> {
        let mut owner: BTreeMap<IpAddr, String> = BTreeMap::new();
        let existing = self
            .externals
            .values()
            .map(|e| (e.identity.clone(), &e.ips));
        let new = pods
            .iter()
            .map(|p| (format!("{}/{}", p.namespace, p.name), &p.ips));
        for (who, ips) in existing.chain(new) {
            for ip in ips.iter() {
                check_endpoint_address(*ip).map_err(|e| LabError::Setup(format!("{who}: {e}")))?;
                if let Some(other) = owner.insert(*ip, who.clone()) {
                    return Err(LabError::Setup(format!(
                        "{ip} belongs to both {other} and {who}"
                    )));
                }
            }
        }
        Ok(())
    }

    fn add_pod(&mut self, info: &PodInfo) -> Result<Endpoint, LabError> {
        let node = self.node_index(&info.node)?;
        let identity = format!("{}/{}", info.namespace, info.name);
        let mut name = format!("{}pod-{}.{}", self.prefix, info.namespace, info.name);
        if name.len() > MAX_NETNS_NAME {
            // Kubernetes names can outgrow a file name; the interface name
            // is a short hash of the same two.
            name = format!("{}pod-{}", self.prefix, info.interface);
        }
        let netns = Netns::create(&name)?;
        let mut ep = Endpoint {
            identity,
            netns,
            node,
            host_if: info.interface.clone(),
            eth0_index: self.take_endpoint_index(),
            ips: info.ips.clone(),
            info: Some(info.clone()),
            served: BTreeSet::new(),
            servers: JoinSet::new(),
        };
        // On error `ep` drops here, taking its namespace (and veth) along;
        // routes on other nodes are only added last.
        self.attach(&ep)?;
        for p in &info.ports {
            self.serve(&mut ep, p.port, p.protocol)?;
        }
        Ok(ep)
    }

    fn add_external(&mut self, ext: &External) -> Result<(), LabError> {
        if self.externals.contains_key(&ext.name) {
            return Err(LabError::Setup(format!(
                "external {} declared twice",
                ext.name
            )));
        }
        check_endpoint_address(ext.ip)
            .map_err(|e| LabError::Setup(format!("ext/{}: {e}", ext.name)))?;
        if let Some(other) = self.externals.values().find(|e| e.ips.contains(&ext.ip)) {
            return Err(LabError::Setup(format!(
                "{} belongs to both {} and ext/{}",
                ext.ip, other.identity, ext.name
            )));
        }
        let host_if = format!("ext{}", self.next_ext_if);
        self.next_ext_if += 1;
        let mut name = format!("{}ext-{}", self.prefix, ext.name);
        if name.len() > MAX_NETNS_NAME {
            name = format!("{}{host_if}", self.prefix);
        }
        let netns = Netns::create(&name)?;
        let ep = Endpoint {
            identity: format!("ext/{}", ext.name),
            netns,
            node: 0,
            host_if,
            eth0_index: self.take_endpoint_index(),
            ips: vec![ext.ip],
            info: None,
            served: BTreeSet::new(),
            servers: JoinSet::new(),
        };
        self.attach(&ep)?;
        self.externals.insert(ext.name.clone(), ep);
        Ok(())
    }

    /// Wires an endpoint namespace to its node, Calico style:
    /// - node: veth `host_if` (up, `fe80::1`, proxy ARP answering at once),
    ///   a /32 and /128 host route per address to `host_if`;
    /// - endpoint: `eth0` with /32 and /128 addresses, the test ranges
    ///   on-link for IPv4 (the node answers ARP for everything it routes
    ///   elsewhere) and via `fe80::1` for IPv6;
    /// - every other node: a host route per address via the owning node.
    fn attach(&self, ep: &Endpoint) -> Result<(), LabError> {
        let node = &self.nodes[ep.node];
        let has_v4 = ep.ips.iter().any(IpAddr::is_ipv4);
        let has_v6 = ep.ips.iter().any(IpAddr::is_ipv6);
        let hif = &ep.host_if;
        ep.netns.sysctls(&[
            ("net.ipv6.conf.all.accept_dad".into(), "0"),
            ("net.ipv6.conf.default.accept_dad".into(), "0"),
        ])?;

        let mut node_cmds = vec![
            format!(
                "link add {hif} type veth peer name eth0 index {} netns {}",
                ep.eth0_index,
                ep.netns.name()
            ),
            format!("link set {hif} up"),
        ];
        if has_v6 {
            node_cmds.push(format!("addr add {GATEWAY_V6}/64 dev {hif} nodad"));
        }
        for ip in &ep.ips {
            node_cmds.push(format!("route add {} dev {hif}", host_prefix(*ip)));
        }
        node.netns.ip_batch(&node_cmds)?;
        node.netns.sysctls(&[
            (format!("net.ipv4.conf.{hif}.proxy_arp"), "1"),
            // Without this the node delays proxy ARP replies by up to 0.8 s.
            (format!("net.ipv4.neigh.{hif}.proxy_delay"), "0"),
        ])?;

        let mut ep_cmds = vec!["link set lo up".to_owned(), "link set eth0 up".to_owned()];
        for ip in &ep.ips {
            let nodad = if ip.is_ipv6() { " nodad" } else { "" };
            ep_cmds.push(format!("addr add {} dev eth0{nodad}", host_prefix(*ip)));
        }
        if has_v4 {
            ep_cmds.push(format!("route add {TEST_NET_V4} dev eth0"));
        }
        if has_v6 {
            ep_cmds.push(format!("route add {TEST_NET_V6} via {GATEWAY_V6} dev eth0"));
        }
        ep.netns.ip_batch(&ep_cmds)?;

        self.on_other_nodes(ep, |ip| match ip {
            IpAddr::V4(_) => format!("route add {} via {}", host_prefix(ip), node.v4),
            IpAddr::V6(_) => format!("route add {} via {}", host_prefix(ip), node.v6),
        })
    }

    /// Runs `ip` command `cmd(address)` for each of the endpoint's
    /// addresses on every node but its own.
    fn on_other_nodes(
        &self,
        ep: &Endpoint,
        cmd: impl Fn(IpAddr) -> String,
    ) -> Result<(), LabError> {
        let cmds: Vec<String> = ep.ips.iter().map(|ip| cmd(*ip)).collect();
        for (i, other) in self.nodes.iter().enumerate() {
            if i != ep.node {
                other.netns.ip_batch(&cmds)?;
            }
        }
        Ok(())
    }

    /// Stops an endpoint's servers and removes its veth, its routes on the
    /// other nodes and its namespace. The veth goes first and explicitly:
    /// a namespace is freed asynchronously, and a re-created pod needs the
    /// same `cali…` name at once.
    fn remove_endpoint(&self, mut ep: Endpoint) -> Result<(), LabError> {
        ep.servers.abort_all();
        let node = &self.nodes[ep.node];
        node.netns.ip_batch(&[format!("link del {}", ep.host_if)])?;
        self.on_other_nodes(&ep, |ip| format!("route del {}", host_prefix(ip)))?;
        drop(ep);
        Ok(())
    }

    /// Opens servers for `port`/`protocol` in the endpoint (idempotent).
    /// SCTP is skipped where the kernel has none.
    fn serve(&self, ep: &mut Endpoint, port: u16, protocol: Protocol) -> Result<(), LabError> {
        let servers = Servers {
            netns: &ep.netns,
            ips: &ep.ips,
            identity: &ep.identity,
            served: &mut ep.served,
            servers: &mut ep.servers,
        };
        servers.open(self.runtime(), self.sctp, port, protocol)
    }

    /// Opens servers for `port`/`protocol` on a node's own addresses
    /// (idempotent), answering as `node/NAME`.
    fn serve_node(&mut self, name: &str, port: u16, protocol: Protocol) -> Result<(), LabError> {
        let i = self.node_index(name)?;
        let runtime = self.runtime.as_ref().expect("the runtime lives until drop");
        let node = &mut self.nodes[i];
        let ips = [IpAddr::V4(node.v4), IpAddr::V6(node.v6)];
        let identity = format!("node/{}", node.name);
        let servers = Servers {
            netns: &node.netns,
            ips: &ips,
            identity: &identity,
            served: &mut node.served,
            servers: &mut node.servers,
        };
        servers.open(runtime, self.sctp, port, protocol)
    }

    /// Waits until the kernel has brought every link up: each interface
    /// (but `lo`) carries its automatic IPv6 link-local address, which the
    /// kernel adds only once it has seen the carrier and given the device a
    /// working queue (asynchronously after `ip link set up`), and no address
    /// is still tentative. Until then packets on that link may be dropped and
    /// IPv6 neighbour discovery has no source address.
    fn wait_ready(&self) -> Result<(), LabError> {
        let namespaces: Vec<&Netns> = self
            .nodes
            .iter()
            .map(|n| &n.netns)
            .chain(self.pods.values().map(|p| &p.netns))
            .chain(self.externals.values().map(|e| &e.netns))
            .collect();
        let started = Instant::now();
        let deadline = started + READY_TIMEOUT;
        let mut pending: Vec<(&Netns, Vec<String>)> =
            namespaces.into_iter().map(|n| (n, Vec::new())).collect();
        loop {
            let mut still = Vec::new();
            for (ns, _) in pending {
                let waiting = ns.run(links_not_ready)??;
                if !waiting.is_empty() {
                    still.push((ns, waiting));
                }
            }
            if still.is_empty() {
                crate::trace(|| {
                    format!("{}: links ready after {:?}", self.prefix, started.elapsed())
                });
                return Ok(());
            }
            if Instant::now() >= deadline {
                let names: Vec<String> = still
                    .iter()
                    .map(|(n, ifs)| format!("{} ({})", n.name(), ifs.join(" ")))
                    .collect();
                return Err(LabError::Setup(format!(
                    "links not up after {READY_TIMEOUT:?}: {}",
                    names.join(", ")
                )));
            }
            pending = still;
            // Polling interval of a bounded wait: link state changes have no
            // notification we could cheaply block on here.
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    // -----------------------------------------------------------------------
    // Probes

    /// Runs one probe (see [`Lab::probe_all`]).
    pub fn probe(&mut self, probe: &ResolvedProbe) -> Result<ProbeResult, LabError> {
        Ok(self
            .probe_all(std::slice::from_ref(probe))?
            .pop()
            .expect("one result per probe"))
    }

    /// Runs probes concurrently, each from its source namespace, and returns
    /// their results in order. External hosts first get servers on the
    /// ports aimed at them. An error means the lab is wrong (a probe end it
    /// does not have, an answer from the wrong host), not a verdict.
    pub fn probe_all(&mut self, probes: &[ResolvedProbe]) -> Result<Vec<ProbeResult>, LabError> {
        for p in probes.iter().filter(|p| p.probe.is_ipip()) {
            // Every endpoint answers IP-in-IP (no port to declare): the
            // raw server starts where a probe first aims at it.
            if let ProbeEnd::Pod { namespace, name } = &p.probe.to {
                let key = (namespace.clone(), name.clone());
                let mut ep = self.pods.remove(&key).ok_or_else(|| LabError::Probe {
                    probe: p.probe.to_string(),
                    reason: format!("{} is not in the lab", p.probe.to),
                })?;
                let served = self.serve(&mut ep, p.port, p.probe.protocol);
                self.pods.insert(key, ep);
                served?;
            }
        }
        for p in probes {
            if let ProbeEnd::Node(name) = &p.probe.to {
                self.serve_node(name, p.port, p.probe.protocol)?;
            }
            if let ProbeEnd::External(name) = &p.probe.to {
                let mut ep = self.externals.remove(name).ok_or_else(|| {
                    LabError::Setup(format!("probe {}: no external {name:?}", p.probe))
                })?;
                let served = self.serve(&mut ep, p.port, p.probe.protocol);
                self.externals.insert(name.clone(), ep);
                served?;
            }
        }
        let mut prepared = Vec::with_capacity(probes.len());
        for p in probes {
            let src = self.endpoint(&p.probe.from, p.src, &p.probe.to_string())?;
            self.check_destination(&p.probe.to, p.dst, &p.probe.to_string())?;
            prepared.push(probe::prepare(&src.netns, p, self.sctp)?);
        }
        let timeout = self.probe_timeout;
        let started = Instant::now();
        let results = self.runtime().block_on(probe::run_all(prepared, timeout));
        crate::trace(|| {
            format!(
                "{}: {} probes in {:?}",
                self.prefix,
                probes.len(),
                started.elapsed()
            )
        });
        if let Ok(results) = &results {
            for (p, r) in probes.iter().zip(results) {
                crate::trace(|| {
                    format!(
                        "  {}: {:?} {} ({:?})",
                        p.probe, r.allowed, r.detail, r.elapsed
                    )
                });
            }
        }
        results
    }

    /// Starts `probe` and returns at once; `done` gets its result on the
    /// lab's runtime when it is decided (answered, refused, or
    /// [`Lab::probe_timeout`] passed). For probing continuously while
    /// something else happens. The destination must already serve the
    /// probe's port: pods serve their declared ports, external hosts the
    /// ports a [`Lab::probe_all`] aimed at them.
    pub fn launch_probe(
        &self,
        probe: &ResolvedProbe,
        done: impl FnOnce(Result<ProbeResult, LabError>) + Send + 'static,
    ) -> Result<(), LabError> {
        let src = self.endpoint(&probe.probe.from, probe.src, &probe.probe.to_string())?;
        self.check_destination(&probe.probe.to, probe.dst, &probe.probe.to_string())?;
        let prepared = probe::prepare(&src.netns, probe, self.sctp)?;
        let timeout = self.probe_timeout;
        self.runtime()
            .spawn(async move { done(probe::run_one(prepared, timeout).await) });
        Ok(())
    }

    /// Checks that a probe's destination is in the lab with the address the
    /// probe uses.
    fn check_destination(&self, end: &ProbeEnd, ip: IpAddr, probe: &str) -> Result<(), LabError> {
        let ProbeEnd::Node(name) = end else {
            return self.endpoint(end, ip, probe).map(|_| ());
        };
        let node = &self.nodes[self.node_index(name)?];
        if ip != IpAddr::V4(node.v4) && ip != IpAddr::V6(node.v6) {
            return Err(LabError::Probe {
                probe: probe.to_owned(),
                reason: format!("{end} has no address {ip} in the lab"),
            });
        }
        Ok(())
    }

    /// The endpoint at one end of a probe, checking it has the address the
    /// probe uses.
    fn endpoint(&self, end: &ProbeEnd, ip: IpAddr, probe: &str) -> Result<&Endpoint, LabError> {
        let ep = match end {
            ProbeEnd::Pod { namespace, name } => self.pods.get(&(namespace.clone(), name.clone())),
            ProbeEnd::External(name) => self.externals.get(name),
            // A node is only a destination (see check_destination).
            ProbeEnd::Node(_) => None,
        }
        .ok_or_else(|| LabError::Probe {
            probe: probe.to_owned(),
            reason: format!("{end} is not in the lab"),
        })?;
        if !ep.ips.contains(&ip) {
            return Err(LabError::Probe {
                probe: probe.to_owned(),
                reason: format!("{end} has no address {ip} in the lab"),
            });
        }
        Ok(ep)
    }
}

/// Where servers of one pod, external host or node run.
struct Servers<'a> {
    netns: &'a Netns,
    ips: &'a [IpAddr],
    identity: &'a str,
    served: &'a mut BTreeSet<(u16, Protocol)>,
    servers: &'a mut JoinSet<()>,
}

impl Servers<'_> {
    /// Servers for `port`/`protocol` (idempotent); SCTP is skipped where
    /// the kernel has none.
    fn open(
        self,
        runtime: &tokio::runtime::Runtime,
        sctp: bool,
        port: u16,
        protocol: Protocol,
    ) -> Result<(), LabError> {
        if self.served.contains(&(port, protocol)) {
            return Ok(());
        }
        if protocol == Protocol::Sctp && !sctp {
            return Ok(());
        }
        let sockets = serve::open(self.netns, self.ips, port, protocol)?;
        let reply = serve::reply(self.identity, port, protocol);
        let _guard = runtime.enter();
        for socket in sockets {
            serve::spawn(self.servers, socket, protocol, reply.clone()).map_err(|e| {
                LabError::io(format!("{}: serving {port}/{protocol}", self.identity), e)
            })?;
        }
        self.served.insert((port, protocol));
        Ok(())
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        // Servers first, so no socket keeps a namespace alive; the
        // namespaces themselves go as the fields drop after this.
        for ep in self.pods.values_mut().chain(self.externals.values_mut()) {
            ep.servers.abort_all();
        }
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_timeout(Duration::from_secs(1));
        }
    }
}

/// `ip/32` or `ip/128`.
/// The uplink addresses of node number `host` (from 1): what probes to
/// `node/NAME` aim at ([`model::scenario::node_addresses`] says the same).
fn uplink_addresses(host: u8) -> (Ipv4Addr, Ipv6Addr) {
    (
        Ipv4Addr::from(u32::from(INFRA_V4.0) + u32::from(host)),
        Ipv6Addr::from(u128::from(INFRA_V6.0) + u128::from(host)),
    )
}

fn host_prefix(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => format!("{v4}/32"),
        IpAddr::V6(v6) => format!("{v6}/128"),
    }
}

fn check_endpoint_address(ip: IpAddr) -> Result<(), String> {
    if !model::is_test_address(ip) {
        return Err(format!(
            "{ip} is outside 198.18.0.0/15 and fd00:198:18::/48"
        ));
    }
    let infra = match ip {
        IpAddr::V4(v4) => {
            u32::from(v4) >> (32 - INFRA_V4.1) == u32::from(INFRA_V4.0) >> (32 - INFRA_V4.1)
        }
        IpAddr::V6(v6) => {
            u128::from(v6) >> (128 - INFRA_V6.1) == u128::from(INFRA_V6.0) >> (128 - INFRA_V6.1)
        }
    };
    if infra {
        return Err(format!(
            "{ip} is in the lab's infrastructure range (198.18.0.0/24, fd00:198:18::/64)"
        ));
    }
    Ok(())
}

/// The interfaces of the calling thread's namespace that are not ready:
/// no automatic (non-`nodad`) link-local address yet, or an address still
/// tentative. Reads `/proc/thread-self/net/{dev,if_inet6}`.
fn links_not_ready() -> Result<Vec<String>, LabError> {
    let read = |file: &str| {
        let path = format!("/proc/thread-self/net/{file}");
        std::fs::read_to_string(&path).map_err(|e| LabError::io(path, e))
    };
    Ok(not_ready(&read("dev")?, &read("if_inet6")?))
}

fn not_ready(dev: &str, if_inet6: &str) -> Vec<String> {
    const IFA_F_NODAD: u32 = 0x02;
    const IFA_F_TENTATIVE: u32 = 0x40;
    const SCOPE_LINK: u32 = 0x20;
    let mut ready = BTreeSet::new();
    let mut tentative = BTreeSet::new();
    for line in if_inet6.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        let [_, _, _, scope, flags, name] = f[..] else {
            continue;
        };
        let (Ok(scope), Ok(flags)) = (
            u32::from_str_radix(scope, 16),
            u32::from_str_radix(flags, 16),
        ) else {
            continue;
        };
        if flags & IFA_F_TENTATIVE != 0 {
            tentative.insert(name);
        } else if scope == SCOPE_LINK && flags & IFA_F_NODAD == 0 {
            ready.insert(name);
        }
    }
    // /proc/net/dev: two header lines, then "  name: counters…".
    dev.lines()
        .skip(2)
        .filter_map(|l| l.split_once(':').map(|(name, _)| name.trim()))
        .filter(|name| *name != "lo" && (!ready.contains(name) || tentative.contains(name)))
        .map(str::to_owned)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_addresses_avoid_infrastructure() {
        assert!(check_endpoint_address("198.18.60.1".parse().unwrap()).is_ok());
        assert!(check_endpoint_address("198.19.5.10".parse().unwrap()).is_ok());
        assert!(check_endpoint_address("fd00:198:18:80::1".parse().unwrap()).is_ok());
        assert!(check_endpoint_address("198.18.0.7".parse().unwrap()).is_err());
        assert!(check_endpoint_address("fd00:198:18::7".parse().unwrap()).is_err());
        assert!(check_endpoint_address("10.0.0.1".parse().unwrap()).is_err());
    }

    #[test]
    fn readiness_needs_an_automatic_link_local() {
        let dev =
            "Inter-|   Receive\n face |bytes\n    lo: 0 0\n  eth0: 0 0\n cali1: 0 0\n cali2: 0 0\n";
        let if_inet6 = "\
00000000000000000000000000000001 01 80 10 80       lo
fe800000000000000000000000000001 05 40 20 82    cali1
fe800000000000000000000000000001 06 40 20 82    cali2
fe80000000000000cc115ffffe5b9beb 06 40 20 80    cali2
fd000198001800000000000000000001 64 40 00 c0     eth0
fe80000000000000cc115ffffe5b9bec 64 40 20 c0     eth0
";
        // cali1 has only the nodad fe80::1; eth0's link-local is tentative.
        assert_eq!(not_ready(dev, if_inet6), ["eth0", "cali1"]);
    }

    #[test]
    fn scenario_nodes_have_the_lab_addresses() {
        for (i, name) in model::scenario::NODES.iter().enumerate() {
            let (v4, v6) = uplink_addresses(u8::try_from(i + 1).unwrap());
            assert_eq!(
                model::scenario::node_addresses(name),
                Some([IpAddr::V4(v4), IpAddr::V6(v6)])
            );
        }
    }

    #[test]
    fn host_prefixes() {
        assert_eq!(host_prefix("198.18.1.2".parse().unwrap()), "198.18.1.2/32");
        assert_eq!(
            host_prefix("fd00:198:18:1::2".parse().unwrap()),
            "fd00:198:18:1::2/128"
        );
    }
}
