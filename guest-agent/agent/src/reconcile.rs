//! The reconcile: turn a fork — a byte-for-byte copy of the template — into its
//! own machine (DESIGN.md, "The reconcile").
//!
//! freeze the workload → entropy (RNDADDENTROPY + RNDRESEEDCRNG) → clock (step
//! CLOCK_REALTIME to the host's time + half the round trip) → identity
//! (hostname, machine-id, hosts, resolv.conf) → network → audit every process
//! that existed at the fork point, classified by what it is ([`crate::detect`])
//! and handled by policy → thaw → start again what was restarted. Each step is
//! timed and reported.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use zygote_agent_api::{
    Action, ClockReading, PolicyRule, ProcessReport, Reconcile, ReconcileReport, ReconcileStep,
    SampleResult,
};

use crate::detect::{self, Class};
use crate::workload;

/// The generation in force (0: the template's own, never reconciled).
static GENERATION: AtomicU64 = AtomicU64::new(0);
/// Least entropy the host must send, bytes.
pub const MIN_ENTROPY: usize = 64;

/// A request that cannot be applied.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    /// Too little entropy.
    #[error("entropy: {0} bytes given, at least {MIN_ENTROPY} needed")]
    Entropy(usize),
    /// Not a hostname.
    #[error("invalid hostname {0:?}")]
    Hostname(String),
    /// Not 32 lowercase hex digits.
    #[error("invalid machine id {0:?} (32 lowercase hex digits)")]
    MachineId(String),
    /// A policy names an unknown class.
    #[error("policy names unknown class {0:?}")]
    Class(String),
    /// Generation 0 is the template's own.
    #[error("generation must be at least 1")]
    Generation,
    /// The network identity is not one the VM can take.
    #[error(transparent)]
    Network(#[from] crate::net::InvalidNetwork),
}

fn valid_hostname(h: &str) -> bool {
    !h.is_empty()
        && h.len() <= 64
        && h.split('.').all(|label| {
            !label.is_empty()
                && !label.starts_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

const CLASSES: [Class; 6] = [
    Class::Go,
    Class::Jvm,
    Class::Python,
    Class::Node,
    Class::Openssl,
    Class::Native,
];

/// The action for each class: the defaults, overridden by `policy`.
fn actions(policy: &[PolicyRule]) -> Result<HashMap<&'static str, (Action, i32)>, ReconcileError> {
    let mut map: HashMap<&'static str, (Action, i32)> = CLASSES
        .iter()
        .map(|c| {
            let default = if *c == Class::Go {
                Action::Restart
            } else {
                Action::Keep
            };
            (c.name(), (default, 0))
        })
        .collect();
    for rule in policy {
        let entry = map
            .get_mut(rule.class.as_str())
            .ok_or_else(|| ReconcileError::Class(rule.class.clone()))?;
        let action = Action::try_from(rule.action).unwrap_or(Action::Default);
        if action != Action::Default {
            *entry = (action, rule.signal);
        }
    }
    Ok(map)
}

/// Checks a request before anything is changed.
pub fn validate(req: &Reconcile) -> Result<(), ReconcileError> {
    if req.generation == 0 {
        return Err(ReconcileError::Generation);
    }
    if req.entropy.len() < MIN_ENTROPY {
        return Err(ReconcileError::Entropy(req.entropy.len()));
    }
    if !valid_hostname(&req.hostname) {
        return Err(ReconcileError::Hostname(req.hostname.clone()));
    }
    let id = &req.machine_id;
    if id.len() != 32
        || !id
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return Err(ReconcileError::MachineId(id.clone()));
    }
    actions(&req.policy)?;
    crate::net::validate(&req.interfaces, &req.routes)?;
    Ok(())
}

struct Steps {
    steps: Vec<ReconcileStep>,
}

impl Steps {
    fn run(&mut self, name: &str, f: impl FnOnce() -> String) {
        let t = Instant::now();
        let detail = f();
        self.steps.push(ReconcileStep {
            name: name.into(),
            elapsed_ns: t.elapsed().as_nanos() as u64,
            detail,
        });
    }
}

/// Whether the workload cgroup holds a process (reading its `cgroup.procs`:
/// one read, where freezing an empty cgroup costs a write and a wait).
fn workload_running() -> bool {
    std::fs::read_to_string(Path::new(workload::CGROUP).join("cgroup.procs"))
        .is_ok_and(|procs| !procs.trim().is_empty())
}

fn freeze(on: bool) -> String {
    let dir = Path::new(workload::CGROUP);
    if !dir.exists() {
        return "no workload cgroup".into();
    }
    if let Err(e) = std::fs::write(dir.join("cgroup.freeze"), if on { "1" } else { "0" }) {
        return format!("failed: {e}");
    }
    // Freezing completes asynchronously; cgroup.events says when.
    let want = if on { "frozen 1" } else { "frozen 0" };
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline {
        if std::fs::read_to_string(dir.join("cgroup.events")).is_ok_and(|e| e.contains(want)) {
            return if on {
                "workload frozen"
            } else {
                "workload thawed"
            }
            .into();
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    format!("{want} not reached within 2 s")
}

/// Adds `bytes` to the kernel's pool, credited, and forces a reseed of the CRNG
/// (which also invalidates vDSO getrandom states).
fn add_entropy(bytes: &[u8]) -> String {
    const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
    const RNDRESEEDCRNG: libc::c_ulong = 0x5207;
    let file = match std::fs::File::options().write(true).open("/dev/urandom") {
        Ok(f) => f,
        Err(e) => return format!("failed: /dev/urandom: {e}"),
    };
    // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
    let mut info = Vec::with_capacity(8 + bytes.len());
    info.extend_from_slice(&((bytes.len() * 8) as i32).to_ne_bytes());
    info.extend_from_slice(&(bytes.len() as i32).to_ne_bytes());
    info.extend_from_slice(bytes);
    info.resize(8 + bytes.len().next_multiple_of(4), 0);
    use std::os::fd::AsRawFd;
    // SAFETY: `info` is a rand_pool_info with buf_size bytes following the header.
    let added = unsafe { libc::ioctl(file.as_raw_fd(), RNDADDENTROPY, info.as_ptr()) };
    if added != 0 {
        return format!("failed: RNDADDENTROPY: {}", std::io::Error::last_os_error());
    }
    // SAFETY: RNDRESEEDCRNG takes no argument.
    let reseeded = unsafe { libc::ioctl(file.as_raw_fd(), RNDRESEEDCRNG) };
    if reseeded != 0 {
        return format!(
            "{} bytes added; RNDRESEEDCRNG failed: {}",
            bytes.len(),
            std::io::Error::last_os_error()
        );
    }
    format!("{} bytes added, CRNG reseeded", bytes.len())
}

fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec to fill.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Steps CLOCK_REALTIME to `target_ns`; returns the step.
fn set_realtime(target_ns: u64) -> Result<i64, std::io::Error> {
    let before = clock_ns(libc::CLOCK_REALTIME);
    let ts = libc::timespec {
        tv_sec: (target_ns / 1_000_000_000) as libc::time_t,
        tv_nsec: (target_ns % 1_000_000_000) as libc::c_long,
    };
    // SAFETY: a valid timespec.
    if unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(target_ns as i64 - before as i64)
}

fn set_identity(req: &Reconcile) -> String {
    let mut failed = Vec::new();
    // SAFETY: the pointer and length describe the hostname's bytes.
    if unsafe { libc::sethostname(req.hostname.as_ptr().cast(), req.hostname.len()) } != 0 {
        failed.push(format!("sethostname: {}", std::io::Error::last_os_error()));
    }
    let _ = std::fs::create_dir_all("/etc");
    let mut files = vec![
        ("/etc/hostname", format!("{}\n", req.hostname)),
        ("/etc/machine-id", format!("{}\n", req.machine_id)),
        (
            "/etc/hosts",
            format!(
                "127.0.0.1\tlocalhost\n::1\tlocalhost\n127.0.1.1\t{}\n",
                req.hostname
            ),
        ),
    ];
    if !req.dns.is_empty() {
        let resolv: String = req
            .dns
            .iter()
            .map(|ns| format!("nameserver {ns}\n"))
            .collect();
        files.push(("/etc/resolv.conf", resolv));
    }
    for (path, text) in &files {
        if let Err(e) = std::fs::write(path, text) {
            failed.push(format!("{path}: {e}"));
        }
    }
    if failed.is_empty() {
        format!(
            "hostname {}, machine-id, hosts{}",
            req.hostname,
            if req.dns.is_empty() {
                ""
            } else {
                ", resolv.conf"
            }
        )
    } else {
        format!("failed: {}", failed.join("; "))
    }
}

/// Processes other than the agent: user-space ones, with their executable's
/// path (kernel threads have none).
fn processes() -> Vec<(u32, String)> {
    let me = std::process::id();
    let mut found: Vec<(u32, String)> = std::fs::read_dir("/proc")
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
                .filter(|&pid| pid != me && pid != 1)
                .filter_map(|pid| {
                    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).ok()?;
                    Some((pid, exe.to_string_lossy().into_owned()))
                })
                .collect()
        })
        .unwrap_or_default();
    found.sort_unstable();
    found
}

/// Applies `req` (already validated) and reports.
pub fn apply(req: &Reconcile, received: Instant) -> ReconcileReport {
    let start = received;
    if GENERATION.load(Ordering::SeqCst) == req.generation {
        return ReconcileReport {
            generation: req.generation,
            unchanged: true,
            ..Default::default()
        };
    }
    let actions = actions(&req.policy).expect("validated");
    let mut s = Steps { steps: Vec::new() };
    let mut clock_step_ns = 0;
    // Entropy and the clock first: every process, the agent's threads
    // included, reads them from the moment the fork runs.
    s.run("entropy", || add_entropy(&req.entropy));
    s.run("clock", || {
        let target = req.host_realtime_ns + req.rtt_ns / 2 + received.elapsed().as_nanos() as u64;
        match set_realtime(target) {
            Ok(step) => {
                clock_step_ns = step;
                format!("CLOCK_REALTIME stepped by {:.3} s", step as f64 / 1e9)
            }
            Err(e) => format!("failed: clock_settime: {e}"),
        }
    });
    // A workload cgroup with no process has nothing to freeze.
    let frozen = workload_running();
    s.run("freeze", || {
        if frozen {
            freeze(true)
        } else {
            "no workload process".into()
        }
    });
    s.run("identity", || set_identity(req));
    s.run("network", || {
        // Connections from before the fork first: their peers are another
        // machine's, whatever the NIC becomes.
        let sockets =
            crate::sockets::destroy_where(crate::sockets::TcpSocket::is_external_connection);
        let interfaces = match req.interfaces.first() {
            None => Ok("no interfaces given".to_string()),
            Some(iface) => crate::net::configure(iface, &req.routes),
        };
        match (interfaces, sockets.strip_prefix("failed: ")) {
            (Err(why), _) => format!("failed: {why}; {sockets}"),
            (Ok(done), Some(why)) => format!("failed: {why}; {done}"),
            (Ok(done), None) => format!("{done}; {sockets}"),
        }
    });
    let mut reports = Vec::new();
    let mut to_restart = Vec::new();
    s.run("audit", || {
        // The agent is PID 1, the ancestor of every user process: if it has
        // started none, there is nothing to find (and no /proc to walk).
        if !crate::procs::spawned_any() {
            return "no process: the agent has started none".into();
        }
        for (pid, exe) in processes() {
            let c = detect::classify_pid(pid);
            let (action, signal) = actions[c.class.name()];
            let result = match action {
                Action::Restart => match workload::kill(pid) {
                    Some(spec) => {
                        to_restart.push((reports.len(), spec));
                        "killed; started again after the thaw".to_string()
                    }
                    None => "kept: not started by the agent, so it cannot be restarted".into(),
                },
                Action::Notify => {
                    let sig = if signal == 0 { libc::SIGHUP } else { signal };
                    // SAFETY: kill(2) with a pid read from /proc; a process gone meanwhile gets ESRCH.
                    let rc = unsafe { libc::kill(pid as i32, sig) };
                    if rc == 0 {
                        format!("sent signal {sig}")
                    } else {
                        format!("signal failed: {}", std::io::Error::last_os_error())
                    }
                }
                Action::Keep | Action::Default => "kept".into(),
            };
            reports.push(ProcessReport {
                pid,
                exe,
                class: c.class.name().into(),
                runtime_version: c.version,
                evidence: c.evidence,
                action: action as i32,
                result,
                new_pid: 0,
            });
        }
        format!("{} processes found", reports.len())
    });
    s.run("thaw", || {
        if frozen {
            freeze(false)
        } else {
            "nothing frozen".into()
        }
    });
    s.run("restart", || {
        let n = to_restart.len();
        for (i, spec) in to_restart.drain(..) {
            match workload::spawn(&spec) {
                Ok(pid) => {
                    reports[i].new_pid = pid;
                    reports[i].result = format!("restarted as pid {pid}");
                }
                Err(e) => reports[i].result = format!("killed; restart failed: {e}"),
            }
        }
        format!("{n} processes restarted")
    });
    GENERATION.store(req.generation, Ordering::SeqCst);
    ReconcileReport {
        generation: req.generation,
        unchanged: false,
        steps: s.steps,
        processes: reports,
        clock_step_ns,
        total_ns: start.elapsed().as_nanos() as u64,
    }
}

/// Steps CLOCK_REALTIME by `delta_ns` (bounded to ±1 day: a larger correction
/// is a host bug, not drift).
pub fn step_clock(delta_ns: i64) -> Result<(), String> {
    const DAY: i64 = 86_400 * 1_000_000_000;
    if !(-DAY..=DAY).contains(&delta_ns) {
        return Err(format!(
            "clock step of {delta_ns} ns refused (limit ±1 day)"
        ));
    }
    let now = clock_ns(libc::CLOCK_REALTIME) as i64;
    set_realtime((now + delta_ns) as u64)
        .map(|_| ())
        .map_err(|e| format!("clock_settime: {e}"))
}

/// The guest's clocks, read back to back (nothing else: see `ReadClock`).
pub fn read_clock() -> ClockReading {
    ClockReading {
        realtime_ns: clock_ns(libc::CLOCK_REALTIME),
        monotonic_ns: clock_ns(libc::CLOCK_MONOTONIC),
    }
}

/// The guest's clocks, identity and 32 fresh random bytes.
pub fn sample() -> SampleResult {
    let mut random = vec![0u8; 32];
    // SAFETY: the pointer and length describe `random`.
    let n = unsafe { libc::getrandom(random.as_mut_ptr().cast(), random.len(), 0) };
    random.truncate(n.max(0) as usize);
    let read = |p: &str| {
        std::fs::read_to_string(p)
            .unwrap_or_default()
            .trim()
            .to_string()
    };
    let (uuid, hostname, machine_id) = (
        read("/proc/sys/kernel/random/uuid"),
        crate::sys::hostname(),
        read("/etc/machine-id"),
    );
    // The clocks last, right before the answer goes out: the host takes the
    // midpoint of its round trip as the moment they were read (guest
    // syscalls are slow on PVM, and read first they biased the offset).
    SampleResult {
        realtime_ns: clock_ns(libc::CLOCK_REALTIME),
        monotonic_ns: clock_ns(libc::CLOCK_MONOTONIC),
        boottime_ns: clock_ns(libc::CLOCK_BOOTTIME),
        random,
        uuid,
        hostname,
        machine_id,
        generation: GENERATION.load(Ordering::SeqCst),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request() -> Reconcile {
        Reconcile {
            generation: 1,
            entropy: vec![7; 64],
            hostname: "fork-1".into(),
            machine_id: "0123456789abcdef0123456789abcdef".into(),
            ..Default::default()
        }
    }

    #[test]
    fn requests_are_validated_before_anything_changes() {
        validate(&request()).unwrap();
        let bad = |f: fn(&mut Reconcile)| {
            let mut r = request();
            f(&mut r);
            validate(&r).unwrap_err()
        };
        assert!(matches!(
            bad(|r| r.generation = 0),
            ReconcileError::Generation
        ));
        assert!(matches!(
            bad(|r| r.entropy.truncate(63)),
            ReconcileError::Entropy(63)
        ));
        assert!(matches!(
            bad(|r| r.hostname = "a b".into()),
            ReconcileError::Hostname(_)
        ));
        assert!(matches!(
            bad(|r| r.hostname = "-x".into()),
            ReconcileError::Hostname(_)
        ));
        assert!(matches!(
            bad(|r| r.machine_id = "ABC".into()),
            ReconcileError::MachineId(_)
        ));
        assert!(matches!(
            bad(|r| r.policy = vec![PolicyRule {
                class: "cobol".into(),
                action: 1,
                signal: 0
            }]),
            ReconcileError::Class(_)
        ));
    }

    #[test]
    fn go_restarts_by_default_and_policy_overrides() {
        let a = actions(&[]).unwrap();
        assert_eq!(a["go"].0, Action::Restart);
        assert_eq!(a["native"].0, Action::Keep);
        assert_eq!(a["openssl"].0, Action::Keep);
        let a = actions(&[
            PolicyRule {
                class: "go".into(),
                action: Action::Keep as i32,
                signal: 0,
            },
            PolicyRule {
                class: "python".into(),
                action: Action::Notify as i32,
                signal: 10,
            },
        ])
        .unwrap();
        assert_eq!(a["go"], (Action::Keep, 0));
        assert_eq!(a["python"], (Action::Notify, 10));
    }

    #[test]
    fn sample_reads_clocks_and_randomness() {
        let a = sample();
        let b = sample();
        assert_eq!(a.random.len(), 32);
        assert_ne!(a.random, b.random);
        assert!(b.monotonic_ns >= a.monotonic_ns);
        assert_eq!(a.uuid.len(), 36);
    }
}
