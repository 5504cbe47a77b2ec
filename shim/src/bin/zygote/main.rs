//! zygote: the operator CLI.
//!
//! - `zygote doctor`: checks KVM, the kernel and the guest image; exits 1 if something is missing.
//! - `zygote boot`: boots a VM, waits for the agent's Ping, prints the timeline, powers it off.
//! - `zygote selftest`: boots a VM and runs the exec/pipe stress inside it.
//! - `zygote template build|ls|rm|verify`: templates (a warm VM saved to disk).
//! - `zygote fork`: forks VMs from a template; `zygote bench fork` measures it.
//! - `zygote node install|uninstall|status`: zygote on a node, registered with containerd.

mod fork;
mod kube;
mod node;
mod templates;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use zygote::sandbox::{Sandbox, SandboxConfig};
use zygote::{doctor, paths};
use zygote_agent_api::{SelfTest, request, response};
use zygote_vmm::snapshot::TemplateStore;

#[derive(Parser)]
#[command(
    name = "zygote",
    version,
    about = "zygote: containers in forked KVM microVMs"
)]
struct Cli {
    /// Template store (default: $ZYGOTE_TEMPLATES or $ZYGOTE_HOME/templates).
    #[arg(long, global = true)]
    templates: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Clone)]
pub(crate) struct VmArgs {
    /// vCPUs.
    #[arg(long, default_value_t = 1)]
    vcpus: u8,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 128)]
    memory: u64,
    /// Guest kernel (default: $ZYGOTE_HOME/kernel/vmlinux).
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// Guest initramfs (default: $ZYGOTE_HOME/image/initramfs.cpio).
    #[arg(long)]
    initramfs: Option<PathBuf>,
    /// Fault all guest memory in on the host before the guest runs.
    #[arg(long)]
    prefault: bool,
    /// Extra kernel command-line parameters.
    #[arg(long, default_value = "")]
    cmdline: String,
    /// Seconds to wait for the agent.
    #[arg(long, default_value_t = 180)]
    timeout: u64,
    /// Write the guest console here and keep it (default: discarded with the VM).
    #[arg(long)]
    console: Option<PathBuf>,
    /// A read-only disk image for the guest (/dev/vda, /dev/vdb, ... in order); repeatable.
    #[arg(long = "disk")]
    disks: Vec<PathBuf>,
}

impl VmArgs {
    pub(crate) fn config(&self) -> SandboxConfig {
        SandboxConfig {
            vcpus: self.vcpus,
            memory_mib: self.memory,
            kernel: self.kernel.clone().unwrap_or_else(paths::kernel),
            initramfs: self.initramfs.clone().unwrap_or_else(paths::initramfs),
            prefault: self.prefault,
            extra_cmdline: self.cmdline.clone(),
            // The CLI's VMs are the operator's own checks and templates
            // (selftest, warm-up commands), not pods.
            debug_requests: true,
            agent_timeout: Duration::from_secs(self.timeout),
            console_log: self.console.clone(),
            disks: self.disks.clone(),
            ..Default::default()
        }
    }
}

#[derive(Subcommand)]
enum Command {
    /// Check that this node can run zygote VMs.
    Doctor {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Boot a VM, wait for its agent, print the timeline, power it off.
    Boot {
        #[command(flatten)]
        vm: VmArgs,
        /// Print the timeline as JSON (last line of stdout).
        #[arg(long)]
        json: bool,
    },
    /// Boot a VM and run fresh-exec + pipe round trips inside it.
    Selftest {
        #[command(flatten)]
        vm: VmArgs,
        /// Round trips.
        #[arg(long, default_value_t = 500)]
        rounds: u32,
        /// A multi-threaded child every N rounds.
        #[arg(long, default_value_t = 10)]
        threads_every: u32,
        /// Round trips at once.
        #[arg(long, default_value_t = 1)]
        parallel: u32,
        /// Bytes per round trip.
        #[arg(long, default_value_t = 65536)]
        bytes: u32,
        /// The echo child to exec each round (default: the agent's own `stress-echo`),
        /// e.g. `--child /bin/busybox --child cat` with an image that has busybox.
        #[arg(long = "child")]
        child: Vec<String>,
        /// Print the report as JSON (last line of stdout).
        #[arg(long)]
        json: bool,
    },
    /// Install zygote on a node, remove it, or say what is there.
    Node {
        #[command(subcommand)]
        command: node::NodeCommand,
    },
    /// Build, list, remove and verify templates.
    Template {
        #[command(subcommand)]
        command: templates::TemplateCommand,
    },
    /// Fork VMs from a template, wait for their agents, print per-fork timings.
    Fork {
        /// Template name.
        template: String,
        /// VMs to fork at once.
        #[arg(long, default_value_t = 1)]
        count: usize,
        /// Print the timings as JSON (last line of stdout).
        #[arg(long)]
        json: bool,
        /// Keep the VMs running until stdin closes (or a signal).
        #[arg(long)]
        keep: bool,
        /// Seconds to wait for each agent.
        #[arg(long, default_value_t = 120)]
        timeout: u64,
        /// Do not reconcile the forks (they keep the template's entropy, clock and identity).
        #[arg(long)]
        no_reconcile: bool,
        /// Print each fork's reconcile report (and include it in the JSON).
        #[arg(long)]
        reconcile_report: bool,
        /// What to do with a class of process that existed at the fork point:
        /// CLASS=keep|restart|notify[:SIGNAL] (classes: go, jvm, python, node, openssl,
        /// native; default: go=restart, the rest keep). Repeatable.
        #[arg(long = "policy")]
        policy: Vec<String>,
    },
    /// Make container images into read-only disks (cached by digest).
    Image {
        #[command(subcommand)]
        command: ImageCommand,
    },
    /// Benchmarks.
    Bench {
        #[command(subcommand)]
        command: BenchCommand,
    },
}

#[derive(Subcommand)]
enum ImageCommand {
    /// Unpack an image of a local OCI image layout and make it an erofs disk
    /// (for `template build --disk`); reused while the manifest is the same.
    Build {
        /// LAYOUT_DIR:TAG (the tag may be left out when the layout has one image).
        reference: String,
        /// Print the result as JSON (last line of stdout).
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Fork-to-agent-ready latency, host-side time, PSS per fork, and a cold boot of
    /// the same VM in the same run.
    Fork {
        /// Template name.
        #[arg(long)]
        template: String,
        /// Forks (each in its own process, one after another).
        #[arg(long, default_value_t = 10)]
        count: usize,
        /// Print the figures as JSON (last line of stdout).
        #[arg(long)]
        json: bool,
        /// Seconds to wait for each agent.
        #[arg(long, default_value_t = 120)]
        timeout: u64,
    },
}

/// Blocks SIGINT, SIGTERM and SIGHUP in every thread and handles them on one:
/// remove this process's VM run directories, then exit as the signal would.
/// (VMs live in this process: their KVM fds and threads end with it.)
fn handle_termination_signals() {
    // SAFETY: sigset_t is plain data initialised by sigemptyset; sigprocmask/
    // pthread_sigmask only change this process's mask, before any other thread exists.
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            libc::sigaddset(&mut set, sig);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    };
    std::thread::spawn(move || {
        let mut sig = 0;
        // SAFETY: `set` is a valid signal set; `sig` receives the signal number.
        if unsafe { libc::sigwait(&set, &mut sig) } == 0 {
            zygote::sandbox::remove_own_run_dirs();
            eprintln!("zygote: stopped by signal {sig}; VM run directories removed");
            std::process::exit(128 + sig);
        }
    });
}

fn main() -> ExitCode {
    handle_termination_signals();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("ZYGOTE_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let store = TemplateStore::new(cli.templates.unwrap_or_else(paths::templates));
    match run(&store, cli.command) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("zygote: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(store: &TemplateStore, command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Template { command } => templates::run(store, command),
        Command::Node { command } => node::run(command),
        Command::Image {
            command: ImageCommand::Build { reference, json },
        } => {
            let (layout, tag) = zygote::image::split_layout_ref(&reference);
            let built = zygote::image::ImageStore::new(paths::images())
                .from_oci_layout(&layout, &tag)
                .with_context(|| format!("cannot make a disk of image {reference}"))?;
            if json {
                println!("{}", serde_json::to_string(&built)?);
            } else {
                println!(
                    "{} {} ({})",
                    built.key,
                    built.path.display(),
                    if built.cached {
                        "cached".to_string()
                    } else {
                        format!("built in {:.0} ms", built.build_ms)
                    }
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Fork {
            template,
            count,
            json,
            keep,
            timeout,
            no_reconcile,
            reconcile_report,
            policy,
        } => {
            let opts = fork::ReconcileOpts {
                enabled: !no_reconcile,
                report: reconcile_report,
                policy: policy
                    .iter()
                    .map(|p| zygote::reconcile::parse_policy(p).map_err(anyhow::Error::msg))
                    .collect::<anyhow::Result<_>>()?,
            };
            let timeout = Duration::from_secs(timeout);
            fork::fork(store, &template, count, json, keep, timeout, &opts)
        }
        Command::Bench {
            command:
                BenchCommand::Fork {
                    template,
                    count,
                    json,
                    timeout,
                },
        } => fork::bench(store, &template, count, json, Duration::from_secs(timeout)),
        Command::Doctor { json } => {
            let checks = doctor::run(&paths::kernel(), &paths::initramfs());
            let ok = checks.iter().all(|c| c.ok);
            if json {
                println!("{}", serde_json::to_string(&checks)?);
            } else {
                for c in &checks {
                    println!(
                        "{} {:8} {}",
                        if c.ok { "ok  " } else { "FAIL" },
                        c.name,
                        c.detail
                    );
                }
            }
            Ok(if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::Boot { vm, json } => {
            let sandbox = Sandbox::boot(&vm.config()).context("boot failed")?;
            let t = sandbox.boot.expect("a booted sandbox has a boot timeline");
            let kind = sandbox.kind();
            let release = sandbox.pong.kernel_release.clone();
            let reason = sandbox.shutdown(Duration::from_secs(30));
            println!(
                "booted on {kind} KVM: vmm setup {:.1} ms, kernel entry {:.1} ms, agent start {:.1} ms, \
                 agent ready {:.1} ms (guest kernel {release}, {:.1} ms inside KVM_RUN); stopped: {reason:?}",
                t.vmm_setup_ms,
                t.kernel_entry_ms,
                t.agent_start_ms,
                t.agent_ready_ms,
                t.guest_run_ms
            );
            if json {
                println!("{}", serde_json::to_string(&t)?);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Selftest {
            vm,
            rounds,
            threads_every,
            parallel,
            bytes,
            child,
            json,
        } => {
            let sandbox = Sandbox::boot(&vm.config()).context("boot failed")?;
            let mut client = sandbox.client()?;
            client.set_timeout(Duration::from_secs(3600))?;
            let body = client.call(request::Body::SelfTest(SelfTest {
                rounds,
                threads_every,
                parallel,
                bytes,
                command: child,
            }))?;
            let response::Body::SelfTest(report) = body else {
                anyhow::bail!("unexpected answer to SelfTest")
            };
            sandbox.shutdown(Duration::from_secs(30));
            println!("selftest: {}", report.summary());
            for f in &report.failures {
                println!("  {f}");
            }
            if json {
                println!(
                    "{}",
                    serde_json::json!({
                        "execs": report.execs, "ok": report.ok, "segfaults": report.segfaults,
                        "tls_corruptions": report.tls_corruptions,
                        "other_failures": report.other_failures, "threaded": report.threaded,
                        "elapsed_ms": report.elapsed_ns / 1_000_000, "prefault": vm.prefault,
                    })
                );
            }
            Ok(if report.ok == report.execs {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
    }
}
