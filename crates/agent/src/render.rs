//! `nftpolicy render`: the node's ruleset as text, without touching the kernel.

use std::path::PathBuf;

use crate::dataplane::{load_files, Backend, DataplaneArgs};

/// Prints the ruleset; returns false if some object was rejected or skipped.
pub fn run(args: &DataplaneArgs, paths: &[PathBuf]) -> anyhow::Result<bool> {
    let (state, skipped) = load_files(paths)?;
    let opts = args.compile_options();
    match args.backend {
        Backend::Nftables => {
            let (logical, ruleset) = compiler::compile_nftables(&state, &opts)?;
            for (key, why) in &logical.rejected {
                eprintln!("error: rejected {key}: {why}");
            }
            print!("{}", compiler::render_nft::render(&ruleset));
            Ok(skipped == 0 && logical.rejected.is_empty())
        }
        Backend::Iptables => {
            let (logical, rendered) = compiler::compile_iptables(&state, &opts)?;
            for (key, why) in &logical.rejected {
                eprintln!("error: rejected {key}: {why}");
            }
            print!("{}", compiler::render_iptables::render(&rendered));
            Ok(skipped == 0 && logical.rejected.is_empty())
        }
    }
}
