//! A device's I/O thread, and the way to stop it.

use std::os::fd::AsRawFd;
use std::thread::JoinHandle;

use virtio_queue::Queue;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

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
        let handle = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || body(theirs))?;
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

/// The I/O loop of a device with one queue: `serve` runs once at start (the
/// driver may have queued requests before DRIVER_OK) and on every notification,
/// until `kill` fires. Returns the queue as it is then (for a snapshot), or
/// `None` if the loop could not be set up.
pub fn single_queue_loop(
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
