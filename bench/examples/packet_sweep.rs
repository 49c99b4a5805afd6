//! The per-packet sweep (needs root; builds and removes its own network
//! namespaces):
//!
//! `cargo run -p bench --example packet_sweep [-- --smoke] [--points 0x1,100x200]
//! [--rounds N] [--batch N] [--out FILE]`
//!
//! For each point (policies selecting the receiver × rules per policy) every
//! variant of [`bench::sweep::VARIANTS`] gets its own node; connections go
//! to each in interleaved rounds, and the extra cost per new connection over
//! the no-ruleset floor is printed as a Markdown table (and written as JSON
//! to FILE, default target/bench/sweep.json). The kernel does the measured
//! work, so a debug build measures the same thing as a release one.

use std::time::Instant;

use anyhow::Context;
use bench::sweep::{default_points, markdown, run_points, Effort, SweepPoint};

fn main() -> anyhow::Result<()> {
    let mut effort = Effort::FULL;
    let mut points = default_points();
    let mut out = std::path::PathBuf::from("target/bench/sweep.json");
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--smoke" => {
                effort = Effort::SMOKE;
                points = vec![SweepPoint {
                    selecting: 3,
                    rules_per_policy: 2,
                }];
            }
            "--points" => {
                let v = args.next().context("--points needs a value")?;
                points = v
                    .split(',')
                    .map(|p| -> anyhow::Result<SweepPoint> {
                        let (s, r) = p.split_once('x').context("a point is SELECTINGxRULES")?;
                        Ok(SweepPoint {
                            selecting: s.trim().parse()?,
                            rules_per_policy: r.trim().parse()?,
                        })
                    })
                    .collect::<Result<_, _>>()?;
            }
            "--rounds" => effort.rounds = args.next().context("--rounds N")?.parse()?,
            "--batch" => effort.batch = args.next().context("--batch N")?.parse()?,
            "--out" => out = args.next().context("--out FILE")?.into(),
            other => anyhow::bail!("unknown argument {other:?}"),
        }
    }
    let started = Instant::now();
    let total = points.len();
    let results = run_points(points, effort, started);
    if results.len() < total {
        anyhow::bail!("{} of {total} points failed", total - results.len());
    }
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&out, serde_json::to_string_pretty(&results)?)?;
    println!(
        "{} rounds × {} connections per variant and point, {:.0} s\n",
        effort.rounds,
        effort.batch,
        started.elapsed().as_secs_f64()
    );
    print!("{}", markdown(&results));
    Ok(())
}
