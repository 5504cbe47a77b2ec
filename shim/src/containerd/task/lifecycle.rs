//! The typed methods behind the Task API: what each request does to the
//! process table and the pod VM, and the events it raises.
//!
//! Pids: a task's or exec's pid, as containerd sees it, is a host process
//! that lives as long as it does (`holder`), in the pod's cgroup; `pids`
//! lists a container's own process by that pid and the others by their
//! guest pids.

use std::path::{Path, PathBuf};
use std::time::Instant;

use containerd_shim_protos::api;
use containerd_shim_protos::events::task::{
    TaskCreate, TaskDelete, TaskExecStarted, TaskExit, TaskIO, TaskStart,
};
use containerd_shim_protos::protobuf::MessageField;
use containerd_shim_protos::topics;
use zygote_agent_api::ContainerRef;

use super::super::bundle;
use super::super::config::{ShimConfig, config_path_from_options};
use super::super::io::{StdioPaths, bridge};
use super::super::pod::{ProcessExit, WiredNetwork};
use super::super::spec;
use super::errors::TaskError;
use super::events::timestamp_ns;
use super::table::{Container, Process};
use super::{TaskService, blocking};

pub(super) fn process_ref(id: &str, exec_id: &str) -> ContainerRef {
    ContainerRef {
        id: id.into(),
        exec_id: exec_id.into(),
    }
}

impl TaskService {
    /// Creates container `req.id`: the pause container of a pod is only
    /// recorded; any other is prepared in the pod's VM (forked from its
    /// image's template first if the pod has none yet).
    pub async fn create_task(&self, req: &api::CreateTaskRequest) -> Result<u32, TaskError> {
        let started = Instant::now();
        let id = req.id.clone();
        let bundle = PathBuf::from(&req.bundle);
        let config_path = req
            .options
            .as_ref()
            .and_then(|o| config_path_from_options(&o.type_url, &o.value));
        let config = ShimConfig::load(config_path.as_deref())?;
        let spec_bytes = std::fs::read(bundle.join("config.json"))
            .map_err(|e| TaskError::Invalid(format!("config.json: {e}")))?;
        let oci = spec::parse(&spec_bytes).map_err(|e| TaskError::Invalid(e.to_string()))?;
        if self.state().table.contains(&id) {
            return Err(TaskError::AlreadyExists(format!("container {id}")));
        }
        let stdio = StdioPaths {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        let sandbox = spec::is_sandbox(&oci);
        self.state().timings_log = config.timings_log.clone();
        if sandbox {
            // A pod bigger than this node's VMs fails here, not at its
            // first container.
            config
                .pod_memory(spec::memory(&oci))
                .map_err(TaskError::Precondition)?;
        }
        if sandbox || !spec::is_cri(&oci) {
            self.join_pod_cgroup(&id, &oci, &bundle)?;
        }
        if sandbox {
            // The CRI made the pod's namespace and ran CNI in it before
            // this create. An application container's spec names the
            // namespace of the pause task's pid instead, which for zygote is
            // the shim's (the host's): the pod's is taken from here, and
            // wired now, so that a network the VM cannot take fails the
            // sandbox, not each of its containers.
            let netns =
                spec::network_namespace(&oci).filter(|ns| !crate::net::is_own_namespace(ns));
            let wired = match netns.clone() {
                Some(ns) => {
                    let bundle = bundle.clone();
                    Some(
                        blocking(move || {
                            let wired = WiredNetwork::attach(&ns)?;
                            if let Err(e) = bundle::record_netns(&bundle, &ns) {
                                tracing::warn!("cannot record the pod's netns in the bundle: {e}");
                            }
                            Ok(wired)
                        })
                        .await
                        .inspect_err(|e| tracing::error!("create {id}: {}", e.describe()))?,
                    )
                }
                None => None,
            };
            let mut state = self.state();
            state.pod_netns = netns;
            state.pod_network = wired;
            state.pod_hostname = Some(spec::hostname(&oci, &id));
            state.pod_cpus = spec::cpus(&oci);
            state.pod_memory = spec::memory(&oci);
        }
        let mut copied = Vec::new();
        let trip = spec::test_seccomp_trip(&oci).filter(|_| config.test_hooks);
        if !sandbox {
            let created = self
                .create_in_vm(&id, config, &bundle, &req.rootfs, &oci)
                .await;
            match created {
                Ok(c) => {
                    copied = c;
                    if let (Some(ms), Ok(pod)) = (trip, self.pod()) {
                        tracing::warn!(
                            "test hook: a vCPU thread breaks its seccomp list in {ms} ms"
                        );
                        std::thread::spawn(move || {
                            std::thread::sleep(std::time::Duration::from_millis(ms));
                            pod.trip_seccomp();
                        });
                    }
                    let owner = self.state().pod_cgroup_owner.clone();
                    if let Some(owner) = owner {
                        if let Err(e) = bundle::record_member(&owner, &id) {
                            tracing::warn!("{id}: cannot record it in the pod's bundle: {e}");
                        }
                    }
                }
                Err(e) => {
                    tracing::error!("create {id}: {}", e.describe());
                    bundle::release(&bundle);
                    self.teardown_if_idle().await;
                    return Err(e);
                }
            }
        }
        let mut init = Process::new(stdio.clone());
        init.hold(&id);
        let pid = init.pid();
        self.state().table.insert(
            &id,
            Container {
                bundle: req.bundle.clone(),
                sandbox,
                init,
                execs: Default::default(),
                copied,
            },
        )?;
        let event = TaskCreate {
            container_id: id.clone(),
            bundle: req.bundle.clone(),
            rootfs: req.rootfs.clone(),
            io: MessageField::some(TaskIO {
                stdin: stdio.stdin,
                stdout: stdio.stdout,
                stderr: stdio.stderr,
                terminal: stdio.terminal,
                ..Default::default()
            }),
            pid,
            ..Default::default()
        };
        self.events.publish(topics::TASK_CREATE_EVENT_TOPIC, &event);
        tracing::info!(
            "created {id} in {:.1} ms",
            started.elapsed().as_secs_f64() * 1e3
        );
        Ok(pid)
    }

    /// Starts a created process: in the VM, its stdio bridged first, then
    /// its waiter; the pause container only changes state.
    pub async fn start_task(&self, id: &str, exec_id: &str) -> Result<u32, TaskError> {
        let started = Instant::now();
        let (sandbox, stdio) = {
            let mut state = self.state();
            let c = state.table.container(id)?;
            let sandbox = c.sandbox;
            let p = c.process(id, exec_id)?;
            if p.started {
                return Err(TaskError::Precondition(format!("{id} already started")));
            }
            (sandbox, p.stdio.clone())
        };
        if sandbox {
            let pid = {
                let mut state = self.state();
                let p = state.table.process(id, exec_id)?;
                p.started = true;
                p.pid()
            };
            self.publish_start(id, exec_id);
            return Ok(pid);
        }
        let pod = self.pod()?;
        let key = process_ref(id, exec_id);
        let owner = (id.to_string(), self.events.namespace().to_string());
        // stdio first. containerd may never open a stdin it passed: the
        // copy waits, without keeping the VM alive.
        let (vsock, stream_key) = (pod.vsock_path().to_path_buf(), key.key());
        let mut bridged =
            blocking(move || Ok(bridge(&vsock, &stream_key, (&owner.0, &owner.1), &stdio)?))
                .await?;
        // The stdin copy starts where a `CloseIO` finds it (containerd's
        // writer goes on once the copy opens the FIFO), before the start: a
        // `CloseIO` while the start is in flight waits for it instead of
        // overtaking it. An exec's host pid exists before its process can exit.
        let pid = {
            let mut state = self.state();
            let p = state.table.process(id, exec_id)?;
            p.stdin_copy = bridged.stdin.take();
            if let Some(copy) = &mut p.stdin_copy {
                copy.start();
            }
            if p.pid() == 0 {
                p.hold(&format!("{id} {exec_id}"));
            }
            p.pid()
        };
        let (pod2, key2) = (pod.clone(), key.clone());
        let started_in_vm = blocking(move || Ok(pod2.start(&key2)?)).await;
        let guest_pid = match started_in_vm {
            Ok(pid) => pid,
            Err(e) => {
                for s in &bridged.streams {
                    let _ = s.shutdown(std::net::Shutdown::Both);
                }
                return Err(e);
            }
        };
        let mut streams = bridged.streams;
        {
            let mut state = self.state();
            let p = state.table.process(id, exec_id)?;
            p.started = true;
            p.guest_pid = Some(guest_pid);
        }
        // Published before the waiter can publish the exit.
        self.publish_start(id, exec_id);
        match self.spawn_waiter(&pod, key, bridged.outputs) {
            Ok(stream) => streams.extend(stream),
            Err(e) => tracing::error!("{id} {exec_id}: no exit waiter: {e}"),
        }
        if let Ok(p) = self.state().table.process(id, exec_id) {
            if p.exit().is_some() {
                // Ended already: its connections go now.
                for s in streams.drain(..) {
                    let _ = s.shutdown(std::net::Shutdown::Both);
                }
            }
            p.streams = streams;
        }
        tracing::info!(
            "started {id} {exec_id} (guest pid {guest_pid}) in {:.1} ms",
            started.elapsed().as_secs_f64() * 1e3
        );
        Ok(pid)
    }

    /// Deletes a process that is not running (the container's: with its
    /// execs, and the pod's VM when it was the last).
    pub async fn delete_task(
        &self,
        id: &str,
        exec_id: &str,
    ) -> Result<(u32, ProcessExit), TaskError> {
        let (exit, pid, sandbox, bundle) = {
            let mut state = self.state();
            let c = state.table.container(id)?;
            let (sandbox, bundle) = (c.sandbox, c.bundle.clone());
            let p = c.process(id, exec_id)?;
            if p.running() {
                return Err(TaskError::Precondition(format!(
                    "{id} {exec_id} is running: kill it first"
                )));
            }
            (p.exit(), p.pid(), sandbox, bundle)
        };
        if let (true, Some(w)) = (exec_id.is_empty(), &self.state().volume_watch) {
            w.remove(id);
        }
        if !sandbox {
            if let Ok(pod) = self.pod() {
                let key = process_ref(id, exec_id);
                let removed = blocking(move || {
                    pod.remove(&key)?;
                    if key.exec_id.is_empty() {
                        // Its image's disk slot, if it had one.
                        pod.detach_image(&key.id)?;
                    }
                    Ok(())
                })
                .await;
                if let Err(e) = removed {
                    tracing::warn!("remove {id} {exec_id} from the VM: {e}");
                }
            }
        }
        let exit = exit.unwrap_or(ProcessExit {
            status: 0,
            at_ns: 0,
        });
        let last = {
            let mut state = self.state();
            if let Ok(p) = state.table.process(id, exec_id) {
                for s in p.streams.drain(..) {
                    let _ = s.shutdown(std::net::Shutdown::Both);
                }
            }
            state.table.remove(id, exec_id);
            state.table.is_empty()
        };
        tracing::info!("deleted {id} {exec_id}");
        if exec_id.is_empty() {
            bundle::release(Path::new(&bundle));
            let event = TaskDelete {
                container_id: id.into(),
                pid,
                exit_status: exit.status,
                exited_at: MessageField::some(timestamp_ns(exit.at_ns)),
                id: id.into(),
                ..Default::default()
            };
            self.events.publish(topics::TASK_DELETE_EVENT_TOPIC, &event);
        }
        if last {
            self.teardown_if_idle().await;
        }
        Ok((pid, exit))
    }

    /// The pid containerd knows a process by (0 if there is none).
    pub(super) fn pid_of(&self, id: &str, exec_id: &str) -> u32 {
        self.state()
            .table
            .process(id, exec_id)
            .map_or(0, |p| p.pid())
    }

    /// TaskStart, or TaskExecStarted for an exec.
    fn publish_start(&self, id: &str, exec_id: &str) {
        let pid = self.pid_of(id, exec_id);
        if exec_id.is_empty() {
            let event = TaskStart {
                container_id: id.into(),
                pid,
                ..Default::default()
            };
            self.events.publish(topics::TASK_START_EVENT_TOPIC, &event);
        } else {
            let event = TaskExecStarted {
                container_id: id.into(),
                exec_id: exec_id.into(),
                pid,
                ..Default::default()
            };
            self.events
                .publish(topics::TASK_EXEC_STARTED_EVENT_TOPIC, &event);
        }
    }

    /// TaskExit of a process.
    pub(super) fn publish_exit(&self, id: &str, exec_id: &str, exit: ProcessExit) {
        let event = TaskExit {
            container_id: id.into(),
            id: if exec_id.is_empty() {
                id.into()
            } else {
                exec_id.into()
            },
            pid: self.pid_of(id, exec_id),
            exit_status: exit.status,
            exited_at: MessageField::some(timestamp_ns(exit.at_ns)),
            ..Default::default()
        };
        self.events.publish(topics::TASK_EXIT_EVENT_TOPIC, &event);
    }
}
