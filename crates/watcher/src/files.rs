//! The file datastore: Kubernetes and/or Calico YAML manifests in files or
//! directories (searched recursively for `*.yaml`, `*.yml`, `*.json`).
//! Kubernetes objects are converted to Calico resources on the way in, as
//! the policy controller would write them to etcd.

use std::path::{Path, PathBuf};

use model::convert::kube_to_calico;
use model::kube::{parse_manifests, Manifest};
use model::state::ClusterState;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FileError {
    #[error("{path}: cannot read: {reason}")]
    Read { path: String, reason: String },
    #[error("{0}")]
    Decode(String),
    #[error("{path}: {reason}")]
    Convert { path: String, reason: String },
}

/// The state read from files, and what had to be skipped (each bad file or
/// object is named; everything else is kept).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Loaded {
    pub state: ClusterState,
    pub errors: Vec<FileError>,
}

/// Manifest files under `paths`, sorted within each directory.
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
        if p.is_dir() {
            walk(p, &mut out)?;
        } else {
            out.push(p.clone());
        }
    }
    Ok(out)
}

/// Reads every manifest under `paths` into one cluster state.
pub fn load(paths: &[PathBuf]) -> Result<Loaded, FileError> {
    let mut loaded = Loaded::default();
    for file in manifest_files(paths)? {
        let shown = file.display().to_string();
        let text = match std::fs::read_to_string(&file) {
            Ok(t) => t,
            Err(e) => {
                loaded.errors.push(FileError::Read {
                    path: shown,
                    reason: e.to_string(),
                });
                continue;
            }
        };
        let manifests = match parse_manifests(&shown, &text) {
            Ok(m) => m,
            Err(e) => {
                loaded.errors.push(FileError::Decode(e.to_string()));
                continue;
            }
        };
        for m in manifests {
            match m {
                Manifest::Calico(r) => {
                    loaded.state.upsert(r);
                }
                Manifest::Kube(obj) => match kube_to_calico(&obj) {
                    Ok(Some(r)) => {
                        loaded.state.upsert(r);
                    }
                    Ok(None) => {}
                    Err(e) => loaded.errors.push(FileError::Convert {
                        path: shown.clone(),
                        reason: e.to_string(),
                    }),
                },
            }
        }
    }
    Ok(loaded)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_objects_are_named_and_the_rest_kept() {
        let dir = std::env::temp_dir().join(format!("nftpolicy-files-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("a.yaml"),
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: bad, namespace: a}\nspec: {podSelector: {}, ingress: [{ports: [{port: 0}]}]}\n",
        )
        .unwrap();
        std::fs::write(dir.join("b.yaml"), "kind: [").unwrap();
        let loaded = load(std::slice::from_ref(&dir)).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(loaded.state.len(), 1, "the namespace profile is kept");
        let errors: Vec<String> = loaded.errors.iter().map(|e| e.to_string()).collect();
        assert_eq!(errors.len(), 2, "{errors:?}");
        assert!(
            errors[0].contains("NetworkPolicy a/bad") && errors[0].contains("port 0"),
            "{errors:?}"
        );
        assert!(errors[1].contains("b.yaml: malformed YAML"), "{errors:?}");
    }
}
