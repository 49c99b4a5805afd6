//! `cargo xtask bench`: nftables over netlink vs the nft command line vs
//! iptables mode, on one synthetic cluster per scale point.
//!
//! The measuring code lives in the bench crate (`bench/src/bin/nftbench.rs`
//! and its library): it is built here in release mode, because timings of
//! an unoptimised compiler would say nothing, and run with the options.

use std::path::PathBuf;
use std::process::Stdio;

use anyhow::{bail, Context};

#[derive(clap::Args)]
pub struct BenchArgs {
    /// A small subset (two scales, fewer repetitions and connections) that
    /// finishes within a few minutes.
    #[arg(long)]
    quick: bool,
    /// Policy counts to measure, comma separated (pods = 10 × policies,
    /// between 1,000 and 100,000). Default: 100,1000,3000,10000 (long), or
    /// 100,300 with --quick.
    #[arg(long)]
    scales: Option<String>,
    /// Repetitions of each incremental operation (default 10 with
    /// --quick, else 100, so that a p99 is not simply the slowest one).
    #[arg(long)]
    reps: Option<usize>,
    /// Also the per-packet sweep (policies selecting the receiver to
    /// 3,000, rules per policy to 200; felix tree in nftables and
    /// iptables-legacy, and the fused lookup): about a minute more.
    #[arg(long)]
    sweep: bool,
    /// Where results.md, results.json and the charts go.
    #[arg(long, default_value = "target/bench")]
    out: PathBuf,
}

/// Builds `nftbench` in release mode and runs it; returns whether it succeeded.
pub fn bench(args: &BenchArgs) -> anyhow::Result<bool> {
    if !nix::unistd::geteuid().is_root() {
        bail!("the benchmark needs root (it creates network namespaces)");
    }
    eprintln!("building nftbench (release) …");
    let st = super::cargo()
        .args(["build", "--release", "-p", "bench", "--bin", "nftbench"])
        .stderr(Stdio::inherit())
        .status()
        .context("running cargo build")?;
    if !st.success() {
        return Ok(false);
    }
    let exe = super::root().join("target/release/nftbench");
    let exe = match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => PathBuf::from(dir).join("release/nftbench"),
        None => exe,
    };
    let out = if args.out.is_absolute() {
        args.out.clone()
    } else {
        super::root().join(&args.out)
    };
    let mut cmd = std::process::Command::new(&exe);
    cmd.arg("run").arg("--out").arg(&out);
    if args.quick {
        cmd.arg("--quick");
    }
    if args.sweep {
        cmd.arg("--sweep");
    }
    if let Some(n) = args.reps {
        cmd.args(["--reps", &n.to_string()]);
    }
    if let Some(s) = &args.scales {
        cmd.args(["--scales", s]);
    }
    let st = cmd
        .status()
        .with_context(|| format!("running {}", exe.display()))?;
    Ok(st.success())
}
