//! A container process's stdio on the agent's side: its pipes or terminal
//! until the host's streams take them, stdin copied from the host's stream,
//! the header that names a stream.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::{Arc, Mutex};

use super::registry::{ContainerError, os};

/// The agent's ends of a process's stdio (pipes, or a terminal's master),
/// until a stream takes them.
#[derive(Default)]
pub(super) struct Pipes {
    /// Where stdin's bytes go; emptied by `CloseStdin` (or the end of the
    /// host's stdin stream), which the process reads as end of file.
    pub(super) stdin: Arc<Mutex<Option<File>>>,
    pub(super) stdin_attached: bool,
    pub(super) stdout: Option<File>,
    /// None for a terminal (its output is all on stdout).
    pub(super) stderr: Option<File>,
    /// The process's ends, handed to it at start.
    pub(super) child: Option<(File, File, File)>,
    /// The terminal's master, for window sizes.
    pub(super) tty: Option<File>,
}

impl Pipes {
    /// Three pipes.
    pub(super) fn plain() -> Result<Self, ContainerError> {
        let (in_r, in_w) = pipe()?;
        let (out_r, out_w) = pipe()?;
        let (err_r, err_w) = pipe()?;
        Ok(Pipes {
            stdin: Arc::new(Mutex::new(Some(in_w))),
            stdin_attached: false,
            stdout: Some(out_r),
            stderr: Some(err_r),
            child: Some((in_r, out_w, err_w)),
            tty: None,
        })
    }

    /// A pseudo-terminal: the process gets its slave side as stdin, stdout and
    /// stderr (and makes it its controlling terminal).
    pub(super) fn terminal() -> Result<Self, ContainerError> {
        let (mut master, mut slave) = (-1, -1);
        // SAFETY: openpty fills two fds; the name, termios and winsize pointers may be null.
        let rc = unsafe {
            libc::openpty(
                &mut master,
                &mut slave,
                std::ptr::null_mut(),
                std::ptr::null(),
                std::ptr::null(),
            )
        };
        if rc != 0 {
            return Err(os("open a terminal")(std::io::Error::last_os_error()));
        }
        // SAFETY: both fds were just created and are owned by nothing else.
        let (master, slave) = unsafe {
            (
                File::from(OwnedFd::from_raw_fd(master)),
                File::from(OwnedFd::from_raw_fd(slave)),
            )
        };
        for f in [&master, &slave] {
            use std::os::fd::AsRawFd;
            // SAFETY: setting FD_CLOEXEC on an fd we own.
            unsafe { libc::fcntl(f.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
        }
        let dup = |f: &File| f.try_clone().map_err(os("dup the terminal"));
        Ok(Pipes {
            stdin: Arc::new(Mutex::new(Some(dup(&master)?))),
            stdin_attached: false,
            stdout: Some(dup(&master)?),
            stderr: None,
            child: Some((dup(&slave)?, dup(&slave)?, slave)),
            tty: Some(master),
        })
    }
}

fn pipe() -> Result<(File, File), ContainerError> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills two fds into a valid array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(os("pipe")(std::io::Error::last_os_error()));
    }
    // SAFETY: both fds were just created and are owned by nothing else.
    let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    Ok((File::from(r), File::from(w)))
}

/// Copies the host's stdin stream into the process's stdin while it is open;
/// the end of the host's stream closes it.
pub(super) fn forward_stdin(mut conn: impl Read, slot: &Mutex<Option<File>>) {
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        let n = match conn.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        // A duplicate per write, so `CloseStdin` never waits on a blocked write.
        let target = slot
            .lock()
            .expect("stdin lock")
            .as_ref()
            .and_then(|f| f.try_clone().ok());
        let Some(mut f) = target else { return };
        if f.write_all(&buf[..n]).is_err() {
            return;
        }
    }
    slot.lock().expect("stdin lock").take();
}

/// The longest stream header: a container id and an exec id (64 each), the
/// slash between them, a space, the stream's name and the newline, with room.
const STDIO_HEADER_MAX: usize = 256;

/// Reads the stream header `<id> <stream>\n` (at most [`STDIO_HEADER_MAX`]
/// bytes, byte by byte so nothing after it is consumed).
pub fn read_stdio_header(conn: &mut impl Read) -> std::io::Result<(String, String)> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while line.len() < STDIO_HEADER_MAX {
        conn.read_exact(&mut byte)?;
        if byte[0] == b'\n' {
            let text = String::from_utf8_lossy(&line).into_owned();
            let mut parts = text.split_whitespace();
            if let (Some(id), Some(stream), None) = (parts.next(), parts.next(), parts.next()) {
                return Ok((id.into(), stream.into()));
            }
            break;
        }
        line.push(byte[0]);
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::InvalidData,
        "bad stdio header",
    ))
}
