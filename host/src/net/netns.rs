//! Running work inside another network namespace: on a thread of its own
//! that joins it (`setns` changes only the calling thread), so the rest of
//! the process stays where it is. Sockets and taps opened there belong to
//! that namespace for their whole life.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;

/// Errors entering a namespace.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    /// The namespace file could not be opened (it does not exist, or is not
    /// ours to read).
    #[error("cannot open network namespace {path}")]
    Open {
        /// The path.
        path: std::path::PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The file is not a network namespace, or joining it was refused.
    #[error("cannot join network namespace {path}")]
    Join {
        /// The path.
        path: std::path::PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The helper thread could not be started, or panicked.
    #[error("network namespace helper thread failed")]
    Thread,
}

/// Runs `work` on a new thread inside the network namespace at `path`
/// (e.g. `/var/run/netns/cni-…` or `/proc/PID/ns/net`) and returns its result.
pub fn run_in<T: Send + 'static>(
    path: &Path,
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, NetnsError> {
    let ns = File::open(path).map_err(|source| NetnsError::Open {
        path: path.into(),
        source,
    })?;
    let owned = path.to_path_buf();
    let thread = std::thread::Builder::new()
        .name("zygote-netns".into())
        .spawn(move || {
            // SAFETY: setns on an fd we own; it changes only this thread's
            // network namespace, and this thread ends after `work`.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(NetnsError::Join {
                    path: owned,
                    source: std::io::Error::last_os_error(),
                });
            }
            Ok(work())
        })
        .map_err(|_| NetnsError::Thread)?;
    thread.join().map_err(|_| NetnsError::Thread)?
}
