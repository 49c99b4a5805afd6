//! `nftpolicy render`: the node's ruleset as text, without touching the kernel.

use std::path::PathBuf;

use crate::dataplane::{load_files, DataplaneArgs};

/// Prints the ruleset; returns false if some object was rejected or skipped.
pub fn run(args: &DataplaneArgs, paths: &[PathBuf]) -> anyhow::Result<bool> {
    let (state, skipped) = load_files(paths)?;
    let logical = compiler::compile(&state, &args.compile_options()?)?;
    for (key, why) in &logical.rejected {
        eprintln!("error: rejected {key}: {why}");
    }
    print!("{}", args.render(&logical));
    Ok(skipped == 0 && logical.rejected.is_empty())
}
