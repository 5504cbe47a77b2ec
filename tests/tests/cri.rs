//! A pod through containerd's CRI plugin with a real CRI client (the
//! Kubernetes CRI protos, `k8s-cri`), as kubelet drives it: RunPodSandbox
//! with the RuntimeClass handler `zygote`, a container in it (the pod's VM is
//! forked when the first application container is created), ExecSync,
//! ContainerStats, the container's log, then the pod stopped and removed with
//! nothing left.

use std::time::{Duration, Instant};

use k8s_cri::v1 as cri;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use tonic::transport::Channel;
use zygote_tests::PvmSegv;
use zygote_tests::ctr::{footprint_after, host_footprint};

use zygote_tests::test_image as image;

mod cri_common;
use cri_common::*;

#[test]
fn a_pod_runs_through_the_cri_in_one_vm() {
    cri_test(|channel| async move {
        let mut runtime = RuntimeServiceClient::new(channel.clone());
        let mut images = ImageServiceClient::new(channel);
        let version = runtime
            .version(cri::VersionRequest {
                version: "v1".into(),
            })
            .await
            .expect("CRI version")
            .into_inner();
        eprintln!("CRI: {} {}", version.runtime_name, version.runtime_version);
        let status = images
            .image_status(cri::ImageStatusRequest {
                image: Some(cri::ImageSpec {
                    image: image(),
                    ..Default::default()
                }),
                verbose: false,
            })
            .await
            .unwrap()
            .into_inner();
        assert!(
            status.image.is_some(),
            "{} is in the k8s.io namespace",
            image()
        );

        until_passed(|attempt| {
            let mut runtime = runtime.clone();
            async move { pod_round(&mut runtime, attempt).await }
        })
        .await;
    });
}

/// One pod: sandbox, containers, ExecSync, update, stats, logs, exits,
/// removal. The fork's first container takes the container staged in the
/// template; later ones take the normal path (docs/containers.md): each
/// behaviour is checked on both. Err when a container's or an exec's own
/// exit status was SIGSEGV.
async fn pod_round(
    runtime: &mut RuntimeServiceClient<Channel>,
    attempt: u32,
) -> Result<(), PvmSegv> {
    let (pod_config, logs) = pod_config("zpod", attempt);
    let pod = run_pod(runtime, &pod_config).await;
    let _guard = PodGuard(pod.clone());
    assert!(shim_running(&pod), "one shim for the pod");
    let checked = async {
        let mut ipc = Vec::new();
        for (name, staged) in [("app", true), ("app2", false)] {
            ipc.push(container_round(runtime, &pod, &pod_config, &logs, name, staged).await?);
        }
        // The pod's containers share its IPC namespace (the CRI names the
        // pause container's), the staged one's included.
        assert_eq!(ipc[0], ipc[1], "one IPC namespace for the pod");
        ends_round(runtime, &pod, &pod_config, &logs).await
    }
    .await;
    remove_pod(runtime, &pod).await;
    checked?;
    std::fs::remove_dir_all(&logs).unwrap();
    Ok(())
}

/// Container `name` of the pod, on the staged path or not: its output in
/// the log, ExecSync's exit code and output, an exec whose background
/// child holds its stdout, stats, and an update of its memory limit;
/// returns its IPC namespace (as `readlink /proc/self/ns/ipc` names it).
async fn container_round(
    runtime: &mut RuntimeServiceClient<Channel>,
    pod: &str,
    pod_config: &cri::PodSandboxConfig,
    logs: &std::path::Path,
    name: &str,
    staged: bool,
) -> Result<String, PvmSegv> {
    let container = run_container(
        runtime,
        container_request(
            pod,
            pod_config,
            name,
            &["sh", "-c", "echo hello-from-cri; exec sleep 1000"],
        ),
    )
    .await;

    let exec = runtime
        .exec_sync(cri::ExecSyncRequest {
            container_id: container.clone(),
            cmd: vec![
                "sh".into(),
                "-c".into(),
                "echo in-exec; uname -r; grep ' / overlay ' /proc/mounts; \
                 readlink /proc/self/ns/ipc; exit 5"
                    .into(),
            ],
            timeout: 120,
        })
        .await
        .map(tonic::Response::into_inner);
    let exec = match exec {
        Ok(e) => e,
        Err(status) => {
            // Only if the container's own process crashed first.
            let exited = container_exit_code(runtime, &container).await;
            PvmSegv::check(exited.unwrap_or(0).into(), || {
                format!("container {container} before ExecSync: {status:?}")
            })?;
            panic!("ExecSync: {status:?} (the container's exit code: {exited:?})");
        }
    };
    PvmSegv::check(exec.exit_code.into(), || format!("ExecSync: {exec:?}"))?;
    assert_eq!(exec.exit_code, 5, "{exec:?}");
    let out = String::from_utf8_lossy(&exec.stdout).into_owned();
    let lines: Vec<&str> = out.lines().collect();
    let host = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    assert_eq!(lines.len(), 4, "{out:?}");
    assert_eq!(lines[0], "in-exec");
    assert_ne!(lines[1], host.trim(), "the guest's kernel, not the host's");
    assert_eq!(
        lines[2].contains("/@staged/"),
        staged,
        "{name}: its root is {}the staged container's: {}",
        if staged { "" } else { "not " },
        lines[2]
    );
    let ipc = lines[3].to_string();

    // An exec that leaves a background child holding its stdout ends when
    // the exec's own process does (Kata #869's pattern), with its output:
    // waiting for the child would run into ExecSync's timeout (120 s, below
    // the child's 600 s), which fails the call.
    let started = Instant::now();
    let out = exec_ok(runtime, &container, "sleep 600 & echo hi").await?;
    assert_eq!(out.trim(), "hi");
    eprintln!(
        "{name}: ExecSync with a background child: {:?}",
        started.elapsed()
    );

    let usage = memory_stats(runtime, &container)
        .await
        .usage_bytes
        .map_or(0, |v| v.value);
    assert!(
        usage > 0,
        "the container's memory as its cgroup in the VM reads it"
    );

    // UpdateContainerResources (kubelet's in-place resize): containerd sends
    // the new limits through the shim's update; the container's cgroup in the
    // VM takes them, and the stats read them back (available = limit − working set).
    const LIMIT: u64 = 64 << 20;
    runtime
        .update_container_resources(cri::UpdateContainerResourcesRequest {
            container_id: container.clone(),
            linux: Some(cri::LinuxContainerResources {
                memory_limit_in_bytes: LIMIT as i64,
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .expect("UpdateContainerResources");
    let memory = memory_stats(runtime, &container).await;
    let available = memory.available_bytes.map_or(0, |v| v.value);
    let working_set = memory.working_set_bytes.map_or(0, |v| v.value);
    assert!(
        available > 0 && available + working_set == LIMIT,
        "limit {LIMIT} after the update: {memory:?}"
    );

    // The log, in the CRI's format ("TIME stdout F LINE").
    let text = log_with(logs, name, "hello-from-cri").await;
    assert!(text.contains(" stdout F hello-from-cri"), "{text:?}");
    Ok(ipc)
}

/// How containers on the normal path end: one on a terminal exiting 3, one
/// killed by the guest's OOM killer at its memory limit (`OOMKilled`, 137,
/// as under runc).
async fn ends_round(
    runtime: &mut RuntimeServiceClient<Channel>,
    pod: &str,
    pod_config: &cri::PodSandboxConfig,
    logs: &std::path::Path,
) -> Result<(), PvmSegv> {
    let mut request = container_request(
        pod,
        pod_config,
        "tty",
        &["sh", "-c", "[ -t 0 ] && [ -t 1 ] && echo on-a-tty; exit 3"],
    );
    let config = request.config.as_mut().unwrap();
    config.tty = true;
    config.stdin = true;
    let tty = run_container(runtime, request).await;
    let status = exited(runtime, &tty, |_| true).await;
    PvmSegv::check(status.exit_code.into(), || format!("tty: {status:?}"))?;
    assert_eq!(status.exit_code, 3, "{status:?}");
    let text = log_with(logs, "tty", "on-a-tty").await;
    assert!(text.contains("on-a-tty"), "{text:?}");

    let mut request = container_request(
        pod,
        pod_config,
        "oom",
        &["dd", "if=/dev/zero", "of=/dev/null", "bs=32M", "count=1"],
    );
    if let Some(linux) = request.config.as_mut().unwrap().linux.as_mut() {
        linux.resources = Some(cri::LinuxContainerResources {
            memory_limit_in_bytes: 16 << 20,
            ..Default::default()
        });
    }
    let oom = run_container(runtime, request).await;
    let status = exited(runtime, &oom, |s| s.reason == "OOMKilled").await;
    assert_eq!(status.exit_code, 137, "{status:?}");
    Ok(())
}

/// The text of container `name`'s log once it holds `line` (30 s at most).
async fn log_with(logs: &std::path::Path, name: &str, line: &str) -> String {
    let log = logs.join(format!("{name}.log"));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let t = std::fs::read_to_string(&log).unwrap_or_default();
        if t.contains(line) || Instant::now() > deadline {
            return t;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The container's memory figures from ContainerStats.
async fn memory_stats(
    runtime: &mut RuntimeServiceClient<Channel>,
    container: &str,
) -> cri::MemoryUsage {
    runtime
        .container_stats(cri::ContainerStatsRequest {
            container_id: container.into(),
        })
        .await
        .expect("ContainerStats")
        .into_inner()
        .stats
        .and_then(|s| s.memory)
        .expect("memory stats")
}

#[test]
fn two_first_containers_started_at_once_share_one_vm() {
    cri_test(|channel| async move {
        let runtime = RuntimeServiceClient::new(channel);
        until_passed(|attempt| {
            let mut runtime = runtime.clone();
            async move { twin_round(&mut runtime, attempt).await }
        })
        .await;
    });
}

/// A pod whose two first containers start at the same moment (the CRI
/// makes their tasks then, so both ask the shim to create the pod VM): one VM
/// (one run directory of its shim), both containers in it (one boot id).
async fn twin_round(
    runtime: &mut RuntimeServiceClient<Channel>,
    attempt: u32,
) -> Result<(), PvmSegv> {
    let (pod_config, logs) = pod_config("twins", attempt);
    let pod = run_pod(runtime, &pod_config).await;
    let _guard = PodGuard(pod.clone());
    let create = |name: &str| container_request(&pod, &pod_config, name, &["sleep", "1000"]);
    let mut ids = Vec::new();
    for name in ["a", "b"] {
        let created = runtime
            .create_container(create(name))
            .await
            .expect("CreateContainer");
        ids.push(created.into_inner().container_id);
    }
    // The CRI creates the task (the shim's Create, which makes the VM) at
    // StartContainer: both at once.
    let start = |id: &str| cri::StartContainerRequest {
        container_id: id.into(),
    };
    let (mut a_client, mut b_client) = (runtime.clone(), runtime.clone());
    let (a, b) = tokio::join!(
        a_client.start_container(start(&ids[0])),
        b_client.start_container(start(&ids[1]))
    );
    a.expect("StartContainer a");
    b.expect("StartContainer b");
    let shim = shim_pid(&pod).expect("the pod's shim");
    assert_eq!(
        run_dirs_of(shim),
        1,
        "one VM for the pod (shim {shim}; run dirs {:?})",
        std::fs::read_dir(zygote::paths::run_root())
            .map(|rd| rd.flatten().map(|e| e.file_name()).collect::<Vec<_>>())
    );
    let mut boot_ids = Vec::new();
    for id in &ids {
        let exec = runtime
            .exec_sync(cri::ExecSyncRequest {
                container_id: id.clone(),
                cmd: vec!["cat".into(), "/proc/sys/kernel/random/boot_id".into()],
                timeout: 120,
            })
            .await
            .expect("ExecSync")
            .into_inner();
        if let Err(segv) = PvmSegv::check(exec.exit_code.into(), || format!("ExecSync in {id}")) {
            remove_pod(runtime, &pod).await;
            return Err(segv);
        }
        assert_eq!(exec.exit_code, 0, "{exec:?}");
        boot_ids.push(String::from_utf8_lossy(&exec.stdout).into_owned());
    }
    assert_eq!(
        boot_ids[0], boot_ids[1],
        "both containers run in the one VM"
    );
    remove_pod(runtime, &pod).await;
    assert_eq!(run_dirs_of(shim), 0, "nothing of the VM is left");
    std::fs::remove_dir_all(&logs).unwrap();
    Ok(())
}

#[test]
fn pod_cycles_leave_nothing_behind() {
    cri_test(|channel| async move {
        let runtime = RuntimeServiceClient::new(channel);
        // A few in the suite; `hack/cycles` runs 20 (ZYGOTE_POD_CYCLES).
        let cycles: u32 = std::env::var("ZYGOTE_POD_CYCLES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(3);
        let cycle = |n: u32| {
            let runtime = runtime.clone();
            until_passed(move |attempt| {
                let mut runtime = runtime.clone();
                async move { pod_cycle(&mut runtime, n, attempt).await }
            })
        };
        // The first cycle warms containerd's CRI up (its caches, the pause image).
        cycle(0).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let before = host_footprint();
        for n in 1..=cycles {
            cycle(n).await;
        }
        let after = footprint_after(&before);
        eprintln!("{cycles} CRI pod cycles: before {before:?}, after {after:?}");
        assert_eq!(after, before, "{cycles} pod cycles left something behind");
    });
}

/// One pod as kubelet runs a short job: sandbox on the CNI network (its VM
/// wired to the pod's interface), a container running `true`, its exit
/// seen, the pod stopped and removed. Err when the container's own exit
/// status was SIGSEGV.
async fn pod_cycle(
    runtime: &mut RuntimeServiceClient<Channel>,
    n: u32,
    attempt: u32,
) -> Result<(), PvmSegv> {
    let (config, logs) = pod_config(&format!("cycle{n}"), attempt);
    let config = on_pod_network(config, vec![]);
    let pod = run_pod(runtime, &config).await;
    let _guard = PodGuard(pod.clone());
    let container =
        run_container(runtime, container_request(&pod, &config, "job", &["true"])).await;
    let deadline = Instant::now() + Duration::from_secs(120);
    let code = loop {
        if let Some(code) = container_exit_code(runtime, &container).await {
            break code;
        }
        assert!(
            Instant::now() < deadline,
            "pod cycle {n}: the container did not exit"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    remove_pod(runtime, &pod).await;
    std::fs::remove_dir_all(&logs).unwrap();
    PvmSegv::check(code.into(), || format!("pod cycle {n}: the container"))?;
    assert_eq!(code, 0, "pod cycle {n}");
    Ok(())
}

/// The template a shim's VM was forked from: the template directory whose
/// memory file the shim maps.
fn mapped_template(shim: u32) -> Option<String> {
    let maps = std::fs::read_to_string(format!("/proc/{shim}/maps")).ok()?;
    maps.lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .find(|path| path.ends_with("/memory"))
        .and_then(|path| std::path::Path::new(path).parent()?.file_name())
        .map(|name| name.to_string_lossy().into_owned())
}

/// One image, one template, whichever containerd namespace runs it: a `ctr`
/// container (namespace `default`) and a CRI pod (`k8s.io`) of the same image
/// — two unpacks, two snapshot chains — fork from one template, named by the
/// image's chain ID.
#[test]
fn one_image_has_one_template_in_every_namespace() {
    use zygote_tests::ctr::{Removed, cid, cleanup, ctr, shim_pids, text, wait_task, zygote_run};
    cri_test(|channel| async move {
        let mut runtime = RuntimeServiceClient::new(channel);
        remove_stale_pods(&mut runtime, "zone-").await;
        let id = cid("one-template");
        cleanup(&id);
        let _removed = Removed(id.clone());
        let run = zygote_run(&["-d"], &id, &["sleep", "1000"]);
        assert!(run.status.success(), "ctr run: {}", text(&run.stderr));
        wait_task(&id, "RUNNING");
        let info: serde_json::Value =
            serde_json::from_slice(&ctr(&["snapshots", "info", &id]).stdout)
                .expect("ctr snapshots info");
        let chain = info["Parent"]
            .as_str()
            .expect("the snapshot's parent")
            .to_string();
        let shim = shim_pids(&id)[0];
        let from_ctr = mapped_template(shim).expect("the ctr container's VM maps a template");

        let (config, logs) = pod_config("zone-pod", 0);
        let pod = run_pod(&mut runtime, &config).await;
        let _guard = PodGuard(pod.clone());
        run_container(
            &mut runtime,
            container_request(&pod, &config, "app", &["sleep", "1000"]),
        )
        .await;
        let from_cri = shim_pid(&pod)
            .and_then(mapped_template)
            .expect("the pod's VM maps a template");
        eprintln!("image chain {chain}: ctr's VM from {from_ctr}, the CRI pod's from {from_cri}");
        assert_eq!(from_ctr, from_cri, "one template for the image");
        let hex = chain.trim_start_matches("sha256:");
        assert!(
            from_ctr.contains(&hex[hex.len() - 16..]),
            "{from_ctr} is named by the chain ID {chain}"
        );
        remove_pod(&mut runtime, &pod).await;
        cleanup(&id);
        let _ = std::fs::remove_dir_all(logs);
    });
}

/// A pod with `shareProcessNamespace` (the CRI's pod PID mode): its
/// containers see each other's processes, and PID 1 is the pod's (the
/// agent's namespace holder, as the pause container is under runc).
#[test]
fn a_pod_sharing_its_process_namespace_shows_each_container_the_others() {
    cri_test(|channel| async move {
        let runtime = RuntimeServiceClient::new(channel);
        until_passed(|attempt| {
            let mut runtime = runtime.clone();
            async move { shared_pid_round(&mut runtime, attempt).await }
        })
        .await;
    });
}

async fn shared_pid_round(
    runtime: &mut RuntimeServiceClient<Channel>,
    attempt: u32,
) -> Result<(), PvmSegv> {
    let (mut config, logs) = pod_config("pidpod", attempt);
    if let Some(ns) = config
        .linux
        .as_mut()
        .and_then(|l| l.security_context.as_mut())
        .and_then(|s| s.namespace_options.as_mut())
    {
        ns.pid = cri::NamespaceMode::Pod as i32;
    }
    let pod = run_pod(runtime, &config).await;
    let _guard = PodGuard(pod.clone());
    let first = container_request(&pod, &config, "first", &["sleep", "1234"]);
    let first = run_container(runtime, first).await;
    let second = container_request(&pod, &config, "second", &["sleep", "1000"]);
    let second = run_container(runtime, second).await;
    let seen = exec_ok(
        runtime,
        &second,
        "ps -o args | grep -c '[s]leep 1234'; tr '\\0' ' ' < /proc/1/cmdline; echo; echo $$",
    )
    .await?;
    let lines: Vec<&str> = seen.lines().collect();
    assert_eq!(lines.len(), 3, "{seen}");
    assert_eq!(lines[0], "1", "the first container's process: {seen}");
    assert!(lines[1].contains("pod-namespaces"), "PID 1: {seen}");
    assert_ne!(lines[2], "1", "{seen}");
    // Its own PID namespace is the pod's too.
    let own = exec_ok(runtime, &first, "ps -o args | grep -c '[s]leep 1000'").await?;
    assert_eq!(own.trim(), "1", "{own}");
    std::fs::remove_dir_all(&logs).unwrap();
    Ok(())
}
