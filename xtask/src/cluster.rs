//! What `cargo xtask latency` and `cargo xtask soak` share: the synthetic
//! cluster they write into etcd with `nftpolicy apply`
//! (`testkit::cluster`), and reading the agent's Prometheus metrics.

use std::collections::BTreeMap;

use anyhow::{bail, Context};

pub use testkit::cluster::{cluster_yaml, initial_role, pod_yaml, NODE};

/// The agent's histogram of datastore change → kernel acknowledgement.
pub const LATENCY_METRIC: &str = "nftpolicy_programming_latency_seconds";

/// A Prometheus histogram: cumulative bucket counts by upper bound.
#[derive(Debug, Default)]
pub struct Histogram {
    buckets: BTreeMap<u64, (f64, u64)>,
    pub sum: f64,
    pub count: u64,
}

/// Reads the histogram `metric` from Prometheus text.
pub fn histogram(text: &str, metric: &str) -> anyhow::Result<Histogram> {
    let mut h = Histogram::default();
    for line in text.lines() {
        let Some((name, value)) = line.rsplit_once(' ') else {
            continue;
        };
        if let Some(rest) = name.strip_prefix(&format!("{metric}_bucket{{le=\"")) {
            let le = rest.trim_end_matches("\"}");
            let bound: f64 = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().with_context(|| format!("bucket bound {le:?}"))?
            };
            // Keyed by the bound's bits: positive floats sort as their bits.
            h.buckets.insert(bound.to_bits(), (bound, value.parse()?));
        } else if name == format!("{metric}_sum") {
            h.sum = value.parse()?;
        } else if name == format!("{metric}_count") {
            h.count = value.parse()?;
        }
    }
    if h.buckets.is_empty() {
        bail!("no {metric} in the agent's metrics");
    }
    Ok(h)
}

/// The value of the unlabelled counter or gauge `metric` in Prometheus
/// text, if it is there.
pub fn scalar(text: &str, metric: &str) -> Option<f64> {
    text.lines()
        .filter_map(|l| l.split_once(' '))
        .find(|(name, _)| *name == metric)
        .and_then(|(_, v)| v.trim().parse().ok())
}

impl Histogram {
    pub fn minus(&self, earlier: &Histogram) -> Histogram {
        Histogram {
            buckets: self
                .buckets
                .iter()
                .map(|(k, (b, c))| {
                    let e = earlier.buckets.get(k).map_or(0, |(_, c)| *c);
                    (*k, (*b, c - e))
                })
                .collect(),
            sum: self.sum - earlier.sum,
            count: self.count - earlier.count,
        }
    }

    /// The q-quantile, interpolating linearly inside its bucket (as
    /// Prometheus' histogram_quantile does).
    pub fn quantile(&self, q: f64) -> f64 {
        let rank = q * self.count as f64;
        let mut lower = 0.0;
        let mut below = 0u64;
        for (bound, cumulative) in self.buckets.values() {
            if *cumulative as f64 >= rank {
                if bound.is_infinite() {
                    return lower;
                }
                let inside = (*cumulative - below) as f64;
                let frac = if inside > 0.0 {
                    (rank - below as f64) / inside
                } else {
                    1.0
                };
                return lower + (bound - lower) * frac;
            }
            lower = *bound;
            below = *cumulative;
        }
        lower
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const METRIC: &str = LATENCY_METRIC;

    #[test]
    fn quantiles_from_buckets() {
        let text = format!(
            "{METRIC}_bucket{{le=\"0.01\"}} 0\n{METRIC}_bucket{{le=\"0.1\"}} 10\n\
             {METRIC}_bucket{{le=\"1\"}} 20\n{METRIC}_bucket{{le=\"+Inf\"}} 20\n\
             {METRIC}_sum 3\n{METRIC}_count 20\n"
        );
        let h = histogram(&text, METRIC).unwrap();
        assert!((h.quantile(0.5) - 0.1).abs() < 1e-9);
        assert!((h.quantile(0.25) - 0.055).abs() < 1e-9);
        assert!((h.quantile(0.99) - 0.982).abs() < 1e-9);
    }

    #[test]
    fn counters_by_exact_name() {
        let text = "# HELP felix_nft_errors x\nfelix_nft_errors 3\nfelix_nft_errors_total 9\n";
        assert_eq!(scalar(text, "felix_nft_errors"), Some(3.0));
        assert_eq!(scalar(text, "felix_ipset_errors"), None);
    }
}
