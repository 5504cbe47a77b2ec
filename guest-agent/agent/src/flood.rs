//! `zygote-agent vsock-flood SECONDS`: a guest program that floods the
//! vsock device for the host's hostile-guest test (tests/tests/vm.rs).
//! Nonblocking connects to host ports nobody serves (each a REQUEST the
//! host answers with a reset), each closed at once (a reset for a
//! connection the host no longer knows), from two threads, for SECONDS.
//! Nothing a guest's root could not write itself; prints the count.

use std::process::ExitCode;
use std::time::{Duration, Instant};

/// Host CID.
const HOST: u32 = 2;

/// One connect to `port`, closed at once; whether the socket was made.
fn connect_and_close(port: u32) -> bool {
    // SAFETY: socket(2) with constant arguments; the fd is ours.
    let fd = unsafe {
        libc::socket(
            libc::AF_VSOCK,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return false;
    }
    // SAFETY: sockaddr_vm is plain data; zeroed is valid.
    let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    addr.svm_cid = HOST;
    addr.svm_port = port;
    // SAFETY: a valid address of the size passed, on our fd; then closing it once.
    unsafe {
        libc::connect(
            fd,
            (&addr as *const libc::sockaddr_vm).cast(),
            std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
        );
        libc::close(fd);
    }
    true
}

/// The subcommand's main.
pub fn main(seconds: &str) -> ExitCode {
    let Ok(seconds) = seconds.parse::<u64>() else {
        eprintln!("usage: zygote-agent vsock-flood SECONDS");
        return ExitCode::from(2);
    };
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let threads: Vec<_> = (0..2u32)
        .map(|t| {
            std::thread::spawn(move || {
                let mut n = 0u64;
                let mut port = 20_000 + t * 20_000;
                while Instant::now() < deadline {
                    if connect_and_close(port) {
                        n += 1;
                    }
                    port = 20_000 + (port + 7 - 20_000) % 40_000;
                }
                n
            })
        })
        .collect();
    let total: u64 = threads.into_iter().filter_map(|t| t.join().ok()).sum();
    println!("{total}");
    ExitCode::SUCCESS
}
