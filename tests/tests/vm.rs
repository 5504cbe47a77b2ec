//! Real VMs on the real /dev/kvm with the real guest kernel and agent.
//!
//! Guest kernel code is emulated on PVM hosts (a boot takes ~25 s), so the
//! booted-VM checks share one boot per test, and tests take [`vm_lock`].

use std::time::Duration;

use zygote::sandbox::{Sandbox, SandboxConfig, SandboxError};
use zygote_agent_api::{SelfTest, request, response};
use zygote_tests::{TempFile, fd_count, guest_available, own_run_dirs, vm_lock, vmm_thread_count};
use zygote_vmm::{BuildError, ExitReason};

/// Boots the real kernel with 2 vCPUs (MP table, APs brought up), pings, powers off.
#[test]
fn two_vcpus_boot_and_answer() {
    if !guest_available() {
        return;
    }
    let _lock = vm_lock();
    let sandbox = Sandbox::boot(&SandboxConfig {
        vcpus: 2,
        ..SandboxConfig::default()
    })
    .expect("SMP guest boots");
    assert!(sandbox.client().unwrap().ping().unwrap().uptime_ns >= sandbox.pong.uptime_ns);
    // Booted as a pod's VM is (no `debug_requests`): the agent refuses to
    // run a program outside any container, and goes on serving.
    let refused = sandbox
        .client()
        .unwrap()
        .call(zygote_agent_api::request::Body::Exec(
            zygote_agent_api::Exec {
                argv: vec!["/bin/busybox".into(), "true".into()],
                ..Default::default()
            },
        ))
        .unwrap_err();
    assert_eq!(
        refused.code(),
        Some(zygote_agent_api::Code::Unimplemented),
        "{refused}"
    );
    assert!(sandbox.client().unwrap().ping().is_ok());
    assert_eq!(
        sandbox.shutdown(Duration::from_secs(60)),
        ExitReason::Reset,
        "the agent stops the guest through the i8042 reset line"
    );
}

/// Boots the real kernel, pings the agent over vsock, runs the exec/pipe stress
/// inside the guest (100 rounds; `hack/stress` runs 500), powers off, and checks nothing is left.
///
/// One vCPU and one round at a time: on PVM, more concurrency raises the known
/// residue (docs/guest-kernel.md) to single-threaded processes too.
#[test]
fn boot_ping_stress_and_power_off() {
    if !guest_available() {
        return;
    }
    let _lock = vm_lock();
    // Its self-test is a debug request.
    let config = SandboxConfig {
        debug_requests: true,
        ..SandboxConfig::default()
    };
    // A umask that would leave everything open to everyone (restored
    // below): the run directory and the sockets in it are the owner's alone.
    // SAFETY: umask has no preconditions.
    let umask = unsafe { libc::umask(0) };
    let sandbox = Sandbox::boot(&config).expect("the guest boots and the agent answers");
    // SAFETY: as above.
    unsafe { libc::umask(umask) };
    let run_dir = sandbox.run_dir().to_path_buf();
    assert!(sandbox.vsock_path().exists());
    let mode = |p: &std::path::Path| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(p).unwrap().permissions().mode() & 0o7777
    };
    assert_eq!(mode(&run_dir), 0o700, "{}", run_dir.display());
    for entry in std::fs::read_dir(&run_dir).unwrap().flatten() {
        use std::os::unix::fs::FileTypeExt;
        if entry.file_type().unwrap().is_socket() {
            assert_eq!(mode(&entry.path()), 0o600, "{}", entry.path().display());
        }
    }

    // The agent is the one we built, in a guest kernel that is not the host's.
    let pong = &sandbox.pong;
    assert_eq!(pong.version, zygote_agent_api::VERSION);
    assert!(
        pong.kernel_release.ends_with("-zygote"),
        "{}",
        pong.kernel_release
    );
    let t = sandbox.boot.expect("booted");
    assert!(t.vmm_setup_ms > 0.0 && t.vmm_setup_ms <= t.kernel_entry_ms);
    assert!(t.kernel_entry_ms <= t.agent_start_ms && t.agent_start_ms <= t.agent_ready_ms);

    // A second connection while the first is open; the uptime moves forward.
    let mut a = sandbox.client().unwrap();
    let mut b = sandbox.client().unwrap();
    let first = a.ping().unwrap().uptime_ns;
    let second = b.ping().unwrap().uptime_ns;
    assert!(second >= first && first >= pong.uptime_ns);

    // Fresh execs with pipe round trips, every 10th multi-threaded: 100 in
    // the suite (enough to see a rate), `hack/stress` runs 500
    // (ZYGOTE_STRESS_ROUNDS).
    let rounds: u32 = std::env::var("ZYGOTE_STRESS_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);
    a.set_timeout(Duration::from_secs(3600)).unwrap();
    let body = a
        .call(request::Body::SelfTest(SelfTest {
            rounds,
            threads_every: 10,
            parallel: 1,
            bytes: 65536,
            command: vec![],
        }))
        .unwrap();
    let response::Body::SelfTest(report) = body else {
        panic!("unexpected answer {body:?}")
    };
    eprintln!("guest stress: {}", report.summary());
    assert_eq!(report.execs, rounds);
    assert_eq!(report.threaded, rounds / 10);
    // Every round is accounted for: it passed or its failure is described.
    let failed = report.execs - report.ok;
    assert_eq!(
        failed,
        report.segfaults + report.tls_corruptions + report.other_failures
    );
    assert!(
        report.failures.len() as u32 == failed.min(10),
        "{:?}",
        report.failures
    );
    // Only the PVM guest fault's own signatures are tolerated, and only on
    // PVM: a child killed by SIGSEGV, or a canary naming the lost register.
    // Any other failure (a hang, another signal, corrupted data) fails.
    assert_eq!(report.other_failures, 0, "{:?}", report.failures);
    let faulted = report.segfaults + report.tls_corruptions;
    if sandbox.kind() == zygote_vmm::KvmKind::Hardware {
        assert_eq!(
            faulted, 0,
            "no failures on hardware KVM: {:?}",
            report.failures
        );
    }
    // On one vCPU the fault has stayed at a few percent: far more is a breakage.
    assert!(
        faulted <= rounds / 5,
        "far above the known PVM rate: {:?}",
        report.failures
    );
    for _ in 0..faulted {
        zygote_tests::record_retry(
            "guest stress round hit the PVM fault (SIGSEGV or lost-register canary)",
        );
    }
    eprintln!("PVM fault in {faulted} of {rounds} stress rounds");

    // A hostile guest program flooding the vsock device (connects to host
    // ports nobody serves, each closed at once: a request and a reset per
    // connect): the host's memory stays bounded and the agent's other
    // connection keeps answering.
    let rss_before = rss_anon_kib();
    let mut flooder = sandbox.client().unwrap();
    flooder.set_timeout(Duration::from_secs(300)).unwrap();
    let flood = std::thread::spawn(move || {
        flooder.call(request::Body::Exec(zygote_agent_api::Exec {
            argv: ["/init", "vsock-flood", "20"].map(String::from).to_vec(),
            env: vec![],
            timeout_ms: 120_000,
        }))
    });
    let (mut pings, mut slowest) = (0u32, Duration::ZERO);
    while !flood.is_finished() {
        let asked = std::time::Instant::now();
        b.ping().expect("the agent answers during the flood");
        slowest = slowest.max(asked.elapsed());
        pings += 1;
        std::thread::sleep(Duration::from_millis(200));
    }
    let body = flood.join().unwrap().expect("the flood ran");
    let response::Body::Exec(result) = body else {
        panic!("unexpected answer {body:?}")
    };
    let connects: u64 = String::from_utf8_lossy(&result.stdout)
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("flood output: {result:?}"));
    let rss_after = rss_anon_kib();
    eprintln!(
        "vsock flood: {connects} connects (each a request and a reset) from the guest in 20 s; \
         host anonymous memory {rss_before} -> {rss_after} KiB; \
         {pings} pings answered during it (slowest {} ms)",
        slowest.as_millis()
    );
    assert_eq!(result.exit_code, 0, "{result:?}");
    assert!(connects > 0 && pings > 0);
    assert!(
        rss_after < rss_before + 16 * 1024,
        "the host grew with the flood: {rss_before} -> {rss_after} KiB"
    );
    b.ping().expect("the agent answers after the flood");
    drop((a, b));

    let reason = sandbox.shutdown(Duration::from_secs(60));
    assert_eq!(
        reason,
        ExitReason::Reset,
        "the agent stops the guest cleanly, through the i8042 reset line"
    );
    assert!(!run_dir.exists(), "the run directory is removed");
}

/// Bad input gets a clear error and leaves no thread, fd or file behind.
#[test]
fn bad_inputs_fail_clearly_and_leave_nothing() {
    if !guest_available() {
        return;
    }
    let _lock = vm_lock();
    let fds = fd_count();

    let missing = SandboxConfig {
        kernel: "/nonexistent/vmlinux".into(),
        ..SandboxConfig::default()
    };
    let err = Sandbox::boot(&missing).unwrap_err();
    let text = format!("{:#}", anyhow::Error::from(err));
    assert!(text.contains("/nonexistent/vmlinux"), "{text}");

    let garbage = TempFile::new("garbage-kernel", &[0x5a; 64 << 10]);
    let corrupt = SandboxConfig {
        kernel: garbage.path().into(),
        ..SandboxConfig::default()
    };
    match Sandbox::boot(&corrupt).unwrap_err() {
        SandboxError::Build(BuildError::Boot(e)) => {
            assert!(e.to_string().contains("not a loadable kernel"), "{e}")
        }
        other => panic!("unexpected error {other:?}"),
    }

    // A truncated kernel: a real ELF header whose segments are cut off.
    let real = std::fs::read(zygote::paths::kernel()).unwrap();
    let truncated = TempFile::new("truncated-kernel", &real[..real.len() / 3]);
    let cut = SandboxConfig {
        kernel: truncated.path().into(),
        ..SandboxConfig::default()
    };
    assert!(matches!(
        Sandbox::boot(&cut).unwrap_err(),
        SandboxError::Build(BuildError::Boot(_))
    ));

    for mib in [0, 1 << 30] {
        let impossible = SandboxConfig {
            memory_mib: mib,
            ..SandboxConfig::default()
        };
        match Sandbox::boot(&impossible).unwrap_err() {
            SandboxError::Build(BuildError::Memory(e)) => {
                assert!(e.to_string().contains("out of range"), "{e}")
            }
            other => panic!("unexpected error for {mib} MiB: {other:?}"),
        }
    }
    let vcpus = SandboxConfig {
        vcpus: 0,
        ..SandboxConfig::default()
    };
    assert!(matches!(
        Sandbox::boot(&vcpus).unwrap_err(),
        SandboxError::Build(BuildError::InvalidVcpus(0))
    ));

    let no_image = SandboxConfig {
        initramfs: "/nonexistent/initramfs".into(),
        ..SandboxConfig::default()
    };
    assert!(matches!(
        Sandbox::boot(&no_image).unwrap_err(),
        SandboxError::MissingImage(_)
    ));

    assert!(
        own_run_dirs().is_empty(),
        "left behind: {:?}",
        own_run_dirs()
    );
    assert_eq!(vmm_thread_count(), 0, "no VMM thread left running");
    assert_eq!(fd_count(), fds, "no fd left open");
}

/// This process's anonymous resident memory (the VMM's, here), KiB.
fn rss_anon_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("RssAnon:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .expect("RssAnon in /proc/self/status")
}
