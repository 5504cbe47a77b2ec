//! containerd's `binary://` logging: a program the shim starts per process
//! that receives its output, as containerd's own shims do it
//! (`pkg/process/io.go`): `binary:///path/to/logger?key=value&flag` runs
//! `/path/to/logger key value flag` with `CONTAINER_ID` and
//! `CONTAINER_NAMESPACE` in its environment, the read ends of the stdout and
//! stderr pipes as fds 3 and 4, and the write end of a "ready" pipe as fd 5,
//! which it closes (or writes a byte to) once it is ready to read. When the
//! process's output ends the pipes close; the logger then has 10 s to exit
//! before it is killed.

use std::fs::File;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a logger may take to say it is ready, and to exit after its input ended.
const GRACE: Duration = Duration::from_secs(10);

/// A `binary://` URI, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoggerUri {
    /// The program (an absolute path).
    pub path: PathBuf,
    /// Its arguments, from the query (`key value` pairs; a key without a value alone).
    pub args: Vec<String>,
}

/// Errors starting a logger.
#[derive(Debug, thiserror::Error)]
pub enum LoggerError {
    /// The URI is not a `binary://` one zygote can run.
    #[error("log URI {0:?}: {1}")]
    Uri(String, &'static str),
    /// The program could not be started.
    #[error("logging binary {path}: {source}")]
    Spawn {
        /// The program.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// It did not close or write its ready pipe in time.
    #[error("logging binary {0} did not say it was ready within {GRACE:?}")]
    NotReady(PathBuf),
}

/// Decodes `%XX` escapes and `+` (form encoding, as Go's `url.Query`).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                let hex = |c: u8| (c as char).to_digit(16);
                match (hex(b[i + 1]), hex(b[i + 2])) {
                    (Some(h), Some(l)) => {
                        out.push((h * 16 + l) as u8);
                        i += 2;
                    }
                    _ => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl LoggerUri {
    /// Parses `binary:///path?query`; None if `uri` is not a `binary://` URI.
    pub fn parse(uri: &str) -> Option<Result<Self, LoggerError>> {
        let rest = uri.strip_prefix("binary://")?;
        let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
        let path = unescape(path);
        if !path.starts_with('/') {
            return Some(Err(LoggerError::Uri(
                uri.into(),
                "the program must be an absolute path (binary:///path)",
            )));
        }
        let mut args = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            args.push(unescape(k));
            if !v.is_empty() {
                args.push(unescape(v));
            }
        }
        Some(Ok(LoggerUri {
            path: path.into(),
            args,
        }))
    }
}

/// A running logging program (killed if dropped before [`Logger::finish`]).
#[derive(Debug)]
pub struct Logger {
    child: Option<Child>,
    path: PathBuf,
}

/// A pipe with both ends close-on-exec.
fn pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills `fds` with two new descriptors on success.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: both descriptors are new and owned by nothing else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Whether `fd` becomes readable (data or end of file) within `timeout`.
fn readable_within(fd: &File, timeout: Duration) -> bool {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        // SAFETY: one valid pollfd for the call's duration.
        let n = unsafe { libc::poll(&mut p, 1, left.as_millis() as i32) };
        if n > 0 {
            return true;
        }
        let interrupted =
            n < 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted;
        if !interrupted || left.is_zero() {
            return false;
        }
    }
}

impl Logger {
    /// Starts `uri`'s program for container `id` in `namespace` and waits
    /// until it is ready. Returns it with the write ends of its stdout and
    /// stderr pipes.
    pub fn start(
        uri: &LoggerUri,
        id: &str,
        namespace: &str,
    ) -> Result<(Logger, File, File), LoggerError> {
        let spawn_err = |source| LoggerError::Spawn {
            path: uri.path.clone(),
            source,
        };
        let (out_r, out_w) = pipe().map_err(spawn_err)?;
        let (err_r, err_w) = pipe().map_err(spawn_err)?;
        let (ready_r, ready_w) = pipe().map_err(spawn_err)?;
        let inherited = [out_r.as_raw_fd(), err_r.as_raw_fd(), ready_w.as_raw_fd()];
        let mut cmd = Command::new(&uri.path);
        cmd.args(&uri.args)
            .env("CONTAINER_ID", id)
            .env("CONTAINER_NAMESPACE", namespace)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // SAFETY: the closure only calls fcntl and dup2 (async-signal-safe)
        // on descriptors the parent keeps open until spawn returns.
        unsafe {
            cmd.pre_exec(move || {
                // Out of the way first (a source may sit on a target number),
                // then onto 3, 4, 5 (dup2 clears close-on-exec).
                let mut high = [0; 3];
                for (h, fd) in high.iter_mut().zip(inherited) {
                    *h = libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 10);
                    if *h < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                for (target, h) in (3..).zip(high) {
                    if libc::dup2(h, target) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            })
        };
        let child = cmd.spawn().map_err(spawn_err)?;
        drop((out_r, err_r, ready_w));
        let logger = Logger {
            child: Some(child),
            path: uri.path.clone(),
        };
        let mut ready = File::from(ready_r);
        if !readable_within(&ready, GRACE) {
            return Err(LoggerError::NotReady(uri.path.clone()));
        }
        let _ = ready.read(&mut [0u8; 1]);
        Ok((logger, File::from(out_w), File::from(err_w)))
    }

    /// Waits up to 10 s for the logger to exit (its input ended), then
    /// kills it. Returns whether it exited by itself.
    pub fn finish(mut self) -> bool {
        let Some(mut child) = self.child.take() else {
            return true;
        };
        let deadline = Instant::now() + GRACE;
        while Instant::now() < deadline {
            match child.try_wait() {
                Ok(Some(_)) | Err(_) => return true,
                Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
        tracing::warn!(
            "logging binary {} did not exit {GRACE:?} after its input ended: killed",
            self.path.display()
        );
        let _ = child.kill();
        let _ = child.wait();
        false
    }
}

impl Drop for Logger {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris_parse_as_containerd_does() {
        assert_eq!(
            LoggerUri::parse("binary:///usr/bin/log%20ger?dir=%2Fvar%2Flog&flag&n=a+b")
                .unwrap()
                .unwrap(),
            LoggerUri {
                path: "/usr/bin/log ger".into(),
                args: vec![
                    "dir".into(),
                    "/var/log".into(),
                    "flag".into(),
                    "n".into(),
                    "a b".into()
                ],
            }
        );
        assert_eq!(
            LoggerUri::parse("binary:///bin/x").unwrap().unwrap().args,
            Vec::<String>::new()
        );
        assert!(LoggerUri::parse("/run/fifo").is_none());
        assert!(LoggerUri::parse("binary://relative").unwrap().is_err());
    }

    /// A real logger (a shell script) gets the two streams on fds 3 and 4,
    /// its environment and arguments, says it is ready by closing fd 5, and
    /// exits when its input ends.
    #[test]
    fn a_logger_receives_both_streams_and_exits_at_their_end() {
        use std::io::Write;
        let dir = std::env::temp_dir().join(format!("zygote-logger-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let script = dir.join("logger");
        std::fs::write(
            &script,
            "#!/bin/sh\nexec 5>&-\necho \"$CONTAINER_NAMESPACE/$CONTAINER_ID $*\" > \"$2/env\"\n\
             cat <&3 > \"$2/out\" & cat <&4 > \"$2/err\" & wait\n",
        )
        .unwrap();
        std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let uri = LoggerUri::parse(&format!(
            "binary://{}?dir={}",
            script.display(),
            dir.display()
        ))
        .unwrap()
        .unwrap();
        let (logger, mut out, mut err) = Logger::start(&uri, "c1", "ns1").unwrap();
        out.write_all(b"to stdout\n").unwrap();
        err.write_all(b"to stderr\n").unwrap();
        drop((out, err));
        assert!(
            logger.finish(),
            "it exited by itself at the end of its input"
        );
        let read = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap();
        assert_eq!(read("out"), "to stdout\n");
        assert_eq!(read("err"), "to stderr\n");
        assert_eq!(read("env"), format!("ns1/c1 dir {}\n", dir.display()));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_missing_logger_is_an_error() {
        let uri = LoggerUri::parse("binary:///nonexistent/logger")
            .unwrap()
            .unwrap();
        let e = Logger::start(&uri, "c", "n").unwrap_err().to_string();
        assert!(e.contains("/nonexistent/logger"), "{e}");
    }
}
