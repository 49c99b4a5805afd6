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
    let x = cache.state.get(&profile("kns.x"));
    let Some(Resource::Profile(x)) = x.as_deref() else {
        panic!("{second:#?}")
    };
    assert_eq!(x.spec.labels_to_apply.get("pcns.v").expect("label"), "2");
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

/// The next update that is not `Invalid` (bad files are re-reported with
/// every generation).
async fn next_valid(rx: &mut mpsc::Receiver<Update>, cache: &mut Cache) -> Update {
    loop {
        let u = next(rx, cache).await;
        if !matches!(u, Update::Invalid { .. }) {
            return u;
        }
    }
}

fn namespaces(cache: &Cache) -> Vec<String> {
    cache
        .state
        .of_kind(Kind::Profile)
        .map(|r| r.metadata().name.clone())
        .collect()
}

fn namespace_yaml(names: &[&str]) -> String {
    names
        .iter()
        .map(|n| format!("apiVersion: v1\nkind: Namespace\nmetadata: {{name: {n}}}\n---\n"))
        .collect()
}

fn watch_dir(dir: &std::path::Path) -> mpsc::Receiver<Update> {
    let (rx, _task) = Source::Files {
        paths: vec![dir.to_path_buf()],
        poll: Duration::from_millis(20),
    }
    .spawn(16);
    rx
}

/// The datastore directory vanishes (deleted, or a ConfigMap volume
/// unmounted and its mount point emptied): the source reports itself
/// disconnected and deletes nothing; when the directory is back, the
/// difference and an InSync follow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vanished_or_emptied_directory_keeps_the_last_state() {
    let top = tempfile::tempdir().unwrap();
    let dir = top.path().join("datastore");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("ns.yaml"), namespace_yaml(&["x", "y"])).unwrap();
    let mut rx = watch_dir(&dir);
    let mut cache = Cache::new();
    batch(&mut rx, &mut cache).await;
    assert_eq!(namespaces(&cache), ["kns.x", "kns.y"]);

    // Removed.
    std::fs::rename(&dir, top.path().join("elsewhere")).unwrap();
    match next(&mut rx, &mut cache).await {
        Update::Disconnected { reason } => {
            assert!(reason.contains("unreadable"), "{reason}");
            assert!(reason.contains(&dir.display().to_string()), "{reason}");
            assert!(reason.contains("keeping the last state"), "{reason}");
        }
        u => panic!("expected Disconnected, got {u:?}"),
    }
    assert_eq!(namespaces(&cache), ["kns.x", "kns.y"], "nothing deleted");
    assert!(!cache.in_sync);

    // Back, with one namespace less: the difference, then InSync.
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("ns.yaml"), namespace_yaml(&["x"])).unwrap();
    let back = batch(&mut rx, &mut cache).await;
    assert!(
        back.iter()
            .any(|u| matches!(u, Update::Delete { key, .. } if key.name == "kns.y")),
        "{back:#?}"
    );
    assert!(cache.in_sync);
    assert_eq!(namespaces(&cache), ["kns.x"]);

    // Emptied in place (an unmounted volume's mount point): no manifest
    // file at all is not an empty datastore.
    std::fs::remove_file(dir.join("ns.yaml")).unwrap();
    match next(&mut rx, &mut cache).await {
        Update::Disconnected { reason } => {
            assert!(reason.contains("no manifest file found"), "{reason}")
        }
        u => panic!("expected Disconnected, got {u:?}"),
    }
    assert_eq!(namespaces(&cache), ["kns.x"], "nothing deleted");
    std::fs::write(dir.join("ns.yaml"), namespace_yaml(&["x"])).unwrap();
    // Nothing changed, but the source is back: an InSync says so.
    assert!(matches!(
        next_valid(&mut rx, &mut cache).await,
        Update::InSync { .. }
    ));
    assert!(cache.in_sync);
}

/// A datastore that cannot be read at the first read is not programmed as
/// empty: the source waits, disconnected, until it can read it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_directory_at_start_is_no_snapshot() {
    let top = tempfile::tempdir().unwrap();
    let dir = top.path().join("not-yet");
    let mut rx = watch_dir(&dir);
    let mut cache = Cache::new();
    assert!(matches!(
        next(&mut rx, &mut cache).await,
        Update::Disconnected { .. }
    ));
    assert!(!cache.ever_synced);
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("ns.yaml"), namespace_yaml(&["x"])).unwrap();
    batch(&mut rx, &mut cache).await;
    assert!(cache.in_sync);
    assert_eq!(namespaces(&cache), ["kns.x"]);
}

/// A file edited into a YAML syntax error keeps the objects of its last
/// good read (a typo must not delete a policy) and is reported by name;
/// fixing it brings its new objects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_with_a_syntax_error_keeps_its_last_good_objects() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("ns.yaml");
    std::fs::write(&file, namespace_yaml(&["x", "y"])).unwrap();
    let mut rx = watch_dir(dir.path());
    let mut cache = Cache::new();
    batch(&mut rx, &mut cache).await;

    std::fs::write(&file, namespace_yaml(&["x"]) + "kind: [\n").unwrap();
    let broken = batch(&mut rx, &mut cache).await;
    assert!(
        !broken.iter().any(|u| matches!(u, Update::Delete { .. })),
        "{broken:#?}"
    );
    let shown = file.display().to_string();
    assert!(
        broken.iter().any(|u| matches!(u,
            Update::Invalid { key, reason, .. } if key == &shown && reason.contains("last good"))),
        "{broken:#?}"
    );
    assert_eq!(namespaces(&cache), ["kns.x", "kns.y"]);

    std::fs::write(&file, namespace_yaml(&["x", "z"])).unwrap();
    batch(&mut rx, &mut cache).await;
    assert_eq!(namespaces(&cache), ["kns.x", "kns.z"]);
    assert!(cache.invalid.is_empty(), "{:?}", cache.invalid);
}

/// Drops CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH from this thread's
/// effective capabilities (threads it starts afterwards inherit that), so
/// file permissions apply to it as to an agent that has only
/// CAP_NET_ADMIN.
fn drop_file_permission_override() {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;
    const CAP_DAC_OVERRIDE: u32 = 1;
    const CAP_DAC_READ_SEARCH: u32 = 2;
    let mut header = Header {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let mut data = [Data::default(); 2];
    // SAFETY: capget/capset with a v3 header and two data structs, as the
    // kernel's ABI defines them; pid 0 is the calling thread.
    unsafe {
        assert_eq!(
            libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()),
            0
        );
        data[0].effective &= !((1 << CAP_DAC_OVERRIDE) | (1 << CAP_DAC_READ_SEARCH));
        assert_eq!(
            libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()),
            0,
            "capset: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// A manifest file that the agent may not read (chmod 000, an agent
/// without CAP_DAC_OVERRIDE) fails the read as a whole: nothing it held is
/// deleted; once readable again, the source is back in sync.
#[test]
fn an_unreadable_file_fails_the_whole_read() {
    drop_file_permission_override();
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.yaml");
    let b = dir.path().join("b.yaml");
    std::fs::write(&a, namespace_yaml(&["x"])).unwrap();
    std::fs::write(&b, namespace_yaml(&["y"])).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut rx = watch_dir(dir.path());
        let mut cache = Cache::new();
        batch(&mut rx, &mut cache).await;
        assert_eq!(namespaces(&cache), ["kns.x", "kns.y"]);

        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&b, std::fs::Permissions::from_mode(0o000)).unwrap();
        // The premise: permissions now apply to this process's threads.
        let seen = tokio::task::spawn_blocking({
            let b = b.clone();
            move || std::fs::read(&b)
        })
        .await
        .unwrap();
        assert!(
            seen.is_err(),
            "b.yaml is still readable: capabilities not dropped"
        );
        match next(&mut rx, &mut cache).await {
            Update::Disconnected { reason } => {
                assert!(reason.contains("b.yaml"), "{reason}");
                assert!(reason.contains("ermission denied"), "{reason}");
            }
            u => panic!("expected Disconnected, got {u:?}"),
        }
        assert_eq!(namespaces(&cache), ["kns.x", "kns.y"], "nothing deleted");

        std::fs::set_permissions(&b, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            next_valid(&mut rx, &mut cache).await,
            Update::InSync { .. }
        ));
        assert_eq!(namespaces(&cache), ["kns.x", "kns.y"]);
    });
}
