//! Cluster state → felix's logical ruleset → nftables objects (and text).
//!
//! - [`logical`]: the backend-neutral chain tree, IP sets and mark bits;
//! - [`nft`]: nftables objects as plain data;
//! - [`lower_nft`]: logical → nftables, with verdict maps and shared sets;
//! - [`render_nft`]: nftables objects → `nft -f` text;
//! - [`render_iptables`]: logical → felix's iptables-restore and ipset text;
//! - [`explain`]: the model's verdict as a path through the chains;
//! - [`fused`]: `--fused-lookup`, fusable policies as one set lookup;
//! - [`groups`]: the tables cut by namespace group (measured, not yet programmed);
//! - [`incremental`]: keeps the last compile and turns remote endpoint
//!   changes into set element deltas instead of compiling again.
//!
//! The compiler does no I/O: it turns plain data into plain data.

pub mod explain;
pub mod fused;
pub mod groups;
pub mod incremental;
mod label_index;
pub mod logical;
pub mod lower_nft;
pub mod nft;
pub mod render_iptables;
pub mod render_nft;

pub use incremental::{IncrementalCompiler, Outcome};
pub use logical::{
    compile, CompileError, CompileOptions, EndpointToHostAction, LogicalRuleset, MarkBits,
};

/// Compiles a node's iptables-mode ruleset (iptables-restore + ipset) in one go.
pub fn compile_iptables(
    state: &model::state::ClusterState,
    opts: &CompileOptions,
) -> Result<(LogicalRuleset, render_iptables::IptablesRulesets), CompileError> {
    let logical = compile(state, opts)?;
    let rendered = render_iptables::to_iptables(&logical);
    Ok((logical, rendered))
}

/// Compiles a node's nftables ruleset in one go.
pub fn compile_nftables(
    state: &model::state::ClusterState,
    opts: &CompileOptions,
) -> Result<(LogicalRuleset, nft::Ruleset), CompileError> {
    let logical = compile(state, opts)?;
    let ruleset = lower_nft::to_nftables(&logical);
    Ok((logical, ruleset))
}
