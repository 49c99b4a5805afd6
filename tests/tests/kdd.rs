//! KDD mode under faults: an `nftpolicy run` agent watching the Kubernetes
//! API server — the fake one, a test double — through a restart, deletions
//! made while it was away, a watch expired by compaction (410 Gone), RBAC
//! refusing it (403), and malformed objects; after each, real packets show
//! the kernel enforcing exactly what the API server holds. Root.

use std::time::Duration;

use lab::apiserver::AGENT_USER;
use lab::{Agents, ApiClient, Lab, LabApi};
use model::scenario::ResolvedProbe;
use serde_json::json;

mod common;

const TIMEOUT: Duration = Duration::from_secs(30);

fn web_from_client() -> serde_json::Value {
    json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": "web-from-client", "namespace": "shop"},
        "spec": {
            "podSelector": {"matchLabels": {"app": "web"}},
            "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "client"}}}], "ports": [{"port": 80}]}],
        },
    })
}

/// (client → web allowed, intruder → web allowed) as the kernel decides.
fn verdicts(lab: &mut Lab, probes: &[ResolvedProbe]) -> (bool, bool) {
    let r = lab.probe_all(probes).unwrap();
    (r[0].allowed == Some(true), r[1].allowed == Some(true))
}

fn log(lab: &Lab) -> String {
    std::fs::read_to_string(lab.workdir().join("agent-node1.log")).unwrap_or_default()
}

/// Waits until the agent has applied everything the API server holds.
fn caught_up(agents: &mut Agents, api: &LabApi) {
    agents
        .wait_applied(api.server.resource_version() as i64, TIMEOUT)
        .unwrap();
}

/// `nftpolicy explain` of intruder → web over the API server: exit code,
/// stdout, stderr.
fn explain_intruder(nftpolicy: &std::path::Path, api: &LabApi) -> (Option<i32>, String, String) {
    let out = std::process::Command::new(nftpolicy)
        .args([
            "explain",
            "--from",
            "shop/intruder",
            "--to",
            "shop/web",
            "--port",
            "80",
        ])
        .arg("--datastore")
        .arg(format!("kubernetes:{}", api.agent_kubeconfig.display()))
        .env_remove("NFTPOLICY_DATASTORE")
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn kdd_agent_lives_through_api_server_faults() {
    let nftpolicy = lab::nftpolicy_binary();
    let (state, probes) = common::shop();
    let mut lab = Lab::build(&state.pods(), &[], &["node1"]).unwrap();
    let api = LabApi::start().unwrap();
    let mut agents = Agents::start(&lab, &api, &nftpolicy, "nftables", &[]).unwrap();
    let dir = lab.workdir().join("step-1");
    let rv = api
        .write_step(&ApiClient::Http, &dir, None, &state)
        .unwrap();
    agents.wait_applied(rv as i64, TIMEOUT).unwrap();
    assert_eq!(verdicts(&mut lab, &probes), (true, false), "shop enforced");

    // 1. The API server restarts; the policy is deleted while it is down.
    //    The rules stay in force meanwhile; after the restart the relist
    //    finds the deletion.
    let mut server = api;
    server.server.stop();
    server.server.delete(&web_from_client()).unwrap();
    common::wait_for("the agent noticing the outage", TIMEOUT, || {
        agents.status("node1").is_ok_and(|s| !s.ready)
    });
    assert_eq!(
        verdicts(&mut lab, &probes),
        (true, false),
        "the last good rules stay in force while the API server is away\n{}",
        log(&lab)
    );
    server.server.resume().unwrap();
    caught_up(&mut agents, &server);
    assert_eq!(
        verdicts(&mut lab, &probes),
        (true, true),
        "deletion found after the restart"
    );

    // 2. Back as an event.
    let rv = server.server.apply(&web_from_client()).unwrap();
    agents.wait_applied(rv as i64, TIMEOUT).unwrap();
    assert_eq!(verdicts(&mut lab, &probes), (true, false));

    // 3. The agent's watches fall behind and expire (410 Gone after a
    //    compaction); the deletion made meanwhile was never sent on them,
    //    only the relist finds it.
    let lists = server.server.requests("list", "networkpolicies");
    server.server.stall_watches();
    server.server.delete(&web_from_client()).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        verdicts(&mut lab, &probes),
        (true, false),
        "not delivered yet"
    );
    server.server.expire_watches();
    caught_up(&mut agents, &server);
    assert_eq!(
        verdicts(&mut lab, &probes),
        (true, true),
        "found by the relist"
    );
    assert!(server.server.requests("list", "networkpolicies") > lists);
    assert!(log(&lab).contains("410 Gone"), "{}", log(&lab));

    // 4. Malformed objects are rejected by name; the rest is programmed.
    let mut bad_policy = web_from_client();
    bad_policy["metadata"]["name"] = json!("port-zero");
    bad_policy["spec"]["ingress"][0]["ports"] = json!([{"port": 0}]);
    server.server.apply(&bad_policy).unwrap();
    let bad_pod = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "broken", "namespace": "shop", "labels": {"app": "web"}},
        "spec": {"nodeName": "node1", "containers": 3},
        "status": {"phase": "Running", "podIP": "198.18.7.7"},
    });
    server.server.apply(&bad_pod).unwrap();
    let rv = server.server.apply(&web_from_client()).unwrap();
    agents.wait_applied(rv as i64, TIMEOUT).unwrap();
    // The rejected policy narrows (issue 16): the pods it selects drop all
    // ingress until it is fixed, whatever the good policy allows.
    assert_eq!(
        verdicts(&mut lab, &probes),
        (false, false),
        "the rejected policy's pods drop ingress\n{}",
        log(&lab)
    );
    let metrics = agents.metrics("node1").unwrap();
    assert!(
        metrics.lines().any(|l| l == "nftpolicy_rejected_objects 2"),
        "{metrics}"
    );
    let text = log(&lab);
    // A rejected NetworkPolicy is a stub under its Calico name (knp.default.…).
    for name in [
        "NetworkPolicy shop/knp.default.port-zero",
        "Pod shop/broken",
    ] {
        assert!(text.contains(name), "{name} named in the log:\n{text}");
    }

    // `explain` reads the same API server once.
    let (code, said, _) = explain_intruder(&nftpolicy, &server);
    assert_eq!(code, Some(1), "denied: {said}");
    assert!(said.contains("DENIED"), "{said}");
    assert!(
        said.contains("port-zero"),
        "explain names the rejected policy: {said}"
    );

    // Fixed, the policy is enforced as written again.
    bad_policy["spec"]["ingress"][0]["ports"] = json!([{"port": 80}]);
    let rv = server.server.apply(&bad_policy).unwrap();
    agents.wait_applied(rv as i64, TIMEOUT).unwrap();
    assert_eq!(
        verdicts(&mut lab, &probes),
        (true, false),
        "the good policies enforced"
    );

    // 5. RBAC takes the agent's right to list pods away; its watches are
    //    cut. It says which permission is missing, is not ready, and the
    //    rules stay in force; granted again, it is ready.
    server.server.deny(Some(AGENT_USER), "list", "pods");
    server.server.deny(Some(AGENT_USER), "watch", "pods");
    server.server.drop_connections();
    common::wait_for("the refusal in the log", TIMEOUT, || {
        log(&lab).contains("refused to list pods (403 Forbidden)")
    });
    let text = log(&lab);
    assert!(
        text.contains("nftpolicy needs get, list and watch on pods cluster-wide"),
        "{text}"
    );
    assert!(text.contains(AGENT_USER), "{text}");
    common::wait_for("not ready while refused", TIMEOUT, || {
        agents.status("node1").is_ok_and(|s| !s.ready)
    });
    assert_eq!(
        verdicts(&mut lab, &probes),
        (true, false),
        "rules stay in force"
    );
    // `explain` gives up at once on a refusal, naming it.
    let (code, _, err) = explain_intruder(&nftpolicy, &server);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("refused to list pods (403 Forbidden)"),
        "{err}"
    );
    server.server.allow_all();
    agents
        .wait_applied(
            server.server.resource_version() as i64,
            Duration::from_secs(60),
        )
        .unwrap();
    assert_eq!(verdicts(&mut lab, &probes), (true, false));
}
