//! Network namespaces owned by this process.
//!
//! Every namespace the lab makes is named `nplab<pid>-<lab>-<role>` and
//! mounted under `/run/netns` (so `ip netns exec` finds it). It is removed
//! when its [`Netns`] handle drops (also while unwinding from a panic), by the
//! Ctrl-C/SIGTERM handler installed on first use, and — if the process died
//! without either — by [`remove_stale`] at the start of a later run, which
//! recognises the prefix and a dead owner pid.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, MutexGuard, Once};

use nix::mount::{umount2, MntFlags};

use crate::LabError;

pub use testkit::netns::NETNS_DIR;
/// The first characters of every namespace name the lab makes.
pub const NAME_PREFIX: &str = "nplab";

/// Namespaces this process created and has not removed yet. Creation and
/// removal hold the lock, so the signal handler (which takes it and never
/// gives it back) cannot race with a namespace being made.
static LIVE: Mutex<BTreeSet<String>> = Mutex::new(BTreeSet::new());
static NEXT_LAB: AtomicU32 = AtomicU32::new(0);
static HANDLER: Once = Once::new();

fn live() -> MutexGuard<'static, BTreeSet<String>> {
    // A panic while holding the lock leaves the set itself consistent.
    LIVE.lock().unwrap_or_else(|p| p.into_inner())
}

/// A fresh name prefix for one lab: `nplab<pid>-<n>-`, unique within the
/// process (tests build labs concurrently) and across live processes.
pub fn new_lab_prefix() -> String {
    let n = NEXT_LAB.fetch_add(1, Ordering::Relaxed);
    format!("{NAME_PREFIX}{}-{n}-", std::process::id())
}

/// The pid encoded in a lab namespace name, if it is one.
pub fn owner_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix(NAME_PREFIX)?;
    let (pid, rest) = rest.split_once('-')?;
    let (lab, _) = rest.split_once('-')?;
    lab.parse::<u32>().ok()?;
    pid.parse().ok()
}

/// Names of all lab namespaces currently mounted (any process).
pub fn list_lab_namespaces() -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(NETNS_DIR) else {
        return Vec::new();
    };
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| owner_pid(n).is_some())
        .collect();
    names.sort();
    names
}

/// Removes lab namespaces left behind by processes that no longer exist
/// (killed by SIGKILL, or a crash the handlers could not see). Namespaces of
/// live processes — another test binary, a concurrent `cargo xtask e2e` — are
/// left alone. Returns the names removed.
pub fn remove_stale() -> Vec<String> {
    let me = std::process::id();
    let mut removed = Vec::new();
    for name in list_lab_namespaces() {
        let Some(pid) = owner_pid(&name) else {
            continue;
        };
        if pid == me || Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        if delete_mount(&name).is_ok() {
            removed.push(name);
        }
    }
    removed
}

/// Removes every namespace this process still owns. Used by the signal
/// handler; labs normally clean up through `Drop`.
fn remove_all_owned(live: &mut BTreeSet<String>) {
    for name in std::mem::take(live) {
        let _ = delete_mount(&name);
    }
}

fn install_signal_handler() {
    HANDLER.call_once(|| {
        let result = ctrlc::set_handler(|| {
            let mut live = live();
            let n = live.len();
            remove_all_owned(&mut live);
            eprintln!("nplab: interrupted; removed {n} lab network namespace(s)");
            // The lock stays held: nothing may create a namespace after this.
            std::process::exit(130);
        });
        if let Err(e) = result {
            // The embedding program has its own handler; Drop and
            // remove_stale still clean up.
            eprintln!("nplab: cannot install the Ctrl-C handler ({e}); relying on Drop");
        }
    });
}

/// Unmounts and unlinks `/run/netns/<name>`, as `ip netns del` does. The
/// kernel frees the namespace (and the veths in it) once nothing else
/// holds it.
fn delete_mount(name: &str) -> std::io::Result<()> {
    let path = Path::new(NETNS_DIR).join(name);
    match umount2(&path, MntFlags::MNT_DETACH) {
        Ok(()) | Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => {}
        Err(e) => return Err(e.into()),
    }
    match std::fs::remove_file(&path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Where a tool lives: `PATH`, then the sbin directories a non-login root
/// shell may lack.
pub use testkit::find_tool;

pub(crate) fn ip_tool() -> Result<PathBuf, LabError> {
    find_tool("ip").ok_or_else(|| LabError::Setup("`ip` (iproute2) is not installed".into()))
}

/// Runs `f` on a fresh thread inside the namespace `ip netns` knows as
/// `name` (one this process does not own, e.g. a lab node's, from another
/// program such as `cargo xtask demo`).
pub fn run_in<T: Send>(name: &str, f: impl FnOnce() -> T + Send) -> Result<T, LabError> {
    run_in_path(&Path::new(NETNS_DIR).join(name), f)
}

/// Runs `f` on a fresh thread inside the namespace mounted at `path`.
pub(crate) fn run_in_path<T: Send>(
    path: &Path,
    f: impl FnOnce() -> T + Send,
) -> Result<T, LabError> {
    Ok(testkit::netns::run_in(path, f)?)
}

/// One network namespace, removed on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates `/run/netns/<name>` with `ip netns add` (which also sets up
    /// `/run/netns` as iproute2 expects it).
    pub fn create(name: &str) -> Result<Netns, LabError> {
        install_signal_handler();
        let ip = ip_tool()?;
        let mut live = live();
        // Registered before it exists: a handler that runs between the two
        // steps simply finds nothing to unmount.
        live.insert(name.to_owned());
        let out = Command::new(ip)
            .args(["netns", "add", name])
            .stdin(Stdio::null())
            .output()
            .map_err(|e| LabError::io(format!("running ip netns add {name}"), e))?;
        if !out.status.success() {
            live.remove(name);
            return Err(LabError::command(
                format!("ip netns add {name}"),
                String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            ));
        }
        Ok(Netns {
            name: name.to_owned(),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn path(&self) -> PathBuf {
        Path::new(NETNS_DIR).join(&self.name)
    }

    /// Runs `f` on a fresh thread that has entered this namespace. Sockets
    /// made there stay in the namespace after the thread ends; `/proc/sys/net`
    /// and `/proc/thread-self/net` show the namespace's view. The thread is
    /// never reused, so no other code runs in the wrong namespace.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T, LabError> {
        run_in_path(&self.path(), f)
    }

    /// Writes `net.…` sysctls inside this namespace (dots become slashes;
    /// interface names here never contain dots).
    pub fn sysctls(&self, settings: &[(String, &str)]) -> Result<(), LabError> {
        let ns = self.name.clone();
        self.run(|| {
            for (key, value) in settings {
                let path = format!("/proc/sys/{}", key.replace('.', "/"));
                std::fs::write(&path, value)
                    .map_err(|e| LabError::io(format!("{ns}: sysctl {key}={value} ({path})"), e))?;
            }
            Ok(())
        })?
    }

    /// Runs `ip -n <ns> -batch -` with these commands; the first failing
    /// command fails the whole batch.
    pub fn ip_batch(&self, commands: &[String]) -> Result<(), LabError> {
        if commands.is_empty() {
            return Ok(());
        }
        let what = format!("ip -n {} -batch", self.name);
        let mut child = Command::new(ip_tool()?)
            .args(["-n", &self.name, "-batch", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| LabError::io(what.clone(), e))?;
        let mut script = commands.join("\n");
        script.push('\n');
        let write = child
            .stdin
            .take()
            .expect("stdin is piped")
            .write_all(script.as_bytes());
        let out = child
            .wait_with_output()
            .map_err(|e| LabError::io(what.clone(), e))?;
        if !out.status.success() || write.is_err() {
            return Err(LabError::command(
                what,
                format!(
                    "{}\ncommands:\n{script}",
                    String::from_utf8_lossy(&out.stderr).trim()
                ),
            ));
        }
        Ok(())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let mut live = live();
        if let Err(e) = delete_mount(&self.name) {
            eprintln!("nplab: cannot remove network namespace {}: {e}", self.name);
        }
        live.remove(&self.name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_pid_parses_only_lab_names() {
        assert_eq!(owner_pid("nplab123-0-node1"), Some(123));
        assert_eq!(owner_pid("nplab123-7-pod-ns.a"), Some(123));
        assert_eq!(owner_pid("nplab-0-node1"), None);
        assert_eq!(owner_pid("nplabx-0-node1"), None);
        assert_eq!(owner_pid("nplab123-node1"), None);
        assert_eq!(owner_pid("other"), None);
    }

    #[test]
    fn prefixes_are_unique() {
        let a = new_lab_prefix();
        let b = new_lab_prefix();
        assert_ne!(a, b);
        assert_eq!(owner_pid(&format!("{a}node1")), Some(std::process::id()));
    }
}
