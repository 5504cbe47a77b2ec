//! A device thread started from a vCPU thread is not held by the vCPU's
//! list (its own process: the mode is process-wide).

use zygote_vmm::jail::{self, Kind, Mode};

fn filters() -> u32 {
    filters_in(std::fs::File::open("/proc/thread-self/status").unwrap())
}

/// From a status file opened before (a vCPU thread may not open files).
fn filters_in(mut status: std::fs::File) -> u32 {
    // One read into a buffer (read_to_string would stat the file first).
    let mut buf = [0u8; 4096];
    let n = std::io::Read::read(&mut status, &mut buf).unwrap();
    String::from_utf8_lossy(&buf[..n])
        .lines()
        .find_map(|l| l.strip_prefix("Seccomp_filters:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("Seccomp_filters in /proc/thread-self/status")
}

#[test]
fn threads_started_through_the_spawner_hold_no_filter_of_their_starter() {
    jail::set_mode(Mode::Kill);
    let seen = std::thread::spawn(|| {
        let status = std::fs::File::open("/proc/thread-self/status").unwrap();
        jail::enter(Kind::Vcpu).unwrap();
        let mine = filters_in(status);
        // As a device's activation does on a vCPU thread.
        let device = jail::spawn_unjailed("device", || {
            let before = filters();
            jail::enter(Kind::Device).unwrap();
            // A call in the device list, not in the vCPU's.
            let dir = std::fs::read_dir("/proc/self").is_ok();
            (before, filters(), dir)
        })
        .unwrap()
        .join()
        .unwrap();
        (mine, device)
    })
    .join()
    .unwrap();
    assert_eq!(seen, (1, (0, 1, true)));
}
