//! Templates are network-neutral and a fork keeps nothing of the template's
//! connections: a template whose guest held an established TCP connection
//! (to an address it had for a moment, then gave up, so the template leaves
//! with its NIC down and unaddressed) is forked twice; in both forks the
//! reconcile destroys both ends of that connection, and the guest then sees
//! none established. The NIC every VM has is there without a link.

use std::time::Duration;

use zygote::reconcile::{ReconcileSpec, reconcile};
use zygote::sandbox::{Sandbox, SandboxConfig};
use zygote::template::BuildSpec;
use zygote_agent_api::Spawn;
use zygote_tests::{guest_available, guest_stdout, initramfs_with, scratch_dir, vm_lock};
use zygote_vmm::snapshot::{Template, TemplateName, TemplateStore};

const TIMEOUT: Duration = Duration::from_secs(120);

#[test]
fn connections_from_the_template_are_dead_in_every_fork() {
    if !guest_available() {
        return;
    }
    let dir = scratch_dir("template-network");
    let image = initramfs_with("tcp", &[]);
    let store = TemplateStore::new(dir.join("templates"));
    let spec = BuildSpec {
        mounts: vec![],
        name: TemplateName::new("tcp").unwrap(),
        sandbox: SandboxConfig {
            // Built and driven through the agent's debug requests (Exec, Spawn).
            debug_requests: true,
            initramfs: image.path().into(),
            ..Default::default()
        },
        // Both ends are held by idle sleeps (`nc -e`): nothing moves on the
        // connection, it only exists.
        spawn: vec![Spawn {
            argv: [
                "/bin/busybox",
                "nc",
                "-l",
                "-p",
                "7000",
                "-e",
                "/bin/busybox",
                "sleep",
                "1000000",
            ]
            .map(String::from)
            .to_vec(),
            cwd: "/tmp".into(),
            ..Default::default()
        }],
        warm: vec![
            [
                "/bin/busybox",
                "sh",
                "-c",
                "ip link set eth0 up && ip addr add 198.19.99.1/32 dev eth0 \
             && (nc 198.19.99.1 7000 -e sleep 1000000 </dev/null >/dev/null 2>&1 &) \
             && i=0; until netstat -tn | grep -q '198.19.99.1:7000 *ESTABLISHED'; do \
                i=$((i+1)); [ $i -gt 100 ] && exit 1; sleep 0.2; done \
             && ip addr del 198.19.99.1/32 dev eth0 && ip link set eth0 down",
            ]
            .map(String::from)
            .to_vec(),
        ],
        settle: Duration::from_secs(1),
        stage: None,
        force: true,
    };
    let _vm = vm_lock();
    let report = zygote_tests::build_template(&store, &spec);
    drop(image);
    let template = Template::open(&report.dir).unwrap();
    for name in ["fork-a", "fork-b"] {
        let fork = Sandbox::fork(&template, TIMEOUT).expect("fork");
        // In the fork as in the template: the NIC is down, without address.
        let nic = guest_stdout(&fork, "ip -o link show eth0; ip -o addr show eth0");
        assert!(
            !nic.contains("inet ") && !nic.contains(",UP"),
            "{name}: {nic}"
        );
        let outcome = reconcile(
            &mut fork.client().unwrap(),
            &ReconcileSpec {
                generation: 1,
                hostname: name.into(),
                ..Default::default()
            },
        )
        .expect("reconcile");
        let network = outcome
            .report
            .steps
            .iter()
            .find(|s| s.name == "network")
            .expect("a network step");
        eprintln!("{name}: {}", network.detail);
        assert!(
            network
                .detail
                .contains("2 TCP connections from before the fork destroyed"),
            "{name}: {}",
            network.detail
        );
        let established = guest_stdout(&fork, "netstat -tn | grep -c ESTABLISHED || true");
        assert_eq!(established, "0", "{name}: connections left");
        fork.kill();
    }
}
