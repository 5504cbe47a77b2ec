//! A blocking host-side client for the agent, through a VM's hybrid-vsock socket.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::frame::{read_frame, write_frame};
use crate::messages::{Request, Response, request, response};

/// Errors talking to the agent.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The VM's vsock socket could not be reached.
    #[error("cannot connect to {path}")]
    Connect {
        /// The socket.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The guest did not accept the connection (`OK` not received).
    #[error("the guest refused or did not answer the vsock connection to port {port}")]
    Handshake {
        /// The guest port.
        port: u32,
    },
    /// The agent did not become reachable in time.
    #[error("the agent did not answer within {0:?}")]
    Timeout(Duration),
    /// Reading or writing a frame failed.
    #[error("agent connection failed")]
    Io(#[from] std::io::Error),
    /// No answer within the connection's timeout. The request may still be
    /// carried out: the connection is out of step with its requests.
    #[error("the agent did not answer within {0:?}")]
    NoAnswer(Duration),
    /// The agent answered with an error.
    #[error("agent error {code}: {message}")]
    Agent {
        /// The code.
        code: i32,
        /// The message.
        message: String,
    },
    /// The agent's answer did not match the request.
    #[error("unexpected answer from the agent")]
    Unexpected,
}

impl ClientError {
    /// The agent's error code, when the agent answered with an error.
    pub fn code(&self) -> Option<crate::Code> {
        match self {
            ClientError::Agent { code, .. } => crate::Code::try_from(*code).ok(),
            _ => None,
        }
    }

    /// Whether the connection is unusable after this error (broken, or out
    /// of step with its requests): drop it and dial again.
    pub fn breaks_connection(&self) -> bool {
        matches!(
            self,
            ClientError::Io(_) | ClientError::NoAnswer(_) | ClientError::Unexpected
        )
    }
}

/// A connection to the agent.
#[derive(Debug)]
pub struct AgentClient {
    stream: UnixStream,
    next_id: u64,
}

/// Opens a hybrid-vsock stream to guest `port` through the socket at `uds`.
pub fn connect_vsock(uds: &Path, port: u32, timeout: Duration) -> Result<UnixStream, ClientError> {
    let stream = UnixStream::connect(uds).map_err(|source| ClientError::Connect {
        path: uds.into(),
        source,
    })?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    (&stream).write_all(format!("CONNECT {port}\n").as_bytes())?;
    let mut line = String::new();
    // Read the OK line byte by byte so nothing after it is swallowed by a buffer.
    let mut reader = BufReader::with_capacity(1, &stream);
    match reader.read_line(&mut line) {
        Ok(n) if n > 0 && line.starts_with("OK ") => Ok(stream),
        Ok(_) => Err(ClientError::Handshake { port }),
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            Err(ClientError::Handshake { port })
        }
        Err(e) => Err(e.into()),
    }
}

/// Opens container `id`'s `stream` (`stdin`, `stdout` or `stderr`) as its own
/// vsock connection (see [`crate::STDIO_PORT`]).
pub fn attach_stdio(
    uds: &Path,
    id: &str,
    stream: &str,
    timeout: Duration,
) -> Result<UnixStream, ClientError> {
    let conn = connect_vsock(uds, crate::STDIO_PORT, timeout)?;
    (&conn).write_all(format!("{id} {stream}\n").as_bytes())?;
    conn.set_read_timeout(None)?;
    conn.set_write_timeout(None)?;
    Ok(conn)
}

impl AgentClient {
    /// Another handle on the connection (to shut it down from another thread).
    pub fn try_clone_stream(&self) -> std::io::Result<UnixStream> {
        self.stream.try_clone()
    }

    /// Connects once; fails if the agent is not listening yet.
    pub fn connect(uds: &Path, timeout: Duration) -> Result<Self, ClientError> {
        let stream = connect_vsock(uds, crate::AGENT_PORT, timeout)?;
        Ok(AgentClient { stream, next_id: 1 })
    }

    /// Connects, retrying every `interval` until `deadline` (the guest may still be booting).
    pub fn connect_until(
        uds: &Path,
        deadline: Instant,
        interval: Duration,
    ) -> Result<Self, ClientError> {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(ClientError::Timeout(interval));
            }
            match Self::connect(uds, left.min(Duration::from_secs(5))) {
                Ok(c) => return Ok(c),
                Err(ClientError::Handshake { .. } | ClientError::Connect { .. }) => {
                    std::thread::sleep(interval)
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Sets how long one call may take.
    pub fn set_timeout(&self, timeout: Duration) -> std::io::Result<()> {
        self.stream.set_read_timeout(Some(timeout))?;
        self.stream.set_write_timeout(Some(timeout))
    }

    /// As [`AgentClient::call`], but when no answer has come within the
    /// connection's timeout, waits another timeout for as long as
    /// `keep_waiting` says the agent may still answer (e.g. its guest is
    /// working, only slowly).
    pub fn call_while(
        &mut self,
        body: request::Body,
        mut keep_waiting: impl FnMut() -> bool,
    ) -> Result<response::Body, ClientError> {
        let id = self.send(body)?;
        let timeout = self
            .stream
            .read_timeout()?
            .unwrap_or(Duration::from_secs(60));
        // Nothing is read until the answer's first byte is there, so that a
        // wait that gives up leaves no frame half read.
        while !readable(&self.stream, timeout)? {
            if !keep_waiting() {
                return Err(ClientError::NoAnswer(timeout));
            }
        }
        self.receive(id)
    }

    /// Sends `body` and returns the answer's body (an agent error becomes [`ClientError::Agent`]).
    pub fn call(&mut self, body: request::Body) -> Result<response::Body, ClientError> {
        let id = self.send(body)?;
        self.receive(id)
    }

    fn send(&mut self, body: request::Body) -> Result<u64, ClientError> {
        let id = self.next_id;
        self.next_id += 1;
        write_frame(
            &mut self.stream,
            &Request {
                id,
                body: Some(body),
            },
        )?;
        Ok(id)
    }

    fn receive(&mut self, id: u64) -> Result<response::Body, ClientError> {
        let resp: Response = read_frame(&mut self.stream).map_err(|e| match e.kind() {
            // What a read timeout (SO_RCVTIMEO) returns.
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => ClientError::NoAnswer(
                self.stream
                    .read_timeout()
                    .ok()
                    .flatten()
                    .unwrap_or_default(),
            ),
            _ => ClientError::Io(e),
        })?;
        if resp.id != id {
            return Err(ClientError::Unexpected);
        }
        match resp.body {
            Some(response::Body::Error(e)) => Err(ClientError::Agent {
                code: e.code,
                message: e.message,
            }),
            Some(b) => Ok(b),
            None => Err(ClientError::Unexpected),
        }
    }

    /// Pings the agent.
    pub fn ping(&mut self) -> Result<crate::Pong, ClientError> {
        match self.call(request::Body::Ping(crate::Ping {}))? {
            response::Body::Pong(p) => Ok(p),
            _ => Err(ClientError::Unexpected),
        }
    }
}

/// Whether `stream` has something to read (or its peer hung up) within `timeout`.
fn readable(stream: &UnixStream, timeout: Duration) -> std::io::Result<bool> {
    use std::os::fd::AsRawFd;
    let mut fd = libc::pollfd {
        fd: stream.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
    loop {
        // SAFETY: one valid pollfd for the duration of the call.
        match unsafe { libc::poll(&mut fd, 1, ms) } {
            -1 if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted => {}
            -1 => return Err(std::io::Error::last_os_error()),
            n => return Ok(n > 0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_agent_that_does_not_answer_in_time_is_said_so() {
        let (ours, _agent) = UnixStream::pair().unwrap();
        let mut client = AgentClient {
            stream: ours,
            next_id: 1,
        };
        client.set_timeout(Duration::from_millis(100)).unwrap();
        let err = client.ping().unwrap_err();
        assert!(
            matches!(err, ClientError::NoAnswer(t) if t == Duration::from_millis(100)),
            "{err:?}"
        );
        assert_eq!(err.to_string(), "the agent did not answer within 100ms");
        assert!(err.breaks_connection(), "out of step: dropped");
    }

    #[test]
    fn a_slow_agent_is_waited_for_while_it_may_still_answer() {
        use crate::frame::{read_frame, write_frame};
        let (ours, mut agent) = UnixStream::pair().unwrap();
        let mut client = AgentClient {
            stream: ours,
            next_id: 1,
        };
        client.set_timeout(Duration::from_millis(50)).unwrap();
        // The agent answers after ~4 timeouts; the caller keeps waiting.
        let answering = std::thread::spawn(move || {
            let req: Request = read_frame(&mut agent).unwrap();
            std::thread::sleep(Duration::from_millis(200));
            let pong = Response {
                id: req.id,
                body: Some(response::Body::Pong(Default::default())),
            };
            write_frame(&mut agent, &pong).unwrap();
            agent
        });
        let mut asked = 0;
        let answer = client.call_while(request::Body::Ping(crate::Ping {}), || {
            asked += 1;
            true
        });
        assert!(matches!(answer, Ok(response::Body::Pong(_))), "{answer:?}");
        assert!(asked >= 2, "waited past the timeout ({asked} times asked)");
        let _agent = answering.join().unwrap();
        // Not waiting any longer: NoAnswer after one timeout.
        let err = client
            .call_while(request::Body::Ping(crate::Ping {}), || false)
            .unwrap_err();
        assert!(matches!(err, ClientError::NoAnswer(_)), "{err:?}");
    }
}
