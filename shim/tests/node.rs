//! `zygote node install | uninstall | status` against a scratch node root,
//! with containerd's config as containerd 1.6 reads it: the real
//! `containerd config dump` (Debian's 1.6) must see zygote's runtime after
//! the install, keep the operator's settings, and see none after the
//! uninstall, which is refused while a shim of the installation runs and
//! gives back the original file byte for byte; a containerd started on the
//! installed config (the test's restart command) serves the `zygote`
//! handler through its CRI.

use std::path::Path;
use std::process::Command;

mod node_common;
use node_common::*;

#[test]
fn install_registers_with_containerd_keeps_the_rest_and_uninstall_undoes_it() {
    let node = Node::new("install");
    let restart = node.restart_command();

    let report = ok(&node.run("install", &restart));
    assert!(
        report.contains("\"containerd_config_changed\":true"),
        "{report}"
    );
    assert!(
        report.contains("\"containerd_config_version\":2"),
        "{report}"
    );
    assert!(report.contains("\"containerd_version\":\"1.6"), "{report}");
    assert!(report.contains("\"kvm\":\""), "{report}");
    // The containerd started on the new config serves the handler (the
    // installer asked its CRI).
    assert!(report.contains("\"handler_live\":true"), "{report}");
    eprintln!("install: {report}");
    assert_eq!(node.restarts(), 1);
    for p in [
        "usr/local/bin/containerd-shim-zygote-v2",
        "usr/local/bin/zygote",
        "opt/zygote/vmlinux",
        "opt/zygote/initramfs.cpio",
        "etc/zygote/config.toml",
    ] {
        assert!(exists(&node.root, p), "{p} installed");
    }
    let installed = node.config();
    assert!(
        installed.starts_with(&CONFIG.replace("ROOT", &node.root.to_string_lossy())),
        "the operator's config is kept byte for byte:\n{installed}"
    );
    let dump = node.dump();
    for line in [
        "[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.zygote]",
        "runtime_type = \"io.containerd.zygote.v2\"",
        "ConfigPath = \"/etc/zygote/config.toml\"",
        "sandbox_image = \"registry.local/pause:3.9\"",
        "SystemdCgroup = true",
    ] {
        assert!(dump.contains(line), "containerd reads {line:?}:\n{dump}");
    }
    assert!(exists(
        &node.root,
        "etc/containerd/config.toml.zygote-backup"
    ));

    // Twice: the same bytes, no restart; a running shim keeps its inode
    // (the file is replaced, not rewritten, when it changes).
    let report = ok(&node.run("install", &restart));
    assert!(
        report.contains("\"containerd_config_changed\":false"),
        "{report}"
    );
    assert_eq!(node.config(), installed);
    assert_eq!(node.restarts(), 1);
    let status = ok(&node.run("status", "none"));
    assert!(status.contains("\"registered\":true"), "{status}");

    // A pod's shim of this installation runs: uninstall is refused, names
    // it, and changes nothing.
    let mut shim = Command::new(node.root.join("usr/local/bin/containerd-shim-zygote-v2"))
        .args(["-c", "sleep 60; :", "-id", "pod-7f3a"])
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(200));
    let refused = node.run("uninstall", &restart);
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success() && err.contains("pod-7f3a"),
        "{err}"
    );
    assert_eq!(node.config(), installed);
    assert!(exists(&node.root, "usr/local/bin/zygote"));
    shim.kill().unwrap();
    shim.wait().unwrap();

    let report = ok(&node.run("uninstall", &restart));
    assert_eq!(
        node.config(),
        CONFIG.replace("ROOT", &node.root.to_string_lossy()),
        "the original config, byte for byte"
    );
    assert!(
        report.contains("\"containerd_config_changed\":true"),
        "{report}"
    );
    assert_eq!(node.restarts(), 2);
    assert!(!node.dump().contains("runtimes.zygote]"));
    assert!(
        !exists(&node.root, "usr/local/bin/zygote") && !exists(&node.root, "opt/zygote/vmlinux")
    );
    // Twice: harmless.
    ok(&node.run("uninstall", &restart));
    assert_eq!(node.restarts(), 2);
    let status = ok(&node.run("status", "none"));
    assert!(status.contains("\"registered\":false"), "{status}");
}

#[test]
fn a_config_it_cannot_edit_is_refused_before_anything_changes() {
    let node = Node::new("bad");
    let path = node.root.join("etc/containerd/config.toml");
    // Version 1 (no `version`): containerd 1.6 reads it, zygote does not edit it.
    std::fs::write(&path, "root = \"/var/lib/containerd\"\n").unwrap();
    let out = node.run("install", "none");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("version 1") && err.contains("config.toml"),
        "{err}"
    );
    assert!(
        !exists(&node.root, "usr/local/bin/zygote"),
        "nothing installed"
    );
    assert_eq!(
        std::fs::read_to_string(&path).unwrap(),
        "root = \"/var/lib/containerd\"\n"
    );
    // A failing restart is said.
    std::fs::write(&path, "version = 2\n").unwrap();
    let out = node.run("install", "exit 3");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("restarting containerd (exit 3) failed"),
        "{err}"
    );
}

#[test]
fn containerd_2_gets_a_drop_in_and_uninstall_takes_it_back() {
    let node = Node::new("v3");
    let path = node.root.join("etc/containerd/config.toml");
    let original = "# containerd 2.x\nversion = 3\n\n[plugins.\"io.containerd.cri.v1.images\"]\n  \
                    snapshotter = \"overlayfs\"\n";
    std::fs::write(&path, original).unwrap();
    let report = ok(&node.run("install", "none"));
    assert!(
        report.contains("\"containerd_config_version\":3"),
        "{report}"
    );
    let drop_in =
        std::fs::read_to_string(node.root.join("etc/containerd/conf.d/zygote.toml")).unwrap();
    assert!(
        drop_in.contains("[plugins.\"io.containerd.cri.v1.runtime\".containerd.runtimes.zygote]")
            && drop_in.contains("runtime_type = \"io.containerd.zygote.v2\""),
        "{drop_in}"
    );
    let main = std::fs::read_to_string(&path).unwrap();
    assert!(
        original.lines().all(|l| main.contains(l))
            && main.contains("imports = [\"/etc/containerd/conf.d/zygote.toml\"]"),
        "{main}"
    );
    assert!(ok(&node.run("status", "none")).contains("\"registered\":true"));
    ok(&node.run("uninstall", "none"));
    assert_eq!(std::fs::read_to_string(&path).unwrap(), original);
    assert!(!node.root.join("etc/containerd/conf.d/zygote.toml").exists());
}

/// k3s (and rke2) render containerd's config from a template: with none on
/// the node, the install writes one (k3s's base, then zygote's block: the
/// golden file's bytes) and the uninstall removes it; an operator's
/// template gets the block after its text and comes back byte for byte.
#[test]
fn k3s_gets_a_config_template_and_uninstall_takes_it_back() {
    let node = Node::new("k3s");
    let tmpl = "/var/lib/rancher/k3s/agent/etc/containerd/config.toml.tmpl";
    let path = node.root.join(&tmpl[1..]);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let run = |what: &str| {
        let mut c = zygote();
        c.args(["node", what, "--host-root"]).arg(&node.root).args([
            "--restart",
            "none",
            "--containerd-config",
            tmpl,
        ]);
        if what == "install" {
            c.arg("--shim")
                .arg(node.artefacts.join("containerd-shim-zygote-v2"))
                .arg("--kernel")
                .arg(node.artefacts.join("vmlinux"))
                .arg("--initramfs")
                .arg(node.artefacts.join("initramfs.cpio"));
        }
        ok(&c.output().unwrap())
    };
    let golden = |name: &str| {
        std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../host/src/node/golden")
                .join(name),
        )
        .unwrap()
    };

    let report = run("install");
    assert!(
        report.contains("\"containerd_config_version\":2"),
        "{report}"
    );
    assert_eq!(
        std::fs::read_to_string(&path).unwrap(),
        golden("k3s-config.toml.tmpl")
    );
    assert!(run("status").contains("\"registered\":true"));
    run("install");
    assert_eq!(
        std::fs::read_to_string(&path).unwrap(),
        golden("k3s-config.toml.tmpl"),
        "twice: the same bytes"
    );
    run("uninstall");
    assert!(!path.exists(), "the template the install made is gone");

    let theirs = "{{ template \"base\" . }}\n\n[plugins.\"io.containerd.grpc.v1.cri\".registry.mirrors.\"docker.io\"]\n  endpoint = [\"https://mirror.local\"]\n";
    std::fs::write(&path, theirs).unwrap();
    run("install");
    assert_eq!(
        std::fs::read_to_string(&path).unwrap(),
        golden("k3s-operator-config.toml.tmpl")
    );
    run("uninstall");
    assert_eq!(std::fs::read_to_string(&path).unwrap(), theirs);
}

/// The installed config serves pods: the real shim installed on a scratch
/// node, a containerd 1.6 (re)started on the installed config by the
/// restart command, a pod sandbox run through its CRI with the `zygote`
/// handler (the pause image copied from hack/containerd's containerd, as
/// the operator's `sandbox_image`); uninstall is refused naming that pod
/// while it runs, and succeeds once it is removed.
#[test]
fn a_pod_runs_on_the_installed_config_and_uninstall_waits_for_it() {
    let Some(dev) = dev_containerd() else {
        return;
    };
    let node = Node::with_real_shim("pod");
    let original = node.config();
    let restart = node.restart_command();
    let report = ok(&node.run("install", &restart));
    assert!(report.contains("\"handler_live\":true"), "{report}");

    // The operator's sandbox image, copied over (no registry here).
    let pause = node.root.join("pause.tar");
    let ctr = |socket: &Path, args: &[&str]| {
        let out = Command::new("ctr")
            .arg("--address")
            .arg(socket)
            .args(["-n", "k8s.io"])
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "ctr {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    ctr(
        &dev,
        &[
            "images",
            "export",
            pause.to_str().unwrap(),
            "zygote.local/pause:sleep",
        ],
    );
    ctr(
        &node.socket(),
        &["images", "import", pause.to_str().unwrap()],
    );
    ctr(
        &node.socket(),
        &[
            "images",
            "tag",
            "zygote.local/pause:sleep",
            "registry.local/pause:3.9",
        ],
    );

    use k8s_cri::v1 as cri;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let socket = node.socket();
    let mut client = runtime.block_on(async {
        let channel = zygote::cri_client::channel(&socket).await.unwrap();
        cri::runtime_service_client::RuntimeServiceClient::new(channel)
    });
    let uid = format!("installed-{}", std::process::id());
    let config = zygote::cri_client::host_network_pod("installed", &uid, "default");
    let pod = runtime
        .block_on(client.run_pod_sandbox(cri::RunPodSandboxRequest {
            config: Some(config),
            runtime_handler: "zygote".into(),
        }))
        .unwrap_or_else(|e| {
            let log = std::fs::read_to_string(node.root.join("containerd.log")).unwrap_or_default();
            panic!("RunPodSandbox with the zygote handler: {e:?}\n{log}")
        })
        .into_inner()
        .pod_sandbox_id;
    let status = runtime
        .block_on(client.pod_sandbox_status(cri::PodSandboxStatusRequest {
            pod_sandbox_id: pod.clone(),
            verbose: true,
        }))
        .unwrap()
        .into_inner();
    assert_eq!(
        status.status.as_ref().map(|s| s.state),
        Some(cri::PodSandboxState::SandboxReady as i32),
        "{status:?}"
    );
    assert!(
        status
            .info
            .get("info")
            .is_some_and(|i| i.contains("zygote")),
        "the zygote runtime runs it: {:?}",
        status.info
    );

    let refused = node.run("uninstall", &restart);
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success() && err.contains(&pod), "{err}");
    assert_ne!(node.config(), original, "nothing changed by the refusal");

    runtime
        .block_on(client.stop_pod_sandbox(cri::StopPodSandboxRequest {
            pod_sandbox_id: pod.clone(),
        }))
        .unwrap();
    runtime
        .block_on(client.remove_pod_sandbox(cri::RemovePodSandboxRequest {
            pod_sandbox_id: pod.clone(),
        }))
        .unwrap();
    drop(client);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let report = loop {
        let out = node.run("uninstall", &restart);
        if out.status.success() {
            break String::from_utf8_lossy(&out.stdout).into_owned();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "uninstall still refused after the pod's removal: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(std::time::Duration::from_millis(500));
    };
    assert!(report.contains("\"restarted\":true"), "{report}");
    assert_eq!(node.config(), original, "the config as it was");
}
