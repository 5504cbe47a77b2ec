//! `zygote template build|ls|rm|verify`.

use std::os::unix::fs::MetadataExt;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Subcommand;
use zygote::template::{BuildSpec, build, read_meta};
use zygote_agent_api::Spawn;
use zygote_vmm::snapshot::template::MEMORY_FILE;
use zygote_vmm::snapshot::{Template, TemplateName, TemplateStore};

use crate::VmArgs;

#[derive(Subcommand)]
pub enum TemplateCommand {
    /// Boot a VM, wait for its agent, (optionally) warm it, snapshot it as a template.
    /// An existing template of that name is reused unless --force.
    Build {
        /// Template name.
        #[arg(long, default_value = "default")]
        name: String,
        #[command(flatten)]
        vm: Box<VmArgs>,
        /// Rebuild even if it exists (forks of the old one keep running).
        #[arg(long)]
        force: bool,
        /// A long-running process to start in the guest before the snapshot
        /// (space-separated argv, absolute program path); repeatable. Forks
        /// inherit it and the reconcile audits it.
        #[arg(long = "spawn")]
        spawn: Vec<String>,
        /// Seconds to leave the guest idle before the snapshot.
        #[arg(long, default_value_t = 1.0)]
        settle: f64,
        /// Print the result as JSON (last line of stdout).
        #[arg(long)]
        json: bool,
        /// A command to run in the guest before the snapshot (warm-up), e.g.
        /// `-- /bin/busybox sh -c 'echo hi > /tmp/hello'`.
        #[arg(last = true)]
        warm: Vec<String>,
    },
    /// List templates.
    Ls {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Remove a template (forks running from it keep running).
    Rm {
        /// Template name.
        name: String,
    },
    /// Check a template completely: state file and the whole memory file.
    Verify {
        /// Template name.
        name: String,
    },
}

pub fn run(store: &TemplateStore, command: TemplateCommand) -> anyhow::Result<ExitCode> {
    match command {
        TemplateCommand::Build {
            name,
            vm,
            force,
            settle,
            json,
            warm,
            spawn,
        } => {
            let spec = BuildSpec {
                mounts: vec![],
                name: TemplateName::new(&name)?,
                sandbox: vm.config(),
                spawn: spawn
                    .iter()
                    .map(|line| Spawn {
                        argv: line.split_whitespace().map(String::from).collect(),
                        cwd: "/".into(),
                        ..Default::default()
                    })
                    .collect(),
                warm: if warm.is_empty() { vec![] } else { vec![warm] },
                stage: None,
                settle: Duration::from_secs_f64(settle.max(0.0)),
                force,
            };
            let report = build(store, &spec).with_context(|| format!("template {name}"))?;
            let m = &report.meta;
            if report.reused {
                println!(
                    "template {name} exists at {} (reused; --force rebuilds)",
                    report.dir.display()
                );
            } else {
                println!(
                    "template {name} built at {} in {:.0} ms: boot {:.0} ms, pause {:.1} ms, save {:.1} ms, \
                     memory {:.0} ms ({:.1} MiB of {} MiB written)",
                    report.dir.display(),
                    report.total_ms,
                    m.boot_ms,
                    m.pause_ms,
                    m.save_ms,
                    m.memory_write_ms,
                    m.memory_data_bytes as f64 / (1 << 20) as f64,
                    m.memory_mib
                );
            }
            if json {
                let mut v = serde_json::to_value(m)?;
                v["dir"] = report.dir.display().to_string().into();
                v["reused"] = report.reused.into();
                v["total_ms"] = report.total_ms.into();
                println!("{v}");
            }
            Ok(ExitCode::SUCCESS)
        }
        TemplateCommand::Ls { json } => {
            let mut rows = Vec::new();
            for name in store.list()? {
                let dir = store.dir(&name);
                let disk = std::fs::metadata(dir.join(MEMORY_FILE))
                    .map(|m| m.blocks() * 512)
                    .unwrap_or(0);
                rows.push((name, read_meta(&dir).ok(), disk));
            }
            if json {
                let list: Vec<_> = rows
                    .iter()
                    .map(|(name, meta, disk)| {
                        serde_json::json!({"name": name.as_str(), "disk_bytes": disk, "meta": meta})
                    })
                    .collect();
                println!("{}", serde_json::Value::Array(list));
            } else {
                println!(
                    "{:<24} {:<8} {:>5} {:>8} {:>9}  KERNEL",
                    "NAME", "KVM", "VCPUS", "MEMORY", "DISK"
                );
                for (name, meta, disk) in &rows {
                    match meta {
                        Some(m) => println!(
                            "{:<24} {:<8} {:>5} {:>5} MiB {:>5.1} MiB  {}",
                            name.as_str(),
                            m.kind.to_string(),
                            m.vcpus,
                            m.memory_mib,
                            *disk as f64 / (1 << 20) as f64,
                            m.kernel.display()
                        ),
                        None => println!("{:<24} (no template.json)", name.as_str()),
                    }
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        TemplateCommand::Rm { name } => {
            store.remove(&TemplateName::new(&name)?)?;
            println!("template {name} removed");
            Ok(ExitCode::SUCCESS)
        }
        TemplateCommand::Verify { name } => {
            let dir = store.dir(&TemplateName::new(&name)?);
            let template = Template::open(&dir).with_context(|| format!("template {name}"))?;
            template
                .verify()
                .with_context(|| format!("template {name}"))?;
            let s = template.state();
            println!(
                "template {name} is intact: state format v{}, {} vCPU(s), {} MiB memory (crc32 {:#010x}), taken on {} KVM",
                zygote_vmm::snapshot::STATE_VERSION,
                s.vcpus.len(),
                s.memory.size >> 20,
                s.memory.crc32,
                s.kind
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}
