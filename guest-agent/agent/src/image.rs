//! The image disks: a read-only block device (erofs or ext4) mounted where
//! containers take their root from, and optionally read once so its pages are
//! in the page cache of a template (every fork then shares them).

use std::io::Read;
use std::path::Path;

use crate::container::spec::plain_absolute;

/// Why an image could not be mounted.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    /// Not a virtio disk.
    #[error("device {0:?} must be /dev/vd followed by letters")]
    Device(String),
    /// Not a usable mount point.
    #[error("target {0:?} must be an absolute path without . or ..")]
    Target(String),
    /// No disk with that serial got an image in time.
    #[error("no disk {serial} with an image after {waited_ms} ms")]
    NoDisk {
        /// The serial looked for.
        serial: String,
        /// How long.
        waited_ms: u64,
    },
    /// The unmount failed.
    #[error("unmount {target}: {source}")]
    Unmount {
        /// Where.
        target: String,
        /// Cause.
        source: std::io::Error,
    },
    /// The mount failed.
    #[error("mount {device} on {target}: {source}")]
    Mount {
        /// Device.
        device: String,
        /// Where.
        target: String,
        /// Cause.
        source: std::io::Error,
    },
}

fn valid_device(device: &str) -> bool {
    device
        .strip_prefix("/dev/vd")
        .is_some_and(|rest| !rest.is_empty() && rest.bytes().all(|b| b.is_ascii_lowercase()))
}

/// Mounts `device` read-only at `target` (erofs, else ext4); mounting the same
/// again is not an error. With `warm`, reads every regular file once. Returns
/// the bytes read.
pub fn mount(device: &str, target: &str, warm: bool) -> Result<u64, MountError> {
    if !valid_device(device) {
        return Err(MountError::Device(device.into()));
    }
    if !plain_absolute(Path::new(target)) || target == "/" {
        return Err(MountError::Target(target.into()));
    }
    let failed = |source| MountError::Mount {
        device: device.into(),
        target: target.into(),
        source,
    };
    std::fs::create_dir_all(target).map_err(failed)?;
    let c = |s: &str| std::ffi::CString::new(s).unwrap_or_default();
    let (dev_c, target_c) = (c(device), c(target));
    let mut result = Err(std::io::Error::from_raw_os_error(libc::ENODEV));
    for fstype in [c"erofs", c"ext4"] {
        // SAFETY: valid NUL-terminated strings; no data argument.
        let rc = unsafe {
            libc::mount(
                dev_c.as_ptr(),
                target_c.as_ptr(),
                fstype.as_ptr(),
                libc::MS_RDONLY | libc::MS_NODEV | libc::MS_NOSUID,
                std::ptr::null(),
            )
        };
        result = if rc == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        };
        match &result {
            Ok(()) => break,
            // Already mounted here (the template did it).
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                result = Ok(());
                break;
            }
            Err(_) => {}
        }
    }
    result.map_err(failed)?;
    Ok(if warm { read_all(Path::new(target)) } else { 0 })
}

/// The `/dev/vdX` whose serial is `serial` once it has a capacity,
/// looking in `sys_block` (`/sys/block`) for up to `wait`.
pub fn find_disk(
    sys_block: &Path,
    serial: &str,
    wait: std::time::Duration,
) -> Result<String, MountError> {
    let start = std::time::Instant::now();
    loop {
        if let Ok(entries) = std::fs::read_dir(sys_block) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                let read = |f: &str| std::fs::read_to_string(e.path().join(f)).unwrap_or_default();
                // The driver reads the id as 20 bytes, NUL-padded.
                let found = read("serial");
                let found = found.trim_end_matches(['\0', '\n']);
                let size: u64 = read("size").trim().parse().unwrap_or(0);
                if name.starts_with("vd") && found == serial && size > 0 {
                    return Ok(format!("/dev/{name}"));
                }
            }
        }
        if start.elapsed() >= wait {
            return Err(MountError::NoDisk {
                serial: serial.into(),
                waited_ms: wait.as_millis() as u64,
            });
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Unmounts the image at `target` and removes the mount point.
pub fn unmount(target: &str) -> Result<(), MountError> {
    if !plain_absolute(Path::new(target)) || target == "/" {
        return Err(MountError::Target(target.into()));
    }
    let c = std::ffi::CString::new(target).map_err(|_| MountError::Target(target.into()))?;
    // SAFETY: a valid NUL-terminated path.
    if unsafe { libc::umount2(c.as_ptr(), 0) } != 0 {
        return Err(MountError::Unmount {
            target: target.into(),
            source: std::io::Error::last_os_error(),
        });
    }
    let _ = std::fs::remove_dir(target);
    Ok(())
}

/// Reads every regular file below `dir` once (not following symbolic
/// links; a file with several hard links, as busybox's applets often are,
/// is read once: it is one inode, and each read is guest kernel work).
fn read_all(dir: &Path) -> u64 {
    use std::os::unix::fs::DirEntryExt;
    let mut total = 0;
    let mut buf = vec![0u8; 256 * 1024];
    let mut seen = std::collections::HashSet::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let Ok(kind) = e.file_type() else { continue };
            if kind.is_dir() {
                stack.push(e.path());
            } else if kind.is_file() && seen.insert(e.ino()) {
                if let Ok(mut f) = std::fs::File::open(e.path()) {
                    while let Ok(n) = f.read(&mut buf) {
                        if n == 0 {
                            break;
                        }
                        total += n as u64;
                    }
                }
            }
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_disk_is_found_by_serial_once_it_has_a_capacity() {
        let sys = std::env::temp_dir().join(format!("zygote-sysblock-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&sys);
        for (dev, serial, size) in [("vda", "zygote-ro", "80"), ("vdb", "zygote-slot0", "0")] {
            std::fs::create_dir_all(sys.join(dev)).unwrap();
            std::fs::write(sys.join(dev).join("serial"), serial).unwrap();
            std::fs::write(sys.join(dev).join("size"), format!("{size}\n")).unwrap();
        }
        let short = std::time::Duration::from_millis(50);
        assert!(matches!(
            find_disk(&sys, "zygote-slot0", short),
            Err(MountError::NoDisk { .. })
        ));
        std::fs::write(sys.join("vdb/size"), "64\n").unwrap();
        assert_eq!(find_disk(&sys, "zygote-slot0", short).unwrap(), "/dev/vdb");
        assert!(find_disk(&sys, "zygote-slot9", short).is_err());
        assert!(unmount("relative").is_err());
        std::fs::remove_dir_all(&sys).unwrap();
    }

    #[test]
    fn hard_links_are_read_once() {
        let d = std::env::temp_dir().join(format!("zygote-links-{}", std::process::id()));
        std::fs::create_dir_all(d.join("bin")).unwrap();
        std::fs::write(d.join("bin/busybox"), vec![7u8; 10_000]).unwrap();
        for applet in ["sh", "ls", "cat"] {
            std::fs::hard_link(d.join("bin/busybox"), d.join("bin").join(applet)).unwrap();
        }
        std::fs::write(d.join("other"), b"abc").unwrap();
        assert_eq!(read_all(&d), 10_003);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn devices_and_targets_are_checked_first() {
        assert!(matches!(
            mount("/dev/sda", "/mnt/x", false),
            Err(MountError::Device(_))
        ));
        assert!(matches!(
            mount("/dev/vd", "/mnt/x", false),
            Err(MountError::Device(_))
        ));
        assert!(matches!(
            mount("/dev/vda/../sda", "/mnt/x", false),
            Err(MountError::Device(_))
        ));
        assert!(matches!(
            mount("/dev/vda", "/mnt/../etc", false),
            Err(MountError::Target(_))
        ));
        assert!(matches!(
            mount("/dev/vda", "relative", false),
            Err(MountError::Target(_))
        ));
        let d = std::env::temp_dir().join(format!("zygote-warm-{}", std::process::id()));
        std::fs::create_dir_all(d.join("a/b")).unwrap();
        std::fs::write(d.join("a/b/f"), vec![1u8; 1000]).unwrap();
        std::fs::write(d.join("g"), vec![1u8; 24]).unwrap();
        std::os::unix::fs::symlink("g", d.join("link")).unwrap();
        assert_eq!(read_all(&d), 1024);
        std::fs::remove_dir_all(&d).unwrap();
    }
}
