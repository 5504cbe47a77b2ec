//! The little of the Kubernetes API a node installer needs: read its Node,
//! and merge-patch its labels and taints. In a pod it finds the API server
//! and its credentials as every in-cluster client does (the
//! `KUBERNETES_SERVICE_HOST`/`_PORT` environment, the service account's
//! token and CA); `--kube-api URL` (with `--kube-token-file`) points it
//! elsewhere.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, bail};
use serde_json::{Value, json};

const SERVICE_ACCOUNT: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// A taint the installer removes once the node is ready.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Taint {
    pub key: String,
    pub effect: String,
}

impl std::str::FromStr for Taint {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.rsplit_once(':') {
            Some((key, effect))
                if !key.is_empty()
                    && ["NoSchedule", "PreferNoSchedule", "NoExecute"].contains(&effect) =>
            {
                Ok(Taint {
                    key: key.into(),
                    effect: effect.into(),
                })
            }
            _ => Err(format!(
                "{s:?}: a taint is KEY:EFFECT, EFFECT one of NoSchedule, PreferNoSchedule, NoExecute"
            )),
        }
    }
}

/// A client of one API server.
pub struct Kube {
    agent: ureq::Agent,
    base: String,
    token: Option<String>,
}

impl Kube {
    /// The API server at `api` (or the cluster's, from the environment),
    /// with the bearer token in `token_file` (or the service account's).
    pub fn new(api: Option<&str>, token_file: Option<&Path>) -> anyhow::Result<Kube> {
        let sa = Path::new(SERVICE_ACCOUNT);
        let token_file = token_file.map(Path::to_path_buf).or_else(|| {
            let t = sa.join("token");
            t.exists().then_some(t)
        });
        let token = match token_file {
            Some(f) => Some(
                std::fs::read_to_string(&f)
                    .with_context(|| format!("reading the API token {}", f.display()))?
                    .trim()
                    .to_string(),
            ),
            None => None,
        };
        let base = match api {
            Some(url) => url.trim_end_matches('/').to_string(),
            None => {
                let host = std::env::var("KUBERNETES_SERVICE_HOST")
                    .context("not in a cluster (no KUBERNETES_SERVICE_HOST): give --kube-api")?;
                let port = std::env::var("KUBERNETES_SERVICE_PORT").unwrap_or("443".into());
                let host = if host.contains(':') {
                    format!("[{host}]")
                } else {
                    host
                };
                format!("https://{host}:{port}")
            }
        };
        let mut config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(30)));
        let ca = sa.join("ca.crt");
        if base.starts_with("https://") && ca.exists() {
            let pem = std::fs::read(&ca).with_context(|| format!("reading {}", ca.display()))?;
            let certs: Vec<_> = ureq::tls::parse_pem(&pem)
                .filter_map(|item| match item {
                    Ok(ureq::tls::PemItem::Certificate(c)) => Some(c.to_owned()),
                    _ => None,
                })
                .collect();
            config = config.tls_config(
                ureq::tls::TlsConfig::builder()
                    .root_certs(ureq::tls::RootCerts::new_with_certs(&certs))
                    .build(),
            );
        }
        Ok(Kube {
            agent: config.build().into(),
            base,
            token,
        })
    }

    fn url(&self, node: &str) -> String {
        format!("{}/api/v1/nodes/{node}", self.base)
    }

    fn auth<B>(&self, request: ureq::RequestBuilder<B>) -> ureq::RequestBuilder<B> {
        match &self.token {
            Some(t) => request.header("Authorization", format!("Bearer {t}")),
            None => request,
        }
    }

    /// The Node object.
    pub fn node(&self, node: &str) -> anyhow::Result<Value> {
        let mut response = self
            .auth(self.agent.get(&self.url(node)))
            .call()
            .with_context(|| format!("GET node {node}"))?;
        let status = response.status();
        let body = response.body_mut().read_to_string()?;
        if !status.is_success() {
            bail!("GET node {node}: {status}: {body}");
        }
        Ok(serde_json::from_str(&body)?)
    }

    /// Merge-patches the Node; Ok(false) on a conflict (its
    /// `resourceVersion` moved: read it again).
    fn patch(&self, node: &str, patch: &Value) -> anyhow::Result<bool> {
        let mut response = self
            .auth(self.agent.patch(&self.url(node)))
            .header("Content-Type", "application/merge-patch+json")
            .send(patch.to_string())
            .with_context(|| format!("PATCH node {node}"))?;
        let status = response.status();
        if status.as_u16() == 409 {
            return Ok(false);
        }
        let body = response.body_mut().read_to_string()?;
        if !status.is_success() {
            bail!("PATCH node {node}: {status}: {body}");
        }
        Ok(true)
    }

    /// Sets (`Some`) or removes (`None`) the label `key` and removes
    /// `taints`, in one patch made against the node as read (retried when
    /// another writer changed it meanwhile). Whether anything changed.
    pub fn mark(
        &self,
        node: &str,
        key: &str,
        label: Option<&str>,
        taints: &[Taint],
    ) -> anyhow::Result<bool> {
        for _ in 0..10 {
            let current = self.node(node)?;
            let has = current["metadata"]["labels"][key].as_str();
            let all = current["spec"]["taints"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            let kept: Vec<Value> = all
                .iter()
                .filter(|t| {
                    !taints.iter().any(|r| {
                        t["key"].as_str() == Some(r.key.as_str())
                            && t["effect"].as_str() == Some(r.effect.as_str())
                    })
                })
                .cloned()
                .collect();
            if has == label && kept.len() == all.len() {
                return Ok(false);
            }
            let mut patch = json!({
                "metadata": {
                    "resourceVersion": current["metadata"]["resourceVersion"],
                    "labels": { key: label },
                }
            });
            if kept.len() != all.len() {
                patch["spec"] = json!({ "taints": kept });
            }
            if self.patch(node, &patch)? {
                return Ok(true);
            }
        }
        bail!("node {node} kept changing under the installer's patch (10 conflicts)")
    }
}
