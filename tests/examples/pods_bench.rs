//! `hack/bench pods --count N`: N pods started at once through containerd's
//! CRI on the CNI network (one busybox container each, `sleep`), zygote
//! against runc in the same run.
//!
//! Per runtime:
//! - `all_running_ms`: from the first RunPodSandbox to the last container
//!   started (StartContainer answered: its process runs);
//! - `p50_pod_ms`: one pod's RunPodSandbox → CreateContainer →
//!   StartContainer, median over the N (they compete for this host's CPUs);
//! - `host_cpu_ms_per_pod`, after the pods have been idle for 10 s: CPU time
//!   of every host process of the pod (zygote: its shim, less its vCPU
//!   threads, whose time is `guest_cpu_ms_per_pod`; runc: its shim, the `runc`
//!   invocations it waited for, the pause and the container process).
//!   containerd's own work and the short `shim start` process are in
//!   neither;
//! - `pss_mib_per_idle_pod`: PSS of those processes (zygote: the shim, the
//!   VM's memory inside it — shared pages of the template counted by share).
//!   KVM's kernel-side memory (page tables, PVM's shadow pages) is not in
//!   any process's PSS and has no per-VM counter to read here.
//!
//! Prints a readable line, then the JSON.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use tonic::transport::Channel;

#[path = "../tests/cri_common/mod.rs"]
mod cri_common;
use cri_common::*;

/// Idle time before memory and CPU are read.
const IDLE: Duration = Duration::from_secs(10);

fn count() -> usize {
    std::env::args()
        .skip_while(|a| a != "--count")
        .nth(1)
        .and_then(|n| n.parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or(10)
}

/// `pid`'s children (from /proc/*/stat's ppid).
fn children(pid: u32) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return vec![];
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&p| stat_fields(p).and_then(|f| f.get(1)?.parse().ok()) == Some(pid))
        .collect()
}

/// Fields of /proc/PID/stat after the command name (state is field 0).
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    stat_of(&format!("/proc/{pid}/stat"))
}

fn stat_of(path: &str) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(path).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    Some(rest.split_whitespace().map(String::from).collect())
}

/// utime + stime (+ cutime + cstime: children waited for), ms.
fn cpu_ms(fields: &[String], with_children: bool) -> f64 {
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // SAFETY: sysconf has no memory effects.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let own = ticks(11) + ticks(12);
    let waited = if with_children {
        ticks(13) + ticks(14)
    } else {
        0.0
    };
    (own + waited) * 1000.0 / hz
}

/// PSS of `pid`, KiB.
fn pss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Pss:"))?
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("PSS of pid {pid}: no smaps_rollup"))
}

/// CPU time of `pid`'s threads named `zygote-vcpu`, ms.
fn vcpu_cpu_ms(pid: u32) -> f64 {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
        .filter(|t| {
            std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.trim() == "zygote-vcpu")
        })
        .filter_map(|t| stat_of(&t.path().join("stat").to_string_lossy()))
        .map(|f| cpu_ms(&f, false))
        .sum()
}

struct Figures {
    all_running_ms: f64,
    p50_pod_ms: f64,
    host_cpu_ms_per_pod: f64,
    guest_cpu_ms_per_pod: Option<f64>,
    pss_mib_per_idle_pod: f64,
}

fn round1(v: f64) -> f64 {
    (v * 10.0).round() / 10.0
}

async fn one_pod(
    mut runtime: RuntimeServiceClient<Channel>,
    handler: &'static str,
    n: usize,
) -> (String, Duration, std::path::PathBuf) {
    let t = Instant::now();
    let (config, logs) = pod_config(&format!("zpods-{handler}-{n}"), 0);
    let config = on_pod_network(config, vec![]);
    let handler = if handler == "runc" { "" } else { handler };
    let pod = run_pod_with(&mut runtime, &config, handler).await;
    run_container(
        &mut runtime,
        container_request(&pod, &config, "app", &["sleep", "100000"]),
    )
    .await;
    (pod, t.elapsed(), logs)
}

async fn measure(
    runtime: &RuntimeServiceClient<Channel>,
    handler: &'static str,
    n: usize,
) -> Figures {
    let start = Instant::now();
    let tasks: Vec<_> = (0..n)
        .map(|i| tokio::spawn(one_pod(runtime.clone(), handler, i)))
        .collect();
    let mut started = Vec::new();
    let mut failed = None;
    for t in tasks {
        match t.await {
            Ok(pod) => started.push(pod),
            Err(e) => failed = failed.or(Some(e)),
        }
    }
    if let Some(e) = failed {
        // Every pod of the run goes, the failed ones' included.
        remove_stale_pods(&mut runtime.clone(), "zpods-").await;
        std::panic::resume_unwind(e.into_panic());
    }
    let all_running = start.elapsed();
    let guards: Vec<PodGuard> = started.iter().map(|(p, ..)| PodGuard(p.clone())).collect();
    let mut per_pod: Vec<f64> = started
        .iter()
        .map(|(_, d, _)| d.as_secs_f64() * 1e3)
        .collect();
    per_pod.sort_by(f64::total_cmp);
    eprintln!(
        "{handler}: {n} pods running after {:.1} s; idle {} s",
        all_running.as_secs_f64(),
        IDLE.as_secs()
    );
    tokio::time::sleep(IDLE).await;
    let (mut cpu, mut guest, mut pss) = (0.0, 0.0, 0u64);
    for (pod, ..) in &started {
        if handler == "zygote" {
            let shim = shim_pid(pod).unwrap_or_else(|| panic!("pod {pod}: no zygote shim"));
            let fields = stat_fields(shim).expect("the shim's stat");
            let vcpus = vcpu_cpu_ms(shim);
            cpu += cpu_ms(&fields, true) - vcpus;
            guest += vcpus;
            pss += pss_kib(shim);
        } else {
            let shim = shim_pid_of("containerd-shim-runc-v2", pod)
                .unwrap_or_else(|| panic!("pod {pod}: no runc shim"));
            // The shim's waited-for children are the runc invocations; its
            // live children are the pause and the container process.
            let mut procs = vec![(shim, true)];
            procs.extend(children(shim).into_iter().map(|c| (c, false)));
            for (pid, waited) in procs {
                if let Some(fields) = stat_fields(pid) {
                    cpu += cpu_ms(&fields, waited);
                    pss += pss_kib(pid);
                }
            }
        }
    }
    for (pod, _, logs) in &started {
        remove_pod(&mut runtime.clone(), pod).await;
        let _ = std::fs::remove_dir_all(logs);
    }
    drop(guards);
    Figures {
        all_running_ms: round1(all_running.as_secs_f64() * 1e3),
        p50_pod_ms: round1(per_pod[per_pod.len() / 2]),
        host_cpu_ms_per_pod: round1(cpu / n as f64),
        guest_cpu_ms_per_pod: (handler == "zygote").then(|| round1(guest / n as f64)),
        pss_mib_per_idle_pod: round1(pss as f64 / 1024.0 / n as f64),
    }
}

fn main() {
    let n = count();
    cri_test(|channel| async move {
        let mut runtime = RuntimeServiceClient::new(channel);
        remove_stale_pods(&mut runtime, "zpods-").await;
        // One pod of each first: the template and containerd's caches warm.
        for handler in ["zygote", "runc"] {
            let (pod, took, logs) = one_pod(runtime.clone(), handler, 999).await;
            eprintln!("{handler}: warm-up pod in {:.1} s", took.as_secs_f64());
            remove_pod(&mut runtime, &pod).await;
            let _ = std::fs::remove_dir_all(logs);
        }
        let zygote = measure(&runtime, "zygote", n).await;
        let runc = measure(&runtime, "runc", n).await;
        println!(
            "pods ({n} at once, CRI + CNI, busybox sleep): zygote all running {:.1} s (p50 pod {:.1} s), \
             host CPU {} ms/pod (+ guest {} ms/pod), PSS {} MiB/idle pod; runc all running {:.1} s \
             (p50 pod {:.1} s), host CPU {} ms/pod, PSS {} MiB/idle pod",
            zygote.all_running_ms / 1e3,
            zygote.p50_pod_ms / 1e3,
            zygote.host_cpu_ms_per_pod,
            zygote.guest_cpu_ms_per_pod.unwrap_or(0.0),
            zygote.pss_mib_per_idle_pod,
            runc.all_running_ms / 1e3,
            runc.p50_pod_ms / 1e3,
            runc.host_cpu_ms_per_pod,
            runc.pss_mib_per_idle_pod,
        );
        let figures = |f: &Figures| {
            let mut m = HashMap::new();
            m.insert("all_running_ms", serde_json::json!(f.all_running_ms));
            m.insert("p50_pod_ms", serde_json::json!(f.p50_pod_ms));
            m.insert(
                "host_cpu_ms_per_pod",
                serde_json::json!(f.host_cpu_ms_per_pod),
            );
            m.insert(
                "pss_mib_per_idle_pod",
                serde_json::json!(f.pss_mib_per_idle_pod),
            );
            if let Some(g) = f.guest_cpu_ms_per_pod {
                m.insert("guest_cpu_ms_per_pod", serde_json::json!(g));
            }
            m
        };
        println!(
            "{}",
            serde_json::json!({"count": n, "zygote": figures(&zygote), "runc": figures(&runc)})
        );
    });
}
