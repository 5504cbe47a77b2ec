//! The agent's request loop: read a frame, dispatch to a thin handler, answer.

use std::io::{Read, Write};

use zygote_agent_api::frame::{read_frame, write_frame};
use zygote_agent_api::{Code, Error, Pong, Request, Response, request, response};

use crate::container::registry::{ContainerError, Registry};
use crate::container::volumes::VolumeError;
use crate::vsock::VsockListener;
use crate::{exec, image, init, reconcile, selftest, sys, workload};

/// Accepts connections forever, one thread each.
pub fn serve(listener: VsockListener, agent_started_ns: u64) {
    loop {
        match listener.accept() {
            Ok(stream) => {
                let spawned = std::thread::Builder::new()
                    .name("agent-conn".into())
                    .spawn(move || serve_connection(stream, agent_started_ns));
                if let Err(e) = spawned {
                    eprintln!("zygote-agent: cannot start a connection thread: {e}");
                }
            }
            Err(e) => {
                eprintln!("zygote-agent: accept: {e}");
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
        }
    }
}

/// What to do after answering.
#[derive(Debug, PartialEq, Eq)]
pub enum After {
    /// Keep serving.
    Continue,
    /// Power the guest off.
    PowerOff,
}

/// Serves one client until it hangs up or sends something unreadable.
pub fn serve_connection<S: Read + Write>(mut stream: S, agent_started_ns: u64) {
    loop {
        let req: Request = match read_frame(&mut stream) {
            Ok(r) => r,
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return,
            Err(e) => {
                // A malformed frame cannot be resynchronized: answer once, then drop the client.
                let _ = write_frame(
                    &mut stream,
                    &error_response(0, Code::InvalidArgument, &e.to_string()),
                );
                return;
            }
        };
        let (resp, after) = handle(req, agent_started_ns);
        if write_frame(&mut stream, &resp).is_err() {
            return;
        }
        if after == After::PowerOff {
            // Powering off resets the vsock device, dropping what it has not
            // sent yet: the answer must reach the host first. The host hangs
            // up once it has read it; wait for that, but not for long.
            std::thread::spawn(|| {
                std::thread::sleep(std::time::Duration::from_secs(2));
                init::power_off()
            });
            let _ = stream.read(&mut [0u8; 1]);
            init::power_off();
        }
    }
}

/// A container operation's answer: its body, or an error with the matching code.
fn container_call(
    id: u64,
    result: Result<response::Body, ContainerError>,
) -> (response::Body, After) {
    match result {
        Ok(body) => (body, After::Continue),
        Err(e) => {
            let code = match e {
                ContainerError::NotFound(_) | ContainerError::Finished(_) => Code::NotFound,
                ContainerError::InvalidId(_)
                | ContainerError::Spec(_)
                | ContainerError::Rootfs(_)
                | ContainerError::StartFailed { .. }
                | ContainerError::NoProgram { .. } => Code::InvalidArgument,
                ContainerError::Exists(_) => Code::AlreadyExists,
                ContainerError::State { .. } => Code::FailedPrecondition,
                ContainerError::Volume(VolumeError::Invalid { .. }) => Code::InvalidArgument,
                ContainerError::Volume(VolumeError::Os { .. }) => Code::Internal,
                ContainerError::Os { .. } => Code::Internal,
                ContainerError::Unsupported(_) => Code::Unimplemented,
            };
            let Some(response::Body::Error(err)) = error_response(id, code, &e.to_string()).body
            else {
                unreachable!("error_response makes an error")
            };
            (response::Body::Error(err), After::Continue)
        }
    }
}

fn error_response(id: u64, code: Code, message: &str) -> Response {
    Response {
        id,
        body: Some(response::Body::Error(Error {
            code: code as i32,
            message: message.into(),
        })),
    }
}

/// Whether debug requests are served (see [`allow_debug`]).
static DEBUG: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Serves (or not) the debug requests: Exec, Spawn, SpawnStatus and
/// SelfTest, which run programs as root outside any container. Off unless
/// the host asked for them on the kernel command line ([`debug_in_cmdline`]):
/// a pod's VM never serves them.
pub fn allow_debug(on: bool) {
    DEBUG.store(on, std::sync::atomic::Ordering::Relaxed);
}

/// Whether the kernel command line `cmdline` turns debug requests on
/// (`zygote.debug=1`).
pub fn debug_in_cmdline(cmdline: &str) -> bool {
    cmdline.split_whitespace().any(|w| w == "zygote.debug=1")
}

fn is_debug(body: &Option<request::Body>) -> bool {
    matches!(
        body,
        Some(
            request::Body::Exec(_)
                | request::Body::Spawn(_)
                | request::Body::SpawnStatus(_)
                | request::Body::SelfTest(_)
        )
    )
}

/// Answers one request.
pub fn handle(req: Request, agent_started_ns: u64) -> (Response, After) {
    let id = req.id;
    if is_debug(&req.body) && !DEBUG.load(std::sync::atomic::Ordering::Relaxed) {
        return (
            error_response(
                id,
                Code::Unimplemented,
                "debug requests are not served: this guest was started without zygote.debug=1",
            ),
            After::Continue,
        );
    }
    let (body, after) = match req.body {
        Some(request::Body::Ping(_)) => (
            response::Body::Pong(Pong {
                version: zygote_agent_api::VERSION.into(),
                uptime_ns: sys::boottime_ns(),
                kernel_release: sys::kernel_release(),
                agent_started_ns,
            }),
            After::Continue,
        ),
        Some(request::Body::SelfTest(t)) => match selftest::validate(&t) {
            Ok(()) => (response::Body::SelfTest(selftest::run(&t)), After::Continue),
            Err(msg) => {
                return (
                    error_response(id, Code::InvalidArgument, &msg),
                    After::Continue,
                );
            }
        },
        Some(request::Body::Exec(e)) => match exec::run(&e) {
            Ok(result) => (response::Body::Exec(result), After::Continue),
            Err(e) => {
                return (
                    error_response(id, e.code(), &e.to_string()),
                    After::Continue,
                );
            }
        },
        Some(request::Body::Spawn(spec)) => match workload::spawn(&spec) {
            Ok(pid) => (
                response::Body::Spawned(zygote_agent_api::Spawned { pid }),
                After::Continue,
            ),
            Err(e) => {
                let code = match e {
                    workload::SpawnError::BadArgv | workload::SpawnError::BadEnv(_) => {
                        Code::InvalidArgument
                    }
                    _ => Code::Internal,
                };
                return (error_response(id, code, &e.to_string()), After::Continue);
            }
        },
        Some(request::Body::SpawnStatus(p)) => match workload::status(p.pid) {
            Some(None) => (response::Body::Spawned(p), After::Continue),
            Some(Some(code)) => (
                response::Body::Exited(zygote_agent_api::ProcessExit {
                    exit_code: code,
                    ..Default::default()
                }),
                After::Continue,
            ),
            None => {
                let message = format!("process {} was not started by the agent", p.pid);
                return (
                    error_response(id, Code::NotFound, &message),
                    After::Continue,
                );
            }
        },
        Some(request::Body::Reconcile(r)) => {
            let received = std::time::Instant::now();
            match reconcile::validate(&r) {
                Ok(()) => (
                    response::Body::Reconciled(reconcile::apply(&r, received)),
                    After::Continue,
                ),
                Err(e) => {
                    return (
                        error_response(id, Code::InvalidArgument, &e.to_string()),
                        After::Continue,
                    );
                }
            }
        }
        Some(request::Body::StepClock(step)) => match reconcile::step_clock(step.delta_ns) {
            Ok(()) => (
                response::Body::Clock(reconcile::read_clock()),
                After::Continue,
            ),
            Err(msg) => {
                return (
                    error_response(id, Code::InvalidArgument, &msg),
                    After::Continue,
                );
            }
        },
        Some(request::Body::CreateContainer(c)) => container_call(
            id,
            Registry::global()
                .create(&c.id, &c.spec_json, &c.rootfs, c.upper_size_mib, &c.volumes)
                .map(|()| response::Body::Empty(zygote_agent_api::Empty {})),
        ),
        Some(request::Body::UpdateVolume(u)) => container_call(
            id,
            match &u.volume {
                Some(v) => Registry::global().update_volume(&u.id, v),
                None => Err(ContainerError::NotFound(
                    "an update without a volume".into(),
                )),
            }
            .map(|()| response::Body::Empty(zygote_agent_api::Empty {})),
        ),
        Some(request::Body::ReadVolume(r)) => container_call(
            id,
            Registry::global()
                .read_volume(&r.id, &r.name, r.max_bytes)
                .map(|data| response::Body::VolumeData(zygote_agent_api::VolumeData { data })),
        ),
        Some(request::Body::StageContainer(c)) => container_call(
            id,
            Registry::global()
                .stage(&c.rootfs, c.upper_size_mib)
                .map(|pid| response::Body::Spawned(zygote_agent_api::Spawned { pid })),
        ),
        Some(request::Body::StartContainer(c)) => container_call(
            id,
            Registry::global()
                .start(&c.key())
                .map(|pid| response::Body::Started(zygote_agent_api::Spawned { pid })),
        ),
        Some(request::Body::WaitProcess(c)) => container_call(
            id,
            Registry::global().wait(&c.key()).map(|exit_code| {
                response::Body::Exited(zygote_agent_api::ProcessExit {
                    exit_code,
                    exited_at_ns: reconcile::sample().realtime_ns,
                    oom_killed: Registry::global().oom_killed(&c.key()),
                })
            }),
        ),
        Some(request::Body::SignalProcess(s)) => container_call(
            id,
            Registry::global()
                .signal(&zygote_agent_api::process_key(&s.id, &s.exec_id), s.signal)
                .map(|()| response::Body::Empty(zygote_agent_api::Empty {})),
        ),
        Some(request::Body::ExecProcess(e)) => container_call(
            id,
            Registry::global()
                .exec(&e.id, &e.exec_id, &e.process_json)
                .map(|()| response::Body::Empty(zygote_agent_api::Empty {})),
        ),
        Some(request::Body::Stats(c)) => container_call(
            id,
            Registry::global().stats(&c.id).map(response::Body::Stats),
        ),
        Some(request::Body::RemoveContainer(c)) => container_call(
            id,
            Registry::global()
                .remove(&c.key())
                .map(|()| response::Body::Empty(zygote_agent_api::Empty {})),
        ),
        Some(request::Body::CloseStdin(c)) => container_call(
            id,
            Registry::global()
                .close_stdin(&c.key())
                .map(|()| response::Body::Empty(zygote_agent_api::Empty {})),
        ),
        Some(request::Body::ResizeTty(r)) => container_call(
            id,
            Registry::global()
                .resize_tty(
                    &zygote_agent_api::process_key(&r.id, &r.exec_id),
                    r.width,
                    r.height,
                )
                .map(|()| response::Body::Empty(zygote_agent_api::Empty {})),
        ),
        Some(request::Body::GetOomEvent(_)) => container_call(
            id,
            Registry::global().next_oom(None).map(response::Body::Oom),
        ),
        Some(request::Body::SetCpus(c)) => {
            match crate::cpus::set_online(std::path::Path::new("/sys/devices/system/cpu"), c.online)
            {
                Ok(()) => (
                    response::Body::Empty(zygote_agent_api::Empty {}),
                    After::Continue,
                ),
                Err(e) => {
                    let code = match e {
                        crate::cpus::CpuError::Count { .. } => Code::InvalidArgument,
                        crate::cpus::CpuError::Os { .. } => Code::Internal,
                    };
                    return (error_response(id, code, &e.to_string()), After::Continue);
                }
            }
        }
        Some(request::Body::SetPodMemory(m)) => {
            if m.ram_bytes > 0 {
                let sys = std::path::Path::new("/sys/devices/system/memory");
                if let Err(e) = crate::memory::grow_to(sys, m.limit_bytes, m.ram_bytes) {
                    let code = match e {
                        crate::memory::MemoryError::Unsupported(_) => Code::FailedPrecondition,
                        crate::memory::MemoryError::Os { .. } => Code::Internal,
                    };
                    return (error_response(id, code, &e.to_string()), After::Continue);
                }
            }
            let root = std::path::Path::new("/sys/fs/cgroup");
            match crate::container::cgroup::limit_pod_memory(root, m.limit_bytes) {
                Ok(()) => (
                    response::Body::Empty(zygote_agent_api::Empty {}),
                    After::Continue,
                ),
                Err(e) => {
                    let code = if e.kind() == std::io::ErrorKind::InvalidInput {
                        Code::InvalidArgument
                    } else {
                        Code::Internal
                    };
                    return (error_response(id, code, &e.to_string()), After::Continue);
                }
            }
        }
        Some(request::Body::UnmountImage(u)) => match image::unmount(&u.target) {
            Ok(()) => (
                response::Body::Empty(zygote_agent_api::Empty {}),
                After::Continue,
            ),
            Err(e) => {
                let code = match e {
                    image::MountError::Unmount { .. } => Code::FailedPrecondition,
                    _ => Code::InvalidArgument,
                };
                return (error_response(id, code, &e.to_string()), After::Continue);
            }
        },
        Some(request::Body::MountImage(m)) => match (if m.serial.is_empty() {
            Ok(m.device.clone())
        } else {
            image::find_disk(
                std::path::Path::new("/sys/block"),
                &m.serial,
                std::time::Duration::from_secs(10),
            )
        })
        .and_then(|device| image::mount(&device, &m.target, m.warm))
        {
            Ok(warmed_bytes) => (
                response::Body::Mounted(zygote_agent_api::Mounted { warmed_bytes }),
                After::Continue,
            ),
            Err(e) => {
                let code = match e {
                    image::MountError::Mount { .. } => Code::Internal,
                    image::MountError::NoDisk { .. } => Code::NotFound,
                    _ => Code::InvalidArgument,
                };
                return (error_response(id, code, &e.to_string()), After::Continue);
            }
        },
        Some(request::Body::ListPids(c)) => container_call(
            id,
            Registry::global()
                .pids(&c.key())
                .map(|pids| response::Body::Pids(zygote_agent_api::Pids { pids })),
        ),
        Some(request::Body::UpdateResources(u)) => container_call(
            id,
            Registry::global()
                .update(&u.id, &u.resources_json)
                .map(|()| response::Body::Empty(zygote_agent_api::Empty {})),
        ),
        Some(request::Body::Sample(_)) => {
            (response::Body::Sample(reconcile::sample()), After::Continue)
        }
        Some(request::Body::ReadClock(_)) => (
            response::Body::Clock(reconcile::read_clock()),
            After::Continue,
        ),
        Some(request::Body::Shutdown(_)) => {
            if std::process::id() != 1 {
                return (
                    error_response(id, Code::Unimplemented, "shutdown only as PID 1"),
                    After::Continue,
                );
            }
            (
                response::Body::ShutdownAck(zygote_agent_api::Empty {}),
                After::PowerOff,
            )
        }
        None => {
            return (
                error_response(id, Code::InvalidArgument, "empty or unknown request"),
                After::Continue,
            );
        }
    };
    (
        Response {
            id,
            body: Some(body),
        },
        after,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;
    use zygote_agent_api::Ping;

    #[test]
    fn debug_requests_are_served_only_when_the_command_line_asks() {
        assert!(debug_in_cmdline(
            "console=ttyS0 reboot=k zygote.debug=1 quiet"
        ));
        assert!(!debug_in_cmdline(
            "console=ttyS0 zygote.debug=0 xzygote.debug=1"
        ));
        assert!(!debug_in_cmdline(""));
        let exec = || Request {
            id: 3,
            body: Some(request::Body::Exec(zygote_agent_api::Exec {
                argv: vec!["/bin/true".into()],
                ..Default::default()
            })),
        };
        // Off (the default, as in a pod's VM): UNIMPLEMENTED, nothing run.
        let (resp, _) = handle(exec(), 0);
        assert!(
            matches!(resp.body, Some(response::Body::Error(ref e))
                if e.code == Code::Unimplemented as i32 && e.message.contains("zygote.debug=1")),
            "{resp:?}"
        );
        // A request that is not a debug one is answered as before.
        let (resp, _) = handle(
            Request {
                id: 4,
                body: Some(request::Body::Ping(Ping {})),
            },
            0,
        );
        assert!(matches!(resp.body, Some(response::Body::Pong(_))));
    }

    #[test]
    fn ping_over_a_stream_and_bad_frames() {
        let (mut host, guest) = UnixStream::pair().unwrap();
        let server = std::thread::spawn(move || serve_connection(guest, 42));
        write_frame(
            &mut host,
            &Request {
                id: 9,
                body: Some(request::Body::Ping(Ping {})),
            },
        )
        .unwrap();
        let resp: Response = read_frame(&mut host).unwrap();
        assert_eq!(resp.id, 9);
        match resp.body {
            Some(response::Body::Pong(p)) => {
                assert_eq!(p.version, zygote_agent_api::VERSION);
                assert_eq!(p.agent_started_ns, 42);
                assert!(p.uptime_ns > 0);
                assert!(!p.kernel_release.is_empty());
            }
            other => panic!("unexpected {other:?}"),
        }
        // An empty request is an error, and the connection goes on.
        write_frame(&mut host, &Request { id: 10, body: None }).unwrap();
        let resp: Response = read_frame(&mut host).unwrap();
        assert!(
            matches!(resp.body, Some(response::Body::Error(ref e)) if e.code == Code::InvalidArgument as i32)
        );
        // Shutdown is refused outside PID 1.
        write_frame(
            &mut host,
            &Request {
                id: 11,
                body: Some(request::Body::Shutdown(Default::default())),
            },
        )
        .unwrap();
        let resp: Response = read_frame(&mut host).unwrap();
        assert!(
            matches!(resp.body, Some(response::Body::Error(ref e)) if e.code == Code::Unimplemented as i32)
        );
        // A huge length: one error, then the server drops this client.
        host.write_all(&u32::MAX.to_be_bytes()).unwrap();
        let resp: Response = read_frame(&mut host).unwrap();
        assert!(matches!(resp.body, Some(response::Body::Error(_))));
        server.join().unwrap();
    }
}
