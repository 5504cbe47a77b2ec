//! The pod's host cgroup. A zygote pod is one host process, the shim, with
//! the VM inside it (vCPU and device threads, guest memory). Before the VM
//! is made, the shim joins the cgroup its sandbox's spec names
//! (`linux.cgroupsPath`; for `ctr`, the container's), as Kata's
//! `sandbox_cgroup_only` does: the VM's CPU and memory are charged there,
//! so kubelet's pod limits, eviction and `overhead.podFixed` mean what they
//! say, and the sandbox's stats read the VM's real usage from it. When the
//! pod ends, the shim moves back and removes the directories it made.
//!
//! cgroup v2 (one hierarchy) and v1 (the `memory`, `cpu`, `cpuacct` and
//! `pids` hierarchies) are both handled.

use std::path::{Path, PathBuf};

use zygote_agent_api::ContainerStats;

/// v1 controllers the shim joins (others, e.g. cpuset, are left alone).
const V1_CONTROLLERS: [&str; 4] = ["memory", "cpu", "cpuacct", "pids"];

/// The host's cgroup hierarchies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Layout {
    /// The unified hierarchy, mounted here.
    V2(PathBuf),
    /// v1 hierarchies: (their controllers, where mounted).
    V1(Vec<(Vec<String>, PathBuf)>),
}

impl Layout {
    /// The host's, from `/proc/self/mountinfo`.
    pub fn host() -> Option<Layout> {
        Self::parse(&std::fs::read_to_string("/proc/self/mountinfo").ok()?)
    }

    fn parse(mountinfo: &str) -> Option<Layout> {
        let mut v1 = Vec::new();
        let mut v2 = None;
        for line in mountinfo.lines() {
            let fields: Vec<&str> = line.split(' ').collect();
            let Some(dash) = fields.iter().position(|f| *f == "-") else {
                continue;
            };
            let (Some(mount), Some(fstype), Some(options)) =
                (fields.get(4), fields.get(dash + 1), fields.get(dash + 3))
            else {
                continue;
            };
            match *fstype {
                "cgroup2" if *mount == "/sys/fs/cgroup" => v2 = Some(PathBuf::from(mount)),
                "cgroup" => {
                    let controllers: Vec<String> = options
                        .split(',')
                        .filter(|o| V1_CONTROLLERS.contains(o))
                        .map(String::from)
                        .collect();
                    if !controllers.is_empty() {
                        v1.push((controllers, PathBuf::from(mount)));
                    }
                }
                _ => {}
            }
        }
        match (v2, v1.is_empty()) {
            (Some(root), _) => Some(Layout::V2(root)),
            (None, false) => Some(Layout::V1(v1)),
            (None, true) => None,
        }
    }

    fn roots(&self) -> Vec<PathBuf> {
        match self {
            Layout::V2(root) => vec![root.clone()],
            Layout::V1(h) => h.iter().map(|(_, m)| m.clone()).collect(),
        }
    }

    /// The root of the hierarchy holding v1 `controller` (v2: the root).
    fn root_of(&self, controller: &str) -> Option<&Path> {
        match self {
            Layout::V2(root) => Some(root),
            Layout::V1(h) => h
                .iter()
                .find(|(c, _)| c.iter().any(|c| c == controller))
                .map(|(_, m)| m.as_path()),
        }
    }
}

/// A spec's `linux.cgroupsPath` as a path below a hierarchy's root: a
/// cgroupfs path (`/kubepods/besteffort/pod1/ID`), or systemd's
/// `slice:prefix:name` expanded as runc's systemd driver lays it out
/// (`kubepods-besteffort-pod1.slice:cri-containerd:ID` →
/// `kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod1.slice/cri-containerd-ID.scope`).
pub fn expand(cgroups_path: &str) -> Option<PathBuf> {
    let parts: Vec<&str> = cgroups_path.split(':').collect();
    let path = match parts.as_slice() {
        [slice, prefix, name] if slice.is_empty() || slice.ends_with(".slice") => {
            let mut p = PathBuf::new();
            let slice = if slice.is_empty() {
                "system.slice"
            } else {
                slice
            };
            let stem = slice.trim_end_matches(".slice");
            if stem != "-" {
                // Each dash-separated prefix is a parent slice.
                let mut acc = String::new();
                for piece in stem.split('-') {
                    if piece.is_empty() {
                        return None;
                    }
                    if !acc.is_empty() {
                        acc.push('-');
                    }
                    acc.push_str(piece);
                    p.push(format!("{acc}.slice"));
                }
            }
            p.push(format!("{prefix}-{name}.scope"));
            p
        }
        [plain] => PathBuf::from(plain.trim_start_matches('/')),
        _ => return None,
    };
    let plain = path
        .components()
        .all(|c| matches!(c, std::path::Component::Normal(_)));
    (plain && path.components().count() > 0).then_some(path)
}

/// The shim in its pod's cgroup.
#[derive(Debug)]
pub struct PodCgroup {
    layout: Layout,
    /// Below each root.
    path: PathBuf,
    /// The pod's directories (one per hierarchy) this shim made, removed
    /// when it leaves (parents it made stay, as runc leaves them).
    made: Vec<PathBuf>,
    /// Where the shim was: (a hierarchy's root, its cgroup there).
    before: Vec<(PathBuf, PathBuf)>,
}

fn write(path: &Path, value: &str) -> std::io::Result<()> {
    std::fs::write(path, value).map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("write {value:?} to {}: {e}", path.display()),
        )
    })
}

/// This process's cgroup in each hierarchy, from `/proc/self/cgroup`.
fn own_cgroups(layout: &Layout) -> Vec<(PathBuf, PathBuf)> {
    let text = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    let mut out = Vec::new();
    for line in text.lines() {
        let mut f = line.splitn(3, ':');
        let (_, controllers, path) = (f.next(), f.next().unwrap_or(""), f.next().unwrap_or(""));
        let root = match layout {
            Layout::V2(root) if controllers.is_empty() => Some(root.as_path()),
            Layout::V1(_) => controllers.split(',').find_map(|c| layout.root_of(c)),
            Layout::V2(_) => None,
        };
        if let Some(root) = root {
            let rel = PathBuf::from(path.trim_start_matches('/'));
            if !out.iter().any(|(r, _): &(PathBuf, PathBuf)| r == root) {
                out.push((root.to_path_buf(), rel));
            }
        }
    }
    out
}

impl PodCgroup {
    /// Moves this process into `cgroups_path` (made if missing) in every
    /// hierarchy it accounts in.
    pub fn join(cgroups_path: &str) -> std::io::Result<PodCgroup> {
        let bad = |why: String| std::io::Error::new(std::io::ErrorKind::InvalidInput, why);
        let path = expand(cgroups_path)
            .ok_or_else(|| bad(format!("cgroupsPath {cgroups_path:?} is not a cgroup path")))?;
        let layout = Layout::host().ok_or_else(|| bad("no cgroup hierarchy mounted".into()))?;
        let mut cg = PodCgroup {
            before: own_cgroups(&layout),
            layout,
            path,
            made: Vec::new(),
        };
        if let Err(e) = cg.enter() {
            cg.leave();
            return Err(e);
        }
        Ok(cg)
    }

    fn enter(&mut self) -> std::io::Result<()> {
        let pid = std::process::id().to_string();
        for root in self.layout.roots() {
            let mut dir = root.clone();
            for part in self.path.components() {
                if matches!(self.layout, Layout::V2(_)) {
                    // Children account for what their parent hands down.
                    let _ = write(&dir.join("cgroup.subtree_control"), "+memory +cpu +pids");
                }
                dir.push(part);
                if !dir.exists() {
                    std::fs::create_dir(&dir).map_err(|e| {
                        std::io::Error::new(e.kind(), format!("create {}: {e}", dir.display()))
                    })?;
                    if dir == root.join(&self.path) {
                        self.made.push(dir.clone());
                    }
                }
            }
            write(&dir.join("cgroup.procs"), &pid)?;
        }
        Ok(())
    }

    /// Where the shim is, below each root.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn file(&self, controller: &str, name: &str) -> Option<String> {
        let root = self.layout.root_of(controller)?;
        std::fs::read_to_string(root.join(&self.path).join(name)).ok()
    }

    /// The cgroup's counters: the VM's CPU and memory as the host charges them.
    pub fn stats(&self) -> ContainerStats {
        match self.layout {
            Layout::V2(_) => ContainerStats {
                cpu_usage_usec: keyed(self.file("cpu", "cpu.stat"), "usage_usec").unwrap_or(0),
                memory_current: num(self.file("memory", "memory.current")).unwrap_or(0),
                memory_max: num(self.file("memory", "memory.max")).unwrap_or(u64::MAX),
                pids_current: num(self.file("pids", "pids.current")).unwrap_or(0),
                oom_kills: keyed(self.file("memory", "memory.events"), "oom_kill").unwrap_or(0),
            },
            Layout::V1(_) => {
                // v1 says "no limit" with a page-rounded huge number.
                let max = num(self.file("memory", "memory.limit_in_bytes"))
                    .filter(|m| *m < 1 << 62)
                    .unwrap_or(u64::MAX);
                ContainerStats {
                    cpu_usage_usec: num(self.file("cpuacct", "cpuacct.usage")).unwrap_or(0) / 1000,
                    memory_current: num(self.file("memory", "memory.usage_in_bytes")).unwrap_or(0),
                    memory_max: max,
                    pids_current: num(self.file("pids", "pids.current")).unwrap_or(0),
                    oom_kills: keyed(self.file("memory", "memory.oom_control"), "oom_kill")
                        .unwrap_or(0),
                }
            }
        }
    }

    /// How often the memory limit of this cgroup or an ancestor's (where
    /// kubelet puts the pod's) was hit so far: v1's `memory.failcnt`, v2's
    /// `max` events, summed up the tree.
    pub fn memory_limit_hits(&self) -> u64 {
        let Some(root) = self.layout.root_of("memory") else {
            return 0;
        };
        let mut dir = root.to_path_buf();
        let mut hits = 0;
        for part in self.path.components() {
            dir.push(part);
            let read = |name: &str| std::fs::read_to_string(dir.join(name)).ok();
            hits += match self.layout {
                Layout::V1(_) => num(read("memory.failcnt")),
                Layout::V2(_) => keyed(read("memory.events"), "max"),
            }
            .unwrap_or(0);
        }
        hits
    }

    /// Moves the shim back where it was and removes the pod's directories
    /// it made (one that still holds a process stays).
    pub fn leave(&mut self) {
        let pid = std::process::id().to_string();
        for (root, rel) in &self.before {
            if let Err(e) = write(&root.join(rel).join("cgroup.procs"), &pid) {
                tracing::warn!("cannot move the shim back: {e}");
            }
        }
        for dir in self.made.drain(..) {
            if let Err(e) = std::fs::remove_dir(&dir) {
                tracing::warn!("cannot remove cgroup {}: {e}", dir.display());
            }
        }
    }
}

/// How many processes the OOM killer killed in `cgroups_path` (0 if it is
/// not there): its counters read without joining it.
pub fn oom_kills(cgroups_path: &str) -> u64 {
    let (Some(path), Some(layout)) = (expand(cgroups_path), Layout::host()) else {
        return 0;
    };
    let observed = PodCgroup {
        layout,
        path,
        made: Vec::new(),
        before: Vec::new(),
    };
    observed.stats().oom_kills
}

/// A single-value cgroup file's number.
fn num(text: Option<String>) -> Option<u64> {
    text.and_then(|s| s.trim().parse().ok())
}

/// The value of `key` in a flat-keyed cgroup file (`memory.events`).
fn keyed(text: Option<String>, key: &str) -> Option<u64> {
    text.and_then(|s| {
        s.lines().find_map(|l| {
            let (k, v) = l.split_once(' ')?;
            (k == key).then(|| v.trim().parse().ok()).flatten()
        })
    })
}

/// After a shim died: removes its pod's cgroup directories once empty (the
/// dead shim was their only process). containerd runs `delete` as soon as
/// the shim's connection drops, which can be before the kernel has finished
/// the killed process's exit (its guest memory is torn down first) and
/// taken it out of the cgroup: a busy directory is retried for a while.
pub fn remove_dead(cgroups_path: &str) {
    let (Some(path), Some(layout)) = (expand(cgroups_path), Layout::host()) else {
        return;
    };
    // Within containerd's 5 s for the whole `delete`.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
    for root in layout.roots() {
        let dir = root.join(&path);
        loop {
            match std::fs::remove_dir(&dir) {
                Err(e)
                    if e.raw_os_error() == Some(libc::EBUSY)
                        && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    tracing::warn!("cannot remove cgroup {}: {e}", dir.display());
                    break;
                }
                _ => break,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgroups_paths_as_runc_lays_them_out() {
        assert_eq!(
            expand("/kubepods/besteffort/pod1/abc"),
            Some(PathBuf::from("kubepods/besteffort/pod1/abc"))
        );
        assert_eq!(
            expand("kubepods-besteffort-pod1.slice:cri-containerd:abc"),
            Some(PathBuf::from(
                "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod1.slice/cri-containerd-abc.scope"
            ))
        );
        assert_eq!(
            expand(":zygote:x"),
            Some(PathBuf::from("system.slice/zygote-x.scope"))
        );
        assert_eq!(expand("-.slice:p:n"), Some(PathBuf::from("p-n.scope")));
        for bad in [
            "",
            "/",
            "/a/../b",
            "a:b",
            "x.slice:p:n:extra",
            "a--b.slice:p:n",
        ] {
            assert_eq!(expand(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn v1_v2_and_hybrid_hosts() {
        let hybrid = "\
25 19 0:22 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755
26 25 0:23 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw
29 25 0:26 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory
30 25 0:27 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct
31 25 0:28 / /sys/fs/cgroup/pids rw - cgroup cgroup rw,pids
32 25 0:29 / /sys/fs/cgroup/cpuset rw - cgroup cgroup rw,cpuset";
        let Some(Layout::V1(h)) = Layout::parse(hybrid) else {
            panic!("v1")
        };
        assert_eq!(h.len(), 3);
        let l = Layout::V1(h);
        assert_eq!(
            l.root_of("cpuacct"),
            Some(Path::new("/sys/fs/cgroup/cpu,cpuacct"))
        );
        let v2 = "30 25 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate";
        assert_eq!(
            Layout::parse(v2),
            Some(Layout::V2(PathBuf::from("/sys/fs/cgroup")))
        );
        assert_eq!(Layout::parse("1 0 8:1 / / rw - ext4 /dev/sda1 rw"), None);
    }
}
