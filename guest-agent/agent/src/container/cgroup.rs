//! One cgroup (v2) per container: its limits, its counters, its OOM kills.

use std::path::{Path, PathBuf};

use super::spec::Resources;

/// Where container cgroups go below the cgroup2 root.
const PARENT: &str = "containers";
const CONTROLLERS: &str = "+memory +pids +cpu";

/// A cgroup2 hierarchy's root if `root` is one (it has `cgroup.controllers`).
pub fn v2_root(root: &Path) -> Option<PathBuf> {
    root.join("cgroup.controllers")
        .exists()
        .then(|| root.into())
}

/// An I/O error that names `path`.
fn at(path: &Path) -> impl FnOnce(std::io::Error) -> std::io::Error {
    let path = path.to_path_buf();
    move |e| std::io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}

/// The parent of every container's cgroup under `root`, made if missing,
/// with the controllers enabled at each level down to the containers'.
fn containers_parent(root: &Path) -> std::io::Result<PathBuf> {
    let parent = root.join(PARENT);
    std::fs::create_dir_all(&parent).map_err(at(&parent))?;
    for level in [root, parent.as_path()] {
        let file = level.join("cgroup.subtree_control");
        std::fs::write(&file, CONTROLLERS).map_err(at(&file))?;
    }
    Ok(parent)
}

/// Creates the container's cgroup with `resources`; returns its path.
pub fn create(root: &Path, id: &str, resources: &Resources) -> std::io::Result<PathBuf> {
    let dir = containers_parent(root)?.join(id);
    std::fs::create_dir(&dir).map_err(at(&dir))?;
    let result = apply(&dir, resources);
    if result.is_err() {
        let _ = std::fs::remove_dir(&dir);
    }
    result.map(|()| dir)
}

/// The least a pod may be given (below it, its own agent work would fail).
pub const POD_MEMORY_MIN: u64 = 1 << 20;

/// Caps the memory of all containers under `root` together: the parent of
/// their cgroups gets `memory.max` (the pod's size; each container's own
/// limit still applies below it).
pub fn limit_pod_memory(root: &Path, bytes: u64) -> std::io::Result<()> {
    if bytes < POD_MEMORY_MIN {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("a pod memory of {bytes} bytes is below {POD_MEMORY_MIN}"),
        ));
    }
    apply(
        &containers_parent(root)?,
        &Resources {
            memory_max: Some(bytes as i64),
            ..Default::default()
        },
    )
}

/// Writes the limits `resources` sets into the cgroup `dir` (those it leaves
/// out stay as they are).
pub fn apply(dir: &Path, resources: &Resources) -> std::io::Result<()> {
    let set = |file: &str, value: String| {
        let path = dir.join(file);
        std::fs::write(&path, value)
            .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", path.display())))
    };
    {
        if let Some(m) = resources.memory_max.filter(|&m| m > 0) {
            set("memory.max", m.to_string())?;
            // No swap in the guest; be explicit for hosts that have it.
            let _ = set("memory.swap.max", "0".into());
        }
        if let Some(p) = resources.pids_max.filter(|&p| p > 0) {
            set("pids.max", p.to_string())?;
        }
        // cpu.max and cpu.weight exist only with the kernel's CFS group
        // scheduling; without it CPU limits are left out (and said), not fatal.
        let cpu = |file: &str| {
            let present = dir.join(file).exists();
            if !present {
                eprintln!(
                    "zygote-agent: {}: no {file} in this kernel; CPU limit not applied",
                    dir.display()
                );
            }
            present
        };
        if let Some(q) = resources.cpu_quota.filter(|&q| q > 0 && cpu("cpu.max")) {
            let period = resources.cpu_period.unwrap_or(100_000);
            set("cpu.max", format!("{q} {period}"))?;
        }
        if let Some(shares) = resources.cpu_shares.filter(|&s| s > 0 && cpu("cpu.weight")) {
            // runc's conversion of v1 shares (2..262144) to v2 weight (1..10000).
            let weight = 1 + ((shares.clamp(2, 262_144) - 2) * 9999) / 262_142;
            set("cpu.weight", weight.to_string())?;
        }
        Ok(())
    }
}

/// The processes in the cgroup `dir` (`cgroup.procs`).
pub fn pids(dir: &Path) -> Vec<u32> {
    std::fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// A counter `key` from a flat-keyed cgroup file (`memory.events`, `cpu.stat`).
pub fn keyed(dir: &Path, file: &str, key: &str) -> u64 {
    std::fs::read_to_string(dir.join(file))
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            let mut parts = l.split_whitespace();
            (parts.next() == Some(key)).then(|| parts.next()?.parse().ok())?
        })
        .unwrap_or(0)
}

/// A single-value cgroup file (`memory.current`); `max` reads as `u64::MAX`.
pub fn single(dir: &Path, file: &str) -> u64 {
    let text = std::fs::read_to_string(dir.join(file)).unwrap_or_default();
    match text.trim() {
        "max" => u64::MAX,
        v => v.parse().unwrap_or(0),
    }
}

/// Removes the cgroup (its processes are gone).
pub fn remove(dir: &Path) {
    let _ = std::fs::remove_dir(dir);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pod_memory_caps_the_parent_of_every_container() {
        let root = std::env::temp_dir().join(format!("zygote-podmem-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).unwrap();
        limit_pod_memory(&root, 96 << 20).unwrap();
        let read = |f: &str| std::fs::read_to_string(root.join(f)).unwrap();
        assert_eq!(read("containers/memory.max"), (96u64 << 20).to_string());
        assert_eq!(read("cgroup.subtree_control"), CONTROLLERS);
        let err = limit_pod_memory(&root, 4096).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput);
        assert_eq!(read("containers/memory.max"), (96u64 << 20).to_string());
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn limits_are_written_and_counters_read() {
        let root = std::env::temp_dir().join(format!("zygote-cgroup-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).unwrap();
        assert_eq!(
            v2_root(&root),
            None,
            "not a cgroup2 root without cgroup.controllers"
        );
        std::fs::write(root.join("cgroup.controllers"), "cpu memory pids").unwrap();
        assert_eq!(v2_root(&root), Some(root.clone()));
        let r = Resources {
            memory_max: Some(8 << 20),
            pids_max: Some(16),
            cpu_quota: Some(50_000),
            cpu_period: None,
            cpu_shares: Some(1024),
        };
        let dir = create(&root, "c1", &r).unwrap();
        let read = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap();
        assert_eq!(read("memory.max"), (8 << 20).to_string());
        assert_eq!(read("pids.max"), "16");
        assert!(
            !dir.join("cpu.max").exists(),
            "a kernel without CFS group scheduling has no cpu.max: left out"
        );
        // With the files the cpu controller has, the CPU limits are written.
        std::fs::write(dir.join("cpu.max"), "max 100000").unwrap();
        std::fs::write(dir.join("cpu.weight"), "100").unwrap();
        apply(&dir, &r).unwrap();
        assert_eq!(read("cpu.max"), "50000 100000");
        assert_eq!(read("cpu.weight"), "39", "runc's conversion of 1024 shares");
        assert_eq!(read("../cgroup.subtree_control"), CONTROLLERS);
        std::fs::write(
            dir.join("memory.events"),
            "low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n",
        )
        .unwrap();
        assert_eq!(keyed(&dir, "memory.events", "oom_kill"), 1);
        assert_eq!(keyed(&dir, "memory.events", "absent"), 0);
        std::fs::write(dir.join("memory.current"), "max\n").unwrap();
        assert_eq!(single(&dir, "memory.current"), u64::MAX);
        assert!(
            create(&root, "c1", &r).is_err(),
            "an existing cgroup is not reused"
        );
        std::fs::remove_dir_all(&root).unwrap();
    }
}
