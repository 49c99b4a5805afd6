//! The file source of the update stream.

use std::time::Duration;

use model::calico::{Kind, Resource, ResourceKey};
use tokio::sync::mpsc;
use watcher::{Cache, Source, Update};

const DEADLINE: Duration = Duration::from_secs(20);

async fn next(rx: &mut mpsc::Receiver<Update>, cache: &mut Cache) -> Update {
    let u = tokio::time::timeout(DEADLINE, rx.recv())
        .await
        .expect("an update in time")
        .expect("the source is running");
    cache.apply(u.clone());
    u
}

/// Everything up to and including the next InSync.
async fn batch(rx: &mut mpsc::Receiver<Update>, cache: &mut Cache) -> Vec<Update> {
    let mut out = vec![];
    loop {
        let u = next(rx, cache).await;
        let done = matches!(u, Update::InSync { .. });
        out.push(u);
        if done {
            return out;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_source_emits_the_difference_after_an_edit() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.yaml");
    let ns = |name: &str, label: &str| {
        format!("apiVersion: v1\nkind: Namespace\nmetadata: {{name: {name}, labels: {{v: '{label}'}}}}\n---\n")
    };
    std::fs::write(&a, ns("x", "1") + &ns("y", "1")).unwrap();
    std::fs::write(
        dir.path().join("bad.yaml"),
        "apiVersion: v1\nkind: Service\nmetadata: {name: s}\n",
    )
    .unwrap();

    let (mut rx, _task) = Source::Files {
        paths: vec![dir.path().to_path_buf()],
        poll: Duration::from_millis(20),
    }
    .spawn(16);
    let mut cache = Cache::new();
    let first = batch(&mut rx, &mut cache).await;
    let profile = |n: &str| ResourceKey::new(Kind::Profile, None, n);
    let upserts: Vec<&ResourceKey> = first
        .iter()
        .filter_map(|u| match u {
            Update::Upsert { key, .. } => Some(key),
            _ => None,
        })
        .collect();
    assert_eq!(upserts, [&profile("kns.x"), &profile("kns.y")]);
    let bad = format!("{}: Service s", dir.path().join("bad.yaml").display());
    assert!(
        first
            .iter()
            .any(|u| matches!(u, Update::Invalid { key, .. } if key == &bad)),
        "{first:#?}"
    );
    assert_eq!(first.last(), Some(&Update::InSync { revision: 1 }));
    assert_eq!(cache.invalid.len(), 1);

    // x changes, y goes, z comes.
    std::fs::write(&a, ns("x", "2") + &ns("z", "1")).unwrap();
    let second = batch(&mut rx, &mut cache).await;
    let changes: Vec<String> = second
        .iter()
        .filter_map(|u| match u {
            Update::Upsert { key, revision, .. } => {
                Some(format!("upsert {} @{revision}", key.name))
            }
            Update::Delete { key, revision } => Some(format!("delete {} @{revision}", key.name)),
            _ => None,
        })
        .collect();
    assert_eq!(
        changes,
        ["delete kns.y @2", "upsert kns.x @2", "upsert kns.z @2"]
    );
    let Some(Resource::Profile(x)) = cache.state.get(&profile("kns.x")) else {
        panic!("{second:#?}")
    };
    assert_eq!(x.spec.labels_to_apply["pcns.v"], "2");
    assert_eq!(cache.state.len(), 2);

    // The bad file is fixed: no more invalid objects; an InSync confirms it.
    std::fs::remove_file(dir.path().join("bad.yaml")).unwrap();
    let third = batch(&mut rx, &mut cache).await;
    assert_eq!(third, [Update::InSync { revision: 3 }]);
    assert!(cache.invalid.is_empty(), "{:?}", cache.invalid);
}

/// A ConfigMap volume as the kubelet lays it out: the real files in a
/// `..<timestamp>` directory, a `..data` symlink to it, and one symlink per
/// key through `..data`. Each manifest must be read once.
#[test]
fn configmap_mount_is_read_once() {
    use std::os::unix::fs::symlink;
    let dir = tempfile::tempdir().unwrap();
    let stamp = "..2024_05_01_12_00_00.123456789";
    std::fs::create_dir(dir.path().join(stamp)).unwrap();
    for name in ["policy.yaml", "namespaces.yaml"] {
        std::fs::write(
            dir.path().join(stamp).join(name),
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: x}\n",
        )
        .unwrap();
        symlink(format!("..data/{name}"), dir.path().join(name)).unwrap();
    }
    symlink(stamp, dir.path().join("..data")).unwrap();

    let files = watcher::files::manifest_files(&[dir.path().to_path_buf()]).unwrap();
    assert_eq!(
        files,
        vec![
            dir.path().join("namespaces.yaml"),
            dir.path().join("policy.yaml")
        ]
    );
    let loaded = watcher::files::load(&[dir.path().to_path_buf()]).unwrap();
    assert!(loaded.errors.is_empty(), "{:?}", loaded.errors);
}
