//! Pods on their CNI network through containerd's CRI (real CNI: Debian's
//! bridge, host-local and portmap plugins, set up by hack/containerd on the
//! bridge zygote0, 198.18.0.0/16 — traffic stays on this machine). A zygote
//! pod's VM takes the pod's interface: its IP answers from the host, from a
//! second zygote pod and from a runc pod, and on localhost from a second
//! container of its pod; its hostPort answers from the host;
//! two pods forked from one template are two hosts (their own MAC and
//! address, no neighbour from the template, a gratuitous ARP as each comes
//! up); removing the pods leaves no tap, namespace or shim. A network the VM
//! cannot take (made so by a test CNI plugin chained after the bridge) fails
//! RunPodSandbox with a clear error and leaves nothing.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use k8s_cri::v1 as cri;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use tonic::transport::Channel;
use zygote_tests::PvmSegv;
use zygote_tests::netns::ArpCapture;

mod cri_common;
use cri_common::*;

/// The busybox web server every test pod A runs (`hello-from-<hostname>`).
const WEB: &str = "mkdir -p /tmp/www && echo hello-from-$(hostname) > /tmp/www/index.html \
                   && exec httpd -f -p 8080 -h /tmp/www";
const HOST_PORT: i32 = 18080;
/// hack/containerd's CNI bridge, and its own address (CNI's gateway): a host
/// address on the pod network.
const BRIDGE: &str = "zygote0";
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
    let arp = ArpCapture::open(BRIDGE).expect("capture ARP on the CNI bridge");
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
    // B's VM announced its address as its link came up (gratuitous ARP,
    // seen on the bridge).
    let announced = arp.announcements();
    eprintln!("gratuitous ARP on {BRIDGE} while pod B started: {announced:?}");
    assert!(
        announced
            .iter()
            .any(|a| a.mac == nic_b.mac && a.ip.to_string() == ip_b),
        "pod B ({} at {ip_b}) announced itself: {announced:?}",
        nic_b.mac
    );
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

/// The CRI's CNI config directory and plugin directory (hack/containerd's).
fn cni_dirs() -> (std::path::PathBuf, std::path::PathBuf) {
    let cni = zygote::paths::home().join("cni");
    (cni.join("net.d"), cni.join("bin"))
}

/// A network config in force while it lives: hack/containerd's bridge
/// network followed by the test plugin `zygote-test-fault`
/// (tests/fixtures/cni) spoiling each pod's namespace as `fault` says.
/// Sorted first in the CRI's config directory, which containerd watches.
struct FaultyNetwork {
    conf: std::path::PathBuf,
}

const FAULTY_CONF: &str = "00-zygote-test-fault.conflist";
const FAULT_PLUGIN: &str = "zygote-test-fault";

impl FaultyNetwork {
    fn new(fault: &str) -> Self {
        let (conf_dir, bin_dir) = cni_dirs();
        let plugin = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("fixtures/cni")
            .join(FAULT_PLUGIN);
        std::fs::copy(&plugin, bin_dir.join(FAULT_PLUGIN)).expect("install the fault plugin");
        let default = std::fs::read_to_string(conf_dir.join("10-zygote.conflist"))
            .expect("hack/containerd's network config");
        let mut conf: serde_json::Value = serde_json::from_str(&default).unwrap();
        conf["name"] = format!("zygote-fault-{fault}").into();
        let bridge = conf["plugins"][0].clone();
        conf["plugins"] = serde_json::json!([bridge, {"type": FAULT_PLUGIN, "fault": fault}]);
        let path = conf_dir.join(FAULTY_CONF);
        std::fs::write(&path, conf.to_string()).unwrap();
        FaultyNetwork { conf: path }
    }

    /// Removes what a run that failed before dropping its guard left.
    fn clear() {
        let (conf_dir, bin_dir) = cni_dirs();
        let _ = std::fs::remove_file(conf_dir.join(FAULTY_CONF));
        let _ = std::fs::remove_file(bin_dir.join(FAULT_PLUGIN));
    }
}

impl Drop for FaultyNetwork {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.conf);
        FaultyNetwork::clear();
    }
}

/// Waits until the CRI's loaded network is `name` (containerd reloads its
/// CNI config when the directory changes).
async fn cri_network_is(runtime: &mut RuntimeServiceClient<Channel>, name: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let info = runtime
            .status(cri::StatusRequest { verbose: true })
            .await
            .expect("Status")
            .into_inner()
            .info;
        let loaded: Vec<String> = info
            .get("cniconfig")
            .and_then(|c| serde_json::from_str::<serde_json::Value>(c).ok())
            .and_then(|c| c["Networks"].as_array().cloned())
            .unwrap_or_default()
            .iter()
            .filter_map(|n| n["Config"]["Name"].as_str().map(String::from))
            .collect();
        if loaded.iter().any(|n| n == name) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the CRI did not load network {name}: {loaded:?}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// Entries of a directory (0 if it does not exist).
fn entries(dir: &str) -> usize {
    std::fs::read_dir(dir).map(|d| d.count()).unwrap_or(0)
}

/// What a failed sandbox could leave on the host: zygote shims, VM run
/// directories, network namespaces, veths.
fn leftovers() -> (usize, usize, usize, usize) {
    let shims = std::process::Command::new("pgrep")
        .args(["-c", "-f", "containerd-shim-zygote-v2"])
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .trim()
                .parse()
                .unwrap_or(0)
        })
        .unwrap_or(0);
    (
        shims,
        entries(&zygote::paths::run_root().to_string_lossy()),
        entries("/var/run/netns"),
        host_links("veth").len(),
    )
}

#[test]
fn networks_a_vm_cannot_take_fail_the_pod_clearly_and_leave_nothing() {
    cri_test(|channel| async move {
        let mut runtime = RuntimeServiceClient::new(channel);
        remove_stale_pods(&mut runtime, "zfault-").await;
        FaultyNetwork::clear();
        cri_network_is(&mut runtime, "zygote-pods").await;
        let before = leftovers();
        let cases = [
            ("remove-netns", "cannot open network namespace"),
            ("remove-eth0", "no interface besides loopback"),
            ("take-tap-name", "cannot create the pod's tap"),
            ("add-ipv6", "zygote guests take IPv4 only"),
        ];
        for (fault, expected) in cases {
            let network = FaultyNetwork::new(fault);
            cri_network_is(&mut runtime, &format!("zygote-fault-{fault}")).await;
            let (config, logs) = pod_config(&format!("zfault-{fault}"), 0);
            let config = on_pod_network(config, vec![]);
            let status = runtime
                .run_pod_sandbox(cri::RunPodSandboxRequest {
                    config: Some(config),
                    runtime_handler: "zygote".into(),
                })
                .await
                .expect_err(fault);
            eprintln!("{fault}: {:?}: {}", status.code(), status.message());
            assert!(status.message().contains(expected), "{fault}: {status:?}");
            assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{fault}");
            drop(network);
            let _ = std::fs::remove_dir_all(logs);
            assert!(
                !pod_listed(&mut runtime, "zfault-").await,
                "{fault}: the failed pod is not listed"
            );
            let deadline = Instant::now() + Duration::from_secs(30);
            while leftovers() != before && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            assert_eq!(
                leftovers(),
                before,
                "{fault}: (shims, VM run dirs, netns, veths) as before"
            );
        }
        cri_network_is(&mut runtime, "zygote-pods").await;
    });
}
