//! What a split by namespace group (`compiler::groups`, the agent's
//! `--table-groups`) adds to each new connection: one forward base chain
//! per group, each walked by every packet.
//! `cargo run --release -p bench --example split_packet_cost -- GROUPS [SELECTING] [CONNECTIONS] [ROUNDS]` (root).
//!
//! The packet sweep's cluster and topology (`bench::packet`: 1,000
//! policies, SELECTING of them selecting the server) compiled once, then
//! loaded with `nft -f` into the node's namespace alternately ROUNDS times
//! each way: whole (one table per family), and cut into GROUPS tables per
//! family (`nftpolicy-g<N>`) with the client and the server in different
//! groups, so that both the sender's and the receiver's tables do work
//! (in each, the other group's interface maps to `return`). Reported:
//! connect() latency p50 per way and round, and the median difference.
use std::net::SocketAddr;
use std::time::Duration;

use bench::packet::{cluster, Client, PacketPoint, Server, Topology, SERVER_PORT};
use bench::NODE_UNDER_TEST;
use compiler::groups::{self, Split};
use compiler::nft::Verdict;
use compiler::CompileOptions;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let groups: usize = args.get(1).map_or(Ok(4), |a| a.parse())?;
    let selecting: usize = args.get(2).map_or(Ok(100), |a| a.parse())?;
    let connections: usize = args.get(3).map_or(Ok(1500), |a| a.parse())?;
    let rounds: usize = args.get(4).map_or(Ok(5), |a| a.parse())?;
    anyhow::ensure!(
        groups >= 2,
        "GROUPS must be at least 2 (1 is the whole table)"
    );
    let point = PacketPoint {
        total_policies: 1000,
        selecting_receiver: selecting,
        ..PacketPoint::default()
    };
    let (state, ifaces, ips) = cluster(&point);
    let (_, whole) = compiler::compile_nftables(&state, &CompileOptions::new(NODE_UNDER_TEST))?;

    // Client in group 0, server in group 1, the other endpoints dealt out.
    let group_of = |iface: &str| {
        if iface == ifaces[0] {
            0
        } else if iface == ifaces[1] {
            1
        } else {
            iface.len() + usize::from(iface.as_bytes()[iface.len() - 1])
        }
    };
    let cut = groups::merge(Split::new(groups).full(&whole, &group_of));
    let cut_text = compiler::render_nft::render(&cut);
    let whole_text = compiler::render_nft::render(&whole);
    let verdicts = whole.tables[0]
        .chains
        .values()
        .flat_map(|c| &c.rules)
        .filter(|r| matches!(r.verdict, Some(Verdict::Jump(_))))
        .count();
    println!(
        "{} policies, {selecting} selecting the server; whole: {} rules ({verdicts} jumps, ip); cut into {groups} groups: {} tables",
        point.total_policies,
        whole.tables.iter().map(|t| t.chains.values().map(|c| c.rules.len()).sum::<usize>()).sum::<usize>(),
        cut.tables.len()
    );

    let topo = Topology::build(&ifaces, &ips)?;
    let dst = SocketAddr::new(ips[1], SERVER_PORT);
    let _server = Server::start(&topo.pods[1], dst)?;
    let client = Client::start(&topo.pods[0])?;
    let mut diffs = Vec::new();
    for round in 0..rounds {
        let mut p50 = [0.0; 2];
        for (way, text) in [&whole_text, &cut_text].into_iter().enumerate() {
            topo.node.nft(&["flush", "ruleset"])?;
            topo.node.nft_script(&[], text)?;
            let warm = client.batch(dst, 50, Duration::from_millis(500))?;
            anyhow::ensure!(warm.failures == 0, "warm-up connects failed");
            let b = client.batch(dst, connections, Duration::from_secs(1))?;
            // A rare lost SYN is noise; more means the way is broken.
            anyhow::ensure!(
                b.failures * 100 <= connections,
                "way {way}: {} of {connections} connects failed",
                b.failures
            );
            anyhow::ensure!(
                client.dropped(SocketAddr::new(ips[1], SERVER_PORT + 1))?,
                "the probe to a port no policy allows was not dropped"
            );
            p50[way] = bench::run::percentile(&b.latencies_us, 0.5);
        }
        println!(
            "round {round}: whole p50 {:.1} µs, {groups} groups p50 {:.1} µs",
            p50[0], p50[1]
        );
        diffs.push(p50[1] - p50[0]);
    }
    println!(
        "median difference per new connection: {:+.1} µs",
        bench::run::percentile(&diffs, 0.5)
    );
    Ok(())
}
