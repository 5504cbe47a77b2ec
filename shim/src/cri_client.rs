//! A client's side of containerd's CRI, for the node installer (and its
//! tests): a connection over containerd's socket, and a pod sandbox on the
//! node's network.

use std::path::Path;

use k8s_cri::v1 as cri;

/// A connection to containerd's CRI at `socket`.
pub async fn channel(socket: &Path) -> anyhow::Result<tonic::transport::Channel> {
    use tonic::transport::{Endpoint, Uri};
    let path = socket.to_path_buf();
    Ok(Endpoint::try_from("http://[::]:50051")?
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(path).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
            }
        }))
        .await?)
}

/// A pod sandbox `name` (uid `uid`, namespace `namespace`) on the node's
/// network: no CNI address taken.
pub fn host_network_pod(name: &str, uid: &str, namespace: &str) -> cri::PodSandboxConfig {
    cri::PodSandboxConfig {
        metadata: Some(cri::PodSandboxMetadata {
            name: name.into(),
            uid: uid.into(),
            namespace: namespace.into(),
            attempt: 0,
        }),
        hostname: name.into(),
        linux: Some(cri::LinuxPodSandboxConfig {
            security_context: Some(cri::LinuxSandboxSecurityContext {
                namespace_options: Some(cri::NamespaceOption {
                    network: cri::NamespaceMode::Node as i32,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}
