//! Test helpers: a throw-away network namespace per test.
//!
//! All kernel work in tests happens inside a namespace created here, never
//! in the host's initial namespace. [`Netns::enter`] creates one with
//! `ip netns add` (so the `nft` oracle can reach it with `ip netns exec`)
//! and moves the *calling thread* into it; dropping the guard moves the
//! thread back and deletes the namespace, also when the test panics.
//! Create the [`crate::NftProgrammer`] after `enter`, on the same thread.

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A named network namespace, possibly entered by the current thread.
#[derive(Debug)]
pub struct Netns {
    name: String,
    /// The thread's namespace before `enter`, restored on drop.
    original: Option<File>,
}

fn setns(fd: &File) -> io::Result<()> {
    // SAFETY: plain syscall on a valid namespace descriptor.
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
        let ns = File::open(format!("/run/netns/{}", guard.name))?;
        setns(&ns)?;
        guard.original = Some(original);
        Ok(guard)
    }

    /// Creates a uniquely named namespace without entering it (for the
    /// `nft` oracle to load a reference ruleset into).
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
                "ip netns add {name} failed: {st}"
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

    /// Runs `nft ARGS…` inside the namespace and returns its stdout.
    pub fn nft(&self, args: &[&str]) -> io::Result<String> {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.name, "nft"])
            .args(args)
            .output()?;
        if !out.status.success() {
            return Err(io::Error::other(format!(
                "nft {args:?} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Runs `nft [EXTRA…] -f -` with `script` on stdin inside the namespace;
    /// returns stdout (and stderr, where `--debug` output goes).
    pub fn nft_script(&self, extra: &[&str], script: &str) -> io::Result<(String, String)> {
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.name, "nft"])
            .args(extra)
            .args(["-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        child
            .stdin
            .take()
            .ok_or_else(|| io::Error::other("no stdin"))?
            .write_all(script.as_bytes())?;
        let out = child.wait_with_output()?;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        if !out.status.success() {
            return Err(io::Error::other(format!(
                "nft -f failed: {stderr}\nscript:\n{script}"
            )));
        }
        Ok((stdout, stderr))
    }

    /// Runs a command inside the namespace (e.g. `ip link add …`).
    pub fn exec(&self, cmd: &[&str]) -> io::Result<String> {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(cmd)
            .output()?;
        if !out.status.success() {
            return Err(io::Error::other(format!(
                "{cmd:?} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Some(original) = &self.original {
            if let Err(e) = setns(original) {
                eprintln!("testutil: could not return to the original netns: {e}");
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
