//! Agent messages.

/// A request from the host.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Request {
    /// Echoed in the response.
    #[prost(uint64, tag = "1")]
    pub id: u64,
    /// What is asked.
    #[prost(oneof = "request::Body", tags = "2, 3, 4, 5")]
    pub body: Option<request::Body>,
}

/// Request bodies.
pub mod request {
    /// What the host asks.
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Body {
        /// Liveness, version and uptime.
        #[prost(message, tag = "2")]
        Ping(super::Ping),
        /// Exec and pipe stress inside the guest.
        #[prost(message, tag = "3")]
        SelfTest(super::SelfTest),
        /// Power the guest off.
        #[prost(message, tag = "4")]
        Shutdown(super::Shutdown),
        /// Run one command and collect its output.
        #[prost(message, tag = "5")]
        Exec(super::Exec),
    }
}

/// The agent's answer.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Response {
    /// The request's id.
    #[prost(uint64, tag = "1")]
    pub id: u64,
    /// The answer.
    #[prost(oneof = "response::Body", tags = "2, 3, 4, 5, 15")]
    pub body: Option<response::Body>,
}

/// Response bodies.
pub mod response {
    /// What the agent answers.
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Body {
        /// Answer to [`super::Ping`].
        #[prost(message, tag = "2")]
        Pong(super::Pong),
        /// Answer to [`super::SelfTest`].
        #[prost(message, tag = "3")]
        SelfTest(super::SelfTestReport),
        /// Answer to [`super::Shutdown`], sent before powering off.
        #[prost(message, tag = "4")]
        ShutdownAck(super::Empty),
        /// Answer to [`super::Exec`].
        #[prost(message, tag = "5")]
        Exec(super::ExecResult),
        /// The request failed.
        #[prost(message, tag = "15")]
        Error(super::Error),
    }
}

/// Nothing.
#[derive(Clone, Copy, PartialEq, Eq, prost::Message)]
pub struct Empty {}

/// Liveness probe.
#[derive(Clone, Copy, PartialEq, Eq, prost::Message)]
pub struct Ping {}

/// The agent is alive.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Pong {
    /// The agent's version.
    #[prost(string, tag = "1")]
    pub version: String,
    /// Guest CLOCK_BOOTTIME, nanoseconds: time since the guest kernel started its clock.
    #[prost(uint64, tag = "2")]
    pub uptime_ns: u64,
    /// `uname -r` of the guest kernel.
    #[prost(string, tag = "3")]
    pub kernel_release: String,
    /// Guest CLOCK_BOOTTIME when the agent started, nanoseconds.
    #[prost(uint64, tag = "4")]
    pub agent_started_ns: u64,
}

/// Run fresh-exec and pipe round trips inside the guest.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct SelfTest {
    /// Exec + pipe round trips.
    #[prost(uint32, tag = "1")]
    pub rounds: u32,
    /// Run a multi-threaded child every this many rounds (0: never).
    #[prost(uint32, tag = "2")]
    pub threads_every: u32,
    /// Round trips run at once.
    #[prost(uint32, tag = "3")]
    pub parallel: u32,
    /// Bytes sent through each child (0: send nothing, check only the exit status).
    #[prost(uint32, tag = "4")]
    pub bytes: u32,
    /// The child that echoes stdin to stdout (e.g. `/bin/busybox cat`); empty: the
    /// agent binary itself (`stress-echo`). Multi-threaded rounds always use the agent.
    #[prost(string, repeated, tag = "5")]
    pub command: Vec<String>,
}

/// What the self-test saw.
#[derive(Clone, PartialEq, prost::Message)]
pub struct SelfTestReport {
    /// Children started (each a fresh exec).
    #[prost(uint32, tag = "1")]
    pub execs: u32,
    /// Round trips whose data came back intact and whose child exited 0.
    #[prost(uint32, tag = "2")]
    pub ok: u32,
    /// Children killed by SIGSEGV.
    #[prost(uint32, tag = "3")]
    pub segfaults: u32,
    /// Children killed by another signal, or exiting non-zero, or corrupting data.
    #[prost(uint32, tag = "4")]
    pub other_failures: u32,
    /// Multi-threaded children among the execs.
    #[prost(uint32, tag = "5")]
    pub threaded: u32,
    /// Guest time taken, nanoseconds.
    #[prost(uint64, tag = "6")]
    pub elapsed_ns: u64,
    /// The first few failures, described.
    #[prost(string, repeated, tag = "7")]
    pub failures: Vec<String>,
    /// Agent children whose main thread found its TLS image corrupted at start-up
    /// (a lost vector register; counted apart from `other_failures`).
    #[prost(uint32, tag = "8")]
    pub tls_corruptions: u32,
    /// Multi-threaded children that passed (`ok` counts them too).
    #[prost(uint32, tag = "9")]
    pub threaded_ok: u32,
}

impl SelfTestReport {
    /// One readable line.
    pub fn summary(&self) -> String {
        format!(
            "{} execs ({} multi-threaded): {} ok ({} multi-threaded), {} segfaults, {} TLS corruptions, {} other failures, {:.1} s guest time",
            self.execs,
            self.threaded,
            self.ok,
            self.threaded_ok,
            self.segfaults,
            self.tls_corruptions,
            self.other_failures,
            self.elapsed_ns as f64 / 1e9
        )
    }
}

/// Power the guest off.
#[derive(Clone, Copy, PartialEq, Eq, prost::Message)]
pub struct Shutdown {}

/// Run a command in the guest (outside any container: an operator's and the
/// tests' tool) and return its exit status and output.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct Exec {
    /// Program (absolute path) and arguments.
    #[prost(string, repeated, tag = "1")]
    pub argv: Vec<String>,
    /// Environment as `KEY=value`; empty: `PATH=/bin:/sbin:/usr/bin:/usr/sbin` only.
    #[prost(string, repeated, tag = "2")]
    pub env: Vec<String>,
    /// Kill the command after this long (0: 60 s).
    #[prost(uint32, tag = "3")]
    pub timeout_ms: u32,
}

/// How a command ended.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct ExecResult {
    /// Exit code, or 128 + signal number if it was killed by a signal.
    #[prost(int32, tag = "1")]
    pub exit_code: i32,
    /// Standard output (at most 1 MiB kept).
    #[prost(bytes = "vec", tag = "2")]
    pub stdout: Vec<u8>,
    /// Standard error (at most 1 MiB kept).
    #[prost(bytes = "vec", tag = "3")]
    pub stderr: Vec<u8>,
    /// It ran past its timeout and was killed.
    #[prost(bool, tag = "4")]
    pub timed_out: bool,
}

/// Error codes, as in gRPC.
#[derive(Clone, Copy, Debug, PartialEq, Eq, prost::Enumeration)]
#[repr(i32)]
pub enum Code {
    /// Unknown.
    Unknown = 0,
    /// Bad request.
    InvalidArgument = 3,
    /// Not found.
    NotFound = 5,
    /// Not supported.
    Unimplemented = 12,
    /// Failed inside the agent.
    Internal = 13,
}

/// A failed request.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Error {
    /// [`Code`].
    #[prost(enumeration = "Code", tag = "1")]
    pub code: i32,
    /// What went wrong.
    #[prost(string, tag = "2")]
    pub message: String,
}
