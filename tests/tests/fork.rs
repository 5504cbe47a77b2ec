//! Templates and forks on the real /dev/kvm with the real guest kernel: a fork
//! runs from where the template stopped, forks are isolated from each other and
//! from the template file, many run at once on little memory, and bad templates
//! are refused without starting anything.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use zygote::sandbox::Sandbox;
use zygote::template::read_meta;
use zygote_tests::{
    TEMPLATE_MARKER, Tmpfs, guest_available, guest_stdout, own_run_dirs, test_template, vm_lock,
    vmm_thread_count, zygote_bin,
};
use zygote_vmm::snapshot::state_file::{read_state, write_state};
use zygote_vmm::snapshot::template::{MEMORY_FILE, META_FILE, STATE_FILE};
use zygote_vmm::snapshot::{MachineState, Template, TemplateName, TemplateStore};

const AGENT_TIMEOUT: Duration = Duration::from_secs(120);

fn template() -> Template {
    let (store, name) = test_template();
    Template::open(&store.dir(name)).expect("the test template opens")
}

/// Copies a template directory (sparse) into `store` under `name`.
fn copy_template(from: &Path, store: &TemplateStore, name: &str) -> std::path::PathBuf {
    let dest = store.dir(&TemplateName::new(name).unwrap());
    std::fs::create_dir_all(store.root()).unwrap();
    let status = Command::new("cp")
        .args(["-r", "--sparse=always"])
        .arg(from)
        .arg(&dest)
        .status()
        .unwrap();
    assert!(status.success(), "cp template");
    dest
}

#[test]
fn a_fork_runs_from_where_the_template_stopped() {
    if !guest_available() {
        return;
    }
    let t = template();
    let meta = read_meta(t.dir()).unwrap();
    // Let the template age, so that a clock that jumped by its age would show.
    let age = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        .saturating_sub(meta.created_unix_s);
    if age < 5 {
        std::thread::sleep(Duration::from_secs(5 - age));
    }
    let _vm = vm_lock();
    let fork = Sandbox::fork(&t, AGENT_TIMEOUT).expect("fork");
    // The same agent process, continuing: its start time is the template's.
    assert_eq!(fork.pong.agent_started_ns, meta.agent_started_ns);
    // The guest's clock continues from the snapshot: it did not jump by the
    // template's age (≥ 5 s); it only ran for the fork's own time.
    let ran = Duration::from_nanos(fork.pong.uptime_ns.saturating_sub(meta.snapshot_uptime_ns));
    assert!(fork.pong.uptime_ns + 500_000_000 > meta.snapshot_uptime_ns);
    assert!(
        ran < Duration::from_secs(4),
        "guest uptime jumped by {ran:?} over the snapshot (template {age} s old)"
    );
    let timeline = fork.fork.expect("fork timeline");
    eprintln!(
        "fork ready in {:.1} ms (host {:.2} ms)",
        timeline.ready_ms, timeline.host_ms
    );
    // The template's files (in the guest's tmpfs: its memory) are there.
    assert_eq!(guest_stdout(&fork, "cat /tmp/marker"), TEMPLATE_MARKER);
    // And the agent keeps serving new connections after the reset.
    for _ in 0..3 {
        let mut c = fork.client().unwrap();
        assert_eq!(c.ping().unwrap().agent_started_ns, meta.agent_started_ns);
    }
    drop(fork);
    assert!(own_run_dirs().is_empty(), "{:?}", own_run_dirs());
}

#[test]
fn forks_are_isolated_and_the_template_file_never_changes() {
    if !guest_available() {
        return;
    }
    let t = template();
    let memory = t.dir().join(MEMORY_FILE);
    let mtime = std::fs::metadata(&memory).unwrap().mtime_nsec();
    t.verify().expect("template intact before");
    let _vm = vm_lock();
    let a = Sandbox::fork(&t, AGENT_TIMEOUT).expect("fork a");
    let b = Sandbox::fork(&t, AGENT_TIMEOUT).expect("fork b");
    assert_eq!(
        guest_stdout(&a, "echo fork-a > /tmp/marker; cat /tmp/marker"),
        "fork-a"
    );
    assert_eq!(
        guest_stdout(&b, "cat /tmp/marker"),
        TEMPLATE_MARKER,
        "B does not see A's write"
    );
    assert_eq!(
        guest_stdout(&b, "echo fork-b > /tmp/marker; cat /tmp/marker"),
        "fork-b"
    );
    assert_eq!(
        guest_stdout(&a, "cat /tmp/marker"),
        "fork-a",
        "A does not see B's write"
    );
    drop((a, b));
    for i in 2..10 {
        let f = Sandbox::fork(&t, AGENT_TIMEOUT).expect("fork");
        let script = format!("cat /tmp/marker; echo fork-{i} > /tmp/marker; cat /tmp/marker");
        assert_eq!(
            guest_stdout(&f, &script),
            format!("{TEMPLATE_MARKER}\nfork-{i}")
        );
    }
    // Ten forks ran and wrote; the template file is byte for byte what it was.
    t.verify().expect("template intact after 10 forks wrote");
    assert_eq!(std::fs::metadata(&memory).unwrap().mtime_nsec(), mtime);
}

#[test]
fn sixteen_concurrent_forks_answer_on_a_fraction_of_their_memory() {
    if !guest_available() {
        return;
    }
    let (store, name) = test_template();
    let meta = read_meta(&store.dir(name)).unwrap();
    let _vm = vm_lock();
    let v = zygote_json(
        store.root(),
        &["fork", name.as_str(), "--count", "16", "--json"],
    );
    assert_eq!(v["failed"], 0);
    let forks = v["forks"].as_array().unwrap();
    assert_eq!(forks.len(), 16);
    assert!(
        forks
            .iter()
            .all(|f| f["agent_started_ns"] == meta.agent_started_ns)
    );
    let pss = v["pss_mib"].as_f64().unwrap();
    let guest_total = 16.0 * meta.memory_mib as f64;
    eprintln!(
        "16 forks: process PSS {pss:.1} MiB = {:.1}% of 16 x {} MiB guest RAM",
        100.0 * pss / guest_total,
        meta.memory_mib
    );
    assert!(pss < guest_total / 10.0, "PSS {pss} MiB for 16 forks");
}

#[test]
fn bad_templates_are_refused_and_start_nothing() {
    if !guest_available() {
        return;
    }
    let t = template();
    let root = std::env::temp_dir().join(format!("zygote-bad-templates-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let variant = |name: &str, patch: &dyn Fn(&Path)| -> std::path::PathBuf {
        let dir = root.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::copy(t.dir().join(STATE_FILE), dir.join(STATE_FILE)).unwrap();
        std::os::unix::fs::symlink(t.dir().join(MEMORY_FILE), dir.join(MEMORY_FILE)).unwrap();
        patch(&dir);
        dir
    };
    let patch_state = |offset: u64, bytes: &'static [u8]| {
        move |dir: &Path| {
            use std::os::unix::fs::FileExt;
            let f = std::fs::File::options()
                .write(true)
                .open(dir.join(STATE_FILE))
                .unwrap();
            let offset = if offset == u64::MAX {
                f.metadata().unwrap().len() - 1
            } else {
                offset
            };
            f.write_all_at(bytes, offset).unwrap();
        }
    };
    let rewrite = |f: fn(&mut MachineState)| {
        move |dir: &Path| {
            let mut state: MachineState = read_state(&dir.join(STATE_FILE)).unwrap();
            f(&mut state);
            std::fs::remove_file(dir.join(STATE_FILE)).unwrap();
            write_state(&dir.join(STATE_FILE), &state).unwrap();
        }
    };
    let cases: Vec<(std::path::PathBuf, &str)> = vec![
        (
            variant("truncated", &|dir: &Path| {
                std::fs::remove_file(dir.join(MEMORY_FILE)).unwrap();
                let f = std::fs::File::create(dir.join(MEMORY_FILE)).unwrap();
                f.set_len(t.state().memory.size / 2).unwrap();
            }),
            "truncated",
        ),
        (variant("magic", &patch_state(0, b"NOTAZYGO")), "bad magic"),
        (
            variant("version", &patch_state(8, &[99, 0, 0, 0])),
            "version 99",
        ),
        (
            variant("checksum", &patch_state(u64::MAX, b"\xff")),
            "corrupt",
        ),
        (
            variant("no-state", &|dir: &Path| {
                std::fs::remove_file(dir.join(STATE_FILE)).unwrap()
            }),
            "cannot open state file",
        ),
        (
            variant(
                "kind",
                &rewrite(|s| {
                    s.kind = match s.kind {
                        zygote_vmm::KvmKind::Pvm => zygote_vmm::KvmKind::Hardware,
                        zygote_vmm::KvmKind::Hardware => zygote_vmm::KvmKind::Pvm,
                    }
                }),
            ),
            "template was taken on",
        ),
        (
            variant(
                "msr",
                &rewrite(|s| {
                    s.vcpus[0].msrs.push(kvm_msr(0x0bad_0bad));
                }),
            ),
            "refused to restore MSR 0xbad0bad",
        ),
        (
            variant("slot", &rewrite(|s| s.virtio[0].irq = 99)),
            "inconsistent",
        ),
    ];
    let _vm = vm_lock();
    // Holding the VM lock, no other test has a VM: nothing of KVM may stay open.
    let threads = vmm_thread_count();
    assert_eq!(kvm_fds(), 0);
    for (dir, expected) in cases {
        let err = match Template::open(&dir) {
            Err(e) => format!("{:#}", anyhow::Error::from(e)),
            Ok(template) => match Sandbox::fork(&template, AGENT_TIMEOUT) {
                Err(e) => format!("{:#}", anyhow::Error::from(e)),
                Ok(_) => panic!("{} forked", dir.display()),
            },
        };
        assert!(err.contains(expected), "{}: {err}", dir.display());
        eprintln!("{}: {err}", dir.file_name().unwrap().to_string_lossy());
        assert!(own_run_dirs().is_empty(), "{:?}", own_run_dirs());
        assert_eq!(
            vmm_thread_count(),
            threads,
            "threads left by {}",
            dir.display()
        );
        assert_eq!(kvm_fds(), 0, "KVM fds left by {}", dir.display());
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        assert!(
            !maps.contains(root.to_str().unwrap()),
            "a mapping of {} is left",
            dir.display()
        );
    }
    std::fs::remove_dir_all(&root).unwrap();
}

/// Runs `zygote --templates ROOT ARGS...`, which must succeed, and returns the
/// JSON of its last line of stdout.
fn zygote_json(root: &Path, args: &[&str]) -> serde_json::Value {
    let out = Command::new(zygote_bin())
        .arg("--templates")
        .arg(root)
        .args(args)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "zygote {args:?}: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.lines().last().unwrap_or_default()).unwrap()
}

/// File descriptors of this process on KVM (/dev/kvm, VMs, vCPUs).
fn kvm_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .flatten()
        .filter(|e| std::fs::read_link(e.path()).is_ok_and(|l| l.to_string_lossy().contains("kvm")))
        .count()
}

fn kvm_msr(index: u32) -> zygote_vmm::snapshot::KvmMsrEntry {
    zygote_vmm::snapshot::KvmMsrEntry {
        index,
        data: 0,
        ..Default::default()
    }
}

#[test]
fn a_removed_template_keeps_its_forks_running() {
    if !guest_available() {
        return;
    }
    let (store, name) = test_template();
    let mine = TemplateStore::new(
        std::env::temp_dir().join(format!("zygote-removed-{}", std::process::id())),
    );
    let _ = std::fs::remove_dir_all(mine.root());
    copy_template(&store.dir(name), &mine, "doomed");
    let zygote = |args: &[&str]| {
        Command::new(zygote_bin())
            .arg("--templates")
            .arg(mine.root())
            .args(args)
            .output()
            .unwrap()
    };
    let ls = zygote(&["template", "ls"]);
    assert!(String::from_utf8_lossy(&ls.stdout).contains("doomed"));
    let verify = zygote(&["template", "verify", "doomed"]);
    assert!(
        verify.status.success(),
        "{}",
        String::from_utf8_lossy(&verify.stderr)
    );

    let t = Template::open(&mine.dir(&TemplateName::new("doomed").unwrap())).unwrap();
    let _vm = vm_lock();
    let fork = Sandbox::fork(&t, AGENT_TIMEOUT).expect("fork");
    let rm = zygote(&["template", "rm", "doomed"]);
    assert!(
        rm.status.success(),
        "{}",
        String::from_utf8_lossy(&rm.stderr)
    );
    assert!(!mine.dir(&TemplateName::new("doomed").unwrap()).exists());
    // The running fork still reads pages it never touched: its mapping holds the file.
    assert_eq!(
        guest_stdout(&fork, "cat /tmp/marker; ls /bin | wc -l > /dev/null"),
        TEMPLATE_MARKER
    );
    assert_eq!(
        fork.client().unwrap().ping().unwrap().agent_started_ns,
        fork.pong.agent_started_ns
    );
    // A new fork of it is refused with a clear error.
    let out = zygote(&["fork", "doomed"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no template doomed") && err.contains("zygote template build"),
        "{err}"
    );
    let out = zygote(&["template", "verify", "doomed"]);
    assert_eq!(out.status.code(), Some(1));
    drop(fork);
    std::fs::remove_dir_all(mine.root()).unwrap();
}

#[test]
fn a_full_disk_while_writing_a_template_leaves_the_old_one_usable() {
    if !guest_available() {
        return;
    }
    let (store, name) = test_template();
    let source = store.dir(name);
    let used_mib = (std::fs::metadata(source.join(MEMORY_FILE))
        .unwrap()
        .blocks()
        * 512)
        >> 20;
    // Room for the old template and 8 MiB more: a second one cannot fit.
    let disk = Tmpfs::mount("full", used_mib + 8);
    let small = TemplateStore::new(disk.0.join("templates"));
    copy_template(&source, &small, "old");
    let old = TemplateName::new("old").unwrap();
    let t = template();
    let _vm = vm_lock();
    // Snapshot a running fork over the old template: the disk fills up.
    let fork = Sandbox::fork(&t, AGENT_TIMEOUT).expect("fork");
    let lock = small.lock(&old).unwrap();
    let err = small
        .install(&lock, |dir: &Path| fork.snapshot_into(dir))
        .expect_err("the disk is too small");
    let text = format!("{:#}", anyhow::Error::from(err));
    assert!(text.contains("No space left on device"), "{text}");
    drop(lock);
    // Nothing half-written is left; the old template is intact and forks.
    let names: Vec<String> = std::fs::read_dir(small.root())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !n.ends_with(".lock"))
        .collect();
    assert_eq!(names, vec!["old".to_string()]);
    let old_t = Template::open(&small.dir(&old)).unwrap();
    old_t.verify().expect("old template intact");
    assert!(read_meta(old_t.dir()).is_ok() && old_t.dir().join(META_FILE).exists());
    let again = Sandbox::fork(&old_t, AGENT_TIMEOUT).expect("fork of the old template");
    assert_eq!(guest_stdout(&again, "cat /tmp/marker"), TEMPLATE_MARKER);
    drop(again);
    drop(old_t);
    assert!(own_run_dirs().is_empty());
}

#[test]
fn a_two_vcpu_template_built_by_the_cli_forks_with_both_cpus_running() {
    if !guest_available() {
        return;
    }
    let store = TemplateStore::new(
        std::env::temp_dir().join(format!("zygote-two-vcpus-{}", std::process::id())),
    );
    let _ = std::fs::remove_dir_all(store.root());
    let _vm = vm_lock();
    let image = zygote_tests::busybox_initramfs();
    let build = [
        "template",
        "build",
        "--name",
        "two",
        "--vcpus",
        "2",
        "--json",
        "--initramfs",
        image.to_str().unwrap(),
    ];
    let built = zygote_json(store.root(), &build);
    assert_eq!(built["vcpus"], 2);
    assert_eq!(built["reused"], false);
    // A second build of the same template reuses it.
    let again = zygote_json(store.root(), &build);
    assert_eq!(again["reused"], true);

    let t = Template::open(&store.dir(&TemplateName::new("two").unwrap())).unwrap();
    assert_eq!(t.state().vcpus.len(), 2);
    let fork = Sandbox::fork(&t, AGENT_TIMEOUT).expect("fork");
    let ticks = |f: &Sandbox| -> Vec<u64> {
        guest_stdout(f, "grep -E '^cpu[01] ' /proc/stat")
            .lines()
            .map(|l| {
                l.split_whitespace()
                    .skip(1)
                    .map(|n| n.parse::<u64>().unwrap())
                    .sum()
            })
            .collect()
    };
    assert_eq!(guest_stdout(&fork, "grep -c ^processor /proc/cpuinfo"), "2");
    let before = ticks(&fork);
    std::thread::sleep(Duration::from_secs(2));
    let after = ticks(&fork);
    assert_eq!(before.len(), 2);
    assert!(
        before.iter().zip(&after).all(|(b, a)| a > b),
        "both vCPUs' clocks tick after the fork: {before:?} -> {after:?}"
    );
    drop(fork);
    std::fs::remove_dir_all(store.root()).unwrap();
}
