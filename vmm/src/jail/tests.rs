//! The lists compile, and the kernel holds a thread to them: a call in the
//! list goes through, one outside it (or an ioctl request not named) kills
//! the process with SIGSYS.

use super::*;

#[test]
fn every_name_has_a_number_of_its_own_and_every_list_compiles() {
    for kind in [Kind::Vcpu, Kind::Device] {
        let calls = allowed(kind);
        let mut numbers: Vec<i64> = calls.iter().map(|&(_, nr)| nr).collect();
        numbers.sort_unstable();
        numbers.dedup();
        assert_eq!(numbers.len(), calls.len(), "{kind:?}: {calls:?}");
        for mode in [Mode::Kill, Mode::Log] {
            let prog = program(kind, mode).unwrap();
            assert!(!prog.is_empty() && prog.len() < 4096, "{kind:?}");
        }
    }
    let names = |kind| {
        allowed(kind)
            .into_iter()
            .map(|(n, _)| n)
            .collect::<Vec<_>>()
    };
    assert!(!names(Kind::Vcpu).contains(&"openat"));
    assert!(!names(Kind::Device).contains(&"execve"));
}

/// Runs `calls` in a child under `kind`'s list (Kill); its wait status.
fn child_under(kind: Kind, calls: impl Fn()) -> i32 {
    let prog = program(kind, Mode::Kill).unwrap();
    // SAFETY: the child makes raw system calls only (nothing allocates) and _exits.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        if seccompiler::apply_filter(&prog).is_err() {
            // SAFETY: leaving the child.
            unsafe { libc::_exit(2) };
        }
        calls();
        // SAFETY: leaving the child.
        unsafe { libc::_exit(0) };
    }
    let mut status = 0;
    // SAFETY: our child.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    status
}

fn killed_by_sigsys(status: i32) -> bool {
    libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGSYS
}

#[test]
fn the_kernel_holds_a_thread_to_its_list() {
    // SAFETY: plain system calls on no memory of ours (so below).
    let allowed_calls = || unsafe {
        libc::syscall(libc::SYS_getpid);
        libc::syscall(libc::SYS_ioctl, -1, libc::FIONBIO, 0);
        libc::syscall(libc::SYS_ioctl, -1, 0xae80u64, 0);
    };
    assert_eq!(child_under(Kind::Vcpu, allowed_calls), 0);
    // SAFETY: as above.
    let other_ioctl = || unsafe {
        libc::syscall(libc::SYS_ioctl, -1, 0xae01u64, 0);
    };
    assert!(killed_by_sigsys(child_under(Kind::Vcpu, other_ioctl)));
    // SAFETY: as above.
    let open = || unsafe {
        libc::syscall(libc::SYS_openat, libc::AT_FDCWD, c"/".as_ptr(), 0);
    };
    assert!(killed_by_sigsys(child_under(Kind::Vcpu, open)));
    assert_eq!(child_under(Kind::Device, open), 0);
    // SAFETY: as above.
    let exec = || unsafe {
        libc::syscall(libc::SYS_execve, c"/bin/true".as_ptr(), 0, 0);
    };
    assert!(killed_by_sigsys(child_under(Kind::Device, exec)));
    // The test hook's call, armed.
    let trip = || {
        arm_trip();
        trip_if_armed();
    };
    assert!(killed_by_sigsys(child_under(Kind::Vcpu, trip)));
}

#[test]
fn modes_by_name_and_off_by_default() {
    assert_eq!(Mode::parse(None), Ok(Mode::Kill));
    assert_eq!(Mode::parse(Some("log")), Ok(Mode::Log));
    assert_eq!(Mode::parse(Some("off")), Ok(Mode::Off));
    assert!(Mode::parse(Some("permissive")).is_err());
    assert_eq!(mode(), Mode::Off, "off unless a program turns it on");
}

#[test]
fn log_mode_lets_the_call_through() {
    let prog = program(Kind::Vcpu, Mode::Log).unwrap();
    // SAFETY: the child makes raw system calls only and _exits.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        let _ = seccompiler::apply_filter(&prog);
        // SAFETY: a plain system call.
        let fd = unsafe { libc::syscall(libc::SYS_openat, libc::AT_FDCWD, c"/".as_ptr(), 0) };
        // SAFETY: leaving the child.
        unsafe { libc::_exit(if fd >= 0 { 0 } else { 1 }) };
    }
    let mut status = 0;
    // SAFETY: our child.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    assert_eq!(status, 0);
}
