//! A pod's volumes through the CRI, as kubelet passes them: the same pod
//! under runc (the reference, same run) and under zygote must show its
//! containers the same files, modes and owners. kubelet's pod directory is
//! made by the test the way kubelet lays it out (configMap, secret and
//! projected volumes written by its atomic writer: a stamped directory,
//! `..data`, a link per key; emptyDirs, the memory one a tmpfs of its
//! sizeLimit; `etc-hosts`; the termination-log file). Then, in each pod: a configMap update is seen inside; a sidecar
//! and the app share an emptyDir and `/dev/shm`; what the app writes to its
//! termination log reaches the host file after it exits (kubelet reads it
//! there for `ContainerStatus`); a hostPath is the host's directory both
//! ways (read-write, and a read-only one refuses writes), and its symlinks
//! pointing out resolve in the container, not on the host; nothing is left
//! after the pod's removal.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use k8s_cri::v1 as cri;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use tonic::transport::Channel;
use zygote_tests::PvmSegv;
use zygote_tests::ctr::{footprint_after, host_footprint};

mod cri_common;
use cri_common::*;

/// kubelet's atomic writer: a new stamped directory with the keys, `..data`
/// swapped to it, a link per key, the old directory removed.
fn kubelet_write(dir: &Path, stamp: &str, keys: &[(&str, &str, u32)]) {
    let new = dir.join(stamp);
    std::fs::create_dir_all(&new).unwrap();
    for (k, v, mode) in keys {
        std::fs::write(new.join(k), v).unwrap();
        std::fs::set_permissions(new.join(k), std::fs::Permissions::from_mode(*mode)).unwrap();
    }
    let old = std::fs::read_link(dir.join("..data")).ok();
    let tmp = dir.join("..data_tmp");
    std::os::unix::fs::symlink(stamp, &tmp).unwrap();
    std::fs::rename(&tmp, dir.join("..data")).unwrap();
    for (k, _, _) in keys {
        let _ = std::os::unix::fs::symlink(format!("..data/{k}"), dir.join(k));
    }
    if let Some(old) = old {
        std::fs::remove_dir_all(dir.join(old)).unwrap();
    }
}

/// A pod directory as kubelet makes one.
struct KubeletPod {
    root: PathBuf,
    config_map: PathBuf,
    host_dir: PathBuf,
    cache: PathBuf,
    /// The memory emptyDir, a tmpfs as kubelet mounts one (sizeLimit 16 MiB).
    memory: PathBuf,
    termination_log: PathBuf,
    mounts: Vec<cri::Mount>,
}

impl KubeletPod {
    fn new(name: &str) -> KubeletPod {
        let root =
            std::env::temp_dir().join(format!("zygote-kubelet-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let volumes = root.join("volumes");
        let dir = |plugin: &str, name: &str| {
            let d = volumes.join(format!("kubernetes.io~{plugin}")).join(name);
            std::fs::create_dir_all(&d).unwrap();
            d
        };
        let config_map = dir("configmap", "cfg");
        kubelet_write(
            &config_map,
            "..2026_12_03_10_00_00.1",
            &[("greeting", "v1", 0o644)],
        );
        let secret = dir("secret", "creds");
        kubelet_write(
            &secret,
            "..2026_12_03_10_00_00.2",
            &[("password", "s3cret", 0o400)],
        );
        let token = dir("projected", "kube-api-access");
        kubelet_write(
            &token,
            "..2026_12_03_10_00_00.3",
            &[
                ("token", "eyJhbGciOi.x.y", 0o644),
                ("namespace", "default", 0o644),
            ],
        );
        let (cache, memory) = (dir("empty-dir", "cache"), dir("empty-dir", "mem"));
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=16m", "tmpfs"])
            .arg(&memory)
            .status()
            .unwrap();
        assert!(status.success(), "mount the memory emptyDir's tmpfs");
        for d in [&cache, &memory] {
            std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o777)).unwrap();
        }
        let hosts = root.join("etc-hosts");
        std::fs::write(&hosts, "127.0.0.1\tlocalhost\n198.18.0.9\tvolpod\n").unwrap();
        let termination_log = root.join("containers/app/0d1e2f");
        std::fs::create_dir_all(termination_log.parent().unwrap()).unwrap();
        std::fs::write(&termination_log, "").unwrap();
        std::fs::set_permissions(&termination_log, std::fs::Permissions::from_mode(0o666)).unwrap();
        // hostPath volumes: one read-write, one read-only; beside them a
        // host directory the container must not reach through links.
        let (host_dir, host_ro, outside) = (
            root.join("data"),
            root.join("data-ro"),
            root.join("outside"),
        );
        for d in [&host_dir, &host_ro, &outside] {
            std::fs::create_dir_all(d).unwrap();
        }
        std::fs::write(host_dir.join("from-host"), "hello from the host").unwrap();
        std::fs::set_permissions(
            host_dir.join("from-host"),
            std::fs::Permissions::from_mode(0o640),
        )
        .unwrap();
        std::fs::write(host_ro.join("kept"), "read-only data").unwrap();
        std::fs::write(outside.join("host-only"), "host secret").unwrap();
        std::os::unix::fs::symlink(&outside, host_dir.join("abs")).unwrap();
        std::os::unix::fs::symlink("../outside/host-only", host_dir.join("up")).unwrap();
        let mount = |container: &str, host: &Path, readonly: bool| cri::Mount {
            container_path: container.into(),
            host_path: host.to_string_lossy().into(),
            readonly,
            ..Default::default()
        };
        let mounts = vec![
            mount("/etc/cfg", &config_map, true),
            mount("/etc/creds", &secret, true),
            mount(
                "/var/run/secrets/kubernetes.io/serviceaccount",
                &token,
                true,
            ),
            mount("/cache", &cache, false),
            mount("/mem", &memory, false),
            mount("/etc/hosts", &hosts, false),
            mount("/dev/termination-log", &termination_log, false),
            mount("/data", &host_dir, false),
            mount("/data-ro", &host_ro, true),
        ];
        KubeletPod {
            root,
            config_map,
            host_dir,
            cache,
            memory,
            termination_log,
            mounts,
        }
    }
}

impl KubeletPod {
    /// Unmounts the memory emptyDir, as kubelet does when the pod is gone.
    fn unmount(&self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.memory)
            .stderr(std::process::Stdio::null())
            .status();
    }
}

impl Drop for KubeletPod {
    fn drop(&mut self) {
        self.unmount();
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// What a container sees of its volumes: each file's mode, owner and
/// content, each directory's mode, and whether a read-only one refuses a write.
const PROBE: &str = r#"
for f in /etc/cfg/greeting /etc/creds/password \
         /var/run/secrets/kubernetes.io/serviceaccount/token \
         /var/run/secrets/kubernetes.io/serviceaccount/namespace \
         /etc/hosts /etc/hostname /dev/termination-log; do
  echo "== $f $(stat -L -c '%a %u:%g' $f)"; cat $f; echo
done
for d in /cache /mem /dev/shm; do echo "== $d $(stat -c '%a' $d)"; done
echo "== /mem size $(df -k /mem | awk 'NR == 2 {print $2}') KiB"
ls -a /etc/cfg | tr '\n' ' '; echo
touch /etc/cfg/new 2>/dev/null && echo cfg-writable || echo cfg-read-only
echo "== /data/from-host $(stat -c '%a %u:%g' /data/from-host)"; cat /data/from-host; echo
echo app-wrote > /data/from-app && echo "== /data/from-app $(stat -c '%a %u:%g' /data/from-app)"
cat /data/up 2>/dev/null || echo no-escape-up
ls /data/abs/ 2>/dev/null | grep -q host-only && echo escaped-abs || echo no-escape-abs
ls /data/../ | grep -q outside && echo escaped-parent || echo no-escape-parent
cat /data-ro/kept; echo
touch /data-ro/new 2>/dev/null && echo ro-writable || echo ro-read-only
"#;

#[test]
fn a_pods_volumes_are_seen_as_under_runc_and_kept_current() {
    cri_test(|channel| async move {
        let mut runtime = RuntimeServiceClient::new(channel);
        remove_stale_pods(&mut runtime, "volpod").await;
        // runc runs guest-free: no PVM fault to retry.
        let reference = pod_round(&mut runtime, "", 0)
            .await
            .unwrap_or_else(|e| panic!("runc: {}", e.what));
        until_passed(|attempt| {
            let (mut runtime, reference) = (runtime.clone(), reference.clone());
            async move {
                let seen = pod_round(&mut runtime, "zygote", attempt).await?;
                assert_eq!(
                    seen, reference,
                    "zygote's containers see their volumes as runc's do"
                );
                Ok(())
            }
        })
        .await;
    });
}

/// One pod under `handler` ("": runc): the probe's output, after checking
/// the update, the shared directories and the termination log.
async fn pod_round(
    runtime: &mut RuntimeServiceClient<Channel>,
    handler: &str,
    attempt: u32,
) -> Result<String, PvmSegv> {
    let runtime_name = if handler.is_empty() { "runc" } else { handler };
    let (before, veths_before) = (host_footprint(), host_links("veth").len());
    let kubelet = KubeletPod::new(&format!("{runtime_name}-{attempt}"));
    let (pod_config, logs) = pod_config(&format!("volpod-{runtime_name}"), attempt);
    // On the pod network (CNI): a pod with the host's network cannot name
    // its host.
    let mut pod_config = on_pod_network(pod_config, Vec::new());
    pod_config.hostname = "volpod".into();
    let pod = run_pod_with(runtime, &pod_config, handler).await;
    let _guard = PodGuard(pod.clone());
    let with_mounts = |name: &str, command: &[&str]| {
        let mut request = container_request(&pod, &pod_config, name, command);
        let config = request.config.as_mut().unwrap();
        config.mounts = kubelet.mounts.clone();
        request
    };
    // The app waits for the sidecar's word in the shared emptyDir, then
    // leaves a termination message and exits 3.
    let app = run_container(
        runtime,
        with_mounts(
            "app",
            &[
                "sh",
                "-c",
                "while [ ! -e /cache/stop ]; do sleep 1; done; \
                 echo -n bye-from-app > /dev/termination-log; exit 3",
            ],
        ),
    )
    .await;
    let sidecar = run_container(runtime, with_mounts("sidecar", &["sleep", "3600"])).await;
    let seen = exec_ok(runtime, &app, PROBE).await?;
    eprintln!("{runtime_name}: the app sees\n{seen}");
    assert!(
        seen.contains("== /etc/cfg/greeting 644 0:0\nv1\n"),
        "{seen}"
    );
    assert!(
        seen.contains("== /etc/creds/password 400 0:0\ns3cret\n"),
        "{seen}"
    );
    assert!(seen.contains("198.18.0.9\tvolpod"), "{seen}");
    assert!(seen.contains("== /cache 777"), "{seen}");
    assert!(seen.contains("== /mem size 16384 KiB"), "{seen}");
    assert!(seen.contains("cfg-read-only"), "{seen}");

    // hostPath: the host's directory, both ways; the read-only one refuses.
    assert!(
        seen.contains("== /data/from-host 640 0:0\nhello from the host\n"),
        "{seen}"
    );
    for line in [
        "no-escape-up",
        "no-escape-abs",
        "no-escape-parent",
        "read-only data\nro-read-only",
    ] {
        assert!(seen.contains(line), "{runtime_name}: {line}: {seen}");
    }
    assert_eq!(
        std::fs::read_to_string(kubelet.host_dir.join("from-app")).unwrap(),
        "app-wrote\n",
        "{runtime_name}: what the container wrote is on the host"
    );
    std::fs::write(kubelet.host_dir.join("later"), "written on the host later").unwrap();
    assert_eq!(
        exec_ok(runtime, &app, "cat /data/later").await?,
        "written on the host later",
        "{runtime_name}: what the host wrote is in the container"
    );

    // A configMap update, seen inside.
    let updated = Instant::now();
    kubelet_write(
        &kubelet.config_map,
        "..2026_12_03_10_05_00.4",
        &[("greeting", "v2", 0o644)],
    );
    loop {
        let now = exec_ok(runtime, &app, "cat /etc/cfg/greeting").await?;
        if now == "v2" {
            break;
        }
        assert!(
            updated.elapsed() < Duration::from_secs(60),
            "{runtime_name}: the update not seen after 60 s: {now:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    eprintln!(
        "{runtime_name}: configMap update seen inside after {:.1} s",
        updated.elapsed().as_secs_f64()
    );

    // The sidecar writes into the pod's emptyDir and /dev/shm; the app sees both.
    exec_ok(runtime, &sidecar, "echo from-sidecar > /dev/shm/note").await?;
    let shm = exec_ok(runtime, &app, "cat /dev/shm/note").await?;
    assert_eq!(
        shm.trim(),
        "from-sidecar",
        "{runtime_name}: /dev/shm is the pod's"
    );
    exec_ok(runtime, &sidecar, "touch /cache/stop").await?;
    // A disk-backed emptyDir is the host's directory (kubelet measures it
    // against sizeLimit there).
    assert!(
        kubelet.cache.join("stop").exists(),
        "{runtime_name}: the emptyDir's file on the host"
    );
    let deadline = Instant::now() + Duration::from_secs(120);
    let code = loop {
        if let Some(code) = container_exit_code(runtime, &app).await {
            break code;
        }
        assert!(
            Instant::now() < deadline,
            "{runtime_name}: the app did not exit"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    PvmSegv::check(code.into(), || format!("{runtime_name} app"))?;
    assert_eq!(code, 3, "{runtime_name}: the app's own exit");
    assert_eq!(
        std::fs::read_to_string(&kubelet.termination_log).unwrap(),
        "bye-from-app",
        "{runtime_name}: the termination message on the host"
    );

    remove_pod(runtime, &pod).await;
    kubelet.unmount();
    let mut after = footprint_after(&before);
    // The CNI bridge stays once made; the pod's veth must not.
    assert_eq!(
        host_links("veth").len(),
        veths_before,
        "{runtime_name}: the pod's veth is gone"
    );
    after.links = before.links;
    assert_eq!(after, before, "{runtime_name}: nothing left");
    std::fs::remove_dir_all(&logs).unwrap();
    Ok(seen)
}
