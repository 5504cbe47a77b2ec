//! Why a VM stopped, and how its parts say so.
//!
//! Any part of the VM (a vCPU, the i8042 reset line, the console watching for a
//! power-off or panic message, the host) raises an [`ExitSignal`]; the first
//! reason wins. The machine then kicks its vCPUs out of `KVM_RUN` and tears down.

use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

/// Why a VM stopped.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum ExitReason {
    /// The guest reset the machine (`reboot`, via the i8042 reset line).
    Reset,
    /// The guest powered off (the kernel printed "reboot: Power down" or "System halted").
    PowerOff,
    /// The guest kernel panicked (its message was seen on the console).
    Panic,
    /// A vCPU triple-faulted (`KVM_EXIT_SHUTDOWN`).
    TripleFault,
    /// KVM could not run the guest (`KVM_EXIT_INTERNAL_ERROR`, e.g. an instruction
    /// the emulator rejects on PVM).
    InternalError {
        /// KVM's sub-error code.
        suberror: u32,
        /// The vCPU.
        vcpu: u8,
        /// Its instruction pointer.
        rip: u64,
    },
    /// KVM refused to enter the guest (`KVM_EXIT_FAIL_ENTRY`).
    FailEntry {
        /// Hardware reason.
        reason: u64,
        /// The vCPU.
        vcpu: u8,
    },
    /// `KVM_RUN` failed with an errno.
    RunFailed {
        /// The vCPU.
        vcpu: u8,
        /// errno.
        errno: i32,
    },
    /// An exit the VMM does not handle.
    UnhandledExit {
        /// The vCPU.
        vcpu: u8,
        /// Debug text of the exit.
        exit: String,
    },
    /// The host asked the VM to stop.
    Stopped,
}

impl ExitReason {
    /// True for a guest that shut itself down normally.
    pub fn is_clean(&self) -> bool {
        matches!(
            self,
            ExitReason::Reset | ExitReason::PowerOff | ExitReason::Stopped
        )
    }
}

#[derive(Debug, Default)]
struct State {
    reason: Option<ExitReason>,
    /// A panic seen on the console: the reset that follows is reported as a panic.
    panicked: bool,
}

/// Shared, first-wins record of why the VM stopped.
#[derive(Debug, Clone, Default)]
pub struct ExitSignal {
    inner: Arc<(Mutex<State>, Condvar)>,
}

impl ExitSignal {
    /// Records `reason` unless one was already recorded, and wakes waiters.
    pub fn raise(&self, reason: ExitReason) {
        let (lock, cvar) = &*self.inner;
        let mut state = lock.lock().expect("exit lock");
        if state.reason.is_none() {
            let reason = match reason {
                ExitReason::Reset | ExitReason::TripleFault if state.panicked => ExitReason::Panic,
                r => r,
            };
            state.reason = Some(reason);
        }
        cvar.notify_all();
    }

    /// Notes that the guest kernel panicked; a later reset is reported as [`ExitReason::Panic`].
    pub fn note_panic(&self) {
        self.inner.0.lock().expect("exit lock").panicked = true;
    }

    /// The recorded reason, if any.
    pub fn reason(&self) -> Option<ExitReason> {
        self.inner.0.lock().expect("exit lock").reason.clone()
    }

    /// Waits up to `timeout` for a reason; `None` on timeout.
    pub fn wait_timeout(&self, timeout: Duration) -> Option<ExitReason> {
        let (lock, cvar) = &*self.inner;
        let guard = lock.lock().expect("exit lock");
        let (guard, _) = cvar
            .wait_timeout_while(guard, timeout, |s| s.reason.is_none())
            .expect("exit lock");
        guard.reason.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_reason_wins_and_panic_colours_reset() {
        let exit = ExitSignal::default();
        assert_eq!(exit.wait_timeout(Duration::from_millis(1)), None);
        exit.note_panic();
        exit.raise(ExitReason::Reset);
        exit.raise(ExitReason::Stopped);
        assert_eq!(exit.reason(), Some(ExitReason::Panic));
        assert!(!ExitReason::Panic.is_clean());
    }
}
