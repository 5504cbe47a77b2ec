//! The shim process: containerd's `start` (one shim per pod: a container
//! joins its pod's shim), `delete` after a shim died, and serving the Task
//! service (see `task/`) until the pod's last task is gone.

use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use containerd_shim::asynchronous::{ExitSignal, Shim, spawn};
use containerd_shim::publisher::RemotePublisher;
use containerd_shim::{Config, Error as ShimError, Flags, StartOpts};
use containerd_shim_protos::api;
use containerd_shim_protos::protobuf::MessageField;
use containerd_shim_protos::protobuf::well_known_types::any::Any;
use containerd_shim_protos::shim_async::Task;

use super::bundle;
use super::content::ContainerdApi;
use super::spec;
use super::task::events::now;
use super::task::{Events, TaskService};

/// The shim process.
pub struct ZygoteShim {
    exit: Arc<ExitSignal>,
    id: String,
    namespace: String,
    /// containerd's gRPC socket.
    address: String,
}

impl std::fmt::Debug for ZygoteShim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ZygoteShim")
            .field("id", &self.id)
            .field("namespace", &self.namespace)
            .finish()
    }
}

#[async_trait]
impl Shim for ZygoteShim {
    type T = TaskService;

    async fn new(_runtime_id: &str, args: &Flags, config: &mut Config) -> Self {
        // Our children (mkfs.erofs, umoci) are waited for by us, not reaped behind our back.
        config.no_reaper = true;
        ZygoteShim {
            exit: Arc::new(ExitSignal::default()),
            id: args.id.clone(),
            namespace: args.namespace.clone(),
            address: args.address.clone(),
        }
    }

    async fn start_shim(&mut self, opts: StartOpts) -> Result<String, ShimError> {
        spawn_grouped(opts).await
    }

    async fn delete_shim(&mut self) -> Result<api::DeleteResponse, ShimError> {
        // After a shim died: what it left in this bundle.
        let bundle = std::env::current_dir().unwrap_or_default();
        let cleaned = bundle::cleanup(&bundle);
        let swept = crate::sandbox::sweep_dead_run_dirs();
        tracing::info!(
            "delete {} in {}: cleaned up (VM run dir {:?}; {swept} more of dead shims)",
            self.id,
            self.namespace,
            cleaned.run_dir
        );
        if !cleaned.oom_killed.is_empty() {
            publish_ooms(&self.namespace, &cleaned.oom_killed).await;
        }
        Ok(api::DeleteResponse {
            exit_status: 128 + 9,
            exited_at: MessageField::some(now()),
            ..Default::default()
        })
    }

    async fn wait(&mut self) {
        self.exit.wait().await;
    }

    async fn create_task_service(&self, publisher: RemotePublisher) -> TaskService {
        TaskService::new(
            Events::start(&publisher.address, &self.namespace),
            self.exit.clone(),
            containerd_api(&self.address, &self.namespace),
        )
    }
}

/// The host's OOM killer killed the pod's VM (its cgroup was over the
/// pod's limit): each of its containers gets a TaskOOM, which the VM can no
/// longer send, so that the CRI reports them `OOMKilled`. containerd
/// publishes their exits after this `delete` returns.
async fn publish_ooms(namespace: &str, ids: &[String]) {
    let Ok(address) = std::env::var("TTRPC_ADDRESS") else {
        tracing::warn!("the host OOM-killed the pod's VM; no TTRPC_ADDRESS to report it to");
        return;
    };
    tracing::warn!("the host OOM-killed the pod's VM (its cgroup's limit): {ids:?}");
    let events = Events::start(&address, namespace);
    for id in ids {
        events.publish_oom(id);
    }
    // Within containerd's 5 s for the whole `delete`.
    events.flush(std::time::Duration::from_secs(1)).await;
}

/// containerd's gRPC API as the shim's flags give it (`unix://` or a path).
fn containerd_api(address: &str, namespace: &str) -> Option<ContainerdApi> {
    let path = address.strip_prefix("unix://").unwrap_or(address);
    (!path.is_empty() && !namespace.is_empty()).then(|| ContainerdApi {
        address: path.into(),
        namespace: namespace.into(),
    })
}

/// Starts (or finds) the shim serving `opts.id`'s pod; returns its address.
async fn spawn_grouped(opts: StartOpts) -> Result<String, ShimError> {
    // containerd runs `start` in the bundle: its spec says which pod this is.
    let grouping = std::fs::read("config.json")
        .ok()
        .and_then(|b| spec::parse(&b).ok())
        .map_or_else(|| opts.id.clone(), |s| spec::grouping(&s, &opts.id));
    spawn(opts, &grouping, Vec::new()).await
}

/// The `start` action as containerd 1.6–2.2 expect it: runtime options (a
/// protobuf `Any`) on stdin, the shim's address printed as plain text. (The
/// containerd-shim crate answers in the JSON or bootstrap form of newer
/// containerd, which 1.6 takes for an address.)
pub async fn start_legacy(flags: &Flags) -> Result<String, ShimError> {
    use containerd_shim_protos::protobuf::Message;
    use std::io::{IsTerminal, Read};
    let mut input = Vec::new();
    if !std::io::stdin().is_terminal() {
        let _ = std::io::stdin()
            .lock()
            .take(1 << 20)
            .read_to_end(&mut input);
    }
    let mut opts = StartOpts {
        id: flags.id.clone(),
        publish_binary: flags.publish_binary.clone(),
        address: flags.address.clone(),
        ttrpc_address: std::env::var("TTRPC_ADDRESS").unwrap_or_default(),
        namespace: flags.namespace.clone(),
        debug: flags.debug,
        ..Default::default()
    };
    if let Ok(any) = Any::parse_from_bytes(&input) {
        if !any.type_url.is_empty() {
            opts.extensions.push(as_runc_options(any));
        }
    }
    spawn_grouped(opts).await
}

/// The type containerd's client sends a runtime other than runc for
/// `WithShimCgroup` (and `ctr run`'s task options).
const LEGACY_CREATE_OPTIONS: &str = "containerd.linux.runc.CreateOptions";

/// The runtime options given to `start`, in the form the crate's spawn
/// reads: runc's `Options`, whose `shim_cgroup` puts the new shim in that
/// cgroup (as containerd's own shims do). The legacy `CreateOptions` carries
/// `shim_cgroup` as field 9; anything else passes unchanged.
fn as_runc_options(any: Any) -> Any {
    use containerd_shim_protos::protobuf::CodedInputStream;
    use containerd_shim_protos::protobuf::rt::WireType;
    use containerd_shim_protos::shim::oci::Options;
    if !any.type_url.ends_with(LEGACY_CREATE_OPTIONS) {
        return any;
    }
    let mut options = Options::new();
    let mut input = CodedInputStream::from_bytes(&any.value);
    while let Ok(Some(tag)) = input.read_raw_tag_or_eof() {
        let (field, wire) = (tag >> 3, tag & 7);
        let read = if field == 9 && wire == WireType::LengthDelimited as u32 {
            input
                .read_string()
                .map(|cgroup| options.shim_cgroup = cgroup)
        } else {
            match WireType::new(wire) {
                Some(wire) => input.skip_field(wire),
                None => break,
            }
        };
        if read.is_err() {
            break;
        }
    }
    drop(input);
    Any::pack(&options).unwrap_or(any)
}

/// Serves the Task API on `flags.socket` until shut down. As the crate's
/// bootstrap does, but under both names of the service: containerd 1.x calls
/// `containerd.task.v2.Task`, 2.x `containerd.task.v3.Task` (the same
/// messages). If another shim already serves the socket (a pod's shim that
/// a later container joins), says so in `address` and returns.
pub async fn serve(runtime_id: &str, flags: &Flags) -> Result<(), ShimError> {
    use containerd_shim_protos::shim_async::create_task;
    use containerd_shim_protos::ttrpc::r#async::Server;
    use containerd_shim_protos::ttrpc::r#async::transport::Listener;
    let path = flags
        .socket
        .strip_prefix("unix://")
        .unwrap_or(&flags.socket)
        .to_string();
    if path.is_empty() {
        return Err(ShimError::InvalidArgument(
            "the shim socket is empty".into(),
        ));
    }
    if std::os::unix::net::UnixStream::connect(&path).is_ok() {
        std::fs::write("address", &flags.socket).map_err(|e| ShimError::Other(e.to_string()))?;
        signal_started();
        return Ok(());
    }
    let _ = std::fs::remove_file(&path);
    if let Some(dir) = Path::new(&path).parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    let listener = std::os::unix::net::UnixListener::bind(&path)
        .and_then(|l| zygote_host::sandbox::private(Path::new(&path), 0o600).map(|()| l))
        .map_err(|e| ShimError::Other(format!("listen on {path}: {e}")))?;
    // The bundle's `address` file: a restarted containerd reconnects to the
    // shims it finds there (without it, it takes the shim for dead and
    // deletes its tasks), as Go shims write it.
    std::fs::write("address", &flags.socket)
        .map_err(|e| ShimError::Other(format!("write the bundle's address file: {e}")))?;
    let mut config = Config::default();
    let mut shim = ZygoteShim::new(runtime_id, flags, &mut config).await;
    containerd_shim::logger::init(flags.debug, "info", &flags.namespace, &flags.id)?;
    let ttrpc_address = std::env::var("TTRPC_ADDRESS")
        .map_err(|_| ShimError::InvalidArgument("TTRPC_ADDRESS is not set".into()))?;
    // Run directories of shims that were killed (containerd's `delete`
    // cleans up only bundles it still knows).
    let swept = crate::sandbox::sweep_dead_run_dirs();
    if swept > 0 {
        tracing::info!("removed {swept} run directories of dead shims");
    }
    // Events wait (in order) for containerd's socket if it is away.
    let service = TaskService::new(
        Events::start(&ttrpc_address, &flags.namespace),
        shim.exit.clone(),
        containerd_api(&flags.address, &flags.namespace),
    );
    let task: Arc<dyn Task + Send + Sync> = Arc::new(service.clone());
    let mut services = create_task(task.clone());
    services.extend(
        create_task(task)
            .into_iter()
            .map(|(name, service)| (name.replace(".task.v3.", ".task.v2."), service)),
    );
    let listener = Listener::try_from(listener).map_err(|e| ShimError::Other(e.to_string()))?;
    let mut server = Server::new()
        .add_listener(listener)
        .register_service(services);
    server.start().await?;
    signal_started();
    tracing::info!("zygote shim serving {path}");
    shim.wait().await;
    service.flush_events().await;
    server.shutdown().await.unwrap_or_default();
    let _ = std::fs::remove_file(&path);
    // A VM that could not be stopped cleanly dies with this process; its run
    // directory must not outlive it.
    crate::sandbox::remove_own_run_dirs();
    Ok(())
}

/// Tells `start` (reading our stdout) that the server is up: stdout is
/// replaced by stderr, which closes the pipe.
fn signal_started() {
    // SAFETY: dup2 of the process's own standard descriptors.
    unsafe { libc::dup2(libc::STDERR_FILENO, libc::STDOUT_FILENO) };
}

#[cfg(test)]
mod tests {
    use super::*;
    use containerd_shim_protos::protobuf::Message;
    use containerd_shim_protos::shim::oci::Options;

    /// `WithShimCgroup` for a non-runc runtime: the legacy options' field 9
    /// (after other fields) becomes runc's `shim_cgroup`.
    #[test]
    fn legacy_create_options_give_their_shim_cgroup() {
        let path = b"/containerd/shim";
        // no_pivot_root = true (field 1, varint), empty_namespaces = ["a"]
        // (field 6), shim_cgroup (field 9), io_uid = 7 (field 10).
        let mut value = vec![0x08, 0x01, 0x32, 0x01, b'a', 0x4a, path.len() as u8];
        value.extend_from_slice(path);
        value.extend_from_slice(&[0x50, 0x07]);
        let any = Any {
            type_url: LEGACY_CREATE_OPTIONS.into(),
            value,
            ..Default::default()
        };
        let converted = as_runc_options(any);
        let options = Options::parse_from_bytes(&converted.value).unwrap();
        assert_eq!(options.shim_cgroup, "/containerd/shim");
        assert!(converted.type_url.ends_with("containerd.runc.v1.Options"));
    }

    #[test]
    fn other_options_pass_unchanged() {
        let any = Any {
            type_url: "runtimeoptions.v1.Options".into(),
            value: vec![0x0a, 0x01, b'x'],
            ..Default::default()
        };
        assert_eq!(as_runc_options(any.clone()), any);
    }
}
