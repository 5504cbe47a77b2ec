//! The image disk of a container's rootfs: the erofs image cached by the
//! image's chain ID (or, when containerd cannot say, by the snapshot's
//! layer directories), else built from the mounted snapshot.

use std::path::Path;

use containerd_shim_protos::api;

use super::super::bundle::unmount;
use super::super::config::ShimConfig;
use super::super::content;
use super::super::spec;
use super::errors::TaskError;
use crate::image::{ImageBuild, ImageStore};

/// The image disk for `mounts` (containerd's rootfs mounts of `bundle`),
/// of the image whose layers have `chain_id` if known.
pub fn image_of(
    config: &ShimConfig,
    bundle: &Path,
    mounts: &[api::Mount],
    chain_id: Option<&str>,
) -> Result<ImageBuild, TaskError> {
    let described: Vec<(String, String, Vec<String>)> = mounts
        .iter()
        .map(|m| (m.type_.clone(), m.source.clone(), m.options.clone()))
        .collect();
    let snapshot_key = spec::image_key(&described).ok_or_else(|| {
        TaskError::Invalid(
            "zygote needs the image's snapshot mounts (rootfs) to make its disk".into(),
        )
    })?;
    let key = chain_id.map_or(snapshot_key, content::image_key);
    let store = ImageStore::new(&config.images);
    if let Some(cached) = store.cached(&key) {
        return Ok(cached);
    }
    let rootfs = bundle.join("rootfs");
    std::fs::create_dir_all(&rootfs).map_err(TaskError::Mount)?;
    for m in mounts {
        let kind = (!m.type_.is_empty()).then_some(m.type_.as_str());
        let source = (!m.source.is_empty()).then_some(m.source.as_str());
        if let Err(e) = containerd_shim::mount::mount_rootfs(kind, source, &m.options, &rootfs) {
            unmount(&rootfs);
            return Err(TaskError::Mount(std::io::Error::other(e.to_string())));
        }
    }
    let built = store.from_dir(&key, &rootfs);
    unmount(&rootfs);
    let built = built?;
    tracing::info!(
        "image {} built from the snapshot in {:.0} ms",
        built.key,
        built.build_ms
    );
    Ok(built)
}
