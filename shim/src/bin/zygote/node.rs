//! `zygote node install | uninstall | status`: zygote on a node, against
//! its root (`--host-root`, `/` by default; a DaemonSet mounts the node's
//! there). See `zygote_host::node`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Args, Subcommand};
use zygote::node::{self, NodeOptions, Restart};

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

#[derive(Subcommand)]
pub enum NodeCommand {
    /// Install zygote's artefacts and register its runtime with containerd.
    Install {
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
    },
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

pub fn run(command: NodeCommand) -> anyhow::Result<ExitCode> {
    let exe = std::env::current_exe()?;
    let options = |node: &NodeArgs| NodeOptions {
        host_root: node.host_root.clone(),
        containerd_config: node.containerd_config.clone(),
        restart: node.restart.clone(),
        shim: exe.with_file_name("containerd-shim-zygote-v2"),
        cli: exe.clone(),
        kernel: zygote::paths::kernel(),
        initramfs: zygote::paths::initramfs(),
    };
    let report = match command {
        NodeCommand::Install {
            node: args,
            shim,
            kernel,
            initramfs,
        } => {
            let mut opts = options(&args);
            opts.shim = shim.unwrap_or(opts.shim);
            opts.kernel = kernel.unwrap_or(opts.kernel);
            opts.initramfs = initramfs.unwrap_or(opts.initramfs);
            let mut report = node::install(&opts)?;
            let socket = args.host_root.join(
                args.containerd_socket
                    .strip_prefix("/")
                    .unwrap_or(&args.containerd_socket),
            );
            // After a restart, containerd must come back and serve the
            // handler (it takes a moment); without one, a containerd that
            // already had the config is asked too.
            if report.restarted || (socket.exists() && !report.containerd_config_changed) {
                handler_live(
                    &socket,
                    node::containerd_config::HANDLER,
                    Duration::from_secs(60),
                )?;
                report.handler_live = Some(true);
            }
            report
        }
        NodeCommand::Uninstall { node: args } => node::uninstall(&options(&args))?,
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
fn handler_live(socket: &Path, handler: &str, timeout: Duration) -> anyhow::Result<()> {
    use k8s_cri::v1::StatusRequest;
    use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
    use tonic::transport::{Endpoint, Uri};

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let deadline = Instant::now() + timeout;
    let mut last = String::new();
    runtime.block_on(async {
        loop {
            let path = socket.to_path_buf();
            let asked = async {
                let channel = Endpoint::try_from("http://[::]:50051")?
                    .connect_with_connector(tower::service_fn(move |_: Uri| {
                        let path = path.clone();
                        async move {
                            let stream = tokio::net::UnixStream::connect(path).await?;
                            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
                        }
                    }))
                    .await?;
                let status = RuntimeServiceClient::new(channel)
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
