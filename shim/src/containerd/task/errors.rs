//! What a task request can fail with, and the ttrpc code containerd gets for
//! each: chosen by variant, since containerd and kubelet act on the code.

use containerd_shim_protos::ttrpc::{self, Code};

use super::super::io::IoError;
use super::super::pod::PodError;

/// A failed task request.
#[derive(Debug, thiserror::Error)]
pub enum TaskError {
    /// No such container or exec.
    #[error("{0} not found")]
    NotFound(String),
    /// The id is taken.
    #[error("{0} already exists")]
    AlreadyExists(String),
    /// The process has exited (containerd's "process already finished").
    #[error("process already finished")]
    Finished,
    /// Not in the state the request needs.
    #[error("{0}")]
    Precondition(String),
    /// The request itself is wrong (a spec, options, stdio paths).
    #[error("{0}")]
    Invalid(String),
    /// zygote does not do this.
    #[error("zygote does not {0}")]
    Unsupported(&'static str),
    /// The runtime's configuration file is unusable.
    #[error(transparent)]
    Config(#[from] super::super::config::ConfigError),
    /// The container's stdio could not be bridged.
    #[error(transparent)]
    Io(#[from] IoError),
    /// The pod's VM (or its agent) failed it.
    #[error(transparent)]
    Pod(#[from] PodError),
    /// The image disk could not be made.
    #[error("the image disk")]
    Image(#[from] crate::image::ImageError),
    /// Mounting the container's rootfs on the host failed.
    #[error("mount the rootfs")]
    Mount(#[source] std::io::Error),
    /// A reply could not be encoded.
    #[error("encode the answer")]
    Encode(#[source] containerd_shim_protos::protobuf::Error),
    /// A bind mount cannot be given to the VM.
    #[error(transparent)]
    Volume(#[from] super::super::volumes::VolumeError),
    /// A blocking task was cancelled or panicked.
    #[error("a worker thread failed: {0}")]
    Worker(String),
}

impl TaskError {
    /// The ttrpc code containerd gets.
    pub fn code(&self) -> Code {
        use zygote_agent_api::Code as Agent;
        match self {
            TaskError::NotFound(_) | TaskError::Finished => Code::NOT_FOUND,
            TaskError::AlreadyExists(_) => Code::ALREADY_EXISTS,
            TaskError::Precondition(_) | TaskError::Volume(_) => Code::FAILED_PRECONDITION,
            TaskError::Invalid(_) | TaskError::Config(_) | TaskError::Io(_) => {
                Code::INVALID_ARGUMENT
            }
            TaskError::Unsupported(_) => Code::UNIMPLEMENTED,
            TaskError::Pod(PodError::Agent(e)) => match e.code() {
                Some(Agent::InvalidArgument) => Code::INVALID_ARGUMENT,
                Some(Agent::NotFound) => Code::NOT_FOUND,
                Some(Agent::AlreadyExists) => Code::ALREADY_EXISTS,
                Some(Agent::FailedPrecondition) => Code::FAILED_PRECONDITION,
                Some(Agent::Unimplemented) => Code::UNIMPLEMENTED,
                Some(Agent::Internal | Agent::Unknown) | None => Code::INTERNAL,
            },
            // What an operator must fix on the node: a missing kernel or
            // guest image, a damaged template, a pod network the VM cannot
            // take (no namespace, no interface, an IPv6 address, no tap), a
            // host directory it cannot be given.
            TaskError::Pod(
                PodError::Damaged { .. }
                | PodError::Template { .. }
                | PodError::Network(_)
                | PodError::NoSlot { .. }
                | PodError::Share { .. },
            ) => Code::FAILED_PRECONDITION,
            TaskError::Pod(_)
            | TaskError::Image(_)
            | TaskError::Mount(_)
            | TaskError::Encode(_)
            | TaskError::Worker(_) => Code::INTERNAL,
        }
    }
}

impl TaskError {
    /// The message with its whole chain of causes (containerd shows only
    /// this one string).
    pub fn describe(&self) -> String {
        zygote_host::describe(self)
    }
}

impl From<TaskError> for ttrpc::Error {
    fn from(e: TaskError) -> Self {
        ttrpc::Error::RpcStatus(ttrpc::get_status(e.code(), e.describe()))
    }
}
