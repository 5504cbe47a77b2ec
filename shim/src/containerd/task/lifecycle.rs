//! The typed methods behind the Task API: what each request does to the
//! process table and the pod VM, and the events it raises.
//!
//! Pids: a task's or exec's pid, as containerd sees it, is a host process
//! that lives as long as it does (`holder`), in the pod's cgroup; `pids`
//! lists a container's own process by that pid and the others by their
//! guest pids.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use containerd_shim_protos::api;
use containerd_shim_protos::events::task::{
    TaskCreate, TaskDelete, TaskExecStarted, TaskExit, TaskIO, TaskStart,
};
use containerd_shim_protos::protobuf::MessageField;
use containerd_shim_protos::topics;
use zygote_agent_api::ContainerRef;

use super::super::bundle;
use super::super::cgroup::PodCgroup;
use super::super::config::{ShimConfig, config_path_from_options};
use super::super::io::{StdioPaths, bridge};
use super::super::pod::{IMAGE_ROOT, PodVm, ProcessExit, WiredNetwork};
use super::super::spec;
use super::super::volumes::{Copied, Placed};
use super::errors::TaskError;
use super::events::timestamp_ns;
use super::table::{Container, Process};
use super::{TaskService, blocking, rootfs};

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
        if !sandbox {
            let created = self
                .create_in_vm(&id, config, &bundle, &req.rootfs, &oci)
                .await;
            match created {
                Ok(c) => {
                    copied = c;
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

    /// The pod's VM (made now if the pod has none: two first creates at
    /// once make one), with container `id` prepared in it; its volumes
    /// copied from the host, watched from then on.
    async fn create_in_vm(
        &self,
        id: &str,
        config: ShimConfig,
        bundle: &Path,
        rootfs_mounts: &[api::Mount],
        oci: &serde_json::Value,
    ) -> Result<Vec<Copied>, TaskError> {
        let making = self.making_pod.lock().await;
        let existing = self.state().pod.clone();
        let (service, bundle, mounts, id2) = (
            self.clone(),
            bundle.to_path_buf(),
            rootfs_mounts.to_vec(),
            id.to_string(),
        );
        let asked_cpus = if spec::is_cri(oci) {
            self.state().pod_cpus
        } else {
            spec::cpus(oci)
        };
        let cpus = config.pod_cpus(asked_cpus);
        let asked_memory = if spec::is_cri(oci) {
            self.state().pod_memory
        } else {
            spec::memory(oci)
        };
        let memory = config
            .pod_memory(asked_memory)
            .map_err(TaskError::Precondition)?
            // A lone container's own limit is its cgroup's already.
            .filter(|_| spec::is_cri(oci) || asked_memory.is_none());
        if asked_cpus.is_some_and(|a| a > u32::from(cpus)) {
            tracing::warn!(
                "{id}: the pod asks for {} CPUs; its VM gets {cpus} (max_vcpus)",
                asked_cpus.unwrap_or(0)
            );
        }
        let (hostname, netns, wired) = if spec::is_cri(oci) {
            // The pod's, from its pause container (an application
            // container's spec names neither); its network wired then (or
            // again, if a VM's create failed and dropped it).
            let mut state = self.state();
            let hostname = state.pod_hostname.clone();
            (
                hostname.unwrap_or_else(|| spec::hostname(oci, id)),
                state.pod_netns.clone(),
                if existing.is_none() {
                    state.pod_network.take()
                } else {
                    None
                },
            )
        } else {
            (spec::hostname(oci, id), spec::network_namespace(oci), None)
        };
        let netns = netns
            // The host's own namespace is host networking: nothing to wire.
            .filter(|ns| !crate::net::is_own_namespace(ns));
        let (guest, placed) = spec::for_guest(oci)?;
        for n in &placed.notes {
            tracing::info!("{id}: {n}");
        }
        let Placed {
            volumes, copied, ..
        } = placed;
        let spec_json = serde_json::to_vec(&guest).expect("a JSON value serializes");
        let upper = config.upper_size_mib;
        let chain_id = self.image_chain_id(id).await;
        let (pod, new_pod, root) = blocking(move || {
            let image = rootfs::image_of(&config, &bundle, &mounts, chain_id.as_deref())?;
            match existing {
                Some(p) if p.image == image.path => Ok((p, false, IMAGE_ROOT.to_string())),
                // Another image: a disk slot of the running VM.
                Some(p) => {
                    let root = p.attach_image(&id2, &image.path)?;
                    Ok((p, false, root))
                }
                None => {
                    let network = match (wired, netns) {
                        (Some(wired), _) => Some(wired),
                        (None, Some(ns)) => Some(WiredNetwork::attach(&ns)?),
                        (None, None) => None,
                    };
                    let pod = Arc::new(PodVm::create(
                        &config, &image, &hostname, network, cpus, memory,
                    )?);
                    if let Err(e) = bundle::record_run_dir(&bundle, pod.run_dir()) {
                        tracing::warn!("{id2}: cannot record the VM's run dir in the bundle: {e}");
                    }
                    if let Some(ns) = pod.netns() {
                        if let Err(e) = bundle::record_netns(&bundle, ns) {
                            tracing::warn!(
                                "{id2}: cannot record the pod's netns in the bundle: {e}"
                            );
                        }
                    }
                    service.state().pod = Some(pod.clone());
                    Ok((pod, true, IMAGE_ROOT.to_string()))
                }
            }
        })
        .await?;
        drop(making);
        let (service, id) = (self.clone(), id.to_string());
        blocking(move || {
            if let Err(e) = pod.create_container(&id, spec_json, &root, upper, volumes) {
                if let Err(d) = pod.detach_image(&id) {
                    tracing::warn!("{id}: {d}");
                }
                return Err(e.into());
            }
            // The OOM and monitor connections start after the container is
            // created: on PVM, agent threads busy at the same time can
            // corrupt each other's data (docs/guest-kernel.md).
            if new_pod {
                service.watch_ooms(&pod);
                service.monitor(&pod);
            }
            service.watch_volumes(&pod, &id, &copied);
            Ok(copied)
        })
        .await
    }

    /// Moves this shim (the pod's VM, before it is made) into the cgroup
    /// the pod's spec names, once; a cgroup that cannot be joined fails the
    /// create, as under runc.
    fn join_pod_cgroup(
        &self,
        id: &str,
        oci: &serde_json::Value,
        bundle: &Path,
    ) -> Result<(), TaskError> {
        let Some(path) = oci["linux"]["cgroupsPath"]
            .as_str()
            .filter(|p| !p.is_empty())
        else {
            return Ok(());
        };
        let mut state = self.state();
        if state.pod_cgroup.is_some() {
            return Ok(());
        }
        let joined = PodCgroup::join(path).map_err(|e| {
            TaskError::Precondition(format!("cannot put the pod's VM in cgroup {path}: {e}"))
        })?;
        tracing::info!(
            "{id}: the pod's VM is charged to cgroup {}",
            joined.path().display()
        );
        state.pod_cgroup = Some(joined);
        state.pod_cgroup_owner = Some(bundle.to_path_buf());
        Ok(())
    }

    /// The chain ID of container `id`'s image, from containerd; None (the
    /// image is then keyed by its snapshot) when containerd cannot say.
    async fn image_chain_id(&self, id: &str) -> Option<String> {
        let api = self.containerd.as_ref()?;
        match api.image_chain_id(id).await {
            Ok(chain) => Some(chain),
            Err(e) => {
                tracing::warn!("{id}: image keyed by its snapshot: {e}");
                None
            }
        }
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
