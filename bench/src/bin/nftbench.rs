//! The dataplane benchmark (driven by `cargo xtask bench`, which builds this
//! in release mode so the numbers mean something):
//!
//! `nftbench run [--quick] [--sweep] [--scales 100,1000] [--out DIR]`
//! (`--sweep`: also the per-packet sweep of `bench::sweep`)
//!
//! Every (backend, point) runs in a child process (`nftbench worker-…`) in a
//! fresh network namespace; the results go to DIR as results.md,
//! results.json and PNG charts.

use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context};
use bench::backends::{KINDS, SCALE_KINDS};
use bench::packet::{packet_worker, PacketPoint, PacketResult};
use bench::report::{charts, markdown, readme_section, Results};
use bench::run::{scale_worker_with, ScaleResult};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("worker-scale") => {
            // `worker-scale BACKEND POLICIES REPS [--fused-lookup]`.
            let options = bench::backends::Options {
                fused_lookup: args.get(4).is_some_and(|a| a == "--fused-lookup"),
            };
            let r = scale_worker_with(&args[1], args[2].parse()?, args[3].parse()?, &options)?;
            println!("{}", serde_json::to_string(&r)?);
            Ok(())
        }
        Some("worker-packet") => {
            let point: PacketPoint = serde_json::from_str(&args[2])?;
            let r = packet_worker(&args[1], point, args[3].parse()?)?;
            println!("{}", serde_json::to_string(&r)?);
            Ok(())
        }
        Some("run") => run(&args[1..]),
        _ => {
            bail!("usage: nftbench run [--quick] [--sweep] [--scales N,N…] [--reps N] [--out DIR]")
        }
    }
}

fn worker<T: serde::de::DeserializeOwned>(args: &[String]) -> anyhow::Result<T> {
    let out = Command::new(std::env::current_exe()?)
        .args(args)
        .output()
        .context("starting a worker")?;
    if !out.status.success() {
        bail!(
            "worker {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_default();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!(
        "{} CPUs ({cpu}), Linux {}",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        kernel.trim()
    )
}

fn run(args: &[String]) -> anyhow::Result<()> {
    let mut quick = false;
    let mut scales: Option<Vec<usize>> = None;
    let mut out = PathBuf::from("target/bench");
    let mut reps_arg: Option<usize> = None;
    let mut sweep = false;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--quick" => quick = true,
            "--sweep" => sweep = true,
            "--scales" => {
                let v = it.next().context("--scales needs a value")?;
                scales = Some(
                    v.split(',')
                        .map(|s| s.trim().parse())
                        .collect::<Result<_, _>>()?,
                );
            }
            "--reps" => reps_arg = Some(it.next().context("--reps needs a value")?.parse()?),
            "--out" => out = it.next().context("--out needs a value")?.into(),
            other => bail!("unknown argument {other:?}"),
        }
    }
    let scales = scales.unwrap_or_else(|| {
        if quick {
            vec![100, 300]
        } else {
            vec![100, 1_000, 3_000, 10_000]
        }
    });
    // 100 rounds: a p99 of fewer samples is their maximum (of 20, the
    // slowest round, which is the first after the cold transaction); the
    // first round is reported on its own row.
    let reps = reps_arg.unwrap_or(if quick { 10 } else { 100 });
    let connections = if quick { 1_000 } else { 2_000 };
    std::fs::create_dir_all(&out)?;
    let started = Instant::now();
    let mut results = Results {
        machine: machine(),
        scale: Vec::new(),
        packet: Vec::new(),
        sweep: Vec::new(),
    };

    let total = scales.len() * SCALE_KINDS.len();
    let mut done = 0;
    for &p in &scales {
        for kind in SCALE_KINDS {
            done += 1;
            eprint!(
                "[{:>4.0}s] scale {done}/{total}: {kind} at {p} policies … ",
                started.elapsed().as_secs_f64()
            );
            match worker::<ScaleResult>(&[
                "worker-scale".into(),
                kind.into(),
                p.to_string(),
                reps.to_string(),
            ]) {
                Ok(r) => {
                    eprintln!(
                        "cold {:.0} ms, {} rules, {} set elements",
                        r.cold_ms, r.size.rules, r.size.set_elements
                    );
                    results.scale.push(r);
                }
                Err(e) => eprintln!("FAILED: {e:#}"),
            }
        }
    }

    let base = PacketPoint::default();
    // (dimension, values with --quick, values without, how to set it)
    type Sweep = (
        &'static str,
        &'static [usize],
        &'static [usize],
        fn(&mut PacketPoint, usize),
    );
    let sweeps: [Sweep; 5] = [
        ("total_policies", &[10, 300], &[10, 1_000, 3_000], |p, v| {
            p.total_policies = v;
        }),
        ("selecting_receiver", &[1, 30], &[1, 10, 100], |p, v| {
            p.selecting_receiver = v;
        }),
        ("rules_per_policy", &[1, 20], &[1, 10, 50], |p, v| {
            p.selecting_receiver = 10;
            p.rules_per_policy = v;
        }),
        ("ports_cidrs", &[1, 30], &[1, 10, 100], |p, v| {
            p.selecting_receiver = 10;
            p.ports_cidrs = v;
        }),
        ("local_endpoints", &[2, 100], &[2, 50, 500], |p, v| {
            p.local_endpoints = v;
        }),
    ];
    let values = |(_, quick_values, full_values, _): &Sweep| {
        if quick {
            *quick_values
        } else {
            *full_values
        }
    };
    let total: usize = sweeps.iter().map(|s| values(s).len() * KINDS.len()).sum();
    let mut done = 0;
    for sweep in &sweeps {
        let (dim, _, _, set) = *sweep;
        let mut dim_results: Vec<PacketResult> = Vec::new();
        for &v in values(sweep) {
            let mut point = base;
            set(&mut point, v);
            for kind in KINDS {
                done += 1;
                eprint!(
                    "[{:>4.0}s] packet {done}/{total}: {kind}, {dim} = {v} … ",
                    started.elapsed().as_secs_f64()
                );
                let args = [
                    "worker-packet".into(),
                    kind.into(),
                    serde_json::to_string(&point)?,
                    connections.to_string(),
                ];
                match worker::<PacketResult>(&args) {
                    Ok(r) => {
                        eprintln!(
                            "p50 {:.0} µs, p99 {:.0} µs, {:.0} conn/s, {} failed",
                            r.p50_us, r.p99_us, r.conns_per_sec, r.failures
                        );
                        dim_results.push(r);
                    }
                    Err(e) => eprintln!("FAILED: {e:#}"),
                }
            }
        }
        results.packet.push((dim.to_owned(), dim_results));
    }

    if sweep {
        let (points, effort) = if quick {
            (
                bench::sweep::default_points()
                    .into_iter()
                    .filter(|p| p.selecting <= 1_000 && p.rules_per_policy <= 10)
                    .collect(),
                bench::sweep::Effort {
                    rounds: 6,
                    ..bench::sweep::Effort::FULL
                },
            )
        } else {
            (bench::sweep::default_points(), bench::sweep::Effort::FULL)
        };
        results.sweep = bench::sweep::run_points(points, effort, started);
    }
    std::fs::write(
        out.join("results.json"),
        serde_json::to_string_pretty(&results)?,
    )?;
    std::fs::write(out.join("results.md"), markdown(&results))?;
    let files = charts(&results, &out)?;
    let mut command = "cargo xtask bench".to_owned();
    for a in args {
        if a != "--out" && !a.contains('/') {
            command.push(' ');
            command.push_str(a);
        }
    }
    std::fs::write(
        out.join("README-performance.md"),
        readme_section(&results, &command),
    )?;
    eprintln!(
        "done in {:.0} s: {}/results.md, results.json and {} charts",
        started.elapsed().as_secs_f64(),
        out.display(),
        files.len()
    );
    Ok(())
}
