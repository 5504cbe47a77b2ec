//! The pod VM's typed agent calls: what the Task service asks of the guest,
//! with the agent's request and answer bodies kept in here.

use std::os::unix::net::UnixStream;
use std::time::Duration;

use zygote_agent_api::{
    AgentClient, ContainerRef, ContainerStats, CreateContainer, ExecProcess, ReadVolume, ResizeTty,
    SetCpus, SetPodMemory, SignalProcess, UpdateResources, UpdateVolume, Volume, request, response,
};

use super::{PodError, PodVm};

/// How a process in the VM ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcessExit {
    /// Exit code, or 128 + N when killed by signal N.
    pub status: u32,
    /// When (guest CLOCK_REALTIME, ns).
    pub at_ns: u64,
}

/// Long enough to mean "until it happens" for a blocking wait.
const FOREVER: Duration = Duration::from_secs(365 * 24 * 3600);

fn unexpected(request: &'static str, answer: response::Body) -> PodError {
    PodError::Unexpected {
        request,
        answer: format!("{answer:?}"),
    }
}

impl PodVm {
    /// An agent call answered with `Empty`.
    fn call_empty(&self, name: &'static str, body: request::Body) -> Result<(), PodError> {
        match self.call(body)? {
            response::Body::Empty(_) => Ok(()),
            other => Err(unexpected(name, other)),
        }
    }

    /// Prepares container `id` (its root and process) from the guest's
    /// spec, with a writable layer of `upper_size_mib` (0: the default).
    pub fn create_container(
        &self,
        id: &str,
        spec_json: Vec<u8>,
        rootfs: &str,
        upper_size_mib: u32,
        volumes: Vec<Volume>,
    ) -> Result<(), PodError> {
        self.call_empty(
            "CreateContainer",
            request::Body::CreateContainer(CreateContainer {
                id: id.into(),
                spec_json,
                rootfs: rootfs.into(),
                upper_size_mib,
                volumes,
            }),
        )?;
        self.mark("create");
        Ok(())
    }

    /// Brings the VM's CPUs 0..`cpus` online (the others offline).
    pub fn set_cpus(&self, cpus: u8) -> Result<(), PodError> {
        self.call_empty(
            "SetCpus",
            request::Body::SetCpus(SetCpus {
                online: cpus.into(),
            }),
        )?;
        self.mark("cpus");
        Ok(())
    }

    /// Caps the memory of the pod's containers together at `bytes`, and
    /// (`ram_bytes` > 0: the VM's RAM) adds RAM up to that size first.
    pub fn set_memory(&self, bytes: u64, ram_bytes: u64) -> Result<(), PodError> {
        self.call_empty(
            "SetPodMemory",
            request::Body::SetPodMemory(SetPodMemory {
                limit_bytes: bytes,
                ram_bytes,
            }),
        )?;
        self.mark("memory");
        Ok(())
    }

    /// Replaces container `id`'s copy of a volume.
    pub fn update_volume(&self, id: &str, volume: Volume) -> Result<(), PodError> {
        self.call_empty(
            "UpdateVolume",
            request::Body::UpdateVolume(UpdateVolume {
                id: id.into(),
                volume: Some(volume),
            }),
        )
    }

    /// Up to `max_bytes` of container `id`'s file volume `name`.
    pub fn read_volume(&self, id: &str, name: &str, max_bytes: u32) -> Result<Vec<u8>, PodError> {
        match self.call(request::Body::ReadVolume(ReadVolume {
            id: id.into(),
            name: name.into(),
            max_bytes,
        }))? {
            response::Body::VolumeData(d) => Ok(d.data),
            other => Err(unexpected("ReadVolume", other)),
        }
    }

    /// Prepares exec `exec_id` in container `id` (an OCI process, JSON).
    pub fn exec_process(
        &self,
        id: &str,
        exec_id: &str,
        process_json: Vec<u8>,
    ) -> Result<(), PodError> {
        self.call_empty(
            "ExecProcess",
            request::Body::ExecProcess(ExecProcess {
                id: id.into(),
                exec_id: exec_id.into(),
                process_json,
            }),
        )?;
        self.mark("exec");
        Ok(())
    }

    /// Starts a prepared process; its pid in the guest once it has exec'd.
    pub fn start(&self, process: &ContainerRef) -> Result<u32, PodError> {
        match self.call(request::Body::StartContainer(process.clone()))? {
            response::Body::Started(s) => {
                self.mark("start");
                Ok(s.pid)
            }
            other => Err(unexpected("StartContainer", other)),
        }
    }

    /// Sends `signal` to a process.
    pub fn signal(&self, process: &ContainerRef, signal: u32) -> Result<(), PodError> {
        self.call_empty(
            "SignalProcess",
            request::Body::SignalProcess(SignalProcess {
                id: process.id.clone(),
                exec_id: process.exec_id.clone(),
                signal: signal as i32,
            }),
        )
    }

    /// Stops (if needed) and removes a container or an exec.
    pub fn remove(&self, process: &ContainerRef) -> Result<(), PodError> {
        self.call_empty(
            "RemoveContainer",
            request::Body::RemoveContainer(process.clone()),
        )?;
        self.mark("delete");
        Ok(())
    }

    /// Closes a process's stdin (it reads end of file).
    pub fn close_stdin(&self, process: &ContainerRef) -> Result<(), PodError> {
        self.call_empty("CloseStdin", request::Body::CloseStdin(process.clone()))
    }

    /// Resizes a process's terminal.
    pub fn resize_tty(
        &self,
        process: &ContainerRef,
        width: u32,
        height: u32,
    ) -> Result<(), PodError> {
        self.call_empty(
            "ResizeTty",
            request::Body::ResizeTty(ResizeTty {
                id: process.id.clone(),
                exec_id: process.exec_id.clone(),
                width,
                height,
            }),
        )
    }

    /// Applies OCI `linux.resources` (JSON) to container `id`'s cgroup.
    pub fn update_resources(&self, id: &str, resources_json: Vec<u8>) -> Result<(), PodError> {
        self.call_empty(
            "UpdateResources",
            request::Body::UpdateResources(UpdateResources {
                id: id.into(),
                resources_json,
            }),
        )
    }

    /// The guest pids of container `id`'s processes.
    pub fn pids(&self, id: &str) -> Result<Vec<u32>, PodError> {
        let key = ContainerRef {
            id: id.into(),
            exec_id: String::new(),
        };
        match self.call(request::Body::ListPids(key))? {
            response::Body::Pids(p) => Ok(p.pids),
            other => Err(unexpected("ListPids", other)),
        }
    }

    /// Container `id`'s cgroup counters.
    pub fn stats(&self, id: &str) -> Result<ContainerStats, PodError> {
        let key = ContainerRef {
            id: id.into(),
            exec_id: String::new(),
        };
        match self.call(request::Body::Stats(key))? {
            response::Body::Stats(s) => Ok(s),
            other => Err(unexpected("Stats", other)),
        }
    }

    /// Whether the agent answers a ping on a fresh connection within
    /// `timeout` (a fresh one also proves it still accepts).
    pub fn ping(&self, timeout: Duration) -> Result<(), PodError> {
        let mut client = self.connect()?;
        client
            .set_timeout(timeout)
            .map_err(zygote_agent_api::ClientError::Io)?;
        client.ping()?;
        Ok(())
    }

    /// A wait for `process`'s exit on a connection of its own.
    pub fn wait_for(&self, process: ContainerRef) -> Result<ExitWait, PodError> {
        let client = self.connect()?;
        client
            .set_timeout(FOREVER)
            .map_err(zygote_agent_api::ClientError::Io)?;
        Ok(ExitWait { client, process })
    }

    /// The stream of OOM kills in the VM, on a connection of its own.
    pub fn oom_stream(&self) -> Result<OomStream, PodError> {
        let client = self.connect()?;
        client
            .set_timeout(FOREVER)
            .map_err(zygote_agent_api::ClientError::Io)?;
        Ok(OomStream { client })
    }
}

/// A process's exit, waited for on its own connection.
#[derive(Debug)]
pub struct ExitWait {
    client: AgentClient,
    process: ContainerRef,
}

impl ExitWait {
    /// A handle on the connection, to shut it down (which ends [`Self::wait`]).
    pub fn stream(&self) -> std::io::Result<UnixStream> {
        self.client.try_clone_stream()
    }

    /// Blocks until the process exits (or the connection ends).
    pub fn wait(mut self) -> Result<ProcessExit, PodError> {
        match self
            .client
            .call(request::Body::WaitProcess(self.process.clone()))?
        {
            response::Body::Exited(e) => Ok(ProcessExit {
                status: e.exit_code as u32,
                at_ns: e.exited_at_ns,
            }),
            other => Err(unexpected("WaitProcess", other)),
        }
    }
}

/// OOM kills in the VM, one container id at a time.
#[derive(Debug)]
pub struct OomStream {
    client: AgentClient,
}

impl Iterator for OomStream {
    type Item = String;

    /// The id of the next container whose cgroup saw an OOM kill; None when
    /// the connection (the VM) ends.
    fn next(&mut self) -> Option<String> {
        match self
            .client
            .call(request::Body::GetOomEvent(Default::default()))
        {
            Ok(response::Body::Oom(e)) => Some(e.id),
            _ => None,
        }
    }
}
