//! Shared by the agent's integration tests: the workspace, the binary under
//! test, and temporary directories.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

/// The workspace root.
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap()
}

/// A file of the workspace, by its path from the root.
pub fn read(rel: &str) -> String {
    let p = workspace().join(rel);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("reading {}: {e}", p.display()))
}

/// The binary under test, without any `NFTPOLICY_*` variable of the
/// caller's environment (they would show up in `--help` as values and
/// change what the binary does).
pub fn nftpolicy() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_nftpolicy"));
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("NFTPOLICY_") {
            c.env_remove(k);
        }
    }
    c
}

/// A directory that exists while this value does.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        // Unique within the process too: tests run in parallel threads, and
        // two with one tag must not remove each other's directory.
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let p =
            std::env::temp_dir().join(format!("nftpolicy-test-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
