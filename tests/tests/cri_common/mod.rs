//! What the CRI tests share: a client connected to containerd's CRI, pod
//! and container requests, and the checks and clean-up around a pod.

#![allow(dead_code, reason = "each test file uses its own part")]

use std::time::{Duration, Instant};

use k8s_cri::v1 as cri;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use tonic::transport::{Channel, Endpoint, Uri};
use zygote_tests::{PvmSegv, vm_lock};

use zygote_tests::{containerd_socket as socket, test_image as image};

pub async fn connect() -> Option<Channel> {
    let path = socket();
    if !path.exists() {
        let msg = format!(
            "no containerd at {}: run hack/containerd (hack/test does)",
            path.display()
        );
        if std::env::var_os("ZYGOTE_ALLOW_SKIP").is_some_and(|v| v == "1") {
            eprintln!("SKIP: {msg}");
            return None;
        }
        panic!("{msg}");
    }
    let channel = Endpoint::try_from("http://[::]:50051")
        .unwrap()
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(path).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
            }
        }))
        .await
        .expect("connect to the CRI");
    Some(channel)
}

/// A host-network pod named `name` (attempt `attempt`) logging to a fresh
/// directory; its config and that directory.
pub fn pod_config(name: &str, attempt: u32) -> (cri::PodSandboxConfig, std::path::PathBuf) {
    let logs = std::env::temp_dir().join(format!(
        "zygote-cri-{name}-{}-{attempt}",
        std::process::id()
    ));
    std::fs::create_dir_all(&logs).unwrap();
    let config = cri::PodSandboxConfig {
        metadata: Some(cri::PodSandboxMetadata {
            name: name.into(),
            uid: format!("{name}-{}-{attempt}", std::process::id()),
            namespace: "default".into(),
            attempt: 0,
        }),
        hostname: name.into(),
        log_directory: logs.to_string_lossy().into(),
        linux: Some(cri::LinuxPodSandboxConfig {
            security_context: Some(cri::LinuxSandboxSecurityContext {
                // Host network (cri_network.rs runs pods on the CNI network);
                // the pod's IPC, a PID namespace per container (as kubelet
                // asks without `shareProcessNamespace`).
                namespace_options: Some(cri::NamespaceOption {
                    network: cri::NamespaceMode::Node as i32,
                    pid: cri::NamespaceMode::Container as i32,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    };
    (config, logs)
}

/// `config` on the pod network (CNI), with `port_mappings` (hostPort, via
/// CNI's portmap).
pub fn on_pod_network(
    mut config: cri::PodSandboxConfig,
    port_mappings: Vec<cri::PortMapping>,
) -> cri::PodSandboxConfig {
    if let Some(ns) = config
        .linux
        .as_mut()
        .and_then(|l| l.security_context.as_mut())
        .and_then(|s| s.namespace_options.as_mut())
    {
        ns.network = cri::NamespaceMode::Pod as i32;
    }
    config.port_mappings = port_mappings;
    config
}

/// Runs pod `config` with runtime `handler` ("" is containerd's default, runc); its id.
pub async fn run_pod_with(
    runtime: &mut RuntimeServiceClient<Channel>,
    config: &cri::PodSandboxConfig,
    handler: &str,
) -> String {
    runtime
        .run_pod_sandbox(cri::RunPodSandboxRequest {
            config: Some(config.clone()),
            runtime_handler: handler.into(),
        })
        .await
        .expect("RunPodSandbox")
        .into_inner()
        .pod_sandbox_id
}

/// The pod's IP and its network namespace's path, from PodSandboxStatus.
pub async fn pod_network(
    runtime: &mut RuntimeServiceClient<Channel>,
    pod: &str,
) -> (String, Option<String>) {
    let status = runtime
        .pod_sandbox_status(cri::PodSandboxStatusRequest {
            pod_sandbox_id: pod.into(),
            verbose: true,
        })
        .await
        .expect("PodSandboxStatus")
        .into_inner();
    let ip = status
        .status
        .and_then(|s| s.network)
        .map(|n| n.ip)
        .unwrap_or_default();
    let netns = status.info.get("info").and_then(|info| {
        let v: serde_json::Value = serde_json::from_str(info).ok()?;
        v["runtimeSpec"]["linux"]["namespaces"]
            .as_array()?
            .iter()
            .find(|n| n["type"] == "network")?["path"]
            .as_str()
            .map(String::from)
    });
    (ip, netns)
}

/// Stops and removes pods named `prefix…` that an earlier, failed run left
/// in containerd (a failed test kills its shim but cannot call the CRI
/// while unwinding): their CNI state (addresses, hostPort rules) would
/// otherwise stay.
pub async fn remove_stale_pods(runtime: &mut RuntimeServiceClient<Channel>, prefix: &str) {
    let pods = runtime
        .list_pod_sandbox(cri::ListPodSandboxRequest { filter: None })
        .await
        .expect("ListPodSandbox")
        .into_inner()
        .items;
    for pod in pods {
        if pod
            .metadata
            .as_ref()
            .is_some_and(|m| m.name.starts_with(prefix))
        {
            eprintln!("removing pod {} left by an earlier run", pod.id);
            if let Err(e) = stop_and_remove(runtime, &pod.id).await {
                eprintln!("pod {}: {e:?}", pod.id);
            }
        }
    }
}

/// ExecSync `script` with `sh -c`: exit code and stdout.
pub async fn exec_sh(
    runtime: &mut RuntimeServiceClient<Channel>,
    container: &str,
    script: &str,
) -> (i32, String) {
    let out = runtime
        .exec_sync(cri::ExecSyncRequest {
            container_id: container.into(),
            cmd: vec!["sh".into(), "-c".into(), script.into()],
            timeout: 120,
        })
        .await
        .expect("ExecSync")
        .into_inner();
    (
        out.exit_code,
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// ExecSync `script` that must exit 0; its output. Err on the PVM fault's
/// signature (its exit status SIGSEGV).
pub async fn exec_ok(
    runtime: &mut RuntimeServiceClient<Channel>,
    container: &str,
    script: &str,
) -> Result<String, PvmSegv> {
    let (code, out) = exec_sh(runtime, container, script).await;
    PvmSegv::check(code.into(), || format!("ExecSync {script:?}"))?;
    assert_eq!(code, 0, "{script:?}: {out}");
    Ok(out)
}

/// CreateContainer for container `name` of the test image in `pod`,
/// running `command`, logging to `<name>.log`.
pub fn container_request(
    pod: &str,
    pod_config: &cri::PodSandboxConfig,
    name: &str,
    command: &[&str],
) -> cri::CreateContainerRequest {
    cri::CreateContainerRequest {
        pod_sandbox_id: pod.into(),
        config: Some(cri::ContainerConfig {
            metadata: Some(cri::ContainerMetadata {
                name: name.into(),
                attempt: 0,
            }),
            image: Some(cri::ImageSpec {
                image: image(),
                ..Default::default()
            }),
            command: command.iter().map(|s| s.to_string()).collect(),
            log_path: format!("{name}.log"),
            // The pod's namespace options, as kubelet gives each container.
            linux: Some(cri::LinuxContainerConfig {
                security_context: Some(cri::LinuxContainerSecurityContext {
                    namespace_options: pod_config
                        .linux
                        .as_ref()
                        .and_then(|l| l.security_context.as_ref())
                        .and_then(|s| s.namespace_options.clone()),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
        sandbox_config: Some(pod_config.clone()),
    }
}

/// Creates and starts a container; its id.
pub async fn run_container(
    runtime: &mut RuntimeServiceClient<Channel>,
    request: cri::CreateContainerRequest,
) -> String {
    let container = runtime
        .create_container(request)
        .await
        .expect("CreateContainer")
        .into_inner()
        .container_id;
    runtime
        .start_container(cri::StartContainerRequest {
            container_id: container.clone(),
        })
        .await
        .expect("StartContainer");
    container
}

/// Runs pod `config` with the handler `zygote`; its id.
pub async fn run_pod(
    runtime: &mut RuntimeServiceClient<Channel>,
    config: &cri::PodSandboxConfig,
) -> String {
    run_pod_with(runtime, config, "zygote").await
}

/// Kills the pod's shim (and so its VM) if the test fails before removing
/// the pod: nothing keeps running after a failed test.
pub struct PodGuard(pub String);

impl Drop for PodGuard {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let _ = std::process::Command::new("pkill")
                .args([
                    "-9",
                    "-f",
                    &format!("containerd-shim-zygote-v2 .*-id {} ", self.0),
                ])
                .status();
        }
    }
}

pub fn shim_running(pod: &str) -> bool {
    std::process::Command::new("pgrep")
        .args(["-f", &format!("containerd-shim-zygote-v2 .*-id {pod} ")])
        .stdout(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Runs a CRI test's `body` with a connection to containerd's CRI, holding
/// the VM lock (returns at once when containerd is absent and skipping is
/// allowed).
pub fn cri_test<F, Fut>(body: F)
where
    F: FnOnce(Channel) -> Fut,
    Fut: Future<Output = ()>,
{
    let _vm = vm_lock();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        if let Some(channel) = connect().await {
            body(channel).await;
        }
    });
}

/// Runs `round` (given its attempt number) until it passes: a round whose
/// container's or exec's own exit status was SIGSEGV (the PVM guest fault,
/// docs/guest-kernel.md) runs again with a new pod, counted
/// ([`zygote_tests::may_retry`]); any other failure panics in the round.
pub async fn until_passed<Fut>(mut round: impl FnMut(u32) -> Fut)
where
    Fut: Future<Output = Result<(), PvmSegv>>,
{
    for attempt in 0.. {
        match round(attempt).await {
            Ok(()) => return,
            Err(segv) if zygote_tests::may_retry(&segv, attempt) => {}
            Err(segv) => panic!("{} (exit status SIGSEGV)", segv.what),
        }
    }
}

/// The container's exit code, if ContainerStatus says it exited.
pub async fn container_exit_code(
    runtime: &mut RuntimeServiceClient<Channel>,
    container: &str,
) -> Option<i32> {
    let status = runtime
        .container_status(cri::ContainerStatusRequest {
            container_id: container.into(),
            verbose: false,
        })
        .await
        .ok()?
        .into_inner()
        .status?;
    (status.state == cri::ContainerState::ContainerExited as i32).then_some(status.exit_code)
}

/// The container's status once it exited and `also` holds of it (the OOM
/// reason can follow the exit); panics after 120 s.
pub async fn exited(
    runtime: &mut RuntimeServiceClient<Channel>,
    container: &str,
    also: impl Fn(&cri::ContainerStatus) -> bool,
) -> cri::ContainerStatus {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let status = runtime
            .container_status(cri::ContainerStatusRequest {
                container_id: container.into(),
                verbose: false,
            })
            .await
            .expect("ContainerStatus")
            .into_inner()
            .status
            .expect("a status");
        if status.state == cri::ContainerState::ContainerExited as i32 && also(&status) {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "not exited as expected: {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// StopPodSandbox, then RemovePodSandbox.
async fn stop_and_remove(
    runtime: &mut RuntimeServiceClient<Channel>,
    pod: &str,
) -> Result<(), tonic::Status> {
    runtime
        .stop_pod_sandbox(cri::StopPodSandboxRequest {
            pod_sandbox_id: pod.into(),
        })
        .await?;
    runtime
        .remove_pod_sandbox(cri::RemovePodSandboxRequest {
            pod_sandbox_id: pod.into(),
        })
        .await?;
    Ok(())
}

/// Stops and removes the pod; its shim goes with it.
pub async fn remove_pod(runtime: &mut RuntimeServiceClient<Channel>, pod: &str) {
    stop_and_remove(runtime, pod)
        .await
        .expect("StopPodSandbox, RemovePodSandbox");
    let deadline = Instant::now() + Duration::from_secs(30);
    while shim_running(pod) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(!shim_running(pod), "the pod's shim is gone");
}

/// The pod's shim's pid.
pub fn shim_pid(pod: &str) -> Option<u32> {
    shim_pid_of("containerd-shim-zygote-v2", pod)
}

/// The pid of the shim `binary` serving `pod` (its `-id POD` argument).
pub fn shim_pid_of(binary: &str, pod: &str) -> Option<u32> {
    let out = std::process::Command::new("pgrep")
        .args(["-f", &format!("{binary} .*-id {pod}( |$)")])
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// VM run directories of process `pid`.
pub fn run_dirs_of(pid: u32) -> usize {
    let prefix = format!("vm-{pid}-");
    std::fs::read_dir(zygote::paths::run_root())
        .map(|rd| {
            rd.flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
                .count()
        })
        .unwrap_or(0)
}

/// Links whose name starts with `prefix` in the host's namespace.
pub fn host_links(prefix: &str) -> Vec<String> {
    std::fs::read_dir("/sys/class/net")
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(prefix))
        .collect()
}

/// Whether a pod whose name starts with `prefix` is listed.
pub async fn pod_listed(runtime: &mut RuntimeServiceClient<Channel>, prefix: &str) -> bool {
    runtime
        .list_pod_sandbox(cri::ListPodSandboxRequest { filter: None })
        .await
        .expect("ListPodSandbox")
        .into_inner()
        .items
        .iter()
        .any(|p| {
            p.metadata
                .as_ref()
                .is_some_and(|m| m.name.starts_with(prefix))
        })
}
