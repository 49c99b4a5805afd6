//! The reference semantics: what felix's dataplane does to a connection,
//! computed directly from the cluster state. This is the oracle every kernel
//! test is checked against, and the engine behind `nftpolicy explain`.
//!
//! Evaluation order, per endpoint and direction (the sender's egress, then
//! the receiver's ingress), as felix's `cali-fw-`/`cali-tw-` chains do it:
//! 0. egress only: VXLAN (UDP to the VXLAN port) and IP-in-IP (protocol 4)
//!    are dropped unless allowed ([`WorkloadEncap`]); then, if a rejected
//!    object covers the endpoint in this direction — the endpoint itself,
//!    one of its profiles, or a rejected policy selecting it — dropped
//!    ([`crate::reject`]: rejections narrow, never widen);
//! 1. tier by tier, in tier order ([`ClusterState::tiers`]), the tiers
//!    with a policy that selects the endpoint and has that direction in its
//!    types (a tier with none is skipped); within a tier its policies by
//!    `order` then id; each policy's rules in order: the first rule that
//!    matches decides — Allow accepts (for this direction), Deny drops,
//!    Pass skips the rest of the tier and goes on to the next one, Log
//!    records and goes on;
//! 2. at the end of a tier none of whose policies allowed, denied or
//!    passed: the tier's `defaultAction` — Deny (the default) drops, Pass
//!    goes on to the next tier;
//! 3. after the last tier, the endpoint's profiles in order, the same way;
//!    no profile rule matched: dropped.
//!
//! This is felix's `cali-tw-`/`cali-fw-` chain (felix/rules/endpoints.go):
//! per tier "Start of tier" clears the pass bit, each policy chain is
//! jumped to while the pass bit is clear, "Return if policy accepted";
//! then, unless the tier's defaultAction is Pass, "Drop if no policies
//! passed packet" while the pass bit is still clear. (nftpolicy's chains
//! skip each later jump once the accept bit is set and return once per
//! tier: the same verdicts with one rule per policy.)
//!
//! Selectors are evaluated the way the kernel sees them: as IP sets. A
//! source "matches" `role == 'db'` when its address is in the set of
//! addresses of everything labelled `role == 'db'`.

use std::fmt;
use std::net::IpAddr;

use crate::calico::{Action, IcmpFields, PolicyType, Port, Protocol, ResourceKey, TierAction};
use crate::endpoint::Endpoint;
use crate::state::{
    ClusterState, Encap, LabelledNets, PolicyId, Rejection, ResolvedEntity, ResolvedPolicy,
    ResolvedRule, WorkloadEncap,
};

/// One connection attempt, as the first packet shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packet {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub protocol: Protocol,
    /// Unknown for probes (ephemeral); rules on source ports then never match.
    pub src_port: Option<u16>,
    pub dst_port: Option<u16>,
    /// ICMP type and code, for ICMP packets.
    pub icmp: Option<(u8, u8)>,
}

/// What decided one endpoint's verdict in one direction.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// A policy rule with action Allow or Deny matched.
    PolicyRule {
        tier: String,
        policy: PolicyId,
        index: usize,
        action: Action,
    },
    /// Policies of a tier (with defaultAction Deny) applied but none
    /// allowed, denied or passed the packet.
    EndOfTier { tier: String, last_policy: PolicyId },
    /// A profile rule matched (Kubernetes namespace profiles allow all).
    ProfileRule {
        profile: String,
        index: usize,
        action: Action,
    },
    /// No policy decided and no profile rule matched.
    NoProfileMatched,
    /// An encapsulated packet sent by a workload (egress only).
    Encapsulated(Encap),
    /// A rejected object covers the endpoint in this direction: all its
    /// traffic drops until the object is fixed.
    Rejected(Rejection),
}

impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Decision::PolicyRule {
                tier,
                policy,
                index,
                action,
            } => write!(
                f,
                "{action:?} by rule {index} of policy {policy} in tier {tier}"
            ),
            Decision::EndOfTier { tier, last_policy } => write!(
                f,
                "Deny at end of tier {tier}: its policies selected the endpoint (last {last_policy}) but none allowed, denied or passed"
            ),
            Decision::ProfileRule {
                profile,
                index,
                action,
            } => write!(f, "{action:?} by rule {index} of profile {profile}"),
            Decision::NoProfileMatched => write!(f, "Deny: no policy or profile rule matched"),
            Decision::Encapsulated(e) => write!(
                f,
                "Deny: {e} packets from workloads are dropped (allow them with --allow-{}-packets-from-workloads)",
                match e {
                    Encap::Vxlan => "vxlan",
                    Encap::Ipip => "ipip",
                }
            ),
            Decision::Rejected(r) => write!(
                f,
                "Deny: {} is rejected ({}); it drops all traffic here until it is fixed",
                r.object, r.reason
            ),
        }
    }
}

/// One endpoint's verdict in one direction.
#[derive(Debug, Clone, PartialEq)]
pub struct EndpointVerdict {
    pub endpoint: ResourceKey,
    pub direction: PolicyType,
    pub allowed: bool,
    pub decision: Decision,
    /// The policies selecting the endpoint in this direction, in
    /// evaluation order.
    pub policies: Vec<PolicyId>,
    /// The policies whose chains the packet went through, in order (a
    /// Pass skips the rest of its tier; a decision ends the walk).
    pub traversed: Vec<PolicyId>,
    /// The last Pass rule that sent evaluation on to the next tier or the
    /// profiles.
    pub passed_by: Option<(PolicyId, usize)>,
    /// Log rules that matched on the way: (policy or profile, rule index).
    pub logged: Vec<(String, usize)>,
}

/// The verdict for a connection: the sender's egress and the receiver's
/// ingress, where each is a workload endpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct Verdict {
    pub egress: Option<EndpointVerdict>,
    pub ingress: Option<EndpointVerdict>,
}

impl Verdict {
    pub fn allowed(&self) -> bool {
        self.egress.as_ref().is_none_or(|v| v.allowed)
            && self.ingress.as_ref().is_none_or(|v| v.allowed)
    }

    /// The direction whose denial dropped the packet (egress first).
    pub fn denied_by(&self) -> Option<&EndpointVerdict> {
        [&self.egress, &self.ingress]
            .into_iter()
            .flatten()
            .find(|v| !v.allowed)
    }
}

/// The policy engine over one cluster state. Resolution (parsing and
/// scoping every policy's selectors) is done once, in `new`.
pub struct Evaluator<'a> {
    state: &'a ClusterState,
    policies: Vec<ResolvedPolicy>,
    nets: Vec<LabelledNets<'a>>,
    encap: WorkloadEncap,
}

impl<'a> Evaluator<'a> {
    /// The engine with felix's default configuration.
    pub fn new(state: &'a ClusterState) -> Self {
        Self::with_encap(state, WorkloadEncap::default())
    }

    /// The engine for a node that lets workloads send what `encap` allows.
    pub fn with_encap(state: &'a ClusterState, encap: WorkloadEncap) -> Self {
        let (policies, _errors) = state.resolved_policies();
        Evaluator {
            state,
            policies,
            nets: state.labelled_nets(),
            encap,
        }
    }

    pub fn state(&self) -> &ClusterState {
        self.state
    }

    pub fn evaluate(&self, packet: &Packet) -> Verdict {
        let src_ep = self.state.endpoint_by_ip(packet.src);
        let dst_ep = self.state.endpoint_by_ip(packet.dst);
        Verdict {
            egress: src_ep
                .map(|(key, ep)| self.evaluate_endpoint(key, ep, PolicyType::Egress, packet)),
            ingress: dst_ep
                .map(|(key, ep)| self.evaluate_endpoint(key, ep, PolicyType::Ingress, packet)),
        }
    }

    /// The policies selecting `ep` in direction `dir`, in evaluation order.
    pub fn policies_for(&self, ep: &Endpoint, dir: PolicyType) -> Vec<&ResolvedPolicy> {
        let labels = self.state.endpoint_labels(ep);
        self.policies
            .iter()
            .filter(|p| p.applies(dir) && p.selector.matches(&labels))
            .collect()
    }

    /// The verdict of endpoint `ep` (at `key`) in direction `dir`.
    pub fn evaluate_endpoint(
        &self,
        key: &ResourceKey,
        ep: &Endpoint,
        dir: PolicyType,
        packet: &Packet,
    ) -> EndpointVerdict {
        let policies = self.policies_for(ep, dir);
        let mut verdict = EndpointVerdict {
            endpoint: key.clone(),
            direction: dir,
            allowed: false,
            decision: Decision::NoProfileMatched,
            policies: policies.iter().map(|p| p.id.clone()).collect(),
            traversed: Vec::new(),
            passed_by: None,
            logged: Vec::new(),
        };
        if dir == PolicyType::Egress {
            if let Some(e) = self.encap.dropped(packet.protocol, packet.dst_port) {
                verdict.decision = Decision::Encapsulated(e);
                return verdict;
            }
        }
        if let Some(r) = self.state.rejection_for(key, ep, policies.iter().copied()) {
            verdict.decision = Decision::Rejected(r);
            return verdict;
        }
        for tier in policies.chunk_by(|a, b| a.tier_rank == b.tier_rank) {
            if let Some(decided) = self.evaluate_tier(tier, dir, packet, &mut verdict) {
                verdict.allowed = decided == Action::Allow;
                return verdict;
            }
        }
        let namespace = key.namespace.as_deref();
        for profile_name in ep.spec.profiles.iter() {
            let Some(profile) = self.state.profile(profile_name) else {
                continue;
            };
            let rules = match dir {
                PolicyType::Ingress => &profile.spec.ingress,
                PolicyType::Egress => &profile.spec.egress,
            };
            for (index, rule) in rules.iter().enumerate() {
                // Profile rules are not namespaced (profiles are global).
                let Ok(rule) = ResolvedRule::new(rule, None) else {
                    continue;
                };
                let _ = namespace;
                if !self.rule_matches(&rule, packet) {
                    continue;
                }
                match rule.action {
                    Action::Log => verdict.logged.push((profile_name.to_string(), index)),
                    // Pass in a profile goes on to the next profile.
                    Action::Pass => break,
                    action @ (Action::Allow | Action::Deny) => {
                        verdict.allowed = action == Action::Allow;
                        verdict.decision = Decision::ProfileRule {
                            profile: profile_name.to_string(),
                            index,
                            action,
                        };
                        return verdict;
                    }
                }
            }
        }
        verdict
    }

    /// One tier's policies (all selecting the endpoint in `dir`): the
    /// action that ends evaluation (Allow or Deny, with the decision
    /// recorded in `verdict`), or `None` to go on to the next tier.
    fn evaluate_tier(
        &self,
        tier: &[&ResolvedPolicy],
        dir: PolicyType,
        packet: &Packet,
        verdict: &mut EndpointVerdict,
    ) -> Option<Action> {
        for p in tier {
            verdict.traversed.push(p.id.clone());
            for (index, rule) in p.rules(dir).iter().enumerate() {
                if !self.rule_matches(rule, packet) {
                    continue;
                }
                match rule.action {
                    Action::Log => verdict.logged.push((p.id.to_string(), index)),
                    Action::Pass => {
                        verdict.passed_by = Some((p.id.clone(), index));
                        return None;
                    }
                    action @ (Action::Allow | Action::Deny) => {
                        verdict.decision = Decision::PolicyRule {
                            tier: p.tier.name.clone(),
                            policy: p.id.clone(),
                            index,
                            action,
                        };
                        return Some(action);
                    }
                }
            }
        }
        let last = tier.last()?;
        match last.tier.default_action {
            TierAction::Pass => None,
            TierAction::Deny => {
                verdict.decision = Decision::EndOfTier {
                    tier: last.tier.name.clone(),
                    last_policy: last.id.clone(),
                };
                Some(Action::Deny)
            }
        }
    }

    /// Whether `rule`'s match criteria all hold for `packet`.
    pub fn rule_matches(&self, rule: &ResolvedRule, p: &Packet) -> bool {
        let v6 = p.src.is_ipv6();
        if let Some(v) = rule.ip_version {
            if (v == 6) != v6 {
                return false;
            }
        }
        // felix's FilterRuleToIPVersion: a CIDR list holding only the other
        // family's CIDRs takes the rule out of this family altogether
        // (rather than leaving an unconditional rule behind).
        let other_family_only = |nets: &[ipnet::IpNet]| {
            !nets.is_empty() && nets.iter().all(|n| n.addr().is_ipv6() != v6)
        };
        if [
            &rule.source.nets,
            &rule.source.not_nets,
            &rule.destination.nets,
            &rule.destination.not_nets,
        ]
        .into_iter()
        .any(|nets| other_family_only(nets))
        {
            return false;
        }
        if let Some(proto) = rule.protocol {
            if proto.number() != p.protocol.number() {
                return false;
            }
        }
        if let Some(proto) = rule.not_protocol {
            if proto.number() == p.protocol.number() {
                return false;
            }
        }
        if let Some(icmp) = &rule.icmp {
            if !icmp_matches(icmp, p) {
                return false;
            }
        }
        if let Some(icmp) = &rule.not_icmp {
            if icmp_matches(icmp, p) {
                return false;
            }
        }
        self.entity_matches(&rule.source, p.src, p.src_port, p.protocol)
            && self.entity_matches(&rule.destination, p.dst, p.dst_port, p.protocol)
    }

    fn entity_matches(
        &self,
        e: &ResolvedEntity,
        ip: IpAddr,
        port: Option<u16>,
        protocol: Protocol,
    ) -> bool {
        if !e.nets.is_empty() && !e.nets.iter().any(|n| n.contains(&ip)) {
            return false;
        }
        if e.not_nets.iter().any(|n| n.contains(&ip)) {
            return false;
        }
        if let Some(sel) = &e.selector {
            if !self.selector_has_ip(sel, ip) {
                return false;
            }
        }
        if let Some(sel) = &e.not_selector {
            if self.selector_has_ip(sel, ip) {
                return false;
            }
        }
        if !e.ports.is_empty() {
            let Some(port) = port else { return false };
            if !e
                .ports
                .iter()
                .any(|p| self.port_matches(p, e, ip, port, protocol))
            {
                return false;
            }
        }
        if let Some(port) = port {
            if e.not_ports
                .iter()
                .any(|p| self.port_matches(p, e, ip, port, protocol))
            {
                return false;
            }
        }
        true
    }

    fn port_matches(
        &self,
        p: &Port,
        e: &ResolvedEntity,
        ip: IpAddr,
        port: u16,
        protocol: Protocol,
    ) -> bool {
        match p {
            Port::Range { min, max } => (*min..=*max).contains(&port),
            // Felix's named-port IP set: (address, protocol, port) of every
            // endpoint the entity's selector matches (all endpoints if it
            // has none) that declares a port with this name and protocol.
            Port::Named(name) => self.nets.iter().any(|n| {
                let Some(ep) = n.endpoint else { return false };
                e.selector.as_ref().is_none_or(|s| n.selected_by(s))
                    && n.nets.iter().any(|net| net.contains(&ip))
                    && ep.ports.iter().any(|ep_port| {
                        &ep_port.name == name
                            && ep_port.protocol.number() == protocol.number()
                            && ep_port.port == port
                    })
            }),
        }
    }

    /// Whether `ip` is in the IP set of `sel`.
    pub fn selector_has_ip(&self, sel: &crate::selector::Selector, ip: IpAddr) -> bool {
        self.nets
            .iter()
            .any(|n| n.nets.iter().any(|net| net.contains(&ip)) && n.selected_by(sel))
    }
}

fn icmp_matches(icmp: &IcmpFields, p: &Packet) -> bool {
    let Some((t, c)) = p.icmp else { return false };
    icmp.icmp_type.is_none_or(|x| x == t) && icmp.code.is_none_or(|x| x == c)
}
