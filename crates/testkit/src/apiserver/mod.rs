//! **A TEST DOUBLE of the Kubernetes API server** — not a Kubernetes API
//! server. No kube-apiserver can be installed on the machines nftpolicy is
//! tested on, so the Kubernetes datastore, the controller and the lab talk
//! to this instead: a stateful fake on 127.0.0.1 (plain HTTP) that speaks
//! enough of the API for `kubectl` and kube-rs:
//!
//! - discovery (`/version`, `/api`, `/apis`, `/api/v1`, `/apis/<group>/<version>`)
//!   for Namespaces, Pods (with the `status` subresource),
//!   networking.k8s.io/v1 NetworkPolicies and coordination.k8s.io/v1 Leases;
//! - get, create (POST), replace (PUT, optimistic concurrency), replace of
//!   a Pod's status (`PUT …/status`; the only way status is written), delete;
//! - lists with `limit` and `continue`, consistent at the first page's
//!   resource version, `410 Gone` once that version is compacted away;
//! - watches from a `resourceVersion` (replaying the changes after it),
//!   `allowWatchBookmarks` (a BOOKMARK every [`Options::bookmark_interval`]),
//!   `timeoutSeconds`, `fieldSelector=metadata.name=…`;
//!   `Accept: …;as=Table` answered with a `meta.k8s.io/v1` Table (what
//!   `kubectl get` prints from);
//! - faults on demand: [`FakeApiServer::compact`] (watches and continue
//!   tokens from before it get `410 Gone`), [`FakeApiServer::drop_connections`]
//!   (every open connection, watches included, is cut),
//!   [`FakeApiServer::stall_watches`] and [`FakeApiServer::expire_watches`]
//!   (watches fall behind, then compaction and `410 Gone` on every open
//!   watch: the changes they missed are found only by relisting),
//!   [`FakeApiServer::stop`] / [`FakeApiServer::resume`] (a restart: nothing
//!   listens in between; the state survives, as a real API server's does in
//!   etcd), [`FakeApiServer::deny`] (RBAC: a 403 naming user, verb and
//!   resource, worded as the real API server words it).
//!
//! See [`store`] for which of a real API server's behaviours it keeps and
//! which it does not (no schema validation: malformed objects are stored
//! as sent, which is how tests make them). Anything checked only against
//! this double is listed as such in the README.

pub mod store;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Frame, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::TestkitError;
pub use store::{Failure, Filter, Store, WatchMsg, TYPES};

/// Tuning of the double.
#[derive(Debug, Clone)]
pub struct Options {
    /// How often watches that asked for bookmarks get one (a real API
    /// server: about once a minute).
    pub bookmark_interval: Duration,
    /// Changes kept for watches; older ones are compacted away on their own.
    pub history: usize,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            bookmark_interval: Duration::from_secs(1),
            history: store::DEFAULT_HISTORY,
        }
    }
}

/// A refused request: `verb` on `resource` (a plural, e.g. `pods`, or
/// `pods/status`) by `user` (any user when `None`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denial {
    pub user: Option<String>,
    pub verb: String,
    pub resource: String,
}

struct Shared {
    store: Mutex<Store>,
    denials: Mutex<Vec<Denial>>,
    /// Plurals answered 404, as for a CRD that is not installed.
    unserved: Mutex<Vec<String>>,
    /// Bumped to cut every open connection.
    generation: tokio::sync::watch::Sender<u64>,
    /// Requests served, by `verb resource` (e.g. `list pods`).
    requests: Mutex<BTreeMap<String, u64>>,
    addr: SocketAddr,
}

impl Shared {
    fn store(&self) -> std::sync::MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The running double; stops (and cuts every connection) on drop. It runs
/// on a thread of its own, so it can be used from synchronous tests and
/// from inside another tokio runtime alike.
pub struct FakeApiServer {
    shared: Arc<Shared>,
    handle: tokio::runtime::Handle,
    /// Stops the accept loop; it answers once the listener is closed.
    accepting: Option<(
        tokio::sync::oneshot::Sender<()>,
        std::sync::mpsc::Receiver<()>,
    )>,
    quit: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// The user a request authenticates as: the bearer token itself (the
/// double's kubeconfigs use the user name as token), else anonymous.
const ANONYMOUS: &str = "system:anonymous";

impl FakeApiServer {
    /// Starts the double on a free port of 127.0.0.1.
    pub fn start() -> Result<FakeApiServer, TestkitError> {
        FakeApiServer::start_on("127.0.0.1:0".parse().expect("literal"), Options::default())
    }

    /// Starts the double on `addr` (port 0: any free port).
    pub fn start_on(addr: SocketAddr, options: Options) -> Result<FakeApiServer, TestkitError> {
        let listener = bind(addr)?;
        let addr = listener
            .local_addr()
            .map_err(|e| TestkitError::io("the fake API server's address", e))?;
        let (handle_tx, handle_rx) = std::sync::mpsc::channel();
        let (quit, quit_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("fake-apiserver".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .thread_name("fake-apiserver")
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = handle_tx.send(Err(e));
                        return;
                    }
                };
                let _ = handle_tx.send(Ok(rt.handle().clone()));
                rt.block_on(async {
                    let _ = quit_rx.await;
                });
                rt.shutdown_timeout(Duration::from_secs(1));
            })
            .map_err(|e| TestkitError::io("starting the fake API server's thread", e))?;
        let handle = handle_rx
            .recv()
            .map_err(|_| TestkitError::Missing("the fake API server's thread died".into()))?
            .map_err(|e| TestkitError::io("starting the fake API server's runtime", e))?;
        let (generation, _) = tokio::sync::watch::channel(0);
        let shared = Arc::new(Shared {
            store: Mutex::new(Store::new(options.history)),
            denials: Mutex::new(Vec::new()),
            unserved: Mutex::new(Vec::new()),
            generation,
            requests: Mutex::new(BTreeMap::new()),
            addr,
        });
        let ticker = shared.clone();
        handle.spawn(async move {
            let mut every = tokio::time::interval(options.bookmark_interval);
            loop {
                every.tick().await;
                ticker.store().bookmark();
            }
        });
        let mut server = FakeApiServer {
            shared,
            handle,
            accepting: None,
            quit: Some(quit),
            thread: Some(thread),
        };
        server.accept(listener);
        Ok(server)
    }

    fn accept(&mut self, listener: std::net::TcpListener) {
        let (stop, stop_rx) = tokio::sync::oneshot::channel();
        let (done_tx, done) = std::sync::mpsc::channel();
        self.handle
            .spawn(accept_loop(listener, self.shared.clone(), stop_rx, done_tx));
        self.accepting = Some((stop, done));
    }

    pub fn addr(&self) -> SocketAddr {
        self.shared.addr
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://{}", self.shared.addr)
    }

    /// Writes a kubeconfig for this server (user `user`, sent as the
    /// bearer token; `None`: anonymous) with the `default` namespace.
    pub fn write_kubeconfig(&self, path: &Path, user: Option<&str>) -> Result<(), TestkitError> {
        write_kubeconfig(path, &self.url(), user)
    }

    /// A kubeconfig for this server as `user`, in a temporary directory
    /// that lives as long as the returned guard.
    pub fn temp_kubeconfig(
        &self,
        user: Option<&str>,
    ) -> Result<(tempfile::TempDir, PathBuf), TestkitError> {
        let dir = tempfile::tempdir().map_err(|e| TestkitError::io("a kubeconfig directory", e))?;
        let path = dir.path().join("kubeconfig");
        self.write_kubeconfig(&path, user)?;
        Ok((dir, path))
    }

    /// Runs `f` on the store (for direct reads and writes by tests; every
    /// change reaches watches as if made over HTTP).
    pub fn with_store<T>(&self, f: impl FnOnce(&mut Store) -> T) -> T {
        f(&mut self.shared.store())
    }

    /// Creates `object` (its `kind` picks the type), or replaces it if it
    /// exists; a Pod's `status` is then written through the subresource.
    /// Returns the resource version after the writes.
    pub fn apply(&self, object: &Value) -> Result<u64, Failure> {
        let (ti, ns, name) = identify(object)?;
        let mut s = self.shared.store();
        let exists = s
            .get(ti, &(ns.clone().unwrap_or_default(), name.clone()))
            .is_ok();
        if exists {
            let mut body = object.clone();
            if let Some(m) = body["metadata"].as_object_mut() {
                m.remove("resourceVersion");
            }
            s.replace(ti, ns.as_deref(), &name, body, false)?;
        } else {
            s.create(ti, ns.as_deref(), object.clone())?;
        }
        if TYPES[ti].status && object.get("status").is_some() {
            s.replace(ti, ns.as_deref(), &name, object.clone(), true)?;
        }
        Ok(s.resource_version())
    }

    /// Deletes the object `object` names (kind, namespace, name).
    pub fn delete(&self, object: &Value) -> Result<u64, Failure> {
        let (ti, ns, name) = identify(object)?;
        let mut s = self.shared.store();
        s.delete(ti, ns.as_deref(), &name)?;
        Ok(s.resource_version())
    }

    pub fn resource_version(&self) -> u64 {
        self.shared.store().resource_version()
    }

    /// Simulates an etcd compaction at the current resource version.
    pub fn compact(&self) -> u64 {
        self.shared.store().compact()
    }

    /// Open watches stop receiving changes, as watchers that fell behind
    /// the API server's watch cache; [`Self::expire_watches`] then ends
    /// them with `410 Gone`, and the changes they missed are never sent.
    pub fn stall_watches(&self) {
        self.shared.store().stall_watches()
    }

    /// Compacts, and ends every open watch with a `410 Gone` event (as a
    /// real API server does when a watcher falls behind its cache).
    pub fn expire_watches(&self) -> u64 {
        self.shared.store().expire_watches()
    }

    /// Cuts every open connection (watches end without a final chunk, as
    /// when a load balancer or the server goes away).
    pub fn drop_connections(&self) {
        self.shared.store().close_watches();
        self.shared.generation.send_modify(|g| *g += 1);
    }

    /// Stops listening and cuts every connection: until [`Self::resume`],
    /// connecting is refused, and so is any read or watch of a connection
    /// accepted before (its task may not have noticed the cut yet: it must
    /// not learn of changes made after the stop).
    pub fn stop(&mut self) {
        if let Some((stop, done)) = self.accepting.take() {
            let _ = stop.send(());
            // Until the listener is closed: nothing may connect after this.
            let _ = done.recv();
        }
        self.shared.store().refuse();
        self.shared.generation.send_modify(|g| *g += 1);
    }

    /// Listens again on the same address after [`Self::stop`].
    pub fn resume(&mut self) -> Result<(), TestkitError> {
        self.shared.store().welcome();
        if self.accepting.is_none() {
            let listener = bind(self.shared.addr)?;
            self.accept(listener);
        }
        Ok(())
    }

    /// Refuses `verb` on `resource` (e.g. `list`, `pods`) for `user`
    /// (every user when `None`) with 403 Forbidden until [`Self::allow_all`].
    pub fn deny(&self, user: Option<&str>, verb: &str, resource: &str) {
        self.shared
            .denials
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Denial {
                user: user.map(str::to_owned),
                verb: verb.to_owned(),
                resource: resource.to_owned(),
            });
    }

    /// Answers every request for `plural` (e.g. `adminnetworkpolicies`)
    /// with 404 Not Found, as a server without that CRD does, until
    /// [`Self::serve_all`].
    pub fn unserve(&self, plural: &str) {
        self.shared
            .unserved
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(plural.to_owned());
    }

    pub fn serve_all(&self) {
        self.shared
            .unserved
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }

    pub fn allow_all(&self) {
        self.shared
            .denials
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }

    /// How many requests of `verb` on `resource` (`list pods`, `watch
    /// networkpolicies`, …) were served, refused ones included.
    pub fn requests(&self, verb: &str, resource: &str) -> u64 {
        self.shared
            .requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&format!("{verb} {resource}"))
            .copied()
            .unwrap_or(0)
    }

    pub fn open_watches(&self) -> usize {
        self.shared.store().open_watches()
    }
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        self.stop();
        if let Some(quit) = self.quit.take() {
            let _ = quit.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A listening socket on `addr` (re-binding a port just closed works:
/// SO_REUSEADDR).
fn bind(addr: SocketAddr) -> Result<std::net::TcpListener, TestkitError> {
    let what = || format!("binding the fake API server to {addr}");
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        None,
    )
    .map_err(|e| TestkitError::io(what(), e))?;
    socket
        .set_reuse_address(true)
        .map_err(|e| TestkitError::io(what(), e))?;
    socket
        .bind(&addr.into())
        .map_err(|e| TestkitError::io(what(), e))?;
    socket
        .listen(1024)
        .map_err(|e| TestkitError::io(what(), e))?;
    socket
        .set_nonblocking(true)
        .map_err(|e| TestkitError::io(what(), e))?;
    Ok(socket.into())
}

/// Writes a kubeconfig naming `server` (user `user` as bearer token, or
/// anonymous).
pub fn write_kubeconfig(path: &Path, server: &str, user: Option<&str>) -> Result<(), TestkitError> {
    let user_entry = match user {
        Some(u) => format!("- name: test-double-user\n  user:\n    token: \"{u}\"\n"),
        None => "- name: test-double-user\n  user: {}\n".to_owned(),
    };
    let text = format!(
        "# kubeconfig for nftpolicy's fake API server (a TEST DOUBLE, not a cluster)\n\
         apiVersion: v1\n\
         kind: Config\n\
         clusters:\n\
         - name: nftpolicy-test-double\n  cluster:\n    server: {server}\n\
         users:\n{user_entry}\
         contexts:\n\
         - name: nftpolicy-test-double\n  context:\n    cluster: nftpolicy-test-double\n    user: test-double-user\n    namespace: default\n\
         current-context: nftpolicy-test-double\n"
    );
    std::fs::write(path, text).map_err(|e| TestkitError::io(path.display().to_string(), e))
}

/// The type, namespace and name an object names.
fn identify(object: &Value) -> Result<(usize, Option<String>, String), Failure> {
    let kind = object["kind"].as_str().unwrap_or("");
    let api_version = object["apiVersion"].as_str().unwrap_or("");
    let ti = TYPES
        .iter()
        .position(|t| t.kind == kind && t.api_version() == api_version)
        .ok_or_else(|| {
            Failure::bad_request(format!(
                "the test double does not serve {api_version}/{kind}"
            ))
        })?;
    let name = object["metadata"]["name"].as_str().unwrap_or("").to_owned();
    let ns = TYPES[ti].namespaced.then(|| {
        object["metadata"]["namespace"]
            .as_str()
            .unwrap_or("default")
            .to_owned()
    });
    Ok((ti, ns, name))
}

async fn accept_loop(
    listener: std::net::TcpListener,
    shared: Arc<Shared>,
    mut stop: tokio::sync::oneshot::Receiver<()>,
    done: std::sync::mpsc::Sender<()>,
) {
    let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
        let _ = done.send(());
        return;
    };
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = &mut stop => break,
        };
        let Ok((stream, _)) = accepted else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let shared = shared.clone();
        let mut generation = shared.generation.subscribe();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let shared = shared.clone();
                async move { Ok::<_, Infallible>(handle(&shared, req).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            tokio::select! {
                _ = conn => {}
                // Dropping the connection closes the socket mid-response.
                _ = generation.changed() => {}
            }
        });
    }
    drop(listener);
    let _ = done.send(());
}

type Reply = Response<ReplyBody>;

/// A whole JSON body, or a watch stream.
enum ReplyBody {
    Full(Full<Bytes>),
    Watch(WatchBody),
}

impl Body for ReplyBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.get_mut() {
            ReplyBody::Full(b) => Pin::new(b).poll_frame(cx),
            ReplyBody::Watch(w) => w.poll(cx),
        }
    }
}

/// A watch response: one JSON event per line, until the timeout, an ERROR
/// event, or the connection being cut.
struct WatchBody {
    rx: mpsc::UnboundedReceiver<WatchMsg>,
    timeout: Pin<Box<tokio::time::Sleep>>,
    ty: &'static store::ResourceType,
    table: bool,
    done: bool,
}

impl WatchBody {
    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.done || std::future::Future::poll(self.timeout.as_mut(), cx).is_ready() {
            return Poll::Ready(None);
        }
        let msg = match self.rx.poll_recv(cx) {
            Poll::Ready(Some(m)) => m,
            Poll::Ready(None) => return Poll::Ready(None),
            Poll::Pending => return Poll::Pending,
        };
        let event = match msg {
            WatchMsg::Event { kind, object } => {
                let object = if self.table {
                    to_table(self.ty, &[object], None)
                } else {
                    (*object).clone()
                };
                json!({"type": kind, "object": object})
            }
            WatchMsg::Bookmark(rv) => json!({
                "type": "BOOKMARK",
                "object": {
                    "kind": self.ty.kind,
                    "apiVersion": self.ty.api_version(),
                    "metadata": {"resourceVersion": rv.to_string(), "creationTimestamp": null},
                },
            }),
            WatchMsg::Error(f) => {
                self.done = true;
                json!({"type": "ERROR", "object": f.status()})
            }
        };
        let mut line = serde_json::to_vec(&event).expect("JSON values serialize");
        line.push(b'\n');
        Poll::Ready(Some(Ok(Frame::data(Bytes::from(line)))))
    }
}

fn json_reply(code: u16, value: &Value) -> Reply {
    let body = serde_json::to_vec(value).expect("JSON values serialize");
    Response::builder()
        .status(StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
        .header("content-type", "application/json")
        .body(ReplyBody::Full(Full::new(Bytes::from(body))))
        .expect("a valid response")
}

fn failure(f: &Failure) -> Reply {
    json_reply(f.code, &f.status())
}

/// What a request is about.
struct Target {
    ti: usize,
    namespace: Option<String>,
    name: Option<String>,
    status: bool,
}

/// Parses `/api/v1/…` or `/apis/<group>/<version>/…` into a target.
fn route(path: &str) -> Option<Target> {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, version, rest) = match segs.as_slice() {
        ["api", v, rest @ ..] => ("", *v, rest),
        ["apis", g, v, rest @ ..] => (*g, *v, rest),
        _ => return None,
    };
    let find = |plural: &str| {
        TYPES
            .iter()
            .position(|t| t.group == group && t.version == version && t.plural == plural)
    };
    let (namespace, rest) = match rest {
        ["namespaces", ns, plural, more @ ..]
            if find(plural).is_some_and(|i| TYPES[i].namespaced) =>
        {
            (Some((*ns).to_owned()), {
                let mut r = vec![*plural];
                r.extend_from_slice(more);
                r
            })
        }
        other => (None, other.to_vec()),
    };
    let ti = find(rest.first()?)?;
    let (name, status) = match &rest[1..] {
        [] => (None, false),
        [name] => (Some((*name).to_owned()), false),
        [name, "status"] if TYPES[ti].status => (Some((*name).to_owned()), true),
        _ => return None,
    };
    Some(Target {
        ti,
        namespace,
        name,
        status,
    })
}

fn query(req: &Request<Incoming>) -> BTreeMap<String, String> {
    req.uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                match std::str::from_utf8(&b[i + 1..i + 3])
                    .ok()
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                {
                    Some(v) => {
                        out.push(v);
                        i += 3;
                    }
                    None => {
                        out.push(b'%');
                        i += 1;
                    }
                }
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

async fn handle(shared: &Shared, req: Request<Incoming>) -> Reply {
    let path = req.uri().path().to_owned();
    match (req.method(), path.as_str()) {
        (&Method::GET, "/version") => return json_reply(200, &version()),
        (&Method::GET, "/api") => {
            return json_reply(
                200,
                &json!({
                    "kind": "APIVersions",
                    "versions": ["v1"],
                    "serverAddressByClientCIDRs": [
                        {"clientCIDR": "0.0.0.0/0", "serverAddress": shared.addr.to_string()}
                    ],
                }),
            )
        }
        (&Method::GET, "/apis") => return json_reply(200, &group_list()),
        (&Method::GET, "/openapi/v3") => return json_reply(200, &openapi_root()),
        (&Method::GET, "/healthz" | "/readyz" | "/livez") => {
            return Response::builder()
                .header("content-type", "text/plain")
                .body(ReplyBody::Full(Full::new(Bytes::from_static(b"ok"))))
                .expect("a valid response")
        }
        _ => {}
    }
    if req.method() == Method::GET {
        if let Some(list) = resource_list(&path) {
            return json_reply(200, &list);
        }
        if let Some(doc) = path
            .strip_prefix("/openapi/v3/")
            .and_then(openapi_group_version)
        {
            return json_reply(200, &doc);
        }
    }
    let Some(target) = route(&path) else {
        return failure(&Failure::new(
            404,
            "NotFound",
            format!("the server could not find the requested resource (the test double serves no {path})"),
        ));
    };
    let q = query(&req);
    let watch = matches!(q.get("watch").map(String::as_str), Some("true" | "1"));
    let t = &TYPES[target.ti];
    let verb = match (req.method().clone(), &target.name, watch) {
        (Method::GET, None, true) => "watch",
        (Method::GET, None, false) => "list",
        (Method::GET, Some(_), _) => "get",
        (Method::POST, None, _) => "create",
        (Method::PUT, Some(_), _) => "update",
        (Method::DELETE, Some(_), _) => "delete",
        (Method::PATCH, Some(_), _) => "patch",
        (m, _, _) => {
            return failure(&Failure::new(
                405,
                "MethodNotAllowed",
                format!("the test double does not support {m} on {path}"),
            ))
        }
    };
    let resource = if target.status {
        format!("{}/status", t.plural)
    } else {
        t.plural.to_owned()
    };
    *shared
        .requests
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .entry(format!("{verb} {resource}"))
        .or_default() += 1;
    if shared
        .unserved
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .any(|p| p == t.plural)
    {
        return failure(&Failure::new(
            404,
            "NotFound",
            "the server could not find the requested resource",
        ));
    }
    let user = req
        .headers()
        .get("authorization")
        .and_then(|h| h.to_str().ok())
        .and_then(|h| h.strip_prefix("Bearer "))
        .unwrap_or(ANONYMOUS)
        .to_owned();
    let denied = shared
        .denials
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .any(|d| {
            d.verb == verb && d.resource == resource && d.user.as_ref().is_none_or(|u| *u == user)
        });
    if denied {
        let scope = match (&target.namespace, t.namespaced) {
            (Some(ns), _) => format!("in the namespace \"{ns}\""),
            (None, _) => "at the cluster scope".to_owned(),
        };
        let named = target
            .name
            .as_ref()
            .map(|n| format!(" \"{n}\""))
            .unwrap_or_default();
        return failure(&Failure::new(
            403,
            "Forbidden",
            format!(
                "{}{named} is forbidden: User \"{user}\" cannot {verb} resource \"{resource}\" in API group \"{}\" {scope}",
                t.resource_name(),
                t.group
            ),
        ));
    }
    let table = req
        .headers()
        .get("accept")
        .and_then(|h| h.to_str().ok())
        .is_some_and(|a| a.contains("as=Table"));
    if verb == "patch" {
        return failure(&Failure::new(
            415,
            "UnsupportedMediaType",
            "the test double does not implement PATCH (use replace)",
        ));
    }
    let body = if matches!(verb, "create" | "update") {
        let bytes = match req.into_body().collect().await {
            Ok(b) => b.to_bytes(),
            Err(e) => return failure(&Failure::bad_request(format!("reading the body: {e}"))),
        };
        match serde_json::from_slice::<Value>(&bytes) {
            Ok(v) => Some(v),
            Err(e) => {
                return failure(&Failure::bad_request(format!(
                    "the test double reads JSON bodies only: {e}"
                )))
            }
        }
    } else {
        None
    };
    let ns = target.namespace.as_deref();
    let filter = Filter {
        namespace: target.namespace.clone(),
        name: match q.get("fieldSelector").map(String::as_str) {
            None | Some("") => None,
            Some(sel) => match sel.strip_prefix("metadata.name=") {
                Some(n) if !n.contains(',') => Some(n.to_owned()),
                _ => {
                    return failure(&Failure::bad_request(format!(
                    "the test double supports only fieldSelector=metadata.name=NAME, not {sel:?}"
                )))
                }
            },
        },
    };
    if q.get("labelSelector").is_some_and(|s| !s.is_empty()) {
        return failure(&Failure::bad_request(
            "the test double does not implement labelSelector",
        ));
    }
    let result = match verb {
        "get" => {
            let key = (
                ns.map(str::to_owned).unwrap_or_default(),
                target.name.clone().unwrap_or_default(),
            );
            let key = if t.namespaced && key.0.is_empty() {
                ("default".to_owned(), key.1)
            } else {
                key
            };
            let store = shared.store();
            if let Some(f) = store.refused() {
                return failure(&f);
            }
            store.get(target.ti, &key).map(|o| {
                if table {
                    to_table(t, &[o], None)
                } else {
                    (*o).clone()
                }
            })
        }
        "list" => {
            let limit = q.get("limit").and_then(|l| l.parse().ok());
            let cont = q.get("continue").filter(|c| !c.is_empty());
            let store = shared.store();
            if let Some(f) = store.refused() {
                return failure(&f);
            }
            store
                .list(target.ti, &filter, limit, cont.map(String::as_str))
                .map(|page| list_value(t, page, table))
        }
        "watch" => {
            let from = match q.get("resourceVersion").map(String::as_str) {
                None | Some("") => None,
                Some(rv) => match rv.parse::<u64>() {
                    Ok(rv) => Some(rv),
                    Err(_) => {
                        return failure(&Failure::bad_request(format!(
                            "resourceVersion {rv:?} is not valid"
                        )))
                    }
                },
            };
            let bookmarks = matches!(
                q.get("allowWatchBookmarks").map(String::as_str),
                Some("true" | "1")
            );
            let timeout = q
                .get("timeoutSeconds")
                .and_then(|s| s.parse::<u64>().ok())
                .filter(|s| *s > 0)
                .unwrap_or(1800);
            let rx = {
                let mut store = shared.store();
                if let Some(f) = store.refused() {
                    return failure(&f);
                }
                store.watch(target.ti, filter, from, bookmarks)
            };
            return Response::builder()
                .header("content-type", "application/json")
                .header("transfer-encoding", "chunked")
                .body(ReplyBody::Watch(WatchBody {
                    rx,
                    timeout: Box::pin(tokio::time::sleep(Duration::from_secs(timeout))),
                    ty: t,
                    table,
                    done: false,
                }))
                .expect("a valid response");
        }
        "create" => shared
            .store()
            .create(target.ti, ns, body.expect("read above"))
            .map(|o| (*o).clone()),
        "update" => shared
            .store()
            .replace(
                target.ti,
                ns,
                target.name.as_deref().expect("update has a name"),
                body.expect("read above"),
                target.status,
            )
            .map(|o| (*o).clone()),
        "delete" => shared
            .store()
            .delete(
                target.ti,
                ns,
                target.name.as_deref().expect("delete has a name"),
            )
            .map(|o| (*o).clone()),
        _ => unreachable!("verbs are matched above"),
    };
    match result {
        Ok(v) => json_reply(if verb == "create" { 201 } else { 200 }, &v),
        Err(f) => failure(&f),
    }
}

fn list_value(t: &store::ResourceType, page: store::Page, table: bool) -> Value {
    let mut meta = json!({"resourceVersion": page.resource_version.to_string()});
    if let Some(c) = &page.continue_token {
        meta["continue"] = json!(c);
        meta["remainingItemCount"] = json!(page.remaining.unwrap_or(0));
    }
    if table {
        return to_table(t, &page.items, Some(meta));
    }
    // As a real API server lists: items without kind and apiVersion.
    let items: Vec<Value> = page
        .items
        .iter()
        .map(|o| {
            let mut o = (**o).clone();
            if let Some(m) = o.as_object_mut() {
                m.remove("kind");
                m.remove("apiVersion");
            }
            o
        })
        .collect();
    json!({
        "kind": format!("{}List", t.kind),
        "apiVersion": t.api_version(),
        "metadata": meta,
        "items": items,
    })
}

/// A `meta.k8s.io/v1` Table: NAME, the type's own columns, AGE-less (the
/// double keeps no clock a test could rely on), each row carrying the
/// object's metadata as kubectl expects.
fn to_table(t: &store::ResourceType, items: &[Arc<Value>], meta: Option<Value>) -> Value {
    let mut columns = vec![
        json!({"name": "Name", "type": "string", "format": "name", "description": "Name", "priority": 0}),
    ];
    let extra: &[(&str, &str)] = match t.kind {
        "Pod" => &[
            ("Status", "/status/phase"),
            ("IP", "/status/podIP"),
            ("Node", "/spec/nodeName"),
        ],
        "Namespace" => &[("Status", "/status/phase")],
        "NetworkPolicy" => &[],
        "Lease" => &[("Holder", "/spec/holderIdentity")],
        _ => &[],
    };
    for (name, _) in extra {
        columns.push(json!({"name": name, "type": "string", "format": "", "description": name, "priority": 0}));
    }
    let rows: Vec<Value> = items
        .iter()
        .map(|o| {
            let mut cells = vec![o["metadata"]["name"].clone()];
            for (_, pointer) in extra {
                cells.push(
                    o.pointer(pointer)
                        .cloned()
                        .filter(|v| !v.is_null())
                        .unwrap_or(json!("<none>")),
                );
            }
            json!({
                "cells": cells,
                "object": {
                    "kind": "PartialObjectMetadata",
                    "apiVersion": "meta.k8s.io/v1",
                    "metadata": o["metadata"],
                },
            })
        })
        .collect();
    json!({
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": meta.unwrap_or_else(|| json!({})),
        "columnDefinitions": columns,
        "rows": rows,
    })
}

fn version() -> Value {
    json!({
        "major": "1",
        "minor": "34",
        "gitVersion": "v1.34.0-nftpolicy-test-double",
        "gitCommit": "0000000000000000000000000000000000000000",
        "gitTreeState": "clean",
        "buildDate": "2025-01-01T00:00:00Z",
        "goVersion": "none",
        "compiler": "none",
        "platform": "linux/amd64",
    })
}

fn group_list() -> Value {
    // One entry per group, its versions in the order TYPES has them.
    let mut groups: Vec<(&str, Vec<&str>)> = Vec::new();
    for t in TYPES.iter().filter(|t| !t.group.is_empty()) {
        match groups.iter_mut().find(|(g, _)| *g == t.group) {
            Some((_, versions)) if versions.contains(&t.version) => {}
            Some((_, versions)) => versions.push(t.version),
            None => groups.push((t.group, vec![t.version])),
        }
    }
    let groups: Vec<Value> = groups
        .into_iter()
        .map(|(g, versions)| {
            let gvs: Vec<Value> = versions
                .iter()
                .map(|v| json!({"groupVersion": format!("{g}/{v}"), "version": v}))
                .collect();
            json!({"name": g, "versions": gvs, "preferredVersion": gvs[0]})
        })
        .collect();
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
}

/// `/openapi/v3`: where each group-version's document is.
fn openapi_root() -> Value {
    let mut paths = serde_json::Map::new();
    for t in TYPES {
        let gv = if t.group.is_empty() {
            format!("api/{}", t.version)
        } else {
            format!("apis/{}/{}", t.group, t.version)
        };
        paths.insert(
            gv.clone(),
            json!({"serverRelativeURL": format!("/openapi/v3/{gv}?hash=test-double")}),
        );
    }
    json!({"paths": paths})
}

/// The OpenAPI v3 document of one group-version, reduced to what kubectl
/// reads from it: that the server validates fields itself
/// (`fieldValidation`), so kubectl sends `fieldValidation=Strict` instead
/// of validating against schemas the double does not have. The double
/// ignores the parameter: it validates nothing.
fn openapi_group_version(gv: &str) -> Option<Value> {
    let (group, version) = match gv.split('/').collect::<Vec<_>>().as_slice() {
        ["api", v] => ("", *v),
        ["apis", g, v] => (*g, *v),
        _ => return None,
    };
    let mut paths = serde_json::Map::new();
    for t in TYPES
        .iter()
        .filter(|t| t.group == group && t.version == version)
    {
        let prefix = if group.is_empty() {
            format!("/api/{version}")
        } else {
            format!("/apis/{group}/{version}")
        };
        let path = if t.namespaced {
            format!("{prefix}/namespaces/{{namespace}}/{}/{{name}}", t.plural)
        } else {
            format!("{prefix}/{}/{{name}}", t.plural)
        };
        paths.insert(
            path,
            json!({"patch": {
                "x-kubernetes-group-version-kind": {"group": t.group, "version": t.version, "kind": t.kind},
                "parameters": [{"name": "fieldValidation", "in": "query", "schema": {"type": "string"}}],
                "responses": {"200": {"description": "OK"}},
            }}),
        );
    }
    if paths.is_empty() {
        return None;
    }
    Some(json!({
        "openapi": "3.0.0",
        "info": {"title": "nftpolicy fake API server (test double)", "version": "v1.34.0"},
        "paths": paths,
        "components": {"schemas": {}},
    }))
}

/// The APIResourceList of `/api/v1` or `/apis/<group>/<version>`.
fn resource_list(path: &str) -> Option<Value> {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, version) = match segs.as_slice() {
        ["api", v] => ("", *v),
        ["apis", g, v] => (*g, *v),
        _ => return None,
    };
    let mut resources = Vec::new();
    for t in TYPES
        .iter()
        .filter(|t| t.group == group && t.version == version)
    {
        resources.push(json!({
            "name": t.plural,
            "singularName": t.singular,
            "namespaced": t.namespaced,
            "kind": t.kind,
            "verbs": ["create", "delete", "get", "list", "update", "watch"],
            "shortNames": t.short_names,
        }));
        if t.status {
            resources.push(json!({
                "name": format!("{}/status", t.plural),
                "singularName": "",
                "namespaced": t.namespaced,
                "kind": t.kind,
                "verbs": ["get", "update"],
            }));
        }
    }
    if resources.is_empty() {
        return None;
    }
    let group_version = if group.is_empty() {
        version.to_owned()
    } else {
        format!("{group}/{version}")
    };
    Some(json!({
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": group_version,
        "resources": resources,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        let t = route("/api/v1/namespaces/a/pods/p/status").unwrap();
        assert_eq!(
            (
                TYPES[t.ti].plural,
                t.namespace.as_deref(),
                t.name.as_deref(),
                t.status
            ),
            ("pods", Some("a"), Some("p"), true)
        );
        let t = route("/api/v1/namespaces/a").unwrap();
        assert_eq!(
            (TYPES[t.ti].plural, t.namespace, t.name.as_deref()),
            ("namespaces", None, Some("a"))
        );
        let t = route("/apis/networking.k8s.io/v1/networkpolicies").unwrap();
        assert_eq!((TYPES[t.ti].plural, t.name), ("networkpolicies", None));
        assert!(route("/api/v1/namespaces/a/pods/p/log").is_none());
        assert!(route("/apis/apps/v1/deployments").is_none());
        assert_eq!(percent_decode("metadata.name%3Dweb"), "metadata.name=web");
    }
}
