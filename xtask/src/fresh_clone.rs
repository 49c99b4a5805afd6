//! The check that the repository stands alone: clone the committed tree
//! into an empty temporary directory (so nothing sits beside it, as in a
//! user's clone) and run the demo and the model check from there.
//!
//! The clone builds into a copy of this checkout's `target/debug`: the
//! registry dependencies are then already built, and only the workspace's
//! own crates are compiled again from the clone's sources. (A copy, not the
//! directory itself: cargo would put the clone's binaries, which embed the
//! clone's paths, where this checkout's are.) A file the clone lacks — a
//! scenario, a document, a path that points outside the repository — fails
//! here as it would for a user.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context};

/// Runs the check; `Ok(false)` when the demo or the model check failed in
/// the clone.
pub fn run() -> anyhow::Result<bool> {
    let root = crate::root();
    let target = target_dir(&root)?;
    let scratch = tempfile::Builder::new()
        .prefix("nftpolicy-fresh-clone-")
        .tempdir()
        .context("creating a temporary directory for the clone")?;
    let clone = scratch.path().join("nftpolicy");
    let head = git(&root, &["rev-parse", "--short", "HEAD"])?;
    let dirty = !git(&root, &["status", "--porcelain", "--untracked-files=no"])?.is_empty();
    println!(
        "cloning the committed tree (HEAD {head}{}) into {} (nothing beside it)",
        if dirty {
            "; uncommitted changes are not part of it"
        } else {
            ""
        },
        clone.display()
    );
    run_checked(
        Command::new("git")
            .args(["clone", "--quiet", "--no-hardlinks"])
            .arg(&root)
            .arg(&clone),
        &format!("git clone {}", root.display()),
    )?;

    let clone_target = scratch.path().join("target");
    std::fs::create_dir_all(&clone_target)?;
    let debug = target.join("debug");
    if debug.is_dir() {
        let started = std::time::Instant::now();
        run_checked(
            Command::new("cp")
                .args(["-a", "--reflink=auto"])
                .arg(&debug)
                .arg(&clone_target),
            &format!("copying {}", debug.display()),
        )?;
        println!(
            "copied {} for the clone's build in {:.1}s",
            debug.display(),
            started.elapsed().as_secs_f64()
        );
    }
    let cargo_in_clone = |args: &[&str]| {
        let mut cmd = crate::cargo();
        cmd.current_dir(&clone)
            .env("CARGO_TARGET_DIR", &clone_target)
            .args(args);
        cmd
    };
    println!("\n-- in the clone: cargo xtask demo --no-install");
    if !crate::run_status(&mut cargo_in_clone(&["xtask", "demo", "--no-install"]))? {
        println!("the demo failed in a fresh clone");
        return Ok(false);
    }
    println!("\n-- in the clone: nftpolicy check tests/scenarios");
    if !crate::run_status(&mut cargo_in_clone(&[
        "run",
        "--quiet",
        "-p",
        "nftpolicy",
        "--",
        "check",
        "tests/scenarios",
    ]))? {
        println!("the model check failed in a fresh clone");
        return Ok(false);
    }
    Ok(true)
}

/// The target directory cargo uses for this checkout (honours
/// `CARGO_TARGET_DIR` and cargo configuration).
fn target_dir(root: &Path) -> anyhow::Result<PathBuf> {
    let out = crate::cargo()
        .current_dir(root)
        .args(["metadata", "--format-version", "1", "--no-deps"])
        .output()
        .context("running cargo metadata")?;
    if !out.status.success() {
        bail!(
            "cargo metadata failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    meta["target_directory"]
        .as_str()
        .map(PathBuf::from)
        .context("cargo metadata names no target directory")
}

fn git(dir: &Path, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("git")
        .current_dir(dir)
        .args(args)
        .output()
        .with_context(|| format!("running git {}", args.join(" ")))?;
    if !out.status.success() {
        bail!(
            "git {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// Runs `cmd` (`what` it does, for errors) and fails unless it succeeds.
fn run_checked(cmd: &mut Command, what: &str) -> anyhow::Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("{what}: starting it"))?;
    if !status.success() {
        bail!("{what} failed ({status})");
    }
    Ok(())
}
