//! What the agent programs next: the datastore updates waiting for the
//! programmer thread, and the two lanes they leave in.
//!
//! Why: a tier change re-resolves every policy of its tier and redoes the
//! endpoints using them (0.4–0.5 s for the `default` tier at 10,000
//! policies / 250,000 pods), and a network-set change that gives a pod
//! set its first CIDR compiles in full (seconds), while a pod, policy or
//! profile change is a patch of milliseconds. Everything that arrives during an
//! apply waits for it and then goes out as one batch — so a pod change
//! queued behind a tier change that had not started yet used to wait for
//! that whole compile too (two long applies in all). Now, when the waiting
//! batch holds both, the *fast lane* goes first: every update except the
//! slow ones and what depends on them, in arrival order, as one apply; the
//! rest follows as the next apply. A pod change thus waits at most for the
//! apply under way and its own.
//!
//! The rules the split keeps:
//! - updates to one object keep their order (an update of an object with
//!   an earlier update held back is held back too);
//! - an update that depends on a held-back one, before or after it in the
//!   batch, is held back with it (a policy on a tier that is being created
//!   or changed; a pod on a profile — never slow today, kept for when it
//!   is): so the intermediate
//!   ruleset is the cluster as it would be had the slow change arrived
//!   just after the others — what the Kubernetes datastore may show
//!   anyway, where tiers, policies and pods come from separate watches —
//!   and no policy meets a tier it does not know (which would reject it);
//! - a held-back update is overtaken by at most [`MAX_OVERTAKES`] fast
//!   lanes in a row (pod changes that arrive during one fast lane go in
//!   the next, and each is shorter than the last); then the next apply
//!   takes everything, so a stream of pod changes cannot starve a tier
//!   change;
//! - a file datastore is never split (only whole re-reads are programmed:
//!   the daemon's `whole_at_insync_only`), nor anything before the first
//!   apply (pods without their policies would be allowed
//!   what the policies deny).
//!
//! Which kinds are slow is a kind-level guess at what can take the
//! incremental compiler long (`compiler::incremental`: tiers, whose
//! policies all resolve again; network sets, whose CIDRs may flip a
//! selector set's type and compile in full): a held-back change that
//! turns out cheap costs one more small transaction, nothing else.
//! Preempting a full compile when pod changes arrive was the other design
//! considered; the compiler cannot abandon a compile half-way (it mutates
//! its state as it goes), and a held-back change costs nothing until it
//! starts, so splitting before the start is where the time is saved.

use std::collections::HashSet;
use std::time::Instant;

use model::calico::{Kind, Resource, ResourceKey};
use watcher::Update;

/// An update waiting for the programmer thread, with when the loop
/// received it (for the programming-latency metric; `None` for markers and
/// invalid values, which program nothing).
#[derive(Debug)]
pub struct Queued {
    pub update: Update,
    pub received: Option<Instant>,
}

/// What to program next: the updates to fold, when their changes were
/// received (with the kind of object changed), and the datastore revision up to which everything is then
/// programmed (`None`: the revision of the last update seen).
#[derive(Debug)]
pub struct Batch {
    pub updates: Vec<Update>,
    pub received: Vec<(Instant, Kind)>,
    pub revision: Option<i64>,
    /// Whether later updates were held back (a fast-lane apply).
    pub split: bool,
}

/// The updates not yet handed to the programmer thread, in arrival order.
#[derive(Debug, Default)]
pub struct Pending {
    queue: Vec<Queued>,
    /// The first `overtaken` updates in `queue` were held back already,
    /// `rounds` times in a row.
    overtaken: usize,
    rounds: u32,
}

/// How many fast lanes in a row may overtake a held-back update. Measured
/// (README, Performance): with one, pod changes that arrived during the
/// fast lane waited for the full compile after it too (p99 1.5 s where
/// one full apply took 0.8 s).
pub const MAX_OVERTAKES: u32 = 4;

/// Whether a change of this kind may compile in full (see the module
/// comment).
fn slow(kind: Kind) -> bool {
    matches!(kind, Kind::Tier | Kind::NetworkSet | Kind::GlobalNetworkSet)
}

/// The objects `r` depends on: its tier (a policy), its profiles (an
/// endpoint).
fn depends_on(r: &Resource) -> Vec<ResourceKey> {
    match r {
        Resource::NetworkPolicy(p) => vec![tier_key(p.spec.tier())],
        Resource::GlobalNetworkPolicy(p) => vec![tier_key(p.spec.tier())],
        Resource::WorkloadEndpoint(w) => w
            .spec
            .profiles
            .iter()
            .map(|p| ResourceKey::new(Kind::Profile, None, p))
            .collect(),
        _ => Vec::new(),
    }
}

fn tier_key(tier: &str) -> ResourceKey {
    ResourceKey::new(Kind::Tier, None, tier)
}

impl Pending {
    #[cfg(test)]
    pub fn push(&mut self, q: Queued) {
        self.queue.push(q);
    }

    pub fn append(&mut self, more: &mut Vec<Queued>) {
        self.queue.append(more);
    }

    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// Whether [`take`](Pending::take) with `lanes` would hold something
    /// back.
    pub fn would_split(&self, lanes: bool) -> bool {
        lanes && (self.overtaken == 0 || self.rounds < MAX_OVERTAKES) && self.partition().is_some()
    }

    /// Takes what to program next: with `lanes`, the fast lane when the
    /// queue holds slow changes and others (see the module comment); else
    /// everything.
    pub fn take(&mut self, lanes: bool) -> Batch {
        let held = if self.would_split(lanes) {
            self.partition()
        } else {
            None
        };
        let queue = std::mem::take(&mut self.queue);
        let Some(held) = held else {
            self.overtaken = 0;
            self.rounds = 0;
            return batch(queue, None, false);
        };
        let mut fast = Vec::new();
        for (i, q) in queue.into_iter().enumerate() {
            if held.contains(&i) {
                self.queue.push(q);
            } else {
                fast.push(q);
            }
        }
        self.rounds = if self.overtaken == 0 {
            1
        } else {
            self.rounds + 1
        };
        self.overtaken = self.queue.len();
        // Everything before the first held-back update is programmed.
        let revision = self
            .queue
            .iter()
            .filter_map(|q| q.update.revision())
            .min()
            .map(|r| r - 1);
        batch(fast, revision, true)
    }

    /// The positions of the updates to hold back, when there are some and
    /// something else to program first.
    fn partition(&self) -> Option<HashSet<usize>> {
        let mut held = HashSet::new();
        // The held-back objects so far, by etcd key (what `Invalid`
        // updates name them by).
        let mut held_keys: HashSet<String> = HashSet::new();
        // What a held-back update may be waited for by: every slow object
        // of the batch, wherever it comes (a policy created just before
        // its tier waits for it too), and the objects held back so far.
        let mut held_deps: HashSet<ResourceKey> = self
            .queue
            .iter()
            .filter_map(|q| match &q.update {
                Update::Upsert { key, .. } | Update::Delete { key, .. } if slow(key.kind) => {
                    Some(key.clone())
                }
                _ => None,
            })
            .collect();
        let mut fast = 0;
        for (i, q) in self.queue.iter().enumerate() {
            let keep_back = match &q.update {
                Update::Upsert { key, resource, .. } => {
                    slow(key.kind)
                        || held_keys.contains(&key.etcd_key())
                        || depends_on(resource).iter().any(|d| held_deps.contains(d))
                }
                Update::Delete { key, .. } => slow(key.kind) || held_keys.contains(&key.etcd_key()),
                Update::Invalid { key, .. } => held_keys.contains(key),
                // Markers stay behind whatever was held back before them.
                Update::InSync { .. } | Update::Disconnected { .. } => !held.is_empty(),
            };
            if keep_back {
                held.insert(i);
                if let Update::Upsert { key, .. } | Update::Delete { key, .. } = &q.update {
                    held_keys.insert(key.etcd_key());
                    held_deps.insert(key.clone());
                }
            } else if matches!(q.update, Update::Upsert { .. } | Update::Delete { .. }) {
                fast += 1;
            }
        }
        (!held.is_empty() && fast > 0).then_some(held)
    }
}

fn batch(queue: Vec<Queued>, revision: Option<i64>, split: bool) -> Batch {
    let mut updates = Vec::with_capacity(queue.len());
    let mut received = Vec::new();
    for q in queue {
        if let (Some(at), Update::Upsert { key, .. } | Update::Delete { key, .. }) =
            (q.received, &q.update)
        {
            received.push((at, key.kind));
        }
        updates.push(q.update);
    }
    Batch {
        updates,
        received,
        revision,
        split,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upsert(yaml: &str, revision: i64) -> Queued {
        let state = testkit::cluster::state(yaml);
        let resource = state.resources().next().expect("one resource").into_owned();
        Queued {
            update: Update::Upsert {
                key: resource.key(),
                resource,
                revision,
            },
            received: Some(Instant::now()),
        }
    }

    fn tier(name: &str, order: u32, revision: i64) -> Queued {
        upsert(
            &format!("apiVersion: projectcalico.org/v3\nkind: Tier\nmetadata: {{name: {name}}}\nspec: {{order: {order}}}\n"),
            revision,
        )
    }

    fn pod(name: &str, role: &str, revision: i64) -> Queued {
        upsert(
            &testkit::cluster::pod(
                "default",
                name,
                "node2",
                &["198.18.128.9"],
                &format!("role: {role}"),
                "",
            ),
            revision,
        )
    }

    fn policy(name: &str, tier: &str, revision: i64) -> Queued {
        let name = if tier == "default" {
            name.to_owned()
        } else {
            format!("{tier}.{name}")
        };
        upsert(
            &format!("apiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata: {{name: {name}}}\nspec: {{tier: {tier}, selector: all(), types: [Ingress]}}\n"),
            revision,
        )
    }

    fn names(updates: &[Update]) -> Vec<String> {
        updates
            .iter()
            .map(|u| match u {
                // A pod's endpoint by the pod's name.
                Update::Upsert { key, .. } | Update::Delete { key, .. } => key
                    .name
                    .strip_prefix("node2-k8s-")
                    .and_then(|n| n.strip_suffix("-eth0"))
                    .unwrap_or(&key.name)
                    .to_owned(),
                Update::InSync { .. } => "InSync".into(),
                Update::Invalid { key, .. } => format!("invalid {key}"),
                Update::Disconnected { .. } => "Disconnected".into(),
            })
            .collect()
    }

    fn pending(queue: Vec<Queued>) -> Pending {
        let mut p = Pending::default();
        for q in queue {
            p.push(q);
        }
        p
    }

    #[test]
    fn a_pod_change_behind_a_tier_change_goes_first_then_the_tier_change() {
        let mut p = pending(vec![
            tier("security", 100, 10),
            pod("a", "x", 11),
            pod("b", "x", 12),
        ]);
        let first = p.take(true);
        assert_eq!(names(&first.updates), ["a", "b"]);
        assert_eq!(first.received.len(), 2);
        assert!(first.split);
        // Everything up to just before the tier change is programmed.
        assert_eq!(first.revision, Some(9));
        // Pod changes arriving meanwhile overtake the tier change too, but
        // only so many times in a row.
        for i in 1..MAX_OVERTAKES {
            let name = format!("c{i}");
            p.push(pod(&name, "x", 12 + i64::from(i)));
            let next = p.take(true);
            assert_eq!(names(&next.updates), [name]);
            assert!(next.split);
        }
        p.push(pod("d", "x", 20));
        let last = p.take(true);
        assert_eq!(names(&last.updates), ["security", "d"]);
        assert!(!last.split && last.revision.is_none());
        assert!(p.is_empty());
        // And the count starts again.
        p.push(tier("soft", 200, 21));
        p.push(pod("e", "x", 22));
        assert!(p.would_split(true));
    }

    #[test]
    fn without_lanes_or_without_a_slow_change_everything_goes_together() {
        let queue = || {
            vec![
                tier("security", 100, 10),
                pod("a", "x", 11),
                policy("p", "default", 12),
            ]
        };
        let mut p = pending(queue());
        assert_eq!(names(&p.take(false).updates), ["security", "a", "p"]);
        let mut p = pending(vec![pod("a", "x", 11), policy("p", "default", 12)]);
        assert!(!p.would_split(true));
        assert_eq!(names(&p.take(true).updates), ["a", "p"]);
        // Only slow changes: nothing to put first.
        let mut p = pending(vec![tier("security", 100, 10), tier("soft", 200, 11)]);
        assert!(!p.would_split(true));
        assert_eq!(p.take(true).updates.len(), 2);
    }

    #[test]
    fn same_object_order_and_dependencies_are_kept() {
        let mut p = pending(vec![
            pod("a", "x", 9),
            // Depends on the held-back tier, which comes after it.
            policy("early", "security", 9),
            tier("security", 100, 10),
            // Depends on the held-back tier.
            policy("guard", "security", 11),
            // Its own tier is not held back.
            policy("p", "default", 12),
            Queued {
                update: Update::InSync { revision: 12 },
                received: None,
            },
            pod("b", "y", 13),
        ]);
        let first = p.take(true);
        assert_eq!(names(&first.updates), ["a", "p", "b"]);
        assert_eq!(first.revision, Some(8));
        assert_eq!(
            names(&p.take(true).updates),
            ["security.early", "security", "security.guard", "InSync"]
        );

        // A later update of a held-back object is held back too, even of a
        // kind that is not slow itself.
        let mut set = upsert(
            "apiVersion: projectcalico.org/v3\nkind: GlobalNetworkSet\nmetadata: {name: blocked}\nspec: {nets: [198.18.0.0/24]}\n",
            20,
        );
        let key = match &set.update {
            Update::Upsert { key, .. } => key.clone(),
            _ => unreachable!(),
        };
        set.received = None;
        let mut p = pending(vec![
            set,
            pod("a", "x", 21),
            Queued {
                update: Update::Invalid {
                    key: key.etcd_key(),
                    reason: "bad".into(),
                    revision: 22,
                },
                received: None,
            },
            Queued {
                update: Update::Delete { key, revision: 23 },
                received: Some(Instant::now()),
            },
        ]);
        let first = p.take(true);
        assert_eq!(names(&first.updates), ["a"]);
        let rest = p.take(true);
        assert_eq!(rest.updates.len(), 3);
        assert!(matches!(rest.updates[2], Update::Delete { .. }));
        assert_eq!(rest.received.len(), 1);
    }
}
