//! Where a pod VM's guest CPU goes, phase by phase. The shim marks the end of
//! each phase as it happens (the agent ready after the fork, the reconcile,
//! each container's create, start, exit and delete); a phase's figure is the
//! vCPU threads' CPU time inside `KVM_RUN` since the previous mark. On PVM
//! that time also holds host-kernel work done inside `KVM_RUN` on the
//! guest's behalf (emulation, shadow paging, copy-on-write faults of the
//! template's memory): it is the cost of the guest running, not purely
//! guest instructions.

use std::time::{Duration, Instant};

/// One phase.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Phase {
    /// `fork`, `reconcile`, `create`, `start`, `exit` or `delete`.
    pub name: &'static str,
    /// vCPU CPU time inside `KVM_RUN` during the phase, ms.
    pub guest_cpu_ms: f64,
    /// Wall time of the phase, ms.
    pub wall_ms: f64,
}

/// The phases so far.
#[derive(Debug)]
pub struct Phases {
    last_cpu: Duration,
    last_at: Instant,
    done: Vec<Phase>,
}

impl Phases {
    /// Counting from `at`, when the guest had used `cpu`.
    pub fn new(at: Instant, cpu: Duration) -> Self {
        Phases {
            last_cpu: cpu,
            last_at: at,
            done: Vec::new(),
        }
    }

    /// Ends phase `name` now, the guest having used `cpu` in all.
    pub fn mark(&mut self, name: &'static str, cpu: Duration) {
        let now = Instant::now();
        self.done.push(Phase {
            name,
            guest_cpu_ms: cpu.saturating_sub(self.last_cpu).as_secs_f64() * 1e3,
            wall_ms: now.saturating_duration_since(self.last_at).as_secs_f64() * 1e3,
        });
        self.last_cpu = cpu.max(self.last_cpu);
        self.last_at = now;
    }

    /// The phases ended so far, in order.
    pub fn list(&self) -> &[Phase] {
        &self.done
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_phase_takes_the_cpu_since_the_mark_before() {
        let start = Instant::now();
        let mut phases = Phases::new(start, Duration::ZERO);
        phases.mark("fork", Duration::from_millis(300));
        phases.mark("reconcile", Duration::from_millis(450));
        // A reading that went backwards (a vCPU loop ending between reads)
        // counts as nothing, not as a negative phase.
        phases.mark("create", Duration::from_millis(440));
        phases.mark("start", Duration::from_millis(500));
        let cpu: Vec<_> = phases
            .list()
            .iter()
            .map(|p| (p.name, p.guest_cpu_ms.round()))
            .collect();
        assert_eq!(
            cpu,
            [
                ("fork", 300.0),
                ("reconcile", 150.0),
                ("create", 0.0),
                ("start", 50.0)
            ]
        );
        assert!(phases.list().iter().all(|p| p.wall_ms >= 0.0));
    }
}
