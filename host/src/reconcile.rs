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
#[derive(Debug, Clone, Default)]
pub struct ReconcileSpec {
    /// The VM's generation (≥ 1; each fork of a template gets a new one).
    pub generation: u64,
    /// Its hostname.
    pub hostname: String,
    /// Per-class actions (empty: the defaults — Go restarts, the rest is kept).
    pub policy: Vec<PolicyRule>,
    /// Nameservers.
    pub dns: Vec<String>,
    /// The pod's interface (none: the VM's NIC stays without a link).
    pub interfaces: Vec<zygote_agent_api::Interface>,
    /// Routes through it.
    pub routes: Vec<zygote_agent_api::Route>,
    /// Take no sample after the reconcile (a guest round trip reading its
    /// identity and entropy back, for reports and tests; a pod needs none).
    pub skip_sample: bool,
}

/// What a fork reported, and what the host then sampled from it.
#[derive(Debug, Clone)]
pub struct ReconcileOutcome {
    /// The agent's report.
    pub report: ReconcileReport,
    /// The machine id that was sent.
    pub machine_id: String,
    /// The guest's sample right after (its identity and entropy), unless skipped.
    pub sample: Option<SampleResult>,
    /// Guest CLOCK_REALTIME − host CLOCK_REALTIME after the corrections
    /// (midpoint of the least delayed round trip), ms.
    pub realtime_skew_ms: f64,
    /// How far that figure may be off: half of its round trip, ms.
    pub realtime_uncertainty_ms: f64,
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
    /// The guest could not take the pod's network.
    #[error("the guest could not take the pod's network: {0}")]
    Network(String),
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

/// An offset measurement stops once a round trip is this short, or not much
/// longer than the guest's idle round trip (see [`measure_offset`]): the
/// guest read its clock within half of it from the midpoint.
const GOOD_ROUND_TRIP: Duration = Duration::from_millis(10);

/// Round trips per offset measurement at most (a guest busy right after the
/// reconcile, restarting programs, answers late: its round trips are long).
const MAX_SAMPLES: usize = 32;

/// Time an offset measurement may take, at most.
const SAMPLING_BUDGET: Duration = Duration::from_secs(5);

/// The guest's realtime offset, measured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ClockOffset {
    /// Guest CLOCK_REALTIME − host CLOCK_REALTIME at the midpoint of the
    /// round trip, ns.
    pub offset_ns: i64,
    /// That round trip, ns: the guest read its clock somewhere inside it, so
    /// the offset is right within ± half of it.
    pub round_trip_ns: u64,
    /// Round trips made to find it.
    pub samples: usize,
}

/// One `ReadClock` round trip: the guest's offset against its midpoint, and
/// the round trip, ns.
fn read_offset(client: &mut AgentClient) -> Result<(i64, u64), ReconcileError> {
    let before = realtime_ns();
    let answer = client.call(request::Body::ReadClock(Default::default()))?;
    let after = realtime_ns();
    match answer {
        response::Body::Clock(c) => {
            let mid = before / 2 + after / 2;
            let offset = c.realtime_ns as i64 - mid as i64;
            let rtt = after.saturating_sub(before);
            tracing::debug!(
                rtt_ms = rtt as f64 / 1e6,
                offset_ms = offset as f64 / 1e6,
                guest_monotonic_ns = c.monotonic_ns,
                "clock sample"
            );
            Ok((offset, rtt))
        }
        other => Err(ReconcileError::Unexpected(format!("{other:?}"))),
    }
}

/// The guest's realtime offset: the round trip with the least delay (its
/// midpoint is the least uncertain, as in NTP's clock filter), sampling until
/// one is no longer than [`GOOD_ROUND_TRIP`] or 1.5 × `idle_round_trip`
/// (the guest's round trip when nothing else runs: ~20 ms where its kernel
/// is emulated), [`MAX_SAMPLES`] were made or [`SAMPLING_BUDGET`] is spent.
pub fn measure_offset(
    client: &mut AgentClient,
    idle_round_trip: Duration,
) -> Result<ClockOffset, ReconcileError> {
    let start = Instant::now();
    let good = GOOD_ROUND_TRIP.max(idle_round_trip * 3 / 2).as_nanos() as u64;
    let mut best: Option<ClockOffset> = None;
    let mut samples = 0;
    loop {
        let (offset_ns, round_trip_ns) = read_offset(client)?;
        samples += 1;
        if best.is_none_or(|b| round_trip_ns < b.round_trip_ns) {
            best = Some(ClockOffset {
                offset_ns,
                round_trip_ns,
                samples,
            });
        }
        if round_trip_ns <= good || samples == MAX_SAMPLES || start.elapsed() > SAMPLING_BUDGET {
            let best = best.expect("at least one sample");
            return Ok(ClockOffset { samples, ..best });
        }
    }
}

/// The least of 3 ping round trips: the one least delayed by scheduling, as
/// NTP does (the guest's idle round trip).
pub fn ping_round_trip(client: &mut AgentClient) -> Result<Duration, ReconcileError> {
    let mut rtt = Duration::MAX;
    for _ in 0..3 {
        let t = Instant::now();
        client.ping()?;
        rtt = rtt.min(t.elapsed());
    }
    Ok(rtt)
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
    let rtt = ping_round_trip(client)?;
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
        interfaces: spec.interfaces.clone(),
        routes: spec.routes.clone(),
    }))?;
    let report = match body {
        response::Body::Reconciled(r) => r,
        other => return Err(ReconcileError::Unexpected(format!("{other:?}"))),
    };
    // A pod whose network could not be set up is not a pod: say why.
    if !spec.interfaces.is_empty() {
        if let Some(step) = report
            .steps
            .iter()
            .find(|s| s.name == "network" && s.detail.starts_with("failed"))
        {
            return Err(ReconcileError::Network(step.detail.clone()));
        }
    }
    // The step above assumed the request took half the round trip; the guest's
    // actual offset is measured against the midpoint of a sample's round trip
    // and corrected (as NTP does) until it is within CLOCK_TOLERANCE — or
    // within the measurement's own uncertainty (half its round trip): a
    // smaller correction would be noise.
    let mut offset = measure_offset(client, rtt)?;
    let mut corrections = Vec::new();
    while offset.offset_ns.unsigned_abs()
        > (CLOCK_TOLERANCE.as_nanos() as u64).max(offset.round_trip_ns / 2)
        && corrections.len() < 3
    {
        corrections.push(offset.offset_ns as f64 / 1e6);
        match client.call(request::Body::StepClock(StepClock {
            delta_ns: -offset.offset_ns,
        }))? {
            response::Body::Clock(_) => {}
            other => return Err(ReconcileError::Unexpected(format!("{other:?}"))),
        }
        offset = measure_offset(client, rtt)?;
    }
    let sample = if spec.skip_sample {
        None
    } else {
        match client.call(request::Body::Sample(Default::default()))? {
            response::Body::Sample(s) => Some(s),
            other => return Err(ReconcileError::Unexpected(format!("{other:?}"))),
        }
    };
    Ok(ReconcileOutcome {
        report,
        machine_id,
        realtime_skew_ms: offset.offset_ns as f64 / 1e6,
        realtime_uncertainty_ms: offset.round_trip_ns as f64 / 2e6,
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
