//! The shim's configuration: a TOML file named by the runtime options'
//! `ConfigPath` (containerd's `[...runtimes.zygote.options]`), else
//! `$ZYGOTE_CONFIG`, else `/etc/zygote/config.toml` if it exists; every key is
//! optional (defaults below).
//!
//! ```toml
//! kernel = "/var/lib/zygote/kernel/vmlinux"      # guest kernel
//! initramfs = "/var/lib/zygote/image/initramfs.cpio"
//! templates = "/var/lib/zygote/templates"        # template store
//! images = "/var/lib/zygote/images"              # erofs images by layer chain
//! vcpus = 1                                      # a pod's CPUs when it asks for none
//! max_vcpus = 0                                  # most CPUs a pod may ask for (0: vcpus)
//! memory_mib = 128                               # a pod's memory when it asks for none
//! max_memory_mib = 0                             # most memory a pod may ask for (0: memory_mib)
//! policy = ["go=restart"]                        # reconcile policy, CLASS=ACTION
//! agent_timeout_s = 120                          # fork → agent ready, and each agent call
//! upper_size_mib = 0                             # writable layer (0: half the guest RAM)
//! settle_ms = 1000                               # idle time before a template snapshot
//! disk_slots = 3                                 # images other than the pod's first, at once
//! timings_log = "/run/zygote/timings.jsonl"      # per-container timings (benchmarks)
//! ```

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::paths;

/// Where the configuration is looked for when no path is given.
pub const DEFAULT_PATH: &str = "/etc/zygote/config.toml";

/// The shim's settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ShimConfig {
    /// Guest kernel.
    pub kernel: PathBuf,
    /// Guest initramfs (the agent).
    pub initramfs: PathBuf,
    /// Template store.
    pub templates: PathBuf,
    /// Image cache.
    pub images: PathBuf,
    /// vCPUs per pod VM.
    pub vcpus: u8,
    /// The most vCPUs a pod may ask for (0: `vcpus`, and pods are not sized).
    pub max_vcpus: u8,
    /// Memory of a pod that asks for none, MiB.
    pub memory_mib: u64,
    /// The most memory a pod may ask for, MiB: what templates boot with (0:
    /// `memory_mib`).
    pub max_memory_mib: u64,
    /// Reconcile policy rules (`CLASS=keep|restart|notify[:SIGNAL]`).
    pub policy: Vec<String>,
    /// Seconds to wait for a fork's agent, and for each agent call.
    pub agent_timeout_s: u64,
    /// Size of a container's writable layer, MiB (0: half the guest's RAM).
    pub upper_size_mib: u32,
    /// Idle time before a template's snapshot, ms.
    pub settle_ms: u64,
    /// Empty disk slots in each VM, for containers of other images (0-8).
    pub disk_slots: u8,
    /// Append one JSON line of timings per container start here.
    pub timings_log: Option<PathBuf>,
    /// Honour the test suite's hooks (annotations `zygote.dev/test-*`).
    /// Never on a node that runs pods.
    pub test_hooks: bool,
}

impl Default for ShimConfig {
    fn default() -> Self {
        ShimConfig {
            kernel: paths::kernel(),
            initramfs: paths::initramfs(),
            templates: paths::templates(),
            images: paths::images(),
            vcpus: 1,
            max_vcpus: 0,
            memory_mib: 128,
            max_memory_mib: 0,
            policy: Vec::new(),
            agent_timeout_s: 120,
            upper_size_mib: 0,
            settle_ms: 1000,
            disk_slots: 3,
            timings_log: None,
            test_hooks: false,
        }
    }
}

/// A configuration that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Unreadable.
    #[error("cannot read the zygote config {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// Not valid TOML or unknown keys.
    #[error("invalid zygote config {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
}

impl ShimConfig {
    /// Reads `path` if given; else `$ZYGOTE_CONFIG`; else [`DEFAULT_PATH`] if
    /// it exists; else the defaults.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        let chosen = path
            .map(Path::to_path_buf)
            .or_else(|| std::env::var_os("ZYGOTE_CONFIG").map(PathBuf::from))
            .or_else(|| {
                let p = PathBuf::from(DEFAULT_PATH);
                p.exists().then_some(p)
            });
        let Some(path) = chosen else {
            return Ok(ShimConfig::default());
        };
        let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Read {
            path: path.clone(),
            source,
        })?;
        let config: ShimConfig = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.clone(),
            message: e.message().to_string(),
        })?;
        for rule in &config.policy {
            crate::reconcile::parse_policy(rule).map_err(|message| ConfigError::Parse {
                path: path.clone(),
                message,
            })?;
        }
        if config.max_vcpus != 0 && (config.max_vcpus < config.vcpus || config.max_vcpus > 32) {
            return Err(ConfigError::Parse {
                path,
                message: "max_vcpus must be 0 or between vcpus and 32".into(),
            });
        }
        if config.max_memory_mib != 0 && config.max_memory_mib < config.memory_mib {
            return Err(ConfigError::Parse {
                path,
                message: "max_memory_mib must be 0 or at least memory_mib".into(),
            });
        }
        if config.disk_slots > 8 {
            return Err(ConfigError::Parse {
                path,
                message: "disk_slots must be at most 8".into(),
            });
        }
        if config.vcpus == 0 || config.memory_mib == 0 {
            return Err(ConfigError::Parse {
                path,
                message: "vcpus and memory_mib must be at least 1".into(),
            });
        }
        Ok(config)
    }
}

impl ShimConfig {
    /// Whether pods are sized: templates boot with `max_vcpus` and keep one
    /// online; each pod's VM brings online as many as it asks for.
    pub fn sized(&self) -> bool {
        self.max_vcpus > 1
    }

    /// The vCPUs a template boots with.
    pub fn template_vcpus(&self) -> u8 {
        if self.sized() {
            self.max_vcpus
        } else {
            self.vcpus
        }
    }

    /// The memory a template boots with, MiB.
    pub fn template_memory_mib(&self) -> u64 {
        self.max_memory_mib.max(self.memory_mib)
    }

    /// Whether pods are sized by memory: templates map `max_memory_mib` and
    /// boot using `memory_mib` of it; a pod's VM adds what its pod asks for.
    pub fn memory_sized(&self) -> bool {
        self.max_memory_mib > self.memory_mib
    }

    /// The cap on a pod's containers' memory when it asks for `asked` bytes
    /// (None: `memory_mib` if templates are bigger, else no cap beyond the
    /// VM's size). More than templates have is an error: the pod would not
    /// get what it was scheduled with.
    pub fn pod_memory(&self, asked: Option<u64>) -> Result<Option<u64>, String> {
        let most = self.template_memory_mib() << 20;
        match asked {
            Some(bytes) if bytes > most => Err(format!(
                "the pod asks for {} MiB of memory; this node's VMs have at most {} MiB \
                 (max_memory_mib in the zygote config)",
                bytes.div_ceil(1 << 20),
                self.template_memory_mib()
            )),
            Some(bytes) => Ok(Some(bytes)),
            None if most > self.memory_mib << 20 => Ok(Some(self.memory_mib << 20)),
            None => Ok(None),
        }
    }

    /// The VMs' shape as template names carry it: `2c128m`, or sized
    /// `upto2c128of256m` (up to 2 CPUs, booting with 128 MiB of 256).
    pub fn vm_shape(&self) -> String {
        let memory = if self.memory_sized() {
            format!("{}of{}m", self.memory_mib, self.max_memory_mib)
        } else {
            format!("{}m", self.memory_mib)
        };
        if self.sized() {
            format!("upto{}c{memory}", self.max_vcpus)
        } else {
            format!("{}c{memory}", self.vcpus)
        }
    }

    /// The CPUs a pod gets when it asks for `asked` (None: the default),
    /// within what a template has.
    pub fn pod_cpus(&self, asked: Option<u32>) -> u8 {
        let asked = asked.unwrap_or(u32::from(self.vcpus));
        asked.clamp(1, u32::from(self.template_vcpus())) as u8
    }
}

/// The `ConfigPath` of containerd's runtime options (`runtimeoptions.v1.Options`,
/// which the CRI plugin sends: field 1 `type_url`, field 2 `config_path`).
pub fn config_path_from_options(type_url: &str, value: &[u8]) -> Option<PathBuf> {
    if !type_url.ends_with("runtimeoptions.v1.Options") {
        return None;
    }
    let mut at = 0;
    while at < value.len() {
        let (key, n) = varint(&value[at..])?;
        at += n;
        let (field, wire) = (key >> 3, key & 7);
        match wire {
            0 => at += varint(&value[at..])?.1,
            2 => {
                let (len, n) = varint(&value[at..])?;
                at += n;
                let end = at.checked_add(usize::try_from(len).ok()?)?;
                let bytes = value.get(at..end)?;
                if field == 2 {
                    let path = String::from_utf8(bytes.to_vec()).ok()?;
                    return (!path.is_empty()).then(|| path.into());
                }
                at = end;
            }
            _ => return None,
        }
    }
    None
}

fn varint(b: &[u8]) -> Option<(u64, usize)> {
    let mut v = 0u64;
    for (i, byte) in b.iter().enumerate().take(10) {
        v |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Some((v, i + 1));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pod_gets_the_memory_it_asks_for_up_to_the_templates() {
        let mib = |m: u64| m << 20;
        let plain = ShimConfig::default();
        assert_eq!(plain.template_memory_mib(), 128);
        assert_eq!(plain.pod_memory(None), Ok(None));
        assert_eq!(plain.pod_memory(Some(mib(64))), Ok(Some(mib(64))));
        let sized = ShimConfig {
            max_memory_mib: 512,
            ..ShimConfig::default()
        };
        assert_eq!(sized.template_memory_mib(), 512);
        assert_eq!(plain.vm_shape(), "1c128m");
        assert_eq!(sized.vm_shape(), "1c128of512m");
        let both = ShimConfig {
            max_vcpus: 2,
            ..sized.clone()
        };
        assert_eq!(both.vm_shape(), "upto2c128of512m");
        assert_eq!(sized.pod_memory(None), Ok(Some(mib(128))));
        assert_eq!(sized.pod_memory(Some(mib(300))), Ok(Some(mib(300))));
        assert_eq!(sized.pod_memory(Some(mib(512))), Ok(Some(mib(512))));
        let e = sized.pod_memory(Some(mib(512) + 1)).unwrap_err();
        assert!(
            e.contains("513 MiB") && e.contains("at most 512 MiB"),
            "{e}"
        );
    }

    #[test]
    fn a_file_overrides_defaults_and_bad_files_are_refused() {
        let d = std::env::temp_dir().join(format!("zygote-shimcfg-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        let p = d.join("config.toml");
        std::fs::write(&p, "vcpus = 2\nmemory_mib = 256\npolicy = [\"go=keep\"]\n").unwrap();
        let c = ShimConfig::load(Some(&p)).unwrap();
        assert_eq!((c.vcpus, c.memory_mib), (2, 256));
        assert_eq!(c.kernel, ShimConfig::default().kernel);
        std::fs::write(&p, "vcpu = 2\n").unwrap();
        let e = ShimConfig::load(Some(&p)).unwrap_err().to_string();
        assert!(e.contains("unknown field"), "{e}");
        std::fs::write(&p, "policy = [\"go=explode\"]\n").unwrap();
        let e = ShimConfig::load(Some(&p)).unwrap_err().to_string();
        assert!(e.contains("unknown action"), "{e}");
        std::fs::write(&p, "memory_mib = 0\n").unwrap();
        assert!(ShimConfig::load(Some(&p)).is_err());
        std::fs::write(&p, "memory_mib = 256\nmax_memory_mib = 128\n").unwrap();
        let e = ShimConfig::load(Some(&p)).unwrap_err().to_string();
        assert!(e.contains("max_memory_mib"), "{e}");
        let e = ShimConfig::load(Some(&d.join("missing.toml")))
            .unwrap_err()
            .to_string();
        assert!(e.contains("cannot read"), "{e}");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn the_config_path_is_read_from_runtime_options() {
        // type_url = "x", config_path = "/etc/zygote/a.toml"
        let mut v = vec![0x0a, 1, b'x', 0x12, 18];
        v.extend_from_slice(b"/etc/zygote/a.toml");
        assert_eq!(
            config_path_from_options("runtimeoptions.v1.Options", &v),
            Some(PathBuf::from("/etc/zygote/a.toml"))
        );
        assert_eq!(config_path_from_options("other.Options", &v), None);
        assert_eq!(
            config_path_from_options("runtimeoptions.v1.Options", &[0x12, 50, b'/']),
            None,
            "a length past the end"
        );
    }
}
