//! The "deny all" case (tests/scenarios/web-deny-all.yaml), read back from the kernel: with
//! `default/web-deny-all` in force, every connection client→web is dropped
//! at the policy's chain, and the counter of that chain's rule, read over
//! netlink inside web's node, counted each dropped SYN. Under a narrower
//! `--mark-mask` (0xff000000) the same denial holds and web's `cali-tw-…`
//! chain tests the pass bit that mask yields (0x02000000) before jumping to
//! the policy.

use std::path::Path;
use std::time::Duration;

use compiler::nft::{Match, TableFamily, Verdict, TABLE_NAME};
use lab::agents::in_namespace;
use lab::{nftpolicy_binary, write_state, Lab};
use model::scenario::{PodInfo, Scenario, StepState, NODES};
use programmer::NftProgrammer;

mod common;
use common::{assert_probes, resolve};

const POLICY_CHAIN: &str = "cali-pi-default.web-deny-all";
/// Denied connections sent while the counter is watched.
const DENIED_SYNS: u64 = 5;

fn deny_all_scenario() -> Scenario {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios/web-deny-all.yaml");
    Scenario::load(&path).unwrap_or_else(|e| {
        panic!(
            "this test runs the project's deny-all scenario ({}): {e}",
            path.display()
        )
    })
}

/// The lab with the scenario's first two steps programmed (nftables, file
/// datastore, `extra_args` for `nftpolicy sync`), each step's probes
/// checked. Returns the lab, the policy step's state and web's pod.
fn lab_with_policy(scenario: &Scenario, extra_args: &[String]) -> (Lab, StepState, PodInfo) {
    let states = scenario.states().unwrap();
    let mut lab = Lab::build(&states[0].pods(), &[], &NODES).unwrap();
    let nftpolicy = nftpolicy_binary();
    for (i, state) in states.iter().enumerate().take(2) {
        lab.sync_pods(&state.pods()).unwrap();
        let dir = lab.workdir().join(format!("step-{}", i + 1));
        write_state(&dir, state).unwrap();
        lab.program_nodes_with(
            &dir,
            &nftpolicy,
            "nftables",
            extra_args,
            Duration::from_secs(30),
        )
        .unwrap();
        let probes = resolve(state, &scenario.steps[i].probes);
        assert_probes(&mut lab, &probes, &format!("step {} {extra_args:?}", i + 1));
    }
    let state = states[1].clone();
    let web = state
        .pods()
        .into_iter()
        .find(|p| p.name == "web")
        .expect("the scenario has a web pod");
    (lab, state, web)
}

/// Packets counted by the policy chain's rule (its only one: "no rule
/// matched"), read over netlink inside `node_ns`.
fn policy_chain_packets(node_ns: &str) -> u64 {
    let counters = in_namespace(node_ns, || {
        NftProgrammer::new()?.read_counters(
            TableFamily::Ip,
            compiler::nft::TABLE_NAME,
            POLICY_CHAIN,
        )
    })
    .unwrap()
    .unwrap();
    assert_eq!(
        counters.len(),
        1,
        "{POLICY_CHAIN} holds one rule: {counters:?}"
    );
    counters[0].packets
}

/// Sends `DENIED_SYNS` connections client→web:80 (each must be denied) and
/// returns how much the policy chain's counter grew.
fn count_denied(lab: &mut Lab, state: &StepState, scenario: &Scenario, node_ns: &str) -> u64 {
    let denied = resolve(state, &scenario.steps[1].probes)
        .into_iter()
        .find(|p| !p.probe.expect_allow && p.probe.protocol == model::calico::Protocol::Tcp)
        .expect("the scenario's policy step has a denied TCP probe");
    let before = policy_chain_packets(node_ns);
    let probes = vec![denied; DENIED_SYNS as usize];
    assert_probes(lab, &probes, "counted probes");
    let counted = policy_chain_packets(node_ns) - before;
    eprintln!("{POLICY_CHAIN}: {counted} packets counted for {DENIED_SYNS} denied connections");
    counted
}

#[test]
fn deny_all_counter_counts_dropped_syns() {
    let scenario = deny_all_scenario();
    let (mut lab, state, web) = lab_with_policy(&scenario, &[]);
    let node_ns = lab.node_namespace(&web.node).unwrap().to_owned();
    let counted = count_denied(&mut lab, &state, &scenario, &node_ns);
    // Each probe's SYN, plus any retransmits within the probe timeout.
    assert!(
        counted >= DENIED_SYNS,
        "{POLICY_CHAIN} counted {counted} packets for {DENIED_SYNS} denied connections"
    );
}

#[test]
fn deny_all_under_a_narrow_mark_mask_tests_the_pass_bit() {
    let scenario = deny_all_scenario();
    let mask = vec!["--mark-mask".to_owned(), "0xff000000".to_owned()];
    let (mut lab, state, web) = lab_with_policy(&scenario, &mask);
    let node_ns = lab.node_namespace(&web.node).unwrap().to_owned();

    let table = in_namespace(&node_ns, || {
        NftProgrammer::new()?.read_back(TableFamily::Ip, TABLE_NAME)
    })
    .unwrap()
    .unwrap()
    .expect("the node has our ip table");
    let tw_name = format!("cali-tw-{}", web.interface);
    let tw = table
        .chains
        .get(&tw_name)
        .unwrap_or_else(|| panic!("no chain {tw_name}; chains: {:?}", table.chains.keys()));
    let jump = tw
        .rules
        .iter()
        .find(|r| r.verdict == Some(Verdict::Jump(POLICY_CHAIN.to_owned())))
        .unwrap_or_else(|| panic!("{tw_name} does not jump to {POLICY_CHAIN}: {:#?}", tw.rules));
    // Accept is the lowest bit of the mask (0x01000000), pass the next one:
    // the jump is taken while both are clear.
    assert!(
        jump.matches.contains(&Match::Mark {
            mask: 0x0300_0000,
            value: 0,
            negate: false
        }),
        "the jump to {POLICY_CHAIN} must test that the pass bit 0x02000000 (and the accept \
         bit 0x01000000) is clear: {jump:#?}"
    );

    let counted = count_denied(&mut lab, &state, &scenario, &node_ns);
    assert!(
        counted >= DENIED_SYNS,
        "{POLICY_CHAIN} counted {counted} packets for {DENIED_SYNS} denied connections"
    );
}
