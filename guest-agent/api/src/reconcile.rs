//! The reconcile's messages: what the host asks a fork to make of itself
//! (identity, network, clock, the policy for processes that existed at the
//! fork point) and what the guest reports back, with the samples and clock
//! readings the host checks it by.

/// What to do with a process of a class that existed at the fork point.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum Action {
    /// The class's default (Go: restart; everything else: keep).
    Default = 0,
    /// Leave it running as it is.
    Keep = 1,
    /// Kill it and start it again with the same argv/env/cwd/user (only for
    /// processes the agent started; others are kept and reported).
    Restart = 2,
    /// Send it a signal (`PolicyRule::signal`, default SIGHUP) so that it can reseed.
    Notify = 3,
}

/// The action for one class of process.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct PolicyRule {
    /// `go`, `jvm`, `python`, `node`, `openssl` or `native`.
    #[prost(string, tag = "1")]
    pub class: String,
    /// What to do.
    #[prost(enumeration = "Action", tag = "2")]
    pub action: i32,
    /// For `Notify`: the signal number (0: SIGHUP).
    #[prost(int32, tag = "3")]
    pub signal: i32,
}

/// A network interface's identity (applied when the VM has a network device).
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct Interface {
    /// Name in the guest.
    #[prost(string, tag = "1")]
    pub name: String,
    /// MAC address.
    #[prost(string, tag = "2")]
    pub mac: String,
    /// IPv4 addresses in CIDR form.
    #[prost(string, repeated, tag = "3")]
    pub addresses: Vec<String>,
    /// MTU.
    #[prost(uint32, tag = "4")]
    pub mtu: u32,
}

/// A route.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct Route {
    /// Destination in CIDR form (`0.0.0.0/0` for the default route).
    #[prost(string, tag = "1")]
    pub destination: String,
    /// Gateway address (empty: on-link).
    #[prost(string, tag = "2")]
    pub gateway: String,
}

/// Turn a fork into a correct, unique machine (see DESIGN.md, "The reconcile").
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct Reconcile {
    /// The host's generation for this VM; a repeated generation is a no-op.
    #[prost(uint64, tag = "1")]
    pub generation: u64,
    /// Host CLOCK_REALTIME, ns, when the request was sent.
    #[prost(uint64, tag = "2")]
    pub host_realtime_ns: u64,
    /// Round trip host → agent → host measured just before, ns (half of it is
    /// added to `host_realtime_ns`).
    #[prost(uint64, tag = "3")]
    pub rtt_ns: u64,
    /// Bytes from the host's CSPRNG (at least 64).
    #[prost(bytes = "vec", tag = "4")]
    pub entropy: Vec<u8>,
    /// Hostname.
    #[prost(string, tag = "5")]
    pub hostname: String,
    /// Machine id: 32 lowercase hex digits.
    #[prost(string, tag = "6")]
    pub machine_id: String,
    /// Nameservers for /etc/resolv.conf.
    #[prost(string, repeated, tag = "7")]
    pub dns: Vec<String>,
    /// Per-class actions; classes without a rule get their default.
    #[prost(message, repeated, tag = "8")]
    pub policy: Vec<PolicyRule>,
    /// Network identity.
    #[prost(message, repeated, tag = "9")]
    pub interfaces: Vec<Interface>,
    /// Routes.
    #[prost(message, repeated, tag = "10")]
    pub routes: Vec<Route>,
}

/// One step of the reconcile.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct ReconcileStep {
    /// `freeze`, `entropy`, `clock`, `identity`, `network`, `audit`, `thaw`, `restart`.
    #[prost(string, tag = "1")]
    pub name: String,
    /// How long it took, ns.
    #[prost(uint64, tag = "2")]
    pub elapsed_ns: u64,
    /// What it did.
    #[prost(string, tag = "3")]
    pub detail: String,
}

/// A process found at the fork point and what was done with it.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct ProcessReport {
    /// Its pid.
    #[prost(uint32, tag = "1")]
    pub pid: u32,
    /// `/proc/PID/exe`.
    #[prost(string, tag = "2")]
    pub exe: String,
    /// `go`, `jvm`, `python`, `node`, `openssl` or `native`.
    #[prost(string, tag = "3")]
    pub class: String,
    /// The runtime's version when known (Go: from its build info).
    #[prost(string, tag = "4")]
    pub runtime_version: String,
    /// How it was recognized (e.g. `.go.buildinfo section`, `libjvm.so mapped`).
    #[prost(string, tag = "5")]
    pub evidence: String,
    /// What was done.
    #[prost(enumeration = "Action", tag = "6")]
    pub action: i32,
    /// The outcome (e.g. `restarted as pid 42`, `kept: not started by the agent`).
    #[prost(string, tag = "7")]
    pub result: String,
    /// The new pid after a restart.
    #[prost(uint32, tag = "8")]
    pub new_pid: u32,
}

/// What the reconcile did.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct ReconcileReport {
    /// The generation now in force.
    #[prost(uint64, tag = "1")]
    pub generation: u64,
    /// The request repeated the current generation: nothing was done.
    #[prost(bool, tag = "2")]
    pub unchanged: bool,
    /// Each step, in order.
    #[prost(message, repeated, tag = "3")]
    pub steps: Vec<ReconcileStep>,
    /// Every process that existed at the fork point.
    #[prost(message, repeated, tag = "4")]
    pub processes: Vec<ProcessReport>,
    /// How far CLOCK_REALTIME was stepped, ns (positive: forward).
    #[prost(int64, tag = "5")]
    pub clock_step_ns: i64,
    /// Total time, ns.
    #[prost(uint64, tag = "6")]
    pub total_ns: u64,
}

/// The guest's clocks, identity and fresh randomness.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct SampleResult {
    /// CLOCK_REALTIME, ns.
    #[prost(uint64, tag = "1")]
    pub realtime_ns: u64,
    /// CLOCK_MONOTONIC, ns.
    #[prost(uint64, tag = "2")]
    pub monotonic_ns: u64,
    /// CLOCK_BOOTTIME, ns.
    #[prost(uint64, tag = "3")]
    pub boottime_ns: u64,
    /// 32 bytes from getrandom(2).
    #[prost(bytes = "vec", tag = "4")]
    pub random: Vec<u8>,
    /// `/proc/sys/kernel/random/uuid`.
    #[prost(string, tag = "5")]
    pub uuid: String,
    /// The hostname.
    #[prost(string, tag = "6")]
    pub hostname: String,
    /// `/etc/machine-id`.
    #[prost(string, tag = "7")]
    pub machine_id: String,
    /// The reconcile generation in force.
    #[prost(uint64, tag = "8")]
    pub generation: u64,
}

/// The guest's clocks, read together.
#[derive(Clone, Copy, PartialEq, Eq, prost::Message)]
pub struct ClockReading {
    /// CLOCK_REALTIME, ns.
    #[prost(uint64, tag = "1")]
    pub realtime_ns: u64,
    /// CLOCK_MONOTONIC, ns.
    #[prost(uint64, tag = "2")]
    pub monotonic_ns: u64,
}

/// Move CLOCK_REALTIME by `delta_ns` (the host's correction after measuring the
/// guest's offset against the midpoint of a round trip, as NTP does).
#[derive(Clone, Copy, PartialEq, Eq, prost::Message)]
pub struct StepClock {
    /// Nanoseconds to add (negative: back).
    #[prost(int64, tag = "1")]
    pub delta_ns: i64,
}
