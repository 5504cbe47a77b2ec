//! The exec-and-pipe self-test: many fresh execs of this binary, each echoing
//! data through pipes, some of them multi-threaded. It exists because freshly
//! exec'd processes crashed intermittently on PVM (see docs/guest-kernel.md);
//! it counts crashes by cause and never retries.

use std::io::{Read, Write};
use std::os::unix::process::ExitStatusExt;
use std::process::{Command, ExitCode, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};

use zygote_agent_api::{SelfTest, SelfTestReport};

use crate::sys;

/// Largest payload per round trip: both directions fit in the pipes' buffers.
pub const MAX_BYTES: u32 = 64 << 10;
/// Most rounds per request.
pub const MAX_ROUNDS: u32 = 100_000;
/// Most round trips at once.
pub const MAX_PARALLEL: u32 = 16;
/// Threads in a multi-threaded child.
const CHILD_THREADS: usize = 4;
/// A child still running after this long is killed and counted as a failure.
const CHILD_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);
/// Failures described in the report.
const MAX_DESCRIBED: usize = 10;

/// Checks a request's bounds.
pub fn validate(t: &SelfTest) -> Result<(), String> {
    if t.rounds == 0 || t.rounds > MAX_ROUNDS {
        return Err(format!("rounds must be 1..={MAX_ROUNDS}"));
    }
    if t.bytes > MAX_BYTES {
        return Err(format!(
            "bytes must be 0..={MAX_BYTES} (0: only the exit status is checked)"
        ));
    }
    if t.parallel > MAX_PARALLEL {
        return Err(format!("parallel must be at most {MAX_PARALLEL}"));
    }
    Ok(())
}

fn pattern(round: u32, len: usize) -> Vec<u8> {
    let mut x = u64::from(round).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[derive(Default)]
struct Tally {
    execs: AtomicU32,
    ok: AtomicU32,
    segfaults: AtomicU32,
    other: AtomicU32,
    threaded: AtomicU32,
    threaded_ok: AtomicU32,
    tls: AtomicU32,
    failures: Mutex<Vec<String>>,
}

impl Tally {
    fn fail(&self, counter: &AtomicU32, what: String) {
        counter.fetch_add(1, Ordering::Relaxed);
        let mut f = self.failures.lock().expect("failures lock");
        if f.len() < MAX_DESCRIBED {
            f.push(what);
        }
    }
}

fn one_round(
    exe: &std::path::Path,
    echo: &[String],
    round: u32,
    threaded: bool,
    bytes: usize,
    tally: &Tally,
) {
    let mut command = match (threaded, echo) {
        (false, [program, args @ ..]) => {
            let mut c = Command::new(program);
            c.args(args);
            c
        }
        _ => {
            let mut c = Command::new(exe);
            c.arg(if threaded {
                "stress-threads"
            } else {
                "stress-echo"
            });
            c
        }
    };
    let mode = if threaded { "threads" } else { "echo" };
    let child = crate::procs::spawn(
        command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null()),
    );
    let mut child = match child {
        Ok(c) => c,
        Err(e) => {
            tally.fail(&tally.other, format!("round {round}: spawn failed: {e}"));
            return;
        }
    };
    tally.execs.fetch_add(1, Ordering::Relaxed);
    if threaded {
        tally.threaded.fetch_add(1, Ordering::Relaxed);
    }
    let data = pattern(round, bytes);
    // A child that hangs is killed after CHILD_TIMEOUT and reported, not waited for forever.
    let (done, watchdog) = std::sync::mpsc::channel::<()>();
    let pid = child.pid() as libc::pid_t;
    let killer = std::thread::spawn(move || {
        let timed_out = watchdog.recv_timeout(CHILD_TIMEOUT).is_err();
        if timed_out {
            // SAFETY: kill(2) of our own child, which is not yet reaped (we wait below).
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        timed_out
    });
    let mut stdin = child.inner.stdin.take().expect("piped");
    let wrote = stdin.write_all(&data);
    drop(stdin);
    let mut echoed = Vec::with_capacity(bytes);
    let read = child
        .inner
        .stdout
        .take()
        .expect("piped")
        .read_to_end(&mut echoed);
    let status = child.wait();
    let _ = done.send(());
    if killer.join().unwrap_or(false) {
        tally.fail(
            &tally.other,
            format!("round {round} ({mode}): hung, killed after {CHILD_TIMEOUT:?}"),
        );
        return;
    }
    let status = match status {
        Ok(s) => s,
        Err(e) => {
            tally.fail(&tally.other, format!("round {round}: wait failed: {e}"));
            return;
        }
    };
    match status.signal() {
        Some(libc::SIGSEGV) => {
            tally.fail(&tally.segfaults, format!("round {round} ({mode}): SIGSEGV"))
        }
        Some(sig) => tally.fail(
            &tally.other,
            format!("round {round} ({mode}): killed by signal {sig}"),
        ),
        None if status.code() == Some(i32::from(EXIT_TLS_CORRUPT)) => tally.fail(
            &tally.tls,
            format!("round {round} ({mode}): TLS image corrupted at start-up"),
        ),
        None if status.code() == Some(i32::from(EXIT_REGISTER_LOST)) => tally.fail(
            &tally.tls,
            format!("round {round} ({mode}): a thread lost a register value across a yield"),
        ),
        // A shell running a pipeline reports a member's SIGSEGV as 128 + 11.
        None if status.code() == Some(128 + libc::SIGSEGV) => tally.fail(
            &tally.segfaults,
            format!("round {round} ({mode}): exit 139, a SIGSEGV reported by the child"),
        ),
        None if !status.success() => tally.fail(
            &tally.other,
            format!("round {round} ({mode}): exit {:?}", status.code()),
        ),
        None if wrote.is_err() || read.is_err() || echoed != data => tally.fail(
            &tally.other,
            format!(
                "round {round} ({mode}): data corrupted ({} of {bytes} bytes back)",
                echoed.len()
            ),
        ),
        None => {
            tally.ok.fetch_add(1, Ordering::Relaxed);
            if threaded {
                tally.threaded_ok.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// Runs the self-test with this binary's children.
pub fn run(t: &SelfTest) -> SelfTestReport {
    let exe = std::env::current_exe().unwrap_or_else(|_| "/proc/self/exe".into());
    run_with(&exe, t)
}

/// Runs the self-test with `exe` as the agent binary for the children.
pub fn run_with(exe: &std::path::Path, t: &SelfTest) -> SelfTestReport {
    let start = sys::boottime_ns();
    let tally = Tally::default();
    let next = AtomicU32::new(0);
    let parallel = t.parallel.max(1);
    std::thread::scope(|s| {
        for _ in 0..parallel {
            s.spawn(|| {
                loop {
                    let round = next.fetch_add(1, Ordering::Relaxed);
                    if round >= t.rounds {
                        return;
                    }
                    let threaded = t.threads_every > 0 && round % t.threads_every == 0;
                    one_round(exe, &t.command, round, threaded, t.bytes as usize, &tally);
                }
            });
        }
    });
    SelfTestReport {
        execs: tally.execs.into_inner(),
        ok: tally.ok.into_inner(),
        segfaults: tally.segfaults.into_inner(),
        other_failures: tally.other.into_inner(),
        threaded: tally.threaded.into_inner(),
        tls_corruptions: tally.tls.into_inner(),
        threaded_ok: tally.threaded_ok.into_inner(),
        elapsed_ns: sys::boottime_ns().saturating_sub(start),
        failures: tally.failures.into_inner().expect("failures lock"),
    }
}

/// Exit code of a child whose thread-local storage did not start with its image.
pub const EXIT_TLS_CORRUPT: u8 = 86;

/// Exit code of a child one of whose threads lost a value it held in TLS and
/// a vector register across a yield (the other face of the lost register).
pub const EXIT_REGISTER_LOST: u8 = 87;

/// A thread-local initialised from the binary's TLS image (`.tdata`), with no zero
/// bytes: the C library copies the image into each new thread's TLS block, with
/// vector stores into freshly allocated memory — the copy PVM can corrupt.
const TLS_CANARY_INIT: [u64; 8] = [
    0x1111_1111_1111_1111,
    0x2222_2222_2222_2222,
    0x3333_3333_3333_3333,
    0x4444_4444_4444_4444,
    0x5555_5555_5555_5555,
    0x6666_6666_6666_6666,
    0x7777_7777_7777_7777,
    0x8888_8888_8888_8888,
];

thread_local! {
    static TLS_CANARY: std::cell::Cell<[u64; 8]> = const { std::cell::Cell::new(TLS_CANARY_INIT) };
}

/// Whether this thread's TLS still holds its initial image.
pub fn tls_intact() -> bool {
    TLS_CANARY.with(|c| std::hint::black_box(c.get()) == TLS_CANARY_INIT)
}

/// The child: echo stdin to stdout; with `threaded`, also run worker threads that
/// check their thread-local and vector-register state while the copy goes on.
/// Exits [`EXIT_TLS_CORRUPT`] if any thread's TLS did not start intact.
pub fn child_echo(threaded: bool) -> ExitCode {
    if !tls_intact() {
        return ExitCode::from(EXIT_TLS_CORRUPT);
    }
    let workers: Vec<_> = if threaded {
        (0..CHILD_THREADS)
            .map(|i| std::thread::spawn(move || thread_check(i as u64)))
            .collect()
    } else {
        Vec::new()
    };
    let mut data = Vec::new();
    let copied = std::io::stdin()
        .read_to_end(&mut data)
        .and_then(|_| std::io::stdout().write_all(&data));
    let worker_codes: Vec<u8> = workers.into_iter().map(|w| w.join().unwrap_or(1)).collect();
    for kind in [EXIT_TLS_CORRUPT, EXIT_REGISTER_LOST] {
        if worker_codes.contains(&kind) {
            return ExitCode::from(kind);
        }
    }
    if copied.is_ok() && worker_codes.iter().all(|&c| c == 0) {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

thread_local! {
    static TLS_VALUE: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// Checks the thread's TLS image, then stores a per-thread value in TLS and
/// floating-point state, yields, checks both.
/// Returns 0, [`EXIT_TLS_CORRUPT`], or [`EXIT_REGISTER_LOST`] for a lost value.
fn thread_check(seed: u64) -> u8 {
    if !tls_intact() {
        return EXIT_TLS_CORRUPT;
    }
    for i in 0..2_000u64 {
        let want = seed.wrapping_mul(1_000_003).wrapping_add(i);
        TLS_VALUE.with(|v| v.set(want));
        let f = std::hint::black_box(want as f64 * 1.5);
        if i % 100 == 0 {
            std::thread::yield_now();
        }
        if TLS_VALUE.with(|v| v.get()) != want || std::hint::black_box(f) != want as f64 * 1.5 {
            return EXIT_REGISTER_LOST;
        }
    }
    0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_are_checked() {
        let ok = SelfTest {
            rounds: 1,
            threads_every: 0,
            parallel: 1,
            bytes: 1,
            command: vec![],
        };
        assert!(validate(&ok).is_ok());
        assert!(
            validate(&SelfTest {
                rounds: 0,
                ..ok.clone()
            })
            .is_err()
        );
        assert!(
            validate(&SelfTest {
                bytes: 0,
                ..ok.clone()
            })
            .is_ok()
        );
        assert!(
            validate(&SelfTest {
                bytes: MAX_BYTES + 1,
                ..ok.clone()
            })
            .is_err()
        );
        assert!(
            validate(&SelfTest {
                parallel: MAX_PARALLEL + 1,
                ..ok
            })
            .is_err()
        );
    }

    #[test]
    fn patterns_differ_per_round() {
        assert_ne!(pattern(1, 64), pattern(2, 64));
        assert_eq!(pattern(3, 64), pattern(3, 64));
    }
}
