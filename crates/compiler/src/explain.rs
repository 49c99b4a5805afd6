//! The model's verdict as a path through the chains the compiler renders,
//! for `nftpolicy explain`: which chains a packet traverses on the sender's
//! egress and the receiver's ingress, and which policy and rule decided.

use std::net::IpAddr;

use model::calico::{Kind, PolicyType, Resource, ResourceKey};
use model::semantics::{Decision, EndpointVerdict};
use model::state::ClusterState;

use crate::logical::{
    policy_chain, profile_chain, CHAIN_FORWARD, CHAIN_FROM_WL_DISPATCH, CHAIN_INPUT,
    CHAIN_TO_WL_DISPATCH, CHAIN_WL_TO_HOST,
};

/// One direction's walk through the chains.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainPath {
    pub chains: Vec<String>,
    /// `accept` (returned with the accept bit) or `drop`.
    pub verdict: &'static str,
}

impl std::fmt::Display for ChainPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} → {}", self.chains.join(" → "), self.verdict)
    }
}

/// The chains `v` walks through, in felix's tree as nftpolicy renders it,
/// for a packet to `dst`: forwarded by the endpoint's node, or, egress to
/// an address of the endpoint's own node (its Node object's), through the
/// node's INPUT path (`cali-INPUT` → `cali-wl-to-host` → the same
/// dispatch).
pub fn chain_path(state: &ClusterState, v: &EndpointVerdict, dst: IpAddr) -> ChainPath {
    let to_own_node = v.direction == PolicyType::Egress
        && match state.endpoint(&v.endpoint) {
            Some(w) => matches!(
                state.get(&ResourceKey::new(Kind::Node, None, &w.spec.node)).as_deref(),
                Some(Resource::Node(n)) if n.nets().iter().any(|net| net.contains(&dst))
            ),
            None => false,
        };
    walk(state, v, to_own_node)
}

fn walk(state: &ClusterState, v: &EndpointVerdict, to_own_node: bool) -> ChainPath {
    let iface = match state.endpoint(&v.endpoint) {
        Some(w) => w.spec.interface_name.clone(),
        None => "?".into(),
    };
    let (dispatch, ep_chain) = match v.direction {
        PolicyType::Egress => (CHAIN_FROM_WL_DISPATCH, format!("cali-fw-{iface}")),
        PolicyType::Ingress => (CHAIN_TO_WL_DISPATCH, format!("cali-tw-{iface}")),
    };
    let mut chains: Vec<String> = if to_own_node {
        vec![CHAIN_INPUT.into(), CHAIN_WL_TO_HOST.into()]
    } else {
        vec![CHAIN_FORWARD.into()]
    };
    chains.extend([dispatch.to_owned(), ep_chain]);
    // Encapsulated packets and rejections drop in the endpoint's own chain,
    // before any policy.
    if matches!(
        v.decision,
        Decision::Encapsulated(_) | Decision::Rejected(_)
    ) {
        return ChainPath {
            chains,
            verdict: "drop",
        };
    }
    // The policy chains the packet was sent to: tier by tier, each tier
    // until a policy decides or passes.
    chains.extend(v.traversed.iter().map(|p| policy_chain(p, v.direction)));
    if let Decision::ProfileRule { profile, .. } = &v.decision {
        chains.push(profile_chain(profile, v.direction));
    }
    ChainPath {
        chains,
        verdict: if v.allowed { "accept" } else { "drop" },
    }
}
