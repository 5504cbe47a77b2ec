//! A device's I/O thread, and the way to stop it.

use std::os::fd::AsRawFd;
use std::thread::JoinHandle;

use virtio_queue::Queue;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use crate::vstate::memory::GuestMemoryMmap;

/// A running device thread with the eventfd that asks it to stop.
#[derive(Debug)]
pub struct Worker<T> {
    kill: EventFd,
    handle: Option<JoinHandle<T>>,
}

impl<T: Send + 'static> Worker<T> {
    /// Spawns `name` running `body(kill_evt)`; `body` must return when the kill eventfd fires.
    pub fn spawn(
        name: &str,
        body: impl FnOnce(EventFd) -> T + Send + 'static,
    ) -> std::io::Result<Self> {
        let kill = EventFd::new(libc::EFD_NONBLOCK)?;
        let theirs = kill.try_clone()?;
        let handle = crate::jail::spawn_unjailed(name, move || {
            // The guest's queues are served under the device list.
            if let Err(e) = crate::jail::enter(crate::jail::Kind::Device) {
                crate::vstate::vcpu::fail_closed(&e);
            }
            body(theirs)
        })?;
        Ok(Worker {
            kill,
            handle: Some(handle),
        })
    }

    /// Asks the thread to stop and returns what it gave back (`None` if it panicked).
    pub fn stop(mut self) -> Option<T> {
        self.stop_inner()
    }

    fn stop_inner(&mut self) -> Option<T> {
        let handle = self.handle.take()?;
        let _ = self.kill.write(1);
        handle.join().ok()
    }
}

impl<T> Drop for Worker<T> {
    fn drop(&mut self) {
        if let Some(handle) = self.handle.take() {
            let _ = self.kill.write(1);
            let _ = handle.join();
        }
    }
}

/// The I/O thread of a device with one queue. `serve` runs once at start (the
/// driver may have queued requests before DRIVER_OK) and on every
/// notification, until the thread is stopped; returns whether it used buffers
/// (the interrupt is then raised, unless the driver suppressed it). Stopping for a snapshot gives the queue back
/// as it is then.
#[derive(Debug, Default)]
pub struct QueueWorker(Option<Worker<Option<Queue>>>);

impl QueueWorker {
    /// Starts the thread `zygote-<name>` on the one queue of `args`.
    pub fn start(
        &mut self,
        name: &'static str,
        args: super::ActivateArgs,
        mut serve: impl FnMut(&GuestMemoryMmap, &mut Queue) -> bool + Send + 'static,
    ) -> Result<(), super::ActivateError> {
        let (mem, queue, evt, interrupt) = args.single_queue()?;
        let worker = Worker::spawn(&format!("zygote-{name}"), move |kill| {
            queue_loop(name, queue, evt, kill, |q| {
                if serve(&mem, q) && super::driver_wants_interrupt(q, &mem) {
                    interrupt.signal_used_queue();
                }
            })
        })
        .map_err(super::ActivateError::Worker)?;
        self.0 = Some(worker);
        Ok(())
    }

    /// Stops the thread, if running.
    pub fn stop(&mut self) {
        if let Some(w) = self.0.take() {
            w.stop();
        }
    }

    /// Stops the thread and gives the queue back (`None` if not running).
    pub fn quiesce(&mut self) -> Option<Vec<Queue>> {
        let queue = self.0.take()?.stop().flatten()?;
        Some(vec![queue])
    }
}

fn queue_loop(
    name: &str,
    mut queue: Queue,
    evt: EventFd,
    kill: EventFd,
    mut serve: impl FnMut(&mut Queue),
) -> Option<Queue> {
    const QUEUE: u64 = 0;
    const KILL: u64 = 1;
    let setup = || -> std::io::Result<Epoll> {
        let epoll = Epoll::new()?;
        for (fd, token) in [(evt.as_raw_fd(), QUEUE), (kill.as_raw_fd(), KILL)] {
            epoll.ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, token),
            )?;
        }
        Ok(epoll)
    };
    let epoll = match setup() {
        Ok(e) => e,
        Err(e) => {
            tracing::error!(error = %e, device = name, "cannot set up epoll");
            return None;
        }
    };
    serve(&mut queue);
    let mut events = [EpollEvent::default(); 4];
    loop {
        let n = match epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::error!(error = %e, device = name, "epoll failed");
                return Some(queue);
            }
        };
        for ev in &events[..n] {
            if ev.data() == KILL {
                return Some(queue);
            }
            let _ = evt.read();
            serve(&mut queue);
        }
    }
}
