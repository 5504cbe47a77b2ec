//! A device's I/O thread, and the way to stop it.

use std::thread::JoinHandle;

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
