//! The etcd v3 datastore, in Calico's layout
//! (`/calico/resources/v3/projectcalico.org/<plural>/[<ns>/]<name>`, values
//! the JSON of the whole v3 object).
//!
//! [`run`] keeps one stream of [`Update`]s in step with etcd:
//!
//! 1. LIST the prefix in pages at one revision R (the first page's header
//!    revision) and send an `Upsert` per decodable value, an `Invalid` per
//!    bad one (keys outside the layout are ignored, logged at debug), then
//!    `InSync { R }`;
//! 2. WATCH the prefix from R+1 and send every change;
//! 3. when the watch is cancelled by a compaction, or the watch/connection
//!    breaks, send `Disconnected`, wait (exponential backoff, jittered,
//!    bounded; none after a compaction), reconnect and go to 1 — RELIST, and
//!    RECONCILE against what was sent before: keys whose mod revision did not
//!    change are not sent again, changed ones are, and every key sent before
//!    that is gone gets a `Delete` — so deletions made while disconnected are
//!    never lost. Then `InSync` again.
//!
//! The source keeps, for that, the last-sent key → mod revision map.
//!
//! **An empty etcd is never taken for an empty cluster.** A LIST that finds
//! no Calico resource under the prefix at all (a new etcd the controller has
//! not written yet, a wiped one restarted empty, the wrong endpoint) sends
//! no `Delete` and no `InSync`: it sends `Disconnected` saying why (the agent
//! keeps the dataplane it has and reports itself not ready) and watches the
//! prefix for the first write, then lists again (after a wipe, once the
//! writes paused: [`REFILL_QUIET`]). A real cluster always has
//! resources (at least the Profiles of its namespaces), so nothing legitimate
//! is held back; deletions that arrive as watch events are applied as usual.
//! A snapshot whose revision is lower than one seen before comes from a
//! replaced store (restored, or recreated): every value is compared again,
//! not only those whose mod revision changed.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::time::Duration;

use etcd_client::{
    Certificate, Client, ConnectOptions, EventType, GetOptions, Identity, TlsOptions, WatchOptions,
    WatchStream,
};
use model::calico::{Resource, ResourceKey, ETCD_PREFIX};
use tokio::sync::mpsc;

use crate::Update;

/// Where etcd is and how to authenticate to it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EtcdConfig {
    /// `host:port` (plain HTTP, or HTTPS when TLS files are given),
    /// `http://host:port` or `https://host:port`.
    pub endpoints: Vec<String>,
    /// `--etcd-ca`: the CA that signed the servers' certificates.
    pub ca: Option<PathBuf>,
    /// `--etcd-cert`, `--etcd-key`: the client certificate and its key.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

/// Why the etcd source or a connection could not be set up.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EtcdError {
    #[error("etcd URL {url:?}: {reason}")]
    Url { url: String, reason: String },
    #[error("etcd TLS: {reason}")]
    Tls { reason: String },
    #[error("connecting to etcd at {endpoints}: {reason}")]
    Connect { endpoints: String, reason: String },
}

pub const DEFAULT_PORT: u16 = 2379;

impl EtcdConfig {
    /// Parses `--etcd`: a comma-separated list of endpoints, e.g.
    /// `etcd://host:2379,host2:2379` (HTTP, or HTTPS when TLS files are
    /// configured), `etcds://host:2379,host2` (HTTPS),
    /// `http://host:2379,http://host2:2379` or `https://…`. A scheme given on
    /// the first endpoint applies to the following ones that have none; the
    /// port defaults to 2379.
    pub fn from_url(url: &str) -> Result<EtcdConfig, EtcdError> {
        let bad = |reason: &str| EtcdError::Url {
            url: url.to_owned(),
            reason: reason.to_owned(),
        };
        let mut scheme = "";
        let mut endpoints = Vec::new();
        for part in url.split(',').map(str::trim) {
            if part.is_empty() {
                return Err(bad("empty endpoint"));
            }
            let rest = match part.split_once("://") {
                Some((s, rest)) => {
                    scheme = match s {
                        "etcd" => "",
                        "etcds" | "https" => "https://",
                        "http" => "http://",
                        other => {
                            return Err(bad(&format!(
                                "unknown scheme {other:?} (etcd, etcds, http, https)"
                            )))
                        }
                    };
                    rest
                }
                None => part,
            };
            let host_port = rest.trim_end_matches('/');
            if host_port.is_empty() || host_port.contains('/') || host_port.contains('@') {
                return Err(bad(&format!("{part:?} is not host[:port]")));
            }
            let has_port = match host_port.rsplit_once(':') {
                // `[::1]` alone is a bracketed IPv6 address without port.
                Some((h, p)) if !p.ends_with(']') => {
                    if h.is_empty() || p.parse::<u16>().map_or(true, |p| p == 0) {
                        return Err(bad(&format!("{part:?}: bad port {p:?}")));
                    }
                    true
                }
                _ => false,
            };
            let host_port = if has_port {
                host_port.to_owned()
            } else {
                format!("{host_port}:{DEFAULT_PORT}")
            };
            endpoints.push(format!("{scheme}{host_port}"));
        }
        Ok(EtcdConfig {
            endpoints,
            ..Default::default()
        })
    }

    /// The same endpoints, with TLS files (`--etcd-ca`, `--etcd-cert`,
    /// `--etcd-key`).
    pub fn with_tls(
        mut self,
        ca: Option<PathBuf>,
        cert: Option<PathBuf>,
        key: Option<PathBuf>,
    ) -> EtcdConfig {
        self.ca = ca;
        self.cert = cert;
        self.key = key;
        self
    }

    fn uses_tls(&self) -> bool {
        self.ca.is_some() || self.cert.is_some() || self.key.is_some()
    }

    /// The TLS options from the configured files (read now), if any.
    fn tls_options(&self) -> Result<Option<TlsOptions>, EtcdError> {
        let read = |what: &str, p: &PathBuf| {
            std::fs::read(p).map_err(|e| EtcdError::Tls {
                reason: format!("reading {what} {}: {e}", p.display()),
            })
        };
        if !self.uses_tls() {
            if let Some(e) = self.endpoints.iter().find(|e| e.starts_with("https://")) {
                return Err(EtcdError::Tls {
                    reason: format!("endpoint {e} is HTTPS but no CA (--etcd-ca) is given"),
                });
            }
            return Ok(None);
        }
        let Some(ca) = &self.ca else {
            return Err(EtcdError::Tls {
                reason: "a client certificate needs the CA (--etcd-ca) too".into(),
            });
        };
        if let Some(e) = self.endpoints.iter().find(|e| e.starts_with("http://")) {
            return Err(EtcdError::Tls {
                reason: format!("endpoint {e} is plain HTTP but TLS files are given"),
            });
        }
        let mut tls = TlsOptions::new().ca_certificate(Certificate::from_pem(read("CA", ca)?));
        match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => {
                tls = tls.identity(Identity::from_pem(
                    read("certificate", cert)?,
                    read("key", key)?,
                ));
            }
            (None, None) => {}
            _ => {
                return Err(EtcdError::Tls {
                    reason: "--etcd-cert and --etcd-key go together".into(),
                })
            }
        }
        Ok(Some(tls))
    }

    /// A client for these endpoints. No I/O happens yet: etcd-client
    /// connects lazily, so an unreachable cluster shows on the first request.
    pub async fn connect(&self, options: &EtcdOptions) -> Result<Client, EtcdError> {
        if self.endpoints.is_empty() {
            return Err(EtcdError::Url {
                url: String::new(),
                reason: "no endpoints".into(),
            });
        }
        let mut opts = ConnectOptions::new()
            .with_connect_timeout(options.request_timeout)
            // Pings only while a stream (our watch) is open: etcd's
            // enforcement policy (PermitWithoutStream=false, MinTime 5 s)
            // answers idle or faster pings with GOAWAY "too_many_pings".
            .with_keep_alive(options.keep_alive.0, options.keep_alive.1)
            .with_keep_alive_while_idle(false)
            // A member cut off from the leader cancels our watch instead of
            // silently serving a stale one.
            .with_require_leader(true);
        if let Some(tls) = self.tls_options()? {
            opts = opts.with_tls(tls);
        }
        let connect = Client::connect(self.endpoints.clone(), Some(opts));
        match tokio::time::timeout(options.request_timeout, connect).await {
            Ok(Ok(c)) => Ok(c),
            Ok(Err(e)) => Err(EtcdError::Connect {
                endpoints: self.endpoints.join(","),
                reason: explain_failure(e.to_string()),
            }),
            Err(_) => Err(EtcdError::Connect {
                endpoints: self.endpoints.join(","),
                reason: format!("timed out after {:?}", options.request_timeout),
            }),
        }
    }
}

/// Tuning of the etcd source; the defaults suit production.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdOptions {
    /// First and longest wait between reconnection attempts.
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// Bound on each request (and on waiting for a connection).
    pub request_timeout: Duration,
    /// HTTP/2 keep-alive ping interval and timeout: how fast a silently dead
    /// connection under the watch is noticed. Keep the interval ≥ 5 s (etcd's
    /// default `--grpc-keepalive-min-time`).
    pub keep_alive: (Duration, Duration),
    /// Keys per page of the LIST.
    pub page_size: i64,
    /// Largest gRPC message accepted (one LIST page, one watch response).
    pub max_message_size: usize,
}

impl Default for EtcdOptions {
    fn default() -> Self {
        EtcdOptions {
            backoff_min: Duration::from_millis(200),
            backoff_max: Duration::from_secs(15),
            request_timeout: Duration::from_secs(10),
            keep_alive: (Duration::from_secs(10), Duration::from_secs(5)),
            page_size: 5000,
            max_message_size: 64 << 20,
        }
    }
}

/// Exponential backoff with "equal jitter": the n-th wait is uniformly
/// drawn from [d/2, d] with d = min(max, min·2ⁿ).
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Backoff {
        Backoff {
            min,
            max: max.max(min),
            attempt: 0,
        }
    }

    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    pub fn next_delay(&mut self) -> Duration {
        let d = self
            .min
            .saturating_mul(1u32 << self.attempt.min(20))
            .min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        d / 2 + d.mul_f64(jitter() / 2.0)
    }
}

/// A uniform number in [0, 1) without a random-number crate: std's
/// `RandomState` is freshly keyed on every call.
fn jitter() -> f64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    (h.finish() >> 11) as f64 / (1u64 << 53) as f64
}

/// The first key after every key starting with `prefix`.
pub(crate) fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// Decodes an etcd value stored at `key`: the resource, which must be the
/// one the key names (a missing `metadata.namespace` is taken from the key).
pub fn decode(key: &ResourceKey, etcd_key: &str, value: &[u8]) -> Result<Resource, String> {
    let mut r = Resource::from_json(etcd_key, value).map_err(|e| e.to_string())?;
    if key.kind.is_namespaced() && r.metadata().namespace.is_none() {
        r.metadata_mut().namespace = key.namespace.clone();
    }
    if &r.key() != key {
        return Err(format!(
            "{etcd_key}: the value is {} but the key names {key}",
            r.key()
        ));
    }
    Ok(r)
}

/// Turns etcd key-values into updates, remembering what was sent: per key
/// in Calico's layout, by its resource key (the etcd key is
/// [`ResourceKey::etcd_key`], and [`ResourceKey::from_etcd_key`] is its
/// inverse), the mod revision last sent — about 50 bytes per object once
/// [`Tracker::compact`] has run, the key's name shared with the state's
/// copy, where the etcd key string, a copy of the resource key and an
/// optional reason cost 250 (issue 18: 60 MiB at 250,000 pods). A B-tree,
/// not a hash map: rebuilt after a LIST its nodes are full, where a hash
/// table of 260,000 keys has 524,288 slots.
#[derive(Debug, Default)]
struct Tracker {
    sent: BTreeMap<ResourceKey, i64>,
    /// Why, for the keys last sent as `Invalid` (few).
    invalid: HashMap<ResourceKey, String>,
}

impl Tracker {
    /// A key's (new) value; nothing if the key is outside the layout or the
    /// same revision was already sent — except that a relist sends the
    /// `Invalid`s again, so every `InSync` follows the full list of keys
    /// still invalid.
    fn put(
        &mut self,
        etcd_key: &[u8],
        value: &[u8],
        mod_revision: i64,
        relist: bool,
    ) -> Vec<Update> {
        let Ok(etcd_key) = std::str::from_utf8(etcd_key) else {
            tracing::debug!(key = ?String::from_utf8_lossy(etcd_key), "ignoring a non-UTF-8 key");
            return vec![];
        };
        let Some(key) = ResourceKey::from_etcd_key(etcd_key) else {
            tracing::debug!(key = etcd_key, "ignoring a key outside Calico's layout");
            return vec![];
        };
        self.put_key(key, etcd_key, value, mod_revision, relist)
    }

    /// [`Tracker::put`] of a key already parsed (`key` is `etcd_key`'s).
    fn put_key(
        &mut self,
        key: ResourceKey,
        etcd_key: &str,
        value: &[u8],
        mod_revision: i64,
        relist: bool,
    ) -> Vec<Update> {
        let prev = self.sent.get(&key).copied();
        if prev == Some(mod_revision) {
            return match (self.invalid.get(&key), relist) {
                (Some(reason), true) => vec![Update::Invalid {
                    key: etcd_key.to_owned(),
                    reason: reason.clone(),
                    revision: mod_revision,
                }],
                _ => vec![],
            };
        }
        let was_valid = prev.is_some() && !self.invalid.contains_key(&key);
        let mut out = Vec::new();
        match decode(&key, etcd_key, value) {
            Ok(resource) => {
                self.invalid.remove(&key);
                self.sent.insert(key.clone(), mod_revision);
                out.push(Update::Upsert {
                    key,
                    resource,
                    revision: mod_revision,
                });
            }
            Err(reason) => {
                tracing::warn!(key = etcd_key, %reason, "skipping an invalid value");
                if was_valid {
                    out.push(Update::Delete {
                        key: key.clone(),
                        revision: mod_revision,
                    });
                }
                out.push(Update::Invalid {
                    key: etcd_key.to_owned(),
                    reason: reason.clone(),
                    revision: mod_revision,
                });
                self.sent.insert(key.clone(), mod_revision);
                self.invalid.insert(key, reason);
            }
        }
        out
    }

    /// Forgets which mod revision each key was sent at (the store was
    /// replaced: equal revisions no longer mean equal values); the next
    /// LIST sends every key again.
    fn forget_revisions(&mut self) {
        for revision in self.sent.values_mut() {
            *revision = -1;
        }
    }

    /// Rebuilds the map with full nodes (after a LIST, whose keys came in
    /// order and left each node about half full).
    fn compact(&mut self) {
        self.sent = std::mem::take(&mut self.sent).into_iter().collect();
    }

    /// A key's deletion (at `revision`).
    fn delete(&mut self, etcd_key: &[u8], revision: i64) -> Option<Update> {
        let key = ResourceKey::from_etcd_key(std::str::from_utf8(etcd_key).ok()?)?;
        self.forget(key, revision)
    }

    /// The deletion of `key` (at `revision`), if it was sent.
    fn forget(&mut self, key: ResourceKey, revision: i64) -> Option<Update> {
        self.sent.remove(&key)?;
        self.invalid.remove(&key);
        Some(Update::Delete { key, revision })
    }
}

/// How one LIST+WATCH round ended.
enum End {
    /// The receiver is gone: stop.
    Closed,
    /// The watch fell behind a compaction: relist at once.
    Compacted(String),
    /// The request, the watch or the connection failed: back off, reconnect.
    Broken(String),
    /// The LIST at this revision found no Calico resource at all.
    Empty(i64),
}

/// Why an empty etcd is not programmed (the `Disconnected` reason).
pub const EMPTY_REASON: &str = "etcd holds no Calico resource under /calico/resources/v3/ \
     (a new etcd not written yet, a wiped one, or the wrong endpoint?); an empty datastore \
     is never programmed: keeping the last state until it holds resources again";

struct Source {
    tx: mpsc::Sender<Update>,
    options: EtcdOptions,
    tracker: Tracker,
    /// The highest revision seen (snapshots and watch events).
    revision: i64,
}

impl Source {
    async fn send_all(&self, updates: impl IntoIterator<Item = Update>) -> Result<(), End> {
        for u in updates {
            self.tx.send(u).await.map_err(|_| End::Closed)?;
        }
        Ok(())
    }

    /// LIST and reconcile; returns the snapshot revision.
    async fn resync(&mut self, client: &Client) -> Result<i64, End> {
        let mut kv = client
            .kv_client()
            .max_decoding_message_size(self.options.max_message_size);
        let prefix = ETCD_PREFIX.as_bytes();
        let end = prefix_end(prefix);
        let mut start = prefix.to_vec();
        let mut revision = 0;
        // The keys listed in Calico's layout (the others were never sent).
        let mut seen: HashSet<ResourceKey> = HashSet::new();
        // Whether any key is a Calico resource (nothing was sent if not).
        let mut known = false;
        loop {
            let opts = GetOptions::new()
                .with_range(end.clone())
                .with_limit(self.options.page_size)
                .with_revision(revision);
            let get = kv.get(start.clone(), Some(opts));
            let resp = match tokio::time::timeout(self.options.request_timeout, get).await {
                Ok(Ok(r)) => r,
                Ok(Err(e)) => return Err(End::Broken(format!("listing {ETCD_PREFIX}: {e}"))),
                Err(_) => {
                    return Err(End::Broken(format!(
                        "listing {ETCD_PREFIX}: no answer within {:?}",
                        self.options.request_timeout
                    )))
                }
            };
            if revision == 0 {
                revision = resp.header().map_or(0, |h| h.revision());
                if revision < self.revision {
                    tracing::warn!(
                        revision,
                        seen = self.revision,
                        "etcd's revision went back (a restored or recreated etcd); \
                         comparing every value again"
                    );
                    self.tracker.forget_revisions();
                    self.revision = revision;
                }
            }
            let mut last = None;
            for kv in resp.kvs() {
                last = Some(kv.key().to_vec());
                // Parsed once: the key is both listed and tracked.
                let parsed = std::str::from_utf8(kv.key())
                    .ok()
                    .and_then(|k| ResourceKey::from_etcd_key(k).map(|key| (k, key)));
                let updates = match parsed {
                    Some((etcd_key, key)) => {
                        known = true;
                        seen.insert(key.clone());
                        self.tracker
                            .put_key(key, etcd_key, kv.value(), kv.mod_revision(), true)
                    }
                    // Logged and skipped by `put`.
                    None => self
                        .tracker
                        .put(kv.key(), kv.value(), kv.mod_revision(), true),
                };
                self.send_all(updates).await?;
            }
            match (resp.more(), last) {
                (true, Some(mut last)) => {
                    last.push(0);
                    start = last;
                }
                _ => break,
            }
        }
        if !known {
            return Err(End::Empty(revision));
        }
        self.revision = self.revision.max(revision);
        let gone: Vec<ResourceKey> = self
            .tracker
            .sent
            .keys()
            .filter(|k| !seen.contains(*k))
            .cloned()
            .collect();
        drop(seen);
        for k in gone {
            let update = self.tracker.forget(k, revision);
            self.send_all(update).await?;
        }
        self.tracker.compact();
        self.send_all([Update::InSync { revision }]).await?;
        tracing::info!(revision, keys = self.tracker.sent.len(), "etcd in sync");
        Ok(revision)
    }

    /// Starts a WATCH of the prefix from revision `from`.
    async fn start_watch(&self, client: &Client, from: i64) -> Result<WatchStream, End> {
        let mut wc = client
            .watch_client()
            .max_decoding_message_size(self.options.max_message_size);
        let opts = WatchOptions::new().with_prefix().with_start_revision(from);
        let start = wc.watch(ETCD_PREFIX, Some(opts));
        match tokio::time::timeout(self.options.request_timeout, start).await {
            Ok(Ok(s)) => Ok(s),
            Ok(Err(e)) => Err(End::Broken(format!("starting the watch: {e}"))),
            Err(_) => Err(End::Broken(format!(
                "starting the watch: no answer within {:?}",
                self.options.request_timeout
            ))),
        }
    }

    /// WATCH from `from` until something ends it.
    async fn watch(&mut self, client: &Client, from: i64, backoff: &mut Backoff) -> End {
        let mut stream = match self.start_watch(client, from).await {
            Ok(s) => s,
            Err(end) => return end,
        };
        loop {
            let msg = tokio::select! {
                m = stream.message() => m,
                _ = self.tx.closed() => return End::Closed,
            };
            let resp = match msg {
                Ok(Some(r)) => r,
                Ok(None) => return End::Broken("the watch stream was closed".into()),
                Err(e) => return End::Broken(format!("watch: {e}")),
            };
            if resp.compact_revision() > 0 {
                return End::Compacted(format!(
                    "watch from revision {from} fell behind the compaction at revision {}",
                    resp.compact_revision()
                ));
            }
            if resp.canceled() {
                return End::Broken(format!("watch cancelled: {}", resp.cancel_reason()));
            }
            if resp.created() {
                backoff.reset();
            }
            for ev in resp.events() {
                let Some(kv) = ev.kv() else { continue };
                self.revision = self.revision.max(kv.mod_revision());
                let updates = match ev.event_type() {
                    EventType::Put => {
                        self.tracker
                            .put(kv.key(), kv.value(), kv.mod_revision(), false)
                    }
                    EventType::Delete => self
                        .tracker
                        .delete(kv.key(), kv.mod_revision())
                        .into_iter()
                        .collect(),
                };
                if self.send_all(updates).await.is_err() {
                    return End::Closed;
                }
            }
        }
    }
}

/// After an empty etcd receives its first write, if this source had sent
/// resources before (a wiped store being refilled, not a new one), the LIST
/// waits until writes paused this long, so that a controller re-populating
/// the store is not caught half-way (profiles without their endpoints would
/// drop those pods)…
pub const REFILL_QUIET: Duration = Duration::from_millis(500);
/// …or until this long after the first write.
pub const REFILL_MAX: Duration = Duration::from_secs(10);

impl Source {
    /// After an empty LIST at `revision`: waits for writes under the prefix
    /// to start (and, when refilling, to pause: [`REFILL_QUIET`], at most
    /// [`REFILL_MAX`]), then asks for a LIST (as after a compaction).
    async fn await_resources(&mut self, client: &Client, revision: i64) -> End {
        let refilling = !self.tracker.sent.is_empty();
        let mut stream = match self.start_watch(client, revision + 1).await {
            Ok(s) => s,
            Err(end) => return end,
        };
        let refill = || End::Compacted("etcd holds resources again; listing them".into());
        let mut first_write: Option<tokio::time::Instant> = None;
        loop {
            // Before the first write: no bound (an empty store may stay so).
            let wait = match first_write {
                None => Duration::MAX,
                Some(at) => {
                    let left =
                        (at + REFILL_MAX).saturating_duration_since(tokio::time::Instant::now());
                    if left.is_zero() {
                        return refill();
                    }
                    left.min(REFILL_QUIET)
                }
            };
            let msg = tokio::select! {
                m = tokio::time::timeout(wait, stream.message()) => m,
                _ = self.tx.closed() => return End::Closed,
            };
            match msg {
                Err(_) => return refill(),
                Ok(Ok(Some(r))) if r.compact_revision() > 0 => return refill(),
                Ok(Ok(Some(r))) if r.canceled() => {
                    return End::Broken(format!("watch cancelled: {}", r.cancel_reason()))
                }
                Ok(Ok(Some(r))) if r.events().is_empty() => {}
                Ok(Ok(Some(_))) if !refilling => return refill(),
                Ok(Ok(Some(_))) => {
                    first_write.get_or_insert_with(tokio::time::Instant::now);
                }
                Ok(Ok(None)) => return End::Broken("the watch stream was closed".into()),
                Ok(Err(e)) => return End::Broken(format!("watch: {e}")),
            }
        }
    }
}

/// Runs the etcd source with the default [`EtcdOptions`] until the receiver
/// is dropped. Fails only on configuration that cannot work (bad TLS files).
pub async fn run(cfg: EtcdConfig, tx: mpsc::Sender<Update>) -> Result<(), EtcdError> {
    run_with(cfg, EtcdOptions::default(), tx).await
}

/// [`run`] with explicit options.
pub async fn run_with(
    cfg: EtcdConfig,
    options: EtcdOptions,
    tx: mpsc::Sender<Update>,
) -> Result<(), EtcdError> {
    // Fatal configuration errors surface now, not as an endless retry.
    cfg.tls_options()?;
    let mut backoff = Backoff::new(options.backoff_min, options.backoff_max);
    let mut source = Source {
        tx,
        options,
        tracker: Tracker::default(),
        revision: 0,
    };
    let mut client: Option<Client> = None;
    loop {
        let end = 'round: {
            let c = match &client {
                Some(c) => c.clone(),
                None => match cfg.connect(&source.options).await {
                    Ok(c) => {
                        client = Some(c.clone());
                        c
                    }
                    Err(e @ (EtcdError::Url { .. } | EtcdError::Tls { .. })) => return Err(e),
                    Err(e) => break 'round End::Broken(e.to_string()),
                },
            };
            let revision = match source.resync(&c).await {
                Ok(r) => r,
                Err(End::Empty(revision)) => {
                    tracing::warn!(revision, reason = EMPTY_REASON, "etcd is empty");
                    let empty = Update::Disconnected {
                        reason: EMPTY_REASON.into(),
                    };
                    if source.tx.send(empty).await.is_err() {
                        return Ok(());
                    }
                    break 'round source.await_resources(&c, revision).await;
                }
                Err(end) => break 'round end,
            };
            source.watch(&c, revision + 1, &mut backoff).await
        };
        let reason = match end {
            End::Closed => return Ok(()),
            End::Compacted(reason) => reason,
            // (Returned by the LIST only, and handled there.)
            End::Empty(_) => EMPTY_REASON.to_owned(),
            End::Broken(reason) => {
                // A fresh client: a new connection to whichever endpoint
                // answers.
                client = None;
                explain_failure(reason)
            }
        };
        tracing::warn!(%reason, "etcd disconnected; relisting");
        if source
            .tx
            .send(Update::Disconnected {
                reason: reason.clone(),
            })
            .await
            .is_err()
        {
            return Ok(());
        }
        if client.is_none() {
            let delay = backoff.next_delay();
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = source.tx.closed() => return Ok(()),
            }
        }
    }
}

/// Said after a connection failure that is a TLS problem.
const TLS_HINT: &str = "a TLS problem: check --etcd-ca (the CA that signed etcd's \
     certificate), --etcd-cert and --etcd-key (the client certificate etcd asks for)";

/// A connection failure's reason as the user reads it: rustls's alerts
/// ("received fatal alert: BadCertificate", "invalid peer certificate:
/// UnknownIssuer", ...) say nothing of which flags to look at, so a TLS
/// failure gets [`TLS_HINT`] appended (once).
fn explain_failure(reason: String) -> String {
    let lower = reason.to_lowercase();
    let tls = [
        "alert",
        "certificate",
        "unknownissuer",
        "unknownca",
        "handshake",
        "rustls",
    ]
    .iter()
    .any(|word| lower.contains(word));
    if !tls || reason.contains(TLS_HINT) {
        return reason;
    }
    format!("{reason} ({TLS_HINT})")
}

#[cfg(test)]
#[path = "../tests/common/mod.rs"]
mod test_etcd;

#[cfg(test)]
mod tests {
    use super::*;

    /// A watch that fell behind a compaction ends as `Compacted`; the relist
    /// after it reconciles: the key deleted meanwhile gets its `Delete`.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn compacted_watch_then_relist_reconciles() {
        let etcd = test_etcd::Etcd::start().await;
        let mut c = etcd.client().await;
        let k = |n: &str| format!("{ETCD_PREFIX}profiles/{n}");
        let value = |n: &str, l: &str| {
            format!(
                r#"{{"apiVersion":"projectcalico.org/v3","kind":"Profile","metadata":{{"name":"{n}","labels":{{"l":"{l}"}}}}}}"#
            )
        };
        c.put(k("a"), value("a", "0"), None).await.unwrap();
        c.put(k("b"), value("b", "0"), None).await.unwrap();
        let (tx, mut rx) = mpsc::channel(64);
        let mut source = Source {
            tx,
            options: EtcdOptions::default(),
            tracker: Tracker::default(),
            revision: 0,
        };
        let client = EtcdConfig::from_url(&etcd.endpoint())
            .unwrap()
            .connect(&source.options)
            .await
            .unwrap();
        let r = source.resync(&client).await.ok().unwrap();
        let mut first = vec![];
        while let Ok(u) = rx.try_recv() {
            first.push(u);
        }
        assert_eq!(first.len(), 3, "{first:?}");

        c.delete(k("a"), None).await.unwrap();
        let changed = c.put(k("b"), value("b", "1"), None).await.unwrap();
        let latest = changed.header().unwrap().revision();
        c.compact(latest, None).await.unwrap();

        let mut backoff = Backoff::new(Duration::from_millis(1), Duration::from_millis(2));
        match source.watch(&client, r + 1, &mut backoff).await {
            End::Compacted(reason) => assert!(
                reason.contains(&format!("compaction at revision {latest}")),
                "{reason}"
            ),
            End::Broken(reason) => panic!("broken: {reason}"),
            End::Closed => panic!("closed"),
            End::Empty(r) => panic!("empty at {r}"),
        }
        assert!(
            rx.try_recv().is_err(),
            "nothing sent by the cancelled watch"
        );

        assert_eq!(source.resync(&client).await.ok(), Some(latest));
        let mut second = vec![];
        while let Ok(u) = rx.try_recv() {
            second.push(u);
        }
        let a = model::calico::ResourceKey::new(model::calico::Kind::Profile, None, "a");
        let b = model::calico::ResourceKey::new(model::calico::Kind::Profile, None, "b");
        assert!(
            matches!(&second[0], Update::Upsert { key, revision, .. } if key == &b && *revision == latest),
            "{second:?}"
        );
        assert_eq!(
            second[1],
            Update::Delete {
                key: a,
                revision: latest
            }
        );
        assert_eq!(second[2], Update::InSync { revision: latest });
        assert_eq!(second.len(), 3);
    }

    #[test]
    fn urls() {
        let c = EtcdConfig::from_url("etcd://a:2379,b:2380,c").unwrap();
        assert_eq!(c.endpoints, ["a:2379", "b:2380", "c:2379"]);
        let c = EtcdConfig::from_url("etcds://a,https://b:1").unwrap();
        assert_eq!(c.endpoints, ["https://a:2379", "https://b:1"]);
        let c = EtcdConfig::from_url("http://127.0.0.1:2379, 127.0.0.2").unwrap();
        assert_eq!(
            c.endpoints,
            ["http://127.0.0.1:2379", "http://127.0.0.2:2379"]
        );
        let c = EtcdConfig::from_url("etcd://[::1]:2379,[::1]").unwrap();
        assert_eq!(c.endpoints, ["[::1]:2379", "[::1]:2379"]);
        for bad in [
            "",
            "ftp://a",
            "etcd://a:x",
            "etcd://a,,b",
            "etcd://a/b",
            "a:0",
        ] {
            assert!(EtcdConfig::from_url(bad).is_err(), "{bad}");
        }
        let e = EtcdConfig::from_url("etcds://a").unwrap().tls_options();
        assert!(e.unwrap_err().to_string().contains("no CA"));
        let e = EtcdConfig::from_url("http://a")
            .unwrap()
            .with_tls(Some("/nonexistent/ca.pem".into()), None, None)
            .tls_options();
        assert!(e.unwrap_err().to_string().contains("plain HTTP"));
        let e = EtcdConfig::from_url("a")
            .unwrap()
            .with_tls(Some("/nonexistent/ca.pem".into()), None, None)
            .tls_options();
        assert!(e.unwrap_err().to_string().contains("/nonexistent/ca.pem"));
    }

    #[test]
    fn tls_failures_point_at_the_tls_flags_once() {
        for reason in [
            "listing /calico/resources/v3/projectcalico.org/: status: Unavailable, \
             message: \"error trying to connect: received fatal alert: BadCertificate\"",
            "transport error: invalid peer certificate: UnknownIssuer",
            "received fatal alert: CertificateRequired",
            "received fatal alert: UnknownCA",
        ] {
            let said = explain_failure(reason.to_owned());
            assert!(said.starts_with(reason), "{said}");
            assert!(said.contains("TLS problem"), "{said}");
            for flag in ["--etcd-ca", "--etcd-cert", "--etcd-key"] {
                assert!(said.contains(flag), "{said}");
            }
            assert_eq!(explain_failure(said.clone()), said, "hint added twice");
        }
        let refused = "transport error: tcp connect error: Connection refused (os error 111)";
        assert_eq!(explain_failure(refused.to_owned()), refused);
    }

    #[test]
    fn backoff_grows_with_jitter_and_is_bounded() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let d: Vec<Duration> = (0..8).map(|_| b.next_delay()).collect();
        assert!(d[0] >= Duration::from_millis(50) && d[0] <= Duration::from_millis(100));
        assert!(d[3] >= Duration::from_millis(400) && d[3] <= Duration::from_millis(800));
        assert!(d[7] >= Duration::from_millis(500) && d[7] <= Duration::from_secs(1));
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }

    #[test]
    fn prefix_ends() {
        assert_eq!(prefix_end(b"/a/"), b"/a0");
        assert_eq!(prefix_end(b"a\xff"), b"b");
        assert_eq!(prefix_end(b"\xff"), b"\0");
    }

    #[test]
    fn tracker_reconciles_and_never_leaves_a_stale_value() {
        let mut t = Tracker::default();
        let k = "/calico/resources/v3/projectcalico.org/profiles/kns.a";
        let good = br#"{"apiVersion":"projectcalico.org/v3","kind":"Profile","metadata":{"name":"kns.a"}}"#;
        let u = t.put(k.as_bytes(), good, 5, false);
        assert!(matches!(&u[..], [Update::Upsert { revision: 5, .. }]));
        assert!(
            t.put(k.as_bytes(), good, 5, true).is_empty(),
            "same revision"
        );
        let u = t.put(k.as_bytes(), b"{", 6, false);
        assert!(
            matches!(&u[..], [Update::Delete { revision: 6, .. }, Update::Invalid { key, .. }] if key == k),
            "{u:?}"
        );
        let u = t.put(k.as_bytes(), b"[]", 7, false);
        assert!(matches!(&u[..], [Update::Invalid { .. }]), "{u:?}");
        // A relist sends a still-invalid key again.
        assert!(t.put(k.as_bytes(), b"[]", 7, false).is_empty());
        assert!(matches!(
            &t.put(k.as_bytes(), b"[]", 7, true)[..],
            [Update::Invalid { .. }]
        ));
        // A value naming another object is invalid too.
        let other = std::str::from_utf8(good)
            .unwrap()
            .replace("kns.a\"}", "kns.b\"}");
        let u = t.put(k.as_bytes(), other.as_bytes(), 8, false);
        assert!(
            matches!(&u[..], [Update::Invalid { reason, .. }] if reason.contains("Profile kns.b")),
            "{u:?}"
        );
        assert!(t
            .put(
                b"/calico/resources/v3/projectcalico.org/felixconfigurations/default",
                b"{}",
                9,
                false
            )
            .is_empty());
        assert!(t.delete(k.as_bytes(), 10).is_some());
        assert!(t.delete(k.as_bytes(), 11).is_none());
    }
}
