//! Paths inside a container's root, resolved as if the root were `/`.
//!
//! The image is untrusted: its tree may hold links such as `etc/hostname ->
//! /init` or `dev -> /`. Before `pivot_root` the init works in the agent's
//! view of the guest, where such a link would lead out of the container. So
//! every path the init makes or mounts on is opened here with
//! `openat2(RESOLVE_IN_ROOT)` (links and `..` resolved with the container's
//! root as `/`), missing parts made one at a time below what was already
//! resolved, and the mount made on the opened file (`/proc/self/fd/N`), not
//! on a path that could change under it.

use std::collections::VecDeque;
use std::ffi::{CString, OsString};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Component, Path, PathBuf};

/// What to make where the path ends, if it is not there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Make {
    /// Nothing: the path must exist.
    Nothing,
    /// A directory (and every missing directory above it).
    Dir,
    /// An empty file (directories above it made).
    File,
}

fn os<'a>(what: &str, path: &'a Path) -> impl FnOnce(std::io::Error) -> String + 'a {
    let what = what.to_string();
    move |e| format!("{what} {}: {e}", path.display())
}

fn c(path: &Path) -> Result<CString, String> {
    use std::os::unix::ffi::OsStrExt;
    CString::new(path.as_os_str().as_bytes()).map_err(|_| format!("{path:?} holds a NUL byte"))
}

/// `openat2(dir, path, flags, RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)`.
fn openat2(dir: &OwnedFd, path: &Path, flags: libc::c_int) -> std::io::Result<OwnedFd> {
    let path = c(path).map_err(std::io::Error::other)?;
    // SAFETY: open_how is plain data; zeroed is a valid value of it.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (flags | libc::O_CLOEXEC) as u64;
    how.resolve = libc::RESOLVE_IN_ROOT | libc::RESOLVE_NO_MAGICLINKS;
    // SAFETY: a valid path string, an open_how of the size passed; the
    // returned fd, if any, is ours alone.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            dir.as_raw_fd(),
            path.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) })
}

/// Opens the directory `root` to resolve paths below it.
pub fn open_root(root: &Path) -> Result<OwnedFd, String> {
    let path = c(root)?;
    // SAFETY: a valid path string; the fd returned is ours alone.
    let fd = unsafe {
        libc::open(
            path.as_ptr(),
            libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(os("open the container root", root)(
            std::io::Error::last_os_error(),
        ));
    }
    // SAFETY: a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Opens (`O_PATH`) `path`, absolute inside the container, below `root`, with
/// every link and `..` resolved inside it (as the kernel would with the root
/// as `/`); makes what is missing as `make` says, following a dangling link
/// to where it points inside the root. What cannot be resolved inside the
/// root is an error, never a path outside it.
pub fn open_in_root(root: &OwnedFd, path: &Path, make: Make) -> Result<OwnedFd, String> {
    if path.components().any(|c| c == Component::ParentDir) {
        return Err(format!("{} must not contain '..'", path.display()));
    }
    // Most targets are in the image already: one call (each is emulated
    // guest kernel work on PVM, and this runs at every container start).
    match openat2(root, path, libc::O_PATH) {
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) && make != Make::Nothing => {}
        done => return done.map_err(os("open", path)),
    }
    let mut todo: VecDeque<OsString> = names(path);
    let mut at =
        openat2(root, Path::new("/"), libc::O_PATH).map_err(os("open the root for", path))?;
    // Where `at` is, inside the root (links in it resolved when a `..`
    // needs its real parent).
    let mut so_far = PathBuf::from("/");
    let mut links = 0;
    while let Some(name) = todo.pop_front() {
        if name == ".." {
            // The kernel's path of `at`, minus the root's, then its parent.
            let real = std::fs::read_link(fd_path(&at)).map_err(os("resolve", &so_far))?;
            let root_real = std::fs::read_link(fd_path(root)).map_err(os("resolve", path))?;
            so_far = Path::new("/").join(real.strip_prefix(&root_real).unwrap_or(Path::new("")));
            so_far.pop();
            at = openat2(root, &so_far, libc::O_PATH).map_err(os("open", &so_far))?;
            continue;
        }
        let next = so_far.join(&name);
        match openat2(root, &next, libc::O_PATH) {
            Ok(fd) => at = fd,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                let name_c = c(Path::new(&name))?;
                if let Some(target) = readlinkat(&at, &name_c) {
                    // A dangling link: go on from where it points, inside the root.
                    links += 1;
                    if links > 40 {
                        return Err(format!("{}: too many levels of links", path.display()));
                    }
                    let target = PathBuf::from(target);
                    for part in names(&target).into_iter().rev() {
                        todo.push_front(part);
                    }
                    if target.is_absolute() {
                        so_far = PathBuf::from("/");
                        at = openat2(root, &so_far, libc::O_PATH).map_err(os("open", &so_far))?;
                    }
                    continue;
                }
                make_entry(&at, &name_c, todo.is_empty() && make == Make::File)
                    .map_err(os("create", &next))?;
                at = openat2(root, &next, libc::O_PATH).map_err(os("open", &next))?;
            }
            Err(e) => return Err(os("open", &next)(e)),
        }
        so_far = next;
    }
    Ok(at)
}

/// The names in a path, `..` kept, `/` and `.` left out.
fn names(path: &Path) -> VecDeque<OsString> {
    path.components()
        .filter_map(|c| match c {
            Component::Normal(name) => Some(name.to_os_string()),
            Component::ParentDir => Some("..".into()),
            _ => None,
        })
        .collect()
}

/// The target of the link `name` in `dir`, if it is one.
fn readlinkat(dir: &OwnedFd, name: &CString) -> Option<OsString> {
    use std::os::unix::ffi::OsStringExt;
    let mut buf = vec![0u8; libc::PATH_MAX as usize];
    // SAFETY: a directory fd, a valid name and a buffer of the length passed.
    let n = unsafe {
        libc::readlinkat(
            dir.as_raw_fd(),
            name.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    (n > 0).then(|| {
        buf.truncate(n as usize);
        OsString::from_vec(buf)
    })
}

/// Makes `name` in `dir`: an empty file, or a directory.
fn make_entry(dir: &OwnedFd, name: &CString, file: bool) -> std::io::Result<()> {
    let rc = if file {
        // SAFETY: a directory fd and a valid name; O_NOFOLLOW|O_EXCL: a new file only.
        let fd = unsafe {
            libc::openat(
                dir.as_raw_fd(),
                name.as_ptr(),
                libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW | libc::O_WRONLY | libc::O_CLOEXEC,
                0o644,
            )
        };
        if fd >= 0 {
            // SAFETY: the fd just made, closed once.
            unsafe { libc::close(fd) };
        }
        fd.min(0)
    } else {
        // SAFETY: a directory fd and a valid name.
        unsafe { libc::mkdirat(dir.as_raw_fd(), name.as_ptr(), 0o755) }
    };
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// The path that names an open fd, for calls that take only paths (mount).
pub fn fd_path(fd: &OwnedFd) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn scratch(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("zygote-resolve-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("root/etc")).unwrap();
        std::fs::create_dir_all(dir.join("outside")).unwrap();
        dir
    }

    fn real(fd: &OwnedFd) -> PathBuf {
        std::fs::read_link(fd_path(fd)).unwrap()
    }

    #[test]
    fn links_resolve_inside_the_root() {
        let dir = scratch("links");
        let root = dir.join("root");
        let outside = dir.join("outside");
        std::fs::write(outside.join("init"), "keep").unwrap();
        // Absolute and relative links that would lead out of the root.
        symlink(outside.join("init"), root.join("etc/hostname")).unwrap();
        symlink("/", root.join("dev")).unwrap();
        symlink("../../../../..", root.join("up")).unwrap();
        symlink(&outside, root.join("abs")).unwrap();
        let r = open_root(&root).unwrap();

        let f = open_in_root(&r, Path::new("/etc/hostname"), Make::File).unwrap();
        assert!(real(&f).starts_with(&root), "{:?}", real(&f));
        assert_eq!(
            std::fs::read_to_string(outside.join("init")).unwrap(),
            "keep"
        );

        // The link's target is made inside the root.
        assert_eq!(
            real(&f),
            root.join(outside.join("init").strip_prefix("/").unwrap())
        );
        let d = open_in_root(&r, Path::new("/dev/console"), Make::File).unwrap();
        assert_eq!(real(&d), root.join("console"));
        let u = open_in_root(&r, Path::new("/up/sub/dir"), Make::Dir).unwrap();
        assert_eq!(real(&u), root.join("sub/dir"));
        let a = open_in_root(&r, Path::new("/abs/x"), Make::Dir).unwrap();
        assert!(real(&a).starts_with(&root), "{:?}", real(&a));
        assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 1);

        // A dangling relative link with `..` in its target.
        symlink("sub2/../made", root.join("rel")).unwrap();
        let m = open_in_root(&r, Path::new("/rel"), Make::Dir).unwrap();
        assert_eq!(real(&m), root.join("made"));
        // What exists is opened as it is.
        let e = open_in_root(&r, Path::new("/etc"), Make::Nothing).unwrap();
        assert_eq!(real(&e), root.join("etc"));

        assert!(open_in_root(&r, Path::new("/missing"), Make::Nothing).is_err());
        assert!(open_in_root(&r, Path::new("/a/../b"), Make::Dir).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
