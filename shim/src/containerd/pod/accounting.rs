//! Where this process's time goes, from the kernel's accounting: its
//! threads' time on CPU and waiting for one (the pod's demand), and its CPU
//! time.

use std::time::Duration;

/// Each live thread of this process: its name and its `schedstat` figures
/// (ns on CPU, ns waiting runnable for a CPU).
fn threads_schedstat() -> Vec<(String, u64, u64)> {
    let mut threads = Vec::new();
    for task in std::fs::read_dir("/proc/self/task")
        .into_iter()
        .flatten()
        .flatten()
    {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        let schedstat = std::fs::read_to_string(task.path().join("schedstat")).unwrap_or_default();
        let mut fields = schedstat
            .split_whitespace()
            .map(|n| n.parse::<u64>().unwrap_or(0));
        let (cpu, wait) = (fields.next().unwrap_or(0), fields.next().unwrap_or(0));
        threads.push((comm.trim().to_string(), cpu, wait));
    }
    threads
}

/// CPU time of this process's threads whose name starts with `prefix`
/// (live threads only).
pub(super) fn threads_cpu(prefix: &str, except: &str) -> Duration {
    let ns = threads_schedstat()
        .iter()
        .filter(|(comm, ..)| comm.starts_with(prefix) && comm != except)
        .map(|(_, cpu, _)| cpu)
        .sum();
    Duration::from_nanos(ns)
}

/// What this process's live threads ran plus what they waited runnable for
/// a host CPU: how much the pod (its VM, devices and shim) wanted to run.
pub fn process_demand() -> Duration {
    let ns = threads_schedstat()
        .iter()
        .map(|(_, cpu, wait)| cpu + wait)
        .sum();
    Duration::from_nanos(ns)
}

/// This process's CPU time, all its threads (live and ended), children not
/// included.
pub fn process_cpu_time() -> Duration {
    zygote_vmm::vstate::vcpu::clock_time(libc::CLOCK_PROCESS_CPUTIME_ID)
}
