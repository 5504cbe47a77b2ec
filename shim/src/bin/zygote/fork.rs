//! `zygote fork` and `zygote bench fork`.

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};
use serde::Serialize;
use zygote::procmem::MemUsage;
use zygote::reconcile::{ReconcileOutcome, ReconcileSpec, ReportJson, reconcile};
use zygote::sandbox::{ForkTimeline, Sandbox, SandboxConfig};
use zygote::template::read_meta;
use zygote_agent_api::PolicyRule;
use zygote_vmm::snapshot::{Template, TemplateName, TemplateStore};

/// One fork's figures as `zygote fork --json` prints them.
#[derive(Debug, Serialize, serde::Deserialize)]
struct ForkLine {
    index: usize,
    #[serde(flatten)]
    timeline: ForkTimelineOwned,
    agent_started_ns: u64,
    uptime_ns: u64,
    /// Hex of 32 bytes the guest read with getrandom after the reconcile.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    entropy_sample: Option<String>,
    /// Guest CLOCK_REALTIME − host CLOCK_REALTIME after the reconcile, ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    realtime_skew_ms: Option<f64>,
    /// Host time for reconcile + sample, ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    reconcile_ms: Option<f64>,
    /// The agent's reconcile report (with --reconcile-report).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    report: Option<serde_json::Value>,
}

/// How `zygote fork` reconciles each fork.
pub struct ReconcileOpts {
    /// Reconcile at all.
    pub enabled: bool,
    /// Print the reports.
    pub report: bool,
    /// Per-class actions, `class=action[:signal]`.
    pub policy: Vec<PolicyRule>,
}

/// [`ForkTimeline`] as read back from a child's JSON.
#[derive(Debug, Clone, Copy, Serialize, serde::Deserialize)]
struct ForkTimelineOwned {
    host_ms: f64,
    map_ms: f64,
    create_vm_ms: f64,
    restore_ms: f64,
    devices_ms: f64,
    start_ms: f64,
    ready_ms: f64,
    guest_run_ms: f64,
}

impl From<ForkTimeline> for ForkTimelineOwned {
    fn from(t: ForkTimeline) -> Self {
        ForkTimelineOwned {
            host_ms: t.host_ms,
            map_ms: t.map_ms,
            create_vm_ms: t.create_vm_ms,
            restore_ms: t.restore_ms,
            devices_ms: t.devices_ms,
            start_ms: t.start_ms,
            ready_ms: t.ready_ms,
            guest_run_ms: t.guest_run_ms,
        }
    }
}

fn open_template(store: &TemplateStore, name: &str) -> anyhow::Result<Template> {
    let name = TemplateName::new(name)?;
    let dir = store.dir(&name);
    if !store.exists(&name) {
        bail!(
            "no template {name} in {} (build it with `zygote template build --name {name}`)",
            store.root().display()
        );
    }
    Template::open(&dir).with_context(|| format!("template {name}"))
}

/// Forks `count` VMs at once, waits for each agent, prints their timings, and
/// tears them down (or keeps them until stdin closes).
pub fn fork(
    store: &TemplateStore,
    name: &str,
    count: usize,
    json: bool,
    keep: bool,
    timeout: Duration,
    opts: &ReconcileOpts,
) -> anyhow::Result<ExitCode> {
    if count == 0 {
        bail!("--count must be at least 1");
    }
    let template = open_template(store, name)?;
    let fork_one = |i: usize| -> anyhow::Result<(Sandbox, Option<ReconcileOutcome>)> {
        let sandbox = Sandbox::fork(&template, timeout)?;
        if !opts.enabled {
            return Ok((sandbox, None));
        }
        let spec = ReconcileSpec {
            generation: 1,
            hostname: format!("zygote-{}-{i}", std::process::id()),
            policy: opts.policy.clone(),
            ..Default::default()
        };
        let outcome = reconcile(&mut sandbox.client()?, &spec).context("reconcile")?;
        Ok((sandbox, Some(outcome)))
    };
    let results: Vec<anyhow::Result<_>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..count).map(|i| s.spawn(move || fork_one(i))).collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("fork thread"))
            .collect()
    });
    let mut sandboxes = Vec::new();
    let mut failed = 0;
    for (i, r) in results.into_iter().enumerate() {
        match r {
            Ok(sb) => sandboxes.push((i, sb)),
            Err(e) => {
                failed += 1;
                eprintln!("zygote: fork {i} failed: {e:#}");
            }
        }
    }
    let usage = MemUsage::of(None).context("read this process's /proc/self/smaps_rollup")?;
    let mut lines = Vec::new();
    for (i, (sb, outcome)) in &sandboxes {
        let t = sb.fork.expect("a forked sandbox has a fork timeline");
        println!(
            "fork {i}: ready in {:.1} ms (host {:.2} ms: map {:.2}, vm {:.2}, restore {:.2}, devices {:.2}, start {:.2}; \
             guest {:.1} ms in KVM_RUN), agent up since guest t={:.3} s",
            t.ready_ms,
            t.host_ms,
            t.map_ms,
            t.create_vm_ms,
            t.restore_ms,
            t.devices_ms,
            t.start_ms,
            t.guest_run_ms,
            sb.pong.agent_started_ns as f64 / 1e9
        );
        if let Some(o) = outcome {
            let r = &o.report;
            let steps: Vec<String> = r
                .steps
                .iter()
                .map(|s| format!("{} {:.1}", s.name, s.elapsed_ns as f64 / 1e6))
                .collect();
            println!(
                "  reconciled in {:.1} ms (host {:.1} ms; {} ms), clock stepped {:.3} s, \
                 offsets corrected {:?} ms, realtime skew {:+.1} ± {:.1} ms",
                r.total_ns as f64 / 1e6,
                o.host_ms,
                steps.join(", "),
                r.clock_step_ns as f64 / 1e9,
                o.clock_corrections_ms,
                o.realtime_skew_ms,
                o.realtime_uncertainty_ms,
            );
            if opts.report {
                for p in &r.processes {
                    println!(
                        "  pid {} {} [{}{}] ({}): {}",
                        p.pid,
                        p.exe,
                        p.class,
                        if p.runtime_version.is_empty() {
                            String::new()
                        } else {
                            format!(" {}", p.runtime_version)
                        },
                        p.evidence,
                        p.result
                    );
                }
            }
        }
        let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
        lines.push(ForkLine {
            index: *i,
            timeline: t.into(),
            agent_started_ns: sb.pong.agent_started_ns,
            uptime_ns: sb.pong.uptime_ns,
            entropy_sample: outcome
                .as_ref()
                .and_then(|o| o.sample.as_ref())
                .map(|s| hex(&s.random)),
            realtime_skew_ms: outcome.as_ref().map(|o| o.realtime_skew_ms),
            reconcile_ms: outcome.as_ref().map(|o| o.host_ms),
            report: outcome
                .as_ref()
                .filter(|_| opts.report)
                .map(|o| serde_json::to_value(ReportJson::from(&o.report)).expect("plain data")),
        });
    }
    println!(
        "{} of {count} forks of {name} answered; this process: PSS {:.1} MiB (anon {:.1}, file {:.1}), RSS {:.1} MiB",
        sandboxes.len(),
        usage.pss_kib as f64 / 1024.0,
        usage.pss_anon_kib as f64 / 1024.0,
        usage.pss_file_kib as f64 / 1024.0,
        usage.rss_kib as f64 / 1024.0
    );
    if json {
        println!(
            "{}",
            serde_json::json!({
                "template": name, "count": count, "failed": failed, "forks": lines,
                "pss_mib": usage.pss_kib as f64 / 1024.0,
                "pss_anon_mib": usage.pss_anon_kib as f64 / 1024.0,
                "rss_mib": usage.rss_kib as f64 / 1024.0,
                "pid": std::process::id(),
            })
        );
    }
    if keep {
        use std::io::Write;
        let _ = std::io::stdout().flush();
        eprintln!(
            "zygote: keeping {} VMs; close stdin (Ctrl-D) or Ctrl-C to stop them",
            sandboxes.len()
        );
        let _ = std::io::stdin().read_to_end(&mut Vec::new());
    }
    drop(sandboxes);
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn sorted(mut v: Vec<f64>) -> Vec<f64> {
    v.sort_by(f64::total_cmp);
    v
}

/// A child process holding one fork, as the benchmark runs them.
struct Holder {
    child: Child,
    line: ForkLine,
}

fn spawn_holder(store: &TemplateStore, name: &str, timeout: Duration) -> anyhow::Result<Holder> {
    let exe = std::env::current_exe()?;
    let mut child = Command::new(exe)
        .arg("--templates")
        .arg(store.root())
        .args([
            "fork",
            name,
            "--count",
            "1",
            "--json",
            "--keep",
            "--no-reconcile",
        ])
        .arg("--timeout")
        .arg(timeout.as_secs().to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot start a fork process")?;
    let stdout = child.stdout.take().expect("piped");
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
            if v["failed"] == 0 {
                let fork: ForkLine = serde_json::from_value(v["forks"][0].clone())?;
                return Ok(Holder { child, line: fork });
            }
        }
    }
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    let _ = child.wait();
    bail!("fork process failed: {}", err.trim())
}

/// Forks `count` VMs one after another, each in its own process as a shim would
/// hold it, then measures each process's PSS once all are idle; boots the same
/// VM cold in the same run for the ratio.
pub fn bench(
    store: &TemplateStore,
    name: &str,
    count: usize,
    json: bool,
    timeout: Duration,
) -> anyhow::Result<ExitCode> {
    if count == 0 {
        bail!("--count must be at least 1");
    }
    let template = open_template(store, name)?;
    let meta = read_meta(template.dir()).context("template.json")?;
    let kind = template.state().kind;
    drop(template);

    let cold = Sandbox::boot(&SandboxConfig {
        vcpus: meta.vcpus,
        memory_mib: meta.memory_mib,
        kernel: meta.kernel.clone(),
        initramfs: meta.initramfs.clone(),
        ..SandboxConfig::default()
    })
    .context("cold boot (baseline)")?;
    let boot_ms = cold.boot.expect("booted").agent_ready_ms;
    drop(cold);

    let mut holders = Vec::new();
    let result = (|| -> anyhow::Result<()> {
        for _ in 0..count {
            holders.push(spawn_holder(store, name, timeout)?);
        }
        Ok(())
    })();
    // Let every fork go idle before its memory is measured.
    std::thread::sleep(Duration::from_secs(1));
    let usages: Result<Vec<MemUsage>, _> = holders
        .iter()
        .map(|h| {
            let pid = h.child.id();
            MemUsage::of(Some(pid)).with_context(|| format!("read /proc/{pid}/smaps_rollup"))
        })
        .collect();
    for h in &mut holders {
        drop(h.child.stdin.take());
        let _ = h.child.wait();
    }
    result?;
    let usages = usages?;

    let lines: Vec<&ForkLine> = holders.iter().map(|h| &h.line).collect();
    let ready = sorted(lines.iter().map(|l| l.timeline.ready_ms).collect());
    let host = sorted(lines.iter().map(|l| l.timeline.host_ms).collect());
    let guest = sorted(lines.iter().map(|l| l.timeline.guest_run_ms).collect());
    let phase = |f: fn(&ForkTimelineOwned) -> f64| {
        percentile(
            &sorted(lines.iter().map(|l| f(&l.timeline)).collect()),
            50.0,
        )
    };
    let mean = |f: fn(&MemUsage) -> u64| {
        usages.iter().map(|u| f(u) as f64).sum::<f64>() / usages.len() as f64 / 1024.0
    };
    let fork_p50 = percentile(&ready, 50.0);
    let pss = mean(|u| u.pss_kib);
    let out = serde_json::json!({
        "template": name,
        "kind": kind.to_string(),
        "count": count,
        "vcpus": meta.vcpus,
        "memory_mib": meta.memory_mib,
        "fork_p50_ms": fork_p50,
        "fork_p90_ms": percentile(&ready, 90.0),
        "fork_p99_ms": percentile(&ready, 99.0),
        "fork_max_ms": ready.last().copied().unwrap_or(f64::NAN),
        "host_p50_ms": percentile(&host, 50.0),
        "host_p99_ms": percentile(&host, 99.0),
        "host_phases_p50_ms": {
            "map": phase(|t| t.map_ms),
            "create_vm": phase(|t| t.create_vm_ms),
            "restore": phase(|t| t.restore_ms),
            "devices": phase(|t| t.devices_ms),
            "start": phase(|t| t.start_ms),
        },
        "guest_p50_ms": percentile(&guest, 50.0),
        "pss_mib_per_fork": pss,
        "pss_anon_mib_per_fork": mean(|u| u.pss_anon_kib),
        "pss_file_mib_per_fork": mean(|u| u.pss_file_kib),
        "rss_mib_per_fork": mean(|u| u.rss_kib),
        "boot_ms": boot_ms,
        "boot_over_fork": boot_ms / fork_p50,
    });
    println!(
        "fork of {name} on {kind} KVM ({count} forks): ready p50 {:.1} ms, p99 {:.1} ms; host-side p50 {:.2} ms; \
         guest-side p50 {:.1} ms; PSS {pss:.1} MiB per idle fork; cold boot {boot_ms:.0} ms = {:.0}x the fork",
        fork_p50,
        percentile(&ready, 99.0),
        percentile(&host, 50.0),
        percentile(&guest, 50.0),
        boot_ms / fork_p50
    );
    if json {
        println!("{out}");
    }
    Ok(ExitCode::SUCCESS)
}
