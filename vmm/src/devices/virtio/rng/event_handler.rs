//! The entropy device's I/O thread: wait for queue notifications, fill buffers.

use virtio_queue::Queue;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use std::os::fd::AsRawFd;
use std::sync::Arc;

use crate::devices::virtio::Interrupt;
use crate::vstate::memory::GuestMemoryMmap;

const QUEUE: u64 = 0;
const KILL: u64 = 1;

pub(super) fn run(
    mem: GuestMemoryMmap,
    mut queue: Queue,
    evt: EventFd,
    interrupt: Arc<Interrupt>,
    kill: EventFd,
) -> Option<Queue> {
    let setup = || -> std::io::Result<Epoll> {
        let epoll = Epoll::new()?;
        epoll.ctl(
            ControlOperation::Add,
            evt.as_raw_fd(),
            EpollEvent::new(EventSet::IN, QUEUE),
        )?;
        epoll.ctl(
            ControlOperation::Add,
            kill.as_raw_fd(),
            EpollEvent::new(EventSet::IN, KILL),
        )?;
        Ok(epoll)
    };
    let epoll = match setup() {
        Ok(e) => e,
        Err(e) => {
            tracing::error!(error = %e, "rng: cannot set up epoll");
            return None;
        }
    };
    // Requests may already be queued when the driver said DRIVER_OK.
    super::device::serve(&mem, &mut queue, &interrupt);
    let mut events = [EpollEvent::default(); 4];
    loop {
        let n = match epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::error!(error = %e, "rng: epoll failed");
                return Some(queue);
            }
        };
        for ev in &events[..n] {
            match ev.data() {
                KILL => return Some(queue),
                _ => {
                    let _ = evt.read();
                    super::device::serve(&mem, &mut queue, &interrupt);
                }
            }
        }
    }
}
