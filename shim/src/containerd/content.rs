//! What containerd knows of a container's image, asked over its gRPC API
//! (the address containerd gives every shim): the image's chain ID, the
//! content address of its unpacked layers. Images are cached and templates
//! named by it, so one image has one template per node whichever containerd
//! namespace (`default` for `ctr`, `k8s.io` for the CRI) runs it, and after
//! containerd's state is rebuilt.
//!
//! The messages are the few fields of containerd's `containers.v1` and
//! `snapshots.v1` services this needs (protobuf skips the others).

use std::path::{Path, PathBuf};
use std::time::Duration;

use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::{Channel, Endpoint, Uri};

/// How long the lookup may take before the shim falls back to keying the
/// image by its snapshot (generous: a fallback key means another template
/// to build, which costs far more than waiting for a busy containerd).
const TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Clone, PartialEq, prost::Message)]
struct GetContainerRequest {
    #[prost(string, tag = "1")]
    id: String,
}

#[derive(Clone, PartialEq, prost::Message)]
struct Container {
    #[prost(string, tag = "1")]
    id: String,
    #[prost(string, tag = "3")]
    image: String,
    #[prost(string, tag = "6")]
    snapshotter: String,
    #[prost(string, tag = "7")]
    snapshot_key: String,
}

#[derive(Clone, PartialEq, prost::Message)]
struct GetContainerResponse {
    #[prost(message, optional, tag = "1")]
    container: Option<Container>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct StatSnapshotRequest {
    #[prost(string, tag = "1")]
    snapshotter: String,
    #[prost(string, tag = "2")]
    key: String,
}

#[derive(Clone, PartialEq, prost::Message)]
struct SnapshotInfo {
    #[prost(string, tag = "1")]
    name: String,
    #[prost(string, tag = "2")]
    parent: String,
}

#[derive(Clone, PartialEq, prost::Message)]
struct StatSnapshotResponse {
    #[prost(message, optional, tag = "1")]
    info: Option<SnapshotInfo>,
}

/// Where the shim's containerd answers: its gRPC socket and the namespace
/// of the shim's containers.
#[derive(Debug, Clone)]
pub struct ContainerdApi {
    /// containerd's gRPC socket (the shim's `-address`).
    pub address: PathBuf,
    /// The containers' namespace (the shim's `-namespace`).
    pub namespace: String,
}

impl ContainerdApi {
    /// The chain ID of container `id`'s image (see [`image_chain_id`]).
    pub async fn image_chain_id(&self, id: &str) -> Result<String, ContentError> {
        image_chain_id(&self.address, &self.namespace, id).await
    }
}

/// Why containerd could not say.
#[derive(Debug, thiserror::Error)]
pub enum ContentError {
    /// containerd's socket did not answer.
    #[error("cannot reach containerd at {}: {source}", address.display())]
    Connect {
        /// The socket.
        address: PathBuf,
        /// Cause.
        source: tonic::transport::Error,
    },
    /// A call failed.
    #[error("containerd {call}: {status}")]
    Call {
        /// Which.
        call: &'static str,
        /// What containerd said.
        status: Box<tonic::Status>,
    },
    /// The answer lacks what is needed.
    #[error("{0}")]
    Missing(String),
    /// Too slow.
    #[error("containerd did not answer within {TIMEOUT:?}")]
    Timeout,
}

/// A gRPC connection to containerd in one namespace.
struct Containerd {
    grpc: tonic::client::Grpc<Channel>,
    namespace: String,
}

impl Containerd {
    async fn connect(address: &Path, namespace: &str) -> Result<Self, ContentError> {
        let path = address.to_path_buf();
        let channel = Endpoint::from_static("http://[::]:0")
            .connect_with_connector(tower::service_fn(move |_: Uri| {
                let path = path.clone();
                async move {
                    let stream = tokio::net::UnixStream::connect(path).await?;
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
                }
            }))
            .await
            .map_err(|source| ContentError::Connect {
                address: address.to_path_buf(),
                source,
            })?;
        Ok(Containerd {
            grpc: tonic::client::Grpc::new(channel),
            namespace: namespace.into(),
        })
    }

    async fn call<Q, A>(
        &mut self,
        call: &'static str,
        path: &'static str,
        q: Q,
    ) -> Result<A, ContentError>
    where
        Q: prost::Message + Send + Sync + 'static,
        A: prost::Message + Default + Send + Sync + 'static,
    {
        let failed = |status: tonic::Status| ContentError::Call {
            call,
            status: Box::new(status),
        };
        let mut request = tonic::Request::new(q);
        let namespace = self.namespace.parse().map_err(|_| {
            ContentError::Missing(format!("invalid namespace {:?}", self.namespace))
        })?;
        request
            .metadata_mut()
            .insert("containerd-namespace", namespace);
        self.grpc
            .ready()
            .await
            .map_err(|e| failed(tonic::Status::unavailable(e.to_string())))?;
        let answer = self
            .grpc
            .unary(
                request,
                PathAndQuery::from_static(path),
                tonic_prost::ProstCodec::<Q, A>::default(),
            )
            .await
            .map_err(failed)?;
        Ok(answer.into_inner())
    }
}

/// The chain ID of container `id`'s image: the parent of its writable
/// snapshot, which containerd names by the chain ID of the layers under it
/// (`sha256:…`).
pub async fn image_chain_id(
    address: &Path,
    namespace: &str,
    id: &str,
) -> Result<String, ContentError> {
    let lookup = async {
        let mut containerd = Containerd::connect(address, namespace).await?;
        let got: GetContainerResponse = containerd
            .call(
                "Containers.Get",
                "/containerd.services.containers.v1.Containers/Get",
                GetContainerRequest { id: id.into() },
            )
            .await?;
        let container = got
            .container
            .ok_or_else(|| ContentError::Missing(format!("containerd has no container {id}")))?;
        if container.snapshot_key.is_empty() {
            return Err(ContentError::Missing(format!(
                "container {id} has no snapshot (its rootfs is not containerd's)"
            )));
        }
        let stat: StatSnapshotResponse = containerd
            .call(
                "Snapshots.Stat",
                "/containerd.services.snapshots.v1.Snapshots/Stat",
                StatSnapshotRequest {
                    snapshotter: container.snapshotter.clone(),
                    key: container.snapshot_key.clone(),
                },
            )
            .await?;
        let parent = stat.info.map(|i| i.parent).unwrap_or_default();
        if !is_chain_id(&parent) {
            return Err(ContentError::Missing(format!(
                "snapshot {} of container {id} has no layer chain under it ({parent:?})",
                container.snapshot_key
            )));
        }
        Ok(parent)
    };
    tokio::time::timeout(TIMEOUT, lookup)
        .await
        .map_err(|_| ContentError::Timeout)?
}

/// `sha256:` and 64 lower-case hex digits.
fn is_chain_id(s: &str) -> bool {
    s.strip_prefix("sha256:").is_some_and(|h| {
        h.len() == 64
            && h.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

/// The image cache key of a chain ID (`sha256:ab…` → `chain-sha256-ab…`).
pub fn image_key(chain_id: &str) -> String {
    format!("chain-{}", chain_id.replace(':', "-"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_ids_are_checked_and_keyed() {
        let id = format!("sha256:{}", "0123456789abcdef".repeat(4));
        assert!(is_chain_id(&id));
        assert!(!is_chain_id("sha256:0123"), "short");
        assert!(!is_chain_id(&id.to_uppercase()), "upper case");
        assert!(!is_chain_id(&id.replace("sha256", "sha512")));
        assert!(
            !is_chain_id("default/12/sha256:x"),
            "a snapshot key, not a chain ID"
        );
        assert_eq!(
            image_key(&id),
            format!("chain-sha256-{}", "0123456789abcdef".repeat(4))
        );
    }

    #[test]
    fn a_missing_socket_is_a_clear_error() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let err = rt
            .block_on(image_chain_id(
                Path::new("/nonexistent/containerd.sock"),
                "default",
                "c",
            ))
            .unwrap_err();
        assert!(err.to_string().contains("cannot reach containerd"), "{err}");
    }
}
