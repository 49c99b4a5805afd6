//! The iptables rendering (felix's iptables mode) of small clusters: golden
//! texts, the properties felix's format promises, and a kernel check that
//! every payload is accepted by `ipset restore` and
//! `iptables-legacy-restore` / `ip6tables-legacy-restore` inside a network
//! namespace this test creates and removes.

use std::collections::BTreeSet;

use ipnet::IpNet;

use compiler::render_iptables::{
    chain_name, render, render_ipset_restore, render_restore, rule_hash, to_iptables, IpFamily,
    IpSetSpec, IpSetType, IptablesRuleset, IptablesRulesets, MAX_CHAIN_NAME_LEN,
};
use compiler::{compile, CompileOptions};
use expect_test::expect_file;
use model::convert::interface_name;
use testkit::cluster::{pod, state, web_deny_all};
use testkit::ipset_members;

/// Exercises every iptables special case: >15 ports, several CIDRs with
/// excepts (v4 and v6), numeric + named ports, a policy name too long for a
/// chain name, many local interfaces (dispatch prefix tree), dual-stack pods,
/// Deny / Pass / Log actions, ICMP and notProtocol.
fn complex_cluster() -> String {
    let mut y = String::from(
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: default}\n---\napiVersion: v1\nkind: Namespace\nmetadata: {name: prod, labels: {team: a}}\n",
    );
    for i in 0..8 {
        y.push_str(&pod(
            "default",
            &format!("web-{i}"),
            "node1",
            &[
                &format!("198.18.128.{}", 10 + i),
                &format!("fd00:198:18::{:x}", 0x10 + i),
            ],
            "app: web",
            "{name: http, containerPort: 8080}",
        ));
    }
    y.push_str(&pod(
        "prod",
        "api",
        "node2",
        &["198.18.129.1", "fd00:198:18::1:1"],
        "app: api",
        "{name: http, containerPort: 9090}, {name: metrics, containerPort: 9100}",
    ));
    y.push_str(&pod(
        "prod",
        "db",
        "node1",
        &["198.18.129.2"],
        "app: db",
        "{containerPort: 5432}",
    ));
    let ports: Vec<String> = (1..=20)
        .map(|p| format!("{{port: {}}}", 1000 + 2 * p))
        .collect();
    y.push_str(&format!(
        "---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {{name: web-allow-many-ports-from-prod-and-the-office, namespace: default}}
spec:
  podSelector: {{matchLabels: {{app: web}}}}
  ingress:
  - from: [{{namespaceSelector: {{matchLabels: {{team: a}}}}}}]
    ports: [{}, {{port: 2000, endPort: 2100}}, {{port: http}}]
  - from:
    - ipBlock: {{cidr: 198.18.0.0/16, except: [198.18.1.0/24, 198.18.2.0/24]}}
    - ipBlock: {{cidr: 'fd00:198:18::/48', except: ['fd00:198:18:1::/64']}}
  egress:
  - to: [{{podSelector: {{matchLabels: {{app: api}}}}, namespaceSelector: {{}}}}]
    ports: [{{port: http}}, {{port: 443}}]
",
        ports.join(", ")
    ));
    y.push_str(
        "---
apiVersion: projectcalico.org/v3
kind: NetworkPolicy
metadata: {name: db-guard, namespace: prod}
spec:
  order: 10
  selector: app == 'db'
  types: [Ingress]
  ingress:
  - action: Log
    protocol: TCP
    source: {nets: [198.18.0.0/24, 198.18.4.0/24, 198.18.8.0/24], notNets: [198.18.0.128/25]}
    destination: {ports: [5432]}
  - action: Deny
    protocol: ICMP
    icmp: {type: 8, code: 0}
  - action: Pass
    notProtocol: UDP
    source: {selector: app == 'api', notNets: [198.18.129.0/30, 198.18.129.8/30]}
  - action: Allow
    protocol: TCP
    source: {nets: ['fd00:198:18::/64', 'fd00:198:18:5::/64']}
    destination: {notPorts: [22, 23]}
",
    );
    y
}

fn rulesets(yaml: &str, opts: &CompileOptions) -> IptablesRulesets {
    to_iptables(&compile(&state(yaml), opts).unwrap())
}

#[test]
fn seed_web_deny_all_golden() {
    let rs = rulesets(&web_deny_all(), &CompileOptions::new("node1"));
    expect_file!["golden/iptables-seed-web-deny-all.node1.txt"].assert_eq(&render(&rs));
}

#[test]
fn tiers_golden() {
    let rs = rulesets(&testkit::cluster::tiered(), &CompileOptions::new("node1"));
    expect_file!["golden/iptables-tiers.node1.txt"].assert_eq(&render(&rs));
}

#[test]
fn complex_cluster_golden() {
    let rs = rulesets(&complex_cluster(), &CompileOptions::new("node1"));
    expect_file!["golden/iptables-complex.node1.txt"].assert_eq(&render(&rs));
}

/// `--jump X` / `--goto X` targets in a rule.
fn targets(rule: &str) -> Vec<&str> {
    let words: Vec<&str> = rule.split_whitespace().collect();
    words
        .windows(2)
        .filter(|w| w[0] == "--jump" || w[0] == "--goto")
        .map(|w| w[1])
        .collect()
}

fn match_sets(rule: &str) -> Vec<&str> {
    let words: Vec<&str> = rule.split_whitespace().collect();
    words
        .windows(2)
        .filter(|w| w[0] == "--match-set")
        .map(|w| w[1])
        .collect()
}

fn check_well_formed(rs: &IptablesRuleset) {
    let builtin_targets = ["ACCEPT", "DROP", "RETURN", "MARK", "LOG"];
    let all_rules = rs
        .chains
        .iter()
        .chain(rs.hooks.iter())
        .chain(rs.appended.iter())
        .flat_map(|(c, rules)| rules.iter().map(move |r| (c, r)));
    for (chain, rule) in all_rules {
        assert!(chain.len() <= MAX_CHAIN_NAME_LEN, "{chain}");
        assert!(
            rule_hash(rule).is_some_and(|h| h.len() == 16),
            "{chain}: {rule}"
        );
        assert!(!rule.contains('\n'));
        for t in targets(rule) {
            assert!(
                builtin_targets.contains(&t) || rs.chains.contains_key(t),
                "{chain}: target {t} missing"
            );
        }
        for s in match_sets(rule) {
            let set = rs
                .ipsets
                .get(s)
                .unwrap_or_else(|| panic!("{chain}: set {s}"));
            assert_eq!(set.family, rs.family);
            assert!(s.len() <= 31);
        }
        assert!(
            rule.matches("--source ").count() <= 1 && rule.matches("--destination ").count() <= 1,
            "iptables takes one CIDR per side: {rule}"
        );
        assert!(rule.matches(" -p ").count() <= 1, "{rule}");
    }
    // Every chain is reachable: referenced by a rule or a hook.
    let referenced: BTreeSet<&str> = rs
        .chains
        .values()
        .chain(rs.hooks.values())
        .flatten()
        .flat_map(|r| targets(r))
        .collect();
    for name in rs.chains.keys() {
        assert!(
            referenced.contains(name.as_str()) || name.starts_with("cali-p"),
            "{name} is never used"
        );
    }
}

#[test]
fn renderings_are_well_formed() {
    for yaml in [web_deny_all(), complex_cluster()] {
        for node in ["node1", "node2"] {
            let rs = rulesets(&yaml, &CompileOptions::new(node));
            for r in rs.iter() {
                check_well_formed(r);
            }
        }
    }
}

#[test]
fn hook_rules_carry_felixs_own_hashes() {
    // felix writes exactly these two rules (no other comment), so the hashes
    // are the ones every Calico node shows in `iptables-save`.
    let rs = rulesets(&web_deny_all(), &CompileOptions::new("node1"));
    for r in rs.iter() {
        assert_eq!(
            r.hooks["FORWARD"][0],
            "-m comment --comment \"cali:wUHhoiAYhphO9Mso\" --jump cali-FORWARD"
        );
        assert_eq!(
            r.hooks["INPUT"][0],
            "-m comment --comment \"cali:Cz_u1IQiXIMmKD4c\" --jump cali-INPUT"
        );
        // felix appends FORWARD's accept (other software's FORWARD rules
        // still see what policy accepted); INPUT's sits under its jump.
        assert_eq!(r.hooks["FORWARD"].len(), 1);
        assert_eq!(r.appended["FORWARD"].len(), 1);
        assert!(r.appended["FORWARD"][0].ends_with("-m mark --mark 0x10000/0x10000 --jump ACCEPT"));
        assert!(r.hooks["INPUT"][1].ends_with("-m mark --mark 0x10000/0x10000 --jump ACCEPT"));
    }
}

#[test]
fn allow_is_mark_then_return_and_the_v2_mask_uses_pass_bit_0x2000000() {
    let mut opts = CompileOptions::new("node1");
    opts.mark_mask = 0xff00_0000;
    let rs = rulesets(&web_deny_all(), &opts);
    let tw = &rs.v4.chains[&format!("cali-tw-{}", interface_name("default", "web"))];
    assert!(tw
        .iter()
        .any(|r| r.ends_with("-m mark --mark 0/0x3000000 --jump cali-pi-default.web-deny-all")));
    assert!(tw
        .iter()
        .any(|r| r.ends_with("-m mark --mark 0/0x2000000 --jump DROP")));
    let pri = &rs.v4.chains["cali-pri-kns.default"];
    assert_eq!(pri.len(), 2, "{pri:#?}");
    assert!(pri[0].ends_with("--jump MARK --set-mark 0x1000000/0x1000000"));
    assert!(pri[1].ends_with("-m mark --mark 0x1000000/0x1000000 --jump RETURN"));
}

#[test]
fn neighbour_discovery_only_in_v6() {
    let rs = rulesets(&web_deny_all(), &CompileOptions::new("node1"));
    let nd = |r: &IptablesRuleset| {
        r.chains["cali-wl-to-host"]
            .iter()
            .filter(|r| r.contains("--icmpv6-type"))
            .count()
    };
    assert_eq!(nd(&rs.v4), 0);
    assert_eq!(nd(&rs.v6), 6);
    assert!(rs.v6.chains["cali-wl-to-host"]
        .iter()
        .any(|r| r.contains("-p ipv6-icmp -m icmp6 --icmpv6-type 135 --jump ACCEPT")));
}

#[test]
fn long_policy_names_are_hashed_like_felix() {
    let rs = rulesets(&complex_cluster(), &CompileOptions::new("node1"));
    let long = "cali-pi-default.web-allow-many-ports-from-prod-and-the-office";
    let name = chain_name(long);
    assert_eq!(name.len(), 28);
    assert!(name.starts_with("cali-pi-_"));
    assert!(rs.v4.chains.contains_key(&name));
}

#[test]
fn more_than_15_ports_use_a_scratch_match_block() {
    let rs = rulesets(&complex_cluster(), &CompileOptions::new("node1"));
    let chain =
        &rs.v4.chains[&chain_name("cali-pi-default.web-allow-many-ports-from-prod-and-the-office")];
    // scratch0 = 0x40000, scratch1 = 0x80000 under the default mask.
    assert!(
        chain[0].ends_with("--jump MARK --set-mark 0x0/0xc0000"),
        "{chain:#?}"
    );
    let multiport: Vec<&String> = chain
        .iter()
        .filter(|r| r.contains("-m multiport --destination-ports"))
        .collect();
    assert_eq!(multiport.len(), 2, "20 ports + a range: 15 + 7 slots");
    assert!(multiport
        .iter()
        .all(|r| r.contains("-p tcp") && r.ends_with("--jump MARK --set-mark 0x40000/0x40000")));
    assert!(chain.iter().any(|r| r.contains("--match-set cali40n:")
        && r.contains("dst,dst --jump MARK --set-mark 0x40000/0x40000")));
    assert!(chain
        .iter()
        .any(|r| r.contains("-m set --match-set cali40s:")
            && r.ends_with(
                "-m mark --mark 0x40000/0x40000 --jump MARK --set-mark 0x10000/0x10000"
            )));
}

#[test]
fn several_cidrs_and_excepts_use_blocks_and_other_family_rules_are_skipped() {
    let rs = rulesets(&complex_cluster(), &CompileOptions::new("node1"));
    let db = &rs.v4.chains["cali-pi-ns/prod/db-guard"];
    let text = db.join("\n");
    // Three source CIDRs: one rule each, setting scratch0.
    for net in ["198.18.0.0/24", "198.18.4.0/24", "198.18.8.0/24"] {
        assert!(
            text.contains(&format!(
                "--source {net} --jump MARK --set-mark 0x40000/0x40000"
            )),
            "{text}"
        );
    }
    // A single notNet fits in the main rule (felix counts what is left).
    assert!(text.contains(
        "-p tcp -m multiport --destination-ports 5432 ! --source 198.18.0.128/25 -m mark --mark 0x40000/0x40000 --jump LOG --log-prefix \"calico-packet: \" --log-level 5"
    ), "{text}");
    // Two notNets and no positive CIDR: a negated block that starts with
    // scratch0 set, and each notNet clears it.
    assert!(
        text.contains("--jump MARK --set-mark 0x40000/0xc0000"),
        "{text}"
    );
    for net in ["198.18.129.0/30", "198.18.129.8/30"] {
        assert!(text.contains(&format!("--source {net} --jump MARK --set-mark 0/0x40000")));
    }
    // The IPv6-only Allow rule is not in the IPv4 chain, and vice versa.
    assert!(!text.contains("fd00:"));
    let db6 = rs.v6.chains["cali-pi-ns/prod/db-guard"].join("\n");
    assert!(db6.contains("--source fd00:198:18:5::/64"), "{db6}");
    assert!(!db6.contains("198.18.0.0/24"));
    assert!(
        db6.contains("-m multiport ! --destination-ports 22:23"),
        "ports are coalesced"
    );
    // ICMP with type and code only in v4 (protocol ICMP is not ICMPv6).
    assert!(text.contains("-p icmp -m icmp --icmp-type 8/0 --jump DROP"));
    assert!(!db6.contains("icmp"));
}

#[test]
fn many_interfaces_make_a_dispatch_prefix_tree() {
    let rs = rulesets(&complex_cluster(), &CompileOptions::new("node1"));
    let root = &rs.v4.chains["cali-from-wl-dispatch"];
    let children: Vec<&String> = rs
        .v4
        .chains
        .keys()
        .filter(|k| k.starts_with("cali-from-wl-dispatch-"))
        .collect();
    assert!(!children.is_empty(), "{:#?}", rs.v4.chains.keys());
    for child in &children {
        let c = &child["cali-from-wl-dispatch-".len()..];
        assert!(root
            .iter()
            .any(|r| r.contains(&format!("--in-interface cali{c}+ --goto {child}"))));
        let rules = &rs.v4.chains[*child];
        assert!(rules.len() >= 3, "at least two interfaces and the end rule");
        assert!(rules
            .last()
            .unwrap()
            .ends_with("--in-interface cali+ --jump DROP"));
    }
    assert!(root
        .last()
        .unwrap()
        .ends_with("--in-interface cali+ --jump DROP"));
    // Every local interface is dispatched exactly once.
    let all: Vec<&String> = rs
        .v4
        .chains
        .iter()
        .filter(|(k, _)| k.starts_with("cali-from-wl-dispatch"))
        .flat_map(|(_, r)| r)
        .filter(|r| r.contains("--goto cali-fw-"))
        .collect();
    assert_eq!(all.len(), 9, "8 web pods and db");
}

#[test]
fn ipsets_hold_members_as_ipset_prints_them() {
    let rs = rulesets(&complex_cluster(), &CompileOptions::new("node1"));
    fn named_ports(r: &IptablesRuleset) -> Vec<(&String, &IpSetSpec)> {
        let sets = r.ipsets.iter();
        sets.filter(|(_, s)| s.kind == IpSetType::HashIpPort)
            .collect()
    }
    let named = named_ports(&rs.v4);
    assert!(!named.is_empty());
    for (name, s) in &named {
        assert!(name.starts_with("cali40n:"));
        assert!(s.members.iter().all(|m| m.contains(",tcp:")), "{s:?}");
    }
    let v6_named = named_ports(&rs.v6);
    assert!(v6_named
        .iter()
        .any(|(_, s)| s.members.contains("fd00:198:18::1:1,tcp:9090")));
    for s in rs
        .v4
        .ipsets
        .values()
        .filter(|s| s.kind == IpSetType::HashNet)
    {
        assert!(s.members.iter().all(|m| !m.ends_with("/32")), "{s:?}");
    }
    assert!(render_ipset_restore(&rs.v4)
        .lines()
        .next()
        .unwrap()
        .ends_with("family inet maxelem 1048576 -exist"));
}

// ---- kernel check -------------------------------------------------------

/// Runs `argv` inside `ns` with `stdin`: (success, stdout + stderr).
fn run(ns: &testkit::netns::Netns, argv: &[&str], stdin: &str) -> (bool, String) {
    let (ok, stdout, stderr) = ns.output(argv, stdin).unwrap();
    (ok, stdout + &stderr)
}

fn restore_bins(f: IpFamily) -> (&'static str, &'static str) {
    match f {
        IpFamily::V4 => ("iptables-legacy-restore", "iptables-legacy-save"),
        IpFamily::V6 => ("ip6tables-legacy-restore", "ip6tables-legacy-save"),
    }
}

#[test]
fn every_payload_is_accepted_by_ipset_and_iptables_restore() {
    for (tag, yaml, node) in [
        ("seed", web_deny_all(), "node1"),
        ("cplx", complex_cluster(), "node1"),
        ("cplx", complex_cluster(), "node2"),
    ] {
        let rs = rulesets(&yaml, &CompileOptions::new(node));
        // Exists while this value does.
        let ns = testkit::netns::Netns::create(&format!("ipt-{tag}"))
            .expect("ip netns add (needs root)");
        for r in rs.iter() {
            let (ok, out) = run(&ns, &["ipset", "restore"], &render_ipset_restore(r));
            assert!(ok, "ipset restore ({tag} {node} {}): {out}", r.family);
            let (restore, save) = restore_bins(r.family);
            let payload = render_restore(r);
            let (ok, out) = run(&ns, &[restore, "--noflush", "--test"], &payload);
            assert!(ok, "{restore} --test ({tag} {node}): {out}\n{payload}");
            // And for real: the kernel's checks run only on commit.
            let (ok, out) = run(&ns, &[restore, "--noflush"], &payload);
            assert!(ok, "{restore} ({tag} {node}): {out}\n{payload}");
            let (ok, saved) = run(&ns, &[save, "-t", "filter"], "");
            assert!(ok, "{saved}");
            for (chain, rules) in &r.chains {
                let n = saved
                    .lines()
                    .filter(|l| l.starts_with(&format!("-A {chain} ")))
                    .count();
                assert_eq!(n, rules.len(), "{chain} in\n{saved}");
            }
            let forward: Vec<&str> = saved
                .lines()
                .filter(|l| l.starts_with("-A FORWARD "))
                .collect();
            assert_eq!(forward.len(), 2, "{saved}");
            assert!(forward[0].ends_with("-j cali-FORWARD"));
        }
        let (ok, sets) = run(&ns, &["ipset", "save"], "");
        assert!(ok);
        // What ipset prints back is exactly what we rendered.
        for r in rs.iter() {
            for (name, set) in &r.ipsets {
                assert_eq!(ipset_members(&sets, name), set.members, "{name}");
            }
        }
    }
}

// ---- match-block semantics ----------------------------------------------

/// A packet for [`eval_chain`].
struct Pkt {
    src: std::net::IpAddr,
    dst: std::net::IpAddr,
    proto: &'static str,
    dport: u16,
}

/// Runs a policy chain's rules (the subset of iptables the match blocks
/// use) over a packet; returns the mark when the chain returns or ends.
fn eval_chain(rules: &[String], p: &Pkt) -> u32 {
    let mut mark = 0u32;
    let num = |s: &str| u32::from_str_radix(s.trim_start_matches("0x"), 16).unwrap();
    let vm = |s: &str| {
        let (v, m) = s.split_once('/').unwrap();
        (if v == "0" { 0 } else { num(v) }, num(m))
    };
    for rule in rules {
        // Drop the comments (they may contain spaces).
        let mut text = rule.clone();
        while let Some(at) = text.find("-m comment --comment \"") {
            let end = text[at + 22..].find('"').unwrap() + at + 23;
            text.replace_range(at..end, "");
        }
        let w: Vec<&str> = text.split_whitespace().collect();
        let mut i = 0;
        let mut matched = true;
        let mut action: Option<(&str, &str)> = None;
        while i < w.len() {
            let neg = w[i] == "!";
            if neg {
                i += 1;
            }
            let hit = match w[i] {
                "-p" => {
                    i += 2;
                    w[i - 1] == p.proto
                }
                "--source" | "--destination" => {
                    let net: IpNet = w[i + 1]
                        .parse()
                        .or_else(|_| format!("{}/32", w[i + 1]).parse())
                        .unwrap();
                    let a = if w[i] == "--source" { p.src } else { p.dst };
                    i += 2;
                    net.contains(&a)
                }
                "-m" if w[i + 1] == "multiport" => {
                    let (neg2, at) = if w[i + 2] == "!" {
                        (true, i + 3)
                    } else {
                        (false, i + 2)
                    };
                    assert_eq!(w[at], "--destination-ports");
                    let inside = w[at + 1].split(',').any(|r| {
                        let (a, b) = r.split_once(':').unwrap_or((r, r));
                        (a.parse::<u16>().unwrap()..=b.parse().unwrap()).contains(&p.dport)
                    });
                    i = at + 2;
                    inside != neg2
                }
                "-m" if w[i + 1] == "mark" => {
                    let (neg2, at) = if w[i + 2] == "!" {
                        (true, i + 3)
                    } else {
                        (false, i + 2)
                    };
                    let (v, m) = vm(w[at + 1]);
                    i = at + 2;
                    (mark & m == v) != neg2
                }
                "--jump" => {
                    action = Some((w[i + 1], w.get(i + 3).copied().unwrap_or("")));
                    i = w.len();
                    true
                }
                other => panic!("unsupported {other} in {rule}"),
            };
            if hit == neg {
                matched = false;
                break;
            }
        }
        if !matched {
            continue;
        }
        match action {
            Some(("MARK", arg)) => {
                let (v, m) = vm(arg);
                mark = (mark & !m) | v;
            }
            Some(("RETURN", _)) => return mark,
            None => {}
            Some((a, _)) => panic!("unsupported action {a}"),
        }
    }
    mark
}

#[test]
fn three_positive_match_blocks_and_them_all() {
    let ports: Vec<String> = (0..16).map(|i| (3000 + 2 * i).to_string()).collect();
    let yaml = format!(
        "{}---
apiVersion: projectcalico.org/v3
kind: NetworkPolicy
metadata: {{name: blocks, namespace: default}}
spec:
  selector: app == 'web'
  types: [Ingress]
  ingress:
  - action: Allow
    protocol: TCP
    source: {{nets: [198.18.0.0/24, 198.18.4.0/24], notNets: [198.18.4.128/25, 198.18.0.7/32]}}
    destination: {{nets: [198.18.128.0/28, 198.18.128.64/28], ports: [{}]}}
",
        web_deny_all(),
        ports.join(", ")
    );
    let rs = rulesets(&yaml, &CompileOptions::new("node1"));
    let chain = &rs.v4.chains["cali-pi-ns/default/blocks"];
    let accept = 0x10000;
    let mut seen = [0usize; 2];
    for src in [
        "198.18.0.1",
        "198.18.4.1",
        "198.18.4.200",
        "198.18.0.7",
        "198.18.9.1",
    ] {
        for dst in ["198.18.128.1", "198.18.128.65", "198.18.128.20"] {
            for dport in [3000u16, 3030, 3001, 80] {
                for proto in ["tcp", "udp"] {
                    let p = Pkt {
                        src: src.parse().unwrap(),
                        dst: dst.parse().unwrap(),
                        proto,
                        dport,
                    };
                    let s: std::net::IpAddr = p.src;
                    let want = proto == "tcp"
                        && ["198.18.0.0/24", "198.18.4.0/24"]
                            .iter()
                            .any(|n| n.parse::<IpNet>().unwrap().contains(&s))
                        && !["198.18.4.128/25", "198.18.0.7/32"]
                            .iter()
                            .any(|n| n.parse::<IpNet>().unwrap().contains(&s))
                        && ["198.18.128.0/28", "198.18.128.64/28"]
                            .iter()
                            .any(|n| n.parse::<IpNet>().unwrap().contains(&p.dst))
                        && ports.contains(&dport.to_string());
                    let got = eval_chain(chain, &p) & accept != 0;
                    assert_eq!(got, want, "{src} → {dst}:{dport}/{proto}\n{chain:#?}");
                    seen[usize::from(want)] += 1;
                }
            }
        }
    }
    assert!(seen[0] > 0 && seen[1] > 0, "{seen:?}");
}
