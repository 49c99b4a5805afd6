//! The file datastore: Kubernetes and/or Calico YAML manifests in files or
//! directories (searched recursively for `*.yaml`, `*.yml`, `*.json`).
//! Kubernetes objects are converted to Calico resources on the way in, as
//! the policy controller would write them to etcd.
//!
//! - [`load`]: read once into a [`ClusterState`];
//! - [`read_resources`] / [`read_manifests`] / [`read_files`]: read once,
//!   keeping every bad document or object as a [`Problem`] named by file
//!   and object; a path, directory or file that cannot be read fails the
//!   whole read (never a datastore missing the unread part);
//! - [`watch`]: the file source of the update stream — a full snapshot, then
//!   the differences whenever the files change (polled).
//!
//! Every YAML document is decoded on its own: a bad document (or a bad item
//! of a `v1/List`) is reported and skipped, the rest of the file is kept. A
//! syntax error ends the file's stream of documents at that point.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use model::calico::{Resource, ResourceKey};
use model::convert::kube_to_calico;
use model::kube::{parse_value, Manifest, ManifestError};
use model::state::ClusterState;
use serde::Deserialize;
use tokio::sync::mpsc;

use crate::Update;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FileError {
    #[error("{path}: cannot read: {reason}")]
    Read { path: String, reason: String },
    #[error("{0}")]
    Decode(String),
    #[error("{path}: {reason}")]
    Convert { path: String, reason: String },
}

/// A file or object that had to be skipped: `key` names it (`<file>` or
/// `<file>: <Kind> <ns>/<name>`), `error` says why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub key: String,
    pub error: FileError,
}

/// The state read from files, and what had to be skipped (each bad file or
/// object is named; everything else is kept).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Loaded {
    pub state: ClusterState,
    pub errors: Vec<FileError>,
}

/// Manifest files under `paths`, sorted within each directory. Entries of a
/// directory whose names start with `.` are left out (a path given itself is
/// always taken).
pub fn manifest_files(paths: &[PathBuf]) -> Result<Vec<PathBuf>, FileError> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<(), FileError> {
        let err = |e: std::io::Error| FileError::Read {
            path: dir.display().to_string(),
            reason: e.to_string(),
        };
        let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(err)?
            .map(|e| e.map(|e| e.path()).map_err(err))
            .collect::<Result<_, _>>()?;
        entries.sort();
        for path in entries {
            // Hidden entries are skipped: a Kubernetes ConfigMap mount holds
            // each file three times, as `name` -> `..data/name`, in the
            // `..data` symlink and in the `..<timestamp>` directory it points to.
            let hidden = path
                .file_name()
                .is_some_and(|n| n.as_encoded_bytes().starts_with(b"."));
            if hidden {
                continue;
            }
            if path.is_dir() {
                walk(&path, out)?;
            } else if matches!(
                path.extension().and_then(|e| e.to_str()),
                Some("yaml" | "yml" | "json")
            ) {
                out.push(path);
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    for p in paths {
        // A configured path that is gone (a removed directory, an unmounted
        // volume's file) is a read failure, not an empty datastore.
        let meta = std::fs::metadata(p).map_err(|e| FileError::Read {
            path: p.display().to_string(),
            reason: e.to_string(),
        })?;
        if meta.is_dir() {
            walk(p, &mut out)?;
        } else {
            out.push(p.clone());
        }
    }
    Ok(out)
}

/// The name of the file or object a manifest error is about.
fn manifest_error_key(e: &ManifestError) -> String {
    use model::calico::DecodeError;
    match e {
        ManifestError::Yaml { what, .. } => what.clone(),
        ManifestError::Untyped { what, index } => format!("{what}: document {index}"),
        ManifestError::UnknownKind {
            what, kind, name, ..
        } => format!("{what}: {kind} {name}"),
        ManifestError::Invalid { what, object, .. } => format!("{what}: {object}"),
        ManifestError::Calico(
            DecodeError::Syntax { what, .. }
            | DecodeError::ApiVersion { what, .. }
            | DecodeError::Invalid { what, .. },
        ) => what.clone(),
    }
}

/// Decodes every document of a YAML (or JSON) text on its own: the good
/// ones, and an error for each bad one (a bad item of a `v1/List` is one
/// bad object). `what` names the source in errors.
pub fn parse_documents(what: &str, text: &str) -> (Vec<Manifest>, Vec<ManifestError>) {
    let mut out = Vec::new();
    let mut errors = Vec::new();
    for (index, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let value = match serde_yaml::Value::deserialize(doc) {
            Ok(v) => v,
            Err(e) => {
                // The document stream cannot be resynchronised after a
                // syntax error.
                errors.push(ManifestError::Yaml {
                    what: what.to_owned(),
                    reason: e.to_string(),
                });
                break;
            }
        };
        if value.is_null() {
            continue; // empty document, e.g. a trailing `---`
        }
        let value: serde_json::Value = match serde_json::to_value(&value) {
            Ok(v) => v,
            Err(e) => {
                errors.push(ManifestError::Yaml {
                    what: what.to_owned(),
                    reason: e.to_string(),
                });
                continue;
            }
        };
        let is_list = value.get("apiVersion").and_then(|v| v.as_str()) == Some("v1")
            && value.get("kind").and_then(|v| v.as_str()) == Some("List");
        let items = match (is_list, value.get("items")) {
            (true, Some(serde_json::Value::Array(items))) => items.clone(),
            (true, None | Some(serde_json::Value::Null)) => vec![],
            _ => vec![value],
        };
        for item in items {
            if let Err(e) = parse_value(what, index, item, &mut out) {
                errors.push(e);
            }
        }
    }
    (out, errors)
}

/// Reads and decodes one manifest file.
pub fn read_file(path: &Path) -> (Vec<Manifest>, Vec<Problem>) {
    let shown = path.display().to_string();
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) => {
            let error = FileError::Read {
                path: shown.clone(),
                reason: e.to_string(),
            };
            return (vec![], vec![Problem { key: shown, error }]);
        }
    };
    let (manifests, errors) = parse_documents(&shown, &text);
    let problems = errors
        .iter()
        .map(|e| Problem {
            key: manifest_error_key(e),
            error: FileError::Decode(e.to_string()),
        })
        .collect();
    (manifests, problems)
}

/// Manifests, each with the file it came from.
pub type FileManifests = Vec<(PathBuf, Manifest)>;

/// Every manifest under `paths` with the file it came from, and what had to
/// be skipped. Fails when a configured path is missing, a directory cannot
/// be listed or a file cannot be read: a datastore read in part must never
/// look like a datastore without the unread part.
pub fn read_manifests(paths: &[PathBuf]) -> Result<(FileManifests, Vec<Problem>), FileError> {
    let mut manifests = Vec::new();
    let mut problems = Vec::new();
    for file in manifest_files(paths)? {
        let (m, p) = read_file(&file);
        if let Some(e) = unreadable(&p) {
            return Err(e);
        }
        manifests.extend(m.into_iter().map(|m| (file.clone(), m)));
        problems.extend(p);
    }
    Ok((manifests, problems))
}

/// The read error among a file's problems, if the file could not be read.
fn unreadable(problems: &[Problem]) -> Option<FileError> {
    problems
        .iter()
        .find(|p| matches!(p.error, FileError::Read { .. }))
        .map(|p| p.error.clone())
}

/// One manifest file's Calico resources (Kubernetes objects converted), in
/// document order, what had to be skipped, and whether the file as a whole
/// is broken (a YAML syntax error ends its documents early).
#[derive(Debug, Clone, PartialEq)]
pub struct FileResources {
    pub path: PathBuf,
    pub resources: Vec<Resource>,
    pub problems: Vec<Problem>,
    pub syntax_error: bool,
}

/// Reads every manifest file under `paths` into Calico resources, file by
/// file. Fails as [`read_manifests`] does.
pub fn read_files(paths: &[PathBuf]) -> Result<Vec<FileResources>, FileError> {
    let mut out = Vec::new();
    for file in manifest_files(paths)? {
        let shown = file.display().to_string();
        let (manifests, mut problems) = read_file(&file);
        if let Some(e) = unreadable(&problems) {
            return Err(e);
        }
        let syntax_error = problems
            .iter()
            .any(|p| p.key == shown && matches!(p.error, FileError::Decode(_)));
        let mut resources = Vec::new();
        for m in manifests {
            match m {
                Manifest::Calico(r) => resources.push(r),
                Manifest::Kube(obj) => match kube_to_calico(&obj) {
                    Ok(Some(r)) => resources.push(r),
                    Ok(None) => {}
                    Err(e) => problems.push(Problem {
                        key: format!("{shown}: {}", e.object),
                        error: FileError::Convert {
                            path: shown.clone(),
                            reason: e.to_string(),
                        },
                    }),
                },
            }
        }
        out.push(FileResources {
            path: file,
            resources,
            problems,
            syntax_error,
        });
    }
    Ok(out)
}

/// The Calico resources under `paths` (Kubernetes objects converted), keyed
/// as in etcd; a later file's object replaces an earlier one of the same key.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Resources {
    pub resources: BTreeMap<ResourceKey, Resource>,
    /// Every bad file or object, in file order.
    pub problems: Vec<Problem>,
}

/// Reads every manifest under `paths` into Calico resources. Fails as
/// [`read_manifests`] does.
pub fn read_resources(paths: &[PathBuf]) -> Result<Resources, FileError> {
    Ok(merge(read_files(paths)?))
}

/// The files' resources keyed as in etcd (a later file's object replaces
/// an earlier one of the same key), and their problems in file order.
fn merge(files: Vec<FileResources>) -> Resources {
    let mut out = Resources::default();
    for f in files {
        for r in f.resources {
            out.resources.insert(r.key(), r);
        }
        out.problems.extend(f.problems);
    }
    out
}

/// Reads every manifest under `paths` into one cluster state.
pub fn load(paths: &[PathBuf]) -> Result<Loaded, FileError> {
    let read = read_resources(paths)?;
    let mut loaded = Loaded::default();
    for r in read.resources.into_values() {
        loaded.state.upsert(r);
    }
    loaded.errors = read.problems.into_iter().map(|p| p.error).collect();
    Ok(loaded)
}

/// What the files looked like: every manifest file with its size,
/// modification time and inode change time (or why the paths could not be
/// listed). The change time moves with a chmod too, so a file made
/// unreadable is noticed although its contents did not change.
type Fingerprint = Result<Vec<(PathBuf, u64, Option<SystemTime>, (i64, i64))>, FileError>;

fn fingerprint(paths: &[PathBuf]) -> Fingerprint {
    use std::os::unix::fs::MetadataExt;
    Ok(manifest_files(paths)?
        .into_iter()
        .map(|f| {
            let meta = std::fs::metadata(&f).ok();
            let len = meta.as_ref().map_or(u64::MAX, |m| m.len());
            let ctime = meta
                .as_ref()
                .map_or((0, 0), |m| (m.ctime(), m.ctime_nsec()));
            let mtime = meta.and_then(|m| m.modified().ok());
            (f, len, mtime, ctime)
        })
        .collect())
}

/// The file source of the update stream.
///
/// Reads everything under `paths` and sends it as `Upsert`s (plus an
/// `Invalid` for each bad file or object) and `InSync`; then polls the
/// files every `poll` and, once a change has held still for one poll (so a
/// file caught half-written is not taken for the new state), re-reads them
/// and sends the difference: `Delete`s, `Upsert`s, `Invalid`s, `InSync`.
/// Revisions are the generation of the read: 1, 2, ….
///
/// A datastore that cannot be read is never taken for an empty or smaller
/// one: when a configured path is missing, a directory cannot be listed, a
/// file cannot be read, or no manifest file is found at all (an unmounted
/// volume leaves an empty mount point), nothing is deleted; a
/// `Disconnected` says why (the agent keeps the programmed dataplane and
/// reports itself not ready), the read is retried every poll, and the
/// difference and an `InSync` follow once it succeeds. A file with a YAML
/// syntax error keeps the objects it held at its last good read (it is
/// reported `Invalid` meanwhile): a typo must not delete a policy.
/// Returns when the receiver is dropped.
pub async fn watch(
    paths: Vec<PathBuf>,
    poll: Duration,
    tx: mpsc::Sender<Update>,
) -> Result<(), FileError> {
    let mut emitted: BTreeMap<ResourceKey, Resource> = BTreeMap::new();
    // Each file's objects at its last read without a syntax error.
    let mut last_good: BTreeMap<PathBuf, Vec<Resource>> = BTreeMap::new();
    let mut last_invalid: Option<BTreeSet<(String, String)>> = None;
    let mut generation: i64 = 0;
    let mut read_at: Option<Fingerprint> = None;
    let mut pending: Option<Fingerprint> = None;
    // Why the last read failed, while it does.
    let mut failing: Option<String> = None;
    loop {
        let p = paths.clone();
        let fp = tokio::task::spawn_blocking(move || fingerprint(&p))
            .await
            .unwrap_or_else(|e| {
                Err(FileError::Read {
                    path: "?".into(),
                    reason: e.to_string(),
                })
            });
        let first = read_at.is_none();
        let changed = read_at.as_ref() != Some(&fp);
        let settled = pending.as_ref() == Some(&fp);
        // While failing, every poll retries: a file made readable again
        // (chmod) keeps its size and modification time.
        if first || failing.is_some() || (changed && settled) {
            pending = None;
            read_at = Some(fp);
            let p = paths.clone();
            let read = tokio::task::spawn_blocking(move || read_files(&p))
                .await
                .unwrap_or_else(|e| {
                    Err(FileError::Read {
                        path: "?".into(),
                        reason: e.to_string(),
                    })
                })
                .and_then(|files| {
                    if files.is_empty() {
                        Err(FileError::Read {
                            path: paths_shown(&paths),
                            reason: "no manifest file found (an unmounted volume or a \
                                     removed directory?); an empty datastore is never \
                                     programmed"
                                .into(),
                        })
                    } else {
                        Ok(files)
                    }
                });
            let files = match read {
                Ok(files) => files,
                Err(e) => {
                    let reason = format!("file datastore unreadable: {e}; keeping the last state");
                    if failing.as_deref() != Some(reason.as_str()) {
                        tracing::warn!(%reason, "cannot read the file datastore");
                        if tx
                            .send(Update::Disconnected {
                                reason: reason.clone(),
                            })
                            .await
                            .is_err()
                        {
                            return Ok(());
                        }
                        failing = Some(reason);
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(poll) => {}
                        _ = tx.closed() => return Ok(()),
                    }
                    continue;
                }
            };
            let recovered = failing.take().is_some();
            let mut invalid = BTreeSet::new();
            let files: Vec<FileResources> = files
                .into_iter()
                .map(|mut f| {
                    match (f.syntax_error, last_good.get(&f.path)) {
                        (true, Some(good)) => {
                            invalid.insert((
                                f.path.display().to_string(),
                                "YAML syntax error; keeping the objects of its last good read"
                                    .to_owned(),
                            ));
                            f.resources = good.clone();
                        }
                        (true, None) => {}
                        (false, _) => {
                            last_good.insert(f.path.clone(), f.resources.clone());
                        }
                    }
                    f
                })
                .collect();
            last_good.retain(|path, _| files.iter().any(|f| &f.path == path));
            let read = merge(files);
            let mut batch = Vec::new();
            let next = generation + 1;
            for key in emitted.keys() {
                if !read.resources.contains_key(key) {
                    batch.push(Update::Delete {
                        key: key.clone(),
                        revision: next,
                    });
                }
            }
            for (key, r) in &read.resources {
                if emitted.get(key) != Some(r) {
                    batch.push(Update::Upsert {
                        key: key.clone(),
                        resource: r.clone(),
                        revision: next,
                    });
                }
            }
            emitted = read.resources;
            for p in read.problems {
                invalid.insert((p.key, p.error.to_string()));
            }
            if first || recovered || !batch.is_empty() || last_invalid.as_ref() != Some(&invalid) {
                generation = next;
                for (key, reason) in &invalid {
                    // Repeated every generation: the agent names each one once.
                    tracing::debug!(%key, %reason, "skipping a bad manifest");
                    batch.push(Update::Invalid {
                        key: key.clone(),
                        reason: reason.clone(),
                        revision: next,
                    });
                }
                batch.push(Update::InSync { revision: next });
                for u in batch {
                    if tx.send(u).await.is_err() {
                        return Ok(());
                    }
                }
                last_invalid = Some(invalid);
            }
        } else if changed {
            pending = Some(fp);
        }
        tokio::select! {
            _ = tokio::time::sleep(poll) => {}
            _ = tx.closed() => return Ok(()),
        }
    }
}

fn paths_shown(paths: &[PathBuf]) -> String {
    paths
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_objects_are_named_and_the_rest_kept() {
        let dir = tempfile::tempdir().unwrap();
        let dir = dir.path().to_path_buf();
        std::fs::write(
            dir.join("a.yaml"),
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n---\n\
             apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: bad, namespace: a}\nspec: {podSelector: {}, ingress: [{ports: [{port: 0}]}]}\n---\n\
             apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: unreadable, namespace: a}\nspec: {podSelector: {matchLabels: {'a b': c}}}\n",
        )
        .unwrap();
        std::fs::write(dir.join("b.yaml"), "kind: [").unwrap();
        let loaded = load(std::slice::from_ref(&dir)).unwrap();
        // The namespace profile, and the bad policy as a stub that still
        // isolates the pods it selects (model::reject).
        assert_eq!(loaded.state.len(), 2, "{:?}", loaded.state);
        let rejected: Vec<(ResourceKey, &str)> = loaded.state.rejected().collect();
        assert_eq!(rejected.len(), 1, "{rejected:?}");
        assert_eq!(rejected[0].0.name, "knp.default.bad");
        assert!(rejected[0].1.contains("port 0"), "{rejected:?}");
        // What cannot be read at all is named and left out.
        let errors: Vec<String> = loaded.errors.iter().map(|e| e.to_string()).collect();
        assert_eq!(errors.len(), 2, "{errors:?}");
        assert!(
            errors[0].contains("NetworkPolicy a/unreadable")
                && errors[0].contains("invalid label key"),
            "{errors:?}"
        );
        assert!(errors[1].contains("b.yaml: malformed YAML"), "{errors:?}");
    }

    #[test]
    fn a_bad_document_or_list_item_spares_the_rest_of_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("m.yaml");
        std::fs::write(
            &file,
            "apiVersion: v1\nkind: Service\nmetadata: {name: s}\n---\n\
             apiVersion: v1\nkind: List\nitems:\n\
             - {apiVersion: v1, kind: Namespace, metadata: {name: a}}\n\
             - {apiVersion: projectcalico.org/v3, kind: GlobalNetworkPolicy, metadata: {name: g}, spec: {selector: 'a = b'}}\n\
             - {apiVersion: v1, kind: Namespace, metadata: {name: b}}\n",
        )
        .unwrap();
        let read = read_resources(&[dir.path().to_path_buf()]).unwrap();
        let names: Vec<&str> = read.resources.keys().map(|k| k.name.as_str()).collect();
        assert_eq!(names, ["kns.a", "kns.b"]);
        let keys: Vec<&str> = read.problems.iter().map(|p| p.key.as_str()).collect();
        let shown = file.display().to_string();
        assert_eq!(
            keys,
            [
                format!("{shown}: Service s"),
                format!("{shown}: GlobalNetworkPolicy g")
            ]
        );
    }
}
