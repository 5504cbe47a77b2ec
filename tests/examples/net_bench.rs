//! `hack/bench net`: TCP between the host and a pod on the CNI network, a
//! zygote pod and a runc pod in the same run (both busybox; traffic stays on
//! this machine: host ↔ pod over hack/containerd's bridge).
//!
//! Per pod: throughput host → pod (64 MiB — `$ZYGOTE_NET_BENCH_MIB` — into
//! `wc -c`, timed until the pod has counted all of it), pod → host (as many
//! from `head -c`, timed until the last byte arrives), and the round trip of 100 one-line exchanges with
//! `cat` on one connection (TCP_NODELAY; p50). For zygote, the CPU time of
//! the VM's network device thread (`zygote-net`: the queues ↔ the tap, in
//! the shim) per MiB moved; the guest's TCP stack and the host kernel's tap,
//! tc and bridge work are not in it. Prints a readable line, then the JSON.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use tonic::transport::Channel;

#[path = "../tests/cri_common/mod.rs"]
mod cri_common;
use cri_common::*;

const MIB: usize = 1 << 20;
const EXCHANGES: usize = 100;
/// MiB moved each way: `$ZYGOTE_NET_BENCH_MIB`, 64 unless set.
fn mib() -> usize {
    std::env::var("ZYGOTE_NET_BENCH_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&m| m > 0)
        .unwrap_or(64)
}

fn servers(bytes: usize) -> String {
    format!(
        "nc -ll -p 5003 -e cat & \
         while true; do nc -l -p 5001 -e wc -c; done & \
         while true; do nc -l -p 5002 -e head -c {bytes} /dev/zero; done & wait"
    )
}

fn connect(ip: &str, port: u16, deadline: Instant) -> TcpStream {
    let addr: SocketAddr = format!("{ip}:{port}").parse().unwrap();
    loop {
        match TcpStream::connect_timeout(&addr, Duration::from_secs(5)) {
            Ok(s) => return s,
            Err(e) if Instant::now() >= deadline => panic!("{addr}: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(300)),
        }
    }
}

fn mbit_s(bytes: usize, d: Duration) -> f64 {
    (bytes as f64 * 8.0 / 1e6 / d.as_secs_f64() * 10.0).round() / 10.0
}

/// Round trips of one-line exchanges on one connection, µs, sorted.
fn round_trips(ip: &str, deadline: Instant) -> Vec<f64> {
    let mut s = connect(ip, 5003, deadline);
    s.set_nodelay(true).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut rtts = Vec::new();
    let mut buf = [0u8; 2];
    for i in 0..EXCHANGES + 10 {
        let t = Instant::now();
        s.write_all(b"p\n").unwrap();
        s.read_exact(&mut buf).unwrap();
        if i >= 10 {
            rtts.push(t.elapsed().as_secs_f64() * 1e6);
        }
    }
    rtts.sort_by(f64::total_cmp);
    rtts
}

/// Host → pod: `BYTES`, until the pod's `wc -c` answers with the count.
fn send(ip: &str, deadline: Instant, bytes: usize) -> Duration {
    let mut s = connect(ip, 5001, deadline);
    let chunk = vec![0x5au8; MIB];
    let t = Instant::now();
    for _ in 0..bytes / MIB {
        s.write_all(&chunk).unwrap();
    }
    s.shutdown(Shutdown::Write).unwrap();
    let mut reply = String::new();
    s.read_to_string(&mut reply).unwrap();
    let took = t.elapsed();
    assert_eq!(
        reply.trim(),
        bytes.to_string(),
        "the pod counted what was sent"
    );
    took
}

/// Pod → host: `bytes`, until the last byte.
fn receive(ip: &str, deadline: Instant, bytes: usize) -> Duration {
    let mut s = connect(ip, 5002, deadline);
    let mut buf = vec![0u8; MIB];
    let mut got = 0;
    let t = Instant::now();
    while got < bytes {
        match s.read(&mut buf).unwrap() {
            0 => break,
            n => got += n,
        }
    }
    let took = t.elapsed();
    assert_eq!(got, bytes, "the pod sent all of it");
    took
}

/// CPU time (ns) of the threads named `zygote-net` of the pod's shim.
fn net_thread_ns(pod: &str) -> u64 {
    let Some(pid) = shim_pid(pod) else { return 0 };
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
        .filter(|t| {
            std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.trim() == "zygote-net")
        })
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

struct Figures {
    tx: f64,
    rx: f64,
    rtt_p50: f64,
    cpu_ms_per_mib: Option<f64>,
}

async fn measure(runtime: &mut RuntimeServiceClient<Channel>, handler: &str) -> Figures {
    let name = format!(
        "zbench-{}",
        if handler.is_empty() { "runc" } else { handler }
    );
    let (config, logs) = pod_config(&name, 0);
    let config = on_pod_network(config, vec![]);
    let pod = run_pod_with(runtime, &config, handler).await;
    let _guard = PodGuard(pod.clone());
    let bytes = mib() * MIB;
    let script = servers(bytes);
    run_container(
        runtime,
        container_request(&pod, &config, "servers", &["sh", "-c", &script]),
    )
    .await;
    let (ip, _) = pod_network(runtime, &pod).await;
    eprintln!("{name}: pod {ip}");
    let deadline = Instant::now() + Duration::from_secs(180);
    let rtts = round_trips(&ip, deadline);
    let cpu_before = net_thread_ns(&pod);
    let tx = send(&ip, deadline, bytes);
    let rx = receive(&ip, Instant::now() + Duration::from_secs(60), bytes);
    let cpu_ns = net_thread_ns(&pod).saturating_sub(cpu_before);
    let figures = Figures {
        tx: mbit_s(bytes, tx),
        rx: mbit_s(bytes, rx),
        rtt_p50: (rtts[rtts.len() / 2] * 10.0).round() / 10.0,
        cpu_ms_per_mib: (handler == "zygote")
            .then(|| (cpu_ns as f64 / 1e6 / (2 * mib()) as f64 * 1000.0).round() / 1000.0),
    };
    eprintln!(
        "{name}: tx {} Mbit/s ({tx:.1?}), rx {} Mbit/s ({rx:.1?}), rtt p50 {} µs",
        figures.tx, figures.rx, figures.rtt_p50
    );
    remove_pod(runtime, &pod).await;
    let _ = std::fs::remove_dir_all(logs);
    figures
}

fn main() {
    cri_test(|channel| async move {
        let mut runtime = RuntimeServiceClient::new(channel);
        remove_stale_pods(&mut runtime, "zbench-").await;
        let zygote = measure(&mut runtime, "zygote").await;
        let runc = measure(&mut runtime, "").await;
        println!(
            "net (host <-> pod, {} MiB each way, {EXCHANGES} exchanges): zygote tx {} rx {} Mbit/s, \
             rtt p50 {} us, net device thread {} ms CPU/MiB; runc tx {} rx {} Mbit/s, rtt p50 {} us",
            mib(),
            zygote.tx,
            zygote.rx,
            zygote.rtt_p50,
            zygote.cpu_ms_per_mib.unwrap_or(0.0),
            runc.tx,
            runc.rx,
            runc.rtt_p50
        );
        let json = serde_json::json!({
            "zygote": {
                "tx_mbit_s": zygote.tx,
                "rx_mbit_s": zygote.rx,
                "rtt_p50_us": zygote.rtt_p50,
                "host_cpu_ms_per_mib": zygote.cpu_ms_per_mib,
            },
            "runc": {"tx_mbit_s": runc.tx, "rx_mbit_s": runc.rx, "rtt_p50_us": runc.rtt_p50},
        });
        println!("{json}");
    });
}
