//! Agent messages (the reconcile's own are in `reconcile`, volumes' in
//! `volumes`).

use crate::reconcile::*;

/// A request from the host.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Request {
    /// Echoed in the response.
    #[prost(uint64, tag = "1")]
    pub id: u64,
    /// What is asked.
    #[prost(
        oneof = "request::Body",
        tags = "2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30"
    )]
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
        /// Start a long-running process the agent remembers (and can restart).
        #[prost(message, tag = "6")]
        Spawn(super::Spawn),
        /// Turn this fork into its own machine.
        #[prost(message, tag = "7")]
        Reconcile(super::Reconcile),
        /// Read the guest's clocks, identity and fresh random bytes.
        #[prost(message, tag = "8")]
        Sample(super::Empty),
        /// Step CLOCK_REALTIME by an offset the host measured; answered with `Clock`.
        #[prost(message, tag = "9")]
        StepClock(super::StepClock),
        /// Prepare a container (its root and process) without starting it.
        #[prost(message, tag = "10")]
        CreateContainer(super::CreateContainer),
        /// Start a created container's process.
        #[prost(message, tag = "11")]
        StartContainer(super::ContainerRef),
        /// Wait until a container's process exited and its output was drained.
        #[prost(message, tag = "12")]
        WaitProcess(super::ContainerRef),
        /// Send a container's process a signal.
        #[prost(message, tag = "13")]
        SignalProcess(super::SignalProcess),
        /// Stop (if needed) and remove a container and its writable layer.
        #[prost(message, tag = "14")]
        RemoveContainer(super::ContainerRef),
        /// A container's cgroup counters.
        #[prost(message, tag = "15")]
        Stats(super::ContainerRef),
        /// Prepare another process in a running container (started with
        /// `StartContainer` naming its exec id).
        #[prost(message, tag = "16")]
        ExecProcess(super::ExecProcess),
        /// Close a process's stdin (it reads end of file).
        #[prost(message, tag = "17")]
        CloseStdin(super::ContainerRef),
        /// Set a terminal's window size.
        #[prost(message, tag = "18")]
        ResizeTty(super::ResizeTty),
        /// Wait for the next OOM kill in any container (blocks; use its own
        /// connection). Answered with `Oom`.
        #[prost(message, tag = "19")]
        GetOomEvent(super::Empty),
        /// Mount an image disk read-only (answered with `Mounted`).
        #[prost(message, tag = "20")]
        MountImage(super::MountImage),
        /// The processes of a container (answered with `Pids`).
        #[prost(message, tag = "21")]
        ListPids(super::ContainerRef),
        /// Change a container's cgroup limits.
        #[prost(message, tag = "22")]
        UpdateResources(super::UpdateResources),
        /// Read the guest's clocks and nothing else (answered with `Clock`):
        /// the host's offset measurements, where every guest syscall before
        /// the reading would widen the round trip and bias its midpoint.
        #[prost(message, tag = "23")]
        ReadClock(super::Empty),
        /// Whether a process started by `Spawn` still runs (answered with
        /// `Spawned`) or how it ended (`Exited`).
        #[prost(message, tag = "24")]
        SpawnStatus(super::Spawned),
        /// Stage a container over an image (in a template, before the
        /// snapshot): its first container in every fork starts with one
        /// exec. Answered with `Spawned` (the staged init's pid).
        #[prost(message, tag = "25")]
        StageContainer(super::StageContainer),
        /// Replace a container's copy of a volume (the host copy changed).
        #[prost(message, tag = "26")]
        UpdateVolume(crate::volumes::UpdateVolume),
        /// Read a container's file volume back (answered with `VolumeData`).
        #[prost(message, tag = "27")]
        ReadVolume(crate::volumes::ReadVolume),
        /// Unmount an image disk (before the host empties its slot).
        #[prost(message, tag = "28")]
        UnmountImage(super::UnmountImage),
        /// Bring CPUs 0..N online and the others offline (the pod's size).
        #[prost(message, tag = "29")]
        SetCpus(super::SetCpus),
        /// Cap the memory of all the pod's containers together (its size).
        #[prost(message, tag = "30")]
        SetPodMemory(super::SetPodMemory),
    }
}

/// The agent's answer.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Response {
    /// The request's id.
    #[prost(uint64, tag = "1")]
    pub id: u64,
    /// The answer.
    #[prost(
        oneof = "response::Body",
        tags = "2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18"
    )]
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
        /// Answer to [`super::Spawn`].
        #[prost(message, tag = "6")]
        Spawned(super::Spawned),
        /// Answer to [`super::Reconcile`].
        #[prost(message, tag = "7")]
        Reconciled(super::ReconcileReport),
        /// Answer to a sample request.
        #[prost(message, tag = "8")]
        Sample(super::SampleResult),
        /// A container's process started.
        #[prost(message, tag = "9")]
        Started(super::Spawned),
        /// A container's process exited.
        #[prost(message, tag = "10")]
        Exited(super::ProcessExit),
        /// Done, nothing to report.
        #[prost(message, tag = "11")]
        Empty(super::Empty),
        /// A container's counters.
        #[prost(message, tag = "12")]
        Stats(super::ContainerStats),
        /// A container's cgroup saw an OOM kill.
        #[prost(message, tag = "13")]
        Oom(super::OomEvent),
        /// Process ids.
        #[prost(message, tag = "14")]
        Pids(super::Pids),
        /// An image was mounted.
        #[prost(message, tag = "16")]
        Mounted(super::Mounted),
        /// The guest's clocks.
        #[prost(message, tag = "17")]
        Clock(super::ClockReading),
        /// A file volume's content.
        #[prost(message, tag = "18")]
        VolumeData(crate::volumes::VolumeData),
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
    /// Agent children whose TLS image was corrupted at start-up, or one of
    /// whose threads lost a value across a yield: the lost vector register of
    /// the PVM guest fault, named by its canary (counted apart from
    /// `other_failures`).
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
    /// The id is taken.
    AlreadyExists = 6,
    /// Not in the state the request needs (e.g. not started yet, or exited).
    FailedPrecondition = 9,
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

/// Start a long-running process that the agent tracks: it can be restarted by
/// the reconcile with the same argv, env, cwd and user.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct Spawn {
    /// Program (absolute path) and arguments.
    #[prost(string, repeated, tag = "1")]
    pub argv: Vec<String>,
    /// Environment as `KEY=value`.
    #[prost(string, repeated, tag = "2")]
    pub env: Vec<String>,
    /// Working directory (default `/`).
    #[prost(string, tag = "3")]
    pub cwd: String,
    /// User and group id.
    #[prost(uint32, tag = "4")]
    pub uid: u32,
    /// Group id.
    #[prost(uint32, tag = "5")]
    pub gid: u32,
    /// File its stdout and stderr are appended to (default: discarded).
    #[prost(string, tag = "6")]
    pub output: String,
}

/// A started process.
#[derive(Clone, Copy, PartialEq, Eq, prost::Message)]
pub struct Spawned {
    /// Its pid in the guest.
    #[prost(uint32, tag = "1")]
    pub pid: u32,
}

/// The vsock port where the host attaches a container process's stdio: it
/// connects, sends one line `<container id> <stream>\n` (`stdin`, `stdout` or
/// `stderr`), then the stream's bytes flow on that connection alone.
pub const STDIO_PORT: u32 = 1025;

/// Prepare a container.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct CreateContainer {
    /// Container id: 1-64 of `[A-Za-z0-9_.-]`.
    #[prost(string, tag = "1")]
    pub id: String,
    /// The OCI runtime spec (`config.json`).
    #[prost(bytes = "vec", tag = "2")]
    pub spec_json: Vec<u8>,
    /// The image's root file system in the guest (read-only; the container gets
    /// an overlay with a writable layer on tmpfs over it).
    #[prost(string, tag = "3")]
    pub rootfs: String,
    /// Size limit of the writable layer's tmpfs, MiB (0: half the guest's
    /// RAM, tmpfs's own default).
    #[prost(uint32, tag = "4")]
    pub upper_size_mib: u32,
    /// Volumes copied from the host, which the spec's mounts name.
    #[prost(message, repeated, tag = "5")]
    pub volumes: Vec<crate::volumes::Volume>,
}

/// Stage a container (see `request::Body::StageContainer`).
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct StageContainer {
    /// The image's root file system in the guest, as `CreateContainer` will name it.
    #[prost(string, tag = "1")]
    pub rootfs: String,
    /// Size limit of the writable layer's tmpfs, MiB (0: half the guest's RAM).
    #[prost(uint32, tag = "2")]
    pub upper_size_mib: u32,
}

/// Mount a read-only image disk.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct MountImage {
    /// `/dev/vdX`.
    #[prost(string, tag = "1")]
    pub device: String,
    /// Absolute mount point.
    #[prost(string, tag = "2")]
    pub target: String,
    /// Read every file once (into the page cache a template shares).
    #[prost(bool, tag = "3")]
    pub warm: bool,
    /// Find the device by its serial instead (`device` empty): a disk slot
    /// the host just put an image in, waited for until its capacity shows.
    #[prost(string, tag = "4")]
    pub serial: String,
}

/// The CPUs a VM keeps online.
#[derive(Clone, Copy, PartialEq, Eq, prost::Message)]
pub struct SetCpus {
    /// How many (CPUs 0..online).
    #[prost(uint32, tag = "1")]
    pub online: u32,
}

/// The memory all of a pod's containers may use together.
#[derive(Clone, Copy, PartialEq, Eq, prost::Message)]
pub struct SetPodMemory {
    /// Bytes (rounded down to pages by the guest kernel; at least 1 MiB).
    #[prost(uint64, tag = "1")]
    pub limit_bytes: u64,
    /// The end of the VM's RAM: memory blocks up to the limit (rounded up
    /// to a block) are added below it, so the guest's `MemTotal` says the
    /// pod's size (0: none added).
    #[prost(uint64, tag = "2")]
    pub ram_bytes: u64,
}

/// Unmount an image mounted by `MountImage`.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct UnmountImage {
    /// Where it is mounted.
    #[prost(string, tag = "1")]
    pub target: String,
}

/// An image is mounted.
#[derive(Clone, Copy, PartialEq, Eq, prost::Message)]
pub struct Mounted {
    /// Bytes read to warm it.
    #[prost(uint64, tag = "1")]
    pub warmed_bytes: u64,
}

/// Process ids (as the guest sees them).
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct Pids {
    /// Pids.
    #[prost(uint32, repeated, tag = "1")]
    pub pids: Vec<u32>,
}

/// New cgroup limits for a container.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct UpdateResources {
    /// Container id.
    #[prost(string, tag = "1")]
    pub id: String,
    /// An OCI `linux.resources` object (JSON).
    #[prost(bytes = "vec", tag = "2")]
    pub resources_json: Vec<u8>,
}

/// A terminal's window size.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct ResizeTty {
    /// Container id.
    #[prost(string, tag = "1")]
    pub id: String,
    /// Exec id (empty: the main process).
    #[prost(string, tag = "2")]
    pub exec_id: String,
    /// Columns.
    #[prost(uint32, tag = "3")]
    pub width: u32,
    /// Rows.
    #[prost(uint32, tag = "4")]
    pub height: u32,
}

/// An OOM kill in a container's cgroup (`memory.events` `oom_kill` grew).
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct OomEvent {
    /// Container id.
    #[prost(string, tag = "1")]
    pub id: String,
    /// Its cgroup's `oom_kill` count now.
    #[prost(uint64, tag = "2")]
    pub oom_kills: u64,
}

/// A container's process: its main one, or an exec.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct ContainerRef {
    /// Container id.
    #[prost(string, tag = "1")]
    pub id: String,
    /// Exec id (empty: the main process).
    #[prost(string, tag = "2")]
    pub exec_id: String,
}

impl ContainerRef {
    /// The key of the process: `id`, or `id/exec_id` (also the id its stdio
    /// streams name).
    pub fn key(&self) -> String {
        process_key(&self.id, &self.exec_id)
    }
}

/// `id`, or `id/exec_id` for an exec.
pub fn process_key(id: &str, exec_id: &str) -> String {
    if exec_id.is_empty() {
        id.into()
    } else {
        format!("{id}/{exec_id}")
    }
}

/// Another process in a running container.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct ExecProcess {
    /// Container id.
    #[prost(string, tag = "1")]
    pub id: String,
    /// Exec id: 1-64 of `[A-Za-z0-9_.-]`.
    #[prost(string, tag = "2")]
    pub exec_id: String,
    /// The OCI `process` object (JSON).
    #[prost(bytes = "vec", tag = "3")]
    pub process_json: Vec<u8>,
}

/// Send a signal.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct SignalProcess {
    /// Container id.
    #[prost(string, tag = "1")]
    pub id: String,
    /// Signal number.
    #[prost(int32, tag = "2")]
    pub signal: i32,
    /// Exec id (empty: the main process).
    #[prost(string, tag = "3")]
    pub exec_id: String,
}

/// How a process ended.
#[derive(Clone, Copy, PartialEq, Eq, prost::Message)]
pub struct ProcessExit {
    /// Exit code, or 128 + N when killed by signal N.
    #[prost(int32, tag = "1")]
    pub exit_code: i32,
    /// When (guest CLOCK_REALTIME, ns).
    #[prost(uint64, tag = "2")]
    pub exited_at_ns: u64,
    /// The container's cgroup saw an OOM kill.
    #[prost(bool, tag = "3")]
    pub oom_killed: bool,
}

/// A container's cgroup v2 counters.
#[derive(Clone, Copy, PartialEq, Eq, prost::Message)]
pub struct ContainerStats {
    /// CPU time, µs (`cpu.stat usage_usec`).
    #[prost(uint64, tag = "1")]
    pub cpu_usage_usec: u64,
    /// Memory in use, bytes (`memory.current`).
    #[prost(uint64, tag = "2")]
    pub memory_current: u64,
    /// Memory limit, bytes (`memory.max`; u64::MAX when unlimited).
    #[prost(uint64, tag = "3")]
    pub memory_max: u64,
    /// Processes (`pids.current`).
    #[prost(uint64, tag = "4")]
    pub pids_current: u64,
    /// OOM kills so far (`memory.events oom_kill`).
    #[prost(uint64, tag = "5")]
    pub oom_kills: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::volumes::*;
    use prost::Message;

    /// Every body survives encoding: a variant missing from its oneof's tag
    /// list would decode as "no body" (it did once).
    #[test]
    fn every_body_round_trips() {
        use request::Body as Q;
        let requests = vec![
            Q::Ping(Ping {}),
            Q::SelfTest(SelfTest {
                rounds: 1,
                ..Default::default()
            }),
            Q::Shutdown(Shutdown {}),
            Q::Exec(Exec {
                argv: vec!["/bin/true".into()],
                ..Default::default()
            }),
            Q::Spawn(Spawn {
                argv: vec!["/bin/true".into()],
                ..Default::default()
            }),
            Q::Reconcile(Reconcile {
                generation: 1,
                ..Default::default()
            }),
            Q::Sample(Empty {}),
            Q::StepClock(StepClock { delta_ns: -5 }),
            Q::CreateContainer(CreateContainer {
                id: "c".into(),
                ..Default::default()
            }),
            Q::StartContainer(ContainerRef {
                id: "c".into(),
                exec_id: "e".into(),
            }),
            Q::WaitProcess(ContainerRef {
                id: "c".into(),
                exec_id: String::new(),
            }),
            Q::SignalProcess(SignalProcess {
                id: "c".into(),
                signal: 9,
                exec_id: String::new(),
            }),
            Q::RemoveContainer(ContainerRef {
                id: "c".into(),
                exec_id: String::new(),
            }),
            Q::Stats(ContainerRef {
                id: "c".into(),
                exec_id: String::new(),
            }),
            Q::ExecProcess(ExecProcess {
                id: "c".into(),
                exec_id: "e".into(),
                process_json: b"{}".to_vec(),
            }),
            Q::CloseStdin(ContainerRef {
                id: "c".into(),
                exec_id: "e".into(),
            }),
            Q::ResizeTty(ResizeTty {
                id: "c".into(),
                exec_id: String::new(),
                width: 80,
                height: 24,
            }),
            Q::GetOomEvent(Empty {}),
            Q::MountImage(MountImage {
                device: String::new(),
                target: "/x".into(),
                warm: true,
                serial: "zygote-slot0".into(),
            }),
            Q::ListPids(ContainerRef {
                id: "c".into(),
                exec_id: String::new(),
            }),
            Q::UpdateResources(UpdateResources {
                id: "c".into(),
                resources_json: b"{}".to_vec(),
            }),
            Q::ReadClock(Empty {}),
            Q::SpawnStatus(Spawned { pid: 7 }),
            Q::StageContainer(StageContainer {
                rootfs: "/run/zygote/image".into(),
                upper_size_mib: 64,
            }),
            Q::UpdateVolume(UpdateVolume {
                id: "c".into(),
                volume: Some(Volume {
                    name: "v".into(),
                    entries: vec![VolumeEntry {
                        kind: EntryKind::Symlink as i32,
                        target: "..data/k".into(),
                        ..Default::default()
                    }],
                    shared: true,
                    host: false,
                    size_bytes: 16 << 20,
                }),
            }),
            Q::ReadVolume(ReadVolume {
                id: "c".into(),
                name: "v".into(),
                max_bytes: 4096,
            }),
            Q::UnmountImage(UnmountImage {
                target: "/run/zygote/images/1".into(),
            }),
            Q::SetCpus(SetCpus { online: 2 }),
            Q::SetPodMemory(SetPodMemory {
                limit_bytes: 64 << 20,
                ram_bytes: 256 << 20,
            }),
        ];
        for body in requests {
            let req = Request {
                id: 7,
                body: Some(body),
            };
            assert_eq!(
                Request::decode(req.encode_to_vec().as_slice()).unwrap(),
                req
            );
        }
        use response::Body as A;
        let responses = vec![
            A::Pong(Pong {
                version: "v".into(),
                ..Default::default()
            }),
            A::SelfTest(SelfTestReport {
                execs: 1,
                ..Default::default()
            }),
            A::ShutdownAck(Empty {}),
            A::Exec(ExecResult {
                exit_code: 3,
                ..Default::default()
            }),
            A::Spawned(Spawned { pid: 2 }),
            A::Reconciled(ReconcileReport {
                generation: 1,
                ..Default::default()
            }),
            A::Sample(SampleResult {
                generation: 1,
                ..Default::default()
            }),
            A::Started(Spawned { pid: 3 }),
            A::Exited(ProcessExit {
                exit_code: 137,
                exited_at_ns: 1,
                oom_killed: true,
            }),
            A::Empty(Empty {}),
            A::Stats(ContainerStats {
                oom_kills: 1,
                ..Default::default()
            }),
            A::Oom(OomEvent {
                id: "c".into(),
                oom_kills: 2,
            }),
            A::Pids(Pids { pids: vec![1, 2] }),
            A::Mounted(Mounted { warmed_bytes: 5 }),
            A::Clock(ClockReading {
                realtime_ns: 1,
                monotonic_ns: 2,
            }),
            A::VolumeData(VolumeData {
                data: b"bye".to_vec(),
            }),
            A::Error(Error {
                code: Code::NotFound as i32,
                message: "x".into(),
            }),
        ];
        for body in responses {
            let resp = Response {
                id: 7,
                body: Some(body),
            };
            assert_eq!(
                Response::decode(resp.encode_to_vec().as_slice()).unwrap(),
                resp
            );
        }
    }
}
