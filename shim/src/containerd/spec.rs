//! What the shim reads from a bundle: the pod grouping, the image's key, and
//! the spec the guest gets.

use serde_json::Value;
use sha2::{Digest, Sha256};

use super::volumes::{Placed, VolumeError};

/// Test hook (with `test_hooks` in the shim's config): this many ms after
/// the container's create, a vCPU thread of its VM makes a system call its
/// seccomp list does not allow.
pub const TEST_SECCOMP_TRIP_MS: &str = "zygote.dev/test-seccomp-trip-ms";

/// The test hook's delay, if the spec asks for it.
pub fn test_seccomp_trip(spec: &Value) -> Option<u64> {
    annotation(spec, TEST_SECCOMP_TRIP_MS)?.parse().ok()
}

/// CRI annotation: the pod's sandbox id.
pub const SANDBOX_ID: &str = "io.kubernetes.cri.sandbox-id";
/// CRI annotation: `sandbox` or `container`.
pub const CONTAINER_TYPE: &str = "io.kubernetes.cri.container-type";

/// A bundle's `config.json` that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("invalid OCI spec: {0}")]
pub struct SpecError(pub String);

/// Parses `config.json`.
pub fn parse(json: &[u8]) -> Result<Value, SpecError> {
    let v: Value = serde_json::from_slice(json).map_err(|e| SpecError(e.to_string()))?;
    if !v.is_object() {
        return Err(SpecError("config.json must be a JSON object".into()));
    }
    Ok(v)
}

fn annotation<'a>(spec: &'a Value, key: &str) -> Option<&'a str> {
    spec["annotations"][key].as_str()
}

/// The pod's pause container (no process of its own: the VM is the pod).
pub fn is_sandbox(spec: &Value) -> bool {
    annotation(spec, CONTAINER_TYPE) == Some("sandbox")
}

/// Whether the spec is a CRI container's (a pod's pause or application
/// container), whose network is the pod's.
pub fn is_cri(spec: &Value) -> bool {
    annotation(spec, CONTAINER_TYPE).is_some()
}

/// The network namespace the spec joins: `linux.namespaces`' `network`
/// entry with a path (none: a new, empty one, or the host's if absent).
pub fn network_namespace(spec: &Value) -> Option<std::path::PathBuf> {
    spec["linux"]["namespaces"]
        .as_array()?
        .iter()
        .find(|ns| ns["type"] == "network")?["path"]
        .as_str()
        .filter(|p| !p.is_empty())
        .map(std::path::PathBuf::from)
}

/// The hostname of the pod VM that container `id` makes: the spec's, else
/// the id made a valid host name (containerd's ids may hold `_` and `.`,
/// and be longer than a label; runc would leave the host's name in place,
/// and a VM has none to leave).
pub fn hostname(spec: &Value, id: &str) -> String {
    if let Some(h) = spec["hostname"].as_str().filter(|h| !h.is_empty()) {
        return h.to_string();
    }
    let label: String = id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .take(63)
        .collect();
    let label = label.trim_matches('-');
    if label.is_empty() {
        "zygote".into()
    } else {
        label.into()
    }
}

/// CRI annotation: the pod's CPU quota (µs per period), the sum of its
/// containers' limits as kubelet passes it in the sandbox's config.
pub const SANDBOX_CPU_QUOTA: &str = "io.kubernetes.cri.sandbox-cpu-quota";
/// CRI annotation: the pod's CPU period, µs.
pub const SANDBOX_CPU_PERIOD: &str = "io.kubernetes.cri.sandbox-cpu-period";

/// CRI annotation: the pod's memory limit, bytes (the sum of its
/// containers' limits; absent or 0 when one has none).
pub const SANDBOX_MEMORY: &str = "io.kubernetes.cri.sandbox-memory";

/// A number in a spec: JSON's, or a string's (annotations are strings).
fn number(v: &Value) -> Option<i64> {
    v.as_i64()
        .or_else(|| v.as_str().and_then(|s| s.parse::<i64>().ok()))
}

/// The memory a spec asks for, bytes: a pod's (the sandbox's annotation), or
/// a container's (`linux.resources.memory.limit`); None without a limit.
pub fn memory(spec: &Value) -> Option<u64> {
    let asked = if is_sandbox(spec) {
        number(&spec["annotations"][SANDBOX_MEMORY])
    } else {
        number(&spec["linux"]["resources"]["memory"]["limit"])
    };
    asked.filter(|m| *m > 0).map(|m| m as u64)
}

/// The CPUs a spec asks for: a pod's (the sandbox's CPU annotations), or a
/// container's (`linux.resources.cpu` quota over period), rounded up; None
/// without a limit.
pub fn cpus(spec: &Value) -> Option<u32> {
    let (quota, period) = if is_sandbox(spec) {
        (
            number(&spec["annotations"][SANDBOX_CPU_QUOTA]),
            number(&spec["annotations"][SANDBOX_CPU_PERIOD]),
        )
    } else {
        let cpu = &spec["linux"]["resources"]["cpu"];
        (number(&cpu["quota"]), number(&cpu["period"]))
    };
    let (quota, period) = (
        quota.filter(|q| *q > 0)?,
        period.filter(|p| *p > 0).unwrap_or(100_000),
    );
    u32::try_from((quota + period - 1) / period).ok()
}

/// Which shim serves container `id`: its pod's (CRI), or its own.
pub fn grouping(spec: &Value, id: &str) -> String {
    match annotation(spec, SANDBOX_ID) {
        Some(sandbox) if !sandbox.is_empty() => sandbox.to_string(),
        _ => id.to_string(),
    }
}

/// A cache key naming an image's content from the rootfs mounts containerd
/// passed: the mount type and the read-only layers (an overlay's `lowerdir`,
/// a bind mount's source), not the container's own `upperdir`/`workdir`.
/// Each layer directory that exists is also named by its identity (device,
/// inode, change time): snapshot directories are numbered, and a containerd
/// whose state was wiped numbers new ones from 1 again — the same paths, other
/// content, which must not find the old image.
pub fn image_key(mounts: &[(String, String, Vec<String>)]) -> Option<String> {
    let mut h = Sha256::new();
    let mut any = false;
    let layer = |h: &mut Sha256, path: &str| {
        h.update(path.as_bytes());
        if let Ok(m) = std::fs::metadata(path) {
            use std::os::unix::fs::MetadataExt;
            for n in [m.dev(), m.ino(), m.ctime() as u64, m.ctime_nsec() as u64] {
                h.update(n.to_le_bytes());
            }
        }
        h.update([0]);
    };
    for (kind, source, options) in mounts {
        h.update(kind.as_bytes());
        h.update([0]);
        match kind.as_str() {
            "overlay" => {
                let lower = options.iter().find_map(|o| o.strip_prefix("lowerdir="))?;
                for dir in lower.split(':') {
                    layer(&mut h, dir);
                }
            }
            _ => layer(&mut h, source),
        }
        h.update([0]);
        any = true;
    }
    if !any {
        return None;
    }
    let hex: String = h.finalize()[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    Some(format!("layers-{hex}"))
}

/// The spec the guest's agent gets, with the volumes its bind mounts name
/// (see [`super::volumes`]) and notes on what was left out. The VM gives
/// what the host would have: cgroup mounts become cgroup2 (the guest's
/// hierarchy); host directories it cannot share and file systems the guest
/// kernel lacks (`mqueue`) are dropped, each noted for the log.
pub fn for_guest(spec: &Value) -> Result<(Value, Placed), VolumeError> {
    let mut out = spec.clone();
    let mut placed = super::volumes::place(&mut out)?;
    if let Some(mounts) = out["mounts"].as_array_mut() {
        mounts.retain_mut(|m| {
            let kind = m["type"].as_str().unwrap_or("bind").to_string();
            let destination = m["destination"].as_str().unwrap_or("").to_string();
            match kind.as_str() {
                "cgroup" => {
                    m["type"] = Value::from("cgroup2");
                    m["source"] = Value::from("cgroup2");
                    true
                }
                "mqueue" => {
                    placed.notes.push(format!(
                        "mount {destination}: the guest kernel has no POSIX message queues; left out"
                    ));
                    false
                }
                _ => true,
            }
        });
    }
    Ok((out, placed))
}

#[cfg(test)]
mod network_tests {
    use super::*;

    #[test]
    fn the_network_namespace_is_the_one_with_a_path() {
        let spec = serde_json::json!({"linux": {"namespaces": [
            {"type": "pid"},
            {"type": "network", "path": "/var/run/netns/cni-1"}
        ]}});
        assert_eq!(
            network_namespace(&spec),
            Some(std::path::PathBuf::from("/var/run/netns/cni-1"))
        );
        let fresh = serde_json::json!({"linux": {"namespaces": [{"type": "network"}]}});
        assert_eq!(network_namespace(&fresh), None);
        assert_eq!(network_namespace(&serde_json::json!({})), None);
        assert!(!is_cri(&spec));
        let pause = serde_json::json!({"annotations": {CONTAINER_TYPE: "sandbox"}});
        assert!(is_cri(&pause));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hostname_from_the_spec_or_a_valid_one_from_the_id() {
        let with = serde_json::json!({"hostname": "web-1"});
        assert_eq!(hostname(&with, "x"), "web-1");
        let without = serde_json::json!({});
        assert_eq!(
            hostname(&without, "TestContainerUser_x"),
            "testcontaineruser-x"
        );
        assert_eq!(hostname(&without, "__"), "zygote");
        assert_eq!(hostname(&without, &"a".repeat(100)).len(), 63);
    }

    #[test]
    fn memory_from_the_pod_or_the_container() {
        let pod = serde_json::json!({"annotations": {CONTAINER_TYPE: "sandbox",
            SANDBOX_MEMORY: "134217728"}});
        assert_eq!(memory(&pod), Some(128 << 20));
        let unlimited = serde_json::json!({"annotations": {CONTAINER_TYPE: "sandbox",
            SANDBOX_MEMORY: "0"}});
        assert_eq!(memory(&unlimited), None);
        let ctr = serde_json::json!({"linux": {"resources": {"memory": {"limit": 16777216}}}});
        assert_eq!(memory(&ctr), Some(16 << 20));
        assert_eq!(
            memory(&serde_json::json!({"linux": {"resources": {"memory": {"limit": -1}}}})),
            None
        );
    }

    #[test]
    fn cpus_from_the_pod_or_the_container() {
        let pod = serde_json::json!({"annotations": {CONTAINER_TYPE: "sandbox",
            SANDBOX_CPU_QUOTA: "150000", SANDBOX_CPU_PERIOD: "100000"}});
        assert_eq!(cpus(&pod), Some(2));
        let unlimited = serde_json::json!({"annotations": {CONTAINER_TYPE: "sandbox",
            SANDBOX_CPU_QUOTA: "0", SANDBOX_CPU_PERIOD: "100000"}});
        assert_eq!(cpus(&unlimited), None);
        let ctr = serde_json::json!({"linux": {"resources": {"cpu": {"quota": 50000, "period": 100000}}}});
        assert_eq!(cpus(&ctr), Some(1));
        assert_eq!(cpus(&serde_json::json!({})), None);
    }

    #[test]
    fn grouping_follows_the_cri_annotations() {
        let plain = parse(br#"{"process": {}}"#).unwrap();
        assert_eq!(grouping(&plain, "c1"), "c1");
        assert!(!is_sandbox(&plain));
        let pause =
            serde_json::json!({"annotations": {SANDBOX_ID: "pod1", CONTAINER_TYPE: "sandbox"}});
        assert_eq!(grouping(&pause, "pod1"), "pod1");
        assert!(is_sandbox(&pause));
        let app =
            serde_json::json!({"annotations": {SANDBOX_ID: "pod1", CONTAINER_TYPE: "container"}});
        assert_eq!(grouping(&app, "c2"), "pod1");
        assert!(parse(b"[]").is_err());
        assert!(parse(b"{").is_err());
    }

    #[test]
    fn the_image_key_ignores_the_container_layer() {
        let m = |upper: &str, lower: &str| {
            vec![(
                "overlay".to_string(),
                "overlay".to_string(),
                vec![
                    "index=off".to_string(),
                    format!("workdir={upper}/work"),
                    format!("upperdir={upper}/fs"),
                    format!("lowerdir={lower}"),
                ],
            )]
        };
        let a = image_key(&m("/s/10", "/s/3/fs:/s/2/fs")).unwrap();
        assert_eq!(a, image_key(&m("/s/11", "/s/3/fs:/s/2/fs")).unwrap());
        assert_ne!(a, image_key(&m("/s/11", "/s/4/fs:/s/2/fs")).unwrap());
        assert!(a.starts_with("layers-") && a.len() == 7 + 32);
        assert_eq!(image_key(&[]), None);
        // A layer directory made again (containerd's state wiped, its
        // snapshots numbered from 1 again) is another image.
        let dir = std::env::temp_dir().join(format!("zygote-key-{}", std::process::id()));
        let layer = dir.join("1/fs");
        std::fs::create_dir_all(&layer).unwrap();
        let lower = layer.to_string_lossy().into_owned();
        let before = image_key(&m("/s/10", &lower)).unwrap();
        assert_eq!(before, image_key(&m("/s/11", &lower)).unwrap());
        std::fs::remove_dir_all(&dir).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::create_dir_all(&layer).unwrap();
        assert_ne!(before, image_key(&m("/s/10", &lower)).unwrap());
        std::fs::remove_dir_all(&dir).unwrap();
        let no_lower = vec![("overlay".to_string(), String::new(), vec![])];
        assert_eq!(image_key(&no_lower), None);
    }

    #[test]
    fn the_guest_spec_leaves_out_what_the_vm_cannot_have() {
        let spec = serde_json::json!({"mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup", "options": ["ro"]},
            {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue"},
            {"destination": "/etc/hosts", "type": "bind", "source": "/nonexistent/hosts", "options": ["rbind", "ro"]},
            {"destination": "/etc/resolv.conf", "source": "/nonexistent/x", "options": ["bind"]}
        ]});
        let (g, placed) = for_guest(&spec).unwrap();
        let notes = placed.notes;
        let kinds: Vec<&str> = g["mounts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["type"].as_str().unwrap())
            .collect();
        assert_eq!(kinds, ["proc", "cgroup2"]);
        assert_eq!(notes.len(), 3, "{notes:?}");
    }
}
