//! Tampering with our tables is repaired: an `nftpolicy run` agent
//! (nftables backend, file datastore, inside a lab node) enforces a policy;
//! then someone runs `nft` in the node's namespace and deletes our table,
//! flushes one of our chains, adds a rule of their own to one, or removes
//! a set element. Each time the kernel must come back to exactly what the
//! compiler gives for the datastore (read-back equal) and the probes must
//! see the policy again (the intruder denied, the client allowed).
//!
//! With `--resync-interval 3600` only the agent's nf_tables notification
//! watch (`--watch-kernel`, on by default) can repair in the test's time;
//! with `--watch-kernel=false --resync-interval 2`, the periodic resync
//! does. Every wait is for a condition, bounded by a generous timeout.

use std::process::Command;
use std::time::Duration;

use compiler::nft::{SetElement, SetKey, Table, TABLE_NAME};
use lab::{nftpolicy_binary, write_state, Agents, Lab};
use model::scenario::ResolvedProbe;

mod common;
use common::{assert_probes, desired, shop, wait_kernel, Tables};

const POLICY_CHAIN: &str = "cali-pi-shop.web-from-client";
/// Bound on every wait (agent start-up in a debug build, repairs).
const TIMEOUT: Duration = Duration::from_secs(30);

/// Runs `nft ARGS…` in the node's namespace, as an admin would.
fn nft(node_ns: &str, args: &[&str]) {
    let out = Command::new("ip")
        .args(["netns", "exec", node_ns, "nft"])
        .args(args)
        .output()
        .expect("running nft");
    assert!(
        out.status.success(),
        "nft {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A node with web, client and intruder, its agent started with
/// `extra_args` and in force.
struct Setup {
    lab: Lab,
    node_ns: String,
    want: Tables,
    probes: Vec<ResolvedProbe>,
    _agents: Agents,
}

fn setup(extra_args: &[&str]) -> Setup {
    let (state, probes) = shop();
    let mut lab = Lab::build(&state.pods(), &[], &["node1"]).unwrap();
    lab.set_probe_timeout(Duration::from_millis(1000));
    let node_ns = lab.node_namespace("node1").unwrap().to_owned();
    let datastore = lab.workdir().join("datastore");
    write_state(&datastore, &state).unwrap();
    let want = desired(&datastore);
    let extra: Vec<String> = extra_args.iter().map(|s| (*s).to_owned()).collect();
    let mut agents =
        Agents::start_file(&lab, &datastore, &nftpolicy_binary(), "nftables", &extra).unwrap();
    agents.wait_applied(1, TIMEOUT).unwrap();
    wait_kernel(&node_ns, &want, "first programming", TIMEOUT);
    assert_probes(&mut lab, &probes, "before tampering");
    Setup {
        lab,
        node_ns,
        want,
        probes,
        _agents: agents,
    }
}

fn ip_table(t: &Tables) -> &Table {
    t.0.as_ref().expect("an ip table")
}

/// The to-workload chain of web: the one that jumps to the policy chain.
fn web_tw_chain(t: &Tables) -> String {
    ip_table(t)
        .chains
        .values()
        .find(|c| c.name.starts_with("cali-tw-") && format!("{c:?}").contains(POLICY_CHAIN))
        .map(|c| c.name.clone())
        .expect("web's cali-tw chain")
}

/// An address set the policy chain matches on (the client's selector),
/// and one of its elements in nft syntax.
fn policy_set_element(t: &Tables) -> (String, String) {
    let table = ip_table(t);
    let policy = format!("{:?}", table.chains[POLICY_CHAIN]);
    table
        .sets
        .values()
        .filter(|s| {
            matches!(s.key, SetKey::Addr | SetKey::Host)
                && policy.contains(&format!("{:?}", s.name))
        })
        .find_map(|s| {
            s.elements.iter().find_map(|e| match e {
                SetElement::Net(n) if n.prefix_len() == n.max_prefix_len() => {
                    Some((s.name.clone(), n.addr().to_string()))
                }
                SetElement::Net(n) => Some((s.name.clone(), n.to_string())),
                _ => None,
            })
        })
        .expect("an address set with elements used by the policy chain")
}

fn repaired(s: &mut Setup, what: &str) {
    let took = wait_kernel(&s.node_ns, &s.want, what, TIMEOUT);
    eprintln!("{what}: repaired after {took:?}");
    assert_probes(&mut s.lab, &s.probes, &format!("after {what}"));
}

#[test]
fn the_agent_repairs_tampering_as_soon_as_it_happens() {
    // Only the notification watch can repair within the timeout.
    let mut s = setup(&["--resync-interval", "3600"]);
    let tw = web_tw_chain(&s.want);
    let (set, element) = policy_set_element(&s.want);

    nft(&s.node_ns, &["delete", "table", "ip", TABLE_NAME]);
    repaired(&mut s, "our table deleted");

    nft(&s.node_ns, &["flush", "chain", "ip", TABLE_NAME, &tw]);
    repaired(&mut s, "web's to-workload chain flushed");

    nft(
        &s.node_ns,
        &["insert", "rule", "ip", TABLE_NAME, &tw, "accept"],
    );
    repaired(&mut s, "a foreign accept rule inserted");

    nft(
        &s.node_ns,
        &[
            "delete", "element", "ip", TABLE_NAME, &set, "{", &element, "}",
        ],
    );
    repaired(&mut s, "a set element removed");

    // It was the watch that repaired (the periodic resync is an hour away).
    let log = std::fs::read_to_string(s.lab.workdir().join("agent-node1.log")).unwrap();
    assert!(
        log.contains("changed by someone else"),
        "the agent's log does not mention the foreign changes:\n{log}"
    );
}

#[test]
fn without_the_watch_the_periodic_resync_repairs() {
    let mut s = setup(&["--watch-kernel=false", "--resync-interval", "2"]);
    let tw = web_tw_chain(&s.want);
    nft(
        &s.node_ns,
        &["insert", "rule", "ip", TABLE_NAME, &tw, "accept"],
    );
    repaired(&mut s, "a foreign accept rule inserted (periodic resync)");
    nft(&s.node_ns, &["delete", "table", "ip", TABLE_NAME]);
    repaired(&mut s, "our table deleted (periodic resync)");
}
