use super::*;

#[test]
fn stale_templates_are_recognized() {
    let dir = std::env::temp_dir().join(format!("zygote-stale-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (kernel, image) = (dir.join("vmlinux"), dir.join("initramfs.cpio"));
    std::fs::write(&kernel, b"k").unwrap();
    std::fs::write(&image, b"i").unwrap();
    let spec = BuildSpec {
        mounts: vec![],
        name: TemplateName::new("t").unwrap(),
        sandbox: SandboxConfig {
            kernel: kernel.clone(),
            initramfs: image.clone(),
            ..Default::default()
        },
        spawn: vec![],
        warm: vec![],
        settle: Duration::ZERO,
        stage: None,
        force: false,
    };
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let meta = TemplateMeta {
        name: "t".into(),
        format_version: STATE_VERSION,
        kind: KvmKind::Pvm,
        vcpus: 1,
        memory_mib: 128,
        kernel: std::fs::canonicalize(&kernel).unwrap(),
        initramfs: std::fs::canonicalize(&image).unwrap(),
        cmdline: String::new(),
        created_unix_s: now + 1,
        agent_started_ns: 0,
        snapshot_uptime_ns: 0,
        boot_ms: 0.0,
        pause_ms: 0.0,
        save_ms: 0.0,
        memory_write_ms: 0.0,
        memory_data_bytes: 0,
        memory_crc32: 0,
        staged: false,
        disk_slots: 0,
        shared_fs: false,
        debug_requests: false,
        online_cpus: 0,
        pod_memory_mib: 0,
    };
    assert_eq!(stale_reason(&meta, &spec), None);
    let shared = TemplateMeta {
        shared_fs: true,
        ..meta.clone()
    };
    assert!(
        stale_reason(&shared, &spec)
            .unwrap()
            .contains("with a shared file system")
    );
    let debug = TemplateMeta {
        debug_requests: true,
        ..meta.clone()
    };
    assert!(
        stale_reason(&debug, &spec)
            .unwrap()
            .contains("with debug requests")
    );
    let capped = TemplateMeta {
        pod_memory_mib: 128,
        ..meta.clone()
    };
    assert!(
        stale_reason(&capped, &spec)
            .unwrap()
            .contains("capped at 128 MiB")
    );
    let slotted = TemplateMeta {
        disk_slots: 3,
        ..meta.clone()
    };
    assert!(
        stale_reason(&slotted, &spec)
            .unwrap()
            .contains("3 empty disk slots")
    );
    let staged = TemplateMeta {
        staged: true,
        ..meta.clone()
    };
    assert!(
        stale_reason(&staged, &spec)
            .unwrap()
            .contains("with a staged container")
    );
    let older = TemplateMeta {
        created_unix_s: now - 3600,
        ..meta.clone()
    };
    assert!(
        stale_reason(&older, &spec)
            .unwrap()
            .contains("changed after")
    );
    let bigger = TemplateMeta {
        memory_mib: 256,
        ..meta.clone()
    };
    assert!(stale_reason(&bigger, &spec).unwrap().contains("256 MiB"));
    let other = TemplateMeta {
        initramfs: "/elsewhere.cpio".into(),
        ..meta.clone()
    };
    assert!(
        stale_reason(&other, &spec)
            .unwrap()
            .contains("image /elsewhere.cpio")
    );
    let old_format = TemplateMeta {
        format_version: 0,
        ..meta
    };
    assert!(
        stale_reason(&old_format, &spec)
            .unwrap()
            .contains("state format 0")
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
