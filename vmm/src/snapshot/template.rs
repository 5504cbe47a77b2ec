//! Templates on disk: a directory per template, written under a temporary name
//! and renamed into place, so a reader never sees half of one.
//!
//! ```text
//! <root>/<name>/state          machine state (see state_file)
//! <root>/<name>/memory         guest RAM, sparse
//! <root>/<name>/template.json  what it is, for people and `ls` (not trusted by a fork)
//! <root>/.<name>.lock          builders of <name> serialize on this flock
//! <root>/.tmp-<name>-<pid>     a template being written
//! ```
//! Builders of one name take its lock; the loser then finds the winner's
//! template and reuses it. Replacing a template swaps the directories atomically
//! (`RENAME_EXCHANGE`); forks running from the old one keep running, because
//! their mappings hold its memory file.

use std::fmt;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

/// Longest template name.
pub const NAME_MAX: usize = 64;
/// The metadata file in a template directory.
pub const META_FILE: &str = "template.json";
/// The state file in a template directory.
pub const STATE_FILE: &str = "state";
/// The memory file in a template directory.
pub const MEMORY_FILE: &str = "memory";

/// A valid template name: 1–64 of `[A-Za-z0-9._-]`, not starting with a dot.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TemplateName(String);

impl TemplateName {
    /// Checks `name`.
    pub fn new(name: &str) -> Result<Self, StoreError> {
        let ok = !name.is_empty()
            && name.len() <= NAME_MAX
            && !name.starts_with('.')
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
        if ok {
            Ok(TemplateName(name.into()))
        } else {
            Err(StoreError::InvalidName(name.into()))
        }
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for TemplateName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Errors of the template store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Not a valid name.
    #[error("invalid template name {0:?}: use 1-64 of [A-Za-z0-9._-], not starting with '.'")]
    InvalidName(String),
    /// No such template.
    #[error("no template {name} in {root}")]
    NotFound {
        /// The name.
        name: TemplateName,
        /// The store.
        root: PathBuf,
    },
    /// A file-system operation failed.
    #[error("cannot {op} {path}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// On what.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

fn io(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> StoreError {
    let path = path.to_path_buf();
    move |source| StoreError::Io { op, path, source }
}

/// The exclusive right to write one template name; released on drop.
#[derive(Debug)]
pub struct TemplateLock {
    _file: File,
    name: TemplateName,
}

/// A directory of templates.
#[derive(Debug, Clone)]
pub struct TemplateStore {
    root: PathBuf,
}

/// Why [`TemplateStore::install`] failed: the store, or the caller's filling.
#[derive(Debug, thiserror::Error)]
pub enum InstallError<E> {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Filling the template failed; nothing was installed.
    #[error(transparent)]
    Fill(E),
}

impl TemplateStore {
    /// The store at `root` (created when first written).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        TemplateStore { root: root.into() }
    }

    /// Where the store is.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The directory of template `name` (which may not exist).
    pub fn dir(&self, name: &TemplateName) -> PathBuf {
        self.root.join(name.as_str())
    }

    /// Whether template `name` is installed.
    pub fn exists(&self, name: &TemplateName) -> bool {
        self.dir(name).join(STATE_FILE).is_file()
    }

    /// Takes the build lock of `name`, waiting for another builder to finish.
    pub fn lock(&self, name: &TemplateName) -> Result<TemplateLock, StoreError> {
        std::fs::create_dir_all(&self.root).map_err(io("create", &self.root))?;
        let path = self.root.join(format!(".{name}.lock"));
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io("open", &path))?;
        loop {
            // SAFETY: flock on an fd we own; it blocks until the lock is ours.
            let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
            if rc == 0 {
                break;
            }
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(io("lock", &path)(e));
            }
        }
        Ok(TemplateLock {
            _file: file,
            name: name.clone(),
        })
    }

    /// Writes a template: `fill` gets an empty temporary directory; when it
    /// succeeds the directory is flushed and renamed into place (replacing, in
    /// one step, a template of the same name). When `fill` or the store fails —
    /// a full disk, say — the temporary directory is removed and any previous
    /// template is untouched.
    pub fn install<T, E>(
        &self,
        lock: &TemplateLock,
        fill: impl FnOnce(&Path) -> Result<T, E>,
    ) -> Result<T, InstallError<E>> {
        let name = &lock.name;
        self.remove_stale(name);
        let tmp = self
            .root
            .join(format!(".tmp-{name}-{}", std::process::id()));
        std::fs::create_dir(&tmp).map_err(io("create", &tmp))?;
        let result = fill(&tmp).map_err(InstallError::Fill).and_then(|value| {
            sync_dir(&tmp)?;
            self.put_in_place(&tmp, &self.dir(name))?;
            sync_dir(&self.root)?;
            Ok(value)
        });
        // After an exchange `tmp` holds the old template; after a failure, the partial one.
        let _ = std::fs::remove_dir_all(&tmp);
        result
    }

    fn put_in_place(&self, tmp: &Path, dest: &Path) -> Result<(), StoreError> {
        match std::fs::rename(tmp, dest) {
            Ok(()) => Ok(()),
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOTEMPTY | libc::EEXIST)) => {
                exchange(tmp, dest).map_err(io("replace", dest))
            }
            Err(e) => Err(io("rename into", dest)(e)),
        }
    }

    /// Removes what a killed builder of `name` left (the caller holds the lock).
    fn remove_stale(&self, name: &TemplateName) {
        let prefix = format!(".tmp-{name}-");
        let Ok(entries) = std::fs::read_dir(&self.root) else {
            return;
        };
        for entry in entries.flatten() {
            if entry.file_name().to_string_lossy().starts_with(&prefix) {
                tracing::info!(path = %entry.path().display(), "removing a half-written template");
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }

    /// Removes template `name`. Forks running from it keep running.
    pub fn remove(&self, name: &TemplateName) -> Result<(), StoreError> {
        let lock = self.lock(name)?;
        let dir = self.dir(name);
        if !dir.exists() {
            return Err(StoreError::NotFound {
                name: name.clone(),
                root: self.root.clone(),
            });
        }
        // Renamed away first, so no reader finds a half-deleted template.
        let trash = self
            .root
            .join(format!(".tmp-{name}-{}", std::process::id()));
        std::fs::rename(&dir, &trash).map_err(io("remove", &dir))?;
        std::fs::remove_dir_all(&trash).map_err(io("remove", &trash))?;
        // The lock file stays: a builder waiting on it must lock the same file
        // the next builder opens.
        drop(lock);
        Ok(())
    }

    /// The installed templates, by name.
    pub fn list(&self) -> Result<Vec<TemplateName>, StoreError> {
        let entries = match std::fs::read_dir(&self.root) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io("list", &self.root)(e)),
        };
        let mut names: Vec<TemplateName> = entries
            .flatten()
            .filter_map(|e| TemplateName::new(&e.file_name().to_string_lossy()).ok())
            .filter(|n| self.exists(n))
            .collect();
        names.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(names)
    }
}

fn sync_dir(path: &Path) -> Result<(), StoreError> {
    File::open(path)
        .and_then(|d| d.sync_all())
        .map_err(io("flush", path))
}

/// Swaps two directories in one step (`renameat2(RENAME_EXCHANGE)`).
fn exchange(a: &Path, b: &Path) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let a = std::ffi::CString::new(a.as_os_str().as_bytes())?;
    let b = std::ffi::CString::new(b.as_os_str().as_bytes())?;
    // SAFETY: both paths are valid NUL-terminated strings that outlive the call.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            a.as_ptr(),
            libc::AT_FDCWD,
            b.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store(tag: &str) -> TemplateStore {
        let root = std::env::temp_dir().join(format!("zygote-store-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        TemplateStore::new(root)
    }

    fn fill_with(text: &'static str) -> impl FnOnce(&Path) -> Result<(), std::io::Error> {
        move |dir| {
            std::fs::write(dir.join(STATE_FILE), text)?;
            std::fs::write(dir.join(MEMORY_FILE), text)
        }
    }

    #[test]
    fn names_are_checked() {
        for bad in ["", ".hidden", "a/b", "..", "x y", &"n".repeat(65)] {
            assert!(TemplateName::new(bad).is_err(), "{bad:?}");
        }
        for good in ["busybox", "img-1.2_x", &"n".repeat(64)] {
            assert!(TemplateName::new(good).is_ok(), "{good:?}");
        }
    }

    #[test]
    fn install_replace_fail_and_remove() {
        let s = store("install");
        let name = TemplateName::new("t").unwrap();
        let lock = s.lock(&name).unwrap();
        s.install(&lock, fill_with("one")).unwrap();
        assert_eq!(
            std::fs::read_to_string(s.dir(&name).join(STATE_FILE)).unwrap(),
            "one"
        );
        // A reader holding the old memory file keeps it across a replacement.
        let held = File::open(s.dir(&name).join(MEMORY_FILE)).unwrap();
        s.install(&lock, fill_with("two")).unwrap();
        assert_eq!(
            std::fs::read_to_string(s.dir(&name).join(STATE_FILE)).unwrap(),
            "two"
        );
        assert_eq!(std::io::read_to_string(&held).unwrap(), "one");

        // A failing fill leaves the installed template and no temporary directory.
        let err = s
            .install(&lock, |dir: &Path| {
                std::fs::write(dir.join(STATE_FILE), "half")?;
                Err::<(), _>(std::io::Error::from_raw_os_error(libc::ENOSPC))
            })
            .unwrap_err();
        assert!(matches!(err, InstallError::Fill(_)));
        assert_eq!(
            std::fs::read_to_string(s.dir(&name).join(STATE_FILE)).unwrap(),
            "two"
        );
        let leftovers: Vec<_> = std::fs::read_dir(s.root())
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(".tmp"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");

        // What a killed builder left is cleaned by the next one.
        let stale = s.root().join(".tmp-t-999999");
        std::fs::create_dir(&stale).unwrap();
        s.install(&lock, fill_with("three")).unwrap();
        assert!(!stale.exists());
        drop(lock);

        assert_eq!(s.list().unwrap(), vec![name.clone()]);
        s.remove(&name).unwrap();
        assert!(s.list().unwrap().is_empty());
        assert!(matches!(s.remove(&name), Err(StoreError::NotFound { .. })));
        std::fs::remove_dir_all(s.root()).unwrap();
    }

    #[test]
    fn concurrent_builders_serialize_and_the_loser_reuses() {
        let s = store("race");
        let name = TemplateName::new("raced").unwrap();
        let builds = std::sync::atomic::AtomicUsize::new(0);
        std::thread::scope(|scope| {
            for _ in 0..4 {
                scope.spawn(|| {
                    let lock = s.lock(&name).unwrap();
                    if !s.exists(&name) {
                        builds.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        s.install(&lock, fill_with("built")).unwrap();
                    }
                });
            }
        });
        assert_eq!(builds.into_inner(), 1, "exactly one builder built it");
        assert!(s.exists(&name));
        std::fs::remove_dir_all(s.root()).unwrap();
    }
}
