//! Per-packet cost: connect() latency and connections per second between
//! two pods on the node under test, through the programmed forward hook.
//!
//! Topology (all namespaces fresh, removed on drop): a node namespace with
//! ip_forward and proxy ARP, and two pod namespaces hanging off it by veth
//! pairs whose node ends carry the endpoints' interface names, felix style
//! (/32 routes, default route on the pod side).

use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use model::calico::{
    Action, EntityRule, NetworkPolicy, ObjectMeta, PolicySpec, PolicyType, Port, Protocol,
    Resource, Rule,
};
use model::state::ClusterState;
use serde::{Deserialize, Serialize};
use testkit::netns::Netns;

use crate::{generate, namespace_name, pod_ips, Scale, NODE_UNDER_TEST};

pub const SERVER_PORT: u16 = 8080;

/// One point of a sweep.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct PacketPoint {
    pub total_policies: usize,
    /// Policies selecting the receiving pod (none matches the probe).
    pub selecting_receiver: usize,
    pub rules_per_policy: usize,
    /// Ports and CIDRs in each rule of those policies.
    pub ports_cidrs: usize,
    pub local_endpoints: usize,
}

impl Default for PacketPoint {
    fn default() -> Self {
        PacketPoint {
            total_policies: 100,
            selecting_receiver: 1,
            rules_per_policy: 1,
            ports_cidrs: 1,
            local_endpoints: 10,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PacketResult {
    pub backend: String,
    pub point: PacketPoint,
    pub connections: usize,
    pub failures: usize,
    /// A probe to a port no policy allows was dropped (sanity check that
    /// the measured path really went through the policy chains).
    pub enforced: bool,
    pub p50_us: f64,
    pub p99_us: f64,
    pub conns_per_sec: f64,
}

fn policy(name: &str, selector: &str, order: f64, ingress: Vec<Rule>) -> Resource {
    Resource::NetworkPolicy(NetworkPolicy {
        api_version: model::calico::API_VERSION.into(),
        metadata: ObjectMeta {
            name: name.to_owned(),
            namespace: Some(namespace_name(0).into()),
            ..Default::default()
        },
        spec: PolicySpec {
            order: Some(order),
            selector: selector.to_owned(),
            types: vec![PolicyType::Ingress],
            ingress,
            ..Default::default()
        },
    })
}

/// The cluster for a point: the generated one, pod 0 (client) and pod 1
/// (server) relabelled so that only the bench
/// policies select the server; the receiver's policies never match the
/// probe, the last one (order 2000) allows it.
pub fn cluster(point: &PacketPoint) -> (ClusterState, [String; 2], [IpAddr; 2]) {
    let mut scale = Scale::new(
        point.total_policies,
        (point.total_policies * 10).clamp(1_000, 50_000),
    );
    scale.local_endpoints = point.local_endpoints.max(2);
    let mut state = generate(&scale);
    // The server's namespace does not matter: the bench policies live in
    // it and allow the client by address.
    let server_index = 1;
    let mut ifaces = [String::new(), String::new()];
    let mut ips = [pod_ips(0)[0], pod_ips(server_index)[0]];
    let mut server_ns = namespace_name(0);
    for (slot, (idx, role)) in [(0usize, "bench-client"), (server_index, "bench-server")]
        .into_iter()
        .enumerate()
    {
        let (key, ep) = state
            .endpoint_by_ip(pod_ips(idx)[0])
            .expect("generated pod");
        let mut w = ep.to_workload_endpoint(key);
        w.metadata.labels.insert("app".into(), role.into());
        ifaces[slot] = w.spec.interface_name.clone();
        ips[slot] = pod_ips(idx)[0];
        if slot == 1 {
            server_ns = w.metadata.namespace.clone().unwrap_or_default().to_string();
        }
        state.upsert(Resource::WorkloadEndpoint(w));
    }
    for k in 0..point.selecting_receiver {
        let rules = (0..point.rules_per_policy)
            .map(|r| Rule {
                action: Action::Allow,
                protocol: Some(Protocol::Tcp),
                source: EntityRule {
                    nets: (0..point.ports_cidrs)
                        .map(|c| {
                            format!("198.19.{}.{}/32", (k + r) % 256, c % 256)
                                .parse()
                                .unwrap()
                        })
                        .collect(),
                    ..Default::default()
                },
                destination: EntityRule {
                    ports: (0..point.ports_cidrs)
                        .map(|p| Port::single(20000 + p as u16 * 2))
                        .collect(),
                    ..Default::default()
                },
                ..Default::default()
            })
            .collect();
        let mut p = policy(
            &format!("bench-recv-{k}"),
            "app == 'bench-server'",
            1000.0,
            rules,
        );
        if let Resource::NetworkPolicy(np) = &mut p {
            np.metadata.namespace = Some(server_ns.clone().into());
        }
        state.upsert(p);
    }
    let mut allow = policy(
        "bench-allow",
        "app == 'bench-server'",
        2000.0,
        vec![Rule {
            action: Action::Allow,
            protocol: Some(Protocol::Tcp),
            source: EntityRule {
                nets: vec![ipnet::IpNet::from(ips[0])],
                ..Default::default()
            },
            destination: EntityRule {
                ports: vec![Port::single(SERVER_PORT)],
                ..Default::default()
            },
            ..Default::default()
        }],
    );
    if let Resource::NetworkPolicy(np) = &mut allow {
        np.metadata.namespace = Some(server_ns.into());
    }
    state.upsert(allow);
    (state, ifaces, ips)
}

fn set_linger_zero(s: &TcpStream) {
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: valid socket and a correctly sized option value.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            &l as *const _ as *const libc::c_void,
            std::mem::size_of::<libc::linger>() as u32,
        );
    }
}

/// The measured node: a node namespace with ip_forward and proxy ARP, and
/// two pod namespaces (client, server) hanging off it by veth pairs whose
/// node ends carry the endpoints' interface names, felix style (/32
/// routes, default route on the pod side). All removed on drop.
pub struct Topology {
    pub node: Netns,
    /// Client, server.
    pub pods: [Netns; 2],
}

impl Topology {
    pub fn build(ifaces: &[String; 2], ips: &[IpAddr; 2]) -> anyhow::Result<Topology> {
        let node = Netns::create("bnode")?;
        let pods = [Netns::create("bcli")?, Netns::create("bsrv")?];
        node.exec(&["sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
        // The node needs an IPv4 address of its own to ARP for the pods.
        node.exec(&["ip", "link", "set", "lo", "up"])?;
        node.exec(&["ip", "addr", "add", "198.18.127.254/32", "dev", "lo"])?;
        for i in 0..2 {
            let (ifname, ip, pod) = (&ifaces[i], ips[i].to_string(), pods[i].name());
            node.exec(&[
                "ip", "link", "add", ifname, "type", "veth", "peer", "name", "eth0", "netns", pod,
            ])?;
            node.exec(&["ip", "link", "set", ifname, "up"])?;
            node.exec(&["ip", "route", "add", &format!("{ip}/32"), "dev", ifname])?;
            node.exec(&[
                "sysctl",
                "-qw",
                &format!("net.ipv4.conf.{ifname}.proxy_arp=1"),
            ])?;
            // As felix does: answer ARP at once (the default delays up to 0.8 s).
            node.exec(&[
                "sysctl",
                "-qw",
                &format!("net.ipv4.neigh.{ifname}.proxy_delay=0"),
            ])?;
            pods[i].exec(&["ip", "addr", "add", &format!("{ip}/32"), "dev", "eth0"])?;
            pods[i].exec(&["ip", "link", "set", "eth0", "up"])?;
            pods[i].exec(&["ip", "link", "set", "lo", "up"])?;
            pods[i].exec(&["ip", "route", "add", "default", "dev", "eth0"])?;
        }
        Ok(Topology { node, pods })
    }

    /// Programs the node with `backend` ("none" leaves it unprogrammed)
    /// from a thread inside the node's namespace.
    pub fn program(
        &self,
        backend: &str,
        options: &crate::backends::Options,
        state: &ClusterState,
    ) -> anyhow::Result<()> {
        if backend == "none" {
            return Ok(());
        }
        if backend == crate::sweep::TWO_STAGE {
            return self.program_two_stage(state);
        }
        self.node
            .run(|| -> anyhow::Result<()> {
                let mut dp = crate::backends::open_with(backend, NODE_UNDER_TEST, options)?;
                dp.apply(state, &Default::default())
            })
            .map_err(|e| anyhow::anyhow!("{e}"))?
    }

    /// The fused lookup's ruleset rewritten in two stages
    /// (`crate::two_stage`), applied in one transaction.
    fn program_two_stage(&self, state: &ClusterState) -> anyhow::Result<()> {
        let opts = compiler::CompileOptions {
            fused_lookup: true,
            ..compiler::CompileOptions::new(NODE_UNDER_TEST)
        };
        let (_, mut rs) = compiler::compile_nftables(state, &opts)?;
        crate::two_stage::rewrite(&mut rs, crate::two_stage::class_bits(opts.mark_mask)?)?;
        self.node
            .run(|| -> anyhow::Result<()> {
                programmer::NftProgrammer::new()?.apply(&rs)?;
                Ok(())
            })
            .map_err(|e| anyhow::anyhow!("{e}"))?
    }
}

/// A TCP listener in a pod namespace accepting (and closing) every
/// connection until dropped.
pub struct Server {
    listener: Arc<TcpListener>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Server {
    pub fn start(pod: &Netns, addr: SocketAddr) -> anyhow::Result<Server> {
        let listener = pod
            .run(|| TcpListener::bind(addr))
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .with_context(|| format!("listening on {addr}"))?;
        let listener = Arc::new(listener);
        let l = listener.clone();
        let thread = std::thread::spawn(move || {
            // Ends when Drop shuts the socket down (accept then fails).
            while let Ok((s, _)) = l.accept() {
                drop(s);
            }
        });
        Ok(Server {
            listener,
            thread: Some(thread),
        })
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // SAFETY: shutdown(2) on the listener's own descriptor, open until
        // the last Arc (ours, or the thread's, joined below) drops.
        unsafe { libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RDWR) };
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// What a [`Client`] batch saw.
#[derive(Debug, Default)]
pub struct Batch {
    /// connect() latency of each connection made, µs.
    pub latencies_us: Vec<f64>,
    pub failures: usize,
    /// Failures that were timeouts (the SYN dropped), not refusals.
    pub timeouts: usize,
}

/// Sequential connect()+close() (RST, no TIME_WAIT) from a thread living in
/// the client pod's namespace.
pub struct Client {
    requests: Option<mpsc::Sender<(SocketAddr, usize, Duration)>>,
    answers: mpsc::Receiver<Batch>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Client {
    pub fn start(pod: &Netns) -> anyhow::Result<Client> {
        let (req_tx, req_rx) = mpsc::channel::<(SocketAddr, usize, Duration)>();
        let (ans_tx, ans_rx) = mpsc::channel();
        let (ready_tx, ready_rx) = mpsc::channel();
        let ns = pod.name().to_owned();
        let thread = std::thread::spawn(move || {
            let entered = testkit::netns::move_thread_into(&ns);
            let ok = entered.is_ok();
            let _ = ready_tx.send(entered);
            if !ok {
                return;
            }
            for (dst, n, timeout) in req_rx {
                let mut b = Batch {
                    latencies_us: Vec::with_capacity(n),
                    ..Batch::default()
                };
                for _ in 0..n {
                    let t = Instant::now();
                    match TcpStream::connect_timeout(&dst, timeout) {
                        Ok(s) => {
                            b.latencies_us.push(t.elapsed().as_secs_f64() * 1e6);
                            set_linger_zero(&s);
                        }
                        Err(e) => {
                            b.failures += 1;
                            if e.kind() == std::io::ErrorKind::TimedOut {
                                b.timeouts += 1;
                            }
                        }
                    }
                }
                if ans_tx.send(b).is_err() {
                    return;
                }
            }
        });
        ready_rx
            .recv()
            .context("client thread")?
            .context("entering the client namespace")?;
        Ok(Client {
            requests: Some(req_tx),
            answers: ans_rx,
            thread: Some(thread),
        })
    }

    /// `n` connections to `dst`, one after the other.
    pub fn batch(&self, dst: SocketAddr, n: usize, timeout: Duration) -> anyhow::Result<Batch> {
        self.requests
            .as_ref()
            .expect("client running")
            .send((dst, n, timeout))
            .context("client thread gone")?;
        self.answers.recv().context("client thread gone")
    }

    /// Whether a connection to `dst` (a port no policy allows) is dropped
    /// (times out) rather than refused (RST): the dataplane enforces.
    pub fn dropped(&self, dst: SocketAddr) -> anyhow::Result<bool> {
        Ok(self.batch(dst, 1, Duration::from_millis(300))?.timeouts == 1)
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.requests = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

pub fn packet_worker(
    backend: &str,
    point: PacketPoint,
    connections: usize,
) -> anyhow::Result<PacketResult> {
    let (state, ifaces, ips) = cluster(&point);
    let topo = Topology::build(&ifaces, &ips)?;
    topo.program(backend, &crate::backends::Options::default(), &state)?;
    let dst = SocketAddr::new(ips[1], SERVER_PORT);
    let _server = Server::start(&topo.pods[1], dst)?;
    if let Ok(secs) = std::env::var("NFTBENCH_PAUSE_SECS") {
        eprintln!(
            "pausing: node {}, pods {} {}",
            topo.node.name(),
            topo.pods[0].name(),
            topo.pods[1].name()
        );
        std::thread::sleep(Duration::from_secs(secs.parse().unwrap_or(30)));
    }
    let client = Client::start(&topo.pods[0])?;
    // Warm-up; a dataplane that drops the probe fails fast here instead of
    // timing out every connection.
    let warm = client.batch(dst, 50, Duration::from_millis(500))?;
    if warm.failures > 0 {
        bail!("warm-up connects to {dst} failed (is the probe allowed?)");
    }
    let start = Instant::now();
    let measured = client.batch(dst, connections, Duration::from_secs(1))?;
    let total = start.elapsed();
    let enforced = client.dropped(SocketAddr::new(ips[1], SERVER_PORT + 1))?;
    let lat = measured.latencies_us;
    Ok(PacketResult {
        backend: backend.to_owned(),
        point,
        connections,
        failures: measured.failures,
        enforced,
        p50_us: crate::run::percentile(&lat, 0.5),
        p99_us: crate::run::percentile(&lat, 0.99),
        conns_per_sec: connections as f64 / total.as_secs_f64(),
    })
}
