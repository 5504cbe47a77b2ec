//! The process table: the pod's containers, each with its init process and
//! execs, and how each ended. Plain data under the service's lock; nothing
//! in here calls the VM.

use std::collections::HashMap;
use std::os::unix::net::UnixStream;

use containerd_shim_protos::api;
use tokio::sync::watch;

use super::super::io::StdioPaths;
use super::super::pod::ProcessExit;
use super::errors::TaskError;
use super::holder::PidHolder;

/// One process of a container: its init or an exec.
pub struct Process {
    /// Its stdio as containerd gave it.
    pub stdio: StdioPaths,
    /// Started (its process ran, or the sandbox's pause "ran").
    pub started: bool,
    /// Its pid in the guest, once started.
    pub guest_pid: Option<u32>,
    exit_tx: watch::Sender<Option<ProcessExit>>,
    /// Its vsock connections (stdio, wait), shut down at its exit.
    pub streams: Vec<UnixStream>,
    /// Its stdin copy, while it may still run.
    pub stdin_copy: Option<super::super::io::StdinCopy>,
    /// The host process whose pid containerd gets for it, while it lives.
    holder: Option<PidHolder>,
    /// That pid (kept after the holder ended; 0 before there was one).
    pid: u32,
}

impl Process {
    /// A created, not started, process.
    pub fn new(stdio: StdioPaths) -> Self {
        Process {
            stdio,
            started: false,
            guest_pid: None,
            exit_tx: watch::channel(None).0,
            streams: Vec::new(),
            stdin_copy: None,
            holder: None,
            pid: 0,
        }
    }

    /// Gives it a host process to stand for it (see `holder`); if none can
    /// be started, the shim's own pid stands for it.
    pub fn hold(&mut self, id: &str) {
        match PidHolder::spawn() {
            Ok(h) => {
                self.pid = h.pid();
                self.holder = Some(h);
            }
            Err(e) => {
                tracing::warn!("{id}: no host process for its pid ({e}); the shim's stands for it");
                self.pid = std::process::id();
            }
        }
    }

    /// The pid containerd knows it by (0 before it has one).
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// How it ended, if it did.
    pub fn exit(&self) -> Option<ProcessExit> {
        *self.exit_tx.borrow()
    }

    /// Records its end (once: a later call changes nothing and answers
    /// false), and shuts its connections down so that copies blocked on a
    /// dead VM end and containerd's FIFOs close.
    pub fn set_exit(&mut self, exit: ProcessExit) -> bool {
        if self.exit().is_some() {
            return false;
        }
        for s in self.streams.drain(..) {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
        // Gone before the exit is known: its pid is not alive after.
        self.holder = None;
        self.exit_tx.send_replace(Some(exit));
        true
    }

    /// A receiver of its exit.
    pub fn subscribe(&self) -> watch::Receiver<Option<ProcessExit>> {
        self.exit_tx.subscribe()
    }

    /// Running: started and not ended.
    pub fn running(&self) -> bool {
        self.started && self.exit().is_none()
    }

    /// containerd's status of it.
    pub fn status(&self) -> api::Status {
        match (self.started, self.exit()) {
            (_, Some(_)) => api::Status::STOPPED,
            (true, None) => api::Status::RUNNING,
            (false, None) => api::Status::CREATED,
        }
    }
}

/// A container of the pod.
pub struct Container {
    /// Its bundle directory.
    pub bundle: String,
    /// The pod's pause container: no process in the VM.
    pub sandbox: bool,
    /// Its init process.
    pub init: Process,
    /// Its execs by id.
    pub execs: HashMap<String, Process>,
    /// Its volumes copied from the host (written back after it exits).
    pub copied: Vec<super::super::volumes::Copied>,
}

impl Container {
    /// Its init (`exec_id` empty) or one of its execs.
    pub fn process(&mut self, id: &str, exec_id: &str) -> Result<&mut Process, TaskError> {
        if exec_id.is_empty() {
            return Ok(&mut self.init);
        }
        self.execs
            .get_mut(exec_id)
            .ok_or_else(|| TaskError::NotFound(format!("exec {exec_id} of {id}")))
    }
}

/// Every container of the pod.
#[derive(Default)]
pub struct Table {
    containers: HashMap<String, Container>,
}

impl Table {
    /// Container `id`.
    pub fn container(&mut self, id: &str) -> Result<&mut Container, TaskError> {
        self.containers
            .get_mut(id)
            .ok_or_else(|| TaskError::NotFound(format!("container {id}")))
    }

    /// Process `exec_id` (empty: the init) of container `id`.
    pub fn process(&mut self, id: &str, exec_id: &str) -> Result<&mut Process, TaskError> {
        self.container(id)?.process(id, exec_id)
    }

    /// Whether container `id` exists.
    pub fn contains(&self, id: &str) -> bool {
        self.containers.contains_key(id)
    }

    /// Adds container `id` (ALREADY_EXISTS if it is there).
    pub fn insert(&mut self, id: &str, container: Container) -> Result<(), TaskError> {
        if self.contains(id) {
            return Err(TaskError::AlreadyExists(format!("container {id}")));
        }
        self.containers.insert(id.into(), container);
        Ok(())
    }

    /// Removes container `id` (with its execs) or one exec of it.
    pub fn remove(&mut self, id: &str, exec_id: &str) {
        if exec_id.is_empty() {
            self.containers.remove(id);
        } else if let Some(c) = self.containers.get_mut(id) {
            c.execs.remove(exec_id);
        }
    }

    /// No container left.
    pub fn is_empty(&self) -> bool {
        self.containers.is_empty()
    }

    /// Every running process in the VM, as (container id, exec id).
    pub fn running_in_vm(&self) -> Vec<(String, String)> {
        let mut running = Vec::new();
        for (id, c) in self.containers.iter().filter(|(_, c)| !c.sandbox) {
            if c.init.running() {
                running.push((id.clone(), String::new()));
            }
            for (exec_id, p) in &c.execs {
                if p.running() {
                    running.push((id.clone(), exec_id.clone()));
                }
            }
        }
        running
    }

    /// The ids of every container.
    pub fn ids(&self) -> Vec<String> {
        self.containers.keys().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn container(sandbox: bool) -> Container {
        Container {
            bundle: "/b".into(),
            sandbox,
            init: Process::new(StdioPaths::default()),
            execs: HashMap::new(),
            copied: Vec::new(),
        }
    }

    #[test]
    fn a_process_ends_once_and_is_found_by_id() {
        let mut t = Table::default();
        t.insert("c", container(false)).unwrap();
        assert!(matches!(
            t.insert("c", container(false)),
            Err(TaskError::AlreadyExists(_))
        ));
        t.insert("pause", container(true)).unwrap();
        let c = t.container("c").unwrap();
        c.execs
            .insert("e".into(), Process::new(StdioPaths::default()));
        assert!(matches!(
            t.process("c", "nope"),
            Err(TaskError::NotFound(_))
        ));
        assert!(matches!(t.process("x", ""), Err(TaskError::NotFound(_))));
        assert_eq!(t.process("c", "e").unwrap().status(), api::Status::CREATED);
        t.process("c", "").unwrap().started = true;
        t.process("c", "e").unwrap().started = true;
        t.process("pause", "").unwrap().started = true;
        let mut running = t.running_in_vm();
        running.sort();
        assert_eq!(
            running,
            [("c".to_string(), String::new()), ("c".into(), "e".into())]
        );
        let first = ProcessExit {
            status: 3,
            at_ns: 1,
        };
        assert!(t.process("c", "e").unwrap().set_exit(first));
        assert!(!t.process("c", "e").unwrap().set_exit(ProcessExit {
            status: 255,
            at_ns: 2
        }));
        assert_eq!(t.process("c", "e").unwrap().exit(), Some(first));
        assert_eq!(t.process("c", "e").unwrap().status(), api::Status::STOPPED);
        t.remove("c", "e");
        assert!(t.process("c", "e").is_err());
        t.remove("c", "");
        t.remove("pause", "");
        assert!(t.is_empty());
    }
}
