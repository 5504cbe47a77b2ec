//! The Task service: containerd's calls mapped onto the pod VM's agent, and
//! task events published back in containerd's order (Create → Start → Exit →
//! Delete; ExecAdded → ExecStarted → Exit).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};

use async_trait::async_trait;
use containerd_shim::asynchronous::ExitSignal;
use containerd_shim::publisher::RemotePublisher;
use containerd_shim_protos::api;
use containerd_shim_protos::events::task::{
    TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskExit, TaskIO, TaskOOM, TaskStart,
};
use containerd_shim_protos::protobuf::well_known_types::any::Any;
use containerd_shim_protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim_protos::protobuf::{MessageDyn, MessageField};
use containerd_shim_protos::shim_async::Task;
use containerd_shim_protos::topics;
use containerd_shim_protos::ttrpc::r#async::TtrpcContext;
use containerd_shim_protos::ttrpc::{self, Code};
use tokio::sync::watch;
use zygote_agent_api::{ContainerRef, CreateContainer, ExecProcess, request, response};

use super::config::{ShimConfig, config_path_from_options};
use super::io::{StdioPaths, bridge};
use super::pod::{IMAGE_ROOT, PodError, PodVm};
use super::shim::{RUN_DIR_FILE, unmount};
use super::spec;
use crate::image::{ImageBuild, ImageStore};

type TtrpcResult<T> = ttrpc::Result<T>;

fn status(code: Code, message: impl Into<String>) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(code, message.into()))
}

fn internal(e: impl std::fmt::Display) -> ttrpc::Error {
    status(Code::INTERNAL, e.to_string())
}

pub(super) fn now() -> Timestamp {
    let d = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    timestamp_ns(d.as_nanos() as u64)
}

fn timestamp_ns(ns: u64) -> Timestamp {
    let mut t = Timestamp::new();
    t.seconds = (ns / 1_000_000_000) as i64;
    t.nanos = (ns % 1_000_000_000) as i32;
    t
}

/// How often the monitor looks at the pod VM (host side only: no guest work).
const MONITOR_INTERVAL: std::time::Duration = std::time::Duration::from_millis(500);
/// How often it pings the agent, and how long an answer may take.
const PING_INTERVAL: std::time::Duration = std::time::Duration::from_secs(10);
const PING_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// How a process ended.
#[derive(Debug, Clone, Copy)]
struct Exit {
    status: u32,
    at_ns: u64,
}

struct Process {
    pid: u32,
    stdio: StdioPaths,
    started: bool,
    exit_tx: watch::Sender<Option<Exit>>,
    /// Its vsock connections (stdio, wait), shut down at its exit.
    streams: Vec<std::os::unix::net::UnixStream>,
}

impl Process {
    fn new(stdio: StdioPaths) -> Self {
        Process {
            pid: 0,
            stdio,
            started: false,
            exit_tx: watch::channel(None).0,
            streams: Vec::new(),
        }
    }

    fn exit(&self) -> Option<Exit> {
        *self.exit_tx.borrow()
    }

    fn status(&self) -> api::Status {
        match (self.started, self.exit()) {
            (_, Some(_)) => api::Status::STOPPED,
            (true, None) => api::Status::RUNNING,
            (false, None) => api::Status::CREATED,
        }
    }
}

struct Container {
    bundle: String,
    /// The pod's pause container: no process in the VM.
    sandbox: bool,
    init: Process,
    execs: HashMap<String, Process>,
}

#[derive(Default)]
struct State {
    pod: Option<Arc<PodVm>>,
    timings_log: Option<PathBuf>,
    containers: HashMap<String, Container>,
}

/// The Task service of one shim (one pod).
#[derive(Clone)]
pub struct TaskService {
    state: Arc<Mutex<State>>,
    publisher: Arc<RemotePublisher>,
    namespace: String,
    exit: Arc<ExitSignal>,
    runtime: tokio::runtime::Handle,
}

impl std::fmt::Debug for TaskService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ids: Vec<String> = self
            .state
            .lock()
            .map(|s| s.containers.keys().cloned().collect())
            .unwrap_or_default();
        f.debug_struct("TaskService")
            .field("namespace", &self.namespace)
            .field("containers", &ids)
            .finish()
    }
}

fn pod_error(e: PodError) -> ttrpc::Error {
    match &e {
        PodError::Agent(zygote_agent_api::ClientError::Agent { code, message }) => {
            let code = match *code {
                3 => Code::INVALID_ARGUMENT,
                5 => Code::NOT_FOUND,
                12 => Code::UNIMPLEMENTED,
                _ => Code::INTERNAL,
            };
            status(code, message.clone())
        }
        PodError::Damaged { .. } => status(Code::FAILED_PRECONDITION, format!("{e}")),
        _ => status(Code::INTERNAL, format!("{:#}", anyhow::Error::from(e))),
    }
}

fn unexpected(answer: &response::Body) -> ttrpc::Error {
    internal(format!("unexpected answer from the agent: {answer:?}"))
}

/// An agent call answered with `Empty`.
fn call_empty(pod: &PodVm, body: request::Body) -> TtrpcResult<()> {
    match pod.call(body).map_err(pod_error)? {
        response::Body::Empty(_) => Ok(()),
        other => Err(unexpected(&other)),
    }
}

/// Runs blocking work off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> TtrpcResult<T> + Send + 'static,
) -> TtrpcResult<T> {
    tokio::task::spawn_blocking(f).await.map_err(internal)?
}

impl TaskService {
    /// A service for the shim of `namespace`, publishing through
    /// `publisher`; `exit` is signalled when the pod's last task is gone.
    pub fn new(publisher: RemotePublisher, namespace: &str, exit: Arc<ExitSignal>) -> Self {
        TaskService {
            state: Arc::new(Mutex::new(State::default())),
            publisher: Arc::new(publisher),
            namespace: namespace.to_string(),
            exit,
            runtime: tokio::runtime::Handle::current(),
        }
    }

    async fn publish(&self, topic: &str, event: Box<dyn MessageDyn>) {
        let ctx = ttrpc::context::Context::default();
        if let Err(e) = self
            .publisher
            .publish(ctx, topic, &self.namespace, event)
            .await
        {
            log::warn!("publish {topic}: {e}");
        }
    }

    fn pod(&self) -> TtrpcResult<Arc<PodVm>> {
        self.state
            .lock()
            .expect("state lock")
            .pod
            .clone()
            .ok_or_else(|| status(Code::FAILED_PRECONDITION, "the pod has no VM"))
    }

    fn with_process<T>(
        &self,
        id: &str,
        exec_id: &str,
        f: impl FnOnce(&mut Container, Option<&mut Process>) -> TtrpcResult<T>,
    ) -> TtrpcResult<T> {
        let mut state = self.state.lock().expect("state lock");
        let c = state
            .containers
            .get_mut(id)
            .ok_or_else(|| status(Code::NOT_FOUND, format!("container {id} not found")))?;
        if exec_id.is_empty() {
            // The init process is passed as None: the container holds it.
            f(c, None)
        } else {
            let mut execs = std::mem::take(&mut c.execs);
            let result = match execs.get_mut(exec_id) {
                Some(p) => f(c, Some(p)),
                None => Err(status(
                    Code::NOT_FOUND,
                    format!("exec {exec_id} of {id} not found"),
                )),
            };
            c.execs = execs;
            result
        }
    }

    /// The image disk of a container's rootfs mounts: cached by its layers,
    /// else built from the mounted snapshot.
    fn image_of(
        config: &ShimConfig,
        bundle: &Path,
        mounts: &[api::Mount],
    ) -> TtrpcResult<ImageBuild> {
        let described: Vec<(String, String, Vec<String>)> = mounts
            .iter()
            .map(|m| (m.type_.clone(), m.source.clone(), m.options.clone()))
            .collect();
        let key = spec::image_key(&described).ok_or_else(|| {
            status(
                Code::INVALID_ARGUMENT,
                "zygote needs the image's snapshot mounts (rootfs) to make its disk",
            )
        })?;
        let store = ImageStore::new(&config.images);
        if let Some(cached) = store.cached(&key) {
            return Ok(cached);
        }
        let rootfs = bundle.join("rootfs");
        std::fs::create_dir_all(&rootfs).map_err(internal)?;
        for m in mounts {
            let kind = (!m.type_.is_empty()).then_some(m.type_.as_str());
            let source = (!m.source.is_empty()).then_some(m.source.as_str());
            containerd_shim::mount::mount_rootfs(kind, source, &m.options, &rootfs)
                .map_err(|e| internal(format!("mount the rootfs: {e}")))?;
        }
        let built = store.from_dir(&key, &rootfs);
        unmount(&rootfs);
        let built = built.map_err(internal)?;
        log::info!(
            "image {} built from the snapshot in {:.0} ms",
            built.key,
            built.build_ms
        );
        Ok(built)
    }

    /// Waits for the process's exit on a connection of its own (returned, to
    /// be shut down if the VM dies), then reports it once its output has
    /// reached containerd. Holds no strong reference to the VM.
    fn spawn_waiter(
        &self,
        pod: &Arc<PodVm>,
        id: String,
        exec_id: String,
        outputs: super::io::Outputs,
    ) -> Option<std::os::unix::net::UnixStream> {
        let service = self.clone();
        let client = pod.connect();
        let stream = client.as_ref().ok().and_then(|c| c.try_clone_stream().ok());
        let weak = Arc::downgrade(pod);
        std::thread::Builder::new()
            .name("wait".into())
            .spawn(move || {
                let key = ContainerRef {
                    id: id.clone(),
                    exec_id: exec_id.clone(),
                };
                let waited = client.and_then(|mut c| {
                    c.set_timeout(std::time::Duration::from_secs(365 * 24 * 3600))
                        .map_err(zygote_agent_api::ClientError::Io)?;
                    c.call(request::Body::WaitProcess(key))
                        .map_err(|e| match weak.upgrade() {
                            Some(pod) => pod.explain(e),
                            None => PodError::Agent(e),
                        })
                });
                let exit = match waited {
                    Ok(response::Body::Exited(e)) => Exit {
                        status: e.exit_code as u32,
                        at_ns: e.exited_at_ns,
                    },
                    other => {
                        let why = match other {
                            Err(e) => e.to_string(),
                            Ok(answer) => format!("unexpected answer {answer:?}"),
                        };
                        log::error!("{id} {exec_id}: no exit status from the guest: {why}");
                        Exit {
                            status: 255,
                            at_ns: SystemTime::now()
                                .duration_since(SystemTime::UNIX_EPOCH)
                                .map_or(0, |d| d.as_nanos() as u64),
                        }
                    }
                };
                log::info!("{id} {exec_id} exited {}", exit.status);
                outputs.drain();
                log::info!("{id} {exec_id} output drained");
                service
                    .runtime
                    .clone()
                    .block_on(service.exited(&id, &exec_id, exit));
            })
            .expect("spawn a waiter thread");
        stream
    }

    /// Records an exit and publishes TaskExit (once per process).
    async fn exited(&self, id: &str, exec_id: &str, exit: Exit) {
        let recorded = self.with_process(id, exec_id, |c, p| {
            let p = p.unwrap_or(&mut c.init);
            if p.exit().is_some() {
                return Ok(None);
            }
            // Copies blocked on a dead VM end now, and containerd's FIFOs close.
            for s in p.streams.drain(..) {
                let _ = s.shutdown(std::net::Shutdown::Both);
            }
            p.exit_tx.send_replace(Some(exit));
            Ok(Some(p.pid))
        });
        let Ok(Some(pid)) = recorded else {
            return;
        };
        let event = TaskExit {
            container_id: id.into(),
            id: if exec_id.is_empty() {
                id.into()
            } else {
                exec_id.into()
            },
            pid,
            exit_status: exit.status,
            exited_at: MessageField::some(timestamp_ns(exit.at_ns)),
            ..Default::default()
        };
        self.publish(topics::TASK_EXIT_EVENT_TOPIC, Box::new(event))
            .await;
    }

    /// Appends the pod VM's timings to the configured log (benchmarks read it).
    fn log_timings(
        &self,
        template: &str,
        timings: super::pod::PodTimings,
        end: super::pod::PodEnd,
    ) {
        let path = self.state.lock().expect("state lock").timings_log.clone();
        let Some(path) = path else {
            return;
        };
        let line = serde_json::json!({
            "template": template,
            "pod": timings,
            "end": end,
        });
        use std::io::Write;
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            let _ = writeln!(f, "{line}");
        }
    }

    /// Watches the pod VM: if it stops (a guest panic, a VMM error) or its
    /// agent stops answering, every task still running is marked exited
    /// (status 255) with the reason logged, so containerd and kubelet see it.
    fn monitor(&self, pod: &Arc<PodVm>) {
        let (service, weak) = (self.clone(), Arc::downgrade(pod));
        std::thread::Builder::new()
            .name("monitor".into())
            .spawn(move || {
                let mut failed_pings = 0;
                let mut last_ping = Instant::now();
                loop {
                    std::thread::sleep(MONITOR_INTERVAL);
                    let Some(pod) = weak.upgrade() else { return };
                    let mut dead = pod.check().err().map(|e| e.to_string());
                    if dead.is_none() && last_ping.elapsed() >= PING_INTERVAL {
                        last_ping = Instant::now();
                        let answered = pod.connect().and_then(|mut c| {
                            c.set_timeout(PING_TIMEOUT)
                                .map_err(zygote_agent_api::ClientError::Io)?;
                            c.ping().map_err(PodError::from)
                        });
                        failed_pings = if answered.is_ok() {
                            0
                        } else {
                            failed_pings + 1
                        };
                        if failed_pings >= 2 {
                            dead = Some(format!(
                                "the agent did not answer twice within {PING_TIMEOUT:?}: {:?}",
                                answered.err()
                            ));
                        }
                    }
                    let Some(why) = dead else { continue };
                    drop(pod);
                    log::error!("the pod VM failed: {why}; its running tasks are marked exited");
                    service.runtime.block_on(service.fail_all());
                    return;
                }
            })
            .expect("spawn the monitor thread");
    }

    /// Marks every started, running process exited with status 255.
    async fn fail_all(&self) {
        let running: Vec<(String, String)> = {
            let state = self.state.lock().expect("state lock");
            state
                .containers
                .iter()
                .flat_map(|(id, c)| {
                    let init = (c.init.started && c.init.exit().is_none())
                        .then(|| (id.clone(), String::new()));
                    let execs = c
                        .execs
                        .iter()
                        .filter(|(_, p)| p.started && p.exit().is_none())
                        .map(|(e, _)| (id.clone(), e.clone()));
                    init.into_iter().chain(execs).collect::<Vec<_>>()
                })
                .collect()
        };
        let at_ns = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        for (id, exec_id) in running {
            self.exited(&id, &exec_id, Exit { status: 255, at_ns })
                .await;
        }
    }

    fn watch_ooms(&self, pod: &Arc<PodVm>) {
        // Its own connection, and no hold on the VM: it ends when the VM does.
        let Ok(mut client) = pod.connect() else {
            log::warn!("no OOM events: cannot connect to the agent");
            return;
        };
        let service = self.clone();
        std::thread::Builder::new()
            .name("oom".into())
            .spawn(move || {
                let _ = client.set_timeout(std::time::Duration::from_secs(365 * 24 * 3600));
                while let Ok(response::Body::Oom(e)) =
                    client.call(request::Body::GetOomEvent(Default::default()))
                {
                    let event = TaskOOM {
                        container_id: e.id,
                        ..Default::default()
                    };
                    service
                        .runtime
                        .block_on(service.publish(topics::TASK_OOM_EVENT_TOPIC, Box::new(event)));
                }
            })
            .expect("spawn the OOM thread");
    }

    /// With no task left, the pod's VM goes, and nothing of it stays.
    async fn teardown_if_idle(&self) {
        let pod = {
            let mut state = self.state.lock().expect("state lock");
            if !state.containers.is_empty() {
                return;
            }
            state.pod.take()
        };
        if let Some(pod) = pod {
            log::info!("stopping the pod VM");
            let (template, timings) = (pod.template.clone(), pod.timings);
            let ended = tokio::task::spawn_blocking(move || {
                // Waiter and OOM threads hold references for a moment after an exit.
                let mut pod = pod;
                for _ in 0..100 {
                    match Arc::try_unwrap(pod) {
                        Ok(p) => return Some(p.shutdown()),
                        Err(again) => pod = again,
                    }
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                log::warn!("the pod VM is still referenced; it stops with the shim");
                None
            })
            .await;
            if let Ok(Some(end)) = ended {
                self.log_timings(&template, timings, end);
            }
        }
    }

    fn agent_empty(&self, body: request::Body) -> TtrpcResult<()> {
        call_empty(&*self.pod()?, body)
    }
}

#[async_trait]
impl Task for TaskService {
    async fn create(
        &self,
        _ctx: &TtrpcContext,
        req: api::CreateTaskRequest,
    ) -> TtrpcResult<api::CreateTaskResponse> {
        let started = Instant::now();
        let id = req.id.clone();
        let bundle = PathBuf::from(&req.bundle);
        let config_path = req
            .options
            .as_ref()
            .and_then(|o| config_path_from_options(&o.type_url, &o.value));
        let config = ShimConfig::load(config_path.as_deref())
            .map_err(|e| status(Code::INVALID_ARGUMENT, e.to_string()))?;
        let spec_bytes = std::fs::read(bundle.join("config.json"))
            .map_err(|e| status(Code::INVALID_ARGUMENT, format!("config.json: {e}")))?;
        let oci =
            spec::parse(&spec_bytes).map_err(|e| status(Code::INVALID_ARGUMENT, e.to_string()))?;
        if self
            .state
            .lock()
            .expect("state lock")
            .containers
            .contains_key(&id)
        {
            return Err(status(
                Code::ALREADY_EXISTS,
                format!("container {id} exists"),
            ));
        }
        let stdio = StdioPaths {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        let sandbox = spec::is_sandbox(&oci);
        let mut pid = std::process::id();
        self.state.lock().expect("state lock").timings_log = config.timings_log.clone();
        if !sandbox {
            let pod = self.state.lock().expect("state lock").pod.clone();
            let (service, bundle2, rootfs, id2) =
                (self.clone(), bundle.clone(), req.rootfs.clone(), id.clone());
            let hostname = oci["hostname"].as_str().unwrap_or(&id).to_string();
            let created = blocking(move || -> TtrpcResult<()> {
                let image = Self::image_of(&config, &bundle2, &rootfs)?;
                let (pod, new_pod) = match pod {
                    Some(p) if p.image == image.path => (p, false),
                    Some(_) => {
                        return Err(status(
                            Code::FAILED_PRECONDITION,
                            "every container of a zygote pod must use the pod's first image (for now)",
                        ));
                    }
                    None => {
                        let pod = Arc::new(PodVm::create(&config, &image, &hostname).map_err(pod_error)?);
                        let _ = std::fs::write(bundle2.join(RUN_DIR_FILE), pod.run_dir().to_string_lossy().as_bytes());
                        service.state.lock().expect("state lock").pod = Some(pod.clone());
                        (pod, true)
                    }
                };
                let (guest, notes) = spec::for_guest(&oci);
                for n in notes {
                    log::info!("{id2}: {n}");
                }
                let spec_json = serde_json::to_vec(&guest).expect("JSON");
                call_empty(
                    &pod,
                    request::Body::CreateContainer(CreateContainer {
                        id: id2.clone(),
                        spec_json,
                        rootfs: IMAGE_ROOT.into(),
                        upper_size_mib: config.upper_size_mib,
                    }),
                )?;
                // The OOM and monitor connections start after the container is
                // created: on PVM, agent threads busy at the same time can
                // corrupt each other's data (docs/guest-kernel.md).
                if new_pod {
                    service.watch_ooms(&pod);
                    service.monitor(&pod);
                }
                Ok(())
            })
            .await;
            if let Err(e) = created {
                log::error!("create {id}: {e:?}");
                self.teardown_if_idle().await;
                return Err(e);
            }
            // The process's pid is known at start (it runs in the VM).
            pid = 0;
        }
        self.state.lock().expect("state lock").containers.insert(
            id.clone(),
            Container {
                bundle: req.bundle.clone(),
                sandbox,
                init: Process::new(stdio),
                execs: HashMap::new(),
            },
        );
        let event = TaskCreate {
            container_id: id.clone(),
            bundle: req.bundle.clone(),
            rootfs: req.rootfs.clone(),
            io: MessageField::some(TaskIO {
                stdin: req.stdin.clone(),
                stdout: req.stdout.clone(),
                stderr: req.stderr.clone(),
                terminal: req.terminal,
                ..Default::default()
            }),
            pid,
            ..Default::default()
        };
        self.publish(topics::TASK_CREATE_EVENT_TOPIC, Box::new(event))
            .await;
        log::info!(
            "created {id} in {:.1} ms",
            started.elapsed().as_secs_f64() * 1e3
        );
        Ok(api::CreateTaskResponse {
            pid,
            ..Default::default()
        })
    }

    async fn start(
        &self,
        _ctx: &TtrpcContext,
        req: api::StartRequest,
    ) -> TtrpcResult<api::StartResponse> {
        let started = Instant::now();
        let (id, exec_id) = (req.id.clone(), req.exec_id.clone());
        let (sandbox, stdio) = self.with_process(&id, &exec_id, |c, p| {
            let sandbox = c.sandbox;
            let p = p.unwrap_or(&mut c.init);
            if p.started {
                return Err(status(
                    Code::FAILED_PRECONDITION,
                    format!("{id} already started"),
                ));
            }
            Ok((sandbox, p.stdio.clone()))
        })?;
        let pid = if sandbox {
            std::process::id()
        } else {
            let pod = self.pod()?;
            let (pod2, namespace, key) = (
                pod.clone(),
                self.namespace.clone(),
                ContainerRef {
                    id: id.clone(),
                    exec_id: exec_id.clone(),
                },
            );
            let (pid, bridged) = blocking(move || {
                // containerd may never open a stdin it passed: the copy waits,
                // without keeping the VM alive.
                let close_pod = Arc::downgrade(&pod2);
                let close_key = key.clone();
                let owner = (key.id.as_str(), namespace.as_str());
                let bridged = bridge(pod2.vsock_path(), &key.key(), owner, &stdio, move || {
                    if let Some(pod) = close_pod.upgrade() {
                        let _ = pod.call(request::Body::CloseStdin(close_key));
                    }
                })
                .map_err(|e| status(Code::INVALID_ARGUMENT, e.to_string()))?;
                match pod2
                    .call(request::Body::StartContainer(key))
                    .map_err(pod_error)?
                {
                    response::Body::Started(s) => Ok((s.pid, bridged)),
                    other => Err(unexpected(&other)),
                }
            })
            .await?;
            let mut streams = bridged.streams;
            self.with_process(&id, &exec_id, |c, p| {
                let p = p.unwrap_or(&mut c.init);
                p.pid = pid;
                p.started = true;
                Ok(())
            })?;
            // Published before the waiter can publish the exit.
            self.publish_start(&id, &exec_id, pid).await;
            streams.extend(self.spawn_waiter(&pod, id.clone(), exec_id.clone(), bridged.outputs));
            let _ = self.with_process(&id, &exec_id, |c, p| {
                p.unwrap_or(&mut c.init).streams = streams;
                Ok(())
            });
            pid
        };
        if sandbox {
            self.with_process(&id, &exec_id, |c, _| {
                c.init.pid = pid;
                c.init.started = true;
                Ok(())
            })?;
            self.publish_start(&id, &exec_id, pid).await;
        }
        log::info!(
            "started {id} {exec_id} in {:.1} ms",
            started.elapsed().as_secs_f64() * 1e3
        );
        Ok(api::StartResponse {
            pid,
            ..Default::default()
        })
    }

    async fn delete(
        &self,
        _ctx: &TtrpcContext,
        req: api::DeleteRequest,
    ) -> TtrpcResult<api::DeleteResponse> {
        let (id, exec_id) = (req.id.clone(), req.exec_id.clone());
        let (pid, exit, sandbox, bundle) = self.with_process(&id, &exec_id, |c, p| {
            let sandbox = c.sandbox;
            let bundle = c.bundle.clone();
            let p = p.unwrap_or(&mut c.init);
            if p.started && p.exit().is_none() {
                return Err(status(
                    Code::FAILED_PRECONDITION,
                    format!("{id} is running: kill it first"),
                ));
            }
            Ok((p.pid, p.exit(), sandbox, bundle))
        })?;
        if !sandbox {
            if let Ok(pod) = self.pod() {
                let key = ContainerRef {
                    id: id.clone(),
                    exec_id: exec_id.clone(),
                };
                let _ = blocking(move || Ok(pod.call(request::Body::RemoveContainer(key)))).await;
            }
        }
        let exit = exit.unwrap_or(Exit {
            status: 0,
            at_ns: 0,
        });
        let exited_at = MessageField::some(timestamp_ns(exit.at_ns));
        let last = {
            let mut state = self.state.lock().expect("state lock");
            if exec_id.is_empty() {
                state.containers.remove(&id);
            } else if let Some(c) = state.containers.get_mut(&id) {
                c.execs.remove(&exec_id);
            }
            state.containers.is_empty()
        };
        log::info!("removed {id} {exec_id} from the VM");
        if exec_id.is_empty() {
            unmount(&Path::new(&bundle).join("rootfs"));
            let _ = std::fs::remove_file(Path::new(&bundle).join(RUN_DIR_FILE));
            let event = TaskDelete {
                container_id: id.clone(),
                pid,
                exit_status: exit.status,
                exited_at: exited_at.clone(),
                id: id.clone(),
                ..Default::default()
            };
            self.publish(topics::TASK_DELETE_EVENT_TOPIC, Box::new(event))
                .await;
        }
        if last {
            self.teardown_if_idle().await;
        }
        Ok(api::DeleteResponse {
            pid,
            exit_status: exit.status,
            exited_at,
            ..Default::default()
        })
    }

    async fn state(
        &self,
        _ctx: &TtrpcContext,
        req: api::StateRequest,
    ) -> TtrpcResult<api::StateResponse> {
        self.with_process(&req.id, &req.exec_id, |c, p| {
            let bundle = c.bundle.clone();
            let p = p.unwrap_or(&mut c.init);
            let exit = p.exit();
            Ok(api::StateResponse {
                id: if req.exec_id.is_empty() {
                    req.id.clone()
                } else {
                    req.exec_id.clone()
                },
                bundle,
                pid: p.pid,
                status: p.status().into(),
                stdin: p.stdio.stdin.clone(),
                stdout: p.stdio.stdout.clone(),
                stderr: p.stdio.stderr.clone(),
                terminal: p.stdio.terminal,
                exit_status: exit.map_or(0, |e| e.status),
                exited_at: exit.map_or_else(MessageField::none, |e| {
                    MessageField::some(timestamp_ns(e.at_ns))
                }),
                exec_id: req.exec_id.clone(),
                ..Default::default()
            })
        })
    }

    async fn wait(
        &self,
        _ctx: &TtrpcContext,
        req: api::WaitRequest,
    ) -> TtrpcResult<api::WaitResponse> {
        let mut rx = self.with_process(&req.id, &req.exec_id, |c, p| {
            Ok(p.unwrap_or(&mut c.init).exit_tx.subscribe())
        })?;
        let exit = loop {
            if let Some(e) = *rx.borrow_and_update() {
                break e;
            }
            if rx.changed().await.is_err() {
                return Err(status(Code::NOT_FOUND, "the process was deleted"));
            }
        };
        Ok(api::WaitResponse {
            exit_status: exit.status,
            exited_at: MessageField::some(timestamp_ns(exit.at_ns)),
            ..Default::default()
        })
    }

    async fn kill(&self, _ctx: &TtrpcContext, req: api::KillRequest) -> TtrpcResult<api::Empty> {
        let (id, exec_id) = (req.id.clone(), req.exec_id.clone());
        let (sandbox, exited, started) = self.with_process(&id, &exec_id, |c, p| {
            let sandbox = c.sandbox;
            let p = p.unwrap_or(&mut c.init);
            Ok((sandbox, p.exit().is_some(), p.started))
        })?;
        if exited {
            return Err(status(Code::NOT_FOUND, "process already finished"));
        }
        if sandbox || !started {
            // The pause container (or a process never started) ends by the signal.
            let exit = Exit {
                status: 128 + req.signal,
                at_ns: SystemTime::now()
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos() as u64),
            };
            self.exited(&id, &exec_id, exit).await;
            return Ok(api::Empty::new());
        }
        let pod = self.pod()?;
        let signal = zygote_agent_api::SignalProcess {
            id,
            signal: req.signal as i32,
            exec_id,
        };
        blocking(move || call_empty(&pod, request::Body::SignalProcess(signal))).await?;
        Ok(api::Empty::new())
    }

    async fn exec(
        &self,
        _ctx: &TtrpcContext,
        req: api::ExecProcessRequest,
    ) -> TtrpcResult<api::Empty> {
        let (id, exec_id) = (req.id.clone(), req.exec_id.clone());
        let process_json = req
            .spec
            .as_ref()
            .map(|a| a.value.clone())
            .unwrap_or_default();
        {
            let state = self.state.lock().expect("state lock");
            let c = state
                .containers
                .get(&id)
                .ok_or_else(|| status(Code::NOT_FOUND, format!("container {id} not found")))?;
            if c.execs.contains_key(&exec_id) {
                return Err(status(
                    Code::ALREADY_EXISTS,
                    format!("exec {exec_id} exists"),
                ));
            }
            if c.sandbox {
                return Err(status(
                    Code::FAILED_PRECONDITION,
                    "the pod's sandbox container runs nothing to exec into",
                ));
            }
        }
        let pod = self.pod()?;
        let (id2, exec2) = (id.clone(), exec_id.clone());
        blocking(move || {
            call_empty(
                &pod,
                request::Body::ExecProcess(ExecProcess {
                    id: id2,
                    exec_id: exec2,
                    process_json,
                }),
            )
        })
        .await?;
        let stdio = StdioPaths {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        if let Some(c) = self
            .state
            .lock()
            .expect("state lock")
            .containers
            .get_mut(&id)
        {
            c.execs.insert(exec_id.clone(), Process::new(stdio));
        }
        let event = TaskExecAdded {
            container_id: id,
            exec_id,
            ..Default::default()
        };
        self.publish(topics::TASK_EXEC_ADDED_EVENT_TOPIC, Box::new(event))
            .await;
        Ok(api::Empty::new())
    }

    async fn resize_pty(
        &self,
        _ctx: &TtrpcContext,
        req: api::ResizePtyRequest,
    ) -> TtrpcResult<api::Empty> {
        self.with_process(&req.id, &req.exec_id, |_, _| Ok(()))?;
        let service = self.clone();
        blocking(move || {
            service.agent_empty(request::Body::ResizeTty(zygote_agent_api::ResizeTty {
                id: req.id,
                exec_id: req.exec_id,
                width: req.width,
                height: req.height,
            }))
        })
        .await?;
        Ok(api::Empty::new())
    }

    async fn close_io(
        &self,
        _ctx: &TtrpcContext,
        req: api::CloseIORequest,
    ) -> TtrpcResult<api::Empty> {
        self.with_process(&req.id, &req.exec_id, |_, _| Ok(()))?;
        if req.stdin {
            let service = self.clone();
            blocking(move || {
                service.agent_empty(request::Body::CloseStdin(ContainerRef {
                    id: req.id,
                    exec_id: req.exec_id,
                }))
            })
            .await?;
        }
        Ok(api::Empty::new())
    }

    async fn pids(
        &self,
        _ctx: &TtrpcContext,
        req: api::PidsRequest,
    ) -> TtrpcResult<api::PidsResponse> {
        let sandbox = self.with_process(&req.id, "", |c, _| Ok(c.sandbox))?;
        if sandbox {
            return Ok(api::PidsResponse {
                processes: vec![api::ProcessInfo {
                    pid: std::process::id(),
                    ..Default::default()
                }],
                ..Default::default()
            });
        }
        let pod = self.pod()?;
        let key = ContainerRef {
            id: req.id,
            exec_id: String::new(),
        };
        let pids =
            blocking(
                move || match pod.call(request::Body::ListPids(key)).map_err(pod_error)? {
                    response::Body::Pids(p) => Ok(p.pids),
                    other => Err(unexpected(&other)),
                },
            )
            .await?;
        Ok(api::PidsResponse {
            processes: pids
                .into_iter()
                .map(|pid| api::ProcessInfo {
                    pid,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        })
    }

    async fn stats(
        &self,
        _ctx: &TtrpcContext,
        req: api::StatsRequest,
    ) -> TtrpcResult<api::StatsResponse> {
        use containerd_shim_protos::cgroups_v2::metrics::{
            CPUStat, MemoryEvents, MemoryStat, Metrics, PidsStat,
        };
        let sandbox = self.with_process(&req.id, "", |c, _| Ok(c.sandbox))?;
        let s = if sandbox {
            zygote_agent_api::ContainerStats::default()
        } else {
            let pod = self.pod()?;
            let key = ContainerRef {
                id: req.id,
                exec_id: String::new(),
            };
            blocking(
                move || match pod.call(request::Body::Stats(key)).map_err(pod_error)? {
                    response::Body::Stats(s) => Ok(s),
                    other => Err(unexpected(&other)),
                },
            )
            .await?
        };
        let limit = |v: u64| if v == u64::MAX { 0 } else { v };
        let metrics = Metrics {
            pids: MessageField::some(PidsStat {
                current: s.pids_current,
                ..Default::default()
            }),
            cpu: MessageField::some(CPUStat {
                usage_usec: s.cpu_usage_usec,
                ..Default::default()
            }),
            memory: MessageField::some(MemoryStat {
                usage: s.memory_current,
                usage_limit: limit(s.memory_max),
                ..Default::default()
            }),
            memory_events: MessageField::some(MemoryEvents {
                oom_kill: s.oom_kills,
                ..Default::default()
            }),
            ..Default::default()
        };
        let any = Any::pack(&metrics).map_err(internal)?;
        // containerd looks the type up by its proto name.
        let any = Any {
            type_url: "io.containerd.cgroups.v2.Metrics".into(),
            value: any.value,
            ..Default::default()
        };
        Ok(api::StatsResponse {
            stats: MessageField::some(any),
            ..Default::default()
        })
    }

    async fn update(
        &self,
        _ctx: &TtrpcContext,
        req: api::UpdateTaskRequest,
    ) -> TtrpcResult<api::Empty> {
        let resources_json = req
            .resources
            .as_ref()
            .map(|a| a.value.clone())
            .unwrap_or_default();
        self.with_process(&req.id, "", |_, _| Ok(()))?;
        let service = self.clone();
        blocking(move || {
            service.agent_empty(request::Body::UpdateResources(
                zygote_agent_api::UpdateResources {
                    id: req.id,
                    resources_json,
                },
            ))
        })
        .await?;
        Ok(api::Empty::new())
    }

    async fn connect(
        &self,
        _ctx: &TtrpcContext,
        req: api::ConnectRequest,
    ) -> TtrpcResult<api::ConnectResponse> {
        let pid = self
            .with_process(&req.id, "", |c, _| Ok(c.init.pid))
            .unwrap_or(0);
        Ok(api::ConnectResponse {
            shim_pid: std::process::id(),
            task_pid: pid,
            version: env!("CARGO_PKG_VERSION").into(),
            ..Default::default()
        })
    }

    async fn shutdown(
        &self,
        _ctx: &TtrpcContext,
        _req: api::ShutdownRequest,
    ) -> TtrpcResult<api::Empty> {
        if self.state.lock().expect("state lock").containers.is_empty() {
            self.teardown_if_idle().await;
            self.exit.signal();
        }
        Ok(api::Empty::new())
    }

    async fn pause(&self, _ctx: &TtrpcContext, _req: api::PauseRequest) -> TtrpcResult<api::Empty> {
        Err(status(
            Code::UNIMPLEMENTED,
            "zygote does not pause tasks yet",
        ))
    }

    async fn resume(
        &self,
        _ctx: &TtrpcContext,
        _req: api::ResumeRequest,
    ) -> TtrpcResult<api::Empty> {
        Err(status(
            Code::UNIMPLEMENTED,
            "zygote does not pause tasks yet",
        ))
    }

    async fn checkpoint(
        &self,
        _ctx: &TtrpcContext,
        _req: api::CheckpointTaskRequest,
    ) -> TtrpcResult<api::Empty> {
        Err(status(
            Code::UNIMPLEMENTED,
            "zygote does not checkpoint tasks",
        ))
    }
}

impl TaskService {
    async fn publish_start(&self, id: &str, exec_id: &str, pid: u32) {
        if exec_id.is_empty() {
            let event = TaskStart {
                container_id: id.into(),
                pid,
                ..Default::default()
            };
            self.publish(topics::TASK_START_EVENT_TOPIC, Box::new(event))
                .await;
        } else {
            let event = TaskExecStarted {
                container_id: id.into(),
                exec_id: exec_id.into(),
                pid,
                ..Default::default()
            };
            self.publish(topics::TASK_EXEC_STARTED_EVENT_TOPIC, Box::new(event))
                .await;
        }
    }
}
