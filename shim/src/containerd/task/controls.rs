//! The requests on a process that exists: its state, waiting, signals,
//! execs, its terminal and stdin, its pids, counters and limits.

use containerd_shim_protos::api;
use zygote_agent_api::ContainerStats;

use super::super::io::StdioPaths;
use super::super::pod::ProcessExit;
use super::errors::TaskError;
use super::events::now_ns;
use super::lifecycle::process_ref;
use super::table::Process;
use super::{TaskService, blocking};
use containerd_shim_protos::events::task::TaskExecAdded;
use containerd_shim_protos::topics;

/// What `state` reports of a process.
#[derive(Debug)]
pub struct ProcessView {
    /// Its container's bundle.
    pub bundle: String,
    /// The pid containerd knows it by.
    pub pid: u32,
    /// Created, running or stopped.
    pub status: api::Status,
    /// Its stdio as containerd gave it.
    pub stdio: StdioPaths,
    /// How it ended, if it did.
    pub exit: Option<ProcessExit>,
}

/// How long `CloseIO` lets the stdin copy pass on what it has and end.
const STDIN_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

impl TaskService {
    /// What `state` says of a process.
    pub fn view(&self, id: &str, exec_id: &str) -> Result<ProcessView, TaskError> {
        let mut state = self.state();
        let c = state.table.container(id)?;
        let bundle = c.bundle.clone();
        let p = c.process(id, exec_id)?;
        Ok(ProcessView {
            bundle,
            pid: p.pid(),
            status: p.status(),
            stdio: p.stdio.clone(),
            exit: p.exit(),
        })
    }

    /// Waits for a process's exit.
    pub async fn wait_task(&self, id: &str, exec_id: &str) -> Result<ProcessExit, TaskError> {
        let mut rx = self.state().table.process(id, exec_id)?.subscribe();
        loop {
            if let Some(e) = *rx.borrow_and_update() {
                return Ok(e);
            }
            if rx.changed().await.is_err() {
                return Err(TaskError::NotFound(format!("{id} {exec_id} (deleted)")));
            }
        }
    }

    /// Signals a process. The pause container, and a process never
    /// started, end by the signal itself.
    pub async fn kill_task(&self, id: &str, exec_id: &str, signal: u32) -> Result<(), TaskError> {
        let (sandbox, exited, started) = {
            let mut state = self.state();
            let c = state.table.container(id)?;
            let sandbox = c.sandbox;
            let p = c.process(id, exec_id)?;
            (sandbox, p.exit().is_some(), p.started)
        };
        if exited {
            return Err(TaskError::Finished);
        }
        if sandbox || !started {
            let exit = ProcessExit {
                status: 128 + signal,
                at_ns: now_ns(),
            };
            self.exited(id, exec_id, exit);
            return Ok(());
        }
        let pod = self.pod()?;
        let key = process_ref(id, exec_id);
        blocking(move || Ok(pod.signal(&key, signal)?)).await
    }

    /// Prepares exec `exec_id` in container `id`.
    pub async fn add_exec(
        &self,
        id: &str,
        exec_id: &str,
        process_json: Vec<u8>,
        stdio: StdioPaths,
    ) -> Result<(), TaskError> {
        {
            let mut state = self.state();
            let c = state.table.container(id)?;
            if c.execs.contains_key(exec_id) {
                return Err(TaskError::AlreadyExists(format!("exec {exec_id}")));
            }
            if c.sandbox {
                return Err(TaskError::Precondition(
                    "the pod's sandbox container runs nothing to exec into".into(),
                ));
            }
        }
        let pod = self.pod()?;
        let (id2, exec2) = (id.to_string(), exec_id.to_string());
        blocking(move || Ok(pod.exec_process(&id2, &exec2, process_json)?)).await?;
        self.state()
            .table
            .container(id)?
            .execs
            .insert(exec_id.into(), Process::new(stdio));
        let event = TaskExecAdded {
            container_id: id.into(),
            exec_id: exec_id.into(),
            ..Default::default()
        };
        self.events
            .publish(topics::TASK_EXEC_ADDED_EVENT_TOPIC, &event);
        Ok(())
    }

    /// Resizes a process's terminal (a process without one has nothing to
    /// resize, and that is not an error, as with runc).
    pub async fn resize(
        &self,
        id: &str,
        exec_id: &str,
        width: u32,
        height: u32,
    ) -> Result<(), TaskError> {
        let terminal = self.state().table.process(id, exec_id)?.stdio.terminal;
        if !terminal {
            return Ok(());
        }
        let pod = self.pod()?;
        let key = process_ref(id, exec_id);
        blocking(move || Ok(pod.resize_tty(&key, width, height)?)).await
    }

    /// Closes a process's stdin: its copy passes on what containerd already
    /// wrote, then the end of file follows in band. Only a copy that does
    /// not end within a grace is cut short by the agent.
    pub async fn close_stdin(&self, id: &str, exec_id: &str) -> Result<(), TaskError> {
        let copy = self.state().table.process(id, exec_id)?.stdin_copy.take();
        let ended = match copy {
            Some(copy) => blocking(move || Ok(copy.close(STDIN_GRACE))).await?,
            None => false,
        };
        if ended {
            return Ok(());
        }
        let pod = self.pod()?;
        let key = process_ref(id, exec_id);
        blocking(move || Ok(pod.close_stdin(&key)?)).await
    }

    /// The pids of a container's processes (the pause container: its task's).
    ///
    /// The container's own process goes by the task's pid (its host holder,
    /// as containerd knows the task), as under runc the task's pid is among
    /// its container's; the others by their guest pids.
    pub async fn list_pids(&self, id: &str) -> Result<Vec<u32>, TaskError> {
        let (init_guest_pid, init_pid) = {
            let mut state = self.state();
            let c = state.table.container(id)?;
            if c.sandbox {
                return Ok(vec![c.init.pid()]);
            }
            (c.init.guest_pid, c.init.pid())
        };
        let pod = self.pod()?;
        let id = id.to_string();
        let pids = blocking(move || Ok(pod.pids(&id)?)).await?;
        Ok(pids
            .into_iter()
            .map(|pid| {
                if Some(pid) == init_guest_pid {
                    init_pid
                } else {
                    pid
                }
            })
            .collect())
    }

    /// A container's counters; the pause container's are the whole VM's
    /// as the host charges it (the pod cgroup's, or this process's).
    pub async fn container_stats(&self, id: &str) -> Result<ContainerStats, TaskError> {
        {
            let mut state = self.state();
            if state.table.container(id)?.sandbox {
                return Ok(match &state.pod_cgroup {
                    Some(cg) => cg.stats(),
                    None => process_stats(),
                });
            }
        }
        let pod = self.pod()?;
        let id = id.to_string();
        blocking(move || Ok(pod.stats(&id)?)).await
    }

    /// New OCI `linux.resources` (JSON) for a container.
    pub async fn update_task(&self, id: &str, resources_json: Vec<u8>) -> Result<(), TaskError> {
        self.state().table.container(id)?;
        let pod = self.pod()?;
        let id = id.to_string();
        blocking(move || Ok(pod.update_resources(&id, resources_json)?)).await
    }
}

/// This process's CPU time and resident memory, as a sandbox's counters
/// when the pod has no cgroup of its own.
fn process_stats() -> ContainerStats {
    let pages = std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(0) as u64;
    ContainerStats {
        cpu_usage_usec: super::super::pod::process_cpu_time().as_micros() as u64,
        memory_current: pages * page,
        memory_max: u64::MAX,
        pids_current: 1,
        oom_kills: 0,
    }
}
