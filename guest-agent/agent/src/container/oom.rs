//! OOM events: one inotify instance watches every container's
//! `memory.events` (the kernel signals a modification when a counter there
//! changes); when `oom_kill` grows, an event is queued for the host, which
//! takes them one at a time with `GetOomEvent`.

use std::collections::{HashMap, VecDeque};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use zygote_agent_api::OomEvent;

use super::cgroup::keyed;

/// The most events kept for a host that does not collect them.
const QUEUE_LIMIT: usize = 1024;

struct Watched {
    id: String,
    events_file: PathBuf,
    oom_kills: u64,
}

#[derive(Default)]
struct Shared {
    /// By inotify watch descriptor.
    watched: Mutex<HashMap<i32, Watched>>,
    queue: Mutex<VecDeque<OomEvent>>,
    queued: Condvar,
}

/// The watcher: an inotify fd and a thread reading it.
pub struct OomWatcher {
    inotify: Arc<OwnedFd>,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for OomWatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OomWatcher")
            .field("inotify", &self.inotify.as_raw_fd())
            .finish()
    }
}

impl OomWatcher {
    /// Starts the watcher's thread.
    pub fn start() -> std::io::Result<Self> {
        // SAFETY: inotify_init1 with valid flags returns a new fd or -1.
        let fd = unsafe { libc::inotify_init1(libc::IN_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` was just created and is owned by nothing else.
        let inotify = Arc::new(unsafe { OwnedFd::from_raw_fd(fd) });
        let shared = Arc::new(Shared::default());
        let (fd2, shared2) = (inotify.clone(), shared.clone());
        std::thread::Builder::new()
            .name("agent-oom".into())
            .spawn(move || read_events(&fd2, &shared2))?;
        Ok(OomWatcher { inotify, shared })
    }

    /// Watches container `id`'s cgroup `dir` (its `memory.events`).
    pub fn watch(&self, id: &str, dir: &Path) -> std::io::Result<()> {
        let events_file = dir.join("memory.events");
        let path = std::ffi::CString::new(events_file.to_string_lossy().as_bytes())
            .map_err(std::io::Error::other)?;
        // Under the lock, so the reader cannot see the descriptor before it is known.
        let mut watched = self.shared.watched.lock().expect("oom lock");
        // SAFETY: a valid fd and path string.
        let wd = unsafe {
            libc::inotify_add_watch(self.inotify.as_raw_fd(), path.as_ptr(), libc::IN_MODIFY)
        };
        if wd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let oom_kills = keyed(dir, "memory.events", "oom_kill");
        watched.insert(
            wd,
            Watched {
                id: id.into(),
                events_file,
                oom_kills,
            },
        );
        Ok(())
    }

    /// Stops watching container `id`.
    pub fn unwatch(&self, id: &str) {
        let mut watched = self.shared.watched.lock().expect("oom lock");
        let wds: Vec<i32> = watched
            .iter()
            .filter(|(_, w)| w.id == id)
            .map(|(&wd, _)| wd)
            .collect();
        for wd in wds {
            watched.remove(&wd);
            // SAFETY: a valid fd and a descriptor it returned.
            unsafe { libc::inotify_rm_watch(self.inotify.as_raw_fd(), wd) };
        }
    }

    /// The next OOM event, waiting up to `timeout` (forever with `None`).
    pub fn next(&self, timeout: Option<Duration>) -> Option<OomEvent> {
        let mut queue = self.shared.queue.lock().expect("oom lock");
        let deadline = timeout.map(|t| std::time::Instant::now() + t);
        loop {
            if let Some(e) = queue.pop_front() {
                return Some(e);
            }
            queue = match deadline {
                None => self.shared.queued.wait(queue).expect("oom lock"),
                Some(d) => {
                    let left = d.saturating_duration_since(std::time::Instant::now());
                    if left.is_zero() {
                        return None;
                    }
                    self.shared
                        .queued
                        .wait_timeout(queue, left)
                        .expect("oom lock")
                        .0
                }
            };
        }
    }
}

/// Reads inotify records forever; queues an event per `oom_kill` increase.
fn read_events(inotify: &OwnedFd, shared: &Shared) {
    let mut buf = [0u8; 4096];
    loop {
        // SAFETY: reading into a buffer we own, of the given length.
        let n = unsafe { libc::read(inotify.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n <= 0 {
            if std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            eprintln!(
                "zygote-agent: OOM watch stopped: {}",
                std::io::Error::last_os_error()
            );
            return;
        }
        let mut at = 0;
        let header = std::mem::size_of::<libc::inotify_event>();
        while at + header <= n as usize {
            // SAFETY: the kernel wrote a whole inotify_event at `at`; read unaligned.
            let ev: libc::inotify_event =
                unsafe { std::ptr::read_unaligned(buf.as_ptr().add(at).cast()) };
            at += header + ev.len as usize;
            let mut watched = shared.watched.lock().expect("oom lock");
            let Some(w) = watched.get_mut(&ev.wd) else {
                continue;
            };
            let dir = w.events_file.parent().unwrap_or(Path::new("/"));
            let now = keyed(dir, "memory.events", "oom_kill");
            if now > w.oom_kills {
                w.oom_kills = now;
                let mut queue = shared.queue.lock().expect("oom lock");
                if queue.len() >= QUEUE_LIMIT {
                    queue.pop_front();
                }
                queue.push_back(OomEvent {
                    id: w.id.clone(),
                    oom_kills: now,
                });
                shared.queued.notify_all();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The watch works on any file with `memory.events`'s format: a plain
    /// directory stands in for a cgroup (the host's memory controller is v1).
    #[test]
    fn an_oom_kill_increase_is_queued_once() {
        let dir = std::env::temp_dir().join(format!("zygote-oom-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let events = dir.join("memory.events");
        std::fs::write(&events, "low 0\nhigh 0\nmax 0\noom 0\noom_kill 0\n").unwrap();
        let w = OomWatcher::start().unwrap();
        w.watch("c1", &dir).unwrap();
        // A change that is not an OOM kill: nothing.
        std::fs::write(&events, "low 0\nhigh 0\nmax 3\noom 0\noom_kill 0\n").unwrap();
        assert_eq!(w.next(Some(Duration::from_millis(200))), None);
        std::fs::write(&events, "low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n").unwrap();
        let e = w.next(Some(Duration::from_secs(5))).expect("an event");
        assert_eq!((e.id.as_str(), e.oom_kills), ("c1", 1));
        assert_eq!(w.next(Some(Duration::from_millis(200))), None, "once");
        w.unwatch("c1");
        std::fs::write(&events, "oom_kill 2\n").unwrap();
        assert_eq!(w.next(Some(Duration::from_millis(200))), None, "unwatched");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
