//! The shim keeps answering while requests wait on the guest: with a pod
//! VM's guest frozen (its vCPU threads stopped), an exec's `Start`, a
//! `Stats` and a `Kill` are in flight, waiting on the agent, and `State` —
//! answered from the shim's own table — still answers (no lock is held
//! across an agent call); once the guest runs again all three complete.
//! Talks to the shim's socket (the bundle's `address`) as containerd does.

use std::time::Duration;

use containerd_shim_protos::api::{
    ExecProcessRequest, KillRequest, StartRequest, StateRequest, StatsRequest, Status,
};
use containerd_shim_protos::protobuf::well_known_types::any::Any;
use containerd_shim_protos::shim_async::{Client, TaskClient};
use containerd_shim_protos::ttrpc::context::{Context, with_timeout};
use zygote_tests::ctr::*;
use zygote_tests::vm_lock;

fn within(seconds: i64) -> Context {
    with_timeout(seconds * 1_000_000_000)
}

fn exec_spec(argv: &[&str]) -> Any {
    let process = serde_json::json!({
        "args": argv,
        "cwd": "/",
        "env": ["PATH=/bin:/usr/bin"],
        "user": {"uid": 0, "gid": 0},
    });
    Any {
        type_url: "types.containerd.io/opencontainers/runtime-spec/1/Process".into(),
        value: serde_json::to_vec(&process).unwrap(),
        ..Default::default()
    }
}

#[test]
fn state_answers_while_start_stats_and_kill_wait_on_a_frozen_guest() {
    if !containerd_available() {
        return;
    }
    let _vm = vm_lock();
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
        .block_on(requests_while_frozen());
}

async fn requests_while_frozen() {
    let id = cid("inflight");
    cleanup(&id);
    let _removed = Removed(id.clone());
    let run = zygote_run(&["-d"], &id, &["sleep", "1000"]);
    assert!(run.status.success(), "{}", text(&run.stderr));
    let address = std::fs::read_to_string(bundle_dir(&id).join("address")).unwrap();
    let task = TaskClient::new(Client::connect(address.trim()).await.unwrap());
    let exec = ExecProcessRequest {
        id: id.clone(),
        exec_id: "late".into(),
        spec: Some(exec_spec(&["sleep", "1000"])).into(),
        ..Default::default()
    };
    task.exec(within(60), &exec).await.unwrap();

    let shim = shim_pids(&id);
    assert_eq!(shim.len(), 1);
    let frozen = FrozenGuest::freeze(shim[0]);
    let start = tokio::spawn({
        let (task, req) = (
            task.clone(),
            StartRequest {
                id: id.clone(),
                exec_id: "late".into(),
                ..Default::default()
            },
        );
        async move { task.start(within(120), &req).await }
    });
    let stats = tokio::spawn({
        let (task, req) = (
            task.clone(),
            StatsRequest {
                id: id.clone(),
                ..Default::default()
            },
        );
        async move { task.stats(within(120), &req).await }
    });
    let kill = tokio::spawn({
        // SIGWINCH: ignored by sleep; it still has to reach the guest.
        let (task, req) = (
            task.clone(),
            KillRequest {
                id: id.clone(),
                signal: libc::SIGWINCH as u32,
                ..Default::default()
            },
        );
        async move { task.kill(within(120), &req).await }
    });
    // Let the three reach the shim and the agent's (frozen) side.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let state = |exec_id: &str| StateRequest {
        id: id.clone(),
        exec_id: exec_id.into(),
        ..Default::default()
    };
    let init = task
        .state(within(10), &state(""))
        .await
        .expect("State answers while Start, Stats and Kill wait on the guest");
    assert_eq!(init.status.enum_value(), Ok(Status::RUNNING));
    let late = task.state(within(10), &state("late")).await.unwrap();
    assert_eq!(late.status.enum_value(), Ok(Status::CREATED));
    for (name, call) in [
        ("Start", start.is_finished()),
        ("Stats", stats.is_finished()),
        ("Kill", kill.is_finished()),
    ] {
        assert!(
            !call,
            "{name} finished with the guest frozen: it never asked the agent"
        );
    }

    drop(frozen);
    let started = start
        .await
        .unwrap()
        .expect("Start completes once the guest runs");
    assert_ne!(started.pid, 0);
    stats
        .await
        .unwrap()
        .expect("Stats completes once the guest runs");
    kill.await
        .unwrap()
        .expect("Kill completes once the guest runs");
    let late = task.state(within(10), &state("late")).await.unwrap();
    assert_eq!(late.status.enum_value(), Ok(Status::RUNNING));
    let kill_late = KillRequest {
        id: id.clone(),
        exec_id: "late".into(),
        signal: libc::SIGKILL as u32,
        ..Default::default()
    };
    task.kill(within(60), &kill_late).await.unwrap();
}
