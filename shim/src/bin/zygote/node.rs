//! `zygote node install | uninstall | status | run | ready`: zygote on a
//! node, against its root (`--host-root`, `/` by default; a DaemonSet
//! mounts the node's there). See `zygote_host::node`; `run` is what the
//! Helm chart's DaemonSet runs (install, warm, label; on SIGTERM unlabel and
//! uninstall).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Args, Subcommand};
use zygote::node::{self, NodeOptions, Restart};

mod run;

#[derive(Args, Clone)]
pub struct NodeArgs {
    /// The node's root file system.
    #[arg(long, default_value = "/")]
    host_root: PathBuf,
    /// containerd's config, a path on the node.
    #[arg(long, default_value = "/etc/containerd/config.toml")]
    containerd_config: PathBuf,
    /// How to restart containerd when its config changed: none, systemd,
    /// or a shell command.
    #[arg(long, default_value = "systemd")]
    restart: Restart,
    /// containerd's socket, a path on the node: after an install that
    /// restarted containerd (or left its config as it was), its CRI must
    /// list the `zygote` handler.
    #[arg(long, default_value = "/run/containerd/containerd.sock")]
    containerd_socket: PathBuf,
}

/// What `install` puts on the node.
#[derive(Args, Clone)]
pub struct InstallArgs {
    #[command(flatten)]
    node: NodeArgs,
    /// The shim to install (default: beside this binary).
    #[arg(long)]
    shim: Option<PathBuf>,
    /// The guest kernel to install (default: $ZYGOTE_KERNEL or the built one).
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// The guest image to install (default: $ZYGOTE_INITRAMFS or the built one).
    #[arg(long)]
    initramfs: Option<PathBuf>,
    /// The operator's shim config (TOML), written over the node's (default:
    /// the node's is kept, or a default one written).
    #[arg(long)]
    config: Option<PathBuf>,
}

#[derive(Subcommand)]
pub enum NodeCommand {
    /// Install zygote's artefacts and register its runtime with containerd.
    Install {
        #[command(flatten)]
        install: InstallArgs,
    },
    /// Install, warm the templates of `--warm-image`s, label the node
    /// `zygote.dev/ready=true` and remove its startup taints; then wait, and
    /// on SIGTERM or SIGINT unlabel the node and uninstall (refused while
    /// zygote pods run). What the Helm chart's DaemonSet runs.
    Run {
        #[command(flatten)]
        install: InstallArgs,
        #[command(flatten)]
        run: run::RunArgs,
    },
    /// Exit 0 when `node run` has made this node ready (a readiness probe).
    Ready,
    /// Unregister zygote's runtime and remove its artefacts (refused while
    /// zygote pods run).
    Uninstall {
        #[command(flatten)]
        node: NodeArgs,
    },
    /// What is installed, whether containerd's config registers it, which
    /// pods run (JSON).
    Status {
        #[command(flatten)]
        node: NodeArgs,
    },
}

impl NodeArgs {
    fn options(&self) -> anyhow::Result<NodeOptions> {
        let exe = std::env::current_exe()?;
        Ok(NodeOptions {
            host_root: self.host_root.clone(),
            containerd_config: self.containerd_config.clone(),
            restart: self.restart.clone(),
            shim: exe.with_file_name("containerd-shim-zygote-v2"),
            cli: exe.clone(),
            kernel: zygote::paths::kernel(),
            initramfs: zygote::paths::initramfs(),
            config: None,
        })
    }

    /// containerd's socket, in this process's file system.
    fn socket(&self) -> PathBuf {
        self.host_root.join(
            self.containerd_socket
                .strip_prefix("/")
                .unwrap_or(&self.containerd_socket),
        )
    }
}

/// `node install`: the artefacts, the registration, and containerd serving
/// the handler.
fn install(args: &InstallArgs) -> anyhow::Result<node::Report> {
    let mut opts = args.node.options()?;
    opts.shim = args.shim.clone().unwrap_or(opts.shim);
    opts.kernel = args.kernel.clone().unwrap_or(opts.kernel);
    opts.initramfs = args.initramfs.clone().unwrap_or(opts.initramfs);
    if let Some(config) = &args.config {
        opts.config =
            Some(std::fs::read_to_string(config).map_err(|e| {
                anyhow::anyhow!("reading the shim config {}: {e}", config.display())
            })?);
    }
    let mut report = node::install(&opts)?;
    let socket = args.node.socket();
    // In a DaemonSet's pod there is no containerd binary to ask; its CRI
    // says its version too.
    if report.containerd_version.is_none() && socket.exists() {
        report.containerd_version = cri_version(&socket).ok();
    }
    // After a restart, containerd must come back and serve the handler (it
    // takes a moment); without one, a containerd that already had the
    // config is asked too.
    if report.restarted || (socket.exists() && !report.containerd_config_changed) {
        handler_live(
            &socket,
            node::containerd_config::HANDLER,
            Duration::from_secs(60),
        )?;
        report.handler_live = Some(true);
    }
    Ok(report)
}

pub fn run(command: NodeCommand) -> anyhow::Result<ExitCode> {
    let report = match command {
        NodeCommand::Install { install: args } => install(&args)?,
        NodeCommand::Run { install: args, run } => {
            return run::run(&args, &run, install);
        }
        NodeCommand::Ready => return Ok(run::ready()),
        NodeCommand::Uninstall { node: args } => node::uninstall(&args.options()?)?,
        NodeCommand::Status { node: args } => {
            let status = node::status(&args.host_root, &args.containerd_config);
            println!("{}", serde_json::to_string(&status)?);
            return Ok(ExitCode::SUCCESS);
        }
    };
    if report.containerd_config_changed && !report.restarted {
        eprintln!("containerd's config changed: restart containerd to load it");
    }
    println!("{}", serde_json::to_string(&report)?);
    Ok(ExitCode::SUCCESS)
}

/// Waits up to `timeout` for containerd's CRI at `socket` to list
/// `handler` among its runtimes (CRI `Status`, verbose: the plugin's config).
pub fn handler_live(socket: &Path, handler: &str, timeout: Duration) -> anyhow::Result<()> {
    use k8s_cri::v1::StatusRequest;
    use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let deadline = Instant::now() + timeout;
    let mut last = String::new();
    runtime.block_on(async {
        loop {
            let asked = async {
                let status = RuntimeServiceClient::new(cri_channel(socket).await?)
                    .status(StatusRequest { verbose: true })
                    .await?
                    .into_inner();
                let config: serde_json::Value =
                    serde_json::from_str(status.info.get("config").map_or("{}", String::as_str))?;
                anyhow::Ok(config["containerd"]["runtimes"].get(handler).is_some())
            };
            match asked.await {
                Ok(true) => return Ok(()),
                Ok(false) => last = format!("its CRI lists no `{handler}` runtime"),
                Err(e) => last = format!("{e:#}"),
            }
            if Instant::now() > deadline {
                anyhow::bail!(
                    "containerd at {} does not serve the `{handler}` handler after {timeout:?}: {last}",
                    socket.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    })
}

pub use zygote::cri_client::channel as cri_channel;

/// containerd's version as its CRI `Version` says it.
fn cri_version(socket: &Path) -> anyhow::Result<String> {
    use k8s_cri::v1::VersionRequest;
    use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let version = tokio::time::timeout(Duration::from_secs(10), async {
            RuntimeServiceClient::new(cri_channel(socket).await?)
                .version(VersionRequest {
                    version: "v1".into(),
                })
                .await
                .map_err(anyhow::Error::from)
        })
        .await??;
        Ok(version.into_inner().runtime_version)
    })
}
