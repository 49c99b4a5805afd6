//! Per-packet cost that can see a microsecond: sequential TCP connects
//! through one node's forward hook, the SYN walking the receiving pod's
//! `cali-tw-` chain, swept over the number of policies selecting the
//! receiver and the rules per policy.
//!
//! Every variant (no ruleset, the felix tree in nftables over netlink, the
//! same tree in iptables-legacy, the fused lookup, and the fused lookup in
//! two stages as `crate::two_stage` writes it) gets its own node with
//! the same two pods ([`Topology`]), all built before measuring; then
//! rounds of connections go to each in turn (the order rotating every
//! round), so slow drifts of the machine hit every variant alike. A
//! variant's extra cost is the median over rounds of its batch median minus
//! the no-ruleset batch median of the same round: a paired difference,
//! which resolves about a microsecond where single-run percentiles (p99
//! 90–390 µs of noise) cannot.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::bail;
use serde::{Deserialize, Serialize};

use crate::backends::Options;
use crate::packet::{cluster, Client, PacketPoint, Server, Topology, SERVER_PORT};
use crate::run::percentile;

/// One point of the sweep.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SweepPoint {
    /// Policies selecting the receiver whose rules never match the probe
    /// (walked by every SYN), besides the one that allows it.
    pub selecting: usize,
    pub rules_per_policy: usize,
}

/// A dataplane measured side by side with the others.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct Variant {
    pub name: &'static str,
    /// A `backends` kind, or "none" (the node unprogrammed: the floor).
    pub backend: &'static str,
    pub options: Options,
}

/// The floor first; every other variant is reported against it. The last
/// is a form the compiler does not build yet, made by a rewrite of the
/// fused lookup's ruleset (`crate::two_stage`): measured ahead.
pub const VARIANTS: [Variant; 5] = [
    Variant {
        name: "none",
        backend: "none",
        options: Options {
            fused_lookup: false,
        },
    },
    Variant {
        name: "felix tree, nftables",
        backend: "nft-netlink",
        options: Options {
            fused_lookup: false,
        },
    },
    Variant {
        name: "felix tree, iptables-legacy",
        backend: "iptables",
        options: Options {
            fused_lookup: false,
        },
    },
    Variant {
        name: "fused lookup, nftables",
        backend: "nft-netlink",
        options: Options { fused_lookup: true },
    },
    Variant {
        name: "fused lookup in two stages (bench rewrite)",
        backend: TWO_STAGE,
        options: Options { fused_lookup: true },
    },
];

/// The backend of the two-stage variant: the fused lookup's ruleset,
/// rewritten by `crate::two_stage`, applied by the programmer.
pub const TWO_STAGE: &str = "nft-two-stage";

/// How much to measure per point.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct Effort {
    pub rounds: usize,
    /// Connections per variant per round.
    pub batch: usize,
    /// Connections per variant before the first round (not counted).
    pub warmup: usize,
}

impl Effort {
    /// 2 × 1,500 connections per variant and point.
    pub const FULL: Effort = Effort {
        rounds: 20,
        batch: 150,
        warmup: 200,
    };
    /// A smoke run for tests: every path exercised, nothing resolved.
    pub const SMOKE: Effort = Effort {
        rounds: 2,
        batch: 10,
        warmup: 5,
    };
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VariantResult {
    pub variant: String,
    pub connections: usize,
    pub failures: usize,
    /// Connections slower than 0.5 s (a SYN retransmitted).
    pub slow: usize,
    /// A connection to a port no policy allows was dropped (for "none":
    /// refused, as nothing filters).
    pub enforced: bool,
    pub median_us: f64,
    /// Mean of the samples between the 10th and 90th percentile.
    pub trimmed_mean_us: f64,
    /// Median over rounds of (this variant's batch median − the floor's).
    pub extra_us: f64,
    /// Interquartile range of those per-round differences.
    pub extra_iqr_us: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PointResult {
    pub point: SweepPoint,
    pub variants: Vec<VariantResult>,
}

fn trimmed_mean(samples: &[f64]) -> f64 {
    let mut v = samples.to_vec();
    v.sort_by(f64::total_cmp);
    let cut = v.len() / 10;
    let mid = &v[cut..v.len() - cut];
    if mid.is_empty() {
        return f64::NAN;
    }
    #[allow(clippy::cast_precision_loss)] // a sample count
    let n = mid.len() as f64;
    mid.iter().sum::<f64>() / n
}

struct Lane {
    variant: Variant,
    client: Client,
    _server: Server,
    _topology: Topology,
    samples: Vec<f64>,
    round_medians: Vec<f64>,
    failures: usize,
    slow: usize,
}

/// Measures one point for `variants` (the first is the floor).
///
/// # Errors
///
/// Building a node, programming it, or a variant that does not carry the
/// probe.
pub fn measure(
    point: SweepPoint,
    variants: &[Variant],
    effort: Effort,
) -> anyhow::Result<PointResult> {
    let (state, ifaces, ips) = cluster(&PacketPoint {
        total_policies: 10,
        selecting_receiver: point.selecting,
        rules_per_policy: point.rules_per_policy,
        ports_cidrs: 1,
        local_endpoints: 2,
    });
    let dst = SocketAddr::new(ips[1], SERVER_PORT);
    let mut lanes = Vec::new();
    for &variant in variants {
        let topology = Topology::build(&ifaces, &ips)?;
        topology.program(variant.backend, &variant.options, &state)?;
        let server = Server::start(&topology.pods[1], dst)?;
        let client = Client::start(&topology.pods[0])?;
        // A first SYN may be lost while the kernel settles (a retransmit
        // comes after 1 s): the warm-up waits longer than a measured connect.
        let warm = client.batch(dst, effort.warmup, Duration::from_secs(3))?;
        if warm.failures > 0 {
            bail!(
                "{}: warm-up connects to {dst} failed (is the probe allowed?)",
                variant.name
            );
        }
        lanes.push(Lane {
            variant,
            client,
            _server: server,
            _topology: topology,
            samples: Vec::new(),
            round_medians: Vec::new(),
            failures: 0,
            slow: 0,
        });
    }
    for round in 0..effort.rounds {
        for i in 0..lanes.len() {
            let lane = &mut lanes[(i + round) % variants.len()];
            // Now and then (about one in a thousand, in the floor's lane
            // too) a SYN waits for its retransmit (1 s): a slow sample,
            // which the medians do not see, not a failure.
            let b = lane
                .client
                .batch(dst, effort.batch, Duration::from_secs(3))?;
            lane.slow += b.latencies_us.iter().filter(|&&l| l > 500_000.0).count();
            lane.round_medians.push(percentile(&b.latencies_us, 0.5));
            lane.samples.extend(b.latencies_us);
            lane.failures += b.failures;
        }
    }
    let blocked = SocketAddr::new(ips[1], SERVER_PORT + 1);
    let floor = lanes[0].round_medians.clone();
    let mut out = Vec::new();
    for lane in &lanes {
        let diffs: Vec<f64> = lane
            .round_medians
            .iter()
            .zip(&floor)
            .map(|(v, f)| v - f)
            .collect();
        out.push(VariantResult {
            variant: lane.variant.name.to_owned(),
            connections: lane.samples.len(),
            failures: lane.failures,
            slow: lane.slow,
            enforced: lane.client.dropped(blocked)?,
            median_us: percentile(&lane.samples, 0.5),
            trimmed_mean_us: trimmed_mean(&lane.samples),
            extra_us: percentile(&diffs, 0.5),
            extra_iqr_us: percentile(&diffs, 0.75) - percentile(&diffs, 0.25),
        });
    }
    Ok(PointResult {
        point,
        variants: out,
    })
}

/// Measures `points` with every variant, reporting progress on stderr; a
/// point that fails is reported and left out.
#[must_use]
pub fn run_points(
    points: Vec<SweepPoint>,
    effort: Effort,
    started: std::time::Instant,
) -> Vec<PointResult> {
    let mut out = Vec::new();
    for p in points {
        eprint!(
            "[{:>4.0}s] sweep: {} selecting × {} rules … ",
            started.elapsed().as_secs_f64(),
            p.selecting,
            p.rules_per_policy
        );
        match measure(p, &VARIANTS, effort) {
            Ok(r) => {
                eprintln!(
                    "{}",
                    r.variants[1..]
                        .iter()
                        .map(|v| format!("{} {:+.1} µs", v.variant, v.extra_us))
                        .collect::<Vec<_>>()
                        .join(", ")
                );
                out.push(r);
            }
            Err(e) => eprintln!("FAILED: {e:#}"),
        }
    }
    out
}

/// The points of the default sweep: policies selecting the receiver at one
/// rule each, then rules per policy at 100 policies.
#[must_use]
pub fn default_points() -> Vec<SweepPoint> {
    let mut v: Vec<SweepPoint> = [0, 100, 300, 1_000, 3_000]
        .into_iter()
        .map(|selecting| SweepPoint {
            selecting,
            rules_per_policy: 1,
        })
        .collect();
    v.extend([10, 200].into_iter().map(|rules_per_policy| SweepPoint {
        selecting: 100,
        rules_per_policy,
    }));
    v
}

/// The results as a Markdown table: the floor's median, then each
/// variant's extra cost per new connection (± half the IQR of the
/// per-round differences).
#[must_use]
pub fn markdown(results: &[PointResult]) -> String {
    let mut out = String::new();
    let Some(first) = results.first() else {
        return out;
    };
    let _ = write!(
        out,
        "| policies selecting the receiver | rules per policy | no ruleset (median) |"
    );
    for v in &first.variants[1..] {
        let _ = write!(out, " {} |", v.variant);
    }
    out.push('\n');
    out.push_str("|---:|---:|---:|");
    for _ in &first.variants[1..] {
        out.push_str("---:|");
    }
    out.push('\n');
    for r in results {
        let _ = write!(
            out,
            "| {} | {} | {:.0} µs |",
            r.point.selecting, r.point.rules_per_policy, r.variants[0].median_us
        );
        for v in &r.variants[1..] {
            let mark = if v.enforced && v.failures == 0 {
                ""
            } else {
                " (!)"
            };
            let _ = write!(
                out,
                " {:+.1} µs ±{:.1}{mark} |",
                v.extra_us,
                v.extra_iqr_us / 2.0
            );
        }
        out.push('\n');
    }
    out
}
