//! containerd's stdio (FIFOs, `file://` logs or a `binary://` logging
//! program, see [`super::logger`]) bridged to the agent's
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

use super::logger::{Logger, LoggerError, LoggerUri};

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

/// Where containerd wants an output stream.
#[derive(Debug, PartialEq, Eq)]
enum Target {
    Fifo(PathBuf),
    File(PathBuf),
    Binary(LoggerUri),
}

/// Where an output stream's copy writes.
#[derive(Debug)]
enum Sink {
    /// containerd's FIFO, opened by the copy.
    Fifo(PathBuf),
    /// A log file, opened by the copy.
    File(PathBuf),
    /// A pipe to a logging program.
    Pipe(File),
}

/// Errors bridging stdio.
#[derive(Debug, thiserror::Error)]
pub enum IoError {
    /// A URI scheme zygote does not handle.
    #[error("stdio {0:?}: only FIFOs, file:// and binary:// are supported")]
    Unsupported(String),
    /// The `binary://` logging program failed.
    #[error(transparent)]
    Logger(#[from] LoggerError),
    /// Attaching to the agent failed.
    #[error("attach {stream}: {source}")]
    Attach {
        /// Which stream.
        stream: &'static str,
        /// Cause.
        source: zygote_agent_api::ClientError,
    },
    /// The stdin copy's wake-up channel could not be made.
    #[error("a socket pair for the stdin copy")]
    Wake(#[source] std::io::Error),
}

fn target(uri: &str) -> Result<Option<Target>, IoError> {
    if uri.is_empty() {
        return Ok(None);
    }
    if let Some(path) = uri.strip_prefix("file://") {
        return Ok(Some(Target::File(path.into())));
    }
    if let Some(parsed) = LoggerUri::parse(uri) {
        return Ok(Some(Target::Binary(parsed?)));
    }
    if uri.contains("://") {
        return Err(IoError::Unsupported(uri.into()));
    }
    Ok(Some(Target::Fifo(uri.into())))
}

fn open_sink(s: Sink) -> std::io::Result<File> {
    match s {
        // Blocks until containerd's side has it open for reading.
        Sink::Fifo(p) => OpenOptions::new().write(true).open(p),
        Sink::File(p) => {
            if let Some(dir) = p.parent() {
                std::fs::create_dir_all(dir)?;
            }
            OpenOptions::new().create(true).append(true).open(p)
        }
        Sink::Pipe(f) => Ok(f),
    }
}

/// The output side of a bridged process: wait for it before reporting the exit.
#[derive(Debug, Default)]
pub struct Outputs {
    copies: Vec<JoinHandle<()>>,
    logger: Option<Logger>,
}

impl Outputs {
    /// Waits until every output byte was passed on (and a logging program,
    /// whose input then ended, exited: up to 10 s).
    pub fn drain(self) {
        for c in self.copies {
            let _ = c.join();
        }
        if let Some(l) = self.logger {
            l.finish();
        }
    }

    /// As [`Outputs::drain`] if every copy ends within `grace`; false if one
    /// is still going then (it goes on until its stream is shut down).
    pub fn drain_within(self, grace: Duration) -> bool {
        let start = std::time::Instant::now();
        while self.copies.iter().any(|c| !c.is_finished()) {
            if start.elapsed() >= grace {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        self.drain();
        true
    }
}

/// Output streams by name, with where each goes.
type Sinks = Vec<(&'static str, Sink)>;

/// The output streams to attach, with where each goes; starts a
/// `binary://` logging program for container `owner` (id, namespace).
fn output_sinks(
    paths: &StdioPaths,
    owner: (&str, &str),
) -> Result<(Sinks, Option<Logger>), IoError> {
    let stdout = target(&paths.stdout)?;
    let stderr = if paths.terminal {
        None
    } else {
        target(&paths.stderr)?
    };
    let mut sinks = Vec::new();
    match (stdout, stderr) {
        // containerd names one program for both streams.
        (Some(Target::Binary(uri)), stderr) => {
            let (logger, out, err) = Logger::start(&uri, owner.0, owner.1)?;
            sinks.push(("stdout", Sink::Pipe(out)));
            if stderr.is_some() {
                sinks.push(("stderr", Sink::Pipe(err)));
            }
            Ok((sinks, Some(logger)))
        }
        (_, Some(Target::Binary(_))) => Err(IoError::Unsupported(format!(
            "{} (binary:// for stderr alone)",
            paths.stderr
        ))),
        (stdout, stderr) => {
            for (name, target) in [("stdout", stdout), ("stderr", stderr)] {
                match target {
                    Some(Target::Fifo(p)) => sinks.push((name, Sink::Fifo(p))),
                    Some(Target::File(p)) => sinks.push((name, Sink::File(p))),
                    Some(Target::Binary(_)) | None => {}
                }
            }
            Ok((sinks, None))
        }
    }
}

/// A process's bridged stdio.
#[derive(Debug, Default)]
pub struct Bridged {
    /// The output side: drain it before reporting the exit.
    pub outputs: Outputs,
    /// The vsock connections, to shut down if the VM dies (their copies then
    /// end, and containerd's FIFOs close).
    pub streams: Vec<UnixStream>,
    /// The stdin copy, to be started where `CloseIO` finds it; it ends (and
    /// half-closes the stream: the process reads end of file) when
    /// containerd's side of the stdin FIFO closes, or when told to.
    pub stdin: Option<StdinCopy>,
}

/// A copy of containerd's stdin FIFO to the process's stdin stream. It is
/// made ready by `bridge` and started only once its owner can find it: the
/// moment it opens the FIFO, containerd's writer goes on and may call
/// `CloseIO`, which must then find the copy to pass on what it wrote.
#[derive(Debug)]
pub struct StdinCopy {
    /// The FIFO, the stream and the wake-up's receiving end, until started.
    ready: Option<(PathBuf, UnixStream, UnixStream)>,
    thread: Option<JoinHandle<()>>,
    /// Written to ask the copy to end.
    wake: UnixStream,
}

impl StdinCopy {
    fn new(fifo: PathBuf, conn: UnixStream) -> Result<StdinCopy, IoError> {
        let (wake, woken) = UnixStream::pair().map_err(IoError::Wake)?;
        Ok(StdinCopy {
            ready: Some((fifo, conn, woken)),
            thread: None,
            wake,
        })
    }

    /// Starts copying (once).
    pub fn start(&mut self) {
        if let Some((fifo, conn, woken)) = self.ready.take() {
            let thread = std::thread::Builder::new()
                .name("io-stdin".into())
                .spawn(move || copy_in(&fifo, conn, woken))
                .expect("spawn an io thread");
            self.thread = Some(thread);
        }
    }

    /// containerd's `CloseIO`: the copy passes on what is already in the
    /// FIFO, then ends and half-closes the stream, so the end of file
    /// follows the last byte in band (containerd calls it before it closes
    /// its own end). Returns whether it ended within `grace`. A copy never
    /// started has nothing to pass on: its stream closes with it.
    pub fn close(self, grace: Duration) -> bool {
        let Some(thread) = self.thread else {
            return true;
        };
        let _ = (&self.wake).write_all(b"x");
        let start = std::time::Instant::now();
        while !thread.is_finished() && start.elapsed() < grace {
            std::thread::sleep(Duration::from_millis(10));
        }
        thread.is_finished()
    }
}

/// Attaches the process `key`'s streams through `vsock` and starts copying;
/// When containerd's stdin ends, the stdin stream is half-closed: the end
/// of file travels in band, after every byte before it (a separate
/// `CloseStdin` call could overtake data still on its way). `owner`
/// (container id, namespace) is what a `binary://` logging program is told.
pub fn bridge(
    vsock: &Path,
    key: &str,
    owner: (&str, &str),
    paths: &StdioPaths,
) -> Result<Bridged, IoError> {
    let timeout = Duration::from_secs(30);
    let mut copies = Vec::new();
    // A logging program that is not handed its pipes is killed on the way out.
    let (streams, logger) = output_sinks(paths, owner)?;
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
            .spawn(move || copy_out(&key, stream, s, conn))
            .expect("spawn an io thread");
        copies.push(handle);
    }
    let stdin = match stdin {
        Some((fifo, conn)) => Some(StdinCopy::new(fifo, conn)?),
        None => None,
    };
    Ok(Bridged {
        outputs: Outputs { copies, logger },
        streams,
        stdin,
    })
}

fn copy_out(key: &str, stream: &str, s: Sink, mut conn: UnixStream) {
    let what = format!("{s:?}");
    let mut out = match open_sink(s) {
        Ok(f) => f,
        Err(e) => {
            tracing::warn!("{key} {stream}: cannot open {what}: {e}; its output is discarded");
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

/// Copies containerd's stdin FIFO to `conn` until the FIFO's writer goes
/// or `woken` is written to (then what the FIFO holds is passed on first),
/// then half-closes `conn`: the process reads end of file after it all.
fn copy_in(fifo: &Path, mut conn: UnixStream, woken: UnixStream) {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;
    // Non-blocking open: a FIFO nobody writes to yet must not hold the thread
    // where a close request cannot reach it.
    let input = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(fifo);
    if let Ok(mut input) = input {
        let mut buf = vec![0u8; 64 * 1024];
        let mut closing = false;
        loop {
            if !closing {
                let mut fds = [
                    libc::pollfd {
                        fd: input.as_raw_fd(),
                        events: libc::POLLIN,
                        revents: 0,
                    },
                    libc::pollfd {
                        fd: woken.as_raw_fd(),
                        events: libc::POLLIN,
                        revents: 0,
                    },
                ];
                // SAFETY: poll on two valid pollfds in a local array.
                let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
                if n < 0 {
                    if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                        continue;
                    }
                    break;
                }
                closing = fds[1].revents != 0;
                if fds[0].revents == 0 {
                    continue;
                }
            }
            match input.read(&mut buf) {
                // The writer went, or (closing) nothing more is waiting.
                Ok(0) => break,
                Ok(n) => {
                    if conn.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && !closing => {}
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
    }
    // The guest's process reads end of file after everything copied.
    let _ = conn.shutdown(std::net::Shutdown::Write);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// containerd calls CloseIO while its end of the stdin FIFO is still
    /// open: what it wrote still arrives, then the end of file.
    #[test]
    fn a_close_passes_on_what_was_written_then_ends_the_stream() {
        let dir = std::env::temp_dir().join(format!("zygote-stdin-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let fifo = dir.join("stdin");
        let c = std::ffi::CString::new(fifo.to_string_lossy().as_bytes()).unwrap();
        // SAFETY: a valid path string.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let (conn, mut guest) = UnixStream::pair().unwrap();
        let mut copy = StdinCopy::new(fifo.clone(), conn).unwrap();
        copy.start();
        // containerd's side: written, and still open.
        let mut writer = OpenOptions::new().write(true).open(&fifo).unwrap();
        writer.write_all(b"first\nsecond\n").unwrap();
        std::thread::sleep(Duration::from_millis(100));
        assert!(copy.close(Duration::from_secs(5)), "the copy ended");
        let mut got = String::new();
        guest.read_to_string(&mut got).unwrap();
        assert_eq!(got, "first\nsecond\n");
        drop(writer);

        // Its writer gone, a copy ends by itself; a close afterwards is fine.
        let (conn, mut guest) = UnixStream::pair().unwrap();
        let mut copy = StdinCopy::new(fifo.clone(), conn).unwrap();
        copy.start();
        let mut writer = OpenOptions::new().write(true).open(&fifo).unwrap();
        writer.write_all(b"all").unwrap();
        drop(writer);
        let mut got = String::new();
        guest.read_to_string(&mut got).unwrap();
        assert_eq!(got, "all");
        assert!(copy.close(Duration::from_secs(5)));

        // Never started (the process's start failed): nothing to pass on,
        // and its stream ends.
        let (conn, mut guest) = UnixStream::pair().unwrap();
        let copy = StdinCopy::new(fifo.clone(), conn).unwrap();
        assert!(copy.close(Duration::from_secs(5)));
        let mut got = String::new();
        guest.read_to_string(&mut got).unwrap();
        assert_eq!(got, "");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn stdio_targets() {
        assert_eq!(target("").unwrap(), None);
        assert_eq!(
            target("/run/containerd/fifo/1/c-stdout").unwrap(),
            Some(Target::Fifo("/run/containerd/fifo/1/c-stdout".into()))
        );
        assert_eq!(
            target("file:///var/log/c.log").unwrap(),
            Some(Target::File("/var/log/c.log".into()))
        );
        assert_eq!(
            target("binary:///usr/bin/logger?x=1").unwrap(),
            Some(Target::Binary(LoggerUri {
                path: "/usr/bin/logger".into(),
                args: vec!["x".into(), "1".into()],
            }))
        );
        let e = target("fluentd://host:24224").unwrap_err().to_string();
        assert!(e.contains("fluentd://"), "{e}");
    }
}
