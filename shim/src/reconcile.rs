//! The host's half of the reconcile: measure the round trip, send the fork its
//! generation, the host's time, fresh entropy and its identity, then sample
//! what the guest now has.

use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;
use zygote_agent_api::{
    Action, AgentClient, ClientError, PolicyRule, Reconcile, ReconcileReport, SampleResult,
    request, response,
};

/// What the host asks of one fork.
#[derive(Debug, Clone)]
pub struct ReconcileSpec {
    /// The VM's generation (≥ 1; each fork of a template gets a new one).
    pub generation: u64,
    /// Its hostname.
    pub hostname: String,
    /// Per-class actions (empty: the defaults — Go restarts, the rest is kept).
    pub policy: Vec<PolicyRule>,
    /// Nameservers.
    pub dns: Vec<String>,
}

/// What a fork reported, and what the host then sampled from it.
#[derive(Debug, Clone)]
pub struct ReconcileOutcome {
    /// The agent's report.
    pub report: ReconcileReport,
    /// The machine id that was sent.
    pub machine_id: String,
    /// The guest's sample right after.
    pub sample: SampleResult,
    /// Guest CLOCK_REALTIME − host CLOCK_REALTIME at the sample (midpoint of the call), ms.
    pub realtime_skew_ms: f64,
    /// Host time for the whole exchange, ms.
    pub host_ms: f64,
}

/// Errors of the host's side.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    /// Talking to the agent failed.
    #[error("agent call failed")]
    Agent(#[from] ClientError),
    /// The agent answered something else.
    #[error("unexpected answer from the agent: {0}")]
    Unexpected(String),
    /// The host's random source failed.
    #[error("cannot read host randomness")]
    Random(#[source] std::io::Error),
}

fn realtime_ns() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// Fills `buf` from the host's CSPRNG.
pub fn host_random(buf: &mut [u8]) -> std::io::Result<()> {
    let mut filled = 0;
    while filled < buf.len() {
        // SAFETY: the pointer and length describe the unfilled part of `buf`.
        let n =
            unsafe { libc::getrandom(buf[filled..].as_mut_ptr().cast(), buf.len() - filled, 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(e);
            }
        } else {
            filled += n as usize;
        }
    }
    Ok(())
}

/// Reconciles the VM behind `client` and samples it.
pub fn reconcile(
    client: &mut AgentClient,
    spec: &ReconcileSpec,
) -> Result<ReconcileOutcome, ReconcileError> {
    let start = Instant::now();
    client
        .set_timeout(Duration::from_secs(60))
        .map_err(ClientError::Io)?;
    // The least of a few round trips: the one least delayed by scheduling, as NTP does.
    let mut rtt = Duration::MAX;
    for _ in 0..3 {
        let t = Instant::now();
        client.ping()?;
        rtt = rtt.min(t.elapsed());
    }
    let mut entropy = vec![0u8; 64];
    host_random(&mut entropy).map_err(ReconcileError::Random)?;
    let mut id = [0u8; 16];
    host_random(&mut id).map_err(ReconcileError::Random)?;
    let machine_id: String = id.iter().map(|b| format!("{b:02x}")).collect();
    let body = client.call(request::Body::Reconcile(Reconcile {
        generation: spec.generation,
        host_realtime_ns: realtime_ns(),
        rtt_ns: rtt.as_nanos() as u64,
        entropy,
        hostname: spec.hostname.clone(),
        machine_id: machine_id.clone(),
        dns: spec.dns.clone(),
        policy: spec.policy.clone(),
        interfaces: vec![],
        routes: vec![],
    }))?;
    let report = match body {
        response::Body::Reconciled(r) => r,
        other => return Err(ReconcileError::Unexpected(format!("{other:?}"))),
    };
    let before = realtime_ns();
    let body = client.call(request::Body::Sample(Default::default()))?;
    let after = realtime_ns();
    let sample = match body {
        response::Body::Sample(s) => s,
        other => return Err(ReconcileError::Unexpected(format!("{other:?}"))),
    };
    let host_mid = before / 2 + after / 2;
    Ok(ReconcileOutcome {
        report,
        machine_id,
        realtime_skew_ms: (sample.realtime_ns as f64 - host_mid as f64) / 1e6,
        sample,
        host_ms: start.elapsed().as_secs_f64() * 1000.0,
    })
}

/// A report as JSON (the shape `zygote fork --reconcile-report --json` prints).
#[derive(Debug, Serialize)]
pub struct ReportJson {
    generation: u64,
    unchanged: bool,
    clock_step_ms: f64,
    total_ms: f64,
    steps: Vec<serde_json::Value>,
    processes: Vec<serde_json::Value>,
}

fn action_name(a: i32) -> &'static str {
    match Action::try_from(a) {
        Ok(Action::Keep) => "keep",
        Ok(Action::Restart) => "restart",
        Ok(Action::Notify) => "notify",
        _ => "default",
    }
}

impl From<&ReconcileReport> for ReportJson {
    fn from(r: &ReconcileReport) -> Self {
        ReportJson {
            generation: r.generation,
            unchanged: r.unchanged,
            clock_step_ms: r.clock_step_ns as f64 / 1e6,
            total_ms: r.total_ns as f64 / 1e6,
            steps: r
                .steps
                .iter()
                .map(|s| serde_json::json!({"name": s.name, "ms": s.elapsed_ns as f64 / 1e6, "detail": s.detail}))
                .collect(),
            processes: r
                .processes
                .iter()
                .map(|p| {
                    serde_json::json!({
                        "pid": p.pid, "exe": p.exe, "class": p.class,
                        "runtime_version": p.runtime_version, "evidence": p.evidence,
                        "action": action_name(p.action), "result": p.result, "new_pid": p.new_pid,
                    })
                })
                .collect(),
        }
    }
}
