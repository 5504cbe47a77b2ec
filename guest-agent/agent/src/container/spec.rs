//! From an OCI runtime spec to what the container's init needs: checked,
//! resolved and plain (the init process cannot report errors well, so
//! everything that can be refused is refused here).

use std::path::{Component, Path, PathBuf};

use oci_spec::runtime::Spec;
use serde::{Deserialize, Serialize};

/// Errors in a spec.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    /// Not a runtime spec.
    #[error("invalid OCI spec: {0}")]
    Parse(String),
    /// The spec has no process.
    #[error("the spec has no process")]
    NoProcess,
    /// No arguments.
    #[error("process.args is empty")]
    NoArgs,
    /// A path that must be absolute and plain is not.
    #[error("{what} {path:?} must be absolute and must not contain '..'")]
    Path {
        /// Which field.
        what: &'static str,
        /// The value.
        path: PathBuf,
    },
    /// An rlimit this agent does not know.
    #[error("unknown rlimit {0}")]
    Rlimit(String),
    /// An environment entry without '='.
    #[error("environment entry {0:?} is not KEY=value")]
    Env(String),
    /// A seccomp profile this agent cannot apply.
    #[error("linux.seccomp: {0}")]
    Seccomp(#[from] super::seccomp::SeccompError),
    /// A sysctl that is not the container's (or not a sysctl name).
    #[error("linux.sysctl {0:?}: {1}")]
    Sysctl(String, &'static str),
    /// oomScoreAdj out of the kernel's range.
    #[error("process.oomScoreAdj {0} is not within -1000..=1000")]
    OomScoreAdj(i32),
}

/// A mount inside the container.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MountSpec {
    /// Where, inside the rootfs.
    pub destination: PathBuf,
    /// File system type (`tmpfs`, `proc`, `bind`, ...).
    pub fstype: String,
    /// Source.
    pub source: String,
    /// Options as in the spec (`nosuid`, `ro`, `size=65536k`, ...).
    pub options: Vec<String>,
}

/// Resource limits from `linux.resources`, applied to the container's cgroup.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resources {
    /// `memory.max`, bytes.
    pub memory_max: Option<i64>,
    /// `pids.max`.
    pub pids_max: Option<i64>,
    /// `cpu.max` quota and period, µs.
    pub cpu_quota: Option<i64>,
    /// CPU period, µs.
    pub cpu_period: Option<u64>,
    /// CPU shares (cgroup v1 units, converted to `cpu.weight`).
    pub cpu_shares: Option<u64>,
}

/// Everything the container's init does, resolved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LaunchConfig {
    /// The root file system (a directory in the guest).
    pub rootfs: PathBuf,
    /// Mount the root read-only.
    pub readonly_root: bool,
    /// Program and arguments.
    pub args: Vec<String>,
    /// Environment.
    pub env: Vec<String>,
    /// Working directory inside the container.
    pub cwd: PathBuf,
    /// User.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Supplementary groups.
    pub additional_gids: Vec<u32>,
    /// `(resource, soft, hard)`.
    pub rlimits: Vec<(u32, u64, u64)>,
    /// `PR_SET_NO_NEW_PRIVS`.
    pub no_new_privileges: bool,
    /// The UTS hostname.
    pub hostname: Option<String>,
    /// Mounts after the root, in order.
    pub mounts: Vec<MountSpec>,
    /// A terminal was asked for.
    pub terminal: bool,
    /// Limits for the container's cgroup.
    pub resources: Resources,
    /// The cgroup the init joins before anything else (set by the agent).
    pub cgroup: Option<PathBuf>,
    /// Capabilities (None: the spec names none, and they are left as they are).
    #[serde(default)]
    pub capabilities: Option<super::caps::Capabilities>,
    /// `linux.readonlyPaths`, inside the root.
    #[serde(default)]
    pub readonly_paths: Vec<PathBuf>,
    /// `linux.maskedPaths`, inside the root.
    #[serde(default)]
    pub masked_paths: Vec<PathBuf>,
    /// `linux.seccomp`, compiled (None: no filter).
    #[serde(default)]
    pub seccomp: Option<Vec<super::seccomp::Insn>>,
    /// `linux.sysctl`: the path below `/proc/sys`, and the value.
    #[serde(default)]
    pub sysctls: Vec<(PathBuf, String)>,
    /// `process.oomScoreAdj`.
    #[serde(default)]
    pub oom_score_adj: Option<i32>,
    /// The pod's namespaces the spec joins (entries of `linux.namespaces`
    /// with a path), instead of new ones.
    #[serde(default)]
    pub share: Share,
    /// Where the pod's namespaces are (`/proc/PID/ns`; set by the agent).
    #[serde(default)]
    pub pod_ns: Option<PathBuf>,
}

/// Which of the pod's namespaces a container joins.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Share {
    /// The pod's IPC namespace (the CRI always asks).
    pub ipc: bool,
    /// The pod's PID namespace (`shareProcessNamespace`).
    pub pid: bool,
}

/// Whether `p` is absolute and has no `..`.
pub fn plain_absolute(p: &Path) -> bool {
    p.is_absolute() && p.components().all(|c| !matches!(c, Component::ParentDir))
}

/// The path below `/proc/sys` of a sysctl the container may set: those of
/// the namespaces it has of its own (IPC, UTS) and of the pod's network
/// (the VM's: a pod's containers share it, and the pod's sysctls are the
/// same in each of its containers' specs). runc's list.
fn sysctl_path(name: &str) -> Result<PathBuf, SpecError> {
    let bad = |why| SpecError::Sysctl(name.into(), why);
    // `net/ipv4/conf/eth0.1/forwarding` names a key by path, dots kept.
    let path = if name.contains('/') {
        name.to_string()
    } else {
        name.replace('.', "/")
    };
    let ok_chars = path
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"_-./".contains(&b));
    if !ok_chars
        || path
            .split('/')
            .any(|p| p.is_empty() || p == "." || p == "..")
    {
        return Err(bad("not a sysctl name"));
    }
    const IPC: [&str; 8] = [
        "kernel/msgmax",
        "kernel/msgmnb",
        "kernel/msgmni",
        "kernel/sem",
        "kernel/shmall",
        "kernel/shmmax",
        "kernel/shmmni",
        "kernel/shm_rmid_forced",
    ];
    let namespaced = IPC.contains(&path.as_str())
        || path.starts_with("fs/mqueue/")
        || path.starts_with("net/")
        || path == "kernel/hostname"
        || path == "kernel/domainname";
    if !namespaced {
        return Err(bad(
            "not in a namespace of the container's own; refused as runc refuses it",
        ));
    }
    Ok(path.into())
}

fn seccomp_of(s: &oci_spec::runtime::LinuxSeccomp) -> Result<Vec<super::seccomp::Insn>, SpecError> {
    use super::seccomp::{Rule, action, compile, cond};
    let name = |v: serde_json::Result<serde_json::Value>| {
        v.ok()
            .and_then(|v| v.as_str().map(String::from))
            .unwrap_or_default()
    };
    let default = action(
        &name(serde_json::to_value(s.default_action())),
        s.default_errno_ret(),
    )?;
    let rules = s
        .syscalls()
        .iter()
        .flatten()
        .map(|sc| {
            let conds = sc
                .args()
                .iter()
                .flatten()
                .map(|a| {
                    cond(
                        a.index(),
                        &name(serde_json::to_value(a.op())),
                        a.value(),
                        a.value_two().unwrap_or(0),
                    )
                })
                .collect::<Result<Vec<_>, _>>()?;
            Ok(Rule {
                names: sc.names().clone(),
                action: action(&name(serde_json::to_value(sc.action())), sc.errno_ret())?,
                conds,
            })
        })
        .collect::<Result<Vec<_>, super::seccomp::SeccompError>>()?;
    Ok(compile(default, &rules)?)
}

fn rlimit(name: &str) -> Result<u32, SpecError> {
    Ok(match name {
        "RLIMIT_CPU" => libc::RLIMIT_CPU,
        "RLIMIT_FSIZE" => libc::RLIMIT_FSIZE,
        "RLIMIT_DATA" => libc::RLIMIT_DATA,
        "RLIMIT_STACK" => libc::RLIMIT_STACK,
        "RLIMIT_CORE" => libc::RLIMIT_CORE,
        "RLIMIT_RSS" => libc::RLIMIT_RSS,
        "RLIMIT_NPROC" => libc::RLIMIT_NPROC,
        "RLIMIT_NOFILE" => libc::RLIMIT_NOFILE,
        "RLIMIT_MEMLOCK" => libc::RLIMIT_MEMLOCK,
        "RLIMIT_AS" => libc::RLIMIT_AS,
        "RLIMIT_LOCKS" => libc::RLIMIT_LOCKS,
        "RLIMIT_SIGPENDING" => libc::RLIMIT_SIGPENDING,
        "RLIMIT_MSGQUEUE" => libc::RLIMIT_MSGQUEUE,
        "RLIMIT_NICE" => libc::RLIMIT_NICE,
        "RLIMIT_RTPRIO" => libc::RLIMIT_RTPRIO,
        "RLIMIT_RTTIME" => libc::RLIMIT_RTTIME,
        other => return Err(SpecError::Rlimit(other.into())),
    })
}

/// Reads `config.json` bytes into a [`LaunchConfig`] for a container whose
/// root file system is `rootfs` (ignoring `root.path`: the agent decides where
/// the image is).
pub fn launch_config(json: &[u8], rootfs: &Path) -> Result<LaunchConfig, SpecError> {
    let value: serde_json::Value =
        serde_json::from_slice(json).map_err(|e| SpecError::Parse(e.to_string()))?;
    if !value.is_object() {
        return Err(SpecError::Parse("config.json must be a JSON object".into()));
    }
    let spec: Spec = serde_json::from_value(value).map_err(|e| SpecError::Parse(e.to_string()))?;
    let process = spec.process().as_ref().ok_or(SpecError::NoProcess)?;
    let args = process.args().clone().unwrap_or_default();
    if args.is_empty() || args[0].is_empty() {
        return Err(SpecError::NoArgs);
    }
    let env = process.env().clone().unwrap_or_default();
    if let Some(bad) = env.iter().find(|e| !e.contains('=')) {
        return Err(SpecError::Env(bad.clone()));
    }
    let cwd = process.cwd().clone();
    if !plain_absolute(&cwd) {
        return Err(SpecError::Path {
            what: "process.cwd",
            path: cwd,
        });
    }
    if !plain_absolute(rootfs) {
        return Err(SpecError::Path {
            what: "rootfs",
            path: rootfs.into(),
        });
    }
    let user = process.user();
    let rlimits = process
        .rlimits()
        .clone()
        .unwrap_or_default()
        .iter()
        .map(|r| {
            let name = serde_json::to_value(r.typ())
                .ok()
                .and_then(|v| v.as_str().map(String::from))
                .unwrap_or_default();
            Ok((rlimit(&name)?, r.soft(), r.hard()))
        })
        .collect::<Result<Vec<_>, SpecError>>()?;
    let linux = spec.linux().as_ref();
    let paths = |what: &'static str, list: Option<&Vec<String>>| {
        list.into_iter()
            .flatten()
            .map(|p| {
                let path = PathBuf::from(p);
                if plain_absolute(&path) {
                    Ok(path)
                } else {
                    Err(SpecError::Path { what, path })
                }
            })
            .collect::<Result<Vec<_>, SpecError>>()
    };
    let readonly_paths = paths(
        "readonly path",
        linux.and_then(|l| l.readonly_paths().as_ref()),
    )?;
    let masked_paths = paths("masked path", linux.and_then(|l| l.masked_paths().as_ref()))?;
    let seccomp = linux
        .and_then(|l| l.seccomp().as_ref())
        .map(seccomp_of)
        .transpose()?;
    let mut sysctls = linux
        .and_then(|l| l.sysctl().as_ref())
        .into_iter()
        .flatten()
        .map(|(k, v)| Ok((sysctl_path(k)?, v.clone())))
        .collect::<Result<Vec<_>, SpecError>>()?;
    sysctls.sort();
    let oom_score_adj = process.oom_score_adj();
    let mut share = Share::default();
    for ns in linux
        .and_then(|l| l.namespaces().as_ref())
        .into_iter()
        .flatten()
    {
        if ns.path().is_some() {
            match ns.typ() {
                oci_spec::runtime::LinuxNamespaceType::Ipc => share.ipc = true,
                oci_spec::runtime::LinuxNamespaceType::Pid => share.pid = true,
                _ => {}
            }
        }
    }
    if let Some(adj) = oom_score_adj.filter(|a| !(-1000..=1000).contains(a)) {
        return Err(SpecError::OomScoreAdj(adj));
    }
    let mounts = spec
        .mounts()
        .clone()
        .unwrap_or_default()
        .iter()
        .map(|m| {
            let destination = m.destination().clone();
            if !plain_absolute(&destination) || destination == Path::new("/") {
                return Err(SpecError::Path {
                    what: "mount destination",
                    path: destination,
                });
            }
            Ok(MountSpec {
                destination,
                fstype: m.typ().clone().unwrap_or_else(|| "bind".into()),
                source: m
                    .source()
                    .as_ref()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_default(),
                options: m.options().clone().unwrap_or_default(),
            })
        })
        .collect::<Result<Vec<_>, SpecError>>()?;
    Ok(LaunchConfig {
        rootfs: rootfs.into(),
        readonly_root: spec
            .root()
            .as_ref()
            .and_then(|r| r.readonly())
            .unwrap_or(false),
        args,
        env,
        cwd,
        uid: user.uid(),
        gid: user.gid(),
        additional_gids: user.additional_gids().clone().unwrap_or_default(),
        rlimits,
        no_new_privileges: process.no_new_privileges().unwrap_or(false),
        hostname: spec.hostname().clone(),
        mounts,
        terminal: process.terminal().unwrap_or(false),
        resources: spec
            .linux()
            .as_ref()
            .and_then(|l| l.resources().as_ref())
            .map(resources_of)
            .unwrap_or_default(),
        cgroup: None,
        capabilities: process.capabilities().as_ref().map(|c| {
            let set = |s: &Option<oci_spec::runtime::Capabilities>| {
                let names: Vec<String> = s
                    .iter()
                    .flatten()
                    .filter_map(|cap| serde_json::to_value(cap).ok()?.as_str().map(String::from))
                    .collect();
                super::caps::mask(names.iter().map(String::as_str))
            };
            super::caps::Capabilities {
                bounding: set(c.bounding()),
                effective: set(c.effective()),
                inheritable: set(c.inheritable()),
                permitted: set(c.permitted()),
                ambient: set(c.ambient()),
            }
        }),
        readonly_paths,
        masked_paths,
        seccomp,
        sysctls,
        oom_score_adj,
        share,
        pod_ns: None,
    })
}

fn resources_of(r: &oci_spec::runtime::LinuxResources) -> Resources {
    Resources {
        memory_max: r.memory().as_ref().and_then(|m| m.limit()),
        pids_max: r.pids().as_ref().map(|p| p.limit()),
        cpu_quota: r.cpu().as_ref().and_then(|c| c.quota()),
        cpu_period: r.cpu().as_ref().and_then(|c| c.period()),
        cpu_shares: r.cpu().as_ref().and_then(|c| c.shares()),
    }
}

/// An OCI `linux.resources` object (JSON), as for `ctr task update`.
pub fn parse_resources(json: &[u8]) -> Result<Resources, SpecError> {
    let r: oci_spec::runtime::LinuxResources =
        serde_json::from_slice(json).map_err(|e| SpecError::Parse(e.to_string()))?;
    Ok(resources_of(&r))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resources_of_an_update() {
        let r = parse_resources(
            br#"{"memory": {"limit": 1048576}, "cpu": {"quota": 20000, "period": 100000}, "pids": {"limit": 7}}"#,
        )
        .unwrap();
        assert_eq!(r.memory_max, Some(1 << 20));
        assert_eq!((r.cpu_quota, r.cpu_period), (Some(20_000), Some(100_000)));
        assert_eq!(r.pids_max, Some(7));
        assert_eq!(parse_resources(b"{}").unwrap(), Resources::default());
        assert!(parse_resources(b"[1]").is_err());
    }

    pub(crate) fn spec_json(args: &[&str], extra: serde_json::Value) -> Vec<u8> {
        let mut v = serde_json::json!({
            "ociVersion": "1.0.2",
            "root": {"path": "rootfs", "readonly": false},
            "process": {
                "args": args, "cwd": "/", "env": ["PATH=/bin"],
                "user": {"uid": 0, "gid": 0},
            },
            "hostname": "box",
            "mounts": [
                {"destination": "/proc", "type": "proc", "source": "proc"},
                {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "size=1m"]}
            ],
        });
        if let (Some(obj), Some(extra)) = (v["process"].as_object_mut(), extra.as_object()) {
            for (k, val) in extra {
                obj.insert(k.clone(), val.clone());
            }
        }
        serde_json::to_vec(&v).unwrap()
    }

    #[test]
    fn a_spec_becomes_a_launch_config() {
        let json = spec_json(
            &["/bin/sh", "-c", "true"],
            serde_json::json!({
                "cwd": "/work", "user": {"uid": 1000, "gid": 100, "additionalGids": [5, 6]},
                "rlimits": [{"type": "RLIMIT_NOFILE", "soft": 64, "hard": 128}],
                "noNewPrivileges": true, "env": ["A=1", "PATH=/bin"],
            }),
        );
        let c = launch_config(&json, Path::new("/run/c/rootfs")).unwrap();
        assert_eq!(c.args, ["/bin/sh", "-c", "true"]);
        assert_eq!(c.cwd, Path::new("/work"));
        assert_eq!(
            (c.uid, c.gid, c.additional_gids.clone()),
            (1000, 100, vec![5, 6])
        );
        assert_eq!(c.rlimits, vec![(libc::RLIMIT_NOFILE, 64, 128)]);
        assert!(c.no_new_privileges);
        assert_eq!(c.hostname.as_deref(), Some("box"));
        assert_eq!(c.mounts.len(), 2);
        assert_eq!(c.mounts[1].options, ["nosuid", "size=1m"]);
    }

    #[test]
    fn bad_specs_are_refused() {
        let root = Path::new("/run/c/rootfs");
        assert!(matches!(
            launch_config(b"{", root),
            Err(SpecError::Parse(_))
        ));
        assert!(matches!(
            launch_config(b"[]", root),
            Err(SpecError::Parse(_))
        ));
        let no_args = spec_json(&[], serde_json::json!({}));
        assert!(matches!(
            launch_config(&no_args, root),
            Err(SpecError::NoArgs)
        ));
        let escape = spec_json(&["/bin/sh"], serde_json::json!({"cwd": "/../etc"}));
        assert!(matches!(
            launch_config(&escape, root),
            Err(SpecError::Path { .. })
        ));
        let mut v: serde_json::Value =
            serde_json::from_slice(&spec_json(&["/bin/sh"], serde_json::json!({}))).unwrap();
        v["mounts"][0]["destination"] = "/proc/../../etc".into();
        let json = serde_json::to_vec(&v).unwrap();
        assert!(matches!(
            launch_config(&json, root),
            Err(SpecError::Path {
                what: "mount destination",
                ..
            })
        ));
        let env = spec_json(&["/bin/sh"], serde_json::json!({"env": ["NOEQUALS"]}));
        assert!(matches!(launch_config(&env, root), Err(SpecError::Env(_))));
        assert!(matches!(
            launch_config(
                &spec_json(&["/bin/sh"], serde_json::json!({})),
                Path::new("rel")
            ),
            Err(SpecError::Path { what: "rootfs", .. })
        ));
    }
}
