//! The VMM's threads under seccomp allowlists (compiled with `seccompiler`,
//! Firecracker's compiler): the threads that handle what the guest sends.
//!
//! - A **vCPU thread** runs `KVM_RUN` and the port and MMIO handlers of the
//!   devices (the guest's register writes, queue notifications), which may
//!   activate a device and start its I/O thread.
//! - A **device thread** serves a virtio device's queues: descriptor chains
//!   the guest wrote, the host's vsock connections and tap, and for
//!   virtio-fs the host directories the pod was given.
//!
//! Each thread installs its list itself when it starts. A filter also
//! holds every thread its thread starts, so device threads are started by
//! a thread of their own that holds none ([`spawn_unjailed`]), not by the
//! vCPU thread on which the guest's driver activates the device. A call
//! outside a thread's list kills the whole process with SIGSYS
//! (`SECCOMP_RET_KILL_PROCESS`): the shim dies and containerd reports its
//! tasks dead, rather than a VMM going on in a state nobody planned for.
//! `ioctl` is filtered by request number on vCPU threads.
//!
//! The mode is process-wide and off by default (library users, unit tests);
//! the shim turns it on ([`Mode::from_env`]: `ZYGOTE_SECCOMP=kill`, the
//! default, `log` to log what would be refused instead, `off`).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Mutex, OnceLock, mpsc};
use std::thread::JoinHandle;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// Which list a thread takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A vCPU's run loop.
    Vcpu,
    /// A virtio device's I/O thread.
    Device,
}

/// What a call outside the list does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Mode {
    /// No filter.
    Off = 0,
    /// The process is killed (SIGSYS).
    Kill = 1,
    /// The call goes ahead and the kernel logs it (audit, `dmesg`): for
    /// finding what a new code path needs.
    Log = 2,
}

impl Mode {
    /// `ZYGOTE_SECCOMP`: `kill` (also when unset), `log` or `off`.
    pub fn from_env() -> Result<Mode, String> {
        Mode::parse(std::env::var("ZYGOTE_SECCOMP").ok().as_deref())
    }

    /// A mode by name; none (or empty) is `kill`.
    pub fn parse(name: Option<&str>) -> Result<Mode, String> {
        match name {
            None | Some("kill") | Some("") => Ok(Mode::Kill),
            Some("log") => Ok(Mode::Log),
            Some("off") => Ok(Mode::Off),
            Some(other) => Err(format!(
                "ZYGOTE_SECCOMP={other:?}: expected kill, log or off"
            )),
        }
    }
}

static MODE: AtomicU8 = AtomicU8::new(Mode::Off as u8);

/// Sets the mode for threads started from now on. Call it before any
/// thread is started: with a filter on, it starts the thread that starts
/// device threads ([`spawn_unjailed`]).
pub fn set_mode(mode: Mode) {
    MODE.store(mode as u8, Ordering::Release);
    if mode != Mode::Off {
        SPAWNER.get_or_init(start_spawner);
    }
}

type Job = Box<dyn FnOnce() + Send>;

/// The thread that starts device threads (it holds no filter).
static SPAWNER: OnceLock<Mutex<mpsc::Sender<Job>>> = OnceLock::new();

fn start_spawner() -> Mutex<mpsc::Sender<Job>> {
    let (tx, rx) = mpsc::channel::<Job>();
    let started = std::thread::Builder::new()
        .name("zygote-spawner".into())
        .spawn(move || {
            for job in rx {
                job();
            }
        });
    if let Err(e) = started {
        tracing::error!("cannot start the device threads' spawner: {e}");
    }
    Mutex::new(tx)
}

/// Starts thread `name` running `f` outside any filter the caller holds: a
/// device's I/O thread is started when the guest's driver activates the
/// device, on a vCPU thread, whose list must not be the device thread's
/// too (a filter holds the threads its thread starts). With a filter on,
/// the spawner thread (started by [`set_mode`], before any filter) starts
/// it; otherwise the caller does.
pub fn spawn_unjailed<T: Send + 'static>(
    name: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::io::Result<JoinHandle<T>> {
    let builder = std::thread::Builder::new().name(name.into());
    let Some(spawner) = SPAWNER.get() else {
        return builder.spawn(f);
    };
    let (tx, rx) = mpsc::channel();
    let job: Job = Box::new(move || {
        let _ = tx.send(builder.spawn(f));
    });
    spawner
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .send(job)
        .map_err(|_| std::io::Error::other("the device threads' spawner is gone"))?;
    rx.recv()
        .map_err(|_| std::io::Error::other("the device threads' spawner is gone"))?
}

/// The current mode.
pub fn mode() -> Mode {
    match MODE.load(Ordering::Acquire) {
        1 => Mode::Kill,
        2 => Mode::Log,
        _ => Mode::Off,
    }
}

/// Errors installing a filter.
#[derive(Debug, thiserror::Error)]
#[error("seccomp filter for a {kind:?} thread: {why}")]
pub struct JailError {
    kind: Kind,
    why: String,
}

/// What every thread kind makes: memory, locks, signals (the vCPU kick's
/// return), its own start and end, time, and the panic path.
const COMMON: &[(&str, i64)] = &[
    ("brk", libc::SYS_brk),
    ("clock_gettime", libc::SYS_clock_gettime),
    ("clock_nanosleep", libc::SYS_clock_nanosleep),
    ("close", libc::SYS_close),
    ("exit", libc::SYS_exit),
    ("exit_group", libc::SYS_exit_group),
    ("futex", libc::SYS_futex),
    ("getpid", libc::SYS_getpid),
    ("getrandom", libc::SYS_getrandom),
    ("gettid", libc::SYS_gettid),
    ("madvise", libc::SYS_madvise),
    ("mmap", libc::SYS_mmap),
    ("mprotect", libc::SYS_mprotect),
    ("mremap", libc::SYS_mremap),
    ("munmap", libc::SYS_munmap),
    ("nanosleep", libc::SYS_nanosleep),
    ("prctl", libc::SYS_prctl),
    ("read", libc::SYS_read),
    ("readv", libc::SYS_readv),
    ("rseq", libc::SYS_rseq),
    ("rt_sigaction", libc::SYS_rt_sigaction),
    ("rt_sigprocmask", libc::SYS_rt_sigprocmask),
    ("rt_sigreturn", libc::SYS_rt_sigreturn),
    ("sched_getaffinity", libc::SYS_sched_getaffinity),
    ("sched_yield", libc::SYS_sched_yield),
    ("set_robust_list", libc::SYS_set_robust_list),
    ("sigaltstack", libc::SYS_sigaltstack),
    ("tgkill", libc::SYS_tgkill),
    ("write", libc::SYS_write),
    ("writev", libc::SYS_writev),
];

/// A vCPU thread, beyond [`COMMON`]: activating a device when the guest's
/// driver asks (its eventfds and epoll; its I/O thread is started by the
/// spawner, [`spawn_unjailed`]).
const VCPU: &[(&str, i64)] = &[
    ("epoll_create1", libc::SYS_epoll_create1),
    ("epoll_ctl", libc::SYS_epoll_ctl),
    ("eventfd2", libc::SYS_eventfd2),
    ("fcntl", libc::SYS_fcntl),
];

/// `ioctl` requests a vCPU thread makes: `KVM_RUN`, `KVM_GET_REGS` (to name
/// where a guest failed), `FIONBIO`.
const VCPU_IOCTLS: &[u64] = &[0xae80, 0x8090_ae81, libc::FIONBIO];

/// A device thread, beyond [`COMMON`]: its queues' eventfds and epoll, the
/// host's vsock sockets, the block device's file, virtio-fs's host
/// directories (`fuse-backend-rs`'s passthrough file system: files opened
/// by handle and by name, metadata, extended attributes, and the caller's
/// ids for what it creates).
const DEVICE: &[(&str, i64)] = &[
    ("accept4", libc::SYS_accept4),
    ("capget", libc::SYS_capget),
    ("capset", libc::SYS_capset),
    ("connect", libc::SYS_connect),
    ("copy_file_range", libc::SYS_copy_file_range),
    ("dup", libc::SYS_dup),
    ("dup3", libc::SYS_dup3),
    ("epoll_create1", libc::SYS_epoll_create1),
    ("epoll_ctl", libc::SYS_epoll_ctl),
    ("epoll_pwait", libc::SYS_epoll_pwait),
    ("epoll_wait", libc::SYS_epoll_wait),
    ("eventfd2", libc::SYS_eventfd2),
    ("faccessat", libc::SYS_faccessat),
    ("faccessat2", libc::SYS_faccessat2),
    ("fadvise64", libc::SYS_fadvise64),
    ("fallocate", libc::SYS_fallocate),
    ("fchmod", libc::SYS_fchmod),
    ("fchmodat", libc::SYS_fchmodat),
    ("fchown", libc::SYS_fchown),
    ("fchownat", libc::SYS_fchownat),
    ("fcntl", libc::SYS_fcntl),
    ("fdatasync", libc::SYS_fdatasync),
    ("fgetxattr", libc::SYS_fgetxattr),
    ("flistxattr", libc::SYS_flistxattr),
    ("flock", libc::SYS_flock),
    ("fremovexattr", libc::SYS_fremovexattr),
    ("fsetxattr", libc::SYS_fsetxattr),
    ("fstat", libc::SYS_fstat),
    ("fstatfs", libc::SYS_fstatfs),
    ("fsync", libc::SYS_fsync),
    ("ftruncate", libc::SYS_ftruncate),
    ("getdents64", libc::SYS_getdents64),
    ("getpeername", libc::SYS_getpeername),
    ("getsockname", libc::SYS_getsockname),
    ("getsockopt", libc::SYS_getsockopt),
    ("getxattr", libc::SYS_getxattr),
    ("ioctl", libc::SYS_ioctl),
    ("lgetxattr", libc::SYS_lgetxattr),
    ("linkat", libc::SYS_linkat),
    ("listxattr", libc::SYS_listxattr),
    ("llistxattr", libc::SYS_llistxattr),
    ("lseek", libc::SYS_lseek),
    ("lremovexattr", libc::SYS_lremovexattr),
    ("lsetxattr", libc::SYS_lsetxattr),
    ("mkdirat", libc::SYS_mkdirat),
    ("name_to_handle_at", libc::SYS_name_to_handle_at),
    ("newfstatat", libc::SYS_newfstatat),
    ("open_by_handle_at", libc::SYS_open_by_handle_at),
    ("openat", libc::SYS_openat),
    ("poll", libc::SYS_poll),
    ("ppoll", libc::SYS_ppoll),
    ("pread64", libc::SYS_pread64),
    ("preadv", libc::SYS_preadv),
    ("preadv2", libc::SYS_preadv2),
    ("pwrite64", libc::SYS_pwrite64),
    ("pwritev", libc::SYS_pwritev),
    ("pwritev2", libc::SYS_pwritev2),
    ("readlinkat", libc::SYS_readlinkat),
    ("recvfrom", libc::SYS_recvfrom),
    ("recvmsg", libc::SYS_recvmsg),
    ("removexattr", libc::SYS_removexattr),
    ("renameat", libc::SYS_renameat),
    ("renameat2", libc::SYS_renameat2),
    ("sendmsg", libc::SYS_sendmsg),
    ("sendto", libc::SYS_sendto),
    ("setfsgid", libc::SYS_setfsgid),
    ("setfsuid", libc::SYS_setfsuid),
    ("setresgid", libc::SYS_setresgid),
    ("setresuid", libc::SYS_setresuid),
    ("setsockopt", libc::SYS_setsockopt),
    ("setxattr", libc::SYS_setxattr),
    ("shutdown", libc::SYS_shutdown),
    ("socket", libc::SYS_socket),
    ("statfs", libc::SYS_statfs),
    ("statx", libc::SYS_statx),
    ("symlinkat", libc::SYS_symlinkat),
    ("umask", libc::SYS_umask),
    ("unlinkat", libc::SYS_unlinkat),
    ("utimensat", libc::SYS_utimensat),
];

/// The system calls a kind's threads may make (name and number, sorted by
/// name), for the filter, docs and tests.
pub fn allowed(kind: Kind) -> Vec<(&'static str, i64)> {
    let extra = match kind {
        Kind::Vcpu => VCPU,
        Kind::Device => DEVICE,
    };
    let mut calls: Vec<(&str, i64)> = COMMON.iter().chain(extra).copied().collect();
    if kind == Kind::Vcpu {
        calls.push(("ioctl", libc::SYS_ioctl));
    }
    calls.sort_unstable();
    calls.dedup();
    calls
}

/// The compiled filter for `kind` under `mode` (Kill or Log).
pub fn program(kind: Kind, mode: Mode) -> Result<BpfProgram, String> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for (name, nr) in allowed(kind) {
        let conds = if kind == Kind::Vcpu && name == "ioctl" {
            VCPU_IOCTLS
                .iter()
                .map(|&request| {
                    SeccompCondition::new(1, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, request)
                        .and_then(|c| SeccompRule::new(vec![c]))
                })
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| e.to_string())?
        } else {
            Vec::new()
        };
        rules.insert(nr, conds);
    }
    let mismatch = match mode {
        Mode::Log => SeccompAction::Log,
        _ => SeccompAction::KillProcess,
    };
    let filter = SeccompFilter::new(rules, mismatch, SeccompAction::Allow, TargetArch::x86_64)
        .map_err(|e| e.to_string())?;
    filter
        .try_into()
        .map_err(|e: seccompiler::BackendError| e.to_string())
}

/// Puts the calling thread under `kind`'s list, as the mode says (nothing
/// when off). Compiled once per kind.
pub fn enter(kind: Kind) -> Result<(), JailError> {
    static CACHE: [[OnceLock<Result<BpfProgram, String>>; 2]; 2] = [
        [OnceLock::new(), OnceLock::new()],
        [OnceLock::new(), OnceLock::new()],
    ];
    let mode = mode();
    if mode == Mode::Off {
        return Ok(());
    }
    let err = |why: String| JailError { kind, why };
    let slot = &CACHE[kind as usize][usize::from(mode == Mode::Log)];
    let program = slot
        .get_or_init(|| program(kind, mode))
        .as_ref()
        .map_err(|e| err(e.clone()))?;
    seccompiler::apply_filter(program).map_err(|e| err(e.to_string()))
}

static TRIP: AtomicBool = AtomicBool::new(false);

/// Test hook: the next vCPU loop iteration makes a call no list allows
/// (the shim arms it only when its config enables test hooks).
pub fn arm_trip() {
    TRIP.store(true, Ordering::Release);
}

/// Called by vCPU threads on every exit: makes the forbidden call if armed.
pub fn trip_if_armed() {
    if TRIP.load(Ordering::Acquire) {
        // SAFETY: personality(0xffffffff) only reads the persona; it is in
        // no list, so under the filter the process is killed here.
        unsafe { libc::syscall(libc::SYS_personality, 0xffff_ffffu64) };
    }
}

#[cfg(test)]
mod tests;
