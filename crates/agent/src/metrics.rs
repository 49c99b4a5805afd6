//! Prometheus metrics, with felix's names where the meaning is the same.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;
use std::time::Duration;

use compiler::LogicalRuleset;
use model::calico::ResourceKey;
use prometheus::{Encoder, Histogram, HistogramOpts, IntCounter, IntGauge, Registry, TextEncoder};
use tracing::{info, warn};
use watcher::Update;

pub struct Metrics {
    registry: Registry,
    /// felix_int_dataplane_apply_time_seconds: compile + program time.
    pub apply_time: Histogram,
    /// felix_resync_state: 1 in sync with the datastore, 0 not.
    pub resync_state: IntGauge,
    pub active_local_endpoints: IntGauge,
    pub active_local_policies: IntGauge,
    pub nft_calls: IntCounter,
    pub nft_errors: IntCounter,
    pub iptables_restore_calls: IntCounter,
    pub iptables_restore_errors: IntCounter,
    pub iptables_save_calls: IntCounter,
    pub ipset_calls: IntCounter,
    pub ipset_errors: IntCounter,
    /// From receiving a datastore change to the kernel's acknowledgement of
    /// the transaction carrying it (not the objects of the first list,
    /// which are folded as they arrive and programmed whole).
    pub programming_latency: Histogram,
    /// Objects rejected now: not decodable (skipped), or enforced as a drop
    /// of what they cover until fixed (`nftpolicy_rejected_objects`), each
    /// logged once when it became so.
    pub rejected: RejectedObjects,
    /// Resyncs that found the kernel changed behind our back.
    pub resyncs_repaired: IntCounter,
    /// Tables per family the nftables ruleset is cut into (`--table-groups`,
    /// what `auto` chose); 0 for iptables and before the first apply.
    pub table_groups: IntGauge,
}

impl Metrics {
    pub fn new() -> prometheus::Result<Metrics> {
        let registry = Registry::new();
        let buckets = vec![
            0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
        ];
        let histogram = |name: &str, help: &str| {
            Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets.clone()))
        };
        let m = Metrics {
            apply_time: histogram(
                "felix_int_dataplane_apply_time_seconds",
                "Time to compile and program the dataplane.",
            )?,
            resync_state: IntGauge::new(
                "felix_resync_state",
                "1 when in sync with the datastore, 0 otherwise.",
            )?,
            active_local_endpoints: IntGauge::new(
                "felix_active_local_endpoints",
                "Workload endpoints on this node.",
            )?,
            active_local_policies: IntGauge::new(
                "felix_active_local_policies",
                "Policies that apply to endpoints on this node.",
            )?,
            nft_calls: IntCounter::new("felix_nft_calls", "nftables transactions sent.")?,
            nft_errors: IntCounter::new("felix_nft_errors", "nftables transactions that failed.")?,
            iptables_restore_calls: IntCounter::new(
                "felix_iptables_restore_calls",
                "iptables-restore invocations.",
            )?,
            iptables_restore_errors: IntCounter::new(
                "felix_iptables_restore_errors",
                "iptables-restore invocations that failed.",
            )?,
            iptables_save_calls: IntCounter::new(
                "felix_iptables_save_calls",
                "iptables-save invocations.",
            )?,
            ipset_calls: IntCounter::new("felix_ipset_calls", "ipset invocations.")?,
            ipset_errors: IntCounter::new("felix_ipset_errors", "ipset invocations that failed.")?,
            programming_latency: histogram(
                "nftpolicy_programming_latency_seconds",
                "From receiving a datastore change to the kernel's acknowledgement of the transaction that carries it (the first list's objects are not samples).",
            )?,
            rejected: RejectedObjects::new(IntGauge::new(
                "nftpolicy_rejected_objects",
                "Objects currently rejected: not decodable (skipped), or unsupported and enforced as a drop of the endpoints they cover (named in the log when they became so).",
            )?),
            resyncs_repaired: IntCounter::new(
                "nftpolicy_resync_repairs_total",
                "Periodic resyncs that found and repaired drift.",
            )?,
            table_groups: IntGauge::new(
                "nftpolicy_table_groups",
                "Tables per address family the nftables ruleset is cut into (--table-groups; what auto chose). 0 for the iptables backend and before the first apply.",
            )?,
            registry,
        };
        let r = &m.registry;
        r.register(Box::new(m.apply_time.clone()))?;
        r.register(Box::new(m.resync_state.clone()))?;
        r.register(Box::new(m.active_local_endpoints.clone()))?;
        r.register(Box::new(m.active_local_policies.clone()))?;
        r.register(Box::new(m.nft_calls.clone()))?;
        r.register(Box::new(m.nft_errors.clone()))?;
        r.register(Box::new(m.iptables_restore_calls.clone()))?;
        r.register(Box::new(m.iptables_restore_errors.clone()))?;
        r.register(Box::new(m.iptables_save_calls.clone()))?;
        r.register(Box::new(m.ipset_calls.clone()))?;
        r.register(Box::new(m.ipset_errors.clone()))?;
        r.register(Box::new(m.programming_latency.clone()))?;
        r.register(Box::new(m.rejected.gauge.clone()))?;
        r.register(Box::new(m.resyncs_repaired.clone()))?;
        r.register(Box::new(m.table_groups.clone()))?;
        Ok(m)
    }

    pub fn observe_apply(&self, logical: &LogicalRuleset, elapsed: Duration) {
        self.apply_time.observe(elapsed.as_secs_f64());
        self.active_local_endpoints
            .set(logical.endpoints.len() as i64);
        self.active_local_policies
            .set(logical.active_policies.len() as i64);
        self.rejected.compiled(&logical.rejected);
    }

    /// Counts the dataplane work done between two snapshots of its totals.
    pub fn record(&self, before: &dataplane::Stats, after: &dataplane::Stats) {
        let d = |a: u64, b: u64| b.saturating_sub(a);
        let counters = [
            (
                &self.nft_calls,
                before.nft_transactions,
                after.nft_transactions,
            ),
            (&self.nft_errors, before.nft_errors, after.nft_errors),
            (
                &self.iptables_restore_calls,
                before.iptables_restore_calls,
                after.iptables_restore_calls,
            ),
            (
                &self.iptables_restore_errors,
                before.iptables_restore_errors,
                after.iptables_restore_errors,
            ),
            (
                &self.iptables_save_calls,
                before.iptables_save_calls,
                after.iptables_save_calls,
            ),
            (&self.ipset_calls, before.ipset_calls, after.ipset_calls),
            (&self.ipset_errors, before.ipset_errors, after.ipset_errors),
        ];
        for (counter, a, b) in counters {
            counter.inc_by(d(a, b));
        }
        self.table_groups
            .set(i64::try_from(after.table_groups).unwrap_or(i64::MAX));
    }

    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

/// The objects rejected right now, behind the `nftpolicy_rejected_objects`
/// gauge: datastore values that do not decode (tracked by their datastore
/// key from the update stream) plus the objects the latest apply enforced
/// as rejected (stubs that fail closed, see `model::reject`) or could not
/// compile. Each is logged once when it becomes rejected (or its reason
/// changes) and once when it stops being rejected, however many applies
/// happen in between.
pub struct RejectedObjects {
    gauge: IntGauge,
    state: Mutex<RejectedState>,
}

#[derive(Default)]
struct RejectedState {
    /// Undecodable datastore keys → reason.
    undecodable: BTreeMap<String, String>,
    /// Keys reported `Invalid` since the last `InSync`: both sources repeat
    /// every still-invalid key before each `InSync`, so at `InSync` these
    /// are all the undecodable keys (the others were fixed or removed in a
    /// way that did not name them, e.g. a whole manifest file deleted).
    reported_since_sync: BTreeSet<String>,
    /// Objects the latest apply could not compile → reason.
    uncompilable: BTreeMap<String, String>,
}

impl RejectedObjects {
    fn new(gauge: IntGauge) -> RejectedObjects {
        RejectedObjects {
            gauge,
            state: Mutex::new(RejectedState::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, RejectedState> {
        // The state stays consistent even if a holder panicked.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Follows one datastore update (call for every update, in order).
    pub fn update(&self, u: &Update) {
        let mut s = self.lock();
        match u {
            Update::Invalid { key, reason, .. } => {
                s.reported_since_sync.insert(key.clone());
                if s.undecodable.get(key) != Some(reason) {
                    warn!(object = %key, "rejected (not decodable, skipped): {reason}");
                    s.undecodable.insert(key.clone(), reason.clone());
                }
            }
            // A key that decodes again, or is gone (etcd keys are the
            // resource's key; file sources clear theirs at `InSync`).
            Update::Upsert { key, .. } | Update::Delete { key, .. } => {
                let etcd_key = key.etcd_key();
                s.reported_since_sync.remove(&etcd_key);
                if s.undecodable.remove(&etcd_key).is_some() {
                    info!(object = %etcd_key, "no longer rejected");
                }
            }
            Update::InSync { .. } => {
                let reported = std::mem::take(&mut s.reported_since_sync);
                s.undecodable.retain(|key, _| {
                    let still = reported.contains(key);
                    if !still {
                        info!(object = %key, "no longer rejected");
                    }
                    still
                });
            }
            Update::Disconnected { .. } => {}
        }
        self.gauge
            .set((s.undecodable.len() + s.uncompilable.len()) as i64);
    }

    /// Replaces the compile-time rejections with those of the latest apply.
    pub fn compiled(&self, rejected: &[(ResourceKey, String)]) {
        let mut s = self.lock();
        let now: BTreeMap<String, String> = rejected
            .iter()
            .map(|(key, why)| (key.to_string(), why.clone()))
            .collect();
        for (key, why) in &now {
            if s.uncompilable.get(key) != Some(why) {
                warn!(
                    object = %key,
                    "rejected (what it covers drops all traffic until it is fixed): {why}"
                );
            }
        }
        for key in s.uncompilable.keys() {
            if !now.contains_key(key) {
                info!(object = %key, "no longer rejected");
            }
        }
        s.uncompilable = now;
        self.gauge
            .set((s.undecodable.len() + s.uncompilable.len()) as i64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use model::calico::Kind;

    fn tracker() -> RejectedObjects {
        RejectedObjects::new(IntGauge::new("t", "t").unwrap())
    }

    fn invalid(key: &str) -> Update {
        Update::Invalid {
            key: key.into(),
            reason: "bad".into(),
            revision: 1,
        }
    }

    fn policy_key(name: &str) -> ResourceKey {
        ResourceKey::new(Kind::NetworkPolicy, Some("default"), name)
    }

    #[test]
    fn an_invalid_value_reported_again_at_every_sync_counts_once() {
        let t = tracker();
        for revision in 1..=5 {
            t.update(&invalid("manifests/bad.yaml"));
            t.update(&Update::InSync { revision });
            t.compiled(&[]);
            assert_eq!(t.gauge.get(), 1);
            assert_eq!(t.gauge.get(), 1);
        }
    }

    #[test]
    fn an_invalid_file_no_longer_reported_before_in_sync_is_cleared() {
        let t = tracker();
        t.update(&invalid("manifests/bad.yaml"));
        t.update(&invalid("manifests/worse.yaml"));
        t.update(&Update::InSync { revision: 1 });
        assert_eq!(t.gauge.get(), 2);
        t.update(&invalid("manifests/worse.yaml"));
        t.update(&Update::InSync { revision: 2 });
        assert_eq!(t.gauge.get(), 1);
        t.update(&Update::InSync { revision: 3 });
        assert_eq!(t.gauge.get(), 0);
    }

    #[test]
    fn an_etcd_key_that_decodes_again_or_is_deleted_is_cleared_at_once() {
        let t = tracker();
        let a = policy_key("a");
        let b = policy_key("b");
        t.update(&invalid(&a.etcd_key()));
        t.update(&invalid(&b.etcd_key()));
        t.update(&Update::InSync { revision: 1 });
        assert_eq!(t.gauge.get(), 2);
        // Watch events: no InSync follows them.
        t.update(&Update::Delete {
            key: b.clone(),
            revision: 2,
        });
        assert_eq!(t.gauge.get(), 1);
        let fixed = model::calico::Resource::from_json(
            "test",
            br#"{"apiVersion":"projectcalico.org/v3","kind":"NetworkPolicy","metadata":{"name":"a","namespace":"default"}}"#,
        )
        .unwrap();
        t.update(&Update::Upsert {
            key: a,
            resource: fixed,
            revision: 3,
        });
        assert_eq!(t.gauge.get(), 0);
    }

    #[test]
    fn compile_rejections_are_those_of_the_latest_apply_only() {
        let t = tracker();
        t.update(&invalid("manifests/bad.yaml"));
        t.update(&Update::InSync { revision: 1 });
        let rejected = vec![(policy_key("x"), "no".to_owned())];
        for _ in 0..3 {
            t.compiled(&rejected);
            assert_eq!(t.gauge.get(), 2);
        }
        t.compiled(&[]);
        assert_eq!(t.gauge.get(), 1);
    }
}
