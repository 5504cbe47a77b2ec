//! One command run for the host, with its output collected.

use std::io::Read;
use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Stdio};

use std::time::Duration;

use zygote_agent_api::{Code, Exec, ExecResult};

/// Output kept per stream.
const OUTPUT_MAX: usize = 1 << 20;
/// Timeout when none is given.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

/// Why a command could not be run.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    /// No program, or a relative one.
    #[error("argv[0] must be an absolute path")]
    BadArgv,
    /// An environment entry without `=`.
    #[error("environment entry {0:?} is not KEY=value")]
    BadEnv(String),
    /// The program could not be started.
    #[error("cannot start {program}: {source}")]
    Spawn {
        /// The program.
        program: String,
        /// Cause.
        source: std::io::Error,
    },
    /// Waiting for it failed.
    #[error("cannot wait for the command: {0}")]
    Wait(std::io::Error),
}

impl ExecError {
    /// The API error code.
    pub fn code(&self) -> Code {
        match self {
            ExecError::BadArgv | ExecError::BadEnv(_) => Code::InvalidArgument,
            ExecError::Spawn { source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
                Code::NotFound
            }
            _ => Code::Internal,
        }
    }
}

fn drain(mut r: impl Read + Send + 'static) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut kept = Vec::new();
        let mut buf = [0u8; 8192];
        loop {
            match r.read(&mut buf) {
                Ok(0) | Err(_) => return kept,
                Ok(n) => {
                    let room = OUTPUT_MAX - kept.len();
                    kept.extend_from_slice(&buf[..n.min(room)]);
                }
            }
        }
    })
}

/// Runs `req` to completion (or its timeout) and returns how it ended.
pub fn run(req: &Exec) -> Result<ExecResult, ExecError> {
    let program = req
        .argv
        .first()
        .filter(|p| p.starts_with('/'))
        .ok_or(ExecError::BadArgv)?;
    let mut cmd = Command::new(program);
    cmd.args(&req.argv[1..])
        .env_clear()
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if req.env.is_empty() {
        cmd.env("PATH", "/bin:/sbin:/usr/bin:/usr/sbin");
    }
    for kv in &req.env {
        let (k, v) = kv
            .split_once('=')
            .ok_or_else(|| ExecError::BadEnv(kv.clone()))?;
        cmd.env(k, v);
    }
    let mut child = crate::procs::spawn(&mut cmd).map_err(|source| ExecError::Spawn {
        program: program.clone(),
        source,
    })?;
    let out = drain(child.inner.stdout.take().expect("piped"));
    let err = drain(child.inner.stderr.take().expect("piped"));
    let timeout = match req.timeout_ms {
        0 => DEFAULT_TIMEOUT,
        ms => Duration::from_millis(u64::from(ms)),
    };
    let mut timed_out = false;
    let status = match child.wait_timeout(Some(timeout)).map_err(ExecError::Wait)? {
        Some(status) => status,
        None => {
            timed_out = true;
            child.signal(libc::SIGKILL);
            child.wait().map_err(ExecError::Wait)?
        }
    };
    let exit_code = status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(0));
    Ok(ExecResult {
        exit_code,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
        timed_out,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exec(argv: &[&str]) -> Result<ExecResult, ExecError> {
        run(&Exec {
            argv: argv.iter().map(|s| s.to_string()).collect(),
            env: vec![],
            timeout_ms: 0,
        })
    }

    #[test]
    fn output_status_signal_and_bad_requests() {
        let r = exec(&["/bin/sh", "-c", "echo out; echo err >&2; exit 3"]).unwrap();
        assert_eq!(
            (r.exit_code, &r.stdout[..], &r.stderr[..]),
            (3, &b"out\n"[..], &b"err\n"[..])
        );
        let r = exec(&["/bin/sh", "-c", "kill -9 $$"]).unwrap();
        assert_eq!(r.exit_code, 128 + 9);
        let r = run(&Exec {
            argv: vec!["/bin/sh".into(), "-c".into(), "echo $A".into()],
            env: vec!["A=b".into()],
            timeout_ms: 0,
        })
        .unwrap();
        assert_eq!(r.stdout, b"b\n");
        let r = run(&Exec {
            argv: vec!["/bin/sleep".into(), "10".into()],
            env: vec![],
            timeout_ms: 100,
        })
        .unwrap();
        assert!(r.timed_out);
        assert_eq!(r.exit_code, 128 + 9);
        assert!(matches!(exec(&["sh"]), Err(ExecError::BadArgv)));
        assert!(matches!(exec(&[]), Err(ExecError::BadArgv)));
        assert_eq!(exec(&["/no/such"]).unwrap_err().code(), Code::NotFound);
        let bad_env = run(&Exec {
            argv: vec!["/bin/true".into()],
            env: vec!["NOEQUALS".into()],
            timeout_ms: 0,
        });
        assert!(matches!(bad_env, Err(ExecError::BadEnv(_))));
    }
}
