//! The reconcile on real forks: two forks of one template (taken ≥ 5 s
//! earlier) get different entropy, the host's time, their own identity, and a
//! Go program started in the template — detected by its build info, not its
//! name — is restarted so that the two forks' values differ (with `keep` they
//! do not). busybox is classified native and kept.

use std::sync::OnceLock;
use std::time::Duration;

use zygote::reconcile::{ReconcileOutcome, ReconcileSpec, measure_offset, reconcile};
use zygote::sandbox::{Sandbox, SandboxConfig};
use zygote::template::{BuildSpec, TemplateMeta};
use zygote_agent_api::{Action, PolicyRule, Spawn};
use zygote_tests::{
    build_gorand, guest_available, guest_stdout, initramfs_with, scratch_dir, vm_lock,
};
use zygote_vmm::snapshot::{Template, TemplateName, TemplateStore};

const TIMEOUT: Duration = Duration::from_secs(120);

struct Fixture {
    template: Template,
    meta: TemplateMeta,
    go_version: String,
}

fn spawn_spec(argv: &[&str]) -> Spawn {
    Spawn {
        argv: argv.iter().map(|s| s.to_string()).collect(),
        env: vec!["GOMAXPROCS=1".into()],
        cwd: "/tmp".into(),
        ..Default::default()
    }
}

/// A template with two Go programs (normal and stripped) and a busybox sleep
/// running, at least 5 s old when returned.
fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let dir = scratch_dir("reconcile");
        let (normal, stripped) = build_gorand(&dir.join("go"));
        let image = initramfs_with(
            "gorand",
            &[
                ("/opt/gorand", &normal),
                ("/opt/gorand-stripped", &stripped),
            ],
        );
        // The image file must outlive the fixture's build only.
        let store = TemplateStore::new(dir.join("templates"));
        let name = TemplateName::new("gorand").unwrap();
        let spec = BuildSpec {
            mounts: vec![],
            name: name.clone(),
            sandbox: SandboxConfig {
                // Built and driven through the agent's debug requests (Exec, Spawn).
                debug_requests: true,
                initramfs: image.path().into(),
                ..Default::default()
            },
            spawn: vec![
                spawn_spec(&["/opt/gorand", "/tmp/g1"]),
                spawn_spec(&["/opt/gorand-stripped", "/tmp/g2"]),
                spawn_spec(&["/bin/busybox", "sleep", "1000000"]),
            ],
            warm: vec![vec![
                "/bin/busybox".into(),
                "sh".into(),
                "-c".into(),
                "i=0; while [ ! -s /tmp/g1.out -o ! -s /tmp/g2.out ]; do i=$((i+1)); \
                 [ $i -gt 300 ] && exit 1; sleep 0.2; done"
                    .into(),
            ]],
            settle: Duration::from_secs(1),
            stage: None,
            force: true,
        };
        let report = {
            let _vm = vm_lock();
            zygote_tests::build_template(&store, &spec)
        };
        drop(image);
        // The template must be at least 5 s old when forked.
        std::thread::sleep(Duration::from_secs(5));
        let out = std::process::Command::new("go")
            .arg("version")
            .output()
            .unwrap();
        let go_version = String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .nth(2)
            .unwrap()
            .to_string();
        Fixture {
            template: Template::open(&report.dir).unwrap(),
            meta: report.meta,
            go_version,
        }
    })
}

/// Asks gorand at `base` for a value and returns the newest one (no shell
/// pipeline: on PVM each extra concurrent guest process risks the known
/// segfault residue).
fn go_value(sandbox: &Sandbox, base: &str) -> String {
    guest_stdout(
        sandbox,
        &format!(
            "touch {base}.req; i=0; while [ -e {base}.req ]; do i=$((i+1)); [ $i -gt 300 ] && exit 1; \
             sleep 0.1; done; sleep 0.3"
        ),
    );
    let out = guest_stdout(sandbox, &format!("cat {base}.out"));
    out.lines()
        .rfind(|l| l.starts_with("value "))
        .unwrap_or_else(|| panic!("no value in {base}.out: {out}"))
        .to_string()
}

/// The fork's realtime skew after its reconcile, ms, from a measurement
/// whose uncertainty (half its round trip) is at most 25 ms: the reconcile's
/// own figure if it is, else measured again once the guest settles (right
/// after the reconcile the restarted programs start, and on PVM their
/// emulated kernel work delays the agent's answers; nothing steps the guest's
/// clock meanwhile, so a drift would still show).
fn settled_skew(fork: &Sandbox, r: &ReconcileOutcome) -> f64 {
    let (mut skew, mut uncertainty) = (r.realtime_skew_ms, r.realtime_uncertainty_ms);
    let mut client = fork.client().unwrap();
    for _ in 0..10 {
        if uncertainty <= 25.0 {
            return skew;
        }
        eprintln!("skew {skew:.1} ± {uncertainty:.1} ms: measuring again");
        std::thread::sleep(Duration::from_secs(1));
        // No idle round trip given: it samples for up to 5 s and keeps the
        // shortest round trip.
        let o = measure_offset(&mut client, Duration::ZERO).unwrap();
        (skew, uncertainty) = (o.offset_ns as f64 / 1e6, o.round_trip_ns as f64 / 2e6);
    }
    panic!("no measurement within ± 25 ms (last: {skew:.1} ± {uncertainty:.1} ms)");
}

fn fork_and_reconcile(
    f: &Fixture,
    host: &str,
    policy: Vec<PolicyRule>,
) -> (Sandbox, ReconcileOutcome) {
    let sandbox = Sandbox::fork(&f.template, TIMEOUT).expect("fork");
    let spec = ReconcileSpec {
        generation: 1,
        hostname: host.into(),
        policy,
        dns: vec!["10.0.0.53".into()],
        ..Default::default()
    };
    let outcome = reconcile(&mut sandbox.client().unwrap(), &spec).expect("reconcile");
    (sandbox, outcome)
}

/// A fork reconciled with the default policy. The template's build checked
/// that every process it spawned was still running at the snapshot (one
/// that died is rebuilt only for the PVM fault's own status, SIGSEGV), so a
/// process missing from a fork's audit is a failure.
fn fork_with_its_processes(f: &Fixture, host: &str) -> (Sandbox, ReconcileOutcome) {
    fork_and_reconcile(f, host, vec![])
}

#[test]
fn two_forks_become_two_machines_and_go_is_restarted() {
    if !guest_available() {
        return;
    }
    let f = fixture();
    let _vm = vm_lock();
    let (a, ra) = fork_with_its_processes(f, "fork-a");
    let (b, rb) = fork_with_its_processes(f, "fork-b");
    for (fork, r, host) in [(&a, &ra, "fork-a"), (&b, &rb, "fork-b")] {
        let report = &r.report;
        eprintln!(
            "{host}: {report:#?}\nskew {:.1} ± {:.1} ms after corrections {:?} ms",
            r.realtime_skew_ms, r.realtime_uncertainty_ms, r.clock_corrections_ms
        );
        assert!(!report.unchanged);
        // Clock: the host's time, within 50 ms; monotonic continued from the snapshot.
        let skew = settled_skew(fork, r);
        assert!(skew.abs() < 50.0, "skew {skew} ms");
        let sample = r.sample.as_ref().expect("sampled");
        let ran = sample.boottime_ns.saturating_sub(f.meta.snapshot_uptime_ns);
        assert!(
            ran < 30_000_000_000,
            "boottime jumped by {ran} ns over the snapshot"
        );
        // Identity.
        assert_eq!(sample.hostname, host);
        assert_eq!(sample.machine_id, r.machine_id);
        assert_eq!(
            guest_stdout(fork, "cat /etc/resolv.conf"),
            "nameserver 10.0.0.53"
        );
        // Processes: both Go programs found by what they are, restarted; busybox kept.
        let go: Vec<_> = report
            .processes
            .iter()
            .filter(|p| p.class == "go")
            .collect();
        assert_eq!(go.len(), 2, "{:?}", report.processes);
        for p in &go {
            assert_eq!(p.runtime_version, f.go_version);
            assert_eq!(p.evidence, ".go.buildinfo section");
            assert_eq!(p.action, Action::Restart as i32);
            assert!(p.new_pid != 0 && p.new_pid != p.pid, "{p:?}");
        }
        let native: Vec<_> = report
            .processes
            .iter()
            .filter(|p| p.exe.ends_with("busybox"))
            .collect();
        assert_eq!(native.len(), 1, "{:?}", report.processes);
        assert_eq!(native[0].class, "native");
        assert_eq!(native[0].action, Action::Keep as i32);
        // The same generation again changes nothing.
        let again = reconcile(
            &mut fork.client().unwrap(),
            &ReconcileSpec {
                generation: 1,
                hostname: host.into(),
                ..Default::default()
            },
        )
        .unwrap();
        assert!(again.report.unchanged);
    }
    // Entropy: the two kernels' outputs differ.
    let (sa, sb) = (ra.sample.as_ref().unwrap(), rb.sample.as_ref().unwrap());
    assert_ne!(sa.random, sb.random);
    assert_ne!(sa.uuid, sb.uuid);
    // The restarted Go programs were seeded anew in each fork.
    for base in ["/tmp/g1", "/tmp/g2"] {
        let (va, vb) = (go_value(&a, base), go_value(&b, base));
        eprintln!("{base}: {va} / {vb}");
        assert!(va.starts_with("value "));
        assert_ne!(va, vb, "{base}: restarted programs must differ");
    }
}

#[test]
fn with_keep_the_go_programs_stay_clones() {
    if !guest_available() {
        return;
    }
    let f = fixture();
    let keep = vec![PolicyRule {
        class: "go".into(),
        action: Action::Keep as i32,
        signal: 0,
    }];
    let _vm = vm_lock();
    let (c, rc) = fork_and_reconcile(f, "fork-c", keep.clone());
    let (d, _rd) = fork_and_reconcile(f, "fork-d", keep);
    let go: Vec<_> = rc
        .report
        .processes
        .iter()
        .filter(|p| p.class == "go")
        .collect();
    assert_eq!(go.len(), 2);
    assert!(
        go.iter()
            .all(|p| p.action == Action::Keep as i32 && p.new_pid == 0)
    );
    for base in ["/tmp/g1", "/tmp/g2"] {
        let (vc, vd) = (go_value(&c, base), go_value(&d, base));
        assert!(vc.starts_with("value "));
        assert_eq!(
            vc, vd,
            "{base}: kept programs are clones and print the same value"
        );
    }
}
