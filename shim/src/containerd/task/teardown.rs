//! The end of a pod: its VM stopped when its last task is gone (its timings
//! logged), and the shim's own end when containerd asks for it.

use std::sync::Arc;

use super::super::pod::{Phase, PodEnd, PodTimings};
use super::TaskService;

impl TaskService {
    /// containerd's `shutdown`: the shim ends only when no task is left.
    pub async fn shutdown_if_idle(&self) {
        if self.state().table.is_empty() {
            self.teardown_if_idle().await;
            self.flush_events().await;
            self.exit.signal();
        }
    }

    /// With no task left, the pod's VM goes, and nothing of it stays.
    pub(super) async fn teardown_if_idle(&self) {
        let (pod, network, cgroup) = {
            let mut state = self.state();
            if !state.table.is_empty() {
                return;
            }
            state.volume_watch = None;
            (
                state.pod.take(),
                state.pod_network.take(),
                state.pod_cgroup.take(),
            )
        };
        if let Some(network) = network {
            // A pod removed before any container: its tap goes.
            let _ = tokio::task::spawn_blocking(move || drop(network)).await;
        }
        let leave = |cgroup: Option<super::super::cgroup::PodCgroup>| {
            if let Some(mut cg) = cgroup {
                // The VM's threads are gone (or go along): nothing stays in it.
                cg.leave();
            }
        };
        let Some(pod) = pod else {
            leave(cgroup);
            return;
        };
        tracing::info!("stopping the pod VM");
        let (template, timings) = (pod.template.clone(), pod.timings);
        let steps = pod.reconcile_steps.clone();
        let ended = tokio::task::spawn_blocking(move || {
            // Waiter and OOM threads hold references for a moment after an exit.
            let mut pod = pod;
            for _ in 0..100 {
                match Arc::try_unwrap(pod) {
                    Ok(p) => return Ok(p.shutdown()),
                    Err(again) => pod = again,
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            tracing::warn!("the pod VM is still referenced; it stops with the shim");
            pod.mark("teardown");
            Err(pod.phases())
        })
        .await;
        match ended {
            Ok(Ok(end)) => {
                let phases = end.phases.clone();
                self.log_timings(&template, timings, &steps, &phases, Some(end));
            }
            // What is known is still written: the phases, without the end.
            Ok(Err(phases)) => self.log_timings(&template, timings, &steps, &phases, None),
            Err(e) => tracing::warn!("the pod VM's teardown failed: {e}"),
        }
        leave(cgroup);
    }

    /// Appends the pod VM's timings to the configured log (benchmarks read it).
    /// `end` is None when the VM could not be stopped here (it stops with the
    /// shim); `phases` are those ended.
    fn log_timings(
        &self,
        template: &str,
        timings: PodTimings,
        reconcile_steps: &[(String, f64)],
        phases: &[Phase],
        end: Option<PodEnd>,
    ) {
        let Some(path) = self.state().timings_log.clone() else {
            return;
        };
        let line = serde_json::json!({
            "template": template,
            "pod": timings,
            "reconcile_steps_ms": reconcile_steps
                .iter()
                .map(|(name, ms)| (name.clone(), serde_json::json!(ms)))
                .collect::<serde_json::Map<_, _>>(),
            "phases": phases,
            "end": end,
        });
        use std::io::Write;
        let written = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .and_then(|mut f| writeln!(f, "{line}"));
        if let Err(e) = written {
            tracing::warn!("timings log {}: {e}", path.display());
        }
    }
}
