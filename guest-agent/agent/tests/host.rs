//! The agent's logic on the host, fast: the self-test's children are real
//! execs of the built agent binary (and of host programs), as in the guest.

use zygote_agent::selftest::run_with;
use zygote_agent_api::{SelfTest, SelfTestReport};

fn agent() -> &'static std::path::Path {
    std::path::Path::new(env!("CARGO_BIN_EXE_zygote-agent"))
}

/// Runs `rounds` single-threaded rounds, one at a time, with `command` as the
/// echo child (empty: the agent's own), sending `bytes` (0: exit status only).
fn serial(rounds: u32, bytes: u32, command: &[&str]) -> SelfTestReport {
    let command = command.iter().map(|s| s.to_string()).collect();
    let t = SelfTest {
        rounds,
        threads_every: 0,
        parallel: 1,
        bytes,
        command,
    };
    run_with(agent(), &t)
}

#[test]
fn selftest_children_echo_and_threads_pass_on_the_host() {
    let t = SelfTest {
        rounds: 8,
        threads_every: 2,
        parallel: 2,
        bytes: 4096,
        command: vec![],
    };
    let r = run_with(agent(), &t);
    assert_eq!(
        (r.execs, r.ok, r.threaded, r.segfaults, r.other_failures),
        (8, 8, 4, 0, 0),
        "{:?}",
        r.failures
    );
}

#[test]
fn selftest_with_another_echo_program() {
    let r = serial(2, 1000, &["/bin/cat"]);
    assert_eq!(r.ok, 2, "{:?}", r.failures);
}

#[test]
fn selftest_counts_failures_without_retrying() {
    // Exit status only (bytes 0): `false` fails every round, a shell reporting 139 is a segfault.
    let r = serial(3, 0, &["/bin/false"]);
    assert_eq!((r.execs, r.ok, r.other_failures), (3, 0, 3));
    assert!(r.failures[0].contains("exit"), "{:?}", r.failures);

    let r = serial(2, 0, &["/bin/sh", "-c", "exit 139"]);
    assert_eq!((r.segfaults, r.other_failures), (2, 0));

    let r = serial(1, 0, &["/bin/sh", "-c", "kill -SEGV $$"]);
    assert_eq!(r.segfaults, 1, "{:?}", r.failures);

    let r = serial(1, 16, &["/bin/sh", "-c", "head -c 3"]);
    assert_eq!(
        r.other_failures, 1,
        "short echo is corruption: {:?}",
        r.failures
    );
}

#[test]
fn agent_binary_refuses_to_run_as_init_outside_a_vm() {
    let out = std::process::Command::new(agent()).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("PID 1"));
}
