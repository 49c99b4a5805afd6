//! The test double's state: objects by resource type and key, one global
//! resource version (as etcd's revision is for a real API server), a history
//! of changes for watches and consistent paginated lists, and the open
//! watches.
//!
//! What it keeps of a real API server's behaviour, because clients depend
//! on it: `metadata.resourceVersion`, `uid`, `creationTimestamp` and
//! `generation` set by the server; optimistic concurrency on update (a
//! stale `resourceVersion` is a 409 Conflict); objects only in existing
//! namespaces; a Pod's `status` written only through the `status`
//! subresource (ignored on create, where it becomes `phase: Pending`, and on
//! update of the main resource); deleting a namespace deletes what is in
//! it; watches from a resource version replay the changes after it, and a
//! version older than the last compaction is `410 Gone`. What it does not
//! do: schema validation, defaulting beyond the above, admission, finalizers
//! and graceful deletion, field managers, label selectors.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use serde_json::{json, Value};
use tokio::sync::mpsc;

/// A resource type the double serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResourceType {
    /// `""` for the core group.
    pub group: &'static str,
    pub version: &'static str,
    pub plural: &'static str,
    pub singular: &'static str,
    pub kind: &'static str,
    pub namespaced: bool,
    /// Has a `status` subresource (written only through it).
    pub status: bool,
    pub short_names: &'static [&'static str],
}

impl ResourceType {
    /// `v1` or `networking.k8s.io/v1`.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_owned()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// `pods` or `networkpolicies.networking.k8s.io`, as RBAC messages name it.
    pub fn resource_name(&self) -> String {
        if self.group.is_empty() {
            self.plural.to_owned()
        } else {
            format!("{}.{}", self.plural, self.group)
        }
    }
}

/// Everything the double serves.
pub const TYPES: &[ResourceType] = &[
    ResourceType {
        group: "",
        version: "v1",
        plural: "namespaces",
        singular: "namespace",
        kind: "Namespace",
        namespaced: false,
        status: true,
        short_names: &["ns"],
    },
    ResourceType {
        group: "",
        version: "v1",
        plural: "pods",
        singular: "pod",
        kind: "Pod",
        namespaced: true,
        status: true,
        short_names: &["po"],
    },
    ResourceType {
        group: "networking.k8s.io",
        version: "v1",
        plural: "networkpolicies",
        singular: "networkpolicy",
        kind: "NetworkPolicy",
        namespaced: true,
        status: false,
        short_names: &["netpol"],
    },
    ResourceType {
        group: "policy.networking.k8s.io",
        version: "v1alpha1",
        plural: "adminnetworkpolicies",
        singular: "adminnetworkpolicy",
        kind: "AdminNetworkPolicy",
        namespaced: false,
        status: false,
        short_names: &["anp"],
    },
    ResourceType {
        group: "policy.networking.k8s.io",
        version: "v1alpha1",
        plural: "baselineadminnetworkpolicies",
        singular: "baselineadminnetworkpolicy",
        kind: "BaselineAdminNetworkPolicy",
        namespaced: false,
        status: false,
        short_names: &["banp"],
    },
    ResourceType {
        group: "policy.networking.k8s.io",
        version: "v1alpha2",
        plural: "clusternetworkpolicies",
        singular: "clusternetworkpolicy",
        kind: "ClusterNetworkPolicy",
        namespaced: false,
        status: false,
        short_names: &["cnp"],
    },
    ResourceType {
        group: "",
        version: "v1",
        plural: "serviceaccounts",
        singular: "serviceaccount",
        kind: "ServiceAccount",
        namespaced: true,
        status: false,
        short_names: &["sa"],
    },
    ResourceType {
        group: "",
        version: "v1",
        plural: "nodes",
        singular: "node",
        kind: "Node",
        namespaced: false,
        status: true,
        short_names: &["no"],
    },
    ResourceType {
        group: "coordination.k8s.io",
        version: "v1",
        plural: "leases",
        singular: "lease",
        kind: "Lease",
        namespaced: true,
        status: false,
        short_names: &[],
    },
];

/// Index of `Namespace` in [`TYPES`].
const NAMESPACES: usize = 0;

/// `(namespace or "", name)`.
pub type Key = (String, String);

/// Why a request failed: a Kubernetes `Status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub code: u16,
    pub reason: &'static str,
    pub message: String,
}

impl Failure {
    pub fn new(code: u16, reason: &'static str, message: impl Into<String>) -> Failure {
        Failure {
            code,
            reason,
            message: message.into(),
        }
    }

    pub fn status(&self) -> Value {
        json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        })
    }

    fn not_found(t: &ResourceType, name: &str) -> Failure {
        Failure::new(
            404,
            "NotFound",
            format!("{} \"{name}\" not found", t.resource_name()),
        )
    }

    pub fn gone(message: impl Into<String>) -> Failure {
        Failure::new(410, "Expired", message)
    }

    pub fn bad_request(message: impl Into<String>) -> Failure {
        Failure::new(400, "BadRequest", message)
    }
}

/// What a watch receives, in order.
#[derive(Debug, Clone)]
pub enum WatchMsg {
    Event {
        kind: &'static str,
        object: Arc<Value>,
    },
    /// A BOOKMARK at this resource version: every change up to it was sent.
    Bookmark(u64),
    /// A watch `ERROR` event (e.g. 410 Gone); the stream ends after it.
    Error(Failure),
}

#[derive(Debug, Clone)]
struct Change {
    rv: u64,
    type_index: usize,
    key: Key,
    kind: &'static str,
    /// The object after the change (for DELETED: as it was, with the
    /// deletion's resource version).
    object: Arc<Value>,
    /// The object before the change (none for ADDED), to reconstruct a list
    /// at an older resource version.
    before: Option<Arc<Value>>,
}

/// Which objects a watch or list is about.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Filter {
    pub namespace: Option<String>,
    /// `fieldSelector=metadata.name=NAME`.
    pub name: Option<String>,
}

impl Filter {
    fn matches(&self, key: &Key) -> bool {
        self.namespace.as_ref().is_none_or(|ns| &key.0 == ns)
            && self.name.as_ref().is_none_or(|n| &key.1 == n)
    }
}

struct Watcher {
    type_index: usize,
    filter: Filter,
    bookmarks: bool,
    /// Fell behind: gets nothing more (see [`Store::stall_watches`]).
    stalled: bool,
    tx: mpsc::UnboundedSender<WatchMsg>,
}

/// One page of a list.
#[derive(Debug, Clone)]
pub struct Page {
    pub items: Vec<Arc<Value>>,
    /// The resource version the list is consistent at.
    pub resource_version: u64,
    /// Set when more items follow.
    pub continue_token: Option<String>,
    pub remaining: Option<usize>,
}

/// How many changes are kept for watches before the oldest are compacted
/// away on their own (a real API server's etcd compacts every 5 minutes).
pub const DEFAULT_HISTORY: usize = 200_000;

/// The double's objects and history.
pub struct Store {
    rv: u64,
    objects: Vec<BTreeMap<Key, Arc<Value>>>,
    history: VecDeque<Change>,
    history_limit: usize,
    /// Changes at or below this resource version are gone.
    compacted: u64,
    watchers: Vec<Watcher>,
    uids: u64,
    /// Stopped ([`Store::refuse`]): reads and watches are refused, so
    /// nothing changed after the stop reaches a client still connected.
    refusing: bool,
}

impl Default for Store {
    fn default() -> Self {
        Store::new(DEFAULT_HISTORY)
    }
}

impl Store {
    pub fn new(history_limit: usize) -> Store {
        Store {
            rv: 1,
            objects: TYPES.iter().map(|_| BTreeMap::new()).collect(),
            history: VecDeque::new(),
            history_limit: history_limit.max(1),
            compacted: 0,
            watchers: Vec::new(),
            refusing: false,
            uids: 0,
        }
    }

    pub fn resource_version(&self) -> u64 {
        self.rv
    }

    /// Forgets every change up to now: a watch or a paginated list from an
    /// older resource version gets `410 Gone`, as after an etcd compaction.
    pub fn compact(&mut self) -> u64 {
        self.history.clear();
        self.compacted = self.rv;
        self.rv
    }

    pub fn len(&self, type_index: usize) -> usize {
        self.objects[type_index].len()
    }

    pub fn is_empty(&self) -> bool {
        self.objects.iter().all(BTreeMap::is_empty)
    }

    pub fn get(&self, type_index: usize, key: &Key) -> Result<Arc<Value>, Failure> {
        self.objects[type_index]
            .get(key)
            .cloned()
            .ok_or_else(|| Failure::not_found(&TYPES[type_index], &key.1))
    }

    fn record(
        &mut self,
        type_index: usize,
        key: Key,
        kind: &'static str,
        object: Arc<Value>,
        before: Option<Arc<Value>>,
    ) {
        let rv = self.rv;
        self.watchers.retain(|w| {
            if w.stalled || w.type_index != type_index || !w.filter.matches(&key) {
                return !w.tx.is_closed();
            }
            w.tx.send(WatchMsg::Event {
                kind,
                object: object.clone(),
            })
            .is_ok()
        });
        self.history.push_back(Change {
            rv,
            type_index,
            key,
            kind,
            object,
            before,
        });
        while self.history.len() > self.history_limit {
            if let Some(old) = self.history.pop_front() {
                self.compacted = old.rv;
            }
        }
    }

    fn next_rv(&mut self) -> u64 {
        self.rv += 1;
        self.rv
    }

    /// Checks the object's identity against the request (`namespace` from
    /// the path; a body naming another namespace is a 400, as in a real API
    /// server) and returns its key.
    fn key_of(
        &self,
        type_index: usize,
        namespace: Option<&str>,
        object: &mut Value,
    ) -> Result<Key, Failure> {
        let t = &TYPES[type_index];
        if !object.is_object() {
            return Err(Failure::bad_request("the body is not a JSON object"));
        }
        let kind = object.get("kind").and_then(Value::as_str).unwrap_or("");
        let api_version = object
            .get("apiVersion")
            .and_then(Value::as_str)
            .unwrap_or("");
        if kind != t.kind || api_version != t.api_version() {
            return Err(Failure::bad_request(format!(
                "the body is {api_version}/{kind}, the path names {}/{}",
                t.api_version(),
                t.kind
            )));
        }
        let meta = object
            .as_object_mut()
            .expect("checked")
            .entry("metadata")
            .or_insert_with(|| json!({}));
        let Some(meta) = meta.as_object_mut() else {
            return Err(Failure::bad_request("metadata is not an object"));
        };
        let name = meta
            .get("name")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned();
        if name.is_empty() {
            return Err(Failure::new(
                422,
                "Invalid",
                format!("{} \"\" is invalid: metadata.name: Required value", t.kind),
            ));
        }
        let ns = if t.namespaced {
            let path_ns = namespace.unwrap_or("default");
            match meta.get("namespace").and_then(Value::as_str) {
                Some(body_ns) if !body_ns.is_empty() && body_ns != path_ns => {
                    return Err(Failure::bad_request(format!(
                        "the namespace of the provided object ({body_ns}) does not match the namespace sent on the request ({path_ns})"
                    )))
                }
                _ => {}
            }
            meta.insert("namespace".into(), json!(path_ns));
            path_ns.to_owned()
        } else {
            meta.remove("namespace");
            String::new()
        };
        if t.namespaced && !self.objects[NAMESPACES].contains_key(&(String::new(), ns.clone())) {
            return Err(Failure::new(
                404,
                "NotFound",
                format!("namespaces \"{ns}\" not found"),
            ));
        }
        Ok((ns, name))
    }

    /// POST: creates the object. A Pod's `status` is replaced by
    /// `{phase: Pending}` (only the status subresource writes it).
    pub fn create(
        &mut self,
        type_index: usize,
        namespace: Option<&str>,
        mut object: Value,
    ) -> Result<Arc<Value>, Failure> {
        let t = &TYPES[type_index];
        let key = self.key_of(type_index, namespace, &mut object)?;
        if self.objects[type_index].contains_key(&key) {
            return Err(Failure::new(
                409,
                "AlreadyExists",
                format!("{} \"{}\" already exists", t.resource_name(), key.1),
            ));
        }
        let rv = self.next_rv();
        self.uids += 1;
        let uid = format!("00000000-0000-4000-8000-{:012x}", self.uids);
        let meta = object["metadata"].as_object_mut().expect("key_of made it");
        meta.insert("uid".into(), json!(uid));
        meta.insert("resourceVersion".into(), json!(rv.to_string()));
        meta.insert("creationTimestamp".into(), json!(now_rfc3339()));
        meta.insert("generation".into(), json!(1));
        meta.remove("deletionTimestamp");
        // A Node keeps the status it is created with (the API server's
        // node strategy: "Nodes allow *all* fields, including status, to
        // be set on create"); later only through its status subresource.
        if t.status && type_index != NAMESPACES && t.kind != "Node" {
            object
                .as_object_mut()
                .expect("an object")
                .insert("status".into(), json!({"phase": "Pending"}));
        }
        if type_index == NAMESPACES {
            let labels = object["metadata"]
                .as_object_mut()
                .expect("an object")
                .entry("labels")
                .or_insert_with(|| json!({}));
            if let Some(labels) = labels.as_object_mut() {
                labels.insert("kubernetes.io/metadata.name".into(), json!(key.1));
            }
            object
                .as_object_mut()
                .expect("an object")
                .insert("status".into(), json!({"phase": "Active"}));
        }
        let object = Arc::new(object);
        self.objects[type_index].insert(key.clone(), object.clone());
        self.record(type_index, key, "ADDED", object.clone(), None);
        Ok(object)
    }

    /// PUT: replaces the object (or, with `status`, only its status). A
    /// `metadata.resourceVersion` in the body must be the current one.
    pub fn replace(
        &mut self,
        type_index: usize,
        namespace: Option<&str>,
        name: &str,
        mut object: Value,
        status: bool,
    ) -> Result<Arc<Value>, Failure> {
        let t = &TYPES[type_index];
        let key = self.key_of(type_index, namespace, &mut object)?;
        if key.1 != name {
            return Err(Failure::bad_request(format!(
                "the name of the object ({}) does not match the name on the URL ({name})",
                key.1
            )));
        }
        let current = self.get(type_index, &key)?;
        let current_rv = current["metadata"]["resourceVersion"].clone();
        if let Some(rv) = object["metadata"].get("resourceVersion") {
            if !rv.is_null() && rv.as_str() != Some("") && *rv != current_rv {
                return Err(Failure::new(
                    409,
                    "Conflict",
                    format!(
                        "Operation cannot be fulfilled on {} \"{name}\": the object has been modified; please apply your changes to the latest version and try again",
                        t.resource_name()
                    ),
                ));
            }
        }
        let mut next = if status {
            // Only the status changes.
            let mut next = (*current).clone();
            let new_status = object.get("status").cloned().unwrap_or(Value::Null);
            next.as_object_mut()
                .expect("an object")
                .insert("status".into(), new_status);
            next
        } else {
            // Everything but the status and the server-set metadata.
            let mut next = object;
            let obj = next.as_object_mut().expect("an object");
            match current.get("status") {
                Some(s) if t.status || type_index == NAMESPACES => {
                    obj.insert("status".into(), s.clone());
                }
                _ if t.status => {
                    obj.remove("status");
                }
                _ => {}
            }
            let meta = obj["metadata"].as_object_mut().expect("key_of made it");
            for field in ["uid", "creationTimestamp", "resourceVersion"] {
                meta.insert(field.into(), current["metadata"][field].clone());
            }
            let generation = current["metadata"]["generation"].as_i64().unwrap_or(1);
            let spec_changed = next.get("spec") != current.get("spec");
            next["metadata"]["generation"] = json!(if spec_changed {
                generation + 1
            } else {
                generation
            });
            if type_index == NAMESPACES {
                if let Some(labels) = next["metadata"]
                    .as_object_mut()
                    .expect("an object")
                    .entry("labels")
                    .or_insert_with(|| json!({}))
                    .as_object_mut()
                {
                    labels.insert("kubernetes.io/metadata.name".into(), json!(key.1));
                }
            }
            next
        };
        if next == *current {
            // A no-op update leaves the resource version alone.
            return Ok(current);
        }
        let rv = self.next_rv();
        next["metadata"]["resourceVersion"] = json!(rv.to_string());
        let next = Arc::new(next);
        self.objects[type_index].insert(key.clone(), next.clone());
        self.record(type_index, key, "MODIFIED", next.clone(), Some(current));
        Ok(next)
    }

    /// DELETE: removes the object at once (no graceful deletion); a
    /// namespace takes everything in it along.
    pub fn delete(
        &mut self,
        type_index: usize,
        namespace: Option<&str>,
        name: &str,
    ) -> Result<Arc<Value>, Failure> {
        let t = &TYPES[type_index];
        let key = (
            if t.namespaced {
                namespace.unwrap_or("default").to_owned()
            } else {
                String::new()
            },
            name.to_owned(),
        );
        let current = self.get(type_index, &key)?;
        if type_index == NAMESPACES {
            for (inner, t) in TYPES.iter().enumerate() {
                if !t.namespaced {
                    continue;
                }
                let keys: Vec<Key> = self.objects[inner]
                    .keys()
                    .filter(|k| k.0 == name)
                    .cloned()
                    .collect();
                for k in keys {
                    self.remove(inner, k);
                }
            }
        }
        Ok(self.remove(type_index, key).unwrap_or(current))
    }

    fn remove(&mut self, type_index: usize, key: Key) -> Option<Arc<Value>> {
        let before = self.objects[type_index].remove(&key)?;
        let rv = self.next_rv();
        let mut gone = (*before).clone();
        gone["metadata"]["resourceVersion"] = json!(rv.to_string());
        let gone = Arc::new(gone);
        self.record(type_index, key, "DELETED", gone.clone(), Some(before));
        Some(gone)
    }

    /// One page of a list. `continue_token` (from the previous page) fixes
    /// the resource version: the page is the state at that version, rebuilt
    /// from the history; `410 Gone` if it has been compacted away.
    pub fn list(
        &self,
        type_index: usize,
        filter: &Filter,
        limit: Option<usize>,
        continue_token: Option<&str>,
    ) -> Result<Page, Failure> {
        let (at, after) = match continue_token {
            None => (self.rv, None),
            Some(token) => {
                let (rv, after) = decode_continue(token)?;
                if rv < self.compacted {
                    return Err(Failure::gone(format!(
                        "The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter, or use the continue token in this response to retrieve the remainder of the results. Continuing with the provided token results in an inconsistent list - objects that were created, modified, or deleted between the time the first chunk was returned and now may show up in the list. (resource version {rv}, compacted at {})",
                        self.compacted
                    )));
                }
                (rv, Some(after))
            }
        };
        // The live objects, unless they changed since `at` (then rebuilt).
        let changed_since = self
            .history
            .iter()
            .rev()
            .take_while(|c| c.rv > at)
            .any(|c| c.type_index == type_index);
        let rebuilt;
        let objects = if changed_since {
            rebuilt = self.objects_at(type_index, at);
            &rebuilt
        } else {
            &self.objects[type_index]
        };
        let start = match &after {
            Some(a) => std::ops::Bound::Excluded(a.clone()),
            None => std::ops::Bound::Unbounded,
        };
        let mut items = Vec::new();
        let mut iter = objects
            .range((start, std::ops::Bound::Unbounded))
            .filter(|(k, _)| filter.matches(k))
            .peekable();
        let limit = limit.filter(|l| *l > 0).unwrap_or(usize::MAX);
        let mut last = None;
        while items.len() < limit {
            let Some((k, v)) = iter.next() else { break };
            items.push(v.clone());
            last = Some(k.clone());
        }
        let remaining = iter.count();
        let continue_token = match (remaining, last) {
            (0, _) | (_, None) => None,
            (_, Some(last)) => Some(encode_continue(at, &last)),
        };
        Ok(Page {
            items,
            resource_version: at,
            remaining: continue_token.as_ref().map(|_| remaining),
            continue_token,
        })
    }

    /// The objects of a type as they were at resource version `at`.
    fn objects_at(&self, type_index: usize, at: u64) -> BTreeMap<Key, Arc<Value>> {
        let mut objects = self.objects[type_index].clone();
        for change in self.history.iter().rev() {
            if change.rv <= at {
                break;
            }
            if change.type_index != type_index {
                continue;
            }
            match &change.before {
                Some(b) => objects.insert(change.key.clone(), b.clone()),
                None => objects.remove(&change.key),
            };
        }
        objects
    }

    /// Starts a watch: `from` `None` (or `0`) sends every current object as
    /// ADDED first; a resource version replays the changes after it, or is
    /// `410 Gone` when compacted away.
    pub fn watch(
        &mut self,
        type_index: usize,
        filter: Filter,
        from: Option<u64>,
        bookmarks: bool,
    ) -> mpsc::UnboundedReceiver<WatchMsg> {
        let (tx, rx) = mpsc::unbounded_channel();
        match from {
            None | Some(0) => {
                for (k, v) in &self.objects[type_index] {
                    if filter.matches(k) {
                        let _ = tx.send(WatchMsg::Event {
                            kind: "ADDED",
                            object: v.clone(),
                        });
                    }
                }
            }
            Some(rv) if rv < self.compacted => {
                let _ = tx.send(WatchMsg::Error(Failure::gone(format!(
                    "too old resource version: {rv} ({})",
                    self.compacted
                ))));
                return rx;
            }
            Some(rv) => {
                for c in &self.history {
                    if c.rv > rv && c.type_index == type_index && filter.matches(&c.key) {
                        let _ = tx.send(WatchMsg::Event {
                            kind: c.kind,
                            object: c.object.clone(),
                        });
                    }
                }
            }
        }
        self.watchers.push(Watcher {
            type_index,
            filter,
            bookmarks,
            stalled: false,
            tx,
        });
        rx
    }

    /// Sends a BOOKMARK at the current resource version to every watch
    /// that asked for bookmarks (behind every event already sent to it).
    pub fn bookmark(&mut self) {
        let rv = self.rv;
        self.watchers.retain(|w| {
            if !w.bookmarks || w.stalled {
                return !w.tx.is_closed();
            }
            w.tx.send(WatchMsg::Bookmark(rv)).is_ok()
        });
    }

    /// Open watches stop receiving changes (new ones still do): they have
    /// fallen behind, until [`Store::expire_watches`] ends them.
    pub fn stall_watches(&mut self) {
        for w in &mut self.watchers {
            w.stalled = true;
        }
    }

    /// Compacts and ends every open watch with `410 Gone`, as a real API
    /// server does to watchers that fell behind its watch cache; changes
    /// they were not sent are never sent.
    pub fn expire_watches(&mut self) -> u64 {
        let rv = self.compact();
        for w in self.watchers.drain(..) {
            let _ = w.tx.send(WatchMsg::Error(Failure::gone(format!(
                "too old resource version: the watch cache was compacted at {rv}"
            ))));
        }
        rv
    }

    /// Ends every open watch (their connections are being dropped).
    pub fn close_watches(&mut self) {
        self.watchers.clear();
    }

    /// Ends every watch and refuses reads and watches from now on (the
    /// server is stopping: a request already accepted must not see what
    /// changes after it), until [`Store::welcome`].
    pub fn refuse(&mut self) {
        self.refusing = true;
        self.watchers.clear();
    }

    pub fn welcome(&mut self) {
        self.refusing = false;
    }

    /// The failure a read gets while refusing.
    pub fn refused(&self) -> Option<Failure> {
        self.refusing
            .then(|| Failure::new(503, "ServiceUnavailable", "the API server is stopping"))
    }

    pub fn open_watches(&self) -> usize {
        self.watchers.iter().filter(|w| !w.tx.is_closed()).count()
    }
}

fn encode_continue(rv: u64, last: &Key) -> String {
    // Opaque to clients; readable in a test's failure output.
    let text = json!({"rv": rv, "ns": last.0, "name": last.1}).to_string();
    text.bytes().map(|b| format!("{b:02x}")).collect()
}

fn decode_continue(token: &str) -> Result<(u64, Key), Failure> {
    let bad = || Failure::bad_request(format!("continue key {token:?} is not valid"));
    if !token.len().is_multiple_of(2) {
        return Err(bad());
    }
    let bytes: Vec<u8> = (0..token.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&token[i..i + 2], 16))
        .collect::<Result<_, _>>()
        .map_err(|_| bad())?;
    let v: Value = serde_json::from_slice(&bytes).map_err(|_| bad())?;
    let rv = v["rv"].as_u64().ok_or_else(bad)?;
    let ns = v["ns"].as_str().ok_or_else(bad)?.to_owned();
    let name = v["name"].as_str().ok_or_else(bad)?.to_owned();
    Ok((rv, (ns, name)))
}

/// Now as RFC 3339 in UTC, to the second (Kubernetes' `Time`).
pub fn now_rfc3339() -> String {
    rfc3339(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
    )
}

/// Seconds since the epoch as `YYYY-MM-DDTHH:MM:SSZ`.
pub fn rfc3339(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's civil-from-days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ns(name: &str) -> Value {
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
    }

    fn pod(name: &str, ip: &str) -> Value {
        json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
               "spec": {"containers": [{"name": "c"}]},
               "status": {"podIP": ip, "phase": "Running"}})
    }

    #[test]
    fn dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_700_000_000), "2023-11-14T22:13:20Z");
    }

    #[test]
    fn pod_status_only_through_the_subresource() {
        let mut s = Store::default();
        assert_eq!(
            s.create(1, Some("a"), pod("p", "198.18.0.1"))
                .unwrap_err()
                .code,
            404,
            "no namespace a yet"
        );
        s.create(0, None, ns("a")).unwrap();
        let created = s.create(1, Some("a"), pod("p", "198.18.0.1")).unwrap();
        assert_eq!(created["status"], json!({"phase": "Pending"}));
        let replaced = s
            .replace(1, Some("a"), "p", pod("p", "198.18.0.2"), false)
            .unwrap();
        assert_eq!(replaced["status"], json!({"phase": "Pending"}));
        assert_eq!(replaced, created, "status ignored: nothing changed");
        let status = s
            .replace(1, Some("a"), "p", pod("p", "198.18.0.2"), true)
            .unwrap();
        assert_eq!(status["status"]["podIP"], "198.18.0.2");
        let mut stale = pod("p", "198.18.0.3");
        stale["metadata"]["resourceVersion"] = created["metadata"]["resourceVersion"].clone();
        assert_eq!(
            s.replace(1, Some("a"), "p", stale, true).unwrap_err().code,
            409
        );
    }

    #[test]
    fn paginated_lists_are_consistent_and_expire_with_compaction() {
        let mut s = Store::default();
        s.create(0, None, ns("a")).unwrap();
        for i in 0..5 {
            s.create(1, Some("a"), pod(&format!("p{i}"), "198.18.0.1"))
                .unwrap();
        }
        let first = s.list(1, &Filter::default(), Some(2), None).unwrap();
        assert_eq!(first.items.len(), 2);
        assert_eq!(first.remaining, Some(3));
        // Changes after the first page do not show in the rest of it.
        s.delete(1, Some("a"), "p4").unwrap();
        s.create(1, Some("a"), pod("p5", "198.18.0.1")).unwrap();
        let token = first.continue_token.unwrap();
        let second = s
            .list(1, &Filter::default(), Some(10), Some(&token))
            .unwrap();
        let names: Vec<&str> = second
            .items
            .iter()
            .map(|o| o["metadata"]["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["p2", "p3", "p4"]);
        assert_eq!(second.resource_version, first.resource_version);
        s.compact();
        assert_eq!(
            s.list(1, &Filter::default(), Some(10), Some(&token))
                .unwrap_err()
                .code,
            410
        );
    }

    #[test]
    fn watches_replay_from_a_version_and_expire_with_compaction() {
        let mut s = Store::default();
        s.create(0, None, ns("a")).unwrap();
        let from = s.resource_version();
        s.create(1, Some("a"), pod("p", "198.18.0.1")).unwrap();
        s.delete(0, None, "a").unwrap();
        let mut rx = s.watch(1, Filter::default(), Some(from), true);
        let kinds: Vec<&str> = std::iter::from_fn(|| rx.try_recv().ok())
            .map(|m| match m {
                WatchMsg::Event { kind, .. } => kind,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(kinds, ["ADDED", "DELETED"], "the namespace took its pod");
        s.bookmark();
        assert!(matches!(rx.try_recv(), Ok(WatchMsg::Bookmark(rv)) if rv == s.resource_version()));
        s.compact();
        let mut old = s.watch(1, Filter::default(), Some(from), true);
        assert!(matches!(old.try_recv(), Ok(WatchMsg::Error(f)) if f.code == 410));
    }
}
