//! A container given a network namespace by path (`ctr run --with-ns
//! network:PATH`, as a CRI pause container is): its VM's NIC takes the
//! namespace's interface through a tap; every way out — the task's end, a
//! shim killed with SIGKILL and containerd's `shim delete` — leaves the
//! namespace as it was; and a namespace the VM cannot take is a clear error
//! with nothing left behind.

use std::time::{Duration, Instant};

use zygote_tests::ctr::{
    Removed, cid, cleanup, containerd_available, shim_pids, text, vm_run_dirs, zygote_run,
};
use zygote_tests::netns::ScratchNs;
use zygote_tests::vm_lock;

#[test]
fn a_container_takes_its_namespace_and_leaves_it_as_it_was() {
    if !containerd_available() {
        return;
    }
    let _vm = vm_lock();
    let ns = ScratchNs::new("take").with_interface(21);
    let links_before = ns.links();
    let id = cid("netns-take");
    cleanup(&id);
    let _removed = Removed(id.clone());
    let with_ns = format!("network:{}", ns.path().display());
    let run = zygote_run(
        &["--rm", "--with-ns", &with_ns],
        &id,
        &[
            "sh",
            "-c",
            "ip -o -4 addr show eth0; ping -c 1 -W 10 198.19.21.1 >/dev/null && echo reached-host",
        ],
    );
    let out = text(&run.stdout);
    assert!(run.status.success(), "{out} {}", text(&run.stderr));
    assert!(
        out.contains("inet 198.19.21.2/24"),
        "the VM took eth0's address: {out}"
    );
    assert!(out.contains("reached-host"), "{out}");
    assert_eq!(ns.wiring_left(), None, "the task's end undid the wiring");
    assert_eq!(ns.links(), links_before);
}

#[test]
fn a_killed_shim_leaves_the_namespace_as_it_was_after_shim_delete() {
    if !containerd_available() {
        return;
    }
    let _vm = vm_lock();
    let ns = ScratchNs::new("kill").with_interface(22);
    let id = cid("netns-kill");
    cleanup(&id);
    let _removed = Removed(id.clone());
    let with_ns = format!("network:{}", ns.path().display());
    let run = zygote_run(&["-d", "--with-ns", &with_ns], &id, &["sleep", "1000"]);
    assert!(run.status.success(), "{}", text(&run.stderr));
    let wired = ns.wiring_left().expect("a running pod VM is wired in");
    assert!(
        wired.contains("zygote-tap0") && wired.contains("ingress"),
        "{wired}"
    );
    let shims = shim_pids(&id);
    assert_eq!(shims.len(), 1);
    // SAFETY: kill(2) of the shim process found above.
    unsafe { libc::kill(shims[0] as i32, libc::SIGKILL) };
    let deadline = Instant::now() + Duration::from_secs(30);
    while !shim_pids(&id).is_empty() {
        assert!(Instant::now() < deadline, "the shim did not die");
        std::thread::sleep(Duration::from_millis(100));
    }
    // The tap went with the shim's fds; the filters stay until `shim delete`.
    cleanup(&id);
    assert_eq!(ns.wiring_left(), None, "`shim delete` undid the wiring");
}

#[test]
fn namespaces_a_vm_cannot_take_are_clear_errors_with_nothing_left() {
    if !containerd_available() {
        return;
    }
    let _vm = vm_lock();
    let runs_before = vm_run_dirs();
    let empty = ScratchNs::new("empty");
    let v6 = ScratchNs::new("v6").with_interface(23);
    zygote_tests::netns::ip(&format!(
        "-n {} addr add 2001:db8::2/64 dev eth0 nodad",
        v6.name
    ));
    let taken = ScratchNs::new("taken").with_interface(24);
    zygote_tests::netns::ip(&format!(
        "-n {} link add zygote-tap0 type veth peer name zt-peer",
        taken.name
    ));
    let cases: [(&str, String, &str); 4] = [
        (
            "missing",
            "/var/run/netns/zygote-no-such-ns".into(),
            "cannot open network namespace",
        ),
        (
            "empty",
            empty.path().display().to_string(),
            "no interface besides loopback",
        ),
        (
            "v6",
            v6.path().display().to_string(),
            "zygote guests take IPv4 only",
        ),
        (
            "taken",
            taken.path().display().to_string(),
            "cannot create the pod's tap",
        ),
    ];
    for (tag, path, expected) in cases {
        let id = cid(&format!("netns-{tag}"));
        cleanup(&id);
        let _removed = Removed(id.clone());
        let with_ns = format!("network:{path}");
        let run = zygote_run(&["--rm", "--with-ns", &with_ns], &id, &["true"]);
        let err = text(&run.stderr);
        assert!(!run.status.success(), "{tag}: accepted");
        assert!(err.contains(expected), "{tag}: {err}");
        eprintln!("{tag}: {}", err.trim());
        cleanup(&id);
        assert!(shim_pids(&id).is_empty(), "{tag}: shim left");
    }
    for ns in [&empty, &v6, &taken] {
        assert_eq!(ns.wiring_left(), None, "{}", ns.name);
    }
    assert!(
        taken.links().contains("zygote-tap0@zt-peer"),
        "a link that is not ours stays"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while vm_run_dirs().len() > runs_before.len() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(vm_run_dirs(), runs_before, "no VM run directory left");
}
