//! `cargo xtask fuzz-targets`: the cargo-fuzz targets in `fuzz/` (selector
//! parser, manifest decoding, compiler), each run for a while with
//! libFuzzer, failing on the first crash.
//!
//! Only the stable toolchain is assumed: cargo-fuzz's instrumentation flags
//! (`-Cpasses=sancov-module`, …) are unstable, so the build runs with
//! `RUSTC_BOOTSTRAP=1`, and without a sanitizer (`--sanitizer none`; ASan
//! needs `-Zsanitizer` and a matching std, and the code is safe Rust, so
//! panics and aborts are what we look for).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Instant, SystemTime};

use anyhow::{bail, Context};

#[derive(clap::Args)]
pub struct FuzzTargetsArgs {
    /// Seconds of fuzzing per target (after the build).
    #[arg(long, default_value_t = 20)]
    seconds: u64,
    /// Targets to run (default: every file in fuzz/fuzz_targets).
    targets: Vec<String>,
}

impl FuzzTargetsArgs {
    /// The short fixed budget `cargo xtask test` runs: every target.
    pub fn ci() -> FuzzTargetsArgs {
        FuzzTargetsArgs {
            seconds: 15,
            targets: vec![],
        }
    }
}

fn fuzz_dir() -> PathBuf {
    crate::root().join("fuzz")
}

/// `cargo fuzz …` with what stable needs; run from the workspace root.
fn cargo_fuzz() -> Command {
    let mut cmd = crate::cargo();
    cmd.env("RUSTC_BOOTSTRAP", "1").arg("fuzz");
    cmd
}

/// The targets in fuzz/fuzz_targets, sorted.
fn all_targets() -> anyhow::Result<Vec<String>> {
    let dir = fuzz_dir().join("fuzz_targets");
    let mut targets = Vec::new();
    for entry in std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "rs") {
            if let Some(stem) = path.file_stem().and_then(|s| s.to_str()) {
                targets.push(stem.to_owned());
            }
        }
    }
    targets.sort();
    Ok(targets)
}

/// Installs cargo-fuzz from crates.io when `cargo fuzz` is not available.
fn ensure_cargo_fuzz() -> anyhow::Result<()> {
    let present = cargo_fuzz()
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if present {
        return Ok(());
    }
    println!("cargo-fuzz missing: cargo install cargo-fuzz --locked");
    let ok = crate::run_status(crate::cargo().args(["install", "cargo-fuzz", "--locked"]))?;
    if !ok {
        bail!("cargo install cargo-fuzz failed");
    }
    Ok(())
}

/// Crash, leak, timeout and OOM inputs libFuzzer wrote for `target` since
/// `since`.
fn new_artifacts(target: &str, since: SystemTime) -> Vec<PathBuf> {
    let dir = fuzz_dir().join("artifacts").join(target);
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut found: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .filter(|e| {
            e.metadata()
                .and_then(|m| m.modified())
                .is_ok_and(|t| t >= since)
        })
        .map(|e| e.path())
        .collect();
    found.sort();
    found
}

pub fn run(args: &FuzzTargetsArgs) -> anyhow::Result<bool> {
    let known = all_targets()?;
    let targets = if args.targets.is_empty() {
        known.clone()
    } else {
        args.targets.clone()
    };
    if let Some(unknown) = targets.iter().find(|t| !known.contains(t)) {
        bail!("no fuzz target {unknown:?} (known: {})", known.join(", "));
    }
    ensure_cargo_fuzz()?;

    let fuzz = fuzz_dir();
    println!("== building fuzz targets: {}", targets.join(", "));
    let started = Instant::now();
    let mut build = cargo_fuzz();
    build
        .args(["build", "--fuzz-dir"])
        .arg(&fuzz)
        .args(["--sanitizer", "none"]);
    if !crate::run_status(&mut build)? {
        bail!("cargo fuzz build failed");
    }
    println!("== built in {:.1}s", started.elapsed().as_secs_f64());

    let mut failed = Vec::new();
    for target in &targets {
        // libFuzzer adds what it finds to the first corpus directory: a
        // scratch one (ignored by git), so the committed seeds stay small.
        let scratch = fuzz.join("corpus-scratch").join(target);
        let seeds = fuzz.join("corpus").join(target);
        std::fs::create_dir_all(&scratch)
            .with_context(|| format!("creating {}", scratch.display()))?;
        println!("\n== fuzzing {target} for {}s", args.seconds);
        let since = SystemTime::now();
        let mut cmd = cargo_fuzz();
        cmd.args(["run", "--fuzz-dir"])
            .arg(&fuzz)
            .args(["--sanitizer", "none", target])
            .arg(&scratch);
        if seeds.is_dir() {
            cmd.arg(&seeds);
        }
        cmd.arg("--")
            .arg(format!("-max_total_time={}", args.seconds));
        // One input taking this long is a hang worth reporting.
        cmd.arg("-timeout=20");
        let ok = crate::run_status(&mut cmd)?;
        if ok {
            println!("== {target}: no crash in {}s", args.seconds);
            continue;
        }
        let artifacts = new_artifacts(target, since);
        println!("== {target}: FAILED");
        if artifacts.is_empty() {
            println!("   (no reproducer written: the build or libFuzzer itself failed; see above)");
        }
        for path in &artifacts {
            println!("   reproducer: {}", path.display());
            println!(
                "   rerun with: RUSTC_BOOTSTRAP=1 cargo fuzz run --fuzz-dir fuzz --sanitizer none {target} {}",
                relative(path).display()
            );
        }
        failed.push(target.clone());
    }
    println!();
    if failed.is_empty() {
        println!(
            "fuzz-targets: {} target(s), no crash ({:.1}s)",
            targets.len(),
            started.elapsed().as_secs_f64()
        );
        Ok(true)
    } else {
        println!("fuzz-targets: FAILED: {}", failed.join(", "));
        Ok(false)
    }
}

/// `path` relative to the workspace root when it is inside it.
fn relative(path: &Path) -> &Path {
    path.strip_prefix(crate::root()).unwrap_or(path)
}
