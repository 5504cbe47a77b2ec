//! Sidecars from other images through the CRI: a pod's first container
//! comes from the test image (its VM forked from that image's template);
//! sidecars from images built here each get their image as a disk put into
//! one of the VM's empty slots while it runs. They share the pod's emptyDir
//! and localhost with the app; every slot in use makes one more image a
//! clear error; removing a sidecar empties its slot for the next.

use std::path::Path;
use std::time::{Duration, Instant};

use k8s_cri::v1 as cri;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use tonic::transport::Channel;
use zygote_tests::ctr::{footprint_after, host_footprint};
use zygote_tests::{PvmSegv, busybox_oci_image, run_ok};

mod cri_common;
use cri_common::*;

/// The VM's empty disk slots (the shim's default `disk_slots`).
const SLOTS: usize = 3;

/// Images `zygote.local/side-N:busybox` (N < count), each its own layer
/// (busybox and another set of applets), imported into the CRI's namespace.
fn sidecar_images(count: usize) -> Vec<String> {
    let dir = std::env::temp_dir().join(format!("zygote-sidecar-images-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let socket = zygote_tests::containerd_socket();
    let extra = ["seq", "yes", "tac", "rev"];
    (0..count)
        .map(|n| {
            let d = dir.join(n.to_string());
            std::fs::create_dir_all(&d).unwrap();
            let applets = ["sh", "cat", "ls", "wc", "sleep", "echo", "httpd", extra[n]];
            let layout = busybox_oci_image(&d, &applets);
            let tar = d.join("image.tar");
            run_ok(
                std::process::Command::new("tar")
                    .arg("-cf")
                    .arg(&tar)
                    .arg("-C")
                    .arg(&layout)
                    .arg("."),
            );
            let name = format!("zygote.local/side-{n}");
            run_ok(
                std::process::Command::new("ctr")
                    .arg("--address")
                    .arg(&socket)
                    .args(["-n", "k8s.io", "images", "import", "--base-name", &name])
                    .arg(&tar),
            );
            format!("{name}:busybox")
        })
        .collect()
}

fn with_image(
    mut request: cri::CreateContainerRequest,
    image: &str,
) -> cri::CreateContainerRequest {
    let config = request.config.as_mut().unwrap();
    config.image = Some(cri::ImageSpec {
        image: image.into(),
        ..Default::default()
    });
    request
}

fn with_mount(
    mut request: cri::CreateContainerRequest,
    host: &Path,
) -> cri::CreateContainerRequest {
    request.config.as_mut().unwrap().mounts = vec![cri::Mount {
        container_path: "/shared".into(),
        host_path: host.to_string_lossy().into(),
        ..Default::default()
    }];
    request
}

#[test]
fn sidecars_from_other_images_take_the_vms_disk_slots() {
    let images = sidecar_images(SLOTS + 1);
    cri_test(|channel| async move {
        let runtime = RuntimeServiceClient::new(channel);
        until_passed(|attempt| {
            let (mut runtime, images) = (runtime.clone(), images.clone());
            async move { round(&mut runtime, &images, attempt).await }
        })
        .await;
    });
}

async fn round(
    runtime: &mut RuntimeServiceClient<Channel>,
    images: &[String],
    attempt: u32,
) -> Result<(), PvmSegv> {
    let before = host_footprint();
    let (config, logs) = pod_config("sidepod", attempt);
    let empty_dir = logs.join("volumes/kubernetes.io~empty-dir/shared");
    std::fs::create_dir_all(&empty_dir).unwrap();
    let pod = run_pod(runtime, &config).await;
    let _guard = PodGuard(pod.clone());

    let first = Instant::now();
    let app = run_container(
        runtime,
        with_mount(
            container_request(&pod, &config, "app", &["sleep", "3600"]),
            &empty_dir,
        ),
    )
    .await;
    let first_ms = first.elapsed().as_secs_f64() * 1e3;

    // A sidecar from another image: its own root, the pod's emptyDir and
    // localhost (it serves the shared directory over HTTP on 127.0.0.1).
    let started = Instant::now();
    let side0 = run_container(
        runtime,
        with_mount(
            with_image(
                container_request(
                    &pod,
                    &config,
                    "side0",
                    &["sh", "-c", "echo from-side0 > /shared/note; exec httpd -f -p 127.0.0.1:7000 -h /shared"],
                ),
                &images[0],
            ),
            &empty_dir,
        ),
    )
    .await;
    let sidecar_ms = started.elapsed().as_secs_f64() * 1e3;
    eprintln!(
        "create+start: first container (fork) {first_ms:.0} ms; sidecar with a new image {sidecar_ms:.0} ms"
    );
    // Its own image: only its applets (the app's image has every one).
    let own = exec_ok(
        runtime,
        &side0,
        "ls /bin | wc -l; [ -e /bin/seq ] && echo has-seq",
    )
    .await?;
    assert_eq!(
        own.split_whitespace().collect::<Vec<_>>(),
        ["9", "has-seq"],
        "{own}"
    );
    let apps = exec_ok(runtime, &app, "ls /bin | wc -l").await?;
    assert!(apps.trim().parse::<u32>().unwrap() > 100, "{apps}");
    let deadline = Instant::now() + Duration::from_secs(60);
    let fetched = loop {
        let (code, out) = exec_sh(runtime, &app, "wget -qO- http://127.0.0.1:7000/note").await;
        PvmSegv::check(code.into(), || "wget".into())?;
        if code == 0 || Instant::now() > deadline {
            break out;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert_eq!(
        fetched.trim(),
        "from-side0",
        "emptyDir and localhost shared"
    );

    // The other slots; then one image more than slots is refused.
    let mut sidecars = vec![side0];
    for (n, image) in images.iter().enumerate().take(SLOTS).skip(1) {
        let name = format!("side{n}");
        let request = with_image(
            container_request(&pod, &config, &name, &["sleep", "3600"]),
            image,
        );
        sidecars.push(run_container(runtime, request).await);
    }
    // The CRI makes the task (the shim's Create) at StartContainer.
    let extra = runtime
        .create_container(with_image(
            container_request(&pod, &config, "extra", &["sleep", "3600"]),
            &images[SLOTS],
        ))
        .await
        .expect("CreateContainer")
        .into_inner()
        .container_id;
    let refused = runtime
        .start_container(cri::StartContainerRequest {
            container_id: extra.clone(),
        })
        .await
        .expect_err("one image more than the VM's slots");
    assert!(
        refused.message().contains("disk slots"),
        "a clear error: {refused:?}"
    );
    runtime
        .remove_container(cri::RemoveContainerRequest {
            container_id: extra,
        })
        .await
        .expect("RemoveContainer of the refused one");

    // Removing a sidecar empties its slot: the extra image fits now.
    let last = sidecars.pop().unwrap();
    runtime
        .stop_container(cri::StopContainerRequest {
            container_id: last.clone(),
            timeout: 0,
        })
        .await
        .expect("StopContainer");
    runtime
        .remove_container(cri::RemoveContainerRequest { container_id: last })
        .await
        .expect("RemoveContainer");
    let extra = run_container(
        runtime,
        with_image(
            container_request(&pod, &config, "extra2", &["sh", "-c", "exec sleep 3600"]),
            &images[SLOTS],
        ),
    )
    .await;
    let out = exec_ok(runtime, &extra, "[ -e /bin/rev ] && echo has-rev").await?;
    assert_eq!(out.trim(), "has-rev", "the extra image's own root");

    remove_pod(runtime, &pod).await;
    let after = footprint_after(&before);
    assert_eq!(after, before, "nothing left");
    std::fs::remove_dir_all(&logs).unwrap();
    Ok(())
}
