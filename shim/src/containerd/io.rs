//! containerd's stdio (FIFOs, or `file://` logs) bridged to the agent's
//! per-stream vsock connections. Each stream is attached before the process
//! starts, so nothing it writes is lost; the agent reports the exit only
//! after the output was drained, and the bridge's copy ends at the stream's
//! end of file, after everything reached containerd's side.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;
use std::time::Duration;

use zygote_agent_api::attach_stdio;

/// A process's stdio as containerd gave it.
#[derive(Debug, Clone, Default)]
pub struct StdioPaths {
    /// stdin FIFO (empty: none).
    pub stdin: String,
    /// stdout FIFO or URI.
    pub stdout: String,
    /// stderr FIFO or URI.
    pub stderr: String,
    /// A terminal: everything is on stdout.
    pub terminal: bool,
}

/// Where an output stream goes.
#[derive(Debug, PartialEq, Eq)]
enum Sink {
    Fifo(PathBuf),
    File(PathBuf),
}

/// Errors bridging stdio.
#[derive(Debug, thiserror::Error)]
pub enum IoError {
    /// A URI scheme zygote does not handle.
    #[error("stdio {0:?}: only FIFOs and file:// are supported (binary:// is not)")]
    Unsupported(String),
    /// Attaching to the agent failed.
    #[error("attach {stream}: {source}")]
    Attach {
        /// Which stream.
        stream: &'static str,
        /// Cause.
        source: zygote_agent_api::ClientError,
    },
}

fn sink(target: &str) -> Result<Option<Sink>, IoError> {
    if target.is_empty() {
        return Ok(None);
    }
    if let Some(path) = target.strip_prefix("file://") {
        return Ok(Some(Sink::File(path.into())));
    }
    if target.contains("://") {
        return Err(IoError::Unsupported(target.into()));
    }
    Ok(Some(Sink::Fifo(target.into())))
}

fn open_sink(s: &Sink) -> std::io::Result<File> {
    match s {
        // Blocks until containerd's side has it open for reading.
        Sink::Fifo(p) => OpenOptions::new().write(true).open(p),
        Sink::File(p) => {
            if let Some(dir) = p.parent() {
                std::fs::create_dir_all(dir)?;
            }
            OpenOptions::new().create(true).append(true).open(p)
        }
    }
}

/// A process's bridged stdio.
#[derive(Debug, Default)]
pub struct Bridged {
    /// The output copies: join them before reporting the exit.
    pub outputs: Vec<JoinHandle<()>>,
    /// The vsock connections, to shut down if the VM dies (their copies then
    /// end, and containerd's FIFOs close).
    pub streams: Vec<UnixStream>,
}

/// Attaches the process `key`'s streams through `vsock` and starts copying;
/// `close_stdin` runs when containerd's stdin ends.
pub fn bridge(
    vsock: &Path,
    key: &str,
    paths: &StdioPaths,
    close_stdin: impl FnOnce() + Send + 'static,
) -> Result<Bridged, IoError> {
    let timeout = Duration::from_secs(30);
    let mut outputs = Vec::new();
    let mut streams: Vec<(&'static str, Sink)> = Vec::new();
    if let Some(s) = sink(&paths.stdout)? {
        streams.push(("stdout", s));
    }
    if !paths.terminal {
        if let Some(s) = sink(&paths.stderr)? {
            streams.push(("stderr", s));
        }
    }
    // Attach every stream first: a failure leaves no copy running.
    let mut attached = Vec::new();
    for (stream, s) in streams {
        let conn = attach_stdio(vsock, key, stream, timeout)
            .map_err(|source| IoError::Attach { stream, source })?;
        attached.push((stream, s, conn));
    }
    let stdin = if paths.stdin.is_empty() {
        None
    } else {
        let conn =
            attach_stdio(vsock, key, "stdin", timeout).map_err(|source| IoError::Attach {
                stream: "stdin",
                source,
            })?;
        Some((PathBuf::from(&paths.stdin), conn))
    };
    let mut streams = Vec::new();
    for (_, _, conn) in &attached {
        streams.extend(conn.try_clone().ok());
    }
    if let Some((_, conn)) = &stdin {
        streams.extend(conn.try_clone().ok());
    }
    for (stream, s, conn) in attached {
        let key = key.to_string();
        let handle = std::thread::Builder::new()
            .name(format!("io-{stream}"))
            .spawn(move || copy_out(&key, stream, &s, conn))
            .expect("spawn an io thread");
        outputs.push(handle);
    }
    if let Some((fifo, conn)) = stdin {
        std::thread::Builder::new()
            .name("io-stdin".into())
            .spawn(move || {
                copy_in(&fifo, conn);
                close_stdin();
            })
            .expect("spawn an io thread");
    }
    Ok(Bridged { outputs, streams })
}

fn copy_out(key: &str, stream: &str, s: &Sink, mut conn: UnixStream) {
    let mut out = match open_sink(s) {
        Ok(f) => f,
        Err(e) => {
            log::warn!("{key} {stream}: cannot open {s:?}: {e}; its output is discarded");
            let _ = std::io::copy(&mut conn, &mut std::io::sink());
            return;
        }
    };
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match conn.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if out.write_all(&buf[..n]).is_err() {
                    // containerd's reader is gone: keep draining the guest.
                    let _ = std::io::copy(&mut conn, &mut std::io::sink());
                    break;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
}

fn copy_in(fifo: &Path, mut conn: UnixStream) {
    // Blocks until containerd's side has it open for writing.
    let Ok(mut input) = File::open(fifo) else {
        return;
    };
    let _ = std::io::copy(&mut input, &mut conn);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stdio_targets() {
        assert_eq!(sink("").unwrap(), None);
        assert_eq!(
            sink("/run/containerd/fifo/1/c-stdout").unwrap(),
            Some(Sink::Fifo("/run/containerd/fifo/1/c-stdout".into()))
        );
        assert_eq!(
            sink("file:///var/log/c.log").unwrap(),
            Some(Sink::File("/var/log/c.log".into()))
        );
        let e = sink("binary:///usr/bin/logger?x=1")
            .unwrap_err()
            .to_string();
        assert!(e.contains("binary://"), "{e}");
    }
}
