//! The compiler's output for small clusters: golden renderings (a change in
//! output shows in review) and the properties the nftables lowering promises.

use compiler::nft::{Match, Ruleset, SetElement, TableFamily};
use compiler::{compile_nftables, CompileOptions};
use expect_test::expect_file;
use testkit::cluster::{state, tiered, web_deny_all, DEFAULT_NAMESPACE};

fn compile(yaml: &str, opts: &CompileOptions) -> Ruleset {
    compile_nftables(&state(yaml), opts).unwrap().1
}

fn table(rs: &Ruleset, f: TableFamily) -> &compiler::nft::Table {
    rs.tables.iter().find(|t| t.family == f).unwrap()
}

#[test]
fn seed_web_deny_all_golden() {
    let rs = compile(&web_deny_all(), &CompileOptions::new("node1"));
    expect_file!["golden/seed-web-deny-all.node1.nft"]
        .assert_eq(&compiler::render_nft::render(&rs));
}

#[test]
fn tiers_golden() {
    let rs = compile(&tiered(), &CompileOptions::new("node1"));
    expect_file!["golden/tiers.node1.nft"].assert_eq(&compiler::render_nft::render(&rs));
}

/// Service accounts as felix renders them: web runs as `backend` (its
/// profile `ksa.default.backend` comes after the namespace's in its
/// endpoint chains); the policy's serviceAccountSelector and the rule's
/// serviceAccounts are selectors over `pcsa.` labels and the
/// service-account label, whose sets hold the matching pods.
#[test]
fn service_accounts_golden() {
    let yaml = format!(
        "{DEFAULT_NAMESPACE}---
apiVersion: v1
kind: ServiceAccount
metadata: {{name: backend, namespace: default, labels: {{role: db}}}}
---
apiVersion: v1
kind: Pod
metadata: {{name: web, namespace: default, labels: {{app: web}}}}
spec: {{nodeName: node1, serviceAccountName: backend, containers: [{{name: c}}]}}
status: {{podIP: 198.18.128.1}}
---
apiVersion: v1
kind: Pod
metadata: {{name: client, namespace: default}}
spec: {{nodeName: node2, serviceAccountName: frontend, containers: [{{name: c}}]}}
status: {{podIP: 198.18.128.2}}
---
apiVersion: projectcalico.org/v3
kind: NetworkPolicy
metadata: {{name: db-ingress, namespace: default}}
spec:
  serviceAccountSelector: role == 'db'
  types: [Ingress]
  ingress:
  - {{action: Allow, protocol: TCP, source: {{serviceAccounts: {{names: [frontend]}}}}, destination: {{ports: [5432]}}}}
"
    );
    let rs = compile(&yaml, &CompileOptions::new("node1"));
    expect_file!["golden/service-accounts.node1.nft"].assert_eq(&compiler::render_nft::render(&rs));
}

#[test]
fn mark_mask_v2_uses_pass_bit_0x2000000() {
    let mut opts = CompileOptions::new("node1");
    opts.mark_mask = 0xff00_0000;
    let rs = compile(&web_deny_all(), &opts);
    let text = compiler::render_nft::render(&rs);
    assert!(
        // Jumped to while neither the pass (0x02000000) nor the accept
        // (0x01000000) bit is set.
        text.contains("meta mark & 0x03000000 == 0x00000000 jump cali-pi-default.web-deny-all"),
        "{text}"
    );
    assert!(text.contains(
        "meta mark & 0x02000000 == 0x00000000 counter drop comment \"End of tier default"
    ));
    assert!(
        text.contains("meta mark set meta mark | 0x01000000 return"),
        "allow sets the accept bit"
    );
    // The default mask: accept 0x10000, pass 0x20000.
    let text =
        compiler::render_nft::render(&compile(&web_deny_all(), &CompileOptions::new("node1")));
    assert!(text.contains("meta mark & 0x00030000 == 0x00000000 jump cali-pi-default.web-deny-all"));
}

#[test]
fn a_mask_with_too_few_bits_is_rejected() {
    let mut opts = CompileOptions::new("node1");
    opts.mark_mask = 0x0000_0600;
    let err = compile_nftables(&state(DEFAULT_NAMESPACE), &opts).unwrap_err();
    assert_eq!(
        err.to_string(),
        "mark mask 0x00000600 has 2 bit(s) set; nftpolicy needs at least 4 (accept, pass, scratch0, scratch1)"
    );
}

#[test]
fn only_local_endpoints_and_their_policies_are_programmed() {
    let rs = compile(&web_deny_all(), &CompileOptions::new("node2"));
    let t = table(&rs, TableFamily::Ip);
    assert!(
        !t.chains.contains_key("cali-pi-default.web-deny-all"),
        "web is on node1"
    );
    let map = &t.maps["cali-to-wl-dispatch"];
    assert_eq!(map.elements.len(), 1);
    assert!(map
        .elements
        .contains_key(&model::convert::interface_name("default", "client")));
}

#[test]
fn sets_are_shared_by_content_and_cidrs_coalesced() {
    let policy = |name: &str| {
        format!(
            "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: {name}, namespace: default}}\nspec:\n  podSelector: {{matchLabels: {{app: web}}}}\n  ingress:\n  - from: [{{podSelector: {{matchLabels: {{app: client}}}}}}]\n    ports: [{{port: 80}}, {{port: 443}}, {{port: 8080}}]\n  - from: [{{ipBlock: {{cidr: 198.18.0.0/16, except: [198.18.1.0/24, 198.18.1.128/25, 198.18.2.0/24, 198.18.3.0/24]}}}}, {{ipBlock: {{cidr: 198.18.1.0/24}}}}]\n"
        )
    };
    let yaml = format!("{}{}{}", web_deny_all(), policy("a"), policy("b"));
    let rs = compile(&yaml, &CompileOptions::new("node1"));
    let t = table(&rs, TableFamily::Ip);
    let names: Vec<&str> = t.sets.keys().map(String::as_str).collect();
    // one selector set, one port-list set, one CIDR set (the except list),
    // however many policies use them.
    assert_eq!(
        names.iter().filter(|n| n.starts_with("cali40s-")).count(),
        1,
        "{names:?}"
    );
    assert_eq!(
        names.iter().filter(|n| n.starts_with("calipt-")).count(),
        1,
        "{names:?}"
    );
    assert_eq!(
        names.iter().filter(|n| n.starts_with("cali40c-")).count(),
        1,
        "{names:?}"
    );
    let cidrs = t
        .sets
        .values()
        .find(|s| s.name.starts_with("cali40c-"))
        .unwrap();
    // 198.18.1.128/25 lies inside 198.18.1.0/24, and 2.0/24 + 3.0/24 merge.
    let want: Vec<SetElement> = ["198.18.1.0/24", "198.18.2.0/23"]
        .iter()
        .map(|s| SetElement::Net(s.parse().unwrap()))
        .collect();
    assert_eq!(cidrs.elements, want);
    // Each Calico rule is one nft rule: 2 rules per policy + the counter.
    let chain = &t.chains["cali-pi-default.a"];
    assert_eq!(chain.rules.len(), 4, "{chain:#?}");
    // An IPv4 ipBlock never matches IPv6: no such rule in the ip6 table.
    let chain6 = &table(&rs, TableFamily::Ip6).chains["cali-pi-default.a"];
    assert_eq!(chain6.rules.len(), 2, "the two ipBlock rules are IPv4-only");
    assert!(!chain6
        .rules
        .iter()
        .any(|r| r.matches.iter().any(|m| matches!(
            m,
            Match::Addr {
                target: compiler::nft::AddrTarget::Net(_),
                ..
            }
        ))));
}
