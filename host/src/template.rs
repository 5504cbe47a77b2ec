//! Templates as zygote builds them: boot a VM, wait for its agent, optionally
//! warm it with commands, let it go idle, snapshot it into the store.
//!
//! Builders of one name serialize on the store's lock; one that finds the
//! template already built reuses it (unless asked to rebuild).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};
use zygote_agent_api::{Exec, Spawn, request, response};
use zygote_vmm::KvmKind;
use zygote_vmm::snapshot::template::META_FILE;
use zygote_vmm::snapshot::{
    InstallError, STATE_VERSION, SnapshotError, StoreError, TemplateName, TemplateStore,
};

use crate::sandbox::{Sandbox, SandboxConfig, SandboxError};

/// What to build.
#[derive(Debug, Clone)]
pub struct BuildSpec {
    /// Template name.
    pub name: TemplateName,
    /// The VM to boot.
    pub sandbox: SandboxConfig,
    /// Image disks mounted (and read into the page cache) first: every fork
    /// has them mounted, their pages shared.
    pub mounts: Vec<zygote_agent_api::MountImage>,
    /// Long-running processes started in the guest before the warm-up commands
    /// (they are in every fork; the reconcile audits them).
    pub spawn: Vec<Spawn>,
    /// Commands run in the guest (through the agent) before the snapshot.
    pub warm: Vec<Vec<String>>,
    /// A container staged over a mounted image before the snapshot (its
    /// first container in every fork starts with one exec).
    pub stage: Option<zygote_agent_api::StageContainer>,
    /// How long the guest is left alone before the snapshot, so that the agent
    /// has finished with the host's connections and is idle.
    pub settle: Duration,
    /// Rebuild even if the template exists.
    pub force: bool,
}

/// What a template is, for people and listings (`template.json`). A fork does
/// not trust it: the state file is the truth.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TemplateMeta {
    /// Name.
    pub name: String,
    /// State file format version.
    pub format_version: u32,
    /// KVM kind it was taken on.
    pub kind: KvmKind,
    /// vCPUs.
    pub vcpus: u8,
    /// Guest RAM, MiB.
    pub memory_mib: u64,
    /// Guest kernel it booted.
    pub kernel: PathBuf,
    /// Initramfs it booted.
    pub initramfs: PathBuf,
    /// Kernel command line.
    pub cmdline: String,
    /// When it was written (Unix seconds).
    pub created_unix_s: u64,
    /// Guest CLOCK_BOOTTIME at which its agent started (every fork reports the same).
    pub agent_started_ns: u64,
    /// Guest CLOCK_BOOTTIME when the snapshot was taken (within the host's
    /// scheduling noise): a fork's clock continues from here.
    pub snapshot_uptime_ns: u64,
    /// Boot to agent ready, ms.
    pub boot_ms: f64,
    /// Stopping vCPUs and devices, ms.
    pub pause_ms: f64,
    /// Saving vCPU, VM and device state, ms.
    pub save_ms: f64,
    /// Writing and flushing the memory file, ms.
    pub memory_write_ms: f64,
    /// Bytes of the memory file that hold data (the rest are holes).
    pub memory_data_bytes: u64,
    /// CRC-32 of the memory file.
    pub memory_crc32: u32,
    /// Whether a container was staged in it.
    #[serde(default)]
    pub staged: bool,
    /// Empty disk slots its VM has (for images put in after the fork).
    #[serde(default)]
    pub disk_slots: u8,
    /// Whether its VM has the (empty) shared file system.
    #[serde(default)]
    pub shared_fs: bool,
    /// Whether its agent serves debug requests (its forks' too).
    #[serde(default)]
    pub debug_requests: bool,
    /// CPUs online in it (0: all).
    #[serde(default)]
    pub online_cpus: u8,
    /// The cap on its containers' memory together, MiB (0: none).
    #[serde(default)]
    pub pod_memory_mib: u64,
}

/// Errors building a template.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// The store failed (lock, rename, permissions).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The template VM did not come up.
    #[error("template VM failed")]
    Sandbox(#[from] SandboxError),
    /// A warm-up command failed.
    #[error("warm-up command {argv:?} failed: {detail}")]
    Warm {
        /// The command.
        argv: Vec<String>,
        /// Its exit status, if it ran and ended (128 + N: killed by signal N).
        status: Option<i32>,
        /// How.
        detail: String,
    },
    /// Warm-up commands or processes without the debug requests that run them.
    #[error("warm-up commands and processes need a template with debug requests")]
    NoDebugRequests,
    /// The snapshot could not be taken or written (e.g. the disk is full).
    #[error("cannot snapshot the template VM")]
    Snapshot(#[from] SnapshotError),
    /// `template.json` could not be written.
    #[error("cannot write {path}")]
    Meta {
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

impl From<InstallError<BuildError>> for BuildError {
    fn from(e: InstallError<BuildError>) -> Self {
        match e {
            InstallError::Store(e) => BuildError::Store(e),
            InstallError::Fill(e) => e,
        }
    }
}

/// The outcome of [`build`].
#[derive(Debug, Clone)]
pub struct BuildReport {
    /// Where the template is.
    pub dir: PathBuf,
    /// It existed already (built by someone else, or before) and was reused.
    pub reused: bool,
    /// Its metadata.
    pub meta: TemplateMeta,
    /// Time this call took, ms (including waiting for another builder).
    pub total_ms: f64,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Reads a template's `template.json`.
pub fn read_meta(dir: &Path) -> Result<TemplateMeta, std::io::Error> {
    let text = std::fs::read_to_string(dir.join(META_FILE))?;
    serde_json::from_str(&text).map_err(std::io::Error::other)
}

/// Builds template `spec.name` in `store`, or reuses it if it exists.
pub fn build(store: &TemplateStore, spec: &BuildSpec) -> Result<BuildReport, BuildError> {
    if (!spec.warm.is_empty() || !spec.spawn.is_empty()) && !spec.sandbox.debug_requests {
        return Err(BuildError::NoDebugRequests);
    }
    let start = Instant::now();
    let lock = store.lock(&spec.name)?;
    let dir = store.dir(&spec.name);
    if !spec.force && store.exists(&spec.name) {
        if let Ok(meta) = read_meta(&dir) {
            match stale_reason(&meta, spec) {
                None => {
                    return Ok(BuildReport {
                        dir,
                        reused: true,
                        meta,
                        total_ms: ms(start.elapsed()),
                    });
                }
                Some(why) => {
                    tracing::info!(template = %spec.name, why, "rebuilding a stale template")
                }
            }
        }
    }
    let sandbox = Sandbox::boot(&spec.sandbox)?;
    let online = spec.sandbox.online_cpus;
    if online > 0 && online < spec.sandbox.vcpus {
        build_call(
            &sandbox,
            vec!["cpus".into(), online.to_string()],
            request::Body::SetCpus(zygote_agent_api::SetCpus {
                online: online.into(),
            }),
            Duration::from_secs(120),
            |a| matches!(a, response::Body::Empty(_)),
        )?;
    }
    let pod_memory = spec.sandbox.pod_memory_mib;
    if pod_memory > 0 {
        // Once here, not in every fork of a pod that asks for no other size.
        build_call(
            &sandbox,
            vec!["pod-memory".into(), pod_memory.to_string()],
            request::Body::SetPodMemory(zygote_agent_api::SetPodMemory {
                limit_bytes: pod_memory << 20,
                ram_bytes: 0,
            }),
            Duration::from_secs(120),
            |a| matches!(a, response::Body::Empty(_)),
        )?;
    }
    for m in &spec.mounts {
        mount_image(&sandbox, m)?;
    }
    let mut spawned = Vec::new();
    for process in &spec.spawn {
        spawned.push((process, start_process(&sandbox, process)?));
    }
    for argv in &spec.warm {
        warm(&sandbox, argv)?;
    }
    if let Some(stage) = &spec.stage {
        stage_container(&sandbox, stage)?;
    }
    std::thread::sleep(spec.settle);
    // A template holds what it was asked to: a process that died on the way
    // (say why) is not snapshotted dead into every fork.
    for (process, pid) in spawned {
        check_alive(&sandbox, process, pid)?;
    }
    let boot = sandbox.boot.expect("a booted sandbox has a boot timeline");
    let agent_started_ns = sandbox.pong.agent_started_ns;
    let since_pong = sandbox
        .machine()
        .started()
        .elapsed()
        .saturating_sub(Duration::from_secs_f64(boot.agent_ready_ms / 1000.0));
    let snapshot_uptime_ns = sandbox.pong.uptime_ns + since_pong.as_nanos() as u64;
    let kind = sandbox.kind();
    let cmdline = sandbox.machine().cmdline().to_string();
    let meta = store.install(&lock, |tmp: &Path| -> Result<TemplateMeta, BuildError> {
        let info = sandbox.snapshot_into(tmp)?;
        let meta = TemplateMeta {
            name: spec.name.to_string(),
            format_version: STATE_VERSION,
            kind,
            vcpus: spec.sandbox.vcpus,
            memory_mib: spec.sandbox.memory_mib,
            kernel: std::fs::canonicalize(&spec.sandbox.kernel)
                .unwrap_or_else(|_| spec.sandbox.kernel.clone()),
            initramfs: std::fs::canonicalize(&spec.sandbox.initramfs)
                .unwrap_or_else(|_| spec.sandbox.initramfs.clone()),
            cmdline,
            created_unix_s: SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            agent_started_ns,
            snapshot_uptime_ns,
            boot_ms: boot.agent_ready_ms,
            pause_ms: ms(info.pause),
            save_ms: ms(info.save),
            memory_write_ms: ms(info.memory_write),
            memory_data_bytes: info.memory.data_bytes,
            memory_crc32: info.memory.crc32,
            staged: spec.stage.is_some(),
            disk_slots: spec.sandbox.disk_slots,
            shared_fs: spec.sandbox.shared_fs,
            debug_requests: spec.sandbox.debug_requests,
            online_cpus: spec.sandbox.online_cpus,
            pod_memory_mib: spec.sandbox.pod_memory_mib,
        };
        let path = tmp.join(META_FILE);
        let text = serde_json::to_string_pretty(&meta).expect("plain data serializes");
        std::fs::write(&path, text).map_err(|source| BuildError::Meta { path, source })?;
        Ok(meta)
    })?;
    tracing::info!(template = %spec.name, ms = ms(start.elapsed()), "template built");
    Ok(BuildReport {
        dir,
        reused: false,
        meta,
        total_ms: ms(start.elapsed()),
    })
}

/// Why an existing template does not fit `spec` (another shape, kernel or
/// image, or a kernel or image changed after it was built), if it does not.
pub fn stale_reason(meta: &TemplateMeta, spec: &BuildSpec) -> Option<String> {
    if meta.format_version != STATE_VERSION {
        return Some(format!(
            "state format {} (now {STATE_VERSION})",
            meta.format_version
        ));
    }
    if meta.staged != spec.stage.is_some() {
        return Some(format!(
            "built {} a staged container",
            if meta.staged { "with" } else { "without" }
        ));
    }
    if meta.online_cpus != spec.sandbox.online_cpus {
        return Some(format!(
            "{} CPUs online, asked {}",
            meta.online_cpus, spec.sandbox.online_cpus
        ));
    }
    if meta.pod_memory_mib != spec.sandbox.pod_memory_mib {
        return Some(format!(
            "containers' memory capped at {} MiB, asked {}",
            meta.pod_memory_mib, spec.sandbox.pod_memory_mib
        ));
    }
    if meta.disk_slots != spec.sandbox.disk_slots {
        return Some(format!(
            "{} empty disk slots, asked {}",
            meta.disk_slots, spec.sandbox.disk_slots
        ));
    }
    if meta.debug_requests != spec.sandbox.debug_requests {
        return Some(format!(
            "built {} debug requests",
            if meta.debug_requests {
                "with"
            } else {
                "without"
            }
        ));
    }
    if meta.shared_fs != spec.sandbox.shared_fs {
        return Some(format!(
            "built {} a shared file system",
            if meta.shared_fs { "with" } else { "without" }
        ));
    }
    if (meta.vcpus, meta.memory_mib) != (spec.sandbox.vcpus, spec.sandbox.memory_mib) {
        return Some(format!(
            "{} vCPUs / {} MiB, asked {} / {}",
            meta.vcpus, meta.memory_mib, spec.sandbox.vcpus, spec.sandbox.memory_mib
        ));
    }
    for (what, built, wanted) in [
        ("kernel", &meta.kernel, &spec.sandbox.kernel),
        ("image", &meta.initramfs, &spec.sandbox.initramfs),
    ] {
        let wanted = std::fs::canonicalize(wanted).unwrap_or_else(|_| wanted.clone());
        if *built != wanted {
            return Some(format!(
                "{what} {} (asked {})",
                built.display(),
                wanted.display()
            ));
        }
        let modified = std::fs::metadata(&wanted)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
            .map_or(u64::MAX, |d| d.as_secs());
        if modified > meta.created_unix_s {
            return Some(format!(
                "{what} {} changed after the template was built",
                wanted.display()
            ));
        }
    }
    None
}

/// One agent call during the build (`what` names it in errors) that must
/// be answered as `expected` says, waiting up to `timeout`.
fn build_call(
    sandbox: &Sandbox,
    what: Vec<String>,
    body: request::Body,
    timeout: Duration,
    expected: fn(&response::Body) -> bool,
) -> Result<(), BuildError> {
    let fail = |detail: String| BuildError::Warm {
        argv: what.clone(),
        status: None,
        detail,
    };
    let mut client = sandbox.client()?;
    client
        .set_timeout(timeout)
        .map_err(|e| fail(e.to_string()))?;
    match client.call(body) {
        Ok(answer) if expected(&answer) => Ok(()),
        Ok(other) => Err(fail(format!("unexpected answer {other:?}"))),
        Err(e) => Err(fail(e.to_string())),
    }
}

fn mount_image(sandbox: &Sandbox, m: &zygote_agent_api::MountImage) -> Result<(), BuildError> {
    build_call(
        sandbox,
        vec!["mount".into(), m.device.clone(), m.target.clone()],
        request::Body::MountImage(m.clone()),
        Duration::from_secs(300),
        |a| matches!(a, response::Body::Mounted(_)),
    )
}

fn stage_container(
    sandbox: &Sandbox,
    stage: &zygote_agent_api::StageContainer,
) -> Result<(), BuildError> {
    build_call(
        sandbox,
        vec!["stage".into(), stage.rootfs.clone()],
        request::Body::StageContainer(stage.clone()),
        Duration::from_secs(300),
        |a| matches!(a, response::Body::Spawned(_)),
    )
}

fn start_process(sandbox: &Sandbox, spec: &Spawn) -> Result<u32, BuildError> {
    let fail = |detail: String| BuildError::Warm {
        argv: spec.argv.clone(),
        status: None,
        detail,
    };
    let mut client = sandbox.client()?;
    match client.call(request::Body::Spawn(spec.clone())) {
        Ok(response::Body::Spawned(s)) => Ok(s.pid),
        Ok(other) => Err(fail(format!("unexpected answer {other:?}"))),
        Err(e) => Err(fail(e.to_string())),
    }
}

/// Fails if the process the agent spawned as `pid` has ended, with its
/// exit status.
fn check_alive(sandbox: &Sandbox, spec: &Spawn, pid: u32) -> Result<(), BuildError> {
    let fail = |status: Option<i32>, detail: String| BuildError::Warm {
        argv: spec.argv.clone(),
        status,
        detail,
    };
    let mut client = sandbox.client()?;
    match client.call(request::Body::SpawnStatus(zygote_agent_api::Spawned {
        pid,
    })) {
        Ok(response::Body::Spawned(_)) => Ok(()),
        Ok(response::Body::Exited(e)) => Err(fail(
            Some(e.exit_code),
            format!(
                "pid {pid} ended before the snapshot with status {}",
                e.exit_code
            ),
        )),
        Ok(other) => Err(fail(None, format!("unexpected answer {other:?}"))),
        Err(e) => Err(fail(None, e.to_string())),
    }
}

fn warm(sandbox: &Sandbox, argv: &[String]) -> Result<(), BuildError> {
    let fail = |detail: String| BuildError::Warm {
        argv: argv.to_vec(),
        status: None,
        detail,
    };
    let mut client = sandbox.client()?;
    client
        .set_timeout(Duration::from_secs(120))
        .map_err(|e| fail(e.to_string()))?;
    let body = client
        .call(request::Body::Exec(Exec {
            argv: argv.to_vec(),
            env: vec![],
            timeout_ms: 110_000,
        }))
        .map_err(|e| fail(e.to_string()))?;
    match body {
        response::Body::Exec(r) if r.exit_code == 0 => Ok(()),
        response::Body::Exec(r) => Err(BuildError::Warm {
            argv: argv.to_vec(),
            status: Some(r.exit_code),
            detail: format!(
                "exit {}: {}",
                r.exit_code,
                String::from_utf8_lossy(&r.stderr).trim()
            ),
        }),
        other => Err(fail(format!("unexpected answer {other:?}"))),
    }
}

#[cfg(test)]
mod tests;
