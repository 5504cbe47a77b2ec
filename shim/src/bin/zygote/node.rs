//! `zygote node install | uninstall | status`: zygote on a node, against
//! its root (`--host-root`, `/` by default; a DaemonSet mounts the node's
//! there). See `zygote_host::node`.

use std::path::PathBuf;
use std::process::ExitCode;

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
    let options = |node: NodeArgs| NodeOptions {
        host_root: node.host_root,
        containerd_config: node.containerd_config,
        restart: node.restart,
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
            let mut opts = options(args);
            opts.shim = shim.unwrap_or(opts.shim);
            opts.kernel = kernel.unwrap_or(opts.kernel);
            opts.initramfs = initramfs.unwrap_or(opts.initramfs);
            node::install(&opts)?
        }
        NodeCommand::Uninstall { node: args } => node::uninstall(&options(args))?,
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
