//! The iptables backend against the real kernel, inside network namespaces
//! these tests create and remove: full first sync, incremental updates
//! (set members only; one chain only), adoption and drift repair, a failing
//! restore leaving the previous rules, and removal of everything of ours.

use std::collections::BTreeSet;
use std::process::Command;
use std::sync::atomic::Ordering;

use compiler::render_iptables::{chain_name, to_iptables, IpFamily, IptablesRulesets};
use compiler::{compile, CompileOptions};
use iptables::{parse_iptables_save, Backend, Error, IptablesProgrammer};
use model::convert::interface_name;
use testkit::cluster::{pod, state, web_deny_all, DEFAULT_NAMESPACE as NS};
use testkit::ipset_members;

// ---- fixtures -----------------------------------------------------------

/// A network namespace that exists while this value does (removed on drop,
/// also when the test panics), with the iptables tools run inside it.
struct Netns(testkit::netns::Netns);

impl Netns {
    fn new(tag: &str) -> Netns {
        Netns(
            testkit::netns::Netns::create(&format!("iptp-{tag}"))
                .expect("ip netns add (needs root)"),
        )
    }

    fn name(&self) -> &str {
        self.0.name()
    }

    fn programmer(&self, backend: Backend) -> IptablesProgrammer {
        IptablesProgrammer::new(backend).with_command_prefix(self.0.command_prefix())
    }

    /// Runs a command inside; panics when it fails.
    fn sh(&self, argv: &[&str], stdin: &str) -> String {
        self.0
            .exec_with_input(argv, stdin)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    fn save(&self, backend: Backend, f: IpFamily) -> String {
        let bin = format!(
            "{}-{backend}-save",
            if f == IpFamily::V4 {
                "iptables"
            } else {
                "ip6tables"
            }
        );
        self.sh(&[&bin, "-t", "filter"], "")
    }

    /// `save` without its timestamped `#` lines.
    fn rules(&self, backend: Backend, f: IpFamily) -> String {
        self.save(backend, f)
            .lines()
            .filter(|l| !l.starts_with('#'))
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn ipsets(&self) -> String {
        self.sh(&["ipset", "save"], "")
    }
}

/// A namespace whose kernel `backend` has been programmed with one client
/// allowed to web on port 80: the namespace, its programmer, the rulesets.
fn with_one_client(tag: &str, backend: Backend) -> (Netns, IptablesProgrammer, IptablesRulesets) {
    let ns = Netns::new(tag);
    let mut p = ns.programmer(backend);
    let want = rulesets(&allow_clients(1, "{port: 80}"));
    p.apply(&want).unwrap();
    (ns, p, want)
}

/// web (node1, dual stack) accepts clients on `ports`; clients live on node2.
fn allow_clients(clients: usize, ports: &str) -> String {
    let mut y = format!(
        "{NS}{}---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: web-from-clients, namespace: default}}\nspec:\n  podSelector: {{matchLabels: {{app: web}}}}\n  ingress:\n  - from: [{{podSelector: {{matchLabels: {{app: client}}}}}}]\n    ports: [{ports}]\n",
        pod(
            "default",
            "web",
            "node1",
            &["198.18.128.1", "fd00:198:18::1"],
            "app: web",
            "{name: http, containerPort: 80}"
        )
    );
    for i in 0..clients {
        y.push_str(&pod(
            "default",
            &format!("client-{i}"),
            "node2",
            &[
                &format!("198.18.129.{}", i + 1),
                &format!("fd00:198:18::2:{:x}", i + 1),
            ],
            "app: client",
            "{containerPort: 80}",
        ));
    }
    y
}

fn rulesets(yaml: &str) -> IptablesRulesets {
    to_iptables(&compile(&state(yaml), &CompileOptions::new("node1")).unwrap())
}

/// The kernel's chains (ours) with their rule hashes equal the desired ones,
/// FORWARD / INPUT start with our hook rules, and FORWARD ends with our
/// appended accept.
fn assert_kernel_holds(ns: &Netns, backend: Backend, want: &IptablesRulesets) {
    for rs in want.iter() {
        let saved = ns.save(backend, rs.family);
        let t = parse_iptables_save(&saved, "save").unwrap();
        let got: BTreeSet<&String> = t.chains.keys().collect();
        let wanted: BTreeSet<&String> = rs.chains.keys().collect();
        assert_eq!(got, wanted, "{} chains", rs.family);
        for name in rs.chains.keys() {
            assert_eq!(
                Some(&t.chains[name]),
                rs.chain_hashes(name).as_ref(),
                "{} {name}\n{saved}",
                rs.family
            );
        }
        for (builtin, hooks) in &rs.hooks {
            let rules = &t.others[builtin];
            let appended = rs.appended.get(builtin).map_or(&[][..], Vec::as_slice);
            let ours = rules.iter().filter(|r| r.hash.is_some()).count();
            assert_eq!(
                ours,
                hooks.len() + appended.len(),
                "{builtin}: no duplicates\n{saved}"
            );
            for (i, h) in hooks.iter().enumerate() {
                assert_eq!(
                    rules[i].hash.as_deref(),
                    compiler::render_iptables::rule_hash(h),
                    "{builtin} rule {i}\n{saved}"
                );
            }
            let tail = &rules[rules.len() - appended.len()..];
            for (r, h) in tail.iter().zip(appended) {
                assert_eq!(
                    r.hash.as_deref(),
                    compiler::render_iptables::rule_hash(h),
                    "{builtin}: appended last\n{saved}"
                );
            }
        }
    }
    let sets = ns.ipsets();
    for rs in want.iter() {
        for (name, spec) in &rs.ipsets {
            assert_eq!(ipset_members(&sets, name), spec.members, "{name}");
        }
    }
}

// ---- tests --------------------------------------------------------------

#[test]
fn first_sync_writes_everything_and_reads_back() {
    let ns = Netns::new("seed");
    let want = rulesets(&web_deny_all());
    let mut p = ns.programmer(Backend::Legacy);
    let r = p.apply(&want).unwrap();
    assert!(r.read_back, "the first apply reads the kernel");
    assert_eq!(r.iptables_restore_calls, 2, "{r:?}");
    assert_eq!(r.ipset_restore_calls, 0, "the seed needs no set");
    assert_eq!(
        r.chains_written.len(),
        want.v4.chains.len() + want.v6.chains.len()
    );
    assert_eq!(r.hooks_written.len(), 4, "FORWARD and INPUT, both families");
    assert_kernel_holds(&ns, Backend::Legacy, &want);
    let saved = ns.save(Backend::Legacy, IpFamily::V4);
    let tw = format!("cali-tw-{}", interface_name("default", "web"));
    assert!(
        saved.contains(&format!("-A {tw} -m comment --comment \"cali:"))
            && saved.contains("-j cali-pi-default.web-deny-all"),
        "{saved}"
    );
    assert!(
        saved.contains("-A FORWARD -m comment --comment \"cali:wUHhoiAYhphO9Mso\" -j cali-FORWARD")
    );

    // Same again: nothing to do, no command at all.
    let r = p.apply(&want).unwrap();
    assert!(r.is_noop() && !r.read_back, "{r:?}");
    assert_eq!(
        r.iptables_restore_calls + r.ipset_restore_calls + r.iptables_save_calls,
        0
    );

    // A new programmer (agent restart) adopts what is there: reads, writes nothing.
    let mut q = ns.programmer(Backend::Legacy);
    let r = q.apply(&want).unwrap();
    assert!(r.read_back && r.is_noop(), "{r:?}");
    assert_eq!(r.iptables_restore_calls + r.ipset_restore_calls, 0);
    let stats = p.stats();
    assert_eq!(stats.iptables_restore_calls, 2);
    assert_eq!(stats.iptables_restore_errors, 0);
    assert_eq!(stats.applies, 2);
}

#[test]
fn a_new_remote_pod_is_only_an_ipset_member_add() {
    let ns = Netns::new("pod");
    let mut p = ns.programmer(Backend::Legacy);
    let before = rulesets(&allow_clients(1, "{port: 80}"));
    let r = p.apply(&before).unwrap();
    assert_eq!(
        r.sets_created.len(),
        2,
        "one selector set per family: {r:?}"
    );
    assert_kernel_holds(&ns, Backend::Legacy, &before);

    let after = rulesets(&allow_clients(2, "{port: 80}"));
    let r = p.apply(&after).unwrap();
    assert_eq!(r.iptables_restore_calls, 0, "{r:?}");
    assert_eq!(r.ipset_restore_calls, 1);
    assert_eq!(r.members_added, 2, "the new pod's IPv4 and IPv6 address");
    assert_eq!(r.members_removed, 0);
    assert!(r.chains_written.is_empty() && r.sets_created.is_empty());
    assert_kernel_holds(&ns, Backend::Legacy, &after);
    assert!(ns.ipsets().contains(" 198.18.129.2\n"));

    // And the pod going away again: a member delete.
    let r = p.apply(&before).unwrap();
    assert_eq!((r.members_added, r.members_removed), (0, 2), "{r:?}");
    assert_eq!(r.iptables_restore_calls, 0);
    assert_kernel_holds(&ns, Backend::Legacy, &before);
}

#[test]
fn a_changed_policy_rewrites_only_its_chain() {
    let (ns, mut p, _) = with_one_client("pol", Backend::Legacy);
    let after = rulesets(&allow_clients(1, "{port: 80}, {port: 443}"));
    let r = p.apply(&after).unwrap();
    let chain = chain_name("cali-pi-default.web-from-clients");
    assert_eq!(chain.len(), 28, "hashed like felix: {chain}");
    assert_eq!(
        r.chains_written,
        vec![(IpFamily::V4, chain.clone()), (IpFamily::V6, chain.clone())],
        "{r:?}"
    );
    assert!(r.chains_deleted.is_empty() && r.hooks_written.is_empty());
    assert_eq!(r.ipset_restore_calls, 0);
    assert_kernel_holds(&ns, Backend::Legacy, &after);
    assert!(ns
        .save(Backend::Legacy, IpFamily::V4)
        .contains("--dports 80,443"));

    // Named ports: a new hash:ip,port set is created before the rules use it.
    let named = rulesets(&allow_clients(1, "{port: http}"));
    let r = p.apply(&named).unwrap();
    assert!(
        r.sets_created.iter().any(|s| s.starts_with("cali40n:")),
        "{r:?}"
    );
    assert_kernel_holds(&ns, Backend::Legacy, &named);

    // Back to the deny-all seed: policy chain and sets go, sets after rules.
    let seed = rulesets(&web_deny_all());
    let r = p.apply(&seed).unwrap();
    assert!(r.chains_deleted.contains(&(IpFamily::V4, chain)), "{r:?}");
    assert_eq!(r.sets_destroyed.len(), 4, "{r:?}");
    assert_eq!(r.ipset_restore_calls, 1, "only the destroy step");
    assert_kernel_holds(&ns, Backend::Legacy, &seed);
    assert!(!ns.ipsets().contains("cali"));
}

#[test]
fn many_chains_names_and_sets_apply_cleanly() {
    // Long policy name (hashed chain name), >15 ports, CIDR blocks.
    let ns = Netns::new("big");
    let ports: Vec<String> = (0..20)
        .map(|i| format!("{{port: {}}}", 2000 + 3 * i))
        .collect();
    let yaml = allow_clients(3, &ports.join(", ")).replace(
        "web-from-clients",
        "web-from-clients-with-a-name-far-too-long-for-iptables",
    ) + "---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: blocks, namespace: default}
spec:
  podSelector: {matchLabels: {app: web}}
  ingress:
  - from:
    - ipBlock: {cidr: 198.18.0.0/16, except: [198.18.1.0/24, 198.18.2.0/24]}
    - ipBlock: {cidr: 'fd00:198:18::/48', except: ['fd00:198:18:1::/64']}
";
    let want = rulesets(&yaml);
    let long = chain_name("cali-pi-default.web-from-clients-with-a-name-far-too-long-for-iptables");
    assert!(want.v4.chains.contains_key(&long));
    let mut p = ns.programmer(Backend::Legacy);
    p.apply(&want).unwrap();
    assert_kernel_holds(&ns, Backend::Legacy, &want);
}

#[test]
fn a_failing_restore_leaves_the_previous_rules() {
    let ns = Netns::new("fail");
    let mut p = ns.programmer(Backend::Legacy);
    let good = rulesets(&web_deny_all());
    p.apply(&good).unwrap();
    let before = ns.rules(Backend::Legacy, IpFamily::V4);

    let mut bad = good.clone();
    let tw = format!("cali-tw-{}", interface_name("default", "web"));
    bad.v4.chains.get_mut(&tw).unwrap().insert(
        0,
        "-m comment --comment \"cali:brokenbrokenbrok\" --jump cali-no-such-chain".into(),
    );
    // Also a changed chain before it in the same transaction.
    bad.v4.chains.get_mut("cali-wl-to-host").unwrap().pop();
    let err = p.apply(&bad).unwrap_err();
    match &err {
        Error::IptablesRestore {
            family,
            command,
            failed_line,
            stderr,
            ..
        } => {
            assert_eq!(*family, IpFamily::V4);
            assert!(
                command.contains("iptables-legacy-restore --noflush"),
                "{command}"
            );
            let (_, line) = failed_line.as_ref().expect("the failing line");
            assert!(line.contains("cali-no-such-chain"), "{line} / {stderr}");
        }
        other => panic!("{other}"),
    }
    let msg = err.to_string();
    assert!(
        msg.contains("cali-no-such-chain") && msg.contains("exit status"),
        "{msg}"
    );
    assert_eq!(
        ns.rules(Backend::Legacy, IpFamily::V4),
        before,
        "nothing changed"
    );
    assert_eq!(p.stats().iptables_restore_errors, 1);

    // The next apply reads the kernel back and finds it already right.
    let r = p.apply(&good).unwrap();
    assert!(r.read_back && r.is_noop(), "{r:?}");
}

#[test]
fn drift_is_found_and_repaired() {
    let (ns, mut p, want) = with_one_client("drift", Backend::Legacy);

    // Someone flushes one of our chains, deletes a hook rule, puts a rule
    // of theirs above ours, leaves a stale chain and set of ours, and
    // removes a member from a set.
    let tw = format!("cali-tw-{}", interface_name("default", "web"));
    let set = want.v4.ipsets.keys().next().unwrap().clone();
    let member = want.v4.ipsets[&set].members.iter().next().unwrap().clone();
    ns.sh(&["iptables-legacy", "-F", &tw], "");
    ns.sh(&["iptables-legacy", "-D", "INPUT", "1"], "");
    ns.sh(
        &[
            "iptables-legacy",
            "-I",
            "FORWARD",
            "1",
            "-s",
            "198.18.200.0/24",
            "-j",
            "ACCEPT",
        ],
        "",
    );
    ns.sh(&["iptables-legacy", "-N", "cali-stale"], "");
    ns.sh(&["ipset", "create", "cali40s:stale", "hash:net"], "");
    ns.sh(&["ipset", "del", &set, &member], "");

    let d = p.drift(&want).unwrap();
    assert!(d.read_back && d.iptables_save_calls == 2, "{d:?}");
    assert_eq!(d.iptables_restore_calls, 0, "drift() only looks");
    assert_eq!(d.chains_written, vec![(IpFamily::V4, tw.clone())], "{d:?}");
    assert_eq!(
        d.chains_deleted,
        vec![(IpFamily::V4, "cali-stale".to_owned())]
    );
    assert_eq!(
        d.hooks_written,
        vec![
            (IpFamily::V4, "FORWARD".to_owned()),
            (IpFamily::V4, "INPUT".to_owned())
        ]
    );
    assert_eq!(d.sets_destroyed, vec!["cali40s:stale".to_owned()]);
    assert_eq!(d.members_added, 1);

    let r = p.apply(&want).unwrap();
    assert!(!r.read_back, "drift() already read the kernel");
    assert_eq!(r.iptables_restore_calls, 1, "IPv6 was untouched: {r:?}");
    assert_kernel_holds(&ns, Backend::Legacy, &want);
    let saved = ns.save(Backend::Legacy, IpFamily::V4);
    let fwd: Vec<&str> = saved
        .lines()
        .filter(|l| l.starts_with("-A FORWARD"))
        .collect();
    assert_eq!(fwd.len(), 3, "{saved}");
    assert!(
        fwd[1].contains("198.18.200.0/24"),
        "theirs kept, between our jump and our appended accept: {saved}"
    );
    assert!(!saved.contains("cali-stale"));

    // Re-reading finds nothing more to do, and the hooks are not duplicated.
    p.invalidate();
    let r = p.apply(&want).unwrap();
    assert!(r.read_back && r.is_noop(), "{r:?}");
}

/// felix's placement: the jump to cali-FORWARD at the top, the accept of
/// what policy allowed at the end, so other software's FORWARD rules see
/// the packets policy accepted; kept at the end when others append later.
#[test]
fn forwards_accept_stays_below_other_software_rules() {
    let ns = Netns::new("append");
    let theirs = |net: &str| {
        ns.sh(
            &["iptables-legacy", "-A", "FORWARD", "-d", net, "-j", "DROP"],
            "",
        )
    };
    theirs("198.18.201.0/24");
    let mut p = ns.programmer(Backend::Legacy);
    let want = rulesets(&web_deny_all());
    p.apply(&want).unwrap();
    let forward = || -> Vec<String> {
        ns.save(Backend::Legacy, IpFamily::V4)
            .lines()
            .filter(|l| l.starts_with("-A FORWARD"))
            .map(str::to_owned)
            .collect()
    };
    let fwd = forward();
    assert_eq!(fwd.len(), 3, "{fwd:#?}");
    assert!(fwd[0].ends_with("-j cali-FORWARD"), "{fwd:#?}");
    assert!(fwd[1].contains("198.18.201.0/24"), "{fwd:#?}");
    assert!(
        fwd[2].contains("Policy explicitly accepted packet"),
        "{fwd:#?}"
    );

    // Another program appends after us: the next read-back moves our
    // accept to the end again (and changes nothing else).
    theirs("198.18.202.0/24");
    p.invalidate();
    let r = p.apply(&want).unwrap();
    assert_eq!(
        r.hooks_written,
        vec![(IpFamily::V4, "FORWARD".to_owned())],
        "{r:?}"
    );
    assert!(r.chains_written.is_empty(), "{r:?}");
    let fwd = forward();
    assert_eq!(fwd.len(), 4, "{fwd:#?}");
    assert!(fwd[2].contains("198.18.202.0/24"), "{fwd:#?}");
    assert!(
        fwd[3].contains("Policy explicitly accepted packet"),
        "{fwd:#?}"
    );
    assert_kernel_holds(&ns, Backend::Legacy, &want);
    p.invalidate();
    assert!(p.apply(&want).unwrap().is_noop());
}

#[test]
fn a_set_whose_size_changed_is_swapped_in() {
    let ns = Netns::new("swap");
    let want = rulesets(&allow_clients(1, "{port: 80}"));
    let set = want.v4.ipsets.keys().next().unwrap().clone();
    ns.sh(
        &[
            "ipset", "create", &set, "hash:net", "family", "inet", "maxelem", "1024",
        ],
        "",
    );
    let mut p = ns.programmer(Backend::Legacy);
    let r = p.apply(&want).unwrap();
    assert_eq!(r.sets_replaced, vec![set.clone()], "{r:?}");
    assert!(ns.ipsets().contains(&format!(
        "create {set} hash:net family inet hashsize 1024 maxelem 1048576"
    )));
    assert!(!ns.ipsets().contains("cali4t"), "the temporary set is gone");
    assert_kernel_holds(&ns, Backend::Legacy, &want);
}

#[test]
fn remove_all_leaves_no_chain_rule_or_set_of_ours() {
    let ns = Netns::new("rm");
    // Someone else's rules stay.
    ns.sh(
        &[
            "iptables-legacy",
            "-A",
            "FORWARD",
            "-s",
            "198.18.200.0/24",
            "-j",
            "ACCEPT",
        ],
        "",
    );
    ns.sh(&["ipset", "create", "theirs", "hash:ip"], "");
    let mut p = ns.programmer(Backend::Legacy);
    let want = rulesets(&allow_clients(2, "{port: http}, {port: 443}"));
    p.apply(&want).unwrap();
    assert_kernel_holds(&ns, Backend::Legacy, &want);

    let r = p.remove_all().unwrap();
    assert!(
        !r.chains_deleted.is_empty() && !r.sets_destroyed.is_empty(),
        "{r:?}"
    );
    for f in IpFamily::ALL {
        let saved = ns.save(Backend::Legacy, f);
        assert!(!saved.contains("cali"), "{saved}");
        if f == IpFamily::V4 {
            assert!(saved.contains("-A FORWARD -s 198.18.200.0/24 -j ACCEPT"));
        }
    }
    let sets = ns.ipsets();
    assert!(!sets.contains("cali"), "{sets}");
    assert!(sets.contains("create theirs"));
    // Nothing left: a second remove_all does nothing.
    let r = p.remove_all().unwrap();
    assert!(r.is_noop() && r.iptables_restore_calls == 0, "{r:?}");
}

#[test]
fn the_nft_variant_programs_and_removes_the_same() {
    if Command::new("iptables-nft-restore")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("iptables-nft-restore not installed: skipped");
        return;
    }
    let (ns, mut p, a) = with_one_client("nft", Backend::Nft);
    assert_kernel_holds(&ns, Backend::Nft, &a);
    // Deleting a chain (the policy's) needs the second transaction.
    let b = rulesets(&web_deny_all());
    let r = p.apply(&b).unwrap();
    assert!(!r.chains_deleted.is_empty(), "{r:?}");
    assert_kernel_holds(&ns, Backend::Nft, &b);
    p.invalidate();
    assert!(p.apply(&b).unwrap().is_noop());
    p.remove_all().unwrap();
    for f in IpFamily::ALL {
        assert!(!ns.save(Backend::Nft, f).contains("cali"));
    }
}

#[test]
fn a_missing_tool_is_a_named_error() {
    let ns = Netns::new("tool");
    let mut tools = compiler_tools();
    tools.save_v4 = "iptables-no-such-save".into();
    let mut p = ns.programmer(Backend::Legacy).with_tools(tools);
    let err = p.apply(&rulesets(&web_deny_all())).unwrap_err();
    assert!(
        matches!(
            err,
            Error::IptablesSave {
                family: IpFamily::V4,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("iptables-no-such-save"), "{err}");
    assert_eq!(p.stats().iptables_save_errors, 1);
}

fn compiler_tools() -> iptables::Tools {
    iptables::Tools::for_backend(Backend::Legacy)
}

// ---- real packets ---------------------------------------------------------

/// Runs `f` on a thread inside the named network namespace.
fn in_netns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> T {
    testkit::netns::run_in_named(ns, f).unwrap()
}

/// A pod: its own namespace, a veth to the node named like Calico's
/// (`cali…` on the node, `eth0` inside), a host route and proxy ARP on the
/// node, an on-link route for the test range in the pod.
fn add_pod(node: &Netns, pod: &str, ip: &str) -> Netns {
    let ns = Netns::new("pod");
    let hif = interface_name("default", pod);
    let run = |argv: &[&str]| {
        let st = Command::new(argv[0]).args(&argv[1..]).status().unwrap();
        assert!(st.success(), "{argv:?}");
    };
    run(&[
        "ip",
        "link",
        "add",
        &hif,
        "netns",
        node.name(),
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "netns",
        ns.name(),
    ]);
    run(&["ip", "-n", ns.name(), "link", "set", "lo", "up"]);
    run(&["ip", "-n", ns.name(), "link", "set", "eth0", "up"]);
    run(&[
        "ip",
        "-n",
        ns.name(),
        "addr",
        "add",
        &format!("{ip}/32"),
        "dev",
        "eth0",
    ]);
    run(&[
        "ip",
        "-n",
        ns.name(),
        "route",
        "add",
        "198.18.0.0/15",
        "dev",
        "eth0",
    ]);
    run(&["ip", "-n", node.name(), "link", "set", &hif, "up"]);
    run(&[
        "ip",
        "-n",
        node.name(),
        "route",
        "add",
        &format!("{ip}/32"),
        "dev",
        &hif,
    ]);
    node.sh(
        &[
            "sysctl",
            "-qw",
            &format!("net.ipv4.conf.{hif}.proxy_arp=1"),
            &format!("net.ipv4.neigh.{hif}.proxy_delay=0"),
        ],
        "",
    );
    ns
}

#[test]
fn packets_follow_the_policy() {
    let node = Netns::new("node");
    node.sh(&["sysctl", "-qw", "net.ipv4.ip_forward=1"], "");
    node.sh(&["ip", "link", "set", "lo", "up"], "");
    let web = add_pod(&node, "web", "198.18.128.1");
    let client = add_pod(&node, "client", "198.18.128.2");
    let other = add_pod(&node, "other", "198.18.128.3");
    let pod = |name: &str, ip: &str, app: &str| {
        format!("---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: default, labels: {{app: {app}}}}}\nspec: {{nodeName: node1, containers: [{{name: c, ports: [{{name: http, containerPort: 80}}]}}]}}\nstatus: {{podIP: \"{ip}\"}}\n")
    };
    // web accepts clients on its named port `http` (80) and on 8081 (a
    // named and a numeric port: a match block); nothing else.
    let yaml = format!(
        "{NS}{}{}{}---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: web, namespace: default}}\nspec:\n  podSelector: {{matchLabels: {{app: web}}}}\n  ingress:\n  - from: [{{podSelector: {{matchLabels: {{app: client}}}}}}]\n    ports: [{{port: http}}, {{port: 8081}}]\n",
        pod("web", "198.18.128.1", "web"),
        pod("client", "198.18.128.2", "client"),
        pod("other", "198.18.128.3", "other"),
    );
    let mut p = node.programmer(Backend::Legacy);
    p.apply(&rulesets(&yaml)).unwrap();

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut servers = Vec::new();
    for port in [80u16, 81, 8081] {
        let (ns, stop) = (web.name().to_owned(), stop.clone());
        let (tx, rx) = std::sync::mpsc::channel();
        servers.push(std::thread::spawn(move || {
            in_netns(&ns, move || {
                let l = std::net::TcpListener::bind(("0.0.0.0", port)).unwrap();
                l.set_nonblocking(true).unwrap();
                tx.send(()).unwrap();
                while !stop.load(Ordering::Relaxed) {
                    if l.accept().is_err() {
                        std::thread::sleep(std::time::Duration::from_millis(5));
                    }
                }
            })
        }));
        rx.recv().unwrap();
    }
    let connects = |from: &Netns, port: u16, tries: u32| {
        let ns = from.name().to_owned();
        in_netns(&ns, move || {
            (0..tries).any(|_| {
                std::net::TcpStream::connect_timeout(
                    &([198, 18, 128, 1], port).into(),
                    std::time::Duration::from_millis(1500),
                )
                .is_ok()
            })
        })
    };
    // Allowed connections get a few tries (a slow first ARP must not fail
    // the test); denied ones fail whatever the timing.
    let results = [
        ("client", connects(&client, 80, 3), true),
        ("client", connects(&client, 8081, 3), true),
        ("client:81", connects(&client, 81, 1), false),
        ("other:80", connects(&other, 80, 1), false),
        ("other:8081", connects(&other, 8081, 1), false),
    ];
    stop.store(true, Ordering::Relaxed);
    for s in servers {
        s.join().unwrap();
    }
    for (what, got, want) in results {
        assert_eq!(got, want, "{what}");
    }
}

/// The table-size summary (`iptables::table_size`, what the agent's
/// `--iptables-check-ms` compares) changes when another program flushes
/// one of our chains or deletes one rule, and not while nothing changes
/// (packets counted by the rules do not change it).
#[test]
fn the_table_size_changes_when_others_change_our_chains() {
    use iptables::table_size::legacy_table_size;
    let (ns, _, rulesets) = with_one_client("size", Backend::Legacy);
    let size = |f| {
        testkit::netns::run_in(&ns.0.path(), move || {
            legacy_table_size(f, "filter").expect("getsockopt")
        })
        .unwrap()
        .expect("a filter table")
    };
    let (v4, v6) = (size(IpFamily::V4), size(IpFamily::V6));
    assert_eq!(size(IpFamily::V4), v4, "nothing changed");
    let chain = rulesets
        .v4
        .chains
        .keys()
        .find(|c| c.starts_with("cali-tw-"))
        .unwrap()
        .clone();
    ns.sh(&["iptables-legacy", "-t", "filter", "-F", &chain], "");
    let flushed = size(IpFamily::V4);
    assert!(
        flushed.entries < v4.entries && flushed.bytes < v4.bytes,
        "{v4:?} -> {flushed:?}"
    );
    assert_eq!(size(IpFamily::V6), v6, "the other family is its own table");
    let rule_chain = "cali-FORWARD";
    ns.sh(
        &["iptables-legacy", "-t", "filter", "-D", rule_chain, "1"],
        "",
    );
    assert!(size(IpFamily::V4).entries < flushed.entries);
}
