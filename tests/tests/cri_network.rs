//! Pods on their CNI network through containerd's CRI (real CNI: Debian's
//! bridge, host-local and portmap plugins, set up by hack/containerd on the
//! bridge zygote0, 198.18.0.0/16 — traffic stays on this machine). A zygote
//! pod's VM takes the pod's interface: its IP answers from the host, from a
//! second zygote pod and from a runc pod, and on localhost from a second
//! container of its pod; its hostPort answers from the host;
//! two pods forked from one template are two hosts (their own MAC and
//! address, no neighbour from the template); removing the pods leaves no tap,
//! namespace or shim.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use k8s_cri::v1 as cri;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use tonic::transport::Channel;
use zygote_tests::PvmSegv;

mod cri_common;
use cri_common::*;

/// The busybox web server every test pod A runs (`hello-from-<hostname>`).
const WEB: &str = "mkdir -p /tmp/www && echo hello-from-$(hostname) > /tmp/www/index.html \
                   && exec httpd -f -p 8080 -h /tmp/www";
const HOST_PORT: i32 = 18080;
/// The bridge's own address (CNI's gateway): a host address on the pod network.
const BRIDGE_IP: &str = "198.18.0.1";

/// GET / from `addr`, retried until `deadline` (the server may still be starting).
fn http_get(addr: &str, deadline: Instant) -> Result<String, String> {
    let addr: SocketAddr = addr.parse().map_err(|e| format!("{addr}: {e}"))?;
    loop {
        let attempt = (|| -> std::io::Result<String> {
            let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
            s.set_read_timeout(Some(Duration::from_secs(30)))?;
            s.write_all(b"GET /index.html HTTP/1.0\r\n\r\n")?;
            let mut body = String::new();
            s.read_to_string(&mut body)?;
            Ok(body)
        })();
        match attempt {
            Ok(body) if body.contains("200 OK") => return Ok(body),
            Ok(other) if Instant::now() >= deadline => return Err(format!("{addr}: {other:?}")),
            Err(e) if Instant::now() >= deadline => return Err(format!("{addr}: {e}")),
            _ => std::thread::sleep(Duration::from_millis(500)),
        }
    }
}

/// The MAC of `eth0` in the network namespace at `netns` (a CNI namespace
/// under /var/run/netns), as the host sees it.
fn cni_mac(netns: &str) -> String {
    let name = std::path::Path::new(netns)
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    let out = std::process::Command::new("ip")
        .args(["-n", &name, "-o", "link", "show", "eth0"])
        .output()
        .expect("ip");
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace()
        .skip_while(|w| *w != "link/ether")
        .nth(1)
        .unwrap_or_default()
        .to_string()
}

/// Links whose name starts with `prefix` in the host's namespace.
fn host_links(prefix: &str) -> Vec<String> {
    std::fs::read_dir("/sys/class/net")
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(prefix))
        .collect()
}

/// What a zygote pod's VM says of its own NIC: MAC, IPv4 address, neighbours.
struct GuestNic {
    mac: String,
    addr: String,
    neighbours: String,
}

async fn guest_nic(
    runtime: &mut RuntimeServiceClient<Channel>,
    container: &str,
) -> Result<GuestNic, PvmSegv> {
    let (code, out) = exec_sh(
        runtime,
        container,
        "cat /sys/class/net/eth0/address; ip -o -4 addr show eth0; echo ---; ip neigh show dev eth0",
    )
    .await;
    PvmSegv::check(code.into(), || format!("exec in {container}: {out}"))?;
    assert_eq!(code, 0, "{out}");
    let (head, neighbours) = out.split_once("---\n").unwrap_or((&out, ""));
    let mut lines = head.lines();
    let mac = lines.next().unwrap_or_default().trim().to_string();
    let addr = lines
        .next()
        .and_then(|l| l.split_whitespace().skip_while(|w| *w != "inet").nth(1))
        .unwrap_or_default()
        .to_string();
    Ok(GuestNic {
        mac,
        addr,
        neighbours: neighbours.trim().to_string(),
    })
}

#[test]
fn zygote_pods_are_hosts_on_the_cni_network() {
    cri_test(|channel| async move {
        let mut runtime = RuntimeServiceClient::new(channel);
        remove_stale_pods(&mut runtime, "znet-").await;
        until_passed(|attempt| {
            let mut runtime = runtime.clone();
            async move { network_round(&mut runtime, attempt).await }
        })
        .await;
    });
}

async fn network_round(
    runtime: &mut RuntimeServiceClient<Channel>,
    attempt: u32,
) -> Result<(), PvmSegv> {
    let veths_before = host_links("veth").len();
    let port = cri::PortMapping {
        protocol: cri::Protocol::Tcp as i32,
        container_port: 8080,
        host_port: HOST_PORT,
        host_ip: String::new(),
    };
    let (config_a, logs_a) = pod_config("znet-a", attempt);
    let config_a = on_pod_network(config_a, vec![port]);
    let pod_a = run_pod(runtime, &config_a).await;
    let _guard_a = PodGuard(pod_a.clone());
    let web = run_container(
        runtime,
        container_request(&pod_a, &config_a, "web", &["sh", "-c", WEB]),
    )
    .await;
    let (ip_a, netns_a) = pod_network(runtime, &pod_a).await;
    let netns_a = netns_a.expect("the pod's network namespace in its status");
    eprintln!("pod A {pod_a}: {ip_a} in {netns_a}");
    assert!(ip_a.starts_with("198.18."), "{ip_a}");

    // The VM's NIC is the pod's interface: CNI's MAC and address, and it
    // came up with no neighbour from the template (nothing has talked to it yet).
    let nic_a = guest_nic(runtime, &web).await?;
    assert_eq!(nic_a.mac, cni_mac(&netns_a), "the guest takes CNI's MAC");
    assert_eq!(nic_a.addr.split('/').next(), Some(ip_a.as_str()));
    eprintln!(
        "pod A's neighbours before any traffic: {:?}",
        nic_a.neighbours
    );

    // From the host, at the pod IP and at the hostPort.
    let deadline = Instant::now() + Duration::from_secs(120);
    let body = http_get(&format!("{ip_a}:8080"), deadline).expect("the pod IP answers");
    assert!(body.contains("hello-from-znet-a"), "{body}");
    let body =
        http_get(&format!("{BRIDGE_IP}:{HOST_PORT}"), deadline).expect("the hostPort answers");
    assert!(body.contains("hello-from-znet-a"), "{body}");

    // Containers of a pod share its VM's network: a second container
    // reaches the first on localhost.
    let sidecar = run_container(
        runtime,
        container_request(&pod_a, &config_a, "sidecar", &["sleep", "1000"]),
    )
    .await;
    let (code, out) = exec_sh(
        runtime,
        &sidecar,
        "wget -q -O - http://127.0.0.1:8080/index.html",
    )
    .await;
    PvmSegv::check(code.into(), || format!("wget in the sidecar: {out}"))?;
    assert_eq!(
        (code, out.trim()),
        (0, "hello-from-znet-a"),
        "localhost between containers"
    );

    // A second zygote pod of the same image (a fork of the same template):
    // another host, and it reaches A.
    let (config_b, logs_b) = pod_config("znet-b", attempt);
    let config_b = on_pod_network(config_b, vec![]);
    let pod_b = run_pod(runtime, &config_b).await;
    let _guard_b = PodGuard(pod_b.clone());
    let client_b = run_container(
        runtime,
        container_request(&pod_b, &config_b, "client", &["sleep", "1000"]),
    )
    .await;
    let (ip_b, _) = pod_network(runtime, &pod_b).await;
    let nic_b = guest_nic(runtime, &client_b).await?;
    assert!(
        nic_b.neighbours.is_empty(),
        "no neighbour from the template: {:?}",
        nic_b.neighbours
    );
    assert_ne!(nic_b.mac, nic_a.mac, "two forks, two MACs");
    assert_ne!(ip_b, ip_a);
    assert_eq!(nic_b.addr.split('/').next(), Some(ip_b.as_str()));
    let get_a = format!("wget -q -O - http://{ip_a}:8080/index.html");
    let (code, out) = exec_sh(runtime, &client_b, &get_a).await;
    PvmSegv::check(code.into(), || format!("wget in pod B: {out}"))?;
    assert_eq!(
        (code, out.trim()),
        (0, "hello-from-znet-a"),
        "zygote pod B reaches A"
    );

    // A runc pod on the same network reaches it too.
    let (config_c, logs_c) = pod_config("znet-c", attempt);
    let config_c = on_pod_network(config_c, vec![]);
    let pod_c = run_pod_with(runtime, &config_c, "").await;
    let client_c = run_container(
        runtime,
        container_request(&pod_c, &config_c, "client", &["sleep", "1000"]),
    )
    .await;
    let (code, out) = exec_sh(runtime, &client_c, &get_a).await;
    assert_eq!(
        (code, out.trim()),
        (0, "hello-from-znet-a"),
        "runc pod C reaches A"
    );

    // Removed, nothing is left: no shim, no tap (it lived in the pods'
    // namespaces, which the CRI removes), no veth on the host.
    for pod in [&pod_c, &pod_b, &pod_a] {
        remove_pod(runtime, pod).await;
    }
    assert!(
        !std::path::Path::new(&netns_a).exists(),
        "the CRI removed {netns_a}"
    );
    assert_eq!(
        host_links("veth").len(),
        veths_before,
        "{:?}",
        host_links("veth")
    );
    for logs in [logs_a, logs_b, logs_c] {
        let _ = std::fs::remove_dir_all(logs);
    }
    Ok(())
}
