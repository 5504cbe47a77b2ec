//! Helpers shared by the integration tests in `tests/`.
//!
//! The VM tests need the guest kernel and image (`hack/guest-image`). When they
//! are missing the tests fail with instructions, unless `ZYGOTE_ALLOW_SKIP=1`
//! says a skip is acceptable (never in CI).

pub mod ctr;
pub mod netns;

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

/// Real-VM tests take this lock: guest kernel work is slow on PVM, and two
/// VMs at once on two cores would only make each slower.
pub fn vm_lock() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    log_to_test_output();
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

/// Sends the runtime's warnings (e.g. a guest that would not power off, with
/// its console's last lines) to the test's captured output, shown when it fails.
pub fn log_to_test_output() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("ZYGOTE_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_test_writer()
        .try_init();
}

/// Whether the guest kernel and image exist; panics with instructions if not
/// (or returns false when skipping is explicitly allowed).
pub fn guest_available() -> bool {
    let kernel = zygote::paths::kernel();
    let image = zygote::paths::initramfs();
    if kernel.exists() && image.exists() {
        return true;
    }
    let msg = format!(
        "guest kernel {} or image {} missing: run hack/guest-image (hack/test does)",
        kernel.display(),
        image.display()
    );
    if std::env::var_os("ZYGOTE_ALLOW_SKIP").is_some_and(|v| v == "1") {
        eprintln!("SKIP: {msg}");
        return false;
    }
    panic!("{msg}");
}

/// The busybox variant of the guest image (`hack/guest-image --busybox`).
pub fn busybox_initramfs() -> PathBuf {
    zygote::paths::initramfs().with_file_name("initramfs-busybox.cpio")
}

/// Entries of the run root that belong to this process (`vm-<pid>-*`).
pub fn own_run_dirs() -> Vec<PathBuf> {
    let prefix = format!("vm-{}-", std::process::id());
    std::fs::read_dir(zygote::paths::run_root())
        .map(|rd| {
            rd.filter_map(Result::ok)
                .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default()
}

/// Threads of this process that the VMM started (named `zygote-*`: vCPUs and
/// device threads). The test harness's own threads come and go, so they are not counted.
pub fn vmm_thread_count() -> usize {
    std::fs::read_dir("/proc/self/task")
        .map(|rd| {
            rd.filter_map(Result::ok)
                .filter(|t| {
                    std::fs::read_to_string(t.path().join("comm"))
                        .is_ok_and(|c| c.starts_with("zygote-"))
                })
                .count()
        })
        .unwrap_or(0)
}

/// Open file descriptors of this process right now.
pub fn fd_count() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .map(|rd| rd.count())
        .unwrap_or(0)
}

/// A fresh directory `$TMPDIR/zygote-{name}-{pid}` for a fixture that lives
/// as long as the test binary (a `static`, which is never dropped): it is
/// removed when the binary exits, from an `atexit` handler (the test harness
/// ends with `exit`).
pub fn scratch_dir(name: &str) -> PathBuf {
    static DIRS: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());
    static REGISTER: std::sync::Once = std::sync::Once::new();
    extern "C" fn remove_all() {
        let dirs = std::mem::take(&mut *DIRS.lock().unwrap_or_else(|e| e.into_inner()));
        for dir in dirs {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
    // SAFETY: registers a plain function; it runs once, at exit.
    REGISTER.call_once(|| unsafe {
        libc::atexit(remove_all);
    });
    let dir = std::env::temp_dir().join(format!("zygote-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch dir");
    DIRS.lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(dir.clone());
    dir
}

/// A temporary file with `bytes`, removed on drop.
#[derive(Debug)]
pub struct TempFile(pub PathBuf);

impl TempFile {
    /// Creates it.
    pub fn new(name: &str, bytes: &[u8]) -> Self {
        let path = std::env::temp_dir().join(format!("zygote-test-{}-{name}", std::process::id()));
        std::fs::write(&path, bytes).expect("write temp file");
        TempFile(path)
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// What every fork of the test template finds in `/tmp/marker`.
pub const TEMPLATE_MARKER: &str = "template-was-here";

/// The shared test template: the busybox image booted, `/tmp/marker` written
/// by a warm-up command, snapshotted. Built once into
/// `$ZYGOTE_HOME/test-templates` under a name derived from the kernel and image
/// (so a new image gets a new template) and reused by every test binary and
/// run — the store's build lock makes concurrent builders share one build.
pub fn test_template() -> &'static (
    zygote_vmm::snapshot::TemplateStore,
    zygote_vmm::snapshot::TemplateName,
) {
    use std::hash::{Hash, Hasher};
    use std::os::unix::fs::MetadataExt;
    static TEMPLATE: std::sync::OnceLock<(
        zygote_vmm::snapshot::TemplateStore,
        zygote_vmm::snapshot::TemplateName,
    )> = std::sync::OnceLock::new();
    TEMPLATE.get_or_init(|| {
        let kernel = std::fs::canonicalize(zygote::paths::kernel()).expect("guest kernel");
        let image = busybox_initramfs();
        let mut h = std::collections::hash_map::DefaultHasher::new();
        for p in [&kernel, &image] {
            let m = std::fs::metadata(p).expect("guest kernel and busybox image");
            (p, m.len(), m.mtime(), m.mtime_nsec()).hash(&mut h);
        }
        (
            zygote_vmm::builder::BASE_CMDLINE,
            zygote_vmm::snapshot::STATE_VERSION,
        )
            .hash(&mut h);
        let name = zygote_vmm::snapshot::TemplateName::new(&format!("test-bb-{:016x}", h.finish()))
            .expect("valid name");
        let store =
            zygote_vmm::snapshot::TemplateStore::new(zygote::paths::home().join("test-templates"));
        let spec = zygote::template::BuildSpec {
            mounts: vec![],
            name: name.clone(),
            sandbox: zygote::sandbox::SandboxConfig {
                // Built and driven through the agent's debug requests (Exec, Spawn).
                debug_requests: true,
                kernel,
                initramfs: image,
                ..Default::default()
            },
            spawn: vec![],
            warm: vec![vec![
                "/bin/busybox".into(),
                "sh".into(),
                "-c".into(),
                format!("echo {TEMPLATE_MARKER} > /tmp/marker"),
            ]],
            settle: std::time::Duration::from_secs(1),
            stage: None,
            force: false,
        };
        let _guard = vm_lock();
        let report = build_template(&store, &spec);
        // Templates of older kernels or images are not used again.
        for old in store.list().unwrap_or_default() {
            if old.as_str().starts_with("test-bb-") && old != name {
                let _ = store.remove(&old);
            }
        }
        eprintln!(
            "test template {} ({}; boot {:.0} ms)",
            report.dir.display(),
            if report.reused { "reused" } else { "built" },
            report.meta.boot_ms
        );
        (store, name)
    })
}

/// The `zygote` binary built beside the test binaries (`cargo test --workspace`
/// builds it for the shim's own tests).
pub fn zygote_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>/deps")
        .join("zygote");
    assert!(
        bin.exists(),
        "{} missing: build with `cargo test --workspace`",
        bin.display()
    );
    bin
}

/// A tmpfs mounted for a test (e.g. a small disk that fills up), unmounted and
/// removed on drop.
#[derive(Debug)]
pub struct Tmpfs(pub PathBuf);

impl Tmpfs {
    /// Mounts a tmpfs of `mib` MiB at a fresh directory.
    pub fn mount(name: &str, mib: u64) -> Self {
        let dir = std::env::temp_dir().join(format!("zygote-tmpfs-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("mount point");
        let status = std::process::Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={mib}m,mode=0700"),
                "zygote-test",
            ])
            .arg(&dir)
            .status()
            .expect("mount");
        assert!(
            status.success(),
            "mount tmpfs at {} (tests run as root)",
            dir.display()
        );
        Tmpfs(dir)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The Go test program (`tests/go/gorand`) built with Debian's Go into `dir`:
/// `(normal, stripped)` — the second with `-ldflags=-s -w`.
pub fn build_gorand(dir: &Path) -> (PathBuf, PathBuf) {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("go/gorand");
    std::fs::create_dir_all(dir).expect("build dir");
    let build = |out: &Path, flags: &[&str]| {
        let status = std::process::Command::new("go")
            .arg("build")
            .args(flags)
            .arg("-o")
            .arg(out)
            .arg(".")
            .current_dir(&src)
            .env("CGO_ENABLED", "0")
            .env("GOCACHE", dir.join("gocache"))
            .env("GOFLAGS", "-mod=mod")
            .status()
            .expect("go (golang-go) must be installed: hack/test installs it");
        assert!(status.success(), "go build {flags:?}");
    };
    let normal = dir.join("gorand");
    let stripped = dir.join("gorand-stripped");
    build(&normal, &[]);
    build(&stripped, &["-ldflags=-s -w"]);
    (normal, stripped)
}

/// An initramfs: the busybox test image with `files` (guest path, host file)
/// appended as a second newc archive (the kernel unpacks both).
pub fn initramfs_with(name: &str, files: &[(&str, &Path)]) -> TempFile {
    let stage = std::env::temp_dir().join(format!("zygote-stage-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&stage);
    std::fs::create_dir_all(&stage).expect("stage dir");
    for (guest, host) in files {
        let dest = stage.join(guest.trim_start_matches('/'));
        std::fs::create_dir_all(dest.parent().expect("a file path")).expect("stage dir");
        std::fs::copy(host, &dest).expect("stage file");
    }
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg("find . | LC_ALL=C sort | cpio -o -H newc --quiet")
        .current_dir(&stage)
        .output()
        .expect("cpio");
    assert!(out.status.success(), "cpio failed");
    let mut bytes = std::fs::read(busybox_initramfs()).expect("busybox initramfs");
    bytes.extend_from_slice(&out.stdout);
    std::fs::remove_dir_all(&stage).expect("stage cleanup");
    TempFile::new(&format!("{name}.cpio"), &bytes)
}

/// The exit status of a process killed by SIGSEGV (128 + 11), as the agent,
/// containerd and the CRI report it.
pub const SEGV_STATUS: i64 = 128 + libc::SIGSEGV as i64;

/// The one failure a test may retry on a PVM host: the PVM guest fault
/// (docs/guest-kernel.md: a user vector register lost across preemption)
/// crashed a guest process, which shows as that process's own exit status
/// being SIGSEGV ([`SEGV_STATUS`], a status field, never a substring of a
/// message). Every other failure fails the test where it happens.
#[derive(Debug)]
pub struct PvmSegv {
    /// Which process, and where its status was read.
    pub what: String,
}

impl PvmSegv {
    /// `Err(PvmSegv)` if `status` (a process's own exit status) is SIGSEGV.
    pub fn check(status: i64, what: impl FnOnce() -> String) -> Result<(), PvmSegv> {
        if status == SEGV_STATUS {
            Err(PvmSegv { what: what() })
        } else {
            Ok(())
        }
    }
}

/// Where retries are counted: `$ZYGOTE_RETRY_LOG` (hack/test sets it and
/// prints the summary), else a file in the temporary directory.
pub fn retry_log() -> PathBuf {
    std::env::var_os("ZYGOTE_RETRY_LOG")
        .map(PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join("zygote-test-retries.log"))
}

/// Records one retry of the current test (named after its thread, as the
/// test harness names it) in [`retry_log`], and says it on stderr.
pub fn record_retry(what: &str) {
    use std::io::Write;
    let current = std::thread::current();
    let test = current.name().unwrap_or("unnamed");
    eprintln!("PVM retry in {test}: {what}");
    let line = format!("{test}\t{}\n", what.replace(['\n', '\t'], " "));
    let written = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(retry_log())
        .and_then(|mut f| f.write_all(line.as_bytes()));
    if let Err(e) = written {
        panic!("cannot count a retry in {}: {e}", retry_log().display());
    }
}

/// Whether a round that failed with `segv` may run again: only on a PVM host,
/// and only for its first two attempts (0 and 1). The retry is counted.
pub fn may_retry(segv: &PvmSegv, attempt: u32) -> bool {
    if zygote_vmm::KvmKind::detect() != zygote_vmm::KvmKind::Pvm || attempt >= 2 {
        return false;
    }
    record_retry(&segv.what);
    true
}

/// Runs `round` (given its attempt number, 0..3); a round that ended in
/// [`PvmSegv`] runs again on a PVM host (counted), and fails the test on
/// hardware KVM or the third time. Any other failure panics inside `round`.
pub fn retry_pvm_segv<T>(mut round: impl FnMut(u32) -> Result<T, PvmSegv>) -> T {
    for attempt in 0.. {
        match round(attempt) {
            Ok(v) => return v,
            Err(segv) if may_retry(&segv, attempt) => {}
            Err(segv) => panic!("{} (exit status SIGSEGV)", segv.what),
        }
    }
    unreachable!("the loop returns or panics")
}

/// Runs a busybox shell script in the guest through the agent's Exec. A run
/// whose shell's own status is SIGSEGV (the PVM guest fault) runs again (see
/// [`retry_pvm_segv`]) — the scripts the tests run are idempotent.
pub fn guest_sh(sandbox: &zygote::sandbox::Sandbox, script: &str) -> zygote_agent_api::ExecResult {
    use zygote_agent_api::{Exec, request, response};
    retry_pvm_segv(|_| {
        let mut c = sandbox.client().expect("agent connection");
        c.set_timeout(std::time::Duration::from_secs(120))
            .expect("timeout");
        let body = c
            .call(request::Body::Exec(Exec {
                argv: vec![
                    "/bin/busybox".into(),
                    "sh".into(),
                    "-c".into(),
                    script.into(),
                ],
                env: vec![],
                timeout_ms: 100_000,
            }))
            .expect("Exec call");
        let response::Body::Exec(r) = body else {
            panic!("unexpected answer {body:?}")
        };
        PvmSegv::check(r.exit_code.into(), || format!("guest shell: {script}"))?;
        Ok(r)
    })
}

/// [`guest_sh`] that must succeed; its trimmed stdout.
pub fn guest_stdout(sandbox: &zygote::sandbox::Sandbox, script: &str) -> String {
    let r = guest_sh(sandbox, script);
    assert_eq!(
        r.exit_code,
        0,
        "{script}: {}",
        String::from_utf8_lossy(&r.stderr)
    );
    String::from_utf8_lossy(&r.stdout).trim().to_string()
}

/// Builds a template; a warm-up command whose own exit status was SIGSEGV
/// (the PVM guest fault) builds again with a fresh boot (see
/// [`retry_pvm_segv`]). Warm-up commands must be idempotent.
pub fn build_template(
    store: &zygote_vmm::snapshot::TemplateStore,
    spec: &zygote::template::BuildSpec,
) -> zygote::template::BuildReport {
    retry_pvm_segv(|_| match zygote::template::build(store, spec) {
        Ok(report) => Ok(report),
        Err(zygote::template::BuildError::Warm {
            argv,
            status: Some(status),
            detail,
        }) => {
            PvmSegv::check(status.into(), || format!("warm-up {argv:?}: {detail}"))?;
            panic!(
                "template {}: warm-up {argv:?} exited {status}: {detail}",
                spec.name
            )
        }
        Err(e) => panic!("template {}: {e:?}", spec.name),
    })
}

/// Runs `cmd`, panicking with its output if it fails.
pub fn run_ok(cmd: &mut std::process::Command) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A busybox OCI image built locally with `umoci` (no registry here): the
/// layout `dir/layout`, tag `busybox`, one layer with /bin/busybox and the
/// `applets` as links, /home/app and an empty /etc. Returns the layout.
pub fn busybox_oci_image(dir: &Path, applets: &[&str]) -> PathBuf {
    use std::process::Command;
    let layout = dir.join("layout");
    let bundle = dir.join("bundle");
    let image = format!("{}:busybox", layout.display());
    run_ok(
        Command::new("umoci")
            .arg("init")
            .arg("--layout")
            .arg(&layout),
    );
    run_ok(Command::new("umoci").args(["new", "--image", &image]));
    run_ok(
        Command::new("umoci")
            .args(["unpack", "--image", &image])
            .arg(&bundle),
    );
    let rootfs = bundle.join("rootfs");
    for d in ["bin", "proc", "dev", "sys", "tmp", "etc", "home/app"] {
        std::fs::create_dir_all(rootfs.join(d)).unwrap();
    }
    std::fs::copy("/bin/busybox", rootfs.join("bin/busybox")).expect("busybox-static");
    for applet in applets {
        std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(applet)).unwrap();
    }
    run_ok(
        Command::new("umoci")
            .args(["repack", "--image", &image])
            .arg(&bundle),
    );
    run_ok(Command::new("umoci").args([
        "config",
        "--image",
        &image,
        "--config.env",
        "PATH=/bin",
        "--config.cmd",
        "/bin/sh",
    ]));
    std::fs::remove_dir_all(&bundle).unwrap();
    layout
}

/// hack/containerd's containerd socket (`$ZYGOTE_CONTAINERD_SOCK`).
pub fn containerd_socket() -> PathBuf {
    std::env::var_os("ZYGOTE_CONTAINERD_SOCK").map_or_else(
        || "/run/zygote/containerd/containerd.sock".into(),
        PathBuf::from,
    )
}

/// The busybox image hack/containerd imports (`$ZYGOTE_TEST_IMAGE`).
pub fn test_image() -> String {
    std::env::var("ZYGOTE_TEST_IMAGE").unwrap_or_else(|_| "zygote.local/busybox:latest".into())
}
