//! Service-account matching, as Calico does it: nothing in the dataplane
//! knows about service accounts; they become labels and selectors.
//!
//! - A Kubernetes ServiceAccount `<sa>` in namespace `<ns>` becomes the
//!   Profile `ksa.<ns>.<sa>`, with no rules, applying the account's labels
//!   to the endpoints using it as `pcsa.<label>`, plus
//!   `pcsa.projectcalico.org/name: <sa>` (libcalico-go's
//!   `ServiceAccountToProfile`).
//! - A pod's endpoint lists that profile after its namespace's
//!   (`[kns.<ns>, ksa.<ns>.<sa>]`), and carries the label
//!   `projectcalico.org/serviceaccount: <sa>`. A pod without
//!   `spec.serviceAccountName` is given `default`, as the API server's
//!   ServiceAccount admission does before the pod is stored.
//! - felix never sees `pcns.`/`pcsa.` labels an endpoint sets itself (the
//!   syncer's workload endpoint processor strips them, so a pod cannot
//!   pretend to be in another namespace or account), and the
//!   service-account label is taken from `spec.serviceAccountName`
//!   ([`felix_labels`]).
//! - A policy's `serviceAccountSelector` is ANDed to its selector with
//!   every label key prefixed `pcsa.` ([`policy_selector`]); a rule's
//!   `serviceAccounts` becomes `(pcsa.<selector>) && (projectcalico.org/
//!   serviceaccount in {names})`, which then takes part in the rule's
//!   namespace scoping like any selector ([`match_selector`];
//!   libcalico-go's `parseServiceAccounts` and `getEndpointSelector`).

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ServiceAccount;

use crate::calico::{
    self, ObjectMeta, Profile, ProfileSpec, ServiceAccountMatch, WorkloadEndpoint,
};
use crate::reject;
use crate::selector::Selector;

/// Prefix of a service account's labels on its endpoints.
pub const LABEL_PREFIX: &str = "pcsa.";
/// Prefix of the profile standing for a service account.
pub const PROFILE_PREFIX: &str = "ksa.";
/// The account a pod runs as when it names none.
pub const DEFAULT_ACCOUNT: &str = "default";

/// `ksa.<namespace>.<account>` (libcalico-go's
/// `serviceAccountNameToProfileName`).
pub fn profile_name(namespace: &str, account: &str) -> String {
    let namespace = if namespace.is_empty() {
        "default"
    } else {
        namespace
    };
    format!("{PROFILE_PREFIX}{namespace}.{account}")
}

/// The account a pod runs as: its `spec.serviceAccountName`, or `default`.
pub fn pod_account(name: Option<&str>) -> &str {
    name.filter(|n| !n.is_empty()).unwrap_or(DEFAULT_ACCOUNT)
}

/// A ServiceAccount → its `ksa.` profile. A rejected account (an unknown
/// field) still labels its pods, which drop all traffic until it is fixed,
/// as a rejected Namespace's do.
pub fn to_profile(sa: &ServiceAccount) -> Result<Profile, String> {
    let name = sa.metadata.name.clone().unwrap_or_default();
    let namespace = sa.metadata.namespace.clone().unwrap_or_default();
    let labels = sa.metadata.labels.clone().unwrap_or_default();
    for (k, v) in &labels {
        crate::convert::validate_label_key(k)?;
        crate::convert::validate_label_value(v).map_err(|e| format!("label {k:?}: {e}"))?;
    }
    let mut labels_to_apply: BTreeMap<String, String> = labels
        .into_iter()
        .map(|(k, v)| (format!("{LABEL_PREFIX}{k}"), v))
        .collect();
    labels_to_apply.insert(
        format!("{LABEL_PREFIX}{}", calico::NAMESPACE_NAME_LABEL),
        name.clone(),
    );
    let mut metadata = ObjectMeta {
        name: profile_name(&namespace, &name),
        ..Default::default()
    };
    if let Some(reason) = crate::kube::rejection(&sa.metadata) {
        reject::mark_rejected(&mut metadata.annotations, reason);
    }
    Ok(Profile {
        api_version: calico::API_VERSION.into(),
        metadata,
        spec: ProfileSpec {
            labels_to_apply: labels_to_apply.into_iter().collect(),
            ..Default::default()
        },
    })
}

/// The labels felix sees on an endpoint (the syncer's workload endpoint
/// processor): its own, without `pcns.`/`pcsa.` ones, and the
/// service-account label from `spec.serviceAccountName`.
pub fn felix_labels(w: &mut WorkloadEndpoint) {
    w.metadata.labels.retain(|k, _| {
        !k.starts_with(calico::NAMESPACE_LABEL_PREFIX) && !k.starts_with(LABEL_PREFIX)
    });
    if let Some(sa) = w
        .spec
        .service_account_name
        .as_deref()
        .filter(|s| !s.is_empty())
    {
        w.metadata
            .labels
            .insert(calico::LABEL_SERVICE_ACCOUNT.into(), sa.to_owned());
    }
}

/// A Kubernetes object name (DNS subdomain): what a service account is
/// called. Anything else could not name one, and would not survive being
/// quoted into a selector.
fn validate_account_name(name: &str) -> Result<(), String> {
    if crate::convert::is_dns_subdomain(name) {
        Ok(())
    } else {
        Err(format!(
            "{name:?} is not a service account name (lowercase letters, digits, '-' and '.')"
        ))
    }
}

/// Checks a rule's `serviceAccounts`: names are account names, the
/// selector parses. The error starts with the field (`names[1]: …`).
pub fn validate_match(m: &ServiceAccountMatch) -> Result<(), String> {
    for (i, n) in m.names.iter().enumerate() {
        validate_account_name(n).map_err(|e| format!("names[{i}]: {e}"))?;
    }
    if let Some(s) = &m.selector {
        Selector::parse(s).map_err(|e| format!("selector: {e}"))?;
    }
    Ok(())
}

/// libcalico-go's `parseServiceAccounts`: the selector with its keys
/// prefixed `pcsa.`, ANDed with `projectcalico.org/serviceaccount in
/// {names}`; `None` when neither is given (no restriction).
pub fn match_selector(m: &ServiceAccountMatch) -> Result<Option<Selector>, String> {
    validate_match(m)?;
    let labels = m
        .selector
        .as_deref()
        .filter(|s| !s.is_empty())
        .map(|s| {
            Selector::parse(s)
                .map(|s| s.with_label_prefix(LABEL_PREFIX))
                .map_err(|e| format!("selector: {e}"))
        })
        .transpose()?;
    if m.names.is_empty() {
        return Ok(labels);
    }
    let names = m
        .names
        .iter()
        .map(|n| format!("'{n}'"))
        .collect::<Vec<_>>()
        .join(", ");
    let names = Selector::parse(&format!(
        "{} in {{ {names} }}",
        calico::LABEL_SERVICE_ACCOUNT
    ))
    .map_err(|e| format!("names: {e}"))?;
    Ok(Some(match labels {
        Some(l) => l.and(&names),
        None => names,
    }))
}

/// A policy's `serviceAccountSelector` applied to its (already namespace-
/// scoped) `selector`: libcalico-go's `prefixAndAppendSelector` with the
/// `pcsa.` prefix. In a GlobalNetworkPolicy every `all()` of the result
/// then means "endpoints with a service account"
/// (`has(projectcalico.org/serviceaccount)`): `all()` in the account
/// selector, and in the policy's own selector when it is written (an
/// omitted selector adds nothing to replace). `selector_written`: the
/// policy's selector text was not empty, or a namespaceSelector was given.
pub fn policy_selector(
    selector: Selector,
    account_selector: Option<&str>,
    global: bool,
    selector_written: bool,
) -> Result<Selector, String> {
    let Some(text) = account_selector.filter(|s| !s.is_empty()) else {
        return Ok(selector);
    };
    let accounts = Selector::parse(text)
        .map_err(|e| format!("spec.serviceAccountSelector: {e}"))?
        .with_label_prefix(LABEL_PREFIX);
    if !global {
        return Ok(selector.and(&accounts));
    }
    let has_account = |s: &Selector| s.all_to_has(calico::LABEL_SERVICE_ACCOUNT);
    let accounts = has_account(&accounts);
    Ok(if selector_written {
        has_account(&selector).and(&accounts)
    } else {
        accounts
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(names: &[&str], selector: Option<&str>) -> ServiceAccountMatch {
        ServiceAccountMatch {
            names: names.iter().map(|s| (*s).to_owned()).collect(),
            selector: selector.map(str::to_owned),
        }
    }

    fn canon(s: &str) -> String {
        Selector::parse(s).unwrap().canonical()
    }

    #[test]
    fn rule_matches_become_selectors_as_libcalico_go_makes_them() {
        assert_eq!(match_selector(&m(&[], None)).unwrap(), None);
        assert_eq!(
            match_selector(&m(&["sa1", "sa2"], Some("key == 'value1'")))
                .unwrap()
                .unwrap()
                .canonical(),
            canon("pcsa.key == 'value1' && projectcalico.org/serviceaccount in { 'sa1', 'sa2' }")
        );
        assert_eq!(
            match_selector(&m(&[], Some("has(role)")))
                .unwrap()
                .unwrap()
                .canonical(),
            canon("has(pcsa.role)")
        );
        let err = match_selector(&m(&["ok", "Not Valid"], None)).unwrap_err();
        assert!(err.starts_with("names[1]: "), "{err}");
        let err = match_selector(&m(&[], Some("role =="))).unwrap_err();
        assert!(err.starts_with("selector: "), "{err}");
    }

    #[test]
    fn policy_selectors_follow_the_policy_kind() {
        let sel = |s: &str| Selector::parse(s).unwrap();
        // Namespaced: ANDed, all() left alone.
        let p = policy_selector(sel("a == 'b'"), Some("role == 'x'"), false, true).unwrap();
        assert_eq!(p.canonical(), canon("a == 'b' && pcsa.role == 'x'"));
        let p = policy_selector(sel("a == 'b'"), Some("all()"), false, true).unwrap();
        assert_eq!(p.canonical(), canon("a == 'b'"));
        // Global: all() means "has a service account".
        let p = policy_selector(sel("all()"), Some("role == 'x'"), true, true).unwrap();
        assert_eq!(
            p.canonical(),
            canon("has(projectcalico.org/serviceaccount) && pcsa.role == 'x'")
        );
        let p = policy_selector(sel(""), Some("all()"), true, false).unwrap();
        assert_eq!(
            p.canonical(),
            canon("has(projectcalico.org/serviceaccount)")
        );
        let p = policy_selector(sel(""), Some("role == 'x'"), true, false).unwrap();
        assert_eq!(p.canonical(), canon("pcsa.role == 'x'"));
        // None or empty: unchanged.
        let p = policy_selector(sel("all()"), Some(""), true, true).unwrap();
        assert!(p.is_all());
    }

    #[test]
    fn endpoints_cannot_set_namespace_or_account_labels_themselves() {
        let mut w = WorkloadEndpoint {
            api_version: calico::API_VERSION.into(),
            metadata: ObjectMeta {
                name: "w".into(),
                labels: [
                    ("pcsa.role", "admin"),
                    ("pcns.team", "x"),
                    ("app", "web"),
                    ("projectcalico.org/serviceaccount", "forged"),
                ]
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect(),
                ..Default::default()
            },
            spec: calico::WorkloadEndpointSpec {
                service_account_name: Some("real".into()),
                ..Default::default()
            },
        };
        felix_labels(&mut w);
        let labels: Vec<_> = w.metadata.labels.iter().collect();
        assert_eq!(
            format!("{labels:?}"),
            r#"[("app", "web"), ("projectcalico.org/serviceaccount", "real")]"#
        );
    }
}
