//! A read-only image on virtio-blk: mounted in the template, read in a fork
//! (its pages come from the template's page cache or the image), never written;
//! a fork of a template whose image changed is refused.

use std::path::Path;
use std::time::Duration;

use zygote::image::ImageStore;
use zygote::sandbox::{Sandbox, SandboxConfig};
use zygote::template::BuildSpec;
use zygote_agent_api::{request, response};
use zygote_tests::{
    busybox_initramfs, busybox_oci_image, guest_available, guest_sh, own_run_dirs, vm_lock,
};
use zygote_vmm::snapshot::{Template, TemplateName, TemplateStore};

/// A template under `dir` that has `image` (erofs) on /dev/vda, mounted at
/// /mnt/image, then runs `then`.
fn image_template(dir: &Path, image: &Path, then: &str) -> Template {
    let store = TemplateStore::new(dir.join("templates"));
    let spec = BuildSpec {
        mounts: vec![],
        name: TemplateName::new("image").unwrap(),
        sandbox: SandboxConfig {
            // Built and driven through the agent's debug requests (Exec, Spawn).
            debug_requests: true,
            initramfs: busybox_initramfs(),
            disks: vec![image.into()],
            ..Default::default()
        },
        spawn: vec![],
        warm: vec![vec![
            "/bin/busybox".into(),
            "sh".into(),
            "-c".into(),
            format!("mkdir -p /mnt/image && mount -t erofs -o ro /dev/vda /mnt/image && {then}"),
        ]],
        settle: Duration::from_secs(1),
        stage: None,
        force: true,
    };
    let report = zygote_tests::build_template(&store, &spec);
    Template::open(&report.dir).unwrap()
}

#[test]
fn an_image_mounted_in_the_template_is_read_in_forks() {
    if !guest_available() {
        return;
    }
    let dir = std::env::temp_dir().join(format!("zygote-disk-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let stage = dir.join("rootfs");
    std::fs::create_dir_all(stage.join("etc")).unwrap();
    std::fs::write(stage.join("etc/hello.txt"), "hello from the image\n").unwrap();
    let image = ImageStore::new(dir.join("images"))
        .from_dir("hello", &stage)
        .expect("mkfs.erofs (erofs-utils; hack/test installs it)")
        .path;
    let _vm = vm_lock();
    let template = image_template(&dir, &image, "cat /mnt/image/etc/hello.txt > /dev/null");

    let fork = Sandbox::fork(&template, Duration::from_secs(120)).expect("fork");
    let r = guest_sh(&fork, "cat /mnt/image/etc/hello.txt");
    assert_eq!(r.exit_code, 0, "{}", String::from_utf8_lossy(&r.stderr));
    assert_eq!(String::from_utf8_lossy(&r.stdout), "hello from the image\n");
    let w = guest_sh(&fork, "echo x > /mnt/image/etc/new");
    assert_ne!(w.exit_code, 0, "the image is read-only");
    let dd = guest_sh(&fork, "dd if=/dev/zero of=/dev/vda bs=512 count=1 2>&1");
    assert_ne!(
        dd.exit_code,
        0,
        "the disk refuses writes: {}",
        String::from_utf8_lossy(&dd.stdout)
    );
    drop(fork);

    // The image changed under the template: a fork is refused, nothing started.
    std::fs::OpenOptions::new()
        .append(true)
        .open(&image)
        .unwrap()
        .set_len(std::fs::metadata(&image).unwrap().len() + 4096)
        .unwrap();
    let err = Sandbox::fork(&template, Duration::from_secs(120)).unwrap_err();
    let text = format!("{:#}", anyhow::Error::from(err));
    assert!(text.contains("the snapshot had"), "{text}");
    assert!(own_run_dirs().is_empty());
    std::fs::remove_dir_all(&dir).unwrap();
}

fn cref(id: &str) -> zygote_agent_api::ContainerRef {
    zygote_agent_api::ContainerRef {
        id: id.into(),
        exec_id: String::new(),
    }
}

#[test]
fn a_container_runs_from_its_image_in_a_fork() {
    use std::io::Read;
    use zygote_agent_api::{CreateContainer, attach_stdio};
    if !guest_available() {
        return;
    }
    let dir = std::env::temp_dir().join(format!("zygote-ctr-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    // A busybox OCI image built here, made into an erofs disk once (by its
    // manifest digest: the second time it is found in the cache).
    std::fs::create_dir_all(&dir).unwrap();
    let layout = busybox_oci_image(
        &dir,
        &[
            "sh", "echo", "id", "pwd", "cat", "uname", "dd", "sleep", "ls", "stty",
        ],
    );
    let images = ImageStore::new(dir.join("images"));
    let built = images.from_oci_layout(&layout, "busybox").unwrap();
    assert!(
        !built.cached && built.key.starts_with("sha256-"),
        "{built:?}"
    );
    let again = images.from_oci_layout(&layout, "busybox").unwrap();
    assert!(again.cached && again.path == built.path);
    let _vm = vm_lock();
    let template = image_template(&dir, &built.path, "true");
    let fork = Sandbox::fork(&template, Duration::from_secs(120)).expect("fork");

    let config = serde_json::json!({
        "ociVersion": "1.0.2",
        "root": {"path": "rootfs"},
        "process": {
            "args": ["/bin/sh", "-c", "echo \"$GREETING\"; pwd; id -u; uname -r; echo oops >&2; exit 3"],
            "cwd": "/home/app", "env": ["GREETING=hello from the image", "PATH=/bin"],
            "user": {"uid": 1000, "gid": 1000}
        },
        "hostname": "ctr",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid"]}
        ]
    });
    let mut client = fork.client().unwrap();
    client.set_timeout(Duration::from_secs(120)).unwrap();
    let id = "c1".to_string();
    let created = client
        .call(request::Body::CreateContainer(CreateContainer {
            id: id.clone(),
            spec_json: serde_json::to_vec(&config).unwrap(),
            rootfs: "/mnt/image".into(),
            upper_size_mib: 16,
            volumes: Vec::new(),
        }))
        .unwrap();
    assert!(matches!(created, response::Body::Empty(_)), "{created:?}");
    let mut out = attach_stdio(fork.vsock_path(), &id, "stdout", Duration::from_secs(30)).unwrap();
    let mut err = attach_stdio(fork.vsock_path(), &id, "stderr", Duration::from_secs(30)).unwrap();
    let started = client
        .call(request::Body::StartContainer(cref(&id)))
        .unwrap();
    assert!(matches!(started, response::Body::Started(_)), "{started:?}");
    let exited = client.call(request::Body::WaitProcess(cref(&id))).unwrap();
    let response::Body::Exited(exit) = exited else {
        panic!("{exited:?}")
    };
    let (mut stdout, mut stderr) = (String::new(), String::new());
    out.read_to_string(&mut stdout).unwrap();
    err.read_to_string(&mut stderr).unwrap();
    assert_eq!(exit.exit_code, 3, "stdout: {stdout}\nstderr: {stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        &lines[..3],
        ["hello from the image", "/home/app", "1000"],
        "{stdout}"
    );
    assert_eq!(
        lines[3], fork.pong.kernel_release,
        "the guest's kernel, not the host's"
    );
    assert_eq!(stderr, "oops\n");
    // Unknown ids and bad specs are errors; the agent keeps serving.
    let gone = client.call(request::Body::StartContainer(cref("nope")));
    assert!(format!("{gone:?}").contains("not found"), "{gone:?}");
    let bad = client.call(request::Body::CreateContainer(CreateContainer {
        id: "c2".into(),
        spec_json: b"{\"process\": 1}".to_vec(),
        rootfs: "/mnt/image".into(),
        upper_size_mib: 0,
        volumes: Vec::new(),
    }));
    assert!(format!("{bad:?}").contains("invalid OCI spec"), "{bad:?}");
    let removed = client
        .call(request::Body::RemoveContainer(cref(&id)))
        .unwrap();
    assert!(matches!(removed, response::Body::Empty(_)));

    // A terminal (`-t`): the process's stdin is a tty of the size set.
    let call = |client: &mut zygote_agent_api::AgentClient, body| client.call(body).unwrap();
    let mut on_tty = config.clone();
    on_tty["process"]["terminal"] = serde_json::json!(true);
    on_tty["process"]["args"] =
        serde_json::json!(["/bin/sh", "-c", "[ -t 0 ] && echo on-a-tty; stty size"]);
    call(
        &mut client,
        request::Body::CreateContainer(CreateContainer {
            id: "tty".into(),
            spec_json: serde_json::to_vec(&on_tty).unwrap(),
            rootfs: "/mnt/image".into(),
            upper_size_mib: 0,
            volumes: Vec::new(),
        }),
    );
    let resized = call(
        &mut client,
        request::Body::ResizeTty(zygote_agent_api::ResizeTty {
            id: "tty".into(),
            exec_id: String::new(),
            width: 100,
            height: 30,
        }),
    );
    assert!(matches!(resized, response::Body::Empty(_)), "{resized:?}");
    let mut tty =
        attach_stdio(fork.vsock_path(), "tty", "stdout", Duration::from_secs(30)).unwrap();
    call(&mut client, request::Body::StartContainer(cref("tty")));
    call(&mut client, request::Body::WaitProcess(cref("tty")));
    let mut text = String::new();
    tty.read_to_string(&mut text).unwrap();
    assert!(text.contains("on-a-tty\r\n30 100\r\n"), "{text:?}");
    call(&mut client, request::Body::RemoveContainer(cref("tty")));

    // A memory limit below what the process needs: the kernel OOM-kills it in
    // its cgroup, and the OOM event reaches a host waiting on its own connection.
    let mut events = fork.client().unwrap();
    let oom_waiter = std::thread::spawn(move || {
        events.set_timeout(Duration::from_secs(300)).unwrap();
        events.call(request::Body::GetOomEvent(zygote_agent_api::Empty {}))
    });
    let mut hungry = config.clone();
    hungry["process"]["args"] = serde_json::json!([
        "/bin/dd",
        "if=/dev/zero",
        "of=/dev/null",
        "bs=32M",
        "count=1"
    ]);
    hungry["linux"] = serde_json::json!({
        "resources": {"memory": {"limit": 8 << 20}, "pids": {"limit": 16}}
    });
    let created = call(
        &mut client,
        request::Body::CreateContainer(CreateContainer {
            id: "hungry".into(),
            spec_json: serde_json::to_vec(&hungry).unwrap(),
            rootfs: "/mnt/image".into(),
            upper_size_mib: 0,
            volumes: Vec::new(),
        }),
    );
    assert!(matches!(created, response::Body::Empty(_)), "{created:?}");
    let started = call(&mut client, request::Body::StartContainer(cref("hungry")));
    assert!(matches!(started, response::Body::Started(_)), "{started:?}");
    let response::Body::Exited(exit) =
        call(&mut client, request::Body::WaitProcess(cref("hungry")))
    else {
        panic!("hungry wait")
    };
    assert_eq!(exit.exit_code, 128 + 9, "killed by SIGKILL");
    assert!(exit.oom_killed, "reported as an OOM kill");
    match oom_waiter.join().unwrap() {
        Ok(response::Body::Oom(e)) => assert_eq!(e.id, "hungry", "{e:?}"),
        other => panic!("no OOM event: {other:?}"),
    }
    let response::Body::Stats(stats) = call(&mut client, request::Body::Stats(cref("hungry")))
    else {
        panic!("stats")
    };
    eprintln!("OOM-killed container: {stats:?}");
    assert_eq!(stats.memory_max, 8 << 20);
    assert!(
        stats.oom_kills >= 1 && stats.cpu_usage_usec > 0,
        "{stats:?}"
    );
    call(&mut client, request::Body::RemoveContainer(cref("hungry")));

    // An exec into a running container sees its root and its PID namespace.
    // A round where the exec's or the container's own process died of
    // SIGSEGV (the PVM guest fault) is retried with a new container, counted.
    let (text, killed) =
        zygote_tests::retry_pvm_segv(|attempt| exec_round(&mut client, &fork, &config, attempt));
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], "in-container");
    assert!(
        lines[1].starts_with("/bin/sleep"),
        "PID 1 is the container's: {text}"
    );
    assert_eq!(lines[2], "app");
    assert_eq!(killed, 128 + 9);
    assert!(client.ping().is_ok());
    drop(fork);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Starts `sleep` in a container, execs a shell into it, kills it. Returns the
/// exec's output and the container's exit code; Err if the exec's or the
/// container's own exit status was SIGSEGV; any other failure panics.
fn exec_round(
    client: &mut zygote_agent_api::AgentClient,
    fork: &Sandbox,
    config: &serde_json::Value,
    attempt: u32,
) -> Result<(String, i32), zygote_tests::PvmSegv> {
    use std::io::Read;
    use zygote_agent_api::{
        ContainerRef, CreateContainer, ExecProcess, SignalProcess, attach_stdio,
    };
    use zygote_tests::PvmSegv;
    let id = format!("svc{attempt}");
    let mut svc = config.clone();
    svc["process"]["args"] = serde_json::json!(["/bin/sleep", "1000"]);
    let mut call = |body| client.call(body).map_err(|e| e.to_string());
    call(request::Body::CreateContainer(CreateContainer {
        id: id.clone(),
        spec_json: serde_json::to_vec(&svc).unwrap(),
        rootfs: "/mnt/image".into(),
        upper_size_mib: 0,
        volumes: Vec::new(),
    }))
    .expect("CreateContainer");
    call(request::Body::StartContainer(cref(&id))).expect("StartContainer");
    let exec = serde_json::json!({
        "args": ["/bin/sh", "-c", "echo in-container; cat /proc/1/cmdline; echo; ls /home"],
        "cwd": "/", "env": ["PATH=/bin"], "user": {"uid": 0, "gid": 0}
    });
    let e1 = ContainerRef {
        id: id.clone(),
        exec_id: "e1".into(),
    };
    // Ok(Err(..)): the exec died of SIGSEGV.
    let ran = (|| -> Result<Result<(String, i32), PvmSegv>, String> {
        call(request::Body::ExecProcess(ExecProcess {
            id: id.clone(),
            exec_id: "e1".into(),
            process_json: serde_json::to_vec(&exec).unwrap(),
        }))?;
        let mut out = attach_stdio(
            fork.vsock_path(),
            &e1.key(),
            "stdout",
            Duration::from_secs(30),
        )
        .map_err(|e| e.to_string())?;
        call(request::Body::StartContainer(e1.clone()))?;
        let response::Body::Exited(done) = call(request::Body::WaitProcess(e1.clone()))? else {
            return Err("no exit for the exec".into());
        };
        let mut text = String::new();
        out.read_to_string(&mut text).map_err(|e| e.to_string())?;
        if done.exit_code == zygote_tests::SEGV_STATUS as i32 {
            return Ok(Err(PvmSegv {
                what: format!("exec e1 of {id}: {text}"),
            }));
        }
        if done.exit_code != 0 {
            return Err(format!("the exec exited {}: {text}", done.exit_code));
        }
        call(request::Body::SignalProcess(SignalProcess {
            id: id.clone(),
            signal: 9,
            exec_id: String::new(),
        }))?;
        let response::Body::Exited(killed) = call(request::Body::WaitProcess(cref(&id)))? else {
            return Err("no exit for the container".into());
        };
        Ok(Ok((text, killed.exit_code)))
    })();
    let ended = ran.unwrap_or_else(|e| {
        // Only the container's own crash is the PVM fault: a signal 0 finds
        // it gone, and its status (waited for at once) says how it ended.
        let gone = client
            .call(request::Body::SignalProcess(SignalProcess {
                id: id.clone(),
                signal: 0,
                exec_id: String::new(),
            }))
            .is_err();
        let code = gone.then(|| client.call(request::Body::WaitProcess(cref(&id))));
        if let Some(Ok(response::Body::Exited(exit))) = &code {
            PvmSegv::check(exit.exit_code.into(), || format!("container {id}: {e}"))?;
        }
        panic!("{e} (the container: {code:?})")
    });
    let _ = client.call(request::Body::RemoveContainer(cref(&id)));
    ended
}
