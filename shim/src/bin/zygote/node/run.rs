//! `zygote node run`, the DaemonSet's process: install, warm, mark the node
//! ready; on SIGTERM (the pod deleted: `helm uninstall`, a node drained, an
//! upgrade) take the mark off and uninstall, in that order, so that the
//! scheduler sends no zygote pod to a node on its way out.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use k8s_cri::v1 as cri;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use zygote::node;

use super::{InstallArgs, cri_channel};
use crate::kube::{Kube, Taint};

/// The label a node carries once zygote pods may run there (the
/// RuntimeClass's `scheduling.nodeSelector`).
pub const READY_LABEL: &str = "zygote.dev/ready";

/// Where `run` says it made the node ready, in its own file system (the
/// readiness probe, `zygote node ready`, looks there).
const READY_MARK: &str = "/run/zygote-node-ready";

#[derive(Args, Clone)]
pub struct RunArgs {
    /// The Node to label (a DaemonSet passes spec.nodeName).
    #[arg(long)]
    node_name: String,
    /// A taint the node may start with, removed once it is ready
    /// (KEY:EFFECT; repeatable).
    #[arg(long = "startup-taint")]
    startup_taints: Vec<Taint>,
    /// An image whose template is built before the node is marked ready
    /// (pulled through containerd's CRI; repeatable).
    #[arg(long = "warm-image")]
    warm_images: Vec<String>,
    /// Seconds the whole warm-up may take.
    #[arg(long, default_value_t = 1800)]
    warm_timeout: u64,
    /// The CRI handler zygote is registered as.
    #[arg(long, default_value = "zygote")]
    runtime_handler: String,
    /// The Kubernetes API server (default: the cluster's, from the pod's
    /// environment).
    #[arg(long)]
    kube_api: Option<String>,
    /// A bearer token file for the API (default: the pod's service account).
    #[arg(long)]
    kube_token_file: Option<PathBuf>,
}

/// Exit 0 when the node was made ready by `run` (and not unmade since).
pub fn ready() -> ExitCode {
    if Path::new(READY_MARK).exists() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

pub fn run(
    install: &InstallArgs,
    args: &RunArgs,
    do_install: impl Fn(&InstallArgs) -> anyhow::Result<node::Report>,
) -> anyhow::Result<ExitCode> {
    let _ = std::fs::remove_file(READY_MARK);
    // Signals are taken before any change: a SIGTERM during the install or
    // the warm-up still leads to the uninstall below.
    let signals = Signals::block()?;
    let kube = Kube::new(args.kube_api.as_deref(), args.kube_token_file.as_deref())?;
    let report = do_install(install)?;
    println!("{}", serde_json::to_string(&report)?);
    if report.containerd_config_changed && !report.restarted {
        anyhow::bail!(
            "containerd's config changed but containerd was not restarted (--restart none): \
             the node cannot serve zygote pods"
        );
    }

    let started = Instant::now();
    let deadline = started + Duration::from_secs(args.warm_timeout);
    for image in &args.warm_images {
        if signals.pending() {
            break;
        }
        warm(
            &install.node.socket(),
            &args.runtime_handler,
            image,
            deadline,
        )
        .with_context(|| format!("warming {image}"))?;
        eprintln!(
            "warm: {image} ({:.1} s so far)",
            started.elapsed().as_secs_f64()
        );
    }

    if !signals.pending() {
        let changed = kube.mark(
            &args.node_name,
            READY_LABEL,
            Some("true"),
            &args.startup_taints,
        )?;
        std::fs::write(READY_MARK, b"ready\n")?;
        eprintln!(
            "node {} ready ({} the label {READY_LABEL}=true{})",
            args.node_name,
            if changed { "set" } else { "already had" },
            if args.startup_taints.is_empty() {
                String::new()
            } else {
                ", startup taints removed".into()
            }
        );
    }

    let signal = signals.wait();
    eprintln!(
        "signal {signal}: unmarking node {} and uninstalling",
        args.node_name
    );
    let _ = std::fs::remove_file(READY_MARK);
    kube.mark(&args.node_name, READY_LABEL, None, &[])?;
    let report = node::uninstall(&install.node.options()?)?;
    println!("{}", serde_json::to_string(&report)?);
    Ok(ExitCode::SUCCESS)
}

/// Builds `image`'s template as a pod would: pulls it through the CRI,
/// runs a pod sandbox with `handler` on the node's network and creates a
/// container of the image in it (which forks the pod's VM from the
/// image's template, building it when missing), then removes the pod. The
/// container is never started: no code of the image runs.
fn warm(socket: &Path, handler: &str, image: &str, deadline: Instant) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let left = deadline.saturating_duration_since(Instant::now());
    runtime.block_on(async {
        tokio::time::timeout(left, async {
            let channel = cri_channel(socket).await?;
            let mut images = ImageServiceClient::new(channel.clone());
            let mut pods = RuntimeServiceClient::new(channel);
            let spec = cri::ImageSpec {
                image: image.into(),
                ..Default::default()
            };
            // As kubelet's IfNotPresent: an image the node has is not
            // pulled again.
            let present = images
                .image_status(cri::ImageStatusRequest {
                    image: Some(spec.clone()),
                    verbose: false,
                })
                .await
                .context("ImageStatus")?
                .into_inner()
                .image
                .is_some();
            if !present {
                images
                    .pull_image(cri::PullImageRequest {
                        image: Some(spec.clone()),
                        ..Default::default()
                    })
                    .await
                    .context("PullImage")?;
            }
            let uid = format!("zygote-warmup-{}", std::process::id());
            let config =
                zygote::cri_client::host_network_pod("zygote-warmup", &uid, "zygote-system");
            let pod = pods
                .run_pod_sandbox(cri::RunPodSandboxRequest {
                    config: Some(config.clone()),
                    runtime_handler: handler.into(),
                })
                .await
                .context("RunPodSandbox")?
                .into_inner()
                .pod_sandbox_id;
            let created = pods
                .create_container(cri::CreateContainerRequest {
                    pod_sandbox_id: pod.clone(),
                    config: Some(cri::ContainerConfig {
                        metadata: Some(cri::ContainerMetadata {
                            name: "warmup".into(),
                            attempt: 0,
                        }),
                        image: Some(spec),
                        ..Default::default()
                    }),
                    sandbox_config: Some(config),
                })
                .await
                .context("CreateContainer");
            let stopped = pods
                .stop_pod_sandbox(cri::StopPodSandboxRequest {
                    pod_sandbox_id: pod.clone(),
                })
                .await;
            let removed = pods
                .remove_pod_sandbox(cri::RemovePodSandboxRequest {
                    pod_sandbox_id: pod.clone(),
                })
                .await;
            created?;
            stopped.context("StopPodSandbox")?;
            removed.context("RemovePodSandbox")?;
            anyhow::Ok(())
        })
        .await
        .map_err(|_| anyhow::anyhow!("the warm-up did not finish in time"))?
    })
}

/// SIGTERM and SIGINT, blocked in every thread and taken when asked for.
struct Signals(libc::sigset_t);

impl Signals {
    fn block() -> anyhow::Result<Signals> {
        // SAFETY: a sigset on the stack, filled by sigemptyset/sigaddset,
        // and this thread's mask (threads started later inherit it).
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGTERM);
            libc::sigaddset(&mut set, libc::SIGINT);
            let rc = libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
            if rc != 0 {
                anyhow::bail!(
                    "blocking SIGTERM: {}",
                    std::io::Error::from_raw_os_error(rc)
                );
            }
            Ok(Signals(set))
        }
    }

    /// Whether one is waiting (not taken).
    fn pending(&self) -> bool {
        // SAFETY: sigpending fills a sigset we own.
        unsafe {
            let mut pending: libc::sigset_t = std::mem::zeroed();
            libc::sigpending(&mut pending);
            libc::sigismember(&pending, libc::SIGTERM) == 1
                || libc::sigismember(&pending, libc::SIGINT) == 1
        }
    }

    /// Waits for one; its number.
    fn wait(&self) -> i32 {
        let mut signal = 0;
        // SAFETY: sigwait on the set blocked above.
        unsafe { libc::sigwait(&self.0, &mut signal) };
        signal
    }
}
