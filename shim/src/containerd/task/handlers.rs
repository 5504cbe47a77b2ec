//! containerd's Task API (ttrpc): each handler decodes its request, calls a
//! typed method (`lifecycle.rs`) and maps a [`TaskError`] to its code.
//! Every RPC is implemented: what zygote does not do answers UNIMPLEMENTED.

use async_trait::async_trait;
use containerd_shim_protos::api;
use containerd_shim_protos::protobuf::MessageField;
use containerd_shim_protos::shim_async::Task;
use containerd_shim_protos::ttrpc::r#async::TtrpcContext;
use containerd_shim_protos::ttrpc::{self};

use super::super::io::StdioPaths;
use super::TaskService;
use super::errors::TaskError;
use super::events::timestamp_ns;
use super::metrics::to_metrics;

type TtrpcResult<T> = ttrpc::Result<T>;

/// The id a process goes by in containerd's answers: the container's for
/// its init, else the exec's.
fn process_id<'a>(id: &'a str, exec_id: &'a str) -> &'a str {
    if exec_id.is_empty() { id } else { exec_id }
}

#[async_trait]
impl Task for TaskService {
    async fn create(
        &self,
        _ctx: &TtrpcContext,
        req: api::CreateTaskRequest,
    ) -> TtrpcResult<api::CreateTaskResponse> {
        let pid = self.create_task(&req).await?;
        Ok(api::CreateTaskResponse {
            pid,
            ..Default::default()
        })
    }

    async fn start(
        &self,
        _ctx: &TtrpcContext,
        req: api::StartRequest,
    ) -> TtrpcResult<api::StartResponse> {
        let pid = self.start_task(&req.id, &req.exec_id).await?;
        Ok(api::StartResponse {
            pid,
            ..Default::default()
        })
    }

    async fn delete(
        &self,
        _ctx: &TtrpcContext,
        req: api::DeleteRequest,
    ) -> TtrpcResult<api::DeleteResponse> {
        let (pid, exit) = self.delete_task(&req.id, &req.exec_id).await?;
        Ok(api::DeleteResponse {
            pid,
            exit_status: exit.status,
            exited_at: MessageField::some(timestamp_ns(exit.at_ns)),
            ..Default::default()
        })
    }

    async fn state(
        &self,
        _ctx: &TtrpcContext,
        req: api::StateRequest,
    ) -> TtrpcResult<api::StateResponse> {
        let view = self.view(&req.id, &req.exec_id)?;
        Ok(api::StateResponse {
            id: process_id(&req.id, &req.exec_id).into(),
            bundle: view.bundle,
            pid: view.pid,
            status: view.status.into(),
            stdin: view.stdio.stdin,
            stdout: view.stdio.stdout,
            stderr: view.stdio.stderr,
            terminal: view.stdio.terminal,
            exit_status: view.exit.map_or(0, |e| e.status),
            exited_at: view.exit.map_or_else(MessageField::none, |e| {
                MessageField::some(timestamp_ns(e.at_ns))
            }),
            exec_id: req.exec_id,
            ..Default::default()
        })
    }

    async fn wait(
        &self,
        _ctx: &TtrpcContext,
        req: api::WaitRequest,
    ) -> TtrpcResult<api::WaitResponse> {
        let exit = self.wait_task(&req.id, &req.exec_id).await?;
        Ok(api::WaitResponse {
            exit_status: exit.status,
            exited_at: MessageField::some(timestamp_ns(exit.at_ns)),
            ..Default::default()
        })
    }

    async fn kill(&self, _ctx: &TtrpcContext, req: api::KillRequest) -> TtrpcResult<api::Empty> {
        self.kill_task(&req.id, &req.exec_id, req.signal).await?;
        Ok(api::Empty::new())
    }

    async fn exec(
        &self,
        _ctx: &TtrpcContext,
        req: api::ExecProcessRequest,
    ) -> TtrpcResult<api::Empty> {
        let process_json = req
            .spec
            .as_ref()
            .map(|a| a.value.clone())
            .unwrap_or_default();
        let stdio = StdioPaths {
            stdin: req.stdin,
            stdout: req.stdout,
            stderr: req.stderr,
            terminal: req.terminal,
        };
        self.add_exec(&req.id, &req.exec_id, process_json, stdio)
            .await?;
        Ok(api::Empty::new())
    }

    async fn resize_pty(
        &self,
        _ctx: &TtrpcContext,
        req: api::ResizePtyRequest,
    ) -> TtrpcResult<api::Empty> {
        self.resize(&req.id, &req.exec_id, req.width, req.height)
            .await?;
        Ok(api::Empty::new())
    }

    async fn close_io(
        &self,
        _ctx: &TtrpcContext,
        req: api::CloseIORequest,
    ) -> TtrpcResult<api::Empty> {
        if req.stdin {
            self.close_stdin(&req.id, &req.exec_id).await?;
        } else {
            self.view(&req.id, &req.exec_id)?;
        }
        Ok(api::Empty::new())
    }

    async fn pids(
        &self,
        _ctx: &TtrpcContext,
        req: api::PidsRequest,
    ) -> TtrpcResult<api::PidsResponse> {
        let pids = self.list_pids(&req.id).await?;
        Ok(api::PidsResponse {
            processes: pids
                .into_iter()
                .map(|pid| api::ProcessInfo {
                    pid,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        })
    }

    async fn stats(
        &self,
        _ctx: &TtrpcContext,
        req: api::StatsRequest,
    ) -> TtrpcResult<api::StatsResponse> {
        let stats = self.container_stats(&req.id).await?;
        Ok(api::StatsResponse {
            stats: MessageField::some(to_metrics(&stats)?),
            ..Default::default()
        })
    }

    async fn update(
        &self,
        _ctx: &TtrpcContext,
        req: api::UpdateTaskRequest,
    ) -> TtrpcResult<api::Empty> {
        let resources_json = req
            .resources
            .as_ref()
            .map(|a| a.value.clone())
            .unwrap_or_default();
        self.update_task(&req.id, resources_json).await?;
        Ok(api::Empty::new())
    }

    async fn connect(
        &self,
        _ctx: &TtrpcContext,
        req: api::ConnectRequest,
    ) -> TtrpcResult<api::ConnectResponse> {
        let view = self.view(&req.id, "")?;
        Ok(api::ConnectResponse {
            shim_pid: std::process::id(),
            task_pid: view.pid,
            version: env!("CARGO_PKG_VERSION").into(),
            ..Default::default()
        })
    }

    async fn shutdown(
        &self,
        _ctx: &TtrpcContext,
        _req: api::ShutdownRequest,
    ) -> TtrpcResult<api::Empty> {
        self.shutdown_if_idle().await;
        Ok(api::Empty::new())
    }

    async fn pause(&self, _ctx: &TtrpcContext, _req: api::PauseRequest) -> TtrpcResult<api::Empty> {
        Err(TaskError::Unsupported("pause tasks yet").into())
    }

    async fn resume(
        &self,
        _ctx: &TtrpcContext,
        _req: api::ResumeRequest,
    ) -> TtrpcResult<api::Empty> {
        Err(TaskError::Unsupported("pause tasks yet").into())
    }

    async fn checkpoint(
        &self,
        _ctx: &TtrpcContext,
        _req: api::CheckpointTaskRequest,
    ) -> TtrpcResult<api::Empty> {
        Err(TaskError::Unsupported("checkpoint tasks").into())
    }
}
