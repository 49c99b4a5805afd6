//! The per-packet sweep at smoke size, in the kernel: every variant's node
//! carries the probe and enforces (a port no policy allows is dropped, not
//! refused), and the floor filters nothing. Nothing here is timed.

use bench::sweep::{measure, Effort, SweepPoint, VARIANTS};

#[test]
fn every_variant_carries_the_probe_and_enforces() {
    let r = measure(
        SweepPoint {
            selecting: 3,
            rules_per_policy: 2,
        },
        &VARIANTS,
        Effort::SMOKE,
    )
    .expect("sweep point");
    assert_eq!(r.variants.len(), VARIANTS.len());
    for (v, variant) in r.variants.iter().zip(VARIANTS) {
        assert_eq!(v.variant, variant.name);
        assert_eq!(v.failures, 0, "{v:?}");
        assert_eq!(
            v.connections,
            Effort::SMOKE.rounds * Effort::SMOKE.batch,
            "{v:?}"
        );
        // The floor has no ruleset: the blocked port is refused, not dropped.
        assert_eq!(v.enforced, variant.backend != "none", "{v:?}");
    }
}
