//! The vsock device's I/O thread.

use std::os::fd::{AsRawFd, RawFd};

use vmm_sys_util::epoll::{ControlOperation, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::backend::{TOKEN_KILL, TOKEN_LISTENER, TOKEN_QUEUE, TOKEN_STREAM};
use super::{EVQ, RXQ, TXQ, VsockBackend};

/// Serves the device until `kill` fires; returns the backend (for its listener),
/// or `None` if the thread could not be set up.
pub(super) fn run(
    mut backend: VsockBackend,
    queue_evts: Vec<EventFd>,
    kill: EventFd,
    transport_reset: bool,
) -> Option<VsockBackend> {
    let register = |fd: RawFd, token: u64| {
        backend.epoll.ctl(
            ControlOperation::Add,
            fd,
            EpollEvent::new(EventSet::IN, token),
        )
    };
    let registered = register(kill.as_raw_fd(), TOKEN_KILL).and_then(|()| {
        queue_evts
            .iter()
            .enumerate()
            .try_for_each(|(i, evt)| register(evt.as_raw_fd(), TOKEN_QUEUE + i as u64))
    });
    if let Err(e) = registered {
        tracing::error!(error = %e, "vsock: cannot set up epoll");
        return None;
    }
    // After a restore the guest first hears that its old connections are gone.
    // Host clients wait (in the listener's backlog) until the guest has handled
    // that event and given the buffer back: a connection accepted before would be
    // torn down by the reset it overtook.
    let mut awaiting_reset_ack = transport_reset && backend.send_transport_reset();
    if awaiting_reset_ack {
        backend.set_listening(false);
    } else {
        // Host clients may already be waiting.
        backend.handle_listener();
    }
    // The driver may have queued buffers before DRIVER_OK.
    backend.process_tx();
    backend.process_rx();
    backend.notify_guest();

    let mut events = vec![EpollEvent::default(); 64];
    loop {
        let n = match backend.epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::error!(error = %e, "vsock: epoll failed");
                return Some(backend);
            }
        };
        for ev in &events[..n] {
            match ev.data() {
                TOKEN_KILL => return Some(backend),
                TOKEN_LISTENER => backend.handle_listener(),
                t if t == TOKEN_QUEUE + RXQ as u64 => {
                    let _ = queue_evts[RXQ].read();
                }
                t if t == TOKEN_QUEUE + TXQ as u64 => {
                    let _ = queue_evts[TXQ].read();
                    backend.process_tx();
                }
                t if t == TOKEN_QUEUE + EVQ as u64 => {
                    let _ = queue_evts[EVQ].read();
                    if std::mem::take(&mut awaiting_reset_ack) {
                        backend.set_listening(true);
                        backend.handle_listener();
                    }
                }
                t if t >= TOKEN_STREAM => {
                    backend.handle_stream((t - TOKEN_STREAM) as RawFd, ev.event_set())
                }
                _ => {}
            }
        }
        backend.process_rx();
        backend.notify_guest();
    }
}
