//! `zygote node run`, as the Helm chart's DaemonSet runs it, on a scratch
//! node root against hack/containerd's containerd and a stand-in for the
//! Kubernetes API server.

mod node_common;
use node_common::*;

/// A stand-in for the Kubernetes API server (no cluster exists here): one
/// Node, GET and merge-PATCH (labels merged, a `null` removes one; taints
/// replaced; a stale `resourceVersion` is a 409), every request logged.
struct FakeApi {
    url: String,
    node: std::sync::Arc<std::sync::Mutex<serde_json::Value>>,
    log: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl FakeApi {
    fn start(node: serde_json::Value) -> FakeApi {
        use std::io::{BufRead, BufReader, Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let node = std::sync::Arc::new(std::sync::Mutex::new(node));
        let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (n, l) = (node.clone(), log.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut line = String::new();
                if reader.read_line(&mut line).is_err() {
                    continue;
                }
                let mut length = 0;
                let mut auth = String::new();
                loop {
                    let mut h = String::new();
                    reader.read_line(&mut h).unwrap();
                    let h = h.trim_end();
                    if h.is_empty() {
                        break;
                    }
                    let lower = h.to_ascii_lowercase();
                    if let Some(v) = lower.strip_prefix("content-length:") {
                        length = v.trim().parse().unwrap();
                    }
                    if lower.starts_with("authorization:") {
                        auth = h["authorization:".len()..].trim().to_string();
                    }
                }
                let mut body = vec![0; length];
                reader.read_exact(&mut body).unwrap();
                let body = String::from_utf8_lossy(&body).into_owned();
                l.lock()
                    .unwrap()
                    .push(format!("{} {auth} {body}", line.trim()));
                let mut node = n.lock().unwrap();
                let (status, reply) = if auth != "Bearer test-token" {
                    (401, "{}".to_string())
                } else if line.starts_with("GET /api/v1/nodes/node-a ") {
                    (200, node.to_string())
                } else if line.starts_with("PATCH /api/v1/nodes/node-a ") {
                    let patch: serde_json::Value = serde_json::from_str(&body).unwrap();
                    let version = node["metadata"]["resourceVersion"].clone();
                    if patch["metadata"]["resourceVersion"] != version {
                        (409, "{}".to_string())
                    } else {
                        let labels = node["metadata"]["labels"].as_object_mut().unwrap();
                        for (k, v) in patch["metadata"]["labels"].as_object().unwrap() {
                            if v.is_null() {
                                labels.remove(k);
                            } else {
                                labels.insert(k.clone(), v.clone());
                            }
                        }
                        if let Some(t) = patch.get("spec").and_then(|s| s.get("taints")) {
                            node["spec"]["taints"] = t.clone();
                        }
                        let next = version.as_str().unwrap().parse::<u64>().unwrap() + 1;
                        node["metadata"]["resourceVersion"] = next.to_string().into();
                        (200, node.to_string())
                    }
                } else {
                    (404, "{}".to_string())
                };
                let mut stream = stream;
                let _ = write!(
                    stream,
                    "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{reply}",
                    reply.len()
                );
            }
        });
        FakeApi { url, node, log }
    }

    fn node(&self) -> serde_json::Value {
        self.node.lock().unwrap().clone()
    }
}

/// `node run` as the chart's DaemonSet runs it, on a scratch root, against
/// the real containerd that hack/containerd runs (its CRI serves `zygote`
/// and has the test image): install (already registered there: no
/// restart), the handler checked live, the image's template warmed through
/// the CRI (a pod whose container is created, never started), the node
/// labelled `zygote.dev/ready=true` and its startup taint removed (an
/// operator's other taint kept), the readiness probe's answer; then SIGTERM:
/// the label removed and zygote uninstalled, the config as it was.
#[test]
fn run_installs_warms_marks_the_node_ready_and_undoes_it_on_sigterm() {
    let Some(socket) = dev_containerd() else {
        return;
    };
    let image = std::env::var("ZYGOTE_TEST_IMAGE").expect("ZYGOTE_TEST_IMAGE with the socket");
    let node = Node::new("run");
    std::fs::create_dir_all(node.root.join("run")).unwrap();
    std::os::unix::fs::symlink(&socket, node.root.join("run/cri.sock")).unwrap();
    let original = node.config();
    ok(&node.run("install", "none"));
    let token = node.root.join("token");
    std::fs::write(&token, "test-token\n").unwrap();
    let api = FakeApi::start(serde_json::json!({
        "metadata": {"name": "node-a", "resourceVersion": "7", "labels": {"kubernetes.io/os": "linux"}},
        "spec": {"taints": [
            {"key": "zygote.dev/warming", "effect": "NoSchedule"},
            {"key": "dedicated", "value": "gpu", "effect": "NoSchedule"}
        ]}
    }));

    let mut run = zygote()
        .args(["node", "run", "--host-root"])
        .arg(&node.root)
        .args(["--restart", "none", "--containerd-socket", "/run/cri.sock"])
        .arg("--shim")
        .arg(node.artefacts.join("containerd-shim-zygote-v2"))
        .arg("--kernel")
        .arg(node.artefacts.join("vmlinux"))
        .arg("--initramfs")
        .arg(node.artefacts.join("initramfs.cpio"))
        .args(["--node-name", "node-a", "--kube-api", &api.url])
        .arg("--kube-token-file")
        .arg(&token)
        .args(["--startup-taint", "zygote.dev/warming:NoSchedule"])
        .args(["--warm-image", &image])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(600);
    while api.node()["metadata"]["labels"]["zygote.dev/ready"] != "true" {
        assert!(
            run.try_wait().unwrap().is_none(),
            "node run ended before the node was ready: {:?}",
            run.wait_with_output()
        );
        assert!(std::time::Instant::now() < deadline, "not ready in 10 min");
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
    let taints = api.node()["spec"]["taints"].clone();
    assert_eq!(
        taints,
        serde_json::json!([{"key": "dedicated", "value": "gpu", "effect": "NoSchedule"}]),
        "the startup taint removed, the operator's kept"
    );
    assert_eq!(
        api.node()["metadata"]["labels"]["kubernetes.io/os"],
        "linux"
    );

    // SIGTERM (the pod deleted): the label goes first, then zygote.
    // SAFETY: a signal to the child this test started and still holds.
    unsafe { libc::kill(run.id() as i32, libc::SIGTERM) };
    let out = run.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains(&format!("warm: {image}")), "{err}");
    assert!(
        api.node()["metadata"]["labels"]
            .get("zygote.dev/ready")
            .is_none(),
        "{:?}",
        api.node()
    );
    assert_eq!(node.config(), original, "the config as it was");
    assert!(!exists(
        &node.root,
        "usr/local/bin/containerd-shim-zygote-v2"
    ));
    let log = api.log.lock().unwrap().clone();
    eprintln!("API requests:\n{}", log.join("\n"));
    assert!(log.iter().all(|l| l.contains("Bearer test-token")));
}
