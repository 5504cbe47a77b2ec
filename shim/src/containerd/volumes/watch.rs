//! Keeping copied volumes current: inotify cannot see into a VM, so the
//! host side watches. kubelet replaces a configMap's or secret's content
//! by swapping the `..data` link in the volume's directory; a file volume
//! is watched through its directory (an editor or kubelet may replace the
//! file). After a change settles, the volume is read again and, if its
//! content differs from what was sent, sent whole; everything is also
//! read again every [`RESCAN`], in case an event was missed.

use std::collections::HashMap;
use std::ffi::OsString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use zygote_agent_api::Volume;

use super::{Copied, digest, read_tree};

/// How long a change must be quiet before the volume is read.
const SETTLE: Duration = Duration::from_millis(200);
/// Every volume is read again this often, events or not.
const RESCAN: Duration = Duration::from_secs(30);

const MASK: u32 = libc::IN_CREATE
    | libc::IN_DELETE
    | libc::IN_MODIFY
    | libc::IN_CLOSE_WRITE
    | libc::IN_MOVED_TO
    | libc::IN_MOVED_FROM
    | libc::IN_ATTRIB
    | libc::IN_DELETE_SELF
    | libc::IN_MOVE_SELF;

/// Sends a container's volume to the guest.
pub type Sender = dyn Fn(&str, Volume) -> Result<(), String> + std::marker::Send + Sync;

struct Watched {
    container: String,
    copied: Copied,
    /// The directory watched: the volume's, or a file volume's parent.
    dir: PathBuf,
    /// A file volume's name in `dir`.
    file: Option<OsString>,
    dirty: bool,
}

#[derive(Default)]
struct State {
    /// Watch descriptors and their directories.
    wds: HashMap<i32, PathBuf>,
    volumes: Vec<Watched>,
}

struct Inner {
    fd: OwnedFd,
    state: Mutex<State>,
    stop: AtomicBool,
}

/// The pod's volume watcher: one inotify instance and one thread.
pub struct Watcher {
    inner: Arc<Inner>,
}

impl Watcher {
    /// Starts watching (nothing yet); changes are sent with `send`.
    pub fn start(send: Box<Sender>) -> std::io::Result<Watcher> {
        // SAFETY: no pointers; the fd is checked below.
        let fd = unsafe { libc::inotify_init1(libc::IN_CLOEXEC | libc::IN_NONBLOCK) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let inner = Arc::new(Inner {
            // SAFETY: a fresh fd owned by nothing else.
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
            state: Mutex::default(),
            stop: AtomicBool::new(false),
        });
        let run = inner.clone();
        std::thread::Builder::new()
            .name("volumes".into())
            .spawn(move || run.run(&*send))?;
        Ok(Watcher { inner })
    }

    /// Watches container `id`'s copied volumes.
    pub fn add(&self, id: &str, copied: &[Copied]) {
        let mut state = self.inner.state.lock().expect("volume watch lock");
        for c in copied {
            let (dir, file) = if c.host.is_dir() {
                (c.host.clone(), None)
            } else {
                let parent = c.host.parent().unwrap_or(Path::new("/")).to_path_buf();
                (parent, c.host.file_name().map(|f| f.to_os_string()))
            };
            if !state.wds.values().any(|d| *d == dir) {
                match add_watch(&self.inner.fd, &dir) {
                    Ok(wd) => {
                        state.wds.insert(wd, dir.clone());
                    }
                    Err(e) => tracing::warn!(
                        "{id}: cannot watch {} ({e}); read again every {} s",
                        dir.display(),
                        RESCAN.as_secs()
                    ),
                }
            }
            state.volumes.push(Watched {
                container: id.into(),
                copied: c.clone(),
                dir,
                file,
                dirty: false,
            });
        }
    }

    /// Stops watching container `id`'s volumes.
    pub fn remove(&self, id: &str) {
        let mut state = self.inner.state.lock().expect("volume watch lock");
        state.volumes.retain(|w| w.container != id);
        let State { wds, volumes } = &mut *state;
        wds.retain(|wd, dir| {
            let used = volumes.iter().any(|w| w.dir == *dir);
            if !used {
                // SAFETY: a watch descriptor of this instance.
                unsafe { libc::inotify_rm_watch(self.inner.fd.as_raw_fd(), *wd) };
            }
            used
        });
    }
}

impl std::fmt::Debug for Watcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.inner.state.lock().map_or(0, |s| s.volumes.len());
        f.debug_struct("Watcher").field("volumes", &n).finish()
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.inner.stop.store(true, Ordering::Relaxed);
    }
}

fn add_watch(fd: &OwnedFd, dir: &Path) -> std::io::Result<i32> {
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes())?;
    // SAFETY: a valid C string and our inotify fd.
    let wd = unsafe { libc::inotify_add_watch(fd.as_raw_fd(), path.as_ptr(), MASK) };
    if wd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(wd)
}

impl Inner {
    fn run(&self, send: &Sender) {
        let mut last_scan = Instant::now();
        while !self.stop.load(Ordering::Relaxed) {
            if self.wait_events(Duration::from_secs(1)) {
                // Let the change settle: kubelet writes a new directory,
                // then swaps the link.
                while self.wait_events(SETTLE) {}
            }
            if last_scan.elapsed() >= RESCAN {
                last_scan = Instant::now();
                for w in &mut self.state.lock().expect("volume watch lock").volumes {
                    w.dirty = true;
                }
            }
            self.send_changed(send);
        }
    }

    /// Waits up to `timeout` for events and marks the volumes they touch;
    /// whether there were any.
    fn wait_events(&self, timeout: Duration) -> bool {
        let mut pfd = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(&mut pfd, 1, timeout.as_millis() as i32) };
        if n <= 0 {
            return false;
        }
        let mut buf = [0u8; 8192];
        let mut any = false;
        loop {
            // SAFETY: reads into a buffer of the length given.
            let len =
                unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if len <= 0 {
                return any;
            }
            let mut state = self.state.lock().expect("volume watch lock");
            for (wd, name) in events(&buf[..len as usize]) {
                let Some(dir) = state.wds.get(&wd).cloned() else {
                    continue;
                };
                for w in state.volumes.iter_mut().filter(|w| w.dir == dir) {
                    if w.file.is_none() || name.is_empty() || w.file.as_deref() == Some(&*name) {
                        w.dirty = true;
                        any = true;
                    }
                }
            }
        }
    }

    /// Reads each marked volume and sends it if it changed.
    fn send_changed(&self, send: &Sender) {
        let work: Vec<(String, Copied)> = {
            let mut state = self.state.lock().expect("volume watch lock");
            state
                .volumes
                .iter_mut()
                .filter_map(|w| {
                    std::mem::take(&mut w.dirty).then(|| (w.container.clone(), w.copied.clone()))
                })
                .collect()
        };
        for (id, c) in work {
            let v = match read_tree(&c.host, &c.name) {
                Ok(v) => v,
                Err(e) => {
                    tracing::warn!("{id}: volume {}: {e}", c.name);
                    continue;
                }
            };
            let d = digest(&v);
            if d == c.sent {
                continue;
            }
            match send(&id, v) {
                Ok(()) => {
                    tracing::info!("{id}: volume {} ({}) sent again", c.name, c.host.display());
                    let mut state = self.state.lock().expect("volume watch lock");
                    for w in state.volumes.iter_mut() {
                        if w.container == id && w.copied.name == c.name {
                            w.copied.sent = d;
                        }
                    }
                }
                Err(e) => tracing::warn!("{id}: cannot update volume {}: {e}", c.name),
            }
        }
    }
}

/// The (watch descriptor, name) of each event in `buf`.
fn events(buf: &[u8]) -> Vec<(i32, OsString)> {
    let header = std::mem::size_of::<libc::inotify_event>();
    let mut out = Vec::new();
    let mut at = 0;
    while at + header <= buf.len() {
        // SAFETY: `header` bytes are there; read unaligned.
        let ev: libc::inotify_event =
            unsafe { std::ptr::read_unaligned(buf[at..].as_ptr().cast()) };
        let end = (at + header + ev.len as usize).min(buf.len());
        let name = &buf[at + header..end];
        let name = &name[..name.iter().position(|b| *b == 0).unwrap_or(name.len())];
        out.push((ev.wd, std::ffi::OsStr::from_bytes(name).to_os_string()));
        at = end;
    }
    out
}

/// Writes what a container left in a writable file volume back to the host
/// file (not through a link put in its place).
pub fn write_back(host: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    if std::fs::read(host).is_ok_and(|old| old == data) {
        return Ok(());
    }
    std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(host)?
        .write_all(data)
}
