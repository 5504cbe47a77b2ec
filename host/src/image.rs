//! Container images as read-only disks: an image's unpacked root file system
//! made into one erofs file (`mkfs.erofs`), built once and cached by a key
//! naming the image's content (the manifest digest of an OCI layout, the chain
//! of layers containerd mounted).
//!
//! ```text
//! <root>/<key>.erofs                    one image, read-only
//! <root>/.<key>.lock                    builders of <key> serialize on this flock
//! <root>/.tmp-<key>-<pid>.erofs         being written; renamed into place
//! ```

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

/// Errors making an image.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// Not a usable cache key.
    #[error("invalid image key {0:?}: use 1-128 of [A-Za-z0-9_.-]")]
    Key(String),
    /// The OCI layout could not be read or has no such tag.
    #[error("OCI layout {layout}: {why}")]
    Layout {
        /// The layout directory.
        layout: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// A tool failed or is missing.
    #[error("{tool} failed: {why}")]
    Tool {
        /// Which.
        tool: &'static str,
        /// Its error output or why it did not run.
        why: String,
    },
    /// A file operation failed.
    #[error("{what} {}", path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// On which path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> ImageError {
    let path = path.to_path_buf();
    move |source| ImageError::Io { what, path, source }
}

/// An image ready to attach.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ImageBuild {
    /// The erofs file.
    pub path: PathBuf,
    /// Its cache key.
    pub key: String,
    /// Found in the cache (nothing built).
    pub cached: bool,
    /// Time to unpack and build (0 when cached), ms.
    pub build_ms: f64,
}

/// The image cache.
#[derive(Clone, Debug)]
pub struct ImageStore {
    root: PathBuf,
}

fn valid_key(key: &str) -> bool {
    !key.is_empty()
        && key.len() <= 128
        && !key.starts_with('.')
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

/// Runs `cmd`; its error output on failure.
fn run(tool: &'static str, cmd: &mut Command) -> Result<(), ImageError> {
    let out = cmd.output().map_err(|e| ImageError::Tool {
        tool,
        why: format!(
            "cannot run it ({e}); Debian package {} (hack/containerd installs it)",
            if tool == "umoci" {
                "umoci"
            } else {
                "erofs-utils"
            }
        ),
    })?;
    if out.status.success() {
        return Ok(());
    }
    Err(ImageError::Tool {
        tool,
        why: format!(
            "{}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ),
    })
}

impl ImageStore {
    /// A store under `root` (created when first written).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        ImageStore { root: root.into() }
    }

    /// The image file of `key` (whether or not it exists).
    pub fn path(&self, key: &str) -> PathBuf {
        self.root.join(format!("{key}.erofs"))
    }

    /// The image of `key` if it is in the cache.
    pub fn cached(&self, key: &str) -> Option<ImageBuild> {
        let path = self.path(key);
        (valid_key(key) && path.is_file()).then(|| ImageBuild {
            path,
            key: key.into(),
            cached: true,
            build_ms: 0.0,
        })
    }

    /// The image of `key`, built from the directory `rootfs` if not cached.
    pub fn from_dir(&self, key: &str, rootfs: &Path) -> Result<ImageBuild, ImageError> {
        self.get_or_build(key, |out| {
            run(
                "mkfs.erofs",
                Command::new("mkfs.erofs")
                    .arg("--quiet")
                    .arg(out)
                    .arg(rootfs),
            )
        })
    }

    /// The image `tag` of the OCI image layout `layout`, keyed by its manifest
    /// digest; unpacked with `umoci raw unpack` when not cached.
    pub fn from_oci_layout(&self, layout: &Path, tag: &str) -> Result<ImageBuild, ImageError> {
        let digest = manifest_digest(layout, tag)?;
        let key = digest.replace(':', "-");
        let scratch = self
            .root
            .join(format!(".unpack-{key}-{}", std::process::id()));
        let result = self.get_or_build(&key, |out| {
            let _ = std::fs::remove_dir_all(&scratch);
            run(
                "umoci",
                Command::new("umoci")
                    .args(["raw", "unpack", "--image"])
                    .arg(format!("{}:{tag}", layout.display()))
                    .arg(&scratch),
            )?;
            run(
                "mkfs.erofs",
                Command::new("mkfs.erofs")
                    .arg("--quiet")
                    .arg(out)
                    .arg(&scratch),
            )
        });
        let _ = std::fs::remove_dir_all(&scratch);
        result
    }

    /// The cached image of `key`, or one made by `build` (given the file to
    /// write) under `key`'s lock and renamed into place.
    fn get_or_build(
        &self,
        key: &str,
        build: impl FnOnce(&Path) -> Result<(), ImageError>,
    ) -> Result<ImageBuild, ImageError> {
        if !valid_key(key) {
            return Err(ImageError::Key(key.into()));
        }
        let path = self.path(key);
        let found = |cached, build_ms| ImageBuild {
            path: path.clone(),
            key: key.into(),
            cached,
            build_ms,
        };
        if path.is_file() {
            return Ok(found(true, 0.0));
        }
        std::fs::create_dir_all(&self.root).map_err(io("create", &self.root))?;
        let lock_path = self.root.join(format!(".{key}.lock"));
        let lock = std::fs::File::create(&lock_path).map_err(io("create", &lock_path))?;
        // SAFETY: flock on an fd we own; it blocks until the lock is ours.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(io("lock", &lock_path)(std::io::Error::last_os_error()));
        }
        // Another builder may have finished while we waited.
        if path.is_file() {
            return Ok(found(true, 0.0));
        }
        let started = Instant::now();
        let tmp = self
            .root
            .join(format!(".tmp-{key}-{}.erofs", std::process::id()));
        let _ = std::fs::remove_file(&tmp);
        let result = build(&tmp).and_then(|()| {
            std::fs::File::open(&tmp)
                .and_then(|f| f.sync_all())
                .map_err(io("sync", &tmp))?;
            std::fs::rename(&tmp, &path).map_err(io("rename into place", &path))
        });
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result.map(|()| found(false, started.elapsed().as_secs_f64() * 1e3))
    }
}

/// The digest (`sha256:…`) of the manifest tagged `tag` in an OCI layout's
/// `index.json` (the only manifest when `tag` is empty).
pub fn manifest_digest(layout: &Path, tag: &str) -> Result<String, ImageError> {
    let bad = |why: String| ImageError::Layout {
        layout: layout.into(),
        why,
    };
    let index_path = layout.join("index.json");
    let text = std::fs::read_to_string(&index_path)
        .map_err(|e| bad(format!("cannot read index.json: {e}")))?;
    let index: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| bad(format!("index.json: {e}")))?;
    let manifests = index["manifests"]
        .as_array()
        .ok_or_else(|| bad("index.json has no manifests".into()))?;
    let ref_name = |m: &serde_json::Value| {
        m["annotations"]["org.opencontainers.image.ref.name"]
            .as_str()
            .map(str::to_owned)
    };
    let chosen = if tag.is_empty() && manifests.len() == 1 {
        manifests.first()
    } else {
        manifests
            .iter()
            .find(|m| ref_name(m).as_deref() == Some(tag))
    };
    let Some(m) = chosen else {
        let tags: Vec<String> = manifests.iter().filter_map(ref_name).collect();
        return Err(bad(format!(
            "no image tagged {tag:?} (tags: {})",
            tags.join(", ")
        )));
    };
    let digest = m["digest"]
        .as_str()
        .ok_or_else(|| bad("a manifest without a digest".into()))?;
    let valid = digest.split_once(':').is_some_and(|(alg, hex)| {
        !alg.is_empty()
            && alg.bytes().all(|b| b.is_ascii_alphanumeric())
            && !hex.is_empty()
            && hex.bytes().all(|b| b.is_ascii_hexdigit())
    });
    if !valid {
        return Err(bad(format!("malformed digest {digest:?}")));
    }
    Ok(digest.into())
}

/// Splits `LAYOUT:TAG` (the tag after the last `:`; none means the only image).
pub fn split_layout_ref(reference: &str) -> (PathBuf, String) {
    match reference.rsplit_once(':') {
        Some((layout, tag)) if !tag.contains('/') => (layout.into(), tag.into()),
        _ => (reference.into(), String::new()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("zygote-image-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn manifest_digests_by_tag_and_bad_layouts() {
        let d = scratch("layout");
        let digest = format!("sha256:{}", "ab".repeat(32));
        std::fs::write(
            d.join("index.json"),
            serde_json::json!({"schemaVersion": 2, "manifests": [
                {"digest": digest, "annotations": {"org.opencontainers.image.ref.name": "v1"}},
                {"digest": "sha256:00", "annotations": {"org.opencontainers.image.ref.name": "v2"}}
            ]})
            .to_string(),
        )
        .unwrap();
        assert_eq!(manifest_digest(&d, "v1").unwrap(), digest);
        let e = manifest_digest(&d, "v3").unwrap_err().to_string();
        assert!(e.contains("no image tagged \"v3\" (tags: v1, v2)"), "{e}");
        assert!(
            manifest_digest(&d, "").is_err(),
            "two images: a tag is needed"
        );
        std::fs::write(
            d.join("index.json"),
            r#"{"manifests": [{"digest": "../x"}]}"#,
        )
        .unwrap();
        let e = manifest_digest(&d, "").unwrap_err().to_string();
        assert!(e.contains("malformed digest"), "{e}");
        std::fs::write(d.join("index.json"), "{").unwrap();
        assert!(manifest_digest(&d, "").is_err());
        assert!(manifest_digest(&d.join("missing"), "").is_err());
        assert_eq!(
            split_layout_ref("/a/b:latest"),
            (PathBuf::from("/a/b"), "latest".to_string())
        );
        assert_eq!(
            split_layout_ref("/a/b"),
            (PathBuf::from("/a/b"), String::new())
        );
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_directory_image_is_built_once_and_failures_leave_nothing() {
        let d = scratch("dir");
        let rootfs = d.join("rootfs");
        std::fs::create_dir_all(rootfs.join("etc")).unwrap();
        std::fs::write(rootfs.join("etc/hello"), "hi\n").unwrap();
        let store = ImageStore::new(d.join("images"));
        assert!(matches!(
            store.from_dir("../x", &rootfs),
            Err(ImageError::Key(_))
        ));
        let Ok(first) = store.from_dir("k1", &rootfs) else {
            // mkfs.erofs missing: the error says so (hack/test installs it).
            let e = store.from_dir("k1", &rootfs).unwrap_err().to_string();
            assert!(e.contains("mkfs.erofs"), "{e}");
            return;
        };
        assert!(!first.cached && first.path.is_file());
        let second = store.from_dir("k1", &rootfs).unwrap();
        assert!(second.cached);
        assert_eq!(second.path, first.path);
        // A build that fails leaves no file, cached or temporary.
        let e = store
            .from_dir("k2", &d.join("no-such-dir"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("mkfs.erofs failed"), "{e}");
        let left: Vec<String> = std::fs::read_dir(d.join("images"))
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| !n.ends_with(".lock"))
            .collect();
        assert_eq!(left, ["k1.erofs"]);
        std::fs::remove_dir_all(&d).unwrap();
    }
}
