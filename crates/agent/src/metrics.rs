//! Prometheus metrics, with felix's names where the meaning is the same.

use std::time::Duration;

use compiler::LogicalRuleset;
use prometheus::{Encoder, Histogram, HistogramOpts, IntCounter, IntGauge, Registry, TextEncoder};

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
    /// the transaction carrying it.
    pub programming_latency: Histogram,
    /// Objects skipped because they could not be decoded or compiled.
    pub rejected_objects: IntCounter,
    /// Resyncs that found the kernel changed behind our back.
    pub resyncs_repaired: IntCounter,
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
                "From receiving a datastore change to the kernel's acknowledgement of the transaction that carries it.",
            )?,
            rejected_objects: IntCounter::new(
                "nftpolicy_rejected_objects_total",
                "Objects skipped because they could not be decoded or compiled.",
            )?,
            resyncs_repaired: IntCounter::new(
                "nftpolicy_resync_repairs_total",
                "Periodic resyncs that found and repaired drift.",
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
        r.register(Box::new(m.rejected_objects.clone()))?;
        r.register(Box::new(m.resyncs_repaired.clone()))?;
        Ok(m)
    }

    pub fn observe_apply(&self, logical: &LogicalRuleset, elapsed: Duration) {
        self.apply_time.observe(elapsed.as_secs_f64());
        self.active_local_endpoints
            .set(logical.endpoints.len() as i64);
        self.active_local_policies
            .set(logical.active_policies.len() as i64);
        self.rejected_objects.inc_by(logical.rejected.len() as u64);
    }

    pub fn record_iptables(
        &self,
        before: &programmer::iptables::Stats,
        after: &programmer::iptables::Stats,
    ) {
        let d = |a: u64, b: u64| b.saturating_sub(a);
        self.iptables_restore_calls.inc_by(d(
            before.iptables_restore_calls,
            after.iptables_restore_calls,
        ));
        self.iptables_restore_errors.inc_by(d(
            before.iptables_restore_errors,
            after.iptables_restore_errors,
        ));
        self.iptables_save_calls
            .inc_by(d(before.iptables_save_calls, after.iptables_save_calls));
        self.ipset_calls
            .inc_by(d(before.ipset_calls, after.ipset_calls));
        self.ipset_errors
            .inc_by(d(before.ipset_errors, after.ipset_errors));
    }

    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}
