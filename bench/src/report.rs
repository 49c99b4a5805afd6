//! Results → Markdown table, JSON and PNG charts.

use std::fmt::Write as _;
use std::path::Path;

use plotters::prelude::*;
use serde::{Deserialize, Serialize};

use crate::backends::{GROUPED_KIND, KINDS, SCALE_KINDS};
use crate::packet::PacketResult;
use crate::run::{percentile, ScaleResult, OPS};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Results {
    pub machine: String,
    pub scale: Vec<ScaleResult>,
    /// (dimension, results).
    pub packet: Vec<(String, Vec<PacketResult>)>,
    /// The per-packet sweep (`--sweep`): extra cost per new connection.
    #[serde(default)]
    pub sweep: Vec<crate::sweep::PointResult>,
}

fn find<'a>(r: &'a Results, backend: &str, policies: usize) -> Option<&'a ScaleResult> {
    r.scale
        .iter()
        .find(|s| s.backend == backend && s.policies == policies)
}

fn op_samples<'a>(s: &'a ScaleResult, op: &str) -> &'a [f64] {
    s.ops
        .iter()
        .find(|(o, _)| o == op)
        .map(|(_, v)| v.as_slice())
        .unwrap_or(&[])
}

/// The per-scale metrics as (name, value getter).
type Metric = (&'static str, Box<dyn Fn(&ScaleResult) -> f64>);

fn metrics() -> Vec<Metric> {
    let mut m: Vec<Metric> = vec![(
        "cold programming (ms)",
        Box::new(|s: &ScaleResult| s.cold_ms),
    )];
    for op in OPS {
        // The first round comes right after the cold transaction and is
        // the slowest, as any round after an idle gap is (NFTBENCH_GAP_MS):
        // on its own row.
        m.push((
            leak(format!("{op} first (ms)")),
            Box::new(move |s: &ScaleResult| op_samples(s, op).first().copied().unwrap_or(f64::NAN)),
        ));
        m.push((
            leak(format!("{op} p50 (ms)")),
            Box::new(move |s: &ScaleResult| percentile(op_samples(s, op), 0.5)),
        ));
        m.push((
            leak(format!("{op} p99 (ms)")),
            Box::new(move |s: &ScaleResult| percentile(op_samples(s, op), 0.99)),
        ));
    }
    // Issue 18's goal: a policy change ≤ 10× the same run's relabel.
    for op in ["policy_add", "policy_delete"] {
        m.push((
            leak(format!("{op} p99 ÷ pod_relabel p99")),
            Box::new(move |s: &ScaleResult| {
                percentile(op_samples(s, op), 0.99) / percentile(op_samples(s, "pod_relabel"), 0.99)
            }),
        ));
    }
    m.push((
        "full compile alone (ms)",
        Box::new(|s: &ScaleResult| s.compile_ms),
    ));
    m.push(("rules", Box::new(|s: &ScaleResult| s.size.rules as f64)));
    m.push(("chains", Box::new(|s: &ScaleResult| s.size.chains as f64)));
    m.push((
        "sets (+maps)",
        Box::new(|s: &ScaleResult| s.size.sets as f64),
    ));
    m.push((
        "set elements",
        Box::new(|s: &ScaleResult| s.size.set_elements as f64),
    ));
    m.push((
        "kernel slab growth (kB, noisy)",
        Box::new(|s: &ScaleResult| s.slab_kb_delta as f64),
    ));
    m.push((
        "agent CPU (ms)",
        Box::new(|s: &ScaleResult| s.cpu_user_ms + s.cpu_sys_ms),
    ));
    m.push((
        "helper processes CPU (ms)",
        Box::new(|s: &ScaleResult| s.children_cpu_ms),
    ));
    m.push((
        "peak RSS (MiB)",
        Box::new(|s: &ScaleResult| s.peak_rss_kib as f64 / 1024.0),
    ));
    m
}

fn leak(s: String) -> &'static str {
    Box::leak(s.into_boxed_str())
}

fn fmt(v: f64) -> String {
    if v.is_nan() {
        "–".into()
    } else if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

fn ratio(a: f64, b: f64) -> String {
    if a.is_nan() || b.is_nan() || b == 0.0 {
        "–".into()
    } else {
        format!("{:.1}×", a / b)
    }
}

pub fn markdown(r: &Results) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# nftpolicy dataplane benchmark\n\nMachine: {}\n",
        r.machine
    );
    let mut scales: Vec<usize> = r.scale.iter().map(|s| s.policies).collect();
    scales.sort();
    scales.dedup();
    for p in scales {
        let Some(any) = r.scale.iter().find(|s| s.policies == p) else {
            continue;
        };
        let _ = writeln!(
            out,
            "## {p} policies, {} pods, {} namespaces, {} local endpoints\n",
            any.pods, any.namespaces, any.local_endpoints
        );
        if let Some(auto) = find(r, GROUPED_KIND, p) {
            let _ = writeln!(
                out,
                "The agent's default, `--table-groups auto`, cut this ruleset into {} table{} per family.\n",
                auto.table_groups,
                if auto.table_groups == 1 { "" } else { "s" }
            );
        }
        let _ = writeln!(
            out,
            "| metric | nft netlink, one table | nft netlink, --table-groups auto (default) | nft CLI | iptables | CLI / netlink | iptables / netlink |"
        );
        let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|---:|");
        for (name, get) in metrics() {
            // In SCALE_KINDS' order: netlink, grouped, CLI, iptables.
            let v: Vec<f64> = SCALE_KINDS
                .iter()
                .map(|k| find(r, k, p).map(&get).unwrap_or(f64::NAN))
                .collect();
            // A ratio row's values are not compared across backends.
            let across = |a: f64, b: f64| {
                if name.contains('÷') {
                    "–".to_owned()
                } else {
                    ratio(a, b)
                }
            };
            let _ = writeln!(
                out,
                "| {name} | {} | {} | {} | {} | {} | {} |",
                fmt(v[0]),
                fmt(v[1]),
                fmt(v[2]),
                fmt(v[3]),
                across(v[2], v[0]),
                across(v[3], v[0])
            );
        }
        let _ = writeln!(out);
    }
    for (dim, results) in &r.packet {
        let _ = writeln!(out, "## First packet: connect() latency along `{dim}`\n");
        let _ = writeln!(
            out,
            "| {dim} | backend | p50 µs | p99 µs | conn/s | failures | enforced |"
        );
        let _ = writeln!(out, "|---:|---|---:|---:|---:|---:|---|");
        for pr in results {
            let _ = writeln!(
                out,
                "| {} | {} | {:.0} | {:.0} | {:.0} | {} | {} |",
                dim_value(&pr.point, dim),
                pr.backend,
                pr.p50_us,
                pr.p99_us,
                pr.conns_per_sec,
                pr.failures,
                if pr.enforced { "yes" } else { "NO" }
            );
        }
        let _ = writeln!(out);
    }
    if !r.sweep.is_empty() {
        let _ = writeln!(
            out,
            "## Per new connection: extra cost over no ruleset (median of paired round differences)\n"
        );
        let _ = writeln!(out, "{}", crate::sweep::markdown(&r.sweep));
    }
    out
}

pub fn dim_value(p: &crate::packet::PacketPoint, dim: &str) -> usize {
    match dim {
        "total_policies" => p.total_policies,
        "selecting_receiver" => p.selecting_receiver,
        "rules_per_policy" => p.rules_per_policy,
        "ports_cidrs" => p.ports_cidrs,
        _ => p.local_endpoints,
    }
}

fn chart(
    path: &Path,
    title: &str,
    xlabel: &str,
    series: &[(String, Vec<(f64, f64)>)],
) -> anyhow::Result<()> {
    let xs = series.iter().flat_map(|(_, v)| v.iter().map(|p| p.0));
    let ys = series
        .iter()
        .flat_map(|(_, v)| v.iter().map(|p| p.1))
        .filter(|y| y.is_finite());
    let (xmin, xmax) = xs.fold((f64::MAX, f64::MIN), |(a, b), x| (a.min(x), b.max(x)));
    let ymax = ys.fold(0.0f64, f64::max).max(1e-3) * 1.1;
    if xmin > xmax {
        return Ok(());
    }
    let root = BitMapBackend::new(path, (800, 500)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut c = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(xmin..xmax.max(xmin + 1.0), 0.0..ymax)?;
    c.configure_mesh().x_desc(xlabel).draw()?;
    let colours = [BLUE, RED, GREEN];
    for (i, (name, pts)) in series.iter().enumerate() {
        let colour = colours[i % 3];
        let pts: Vec<(f64, f64)> = pts.iter().copied().filter(|p| p.1.is_finite()).collect();
        c.draw_series(LineSeries::new(pts.clone(), colour.stroke_width(2)))?
            .label(name.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], colour));
        c.draw_series(pts.iter().map(|p| Circle::new(*p, 3, colour.filled())))?;
    }
    c.configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}

fn slug(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .collect::<String>()
        .split('_')
        .filter(|p| !p.is_empty())
        .collect::<Vec<_>>()
        .join("_")
}

/// One PNG per metric against scale, one per first-packet dimension.
pub fn charts(r: &Results, dir: &Path) -> anyhow::Result<Vec<String>> {
    let mut files = Vec::new();
    for (name, get) in metrics() {
        let series: Vec<(String, Vec<(f64, f64)>)> = SCALE_KINDS
            .iter()
            .map(|k| {
                let mut pts: Vec<(f64, f64)> = r
                    .scale
                    .iter()
                    .filter(|s| s.backend == *k)
                    .map(|s| (s.policies as f64, get(s)))
                    .collect();
                pts.sort_by(|a, b| a.0.total_cmp(&b.0));
                (k.to_string(), pts)
            })
            .collect();
        let file = format!("scale_{}.png", slug(name));
        chart(&dir.join(&file), name, "policies", &series)?;
        files.push(file);
    }
    for (dim, results) in &r.packet {
        let series: Vec<(String, Vec<(f64, f64)>)> = KINDS
            .iter()
            .map(|k| {
                let pts = results
                    .iter()
                    .filter(|p| p.backend == *k)
                    .map(|p| (dim_value(&p.point, dim) as f64, p.p99_us))
                    .collect();
                (k.to_string(), pts)
            })
            .collect();
        let file = format!("packet_p99_{dim}.png");
        chart(
            &dir.join(&file),
            &format!("first-packet connect() p99 (µs) vs {dim}"),
            dim,
            &series,
        )?;
        files.push(file);
    }
    Ok(files)
}

/// The README's "Performance" section: the largest scale's table, where
/// the charts are, the machine and how to reproduce.
pub fn readme_section(r: &Results, command: &str) -> String {
    let md = markdown(r);
    let largest = r.scale.iter().map(|s| s.policies).max().unwrap_or(0);
    let table: String = md
        .split("\n## ")
        .find(|sec| sec.starts_with(&format!("{largest} policies")))
        .map(|sec| format!("### {sec}"))
        .unwrap_or_default();
    format!(
        "## Performance\n\n\
         Same synthetic cluster, same node, one run; each backend in its own fresh network \
         namespace and child process, all three fed by the same incremental compiler: nftables \
         over netlink (this project: element deltas sent as they are, other changes diffed \
         against the committed ruleset), the same ruleset through `nft -f` (full file cold, then \
         flush/re-add changed chains and add/delete set elements per transaction, one `nft` \
         process each, as felix's and kube-proxy's nftables modes do) and iptables mode \
         (iptables-legacy-restore + ipset restore of the changed chains and members). \
         Incremental times run from the change to the cluster state (compile included) to the \
         kernel's ack.\n\n\
         Machine: {}.\n\n{table}\n\
         Charts of every metric against scale, and first-packet connect() latency along each \
         dimension: `target/bench/*.png`; all numbers: `target/bench/results.md` and \
         `results.json`.\n\n\
         Reproduce (root, Linux with nf_tables, nft, iptables-legacy and ipset): `{command}` \
         (`--quick` for a 1-minute subset; no `--scales` for the long run up to 10,000 policies).\n",
        r.machine
    )
}
