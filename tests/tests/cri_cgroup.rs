//! A pod's VM is charged to the pod's cgroup, as kubelet expects of any
//! runtime: the pod is run with a cgroup parent (kubelet's
//! `kubepods/.../pod<uid>`; here a directory under the test's own cgroup),
//! and its shim, the one host process that holds the VM, must be in the
//! sandbox's cgroup with the VM's memory charged there; PodSandboxStats
//! reads that cgroup; after the pod's removal the cgroup is gone.

use std::path::PathBuf;

use k8s_cri::v1 as cri;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use zygote::procmem::MemUsage;
use zygote_tests::PvmSegv;

mod cri_common;
use cri_common::*;

/// `pid`'s cgroup in the v1 `memory` hierarchy or the v2 one; the
/// hierarchy's mount point.
fn memory_cgroup(pid: u32) -> (PathBuf, String) {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    for line in text.lines() {
        let mut f = line.splitn(3, ':');
        let (_, controllers, path) = (f.next(), f.next().unwrap(), f.next().unwrap());
        if controllers.split(',').any(|c| c == "memory") {
            return ("/sys/fs/cgroup/memory".into(), path.into());
        }
    }
    let v2 = text.lines().find_map(|l| l.strip_prefix("0::")).unwrap();
    ("/sys/fs/cgroup".into(), v2.into())
}

/// The directories `path` and its ancestors are in each cgroup hierarchy
/// (sorted: a parent before its children).
fn existing_dirs(path: &str) -> std::collections::BTreeSet<PathBuf> {
    let mut out = std::collections::BTreeSet::new();
    let root = PathBuf::from("/sys/fs/cgroup");
    let hierarchies: Vec<PathBuf> = if root.join("cgroup.controllers").exists() {
        vec![root]
    } else {
        std::fs::read_dir(&root)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .collect()
    };
    for hierarchy in hierarchies {
        let mut dir = hierarchy;
        for part in path.trim_start_matches('/').split('/') {
            dir.push(part);
            if dir.is_dir() {
                out.insert(dir.clone());
            }
        }
    }
    out
}

/// A memory cgroup's usage, bytes.
fn usage(dir: &std::path::Path) -> u64 {
    let read = |f: &str| std::fs::read_to_string(dir.join(f)).ok();
    read("memory.usage_in_bytes")
        .or_else(|| read("memory.current"))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// The page cache charged to a memory cgroup, bytes (clean file pages the
/// host can drop to stay within a limit, e.g. the template's memory file
/// read in by the first VM forked after the template was built).
fn file_cache(dir: &std::path::Path) -> u64 {
    let stat = std::fs::read_to_string(dir.join("memory.stat")).unwrap();
    stat.lines()
        .find_map(|l| {
            let (key, value) = l.split_once(' ')?;
            matches!(key, "file" | "total_cache").then(|| value.trim().parse().ok())?
        })
        .unwrap_or(0)
}

/// The anonymous memory resident in `pid` (its guest's touched pages among it).
fn rss_anon(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("RssAnon:"))
        .unwrap()
        .trim()
        .trim_end_matches(" kB")
        .trim()
        .parse()
        .unwrap();
    kb * 1024
}

/// A pod (with one sleeping container that answered an exec) run under a
/// cgroup parent below this test's own cgroup, so that nothing escapes it.
struct PodInCgroup {
    pod: String,
    app: String,
    logs: PathBuf,
    /// The memory hierarchy's mount point.
    root: PathBuf,
    /// The cgroup parent, below the root.
    parent: String,
    /// The parent's directories that existed before (the rest are ours).
    made_before: std::collections::BTreeSet<PathBuf>,
    /// Removes the pod however the test ends.
    _guard: PodGuard,
}

impl PodInCgroup {
    async fn start(
        runtime: &mut RuntimeServiceClient<tonic::transport::Channel>,
        name: &str,
        attempt: u32,
    ) -> Result<PodInCgroup, PvmSegv> {
        let (mut config, logs) = pod_config(name, attempt);
        let (root, own) = memory_cgroup(std::process::id());
        let parent = format!(
            "{}/zygote-test-{name}-{}",
            own.trim_end_matches('/'),
            std::process::id()
        );
        config.linux.as_mut().unwrap().cgroup_parent = parent.clone();
        let made_before = existing_dirs(&parent);
        let pod = run_pod(runtime, &config).await;
        let guard = PodGuard(pod.clone());
        let app = run_container(
            runtime,
            container_request(&pod, &config, "app", &["sleep", "3600"]),
        )
        .await;
        let setup = PodInCgroup {
            pod,
            app,
            logs,
            root,
            parent,
            made_before,
            _guard: guard,
        };
        let (code, out) = exec_sh(runtime, &setup.app, "echo up").await;
        PvmSegv::check(code.into(), || "ExecSync".into())?;
        assert_eq!((code, out.trim()), (0, "up"));
        Ok(setup)
    }

    /// The cgroup parent's directory in the memory hierarchy.
    fn parent_dir(&self) -> PathBuf {
        self.root.join(self.parent.trim_start_matches('/'))
    }

    /// After the pod's removal: its directory is gone; the parents the shim
    /// made in other hierarchies are removed, and the logs.
    fn finish(self) {
        let dir = self.parent_dir().join(&self.pod);
        assert!(!dir.exists(), "{} removed with the pod", dir.display());
        let made: Vec<PathBuf> = existing_dirs(&self.parent)
            .difference(&self.made_before)
            .cloned()
            .collect();
        for dir in made.iter().rev() {
            let _ = std::fs::remove_dir(dir);
        }
        let _ = std::fs::remove_dir_all(&self.logs);
    }
}

#[test]
fn the_pods_vm_is_charged_to_its_cgroup() {
    cri_test(|channel| async move {
        let runtime = RuntimeServiceClient::new(channel);
        until_passed(|attempt| {
            let mut runtime = runtime.clone();
            async move {
                let setup = PodInCgroup::start(&mut runtime, "cgpod", attempt).await?;
                let pod = setup.pod.clone();
                let shim = shim_pid(&pod).expect("the pod's shim");
                let (_, shim_cgroup) = memory_cgroup(shim);
                let expected = format!("{}/{pod}", setup.parent);
                assert_eq!(shim_cgroup, expected, "the shim is in the sandbox's cgroup");
                let dir = setup.parent_dir().join(&pod);
                let (charged, anon) = (usage(&dir), rss_anon(shim));
                eprintln!(
                    "pod cgroup {}: {:.1} MiB charged; the shim's anonymous RSS {:.1} MiB",
                    dir.display(),
                    charged as f64 / 1048576.0,
                    anon as f64 / 1048576.0
                );
                assert!(anon > 0 && charged >= anon, "{charged} < {anon}");

                let stats = runtime
                    .pod_sandbox_stats(cri::PodSandboxStatsRequest {
                        pod_sandbox_id: pod.clone(),
                    })
                    .await
                    .expect("PodSandboxStats")
                    .into_inner()
                    .stats
                    .and_then(|s| s.linux)
                    .expect("Linux stats");
                let working_set = stats
                    .memory
                    .and_then(|m| m.working_set_bytes)
                    .map_or(0, |v| v.value);
                let cpu = stats
                    .cpu
                    .and_then(|c| c.usage_core_nano_seconds)
                    .map_or(0, |v| v.value);
                eprintln!(
                    "PodSandboxStats: working set {:.1} MiB, CPU {:.1} ms",
                    working_set as f64 / 1048576.0,
                    cpu as f64 / 1e6
                );
                assert!(working_set > 0 && cpu > 0, "{stats:?}");

                remove_pod(&mut runtime, &pod).await;
                setup.finish();
                Ok(())
            }
        })
        .await;
    });
}

/// Two pods of one image, one asking for 2 CPUs and 512 MiB (kubelet's
/// sandbox resources: the sum of its containers' limits), one for 1 CPU
/// and 128 MiB:
/// the same template (booted with `max_vcpus`, one online, and
/// `max_memory_mib` of RAM of which it uses `memory_mib`) gives each VM what
/// its pod asks for: its CPUs online, its RAM (`MemTotal`: the blocks that
/// cover 512 MiB added; the template's own for the other), its
/// containers' memory capped together at the pod's size; the small pod's
/// VM costs the host little (it shares the template's pages). A pod asking for
/// more memory than the node's VMs have is refused at `RunPodSandbox`, with
/// nothing left.
#[test]
fn each_pod_gets_the_cpus_and_memory_it_asks_for_from_one_template() {
    cri_test(|channel| async move {
        let runtime = RuntimeServiceClient::new(channel);
        until_passed(|attempt| {
            let mut runtime = runtime.clone();
            async move {
                let mut seen = Vec::new();
                let mut pss_mib = Vec::new();
                for (name, quota, memory) in
                    [("cpu2", 200_000, 512 << 20), ("cpu1", 100_000, 128 << 20)]
                {
                    let (mut config, logs) = pod_config(name, attempt);
                    config.linux.as_mut().unwrap().resources = Some(cri::LinuxContainerResources {
                        cpu_quota: quota,
                        cpu_period: 100_000,
                        memory_limit_in_bytes: memory,
                        ..Default::default()
                    });
                    let pod = run_pod(&mut runtime, &config).await;
                    let _guard = PodGuard(pod.clone());
                    let app = run_container(
                        &mut runtime,
                        container_request(&pod, &config, "app", &["sleep", "3600"]),
                    )
                    .await;
                    let (code, out) = exec_sh(
                        &mut runtime,
                        &app,
                        "nproc; cat /sys/devices/system/cpu/online; \
                         cat /sys/fs/cgroup/containers/memory.max; \
                         grep MemTotal /proc/meminfo",
                    )
                    .await;
                    PvmSegv::check(code.into(), || "ExecSync".into())?;
                    assert_eq!(code, 0, "{out}");
                    seen.push(out.split_whitespace().map(String::from).collect::<Vec<_>>());
                    let shim = MemUsage::of(shim_pid(&pod)).expect("the pod's shim");
                    pss_mib.push(shim.pss_kib / 1024);
                    remove_pod(&mut runtime, &pod).await;
                    std::fs::remove_dir_all(&logs).unwrap();
                }
                let (asked, small_asked) = ((512u64 << 20).to_string(), (128u64 << 20).to_string());
                let first: Vec<&str> = seen[0].iter().take(3).map(String::as_str).collect();
                let second: Vec<&str> = seen[1].iter().take(3).map(String::as_str).collect();
                assert_eq!(
                    [first, second],
                    [
                        ["2", "0-1", asked.as_str()],
                        ["1", "0", small_asked.as_str()]
                    ],
                    "nproc, online CPUs, the pod's memory cap: {seen:?}"
                );
                let mem_total_mib = |s: &[String]| {
                    s.get(4).and_then(|kb| kb.parse::<u64>().ok()).unwrap_or(0) / 1024
                };
                let (big, small) = (mem_total_mib(&seen[0]), mem_total_mib(&seen[1]));
                eprintln!(
                    "MemTotal: {big} MiB (asked 512), {small} MiB (asked 128); \
                     shim PSS: {} and {} MiB",
                    pss_mib[0], pss_mib[1]
                );
                // The kernel keeps some of each for itself.
                assert!(
                    (448..=512).contains(&big) && (64..=128).contains(&small),
                    "MemTotal {big} and {small} MiB: {seen:?}"
                );
                // A fork maps the template's memory copy-on-write: the small
                // pod's VM holds far less than its 128 MiB of RAM.
                assert!(pss_mib[1] < 64, "small pod's shim PSS {} MiB", pss_mib[1]);
                Ok(())
            }
        })
        .await;

        // Bigger than the node's VMs (max_memory_mib = 640 here).
        let mut runtime = runtime.clone();
        let (mut config, logs) = pod_config("toobig", 0);
        config.linux.as_mut().unwrap().resources = Some(cri::LinuxContainerResources {
            memory_limit_in_bytes: 700 << 20,
            ..Default::default()
        });
        let before = host_links("veth");
        let err = runtime
            .run_pod_sandbox(cri::RunPodSandboxRequest {
                config: Some(config),
                runtime_handler: "zygote".into(),
            })
            .await
            .unwrap_err();
        assert!(
            err.message().contains("700 MiB") && err.message().contains("at most 640 MiB"),
            "{err:?}"
        );
        assert!(
            !pod_listed(&mut runtime, "toobig").await,
            "the refused pod is not listed"
        );
        assert_eq!(host_links("veth"), before, "no veth left");
        let _ = std::fs::remove_dir_all(&logs);
    });
}

/// A pod whose VM goes over its pod cgroup's limit on the host (kubelet's
/// limit, here set on the test's cgroup parent: what the VM was charged
/// but its page cache, plus 16 MiB) is stopped: by the host's OOM killer
/// (the shim dies; its `delete` says the OOM) or, when the host only reclaims, by the shim's
/// monitor (it sees the limit hit while the guest stops answering). Either
/// way its container is reported `OOMKilled`, as under runc, though its VM
/// could not say so itself; and nothing of the pod is left.
#[test]
fn a_pod_over_its_host_limit_is_reported_oom_killed() {
    cri_test(|channel| async move {
        let mut runtime = RuntimeServiceClient::new(channel);
        let setup = PodInCgroup::start(&mut runtime, "hostoom", 0)
            .await
            .expect("the pod's first exec");
        let (pod, app) = (setup.pod.clone(), setup.app.clone());
        let parent_dir = setup.parent_dir();
        // 16 MiB of room beyond what cannot be reclaimed: the page cache
        // charged here would be dropped first and make room of its own.
        let limit = usage(&parent_dir).saturating_sub(file_cache(&parent_dir)) + (16 << 20);
        let limit_file = ["memory.limit_in_bytes", "memory.max"]
            .iter()
            .map(|f| parent_dir.join(f))
            .find(|f| f.exists())
            .unwrap();
        std::fs::write(&limit_file, limit.to_string()).unwrap();
        eprintln!(
            "pod cgroup parent limited to {:.1} MiB",
            limit as f64 / 1048576.0
        );
        // 96 MiB into the container's writable layer (guest memory): far
        // below the pod's cap in the guest, far above the host's room.
        let filled = runtime
            .exec_sync(cri::ExecSyncRequest {
                container_id: app.clone(),
                cmd: vec![
                    "sh".into(),
                    "-c".into(),
                    "head -c 100663296 /dev/zero > /fill; echo survived".into(),
                ],
                timeout: 300,
            })
            .await;
        let survived = filled
            .as_ref()
            .is_ok_and(|r| String::from_utf8_lossy(&r.get_ref().stdout).contains("survived"));
        assert!(!survived, "the VM was not killed at its host limit");

        // The OOM can be said just after the exit (when the host's OOM
        // killer killed the shim, its `delete` says it).
        let status = exited(&mut runtime, &app, |s| s.reason == "OOMKilled").await;
        eprintln!("exit {}: {}", status.exit_code, status.reason);

        remove_pod(&mut runtime, &pod).await;
        setup.finish();
    });
}
