//! The threads that watch the pod VM for the Task service: one exit waiter
//! per started process, the monitor of the VM and its agent, the OOM stream.
//! None holds a strong reference to the VM: each ends when the VM goes.
//!
//! An exit status is never invented: a waiter that loses its connection
//! while the VM still runs dials again (the agent keeps the status until
//! the process is removed); only a VM that stopped — by itself, or halted by
//! the monitor because its agent stopped answering — makes its processes
//! exit with 255 (as Kata reports them), and then none of them runs any more.

use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use zygote_agent_api::ContainerRef;

use super::super::io::Outputs;
use super::super::pod::{PodError, PodVm, ProcessExit, process_demand};
use super::super::volumes::Copied;
use super::super::volumes::watch::{Watcher, write_back};
use super::TaskService;
use super::events::now_ns;

/// How often the monitor looks at the pod VM (host side only: no guest work).
const MONITOR_INTERVAL: Duration = Duration::from_millis(500);
/// How often it pings the agent, and how long an answer may take.
const PING_INTERVAL: Duration = Duration::from_secs(10);
const PING_TIMEOUT: Duration = Duration::from_secs(10);
/// Unanswered pings in a row that make the guest unresponsive, when its
/// vCPUs did no work meanwhile (stopped, or waiting for nothing).
const PINGS_MISSED: u32 = 2;
/// The same for a guest whose vCPUs kept working: busy (e.g. many VMs on
/// few host CPUs, each guest's agent slow to be scheduled), not hung — until
/// this many. A guest spinning without its agent ever answering is caught
/// here, later.
const BUSY_PINGS_MISSED: u32 = 18;
/// The same while the pod's host cgroup kept hitting its memory limit: the
/// host reclaims the VM's memory from under it instead of OOM-killing it
/// (guest memory is faulted in by KVM, where the memory cgroup does not
/// kill), and the guest crawls: the pod is out of memory.
const STARVED_PINGS_MISSED: u32 = 3;
/// The exit status of a process whose pod was out of memory on the host
/// (SIGKILL's, as a process the OOM killer kills under runc).
const OOM_STATUS: u32 = 128 + 9;

/// Whether a pod whose threads (vCPUs, devices, shim) ran or waited
/// runnable for a host CPU (`demand`) for that long over `wall` is at
/// work: at least a tenth of the time. An idle one (a halted guest but for
/// its timers and agent, ~3% of a vCPU on a PVM host) is below; a busy one
/// is far above even when twenty VMs share two host CPUs (measured there:
/// 45-55%, of which its guest ran 5%; the rest its threads waited for a
/// CPU, or its guest for its starved host side). Wrongly "working" only
/// delays halting a hung guest; wrongly idle kills a healthy pod: the
/// threshold leans to the first.
fn working(demand: Duration, wall: Duration) -> bool {
    !wall.is_zero() && demand * 10 >= wall
}

/// The monitor's verdict on the agent's answers to its pings.
#[derive(Debug, Default)]
struct Liveness {
    /// Unanswered pings in a row.
    missed: u32,
    /// Of which while the guest did no work.
    idle_missed: u32,
    /// Of which while the pod's host cgroup hit its memory limit.
    starved_missed: u32,
}

impl Liveness {
    /// Records a ping's outcome (`busy`: the guest's vCPUs worked since the
    /// last ping; `starved`: its host cgroup hit its memory limit since);
    /// Some(description) once the guest counts as unresponsive.
    fn record(&mut self, answered: bool, busy: bool, starved: bool) -> Option<String> {
        if answered {
            *self = Liveness::default();
            return None;
        }
        self.missed += 1;
        if !busy {
            self.idle_missed += 1;
        }
        if starved {
            self.starved_missed += 1;
        }
        if self.starved() {
            Some(format!(
                "the agent did not answer {} pings within {PING_TIMEOUT:?} while the pod's \
                 host cgroup kept hitting its memory limit: out of memory",
                self.missed
            ))
        } else if self.idle_missed >= PINGS_MISSED {
            Some(format!(
                "the agent did not answer {} pings within {PING_TIMEOUT:?}, the guest doing no work",
                self.missed
            ))
        } else if self.missed >= BUSY_PINGS_MISSED {
            Some(format!(
                "the agent did not answer {} pings within {PING_TIMEOUT:?} while the guest kept running",
                self.missed
            ))
        } else {
            None
        }
    }

    /// Unresponsive because the pod ran out of memory on the host.
    fn starved(&self) -> bool {
        self.starved_missed >= STARVED_PINGS_MISSED
    }
}
/// How long an exec's exit waits for its output to reach containerd: a
/// background child of the exec may hold its stdout open for as long as it
/// lives (`sh -c 'sleep 600 & echo hi'`; Kata #869). Its copy goes on.
const EXEC_OUTPUT_GRACE: Duration = Duration::from_secs(2);
/// Pause before a waiter whose connection broke dials again.
const REDIAL_PAUSE: Duration = Duration::from_millis(200);

/// The status of processes whose VM stopped under them.
pub const VM_GONE_STATUS: u32 = 255;

impl TaskService {
    /// Waits for `process`'s exit on a connection of its own (whose stream is
    /// returned, to be shut down if the VM dies), then reports it once its
    /// output has reached containerd (an exec's: at most a grace).
    pub(super) fn spawn_waiter(
        &self,
        pod: &Arc<PodVm>,
        process: ContainerRef,
        outputs: Outputs,
    ) -> Result<Option<std::os::unix::net::UnixStream>, PodError> {
        // A first dial that fails is dialled again by the waiter itself: a
        // started process must get its exit reported.
        let first = pod
            .wait_for(process.clone())
            .map_err(|e| {
                tracing::warn!(
                    "{} {}: {e}; the waiter dials again",
                    process.id,
                    process.exec_id
                )
            })
            .ok();
        let stream = first.as_ref().and_then(|w| w.stream().ok());
        let (service, weak) = (self.clone(), Arc::downgrade(pod));
        std::thread::Builder::new()
            .name("wait".into())
            .spawn(move || {
                let wanted = || {
                    let mut state = service.state();
                    state.table.process(&process.id, &process.exec_id).is_ok()
                };
                let Some(exit) = wait_exit(&weak, &process, first, wanted) else {
                    return;
                };
                if let Some(pod) = weak.upgrade() {
                    pod.mark("exit");
                }
                let what = format!("{} {}", process.id, process.exec_id);
                tracing::info!("{what} exited {}", exit.status);
                if process.exec_id.is_empty() {
                    service.write_back(&weak, &process.id);
                    outputs.drain();
                } else if !outputs.drain_within(EXEC_OUTPUT_GRACE) {
                    tracing::info!(
                        "{what}: its output is still open (a background child); exit reported"
                    );
                }
                service.exited(&process.id, &process.exec_id, exit);
            })
            .map_err(|e| PodError::Stopped(format!("cannot start a waiter thread: {e}")))?;
        Ok(stream)
    }

    /// Copies what container `id` left in its writable file volumes (the
    /// termination log) back to the host files, before its exit is reported.
    fn write_back(&self, pod: &Weak<PodVm>, id: &str) {
        let copied = match self.state().table.container(id) {
            Ok(c) => c.copied.clone(),
            Err(_) => return,
        };
        let Some(pod) = pod.upgrade() else { return };
        for c in copied.iter().filter(|c| c.write_back) {
            let max = super::super::volumes::MAX_COPIED_BYTES as u32;
            let written = pod
                .read_volume(id, &c.name, max)
                .map_err(|e| e.to_string())
                .and_then(|mut data| {
                    // The guest's answer is not trusted to keep to the bound.
                    data.truncate(max as usize);
                    write_back(&c.host, &data).map_err(|e| e.to_string())
                });
            if let Err(e) = written {
                tracing::warn!("{id}: cannot write {} back: {e}", c.host.display());
            }
        }
    }

    /// Keeps container `id`'s copied volumes current in the pod's VM (the
    /// pod's watcher started with the first).
    pub(super) fn watch_volumes(&self, pod: &Arc<PodVm>, id: &str, copied: &[Copied]) {
        if copied.is_empty() {
            return;
        }
        let mut state = self.state();
        if state.volume_watch.is_none() {
            let weak = Arc::downgrade(pod);
            let send = move |id: &str, v: zygote_agent_api::Volume| match weak.upgrade() {
                Some(pod) => pod.update_volume(id, v).map_err(|e| e.to_string()),
                None => Err("the pod's VM is gone".into()),
            };
            match Watcher::start(Box::new(send)) {
                Ok(w) => state.volume_watch = Some(Arc::new(w)),
                Err(e) => {
                    tracing::error!("{id}: cannot watch volumes ({e}); they will not be updated");
                    return;
                }
            }
        }
        if let Some(w) = &state.volume_watch {
            w.add(id, copied);
        }
    }

    /// Records an exit and publishes TaskExit (once per process).
    pub(super) fn exited(&self, id: &str, exec_id: &str, exit: ProcessExit) {
        let recorded = {
            let mut state = self.state();
            match state.table.process(id, exec_id) {
                Ok(p) => p.set_exit(exit),
                Err(_) => false,
            }
        };
        if recorded {
            self.publish_exit(id, exec_id, exit);
        }
    }

    /// Watches the pod VM: if it stops (a guest panic, a VMM error), or its
    /// agent stops answering (then it is halted first, so that nothing of it
    /// runs on), every task still running is marked exited with the reason
    /// logged, so containerd and kubelet see it.
    pub(super) fn monitor(&self, pod: &Arc<PodVm>) {
        let (service, weak) = (self.clone(), Arc::downgrade(pod));
        let spawned = std::thread::Builder::new()
            .name("monitor".into())
            .spawn(move || {
                let mut liveness = Liveness::default();
                let mut last_ping = Instant::now();
                let (mut demand_at_ping, mut cpu_at_ping) = (Duration::ZERO, Duration::ZERO);
                let limit_hits = || {
                    let state = service.state();
                    state
                        .pod_cgroup
                        .as_ref()
                        .map_or(0, |c| c.memory_limit_hits())
                };
                let mut hits_at_ping = limit_hits();
                loop {
                    std::thread::sleep(MONITOR_INTERVAL);
                    let Some(pod) = weak.upgrade() else { return };
                    let mut dead = pod.check().err().map(|e| e.to_string());
                    if dead.is_none() && last_ping.elapsed() >= PING_INTERVAL {
                        let since = last_ping.elapsed();
                        last_ping = Instant::now();
                        let pinged = pod.ping(PING_TIMEOUT);
                        let (demand, cpu) = (process_demand(), pod.guest_cpu());
                        // What the pod ran or waited to run since the last
                        // ping: working, or not.
                        let (worked, wall) = (
                            demand.saturating_sub(demand_at_ping),
                            since + last_ping.elapsed(),
                        );
                        let busy = working(worked, wall);
                        if let Err(e) = &pinged {
                            tracing::warn!(
                                "the agent did not answer a ping within {PING_TIMEOUT:?} ({e}); \
                                 the pod {} (ran or waited to run {} ms of the last {} ms; \
                                 guest CPU {} ms)",
                                if busy { "is working" } else { "did no work" },
                                worked.as_millis(),
                                wall.as_millis(),
                                cpu.saturating_sub(cpu_at_ping).as_millis()
                            );
                        }
                        let hits = limit_hits();
                        let starved = hits > hits_at_ping;
                        (demand_at_ping, cpu_at_ping, hits_at_ping) = (demand, cpu, hits);
                        if let Some(why) = liveness.record(pinged.is_ok(), busy, starved) {
                            let (reason, ended) = if liveness.starved() {
                                // Said before any exit, so the CRI records
                                // the containers OOMKilled.
                                service.publish_ooms();
                                pod.halt_out_of_memory()
                            } else {
                                pod.halt()
                            };
                            let threads = if ended {
                                "its vCPU threads ended"
                            } else {
                                "its vCPU threads are held outside KVM_RUN (stopped) \
                                 and end when they run"
                            };
                            dead =
                                Some(format!("{why}; the VM was halted ({reason:?}; {threads})"));
                        }
                    }
                    let Some(why) = dead else { continue };
                    drop(pod);
                    tracing::error!(
                        "the pod VM failed: {why}; its running tasks are marked exited"
                    );
                    service.fail_all(liveness.starved());
                    return;
                }
            });
        if let Err(e) = spawned {
            tracing::error!("no monitor for the pod VM: {e}");
        }
    }

    /// Marks every running process in the (stopped) VM exited (`oom`: it
    /// ran out of memory on the host).
    fn fail_all(&self, oom: bool) {
        let running = self.state().table.running_in_vm();
        let exit = gone(oom);
        for (id, exec_id) in running {
            self.exited(&id, &exec_id, exit);
        }
    }

    /// A TaskOOM for each container running in the VM (the CRI then
    /// reports it `OOMKilled`).
    fn publish_ooms(&self) {
        let running = self.state().table.running_in_vm();
        for (id, _) in running.iter().filter(|(_, exec)| exec.is_empty()) {
            self.events.publish_oom(id);
        }
    }

    /// Publishes TaskOOM for each OOM kill in the VM.
    pub(super) fn watch_ooms(&self, pod: &PodVm) {
        // Its own connection, and no hold on the VM: it ends when the VM does.
        let ooms = match pod.oom_stream() {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("no OOM events: {e}");
                return;
            }
        };
        let service = self.clone();
        let spawned = std::thread::Builder::new()
            .name("oom".into())
            .spawn(move || {
                let mut limit = super::untrusted::RateLimited::new(Duration::from_secs(10));
                for id in ooms {
                    let known = service.state.lock().is_ok_and(|s| s.table.contains(&id));
                    if super::untrusted::oom_to_publish(&id, known, &mut limit, Instant::now()) {
                        service.events.publish_oom(&id);
                    }
                }
            });
        if let Err(e) = spawned {
            tracing::warn!("no OOM events: {e}");
        }
    }
}

/// `process`'s exit: from the agent, dialling again while the VM runs; the
/// VM's fate if it stopped. None when nobody wants it any more (the process
/// was deleted) or the agent no longer knows the process.
fn wait_exit(
    pod: &Weak<PodVm>,
    process: &ContainerRef,
    first: Option<super::super::pod::ExitWait>,
    wanted: impl Fn() -> bool,
) -> Option<ProcessExit> {
    let mut wait = first;
    loop {
        let error = match wait.take().map(|w| w.wait()) {
            Some(Ok(exit)) => return Some(exit),
            Some(Err(PodError::Agent(e))) if e.code().is_some() => {
                tracing::error!(
                    "{} {}: the agent cannot wait: {e}",
                    process.id,
                    process.exec_id
                );
                return None;
            }
            Some(Err(e)) => e.to_string(),
            None => String::new(),
        };
        if !wanted() {
            return None;
        }
        let Some(vm) = pod.upgrade() else {
            tracing::error!(
                "{} {}: the pod VM is gone ({error}); exit {VM_GONE_STATUS}",
                process.id,
                process.exec_id
            );
            return Some(gone(false));
        };
        if let Err(stopped) = vm.check() {
            let exit = gone(vm.out_of_memory());
            tracing::error!(
                "{} {}: {stopped}; exit {}",
                process.id,
                process.exec_id,
                exit.status
            );
            return Some(exit);
        }
        if !error.is_empty() {
            tracing::warn!(
                "{} {}: lost the wait ({error}); dialling again",
                process.id,
                process.exec_id
            );
        }
        std::thread::sleep(REDIAL_PAUSE);
        match vm.wait_for(process.clone()) {
            Ok(w) => wait = Some(w),
            Err(e) => tracing::warn!("{} {}: {e}", process.id, process.exec_id),
        }
    }
}

/// The exit of a process whose VM stopped under it (`oom`: halted for
/// running out of memory on the host).
fn gone(oom: bool) -> ProcessExit {
    ProcessExit {
        status: if oom { OOM_STATUS } else { VM_GONE_STATUS },
        at_ns: now_ns(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_idle_guests_background_is_not_work() {
        let wall = Duration::from_secs(20);
        assert!(!working(Duration::from_millis(600), wall), "3%: idle");
        assert!(working(Duration::from_secs(2), wall), "10%: working");
        assert!(working(Duration::from_secs(10), wall), "half: working");
        assert!(working(Duration::from_secs(19), wall));
        assert!(!working(Duration::ZERO, Duration::ZERO));
    }

    #[test]
    fn a_guest_doing_no_work_is_unresponsive_sooner_than_a_busy_one() {
        let mut idle = Liveness::default();
        assert_eq!(idle.record(false, false, false), None);
        let why = idle.record(false, false, false).expect("two idle misses");
        assert!(why.contains("doing no work"), "{why}");

        let mut busy = Liveness::default();
        for n in 1..BUSY_PINGS_MISSED {
            assert_eq!(busy.record(false, true, false), None, "busy miss {n}");
        }
        let why = busy.record(false, true, false).expect("busy for too long");
        assert!(why.contains("kept running"), "{why}");

        // An answer clears the count; one idle miss among busy ones is not two.
        let mut mixed = Liveness::default();
        mixed.record(false, false, false);
        mixed.record(true, false, false);
        assert_eq!(mixed.record(false, false, false), None);
        assert_eq!(mixed.record(false, true, false), None);

        // Busy at its host memory limit: out of memory after a few misses.
        let mut starved = Liveness::default();
        for n in 1..STARVED_PINGS_MISSED {
            assert_eq!(starved.record(false, true, true), None, "starved miss {n}");
        }
        let why = starved.record(false, true, true).expect("starved");
        assert!(starved.starved() && why.contains("out of memory"), "{why}");
        assert!(!busy.starved());
    }
}
