//! Per-packet cost: connect() latency and connections per second between
//! two pods on the node under test, through the programmed forward hook.
//!
//! Topology (all namespaces fresh, removed on drop): a node namespace with
//! ip_forward and proxy ARP, and two pod namespaces hanging off it by veth
//! pairs whose node ends carry the endpoints' interface names, felix style
//! (/32 routes, default route on the pod side).

use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::process::Command;
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

fn run(cmd: &[&str]) -> anyhow::Result<()> {
    let out = Command::new(cmd[0]).args(&cmd[1..]).output()?;
    if !out.status.success() {
        bail!("{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

fn policy(name: &str, selector: &str, order: f64, ingress: Vec<Rule>) -> Resource {
    Resource::NetworkPolicy(NetworkPolicy {
        api_version: model::calico::API_VERSION.into(),
        metadata: ObjectMeta {
            name: name.to_owned(),
            namespace: Some(namespace_name(0)),
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
        let w = state
            .workload_endpoints()
            .find(|w| w.spec.pod == format!("pod{idx}"))
            .cloned()
            .expect("generated pod");
        let mut w = w;
        w.metadata.labels.insert("app".into(), role.into());
        ifaces[slot] = w.spec.interface_name.clone();
        ips[slot] = pod_ips(idx)[0];
        if slot == 1 {
            server_ns = w.metadata.namespace.clone().unwrap_or_default();
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
            np.metadata.namespace = Some(server_ns.clone());
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
        np.metadata.namespace = Some(server_ns);
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

pub fn packet_worker(
    backend: &str,
    point: PacketPoint,
    connections: usize,
) -> anyhow::Result<PacketResult> {
    let (state, ifaces, ips) = cluster(&point);
    let node = Netns::enter("bnode")?;
    let pods = [Netns::create("bcli")?, Netns::create("bsrv")?];
    run(&["sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
    // The node needs an IPv4 address of its own to ARP for the pods.
    run(&["ip", "link", "set", "lo", "up"])?;
    run(&["ip", "addr", "add", "198.18.127.254/32", "dev", "lo"])?;
    for i in 0..2 {
        let (ifname, ip, pod) = (&ifaces[i], ips[i].to_string(), pods[i].name());
        run(&[
            "ip", "link", "add", ifname, "type", "veth", "peer", "name", "eth0", "netns", pod,
        ])?;
        run(&["ip", "link", "set", ifname, "up"])?;
        run(&["ip", "route", "add", &format!("{ip}/32"), "dev", ifname])?;
        run(&[
            "sysctl",
            "-qw",
            &format!("net.ipv4.conf.{ifname}.proxy_arp=1"),
        ])?;
        // As felix does: answer ARP at once (the default delays up to 0.8 s).
        run(&[
            "sysctl",
            "-qw",
            &format!("net.ipv4.neigh.{ifname}.proxy_delay=0"),
        ])?;
        pods[i].exec(&["ip", "addr", "add", &format!("{ip}/32"), "dev", "eth0"])?;
        pods[i].exec(&["ip", "link", "set", "eth0", "up"])?;
        pods[i].exec(&["ip", "link", "set", "lo", "up"])?;
        pods[i].exec(&["ip", "route", "add", "default", "dev", "eth0"])?;
    }
    // "none" leaves the node unprogrammed (checks the topology itself).
    let mut dp = if backend == "none" {
        None
    } else {
        Some(crate::backends::open(backend, NODE_UNDER_TEST)?)
    };
    if let Some(dp) = &mut dp {
        dp.apply(&state, &Default::default())?;
    }

    let server_ns = pods[1].name().to_owned();
    let server_ip = ips[1];
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || -> anyhow::Result<()> {
        testkit::netns::move_thread_into(&server_ns)?;
        let l = TcpListener::bind(SocketAddr::new(server_ip, SERVER_PORT))?;
        ready_tx.send(())?;
        for s in l.incoming() {
            drop(s);
        }
        Ok(())
    });
    ready_rx
        .recv_timeout(Duration::from_secs(10))
        .context("server did not start")?;
    if let Ok(secs) = std::env::var("NFTBENCH_PAUSE_SECS") {
        eprintln!(
            "pausing: node {}, pods {} {}",
            node.name(),
            pods[0].name(),
            pods[1].name()
        );
        std::thread::sleep(Duration::from_secs(secs.parse().unwrap_or(30)));
    }
    let client_ns = pods[0].name().to_owned();
    let client = std::thread::spawn(
        move || -> anyhow::Result<(Vec<f64>, usize, Duration, bool)> {
            testkit::netns::move_thread_into(&client_ns)?;
            let dst = SocketAddr::new(server_ip, SERVER_PORT);
            let mut lat = Vec::with_capacity(connections);
            let mut failures = 0;
            // Warm-up; a dataplane that drops the probe fails fast here
            // instead of timing out every connection.
            for _ in 0..50 {
                let s = TcpStream::connect_timeout(&dst, Duration::from_millis(500))
                    .with_context(|| format!("warm-up connect to {dst} (is the probe allowed?)"))?;
                set_linger_zero(&s);
            }
            let start = Instant::now();
            for _ in 0..connections {
                let t = Instant::now();
                match TcpStream::connect_timeout(&dst, Duration::from_secs(1)) {
                    Ok(s) => {
                        lat.push(t.elapsed().as_secs_f64() * 1e6);
                        set_linger_zero(&s);
                    }
                    Err(_) => failures += 1,
                }
            }
            let total = start.elapsed();
            // A port no policy allows: dropped (timeout) if the dataplane
            // enforces; refused (RST) if it let the SYN through.
            let blocked = SocketAddr::new(server_ip, SERVER_PORT + 1);
            let enforced = matches!(
                TcpStream::connect_timeout(&blocked, Duration::from_millis(300)),
                Err(e) if e.kind() == std::io::ErrorKind::TimedOut
            );
            Ok((lat, failures, total, enforced))
        },
    );
    let (lat, failures, total, enforced) = client
        .join()
        .map_err(|_| anyhow::anyhow!("client panicked"))??;
    drop(dp);
    drop(pods);
    drop(node);
    Ok(PacketResult {
        backend: backend.to_owned(),
        point,
        connections,
        failures,
        enforced,
        p50_us: crate::run::percentile(&lat, 0.5),
        p99_us: crate::run::percentile(&lat, 0.99),
        conns_per_sec: connections as f64 / total.as_secs_f64(),
    })
}
