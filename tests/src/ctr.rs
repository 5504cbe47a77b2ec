//! Driving hack/containerd's containerd with `ctr`, as the containerd tests
//! do: running zygote tasks, waiting for their states, cleaning up, and
//! freezing a pod VM's guest.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::PvmSegv;
use crate::{containerd_socket as socket, test_image as image};

/// The runtime `ctr run --runtime` names.
pub const RUNTIME: &str = "io.containerd.zygote.v2";

/// Whether hack/containerd's containerd answers (panics with how to start it
/// unless skipping is allowed).
pub fn containerd_available() -> bool {
    let ok = socket().exists() && ctr(&["version"]).status.success();
    if ok {
        return true;
    }
    let msg = format!(
        "no containerd at {}: run hack/containerd (hack/test does)",
        socket().display()
    );
    if std::env::var_os("ZYGOTE_ALLOW_SKIP").is_some_and(|v| v == "1") {
        eprintln!("SKIP: {msg}");
        return false;
    }
    panic!("{msg}");
}

/// `ctr --address <hack/containerd's socket> ARGS`, not run yet.
pub fn ctr_cmd(args: &[&str]) -> Command {
    let mut c = Command::new("ctr");
    c.arg("--address").arg(socket()).args(args);
    c
}

/// Runs `ctr ARGS` against hack/containerd's containerd.
pub fn ctr(args: &[&str]) -> Output {
    ctr_cmd(args)
        .output()
        .expect("ctr (containerd; hack/containerd installs it)")
}

/// Command output as text.
pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// `ctr run FLAGS --runtime zygote IMAGE ID ARGV...`.
pub fn zygote_run(flags: &[&str], id: &str, argv: &[&str]) -> Output {
    let image = image();
    let mut args = vec!["run"];
    args.extend_from_slice(flags);
    args.extend_from_slice(&["--runtime", RUNTIME, &image, id]);
    args.extend_from_slice(argv);
    ctr(&args)
}

/// Waits (up to 60 s) until `ctr task ls` shows task `id` as `status`.
pub fn wait_task(id: &str, status: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let ls = text(&ctr(&["task", "ls"]).stdout);
        if ls
            .lines()
            .any(|l| l.split_whitespace().next() == Some(id) && l.contains(status))
        {
            return;
        }
        assert!(Instant::now() < deadline, "task {id} is not {status}: {ls}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A unique container id for this test process.
pub fn cid(name: &str) -> String {
    format!("{name}-{}", std::process::id())
}

/// Removes what a test may have left of container `id` (task and container).
pub fn cleanup(id: &str) {
    let _ = ctr(&["task", "kill", "-s", "SIGKILL", id]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline && !ctr(&["task", "rm", "-f", id]).status.success() {
        if !text(&ctr(&["task", "ls", "-q"]).stdout)
            .lines()
            .any(|l| l == id)
        {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let _ = ctr(&["container", "rm", id]);
}

/// Cleans container `id` up when dropped, so that a failing test leaves no
/// task, container or shim behind.
#[derive(Debug)]
pub struct Removed(pub String);

impl Drop for Removed {
    fn drop(&mut self) {
        cleanup(&self.0);
    }
}

/// Shim processes serving `id` (the shim is named after the first container of its group).
pub fn shim_pids(id: &str) -> Vec<u32> {
    let out = Command::new("pgrep")
        .args(["-f", &format!("containerd-shim-zygote-v2 .*-id {id} ")])
        .output()
        .unwrap();
    text(&out.stdout)
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// The vCPU threads of process `pid` (named `zygote-vcpu`).
pub fn vcpu_threads(pid: u32) -> Vec<i32> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|rd| {
            rd.flatten()
                .filter(|e| {
                    std::fs::read_to_string(e.path().join("comm"))
                        .is_ok_and(|c| c.trim() == "zygote-vcpu")
                })
                .filter_map(|e| e.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// A pod VM's guest frozen as a hung guest looks to the host: its vCPU
/// threads alone stopped (ptrace), the shim's other threads running. Thawed
/// on drop.
#[derive(Debug)]
pub struct FrozenGuest(Vec<i32>);

impl FrozenGuest {
    /// Stops the vCPU threads of shim `pid`.
    pub fn freeze(pid: u32) -> Self {
        let vcpus = vcpu_threads(pid);
        assert!(!vcpus.is_empty(), "the shim runs the VM's vCPUs");
        for &tid in &vcpus {
            // SAFETY: ptrace requests on a thread id, with null address and data.
            unsafe {
                assert_eq!(
                    libc::ptrace(libc::PTRACE_SEIZE, tid, 0, 0),
                    0,
                    "seize {tid}"
                );
                assert_eq!(libc::ptrace(libc::PTRACE_INTERRUPT, tid, 0, 0), 0);
                let mut status = 0;
                libc::waitpid(tid, &mut status, libc::__WALL);
            }
        }
        FrozenGuest(vcpus)
    }
}

impl Drop for FrozenGuest {
    fn drop(&mut self) {
        for &tid in &self.0 {
            // SAFETY: detaching threads this process seized.
            unsafe { libc::ptrace(libc::PTRACE_DETACH, tid, 0, 0) };
        }
    }
}

/// The bundle containerd made for task `id` in namespace `default`.
pub fn bundle_dir(id: &str) -> std::path::PathBuf {
    socket()
        .parent()
        .expect("the socket is in containerd's run directory")
        .join("state/io.containerd.runtime.v2.task/default")
        .join(id)
}

/// The VM run directories on this host.
pub fn vm_run_dirs() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(zygote::paths::run_root())
        .map(|rd| rd.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    v.sort();
    v
}

/// What a container's life could leave behind on the host.
#[derive(Debug, PartialEq, Eq)]
pub struct HostFootprint {
    /// zygote shim processes.
    pub shims: usize,
    /// VM run directories.
    pub run_dirs: usize,
    /// Mounts in the host's mount table.
    pub mounts: usize,
    /// Shim sockets (`/run/containerd/s`).
    pub shim_sockets: usize,
    /// containerd's FIFO directories (`/run/containerd/fifo`).
    pub fifo_dirs: usize,
    /// Open file descriptors of containerd.
    pub containerd_fds: usize,
    /// Network namespaces under /var/run/netns (the CRI's pods').
    pub netns: usize,
    /// Network interfaces of the host (pods' veths, taps).
    pub links: usize,
}

pub fn count_entries(dir: &str) -> usize {
    std::fs::read_dir(dir).map_or(0, |rd| rd.count())
}

pub fn host_footprint() -> HostFootprint {
    let pid = std::fs::read_to_string(socket().with_file_name("containerd.pid"))
        .expect("hack/containerd's pid file");
    // Shims of this containerd (another, e.g. hack/conformance's, has its own).
    let ours = format!(
        "containerd-shim-zygote-v2 -namespace .* -address {} ",
        socket().display()
    );
    let shims = Command::new("pgrep")
        .args(["-c", "-f", &ours])
        .output()
        .map_or(0, |o| text(&o.stdout).trim().parse().unwrap_or(0));
    HostFootprint {
        shims,
        run_dirs: vm_run_dirs().len(),
        mounts: std::fs::read_to_string("/proc/self/mountinfo")
            .expect("mountinfo")
            .lines()
            .count(),
        shim_sockets: count_entries("/run/containerd/s"),
        fifo_dirs: count_entries("/run/containerd/fifo"),
        containerd_fds: count_entries(&format!("/proc/{}/fd", pid.trim())),
        netns: count_entries("/var/run/netns"),
        links: count_entries("/sys/class/net"),
    }
}

/// The footprint once it is back to `before`, or as it is after 30 s
/// (containerd's `shim delete` and the shim's exit finish just after the
/// client's call returns).
pub fn footprint_after(before: &HostFootprint) -> HostFootprint {
    // containerd may close connections of its own that were open before
    // the test (seen: 22 fds before, 18 after): fewer is nothing left
    // behind, only more would be.
    let settled = || {
        let mut f = host_footprint();
        f.containerd_fds = f.containerd_fds.max(before.containerd_fds);
        f
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut after = settled();
    while after != *before && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(500));
        after = settled();
    }
    after
}

/// `ctr events`, collected in the background.
#[derive(Debug)]
pub struct Events {
    child: Child,
    lines: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Events {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Events {
    /// Starts `ctr events`.
    pub fn start() -> Self {
        let mut child = ctr_cmd(&["events"]).stdout(Stdio::piped()).spawn().unwrap();
        let out = child.stdout.take().unwrap();
        let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = lines.clone();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        // containerd subscribes the client before the first event it must see.
        std::thread::sleep(Duration::from_millis(300));
        Events {
            child,
            lines,
            reader: Some(reader),
        }
    }

    /// The exit status of process `process` (the container's id for its
    /// init, else the exec id) of container `id`, from its `/tasks/exit`
    /// event if one came within `wait`.
    pub fn exit_status(&self, id: &str, process: &str, wait: Duration) -> Option<i64> {
        let deadline = Instant::now() + wait;
        loop {
            let found = self.lines.lock().unwrap().iter().find_map(|l| {
                // "DATE TIME ZONE UTC NAMESPACE /tasks/exit {...}"
                let json = &l[l.find(" /tasks/exit ")? + " /tasks/exit ".len()..];
                let v: serde_json::Value = serde_json::from_str(json.trim()).ok()?;
                (v["container_id"] == id && v["id"] == process)
                    .then(|| v["exit_status"].as_i64().unwrap_or(0))
            });
            if found.is_some() || Instant::now() >= deadline {
                return found;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `Err` if the container's own process `id` exited SIGSEGV (the PVM
    /// guest fault) within `wait`.
    pub fn container_segv(&self, id: &str, wait: Duration, context: &str) -> Result<(), PvmSegv> {
        match self.exit_status(id, id, wait) {
            Some(status) => PvmSegv::check(status, || format!("container {id} ({context})")),
            None => Ok(()),
        }
    }

    /// Stops collecting; asserts that the events naming `id` among the
    /// topics `want` came in that order (the shim exited with its last task).
    pub fn assert_order(self, id: &str, want: &[&str]) {
        let topics = self.topics_of(id);
        let seen: Vec<&str> = topics
            .iter()
            .map(String::as_str)
            .filter(|t| want.contains(t))
            .collect();
        assert_eq!(seen, want, "all events: {topics:?}");
        assert!(
            shim_pids(id).is_empty(),
            "the shim exited with its last task"
        );
    }

    /// The topics of the events naming `id`, in order.
    pub fn topics_of(mut self, id: &str) -> Vec<String> {
        std::thread::sleep(Duration::from_millis(500));
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.reader.take().expect("read once").join().unwrap();
        let lines = std::mem::take(&mut *self.lines.lock().unwrap());
        lines
            .iter()
            .filter(|l| l.contains(&format!("\"{id}\"")))
            // "DATE TIME ZONE UTC NAMESPACE TOPIC {...}"
            .filter_map(|l| {
                l.split_whitespace()
                    .find(|w| w.starts_with("/tasks/"))
                    .map(str::to_string)
            })
            .collect()
    }
}

/// Template directories with their creation stamps.
pub fn template_dirs() -> Vec<(String, String)> {
    let root = zygote::paths::templates();
    let mut v: Vec<(String, String)> = std::fs::read_dir(root)
        .map(|rd| {
            rd.flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with("ctr-"))
                .map(|e| {
                    let meta =
                        std::fs::read_to_string(e.path().join("template.json")).unwrap_or_default();
                    (e.file_name().to_string_lossy().into_owned(), meta)
                })
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Waits a moment for containerd's clean-up (`shim delete`), then asserts
/// that the VM run directories are what they were before.
pub fn assert_no_run_dirs_left(before: &[PathBuf]) {
    // Only new ones count: one of an earlier test's VM may still be going.
    let new = || -> Vec<PathBuf> {
        vm_run_dirs()
            .into_iter()
            .filter(|d| !before.contains(d))
            .collect()
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while !new().is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(new(), Vec::<PathBuf>::new(), "no VM run directory is left");
}
