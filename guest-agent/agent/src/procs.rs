//! Children of the agent: spawning, waiting, and reaping everything else.
//!
//! As PID 1 the agent inherits every orphan of the guest and must reap it, or
//! zombies pile up. A reaper thread waits for any child (`waitpid(-1)`); exit
//! statuses of children the agent spawned through [`spawn`] are handed to their
//! owner, the rest are dropped. Spawning holds the table's lock until the new
//! pid is registered, so a child that exits at once is never mistaken for an
//! orphan. Outside PID 1 (host tests) there is no reaper and owners wait for
//! their children directly.

use std::collections::{HashMap, HashSet};
use std::os::unix::process::ExitStatusExt;
use std::process::{Command, ExitStatus};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

#[derive(Default)]
struct Table {
    /// Spawned children not yet reaped.
    owned: HashSet<u32>,
    /// Reaped children whose owner has not collected the status yet.
    exited: HashMap<u32, i32>,
    /// Children spawned so far (the reaper, finding none, waits for this to move).
    spawned: u64,
    /// Of those, the agent's own helpers that run no user code.
    helpers: u64,
}

static TABLE: Mutex<Option<Table>> = Mutex::new(None);
static CHANGED: Condvar = Condvar::new();
/// Signalled when a child is spawned.
static SPAWNED: Condvar = Condvar::new();
static REAPER: AtomicBool = AtomicBool::new(false);

fn table() -> MutexGuard<'static, Option<Table>> {
    let mut t = TABLE.lock().unwrap_or_else(|p| p.into_inner());
    t.get_or_insert_with(Table::default);
    t
}

/// Starts the reaper (PID 1 only; idempotent).
pub fn start_reaper() {
    if REAPER.swap(true, Ordering::SeqCst) {
        return;
    }
    let spawned = std::thread::Builder::new()
        .name("agent-reaper".into())
        .spawn(|| {
            loop {
                let generation = table().as_ref().expect("initialised").spawned;
                let mut status = 0;
                // SAFETY: waitpid with a valid status pointer.
                let pid = unsafe { libc::waitpid(-1, &mut status, 0) };
                if pid < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
                    continue;
                }
                if pid < 0 {
                    // No children (ECHILD). Without children
                    // only a spawn makes one (an orphan is some child's
                    // descendant): sleep until then, not in a polling loop
                    // (each wake-up costs guest kernel work, which is
                    // emulated on PVM). The timeout only bounds a miss.
                    let guard = table();
                    let _ = SPAWNED.wait_timeout_while(guard, Duration::from_secs(1), |t| {
                        t.as_ref().expect("initialised").spawned == generation
                    });
                    continue;
                }
                let mut guard = table();
                let t = guard.as_mut().expect("initialised");
                if t.owned.remove(&(pid as u32)) {
                    t.exited.insert(pid as u32, status);
                    CHANGED.notify_all();
                }
            }
        });
    if spawned.is_err() {
        REAPER.store(false, Ordering::SeqCst);
        eprintln!("zygote-agent: cannot start the reaper; zombies will accumulate");
    }
}

/// A child spawned through [`spawn`].
#[derive(Debug)]
pub struct Child {
    /// The std handle (its pipes).
    pub inner: std::process::Child,
    status: Option<ExitStatus>,
}

impl Child {
    /// Its pid.
    pub fn pid(&self) -> u32 {
        self.inner.id()
    }

    /// Waits up to `timeout` (forever if `None`) for it to exit.
    pub fn wait_timeout(
        &mut self,
        timeout: Option<Duration>,
    ) -> std::io::Result<Option<ExitStatus>> {
        if let Some(s) = self.status {
            return Ok(Some(s));
        }
        let deadline = timeout.map(|t| Instant::now() + t);
        let status = if REAPER.load(Ordering::SeqCst) {
            let pid = self.pid();
            let mut guard = table();
            loop {
                if let Some(raw) = guard.as_mut().expect("initialised").exited.remove(&pid) {
                    break Some(ExitStatus::from_raw(raw));
                }
                let left = match deadline {
                    Some(d) => match d.checked_duration_since(Instant::now()) {
                        Some(left) if !left.is_zero() => left,
                        _ => break None,
                    },
                    None => Duration::from_secs(3600),
                };
                guard = CHANGED
                    .wait_timeout(guard, left)
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
        } else {
            loop {
                if let Some(s) = self.inner.try_wait()? {
                    break Some(s);
                }
                if deadline.is_some_and(|d| Instant::now() >= d) {
                    break None;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        };
        self.status = status;
        Ok(status)
    }

    /// Waits for it to exit.
    pub fn wait(&mut self) -> std::io::Result<ExitStatus> {
        Ok(self.wait_timeout(None)?.expect("no deadline"))
    }

    /// Sends it `signal` (if it has not been collected yet).
    pub fn signal(&self, signal: i32) {
        if self.status.is_none() {
            // SAFETY: kill(2) of our own child, which is not collected yet so its pid is ours.
            unsafe { libc::kill(self.pid() as i32, signal) };
        }
    }
}

/// Spawns `cmd` as a child whose exit status the reaper keeps for its owner.
pub fn spawn(cmd: &mut Command) -> std::io::Result<Child> {
    spawn_counted(cmd, false)
}

/// Spawns one of the agent's own helpers (it runs no user code until told
/// to, after a reconcile): as [`spawn`], but [`spawned_any`] does not
/// count it.
pub fn spawn_helper(cmd: &mut Command) -> std::io::Result<Child> {
    spawn_counted(cmd, true)
}

fn spawn_counted(cmd: &mut Command, helper: bool) -> std::io::Result<Child> {
    let mut guard = table();
    let inner = cmd.spawn()?;
    let t = guard.as_mut().expect("initialised");
    t.spawned += 1;
    t.helpers += u64::from(helper);
    if REAPER.load(Ordering::SeqCst) {
        t.owned.insert(inner.id());
    }
    drop(guard);
    SPAWNED.notify_all();
    Ok(Child {
        inner,
        status: None,
    })
}

/// Whether the agent has spawned any process but its helpers since it
/// started. As PID 1 it is the ancestor of every user process: while this
/// is false, the guest runs none but the agent and its helpers.
pub fn spawned_any() -> bool {
    table().as_ref().is_some_and(|t| t.spawned > t.helpers)
}

/// Forgets a child that will not be waited for (its status is dropped when reaped).
pub fn disown(child: Child) {
    let pid = child.pid();
    let mut guard = table();
    let t = guard.as_mut().expect("initialised");
    t.owned.remove(&pid);
    t.exited.remove(&pid);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spawn_wait_and_timeout_without_a_reaper() {
        let mut c = spawn(Command::new("/bin/sh").args(["-c", "exit 7"])).unwrap();
        assert_eq!(c.wait().unwrap().code(), Some(7));
        assert_eq!(c.wait().unwrap().code(), Some(7), "the status is kept");
        let mut s = spawn(Command::new("/bin/sleep").arg("10")).unwrap();
        assert_eq!(
            s.wait_timeout(Some(Duration::from_millis(50))).unwrap(),
            None
        );
        s.signal(libc::SIGKILL);
        assert_eq!(s.wait().unwrap().signal(), Some(libc::SIGKILL));
    }
}
