//! Cluster state → felix's logical ruleset → nftables objects (and text).
//!
//! - [`logical`]: the backend-neutral chain tree, IP sets and mark bits;
//! - [`nft`]: nftables objects as plain data;
//! - [`lower_nft`]: logical → nftables, with verdict maps and shared sets;
//! - [`render_nft`]: nftables objects → `nft -f` text.
//!
//! The compiler does no I/O: it turns plain data into plain data.

pub mod logical;
pub mod lower_nft;
pub mod nft;
pub mod render_nft;

pub use logical::{
    compile, CompileError, CompileOptions, EndpointToHostAction, LogicalRuleset, MarkBits,
};

/// Compiles a node's nftables ruleset in one go.
pub fn compile_nftables(
    state: &model::state::ClusterState,
    opts: &CompileOptions,
) -> Result<(LogicalRuleset, nft::Ruleset), CompileError> {
    let logical = compile(state, opts)?;
    let ruleset = lower_nft::to_nftables(&logical);
    Ok((logical, ruleset))
}
