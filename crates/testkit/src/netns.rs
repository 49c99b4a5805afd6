//! Running code inside an existing network namespace.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;

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
            // SAFETY: a plain syscall on a valid namespace descriptor; it
            // moves only this (scoped, short-lived) thread.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(TestkitError::io(
                    format!("setns into {}", path.display()),
                    std::io::Error::last_os_error(),
                ));
            }
            Ok(f())
        })
        .join()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

/// [`run_in`] for the namespace `ip netns` knows as `name`.
pub fn run_in_named<T: Send>(name: &str, f: impl FnOnce() -> T + Send) -> Result<T, TestkitError> {
    run_in(&Path::new(NETNS_DIR).join(name), f)
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
