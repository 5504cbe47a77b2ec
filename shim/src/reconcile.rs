//! The host's half of the reconcile: measure the round trip, send the fork its
//! generation, the host's time, fresh entropy and its identity, then sample
//! what the guest now has.

use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;
use zygote_agent_api::{
    Action, AgentClient, ClientError, PolicyRule, Reconcile, ReconcileReport, SampleResult,
    StepClock, request, response,
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
    /// Offsets measured after the reconcile's step and corrected, ms (empty: none needed).
    pub clock_corrections_ms: Vec<f64>,
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

/// Parses a policy rule `CLASS=keep|restart|notify[:SIGNAL]`.
pub fn parse_policy(rule: &str) -> Result<PolicyRule, String> {
    let (class, action) = rule
        .split_once('=')
        .ok_or_else(|| format!("policy {rule:?}: expected CLASS=ACTION"))?;
    let (action, signal) = match action.split_once(':') {
        Some((a, s)) => (
            a,
            s.parse::<i32>()
                .map_err(|e| format!("policy {rule:?}: signal number: {e}"))?,
        ),
        None => (action, 0),
    };
    let action = match action {
        "keep" => Action::Keep,
        "restart" => Action::Restart,
        "notify" => Action::Notify,
        other => {
            return Err(format!(
                "policy {rule:?}: unknown action {other:?} (keep, restart, notify)"
            ));
        }
    };
    Ok(PolicyRule {
        class: class.into(),
        action: action as i32,
        signal,
    })
}

/// Fills `buf` from the host's CSPRNG.
pub fn host_random(buf: &mut [u8]) -> std::io::Result<()> {
    zygote_vmm::devices::virtio::rng::getrandom(buf)
}

/// The guest clock's offset that is corrected after the reconcile's step.
pub const CLOCK_TOLERANCE: Duration = Duration::from_millis(5);

/// Round trips per offset measurement; the one with the least delay is used.
const SAMPLES: usize = 4;

/// Sends `body` (answered with a sample) and returns the sample, the guest's
/// realtime offset against the midpoint of the round trip, and the round trip, ns.
fn exchange(
    client: &mut AgentClient,
    body: request::Body,
) -> Result<(SampleResult, i64, u64), ReconcileError> {
    let before = realtime_ns();
    let answer = client.call(body)?;
    let after = realtime_ns();
    match answer {
        response::Body::Sample(s) => {
            let mid = before / 2 + after / 2;
            let offset = s.realtime_ns as i64 - mid as i64;
            Ok((s, offset, after.saturating_sub(before)))
        }
        other => Err(ReconcileError::Unexpected(format!("{other:?}"))),
    }
}

/// The guest's realtime offset: of [`SAMPLES`] exchanges, the one with the
/// shortest round trip (its midpoint is the least uncertain, as in NTP's clock
/// filter). Returns the sample and the offset, ns.
fn measure(client: &mut AgentClient) -> Result<(SampleResult, i64), ReconcileError> {
    let mut best: Option<(SampleResult, i64, u64)> = None;
    for _ in 0..SAMPLES {
        let e = exchange(client, request::Body::Sample(Default::default()))?;
        if best.as_ref().is_none_or(|b| e.2 < b.2) {
            best = Some(e);
        }
    }
    let (sample, offset, _) = best.expect("at least one sample");
    Ok((sample, offset))
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
    // The step above assumed the request took half the round trip; the guest's
    // actual offset is measured against the midpoint of a sample's round trip
    // and corrected (as NTP does) until it is within CLOCK_TOLERANCE.
    let (mut sample, mut offset_ns) = measure(client)?;
    let mut corrections = Vec::new();
    while offset_ns.unsigned_abs() > CLOCK_TOLERANCE.as_nanos() as u64 && corrections.len() < 3 {
        corrections.push(offset_ns as f64 / 1e6);
        exchange(
            client,
            request::Body::StepClock(StepClock {
                delta_ns: -offset_ns,
            }),
        )?;
        (sample, offset_ns) = measure(client)?;
    }
    Ok(ReconcileOutcome {
        report,
        machine_id,
        realtime_skew_ms: offset_ns as f64 / 1e6,
        clock_corrections_ms: corrections,
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
