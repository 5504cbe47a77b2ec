//! The compiled programs run by this host's kernel (in a forked child),
//! checked against the rules' meaning written out plainly.

use super::*;

/// What the rules say for a call: the first matching rule's action.
fn expected(default: u32, rules: &[Rule], nr: u32, args: &[u64; 6]) -> u32 {
    let holds = |c: &Cond| {
        let a = args[c.index];
        match c.op {
            Cmp::Ne => a != c.value,
            Cmp::Lt => a < c.value,
            Cmp::Le => a <= c.value,
            Cmp::Eq => a == c.value,
            Cmp::Ge => a >= c.value,
            Cmp::Gt => a > c.value,
            Cmp::MaskedEq(mask) => a & mask == c.value,
        }
    };
    rules
        .iter()
        .find(|r| r.names.iter().any(|n| number(n) == Some(nr)) && r.conds.iter().all(holds))
        .map_or(default, |r| r.action)
}

/// Runs `calls` (number, arguments) in a child under `prog`; the results
/// (the return value, or -errno) in order.
fn run_under(prog: &[Insn], calls: &[(u32, [u64; 6])]) -> Vec<i64> {
    let filters = sock_filters(prog);
    let mut results = vec![0i64; calls.len()];
    let mut fds = [0; 2];
    // SAFETY: a two-int array.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    // SAFETY: the child makes only system calls (no allocation) and _exits.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        // SAFETY: prctl with integer arguments; then only raw system calls
        // on memory made before the fork.
        unsafe {
            libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0);
            if install(&filters).is_err() {
                libc::_exit(2);
            }
            for (i, (nr, a)) in calls.iter().enumerate() {
                let rc = libc::syscall(*nr as i64, a[0], a[1], a[2], a[3], a[4], a[5]);
                results[i] = if rc < 0 {
                    -(*libc::__errno_location() as i64)
                } else {
                    rc
                };
            }
            let bytes = results.len() * 8;
            let mut done = 0;
            while done < bytes {
                let n = libc::write(
                    fds[1],
                    results.as_ptr().cast::<u8>().add(done).cast(),
                    bytes - done,
                );
                if n <= 0 {
                    libc::_exit(3);
                }
                done += n as usize;
            }
            libc::_exit(0);
        }
    }
    // SAFETY: our copy of the write end, closed once.
    unsafe { libc::close(fds[1]) };
    let mut bytes = Vec::new();
    use std::io::Read;
    // SAFETY: the read end, owned here from now on.
    let mut read: std::fs::File = unsafe { std::os::fd::FromRawFd::from_raw_fd(fds[0]) };
    read.read_to_end(&mut bytes).unwrap();
    let mut status = 0;
    // SAFETY: our child.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    assert_eq!(status, 0, "the child failed (wait status {status:#x})");
    bytes
        .chunks_exact(8)
        .map(|c| i64::from_ne_bytes(c.try_into().unwrap()))
        .collect()
}

fn errno(e: i32) -> u32 {
    libc::SECCOMP_RET_ERRNO | e as u32
}

#[test]
fn every_comparison_matches_its_meaning_on_the_kernel() {
    // getppid ignores its arguments, so only the filter looks at them.
    let c = |index, op, value, two| cond(index, op, value, two).unwrap();
    let rule = |action, conds| Rule {
        names: vec!["getppid".into(), "no_such_call".into()],
        action,
        conds,
    };
    let rules = vec![
        rule(errno(11), vec![c(0, "SCMP_CMP_EQ", 1, 0)]),
        rule(
            errno(12),
            vec![
                c(0, "SCMP_CMP_NE", 2, 0),
                c(1, "SCMP_CMP_GT", 0x1_0000_0000, 0),
            ],
        ),
        rule(
            errno(13),
            vec![c(1, "SCMP_CMP_MASKED_EQ", 0xff00_0000_ff00, 0x1200)],
        ),
        rule(
            errno(14),
            vec![c(2, "SCMP_CMP_LT", 5, 0), c(2, "SCMP_CMP_GE", 3, 0)],
        ),
        rule(
            errno(15),
            vec![
                c(3, "SCMP_CMP_LE", 0x2_0000_0005, 0),
                c(3, "SCMP_CMP_GT", 0x1_ffff_ffff, 0),
            ],
        ),
        rule(errno(16), vec![c(5, "SCMP_CMP_GE", u64::MAX, 0)]),
        rule(
            errno(17),
            vec![c(4, "SCMP_CMP_LT", 1, 0), c(0, "SCMP_CMP_EQ", 9, 0)],
        ),
        Rule {
            names: vec!["getppid".into()],
            action: errno(18),
            conds: vec![c(0, "SCMP_CMP_EQ", 7, 0)],
        },
    ];
    let default = libc::SECCOMP_RET_ALLOW;
    let prog = compile(default, &rules).unwrap();
    // Values near every boundary the rules name, in every argument.
    let edges = [
        0u64,
        1,
        2,
        3,
        4,
        5,
        7,
        9,
        0x1200,
        0x1_0000_1200,
        0xff00,
        0xffff_ffff,
        0x1_0000_0000,
        0x1_0000_0001,
        0x1_ffff_ffff,
        0x2_0000_0000,
        0x2_0000_0005,
        0x2_0000_0006,
        u64::MAX - 1,
        u64::MAX,
    ];
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let nr = libc::SYS_getppid as u32;
    let calls: Vec<(u32, [u64; 6])> = (0..4000)
        .map(|_| {
            let mut a = [0u64; 6];
            for v in &mut a {
                *v = edges[(next() % edges.len() as u64) as usize];
            }
            (nr, a)
        })
        .collect();
    let got = run_under(&prog, &calls);
    // SAFETY: no arguments.
    let ppid = unsafe { libc::getpid() } as i64;
    let mut matched = std::collections::BTreeMap::new();
    for ((_, args), got) in calls.iter().zip(&got) {
        let want = expected(default, &rules, nr, args);
        let want = if want == default {
            ppid
        } else {
            -((want & 0xffff) as i64)
        };
        assert_eq!(*got, want, "getppid{args:x?}");
        *matched.entry(want).or_insert(0) += 1;
    }
    // Every rule's action was seen, and the default.
    assert_eq!(matched.len(), 9, "{matched:?}");
}

#[test]
fn deny_by_default_with_an_allow_list_and_an_errno_rule() {
    // The shape of containerd's default profile: deny (EPERM), allow a list,
    // an explicit ENOSYS rule.
    let rules = vec![
        Rule {
            names: ["write", "exit_group", "getpid", "exit"]
                .map(String::from)
                .to_vec(),
            action: libc::SECCOMP_RET_ALLOW,
            conds: vec![],
        },
        Rule {
            names: vec!["clone3".into()],
            action: errno(libc::ENOSYS),
            conds: vec![],
        },
    ];
    let prog = compile(errno(libc::EPERM), &rules).unwrap();
    let z = [0u64; 6];
    let got = run_under(
        &prog,
        &[
            (libc::SYS_getpid as u32, z),
            (libc::SYS_unshare as u32, [0x1000_0000, 0, 0, 0, 0, 0]),
            (libc::SYS_keyctl as u32, z),
            (libc::SYS_clone3 as u32, z),
            (libc::SYS_mount as u32, z),
        ],
    );
    assert!(got[0] > 0, "{got:?}");
    assert_eq!(
        &got[1..],
        [
            -libc::EPERM as i64,
            -libc::EPERM as i64,
            -libc::ENOSYS as i64,
            -libc::EPERM as i64
        ]
    );
}

#[test]
fn names_actions_and_operators() {
    assert_eq!(number("read"), Some(0));
    assert_eq!(number("clone3"), Some(435));
    assert_eq!(number("not_a_syscall"), None);
    assert_eq!(
        action("SCMP_ACT_ERRNO", None),
        Ok(libc::SECCOMP_RET_ERRNO | libc::EPERM as u32)
    );
    assert_eq!(
        action("SCMP_ACT_NOTIFY", None),
        Err(SeccompError::Action("SCMP_ACT_NOTIFY".into()))
    );
    assert_eq!(cond(6, "SCMP_CMP_EQ", 0, 0), Err(SeccompError::Index(6)));
    assert!(cond(0, "SCMP_CMP_WHATEVER", 0, 0).is_err());
    // A program for every known call stays within the kernel's limit.
    let all = Rule {
        names: super::syscalls::SYSCALLS
            .iter()
            .map(|(n, _)| n.to_string())
            .collect(),
        action: libc::SECCOMP_RET_ALLOW,
        conds: vec![],
    };
    let prog = compile(errno(1), &[all]).unwrap();
    assert!(prog.len() < MAX_INSNS, "{}", prog.len());
}
