//! Network namespaces for tests: a throw-away namespace per test
//! ([`Netns`]), and running code inside an existing one ([`run_in`]).
//!
//! All kernel work in tests happens inside a namespace created here, never
//! in the host's initial namespace. [`Netns::enter`] creates one with
//! `ip netns add` (so oracles such as `nft` and the iptables tools reach it
//! with `ip netns exec`) and moves the *calling thread* into it; dropping the
//! guard moves the thread back and deletes the namespace, also when the
//! test panics. Open netlink sockets after `enter`, on the same thread.
//! (The kernel lab's namespaces, with their crash clean-up, are
//! `lab::netns`.)

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

use crate::TestkitError;

/// Where `ip netns add` mounts named namespaces.
pub const NETNS_DIR: &str = "/run/netns";

/// Runs `f` on a fresh thread that has entered the namespace mounted at
/// `path`, and returns what it returns. The thread is never reused, so no
/// other code runs in the wrong namespace; sockets made there stay in the
/// namespace after the thread ends. A panic in `f` is resumed here.
pub fn run_in<T: Send>(path: &Path, f: impl FnOnce() -> T + Send) -> Result<T, TestkitError> {
    let file = File::open(path).map_err(|e| TestkitError::io(path.display().to_string(), e))?;
    std::thread::scope(|s| {
        s.spawn(move || {
            setns(&file)
                .map_err(|e| TestkitError::io(format!("setns into {}", path.display()), e))?;
            Ok(f())
        })
        .join()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

/// Moves the calling thread into the namespace `ip netns` knows as `name`
/// for good: for a thread spawned to work there (a server, a client).
pub fn move_thread_into(name: &str) -> io::Result<()> {
    setns(&File::open(Path::new(NETNS_DIR).join(name))?)
}

/// [`run_in`] for the namespace `ip netns` knows as `name`.
pub fn run_in_named<T: Send>(name: &str, f: impl FnOnce() -> T + Send) -> Result<T, TestkitError> {
    run_in(&Path::new(NETNS_DIR).join(name), f)
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A named network namespace owned by the test, possibly entered by the
/// current thread; deleted on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
    /// The thread's namespace before `enter`, restored on drop.
    original: Option<File>,
}

fn setns(fd: &File) -> io::Result<()> {
    // SAFETY: plain syscall on a valid namespace descriptor; it moves only
    // the calling thread.
    let rc = unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

impl Netns {
    /// Creates a uniquely named namespace and enters it on this thread.
    pub fn enter(tag: &str) -> io::Result<Netns> {
        let mut guard = Netns::create(tag)?;
        let original = File::open("/proc/thread-self/ns/net")?;
        setns(&File::open(guard.path())?)?;
        guard.original = Some(original);
        Ok(guard)
    }

    /// Creates a uniquely named namespace (`nftp-<tag>-<pid>-<n>`) without
    /// entering it.
    pub fn create(tag: &str) -> io::Result<Netns> {
        let name = format!(
            "nftp-{}-{}-{}",
            tag,
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let st = Command::new("ip").args(["netns", "add", &name]).status()?;
        if !st.success() {
            return Err(io::Error::other(format!(
                "ip netns add {name} failed: {st} (needs root and iproute2)"
            )));
        }
        // From here on the guard owns the namespace: Drop deletes it.
        Ok(Netns {
            name,
            original: None,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn path(&self) -> PathBuf {
        Path::new(NETNS_DIR).join(&self.name)
    }

    /// `ip netns exec <name>`: the prefix that runs a command inside.
    pub fn command_prefix(&self) -> Vec<String> {
        ["ip", "netns", "exec", &self.name]
            .map(str::to_owned)
            .to_vec()
    }

    /// Runs `cmd` inside with `stdin` on its standard input; returns
    /// whether it succeeded and its stdout followed by its stderr.
    pub fn output(&self, cmd: &[&str], stdin: &str) -> io::Result<(bool, String, String)> {
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(cmd)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        // A command that does not read its input closes the pipe early:
        // its status says more than the write error.
        let _ = child
            .stdin
            .take()
            .expect("stdin is piped")
            .write_all(stdin.as_bytes());
        let out = child.wait_with_output()?;
        Ok((
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ))
    }

    /// Runs `cmd` inside (e.g. `ip link add …`) and returns its stdout; a
    /// failure is an error carrying its stderr.
    pub fn exec(&self, cmd: &[&str]) -> io::Result<String> {
        self.exec_with_input(cmd, "")
    }

    /// [`exec`](Self::exec) with `stdin` on the command's standard input.
    pub fn exec_with_input(&self, cmd: &[&str], stdin: &str) -> io::Result<String> {
        let (ok, stdout, stderr) = self.output(cmd, stdin)?;
        if !ok {
            return Err(io::Error::other(format!("{cmd:?} failed: {stderr}")));
        }
        Ok(stdout)
    }

    /// Runs `nft ARGS…` inside the namespace and returns its stdout.
    pub fn nft(&self, args: &[&str]) -> io::Result<String> {
        let cmd: Vec<&str> = std::iter::once("nft").chain(args.iter().copied()).collect();
        self.exec(&cmd)
    }

    /// Runs `nft [EXTRA…] -f -` with `script` on stdin inside the namespace;
    /// returns stdout and stderr (where `--debug` output goes).
    pub fn nft_script(&self, extra: &[&str], script: &str) -> io::Result<(String, String)> {
        let mut cmd = vec!["nft"];
        cmd.extend_from_slice(extra);
        cmd.extend(["-f", "-"]);
        let (ok, stdout, stderr) = self.output(&cmd, script)?;
        if !ok {
            return Err(io::Error::other(format!(
                "nft -f failed: {stderr}\nscript:\n{script}"
            )));
        }
        Ok((stdout, stderr))
    }

    /// Runs `f` on a fresh thread inside this namespace (see [`run_in`]).
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T, TestkitError> {
        run_in(&self.path(), f)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Some(original) = &self.original {
            if let Err(e) = setns(original) {
                eprintln!("testkit: could not return to the original netns: {e}");
            }
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// Whether the `nft` binary (the test oracle) is installed.
pub fn nft_available() -> bool {
    Command::new("nft")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_namespace_is_named_in_the_error() {
        let err = run_in_named("testkit-no-such-namespace", || ()).unwrap_err();
        assert!(
            err.to_string()
                .contains("/run/netns/testkit-no-such-namespace"),
            "{err}"
        );
    }
}
