//! The Task service: containerd's calls mapped onto the pod VM, and task
//! events published back in containerd's order (Create → Start → Exit →
//! Delete; ExecAdded → ExecStarted → Exit). One job per file:
//!
//! - `handlers.rs`: the ttrpc Task API, thin: decode, call a typed method
//!   below, map its [`TaskError`] to a code.
//! - `lifecycle.rs`: creating, starting and deleting processes (typed methods).
//! - `controls.rs`: requests on a process that exists (state, wait, kill,
//!   exec, terminal, stdin, pids, stats, update).
//! - `teardown.rs`: the pod VM stopped with its last task; the shim's end.
//! - `table.rs`: the process table (containers, their init and execs, exits).
//! - `untrusted.rs`: what the guest says unasked, checked and rate-limited.
//! - `watchers.rs`: the exit waiters, the VM monitor, the OOM stream.
//! - `events.rs`: publishing events in order, retried until containerd takes them.
//! - `rootfs.rs`: the image disk of a container's rootfs.
//! - `metrics.rs`: the agent's counters as containerd's cgroups v2 metrics.
//! - `errors.rs`: [`TaskError`] and its ttrpc codes.
//!
//! Locking: the process table is behind one `std` mutex that is never held
//! across a call into the VM; pod VM creation is serialized by an async
//! mutex, so that two first creates of one pod make one VM.

mod controls;
mod create;
mod errors;
pub mod events;
mod handlers;
pub mod holder;
mod lifecycle;
mod metrics;
mod rootfs;
mod table;
mod teardown;
mod untrusted;
mod watchers;

use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use containerd_shim::asynchronous::ExitSignal;

pub use errors::TaskError;
pub use events::Events;

use super::pod::PodVm;
use table::Table;

/// What the service holds under its lock.
#[derive(Default)]
struct State {
    pod: Option<Arc<PodVm>>,
    /// The pod's network namespace, from its pause container's spec (CRI).
    pod_netns: Option<PathBuf>,
    /// The pod's network, wired when its sandbox was created (CRI), until
    /// its VM takes it.
    pod_network: Option<super::pod::WiredNetwork>,
    /// The pod's hostname, from its pause container's spec (CRI).
    pod_hostname: Option<String>,
    /// The CPUs the pod asks for, from its pause container's spec (CRI).
    pod_cpus: Option<u32>,
    /// The memory the pod asks for, bytes, from its pause container's spec (CRI).
    pod_memory: Option<u64>,
    timings_log: Option<PathBuf>,
    table: Table,
    /// The pod's host cgroup, which this shim joined.
    pod_cgroup: Option<super::cgroup::PodCgroup>,
    /// The bundle of the container whose cgroup that is (where the pod's
    /// members are recorded for `delete` after a dead shim).
    pod_cgroup_owner: Option<PathBuf>,
    /// Keeps the pod's copied volumes current (with its VM).
    volume_watch: Option<Arc<super::volumes::watch::Watcher>>,
}

/// The Task service of one shim (one pod).
#[derive(Clone)]
pub struct TaskService {
    state: Arc<Mutex<State>>,
    /// Held while the pod's VM is being made (async: held across the work).
    making_pod: Arc<tokio::sync::Mutex<()>>,
    events: Events,
    exit: Arc<ExitSignal>,
    /// containerd's API, asked for images' chain IDs (None: images are keyed
    /// by their snapshots).
    containerd: Option<super::content::ContainerdApi>,
}

impl std::fmt::Debug for TaskService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ids = self.state.lock().map(|s| s.table.ids()).unwrap_or_default();
        f.debug_struct("TaskService")
            .field("events", &self.events)
            .field("containers", &ids)
            .finish()
    }
}

impl TaskService {
    /// A service publishing through `events`; `exit` is signalled when the
    /// pod's last task is gone and containerd asked the shim to shut down.
    pub fn new(
        events: Events,
        exit: Arc<ExitSignal>,
        containerd: Option<super::content::ContainerdApi>,
    ) -> Self {
        TaskService {
            containerd,
            state: Arc::new(Mutex::new(State::default())),
            making_pod: Arc::new(tokio::sync::Mutex::new(())),
            events,
            exit,
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The pod's VM (FAILED_PRECONDITION before its first container).
    fn pod(&self) -> Result<Arc<PodVm>, TaskError> {
        self.state()
            .pod
            .clone()
            .ok_or_else(|| TaskError::Precondition("the pod has no VM".into()))
    }

    /// Events still queued are sent before the shim exits.
    pub async fn flush_events(&self) {
        self.events.flush(std::time::Duration::from_secs(10)).await;
    }
}

/// Runs blocking work (VM calls) off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, TaskError> + Send + 'static,
) -> Result<T, TaskError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| TaskError::Worker(e.to_string()))?
}
