//! Test support, one home per concern: [`netns`] (network namespaces),
//! [`etcd`] (a real etcd server), [`cluster`] (cluster states and the load
//! tests' synthetic cluster), tool lookup, and a fake Kubernetes API server
//! that is a **test double** ([`apiserver`]), since no kube-apiserver can
//! be installed where the tests run.
//!
//! It depends only on `model`, so every other crate can use it (as a
//! dev-dependency; `lab` and `bench` as a dependency) without a cycle. It
//! pulls in nothing that needs `protoc` (no etcd client), so `xtask` stays
//! free of `etcd-client`.

pub mod apiserver;
pub mod cluster;
pub mod etcd;
pub mod netns;

use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Output};

/// A `cargo` command (the one running us, if any) without the variables
/// cargo sets for the program it runs (`CARGO_MANIFEST_DIR`, `CARGO_PKG_*`,
/// …). Build scripts such as ring's watch `CARGO_MANIFEST_DIR`: a nested
/// `cargo build` that inherits it from `cargo xtask` or from a test would
/// see it change and rebuild them (and all that depends on them) every
/// time the caller changes.
pub fn cargo_command() -> Command {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    for (key, _) in std::env::vars_os() {
        let Some(key) = key.to_str() else { continue };
        let set_for_the_run = key.starts_with("CARGO_PKG_")
            || key.starts_with("CARGO_BIN_")
            || matches!(
                key,
                "CARGO_MANIFEST_DIR"
                    | "CARGO_MANIFEST_PATH"
                    | "CARGO_MANIFEST_LINKS"
                    | "CARGO_CRATE_NAME"
                    | "CARGO_PRIMARY_PACKAGE"
                    | "CARGO_TARGET_TMPDIR"
                    | "CARGO_RUSTC_CURRENT_DIR"
            );
        if set_for_the_run {
            cmd.env_remove(key);
        }
    }
    cmd
}

/// Scenario files or directories to run besides the project's own
/// `tests/scenarios`: the paths in `NFTPOLICY_EXTRA_SCENARIOS` (separated
/// like `PATH`), e.g. another project's examples. Nothing requires any. A
/// named path that does not exist is kept, so that loading it fails and
/// names it instead of passing unnoticed.
pub fn extra_scenario_paths() -> Vec<PathBuf> {
    std::env::var_os("NFTPOLICY_EXTRA_SCENARIOS")
        .map(|list| {
            std::env::split_paths(&list)
                .filter(|p| !p.as_os_str().is_empty())
                .collect()
        })
        .unwrap_or_default()
}

/// What went wrong setting up test support; the callers turn it into their
/// own error type or a panic.
#[derive(Debug, thiserror::Error)]
pub enum TestkitError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} failed: {detail}")]
    Command { what: String, detail: String },
    /// A program the test needs is not installed.
    #[error("{0}")]
    Missing(String),
}

impl TestkitError {
    pub(crate) fn io(what: impl Into<String>, source: std::io::Error) -> TestkitError {
        TestkitError::Io {
            what: what.into(),
            source,
        }
    }
}

/// Where a tool lives: `PATH`, then the sbin directories a non-login root
/// shell may lack.
pub fn find_tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(
            ["/usr/local/sbin", "/usr/sbin", "/sbin", "/usr/bin", "/bin"]
                .iter()
                .map(PathBuf::from),
        )
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// The child gets SIGKILL when the thread that started it ends, so a test
/// process that dies (even by SIGKILL) leaves no server behind.
pub fn set_parent_death_signal(cmd: &mut Command) {
    // SAFETY: prctl is async-signal-safe; nothing else runs between fork
    // and exec here.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// A port on 127.0.0.1 that was free when asked (the caller binds it next;
/// a port taken in between is the caller's to retry).
pub fn free_loopback_port() -> Result<u16, TestkitError> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")
        .map_err(|e| TestkitError::io("finding a free loopback port", e))?;
    listener
        .local_addr()
        .map(|a| a.port())
        .map_err(|e| TestkitError::io("finding a free loopback port", e))
}

/// The members of ipset `name` in `ipset save` output, as it prints them.
pub fn ipset_members(save: &str, name: &str) -> std::collections::BTreeSet<String> {
    let prefix = format!("add {name} ");
    save.lines()
        .filter_map(|l| l.strip_prefix(&prefix))
        .map(str::to_owned)
        .collect()
}

/// Panics, naming `what` and showing the exit status and stderr, unless the
/// command exited 0.
#[track_caller]
pub fn assert_success(out: &Output, what: impl std::fmt::Display) {
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Panics unless the command exited with `code` and its stderr says
/// `says`; shows the stderr either way.
#[track_caller]
pub fn assert_refused(out: &Output, code: i32, says: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "{stderr}");
    assert!(stderr.contains(says), "{stderr}");
}

/// Runs `cmd` to completion and returns its output; panics as
/// [`assert_success`] does unless it started and exited 0.
#[track_caller]
pub fn output_ok(cmd: &mut Command, what: impl std::fmt::Display) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot start: {e}"));
    assert_success(&out, what);
    out
}
