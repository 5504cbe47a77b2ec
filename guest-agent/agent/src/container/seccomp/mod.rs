//! A container's seccomp profile (`linux.seccomp`) compiled to a classic BPF
//! program and installed by the container's init, as runc does with
//! libseccomp.
//!
//! Semantics, as libseccomp gives them to runc: rules are tried in the
//! profile's order and the first that matches decides; a rule matches when
//! its syscall is named and every argument condition holds (64-bit
//! comparisons); nothing matching → the default action. Names this kernel's
//! table does not know are skipped (runc logs and skips them too). Only
//! x86_64 calls are let through to the rules: other architectures' calls (the
//! 32-bit `int 0x80` entry, x32) get the default action.
//!
//! The program is a binary search on the syscall number (a few jumps per
//! call, not one per named call: seccomp runs on every syscall, and on PVM
//! the guest kernel's instructions are emulated).

mod syscalls;

use serde::{Deserialize, Serialize};

/// Errors in a profile.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SeccompError {
    /// An action this agent does not implement.
    #[error("seccomp action {0} is not supported")]
    Action(String),
    /// A comparison this agent does not know.
    #[error("seccomp operator {0} is not supported")]
    Operator(String),
    /// An argument index past the sixth.
    #[error("seccomp argument index {0} is out of range (0-5)")]
    Index(usize),
    /// The program would be longer than the kernel takes.
    #[error("the seccomp profile compiles to {0} instructions, more than the kernel's 4096")]
    TooLong(usize),
}

/// One BPF instruction (`struct sock_filter`), kept serializable for the
/// launch config.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Insn {
    /// Opcode.
    pub code: u16,
    /// Jump if true (relative).
    pub jt: u8,
    /// Jump if false (relative).
    pub jf: u8,
    /// Operand.
    pub k: u32,
}

/// An argument comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cmp {
    /// `!=`
    Ne,
    /// `<`
    Lt,
    /// `<=`
    Le,
    /// `==`
    Eq,
    /// `>=`
    Ge,
    /// `>`
    Gt,
    /// `arg & mask == value`
    MaskedEq(u64),
}

/// A condition on argument `index`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cond {
    /// Which argument, 0-5.
    pub index: usize,
    /// How to compare.
    pub op: Cmp,
    /// With what.
    pub value: u64,
}

/// A rule: these calls, when every condition holds, get `action`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// Syscall names.
    pub names: Vec<String>,
    /// The return value (a `SECCOMP_RET_*` with its data).
    pub action: u32,
    /// All must hold.
    pub conds: Vec<Cond>,
}

const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
const X32_SYSCALL_BIT: u32 = 0x4000_0000;
const MAX_INSNS: usize = 4096;

/// `SECCOMP_RET_*` for an OCI action name; `errno` is `errnoRet`.
pub fn action(name: &str, errno: Option<u32>) -> Result<u32, SeccompError> {
    let data = errno.unwrap_or(libc::EPERM as u32) & 0xffff;
    Ok(match name {
        "SCMP_ACT_ALLOW" => libc::SECCOMP_RET_ALLOW,
        "SCMP_ACT_ERRNO" => libc::SECCOMP_RET_ERRNO | data,
        "SCMP_ACT_KILL" | "SCMP_ACT_KILL_THREAD" => libc::SECCOMP_RET_KILL_THREAD,
        "SCMP_ACT_KILL_PROCESS" => libc::SECCOMP_RET_KILL_PROCESS,
        "SCMP_ACT_TRAP" => libc::SECCOMP_RET_TRAP,
        "SCMP_ACT_TRACE" => libc::SECCOMP_RET_TRACE | data,
        "SCMP_ACT_LOG" => libc::SECCOMP_RET_LOG,
        other => return Err(SeccompError::Action(other.into())),
    })
}

/// A condition from an OCI argument entry (`value`, `valueTwo`, `op`).
pub fn cond(index: usize, op: &str, value: u64, value_two: u64) -> Result<Cond, SeccompError> {
    if index > 5 {
        return Err(SeccompError::Index(index));
    }
    let (op, value) = match op {
        "SCMP_CMP_NE" => (Cmp::Ne, value),
        "SCMP_CMP_LT" => (Cmp::Lt, value),
        "SCMP_CMP_LE" => (Cmp::Le, value),
        "SCMP_CMP_EQ" => (Cmp::Eq, value),
        "SCMP_CMP_GE" => (Cmp::Ge, value),
        "SCMP_CMP_GT" => (Cmp::Gt, value),
        // As libseccomp: `value` is the mask, `valueTwo` what the masked
        // argument must equal.
        "SCMP_CMP_MASKED_EQ" => (Cmp::MaskedEq(value), value_two),
        other => return Err(SeccompError::Operator(other.into())),
    };
    Ok(Cond { index, op, value })
}

/// The number of a syscall name on x86_64.
pub fn number(name: &str) -> Option<u32> {
    syscalls::SYSCALLS
        .binary_search_by(|(n, _)| n.cmp(&name))
        .ok()
        .map(|i| syscalls::SYSCALLS[i].1 as u32)
}

fn stmt(code: u32, k: u32) -> Insn {
    Insn {
        code: code as u16,
        jt: 0,
        jf: 0,
        k,
    }
}

fn jump(code: u32, k: u32, jt: u8, jf: u8) -> Insn {
    Insn {
        code: (libc::BPF_JMP | code | libc::BPF_K) as u16,
        jt,
        jf,
        k,
    }
}

fn ret(k: u32) -> Insn {
    stmt(libc::BPF_RET | libc::BPF_K, k)
}

fn load(offset: u32) -> Insn {
    stmt(libc::BPF_LD | libc::BPF_W | libc::BPF_ABS, offset)
}

/// Instructions that fall through when `c` holds and jump `fail` past their
/// own end when it does not (so a rule is its conditions then its return).
fn cond_insns(c: &Cond, fail_past_end: usize) -> Vec<Insn> {
    // seccomp_data: nr u32, arch u32, ip u64, args [u64; 6]; little-endian.
    let lo_at = 16 + 8 * c.index as u32;
    let hi_at = lo_at + 4;
    let (hi, lo) = ((c.value >> 32) as u32, c.value as u32);
    use libc::{BPF_JEQ, BPF_JGE, BPF_JGT};
    // Each sequence as (instructions, with FAIL placeholders as u8::MAX).
    const F: u8 = u8::MAX;
    let mut v = match c.op {
        Cmp::Eq => vec![
            load(hi_at),
            jump(BPF_JEQ, hi, 0, F),
            load(lo_at),
            jump(BPF_JEQ, lo, 0, F),
        ],
        Cmp::Ne => vec![
            load(hi_at),
            jump(BPF_JEQ, hi, 0, 2),
            load(lo_at),
            jump(BPF_JEQ, lo, F, 0),
        ],
        Cmp::MaskedEq(mask) => vec![
            load(hi_at),
            stmt(
                libc::BPF_ALU | libc::BPF_AND | libc::BPF_K,
                (mask >> 32) as u32,
            ),
            jump(BPF_JEQ, hi, 0, F),
            load(lo_at),
            stmt(libc::BPF_ALU | libc::BPF_AND | libc::BPF_K, mask as u32),
            jump(BPF_JEQ, lo, 0, F),
        ],
        Cmp::Gt | Cmp::Ge => vec![
            load(hi_at),
            jump(BPF_JGT, hi, 3, 0),
            jump(BPF_JEQ, hi, 0, F),
            load(lo_at),
            jump(if c.op == Cmp::Gt { BPF_JGT } else { BPF_JGE }, lo, 0, F),
        ],
        Cmp::Lt | Cmp::Le => vec![
            load(hi_at),
            jump(BPF_JGT, hi, F, 0),
            jump(BPF_JEQ, hi, 0, 2),
            load(lo_at),
            // lo < v  ⇔ !(lo >= v); lo <= v ⇔ !(lo > v)
            jump(if c.op == Cmp::Lt { BPF_JGE } else { BPF_JGT }, lo, F, 0),
        ],
    };
    let len = v.len();
    for (i, insn) in v.iter_mut().enumerate() {
        // From instruction i, a jump of n lands at i + 1 + n; the end of
        // this sequence is at len, so FAIL is len - (i + 1) + fail_past_end.
        let to_fail = (len - i - 1 + fail_past_end) as u8;
        if insn.jt == F {
            insn.jt = to_fail;
        }
        if insn.jf == F {
            insn.jf = to_fail;
        }
    }
    v
}

/// The checks for one syscall number: each of its rules in order (the
/// first whose conditions hold returns its action), then the default.
fn leaf(rules: &[(&[Cond], u32)], default: u32) -> Vec<Insn> {
    let mut out = Vec::new();
    for (conds, action) in rules {
        // A rule: its conditions, each jumping past the rule's return on
        // failure, then the return.
        let mut block: Vec<Insn> = Vec::new();
        let lens: Vec<usize> = conds.iter().map(|c| cond_insns(c, 0).len()).collect();
        let total: usize = lens.iter().sum();
        let mut done = 0;
        for (c, len) in conds.iter().zip(lens) {
            done += len;
            // Past this sequence: the rest of the conditions, and the return.
            block.extend(cond_insns(c, total - done + 1));
        }
        block.push(ret(*action));
        out.extend(block);
        if conds.is_empty() {
            // Unconditional: the rules after it for this call never run.
            return out;
        }
    }
    out.push(ret(default));
    out
}

/// Compiles a profile: `default` for what no rule matches.
pub fn compile(default: u32, rules: &[Rule]) -> Result<Vec<Insn>, SeccompError> {
    // Per syscall number, its rules in the profile's order.
    let mut by_nr: std::collections::BTreeMap<u32, Vec<(&[Cond], u32)>> = Default::default();
    for rule in rules {
        for name in &rule.names {
            if let Some(nr) = number(name) {
                by_nr
                    .entry(nr)
                    .or_default()
                    .push((&rule.conds, rule.action));
            }
        }
    }
    let leaves: Vec<(u32, Vec<Insn>)> = by_nr
        .iter()
        .map(|(nr, rules)| (*nr, leaf(rules, default)))
        .collect();
    let mut prog = vec![
        load(4),
        jump(libc::BPF_JEQ, AUDIT_ARCH_X86_64, 1, 0),
        ret(default),
        load(0),
        jump(libc::BPF_JGE, X32_SYSCALL_BIT, 0, 1),
        ret(default),
    ];
    tree(&leaves, default, &mut prog);
    prog.push(ret(default));
    if prog.len() > MAX_INSNS {
        return Err(SeccompError::TooLong(prog.len()));
    }
    Ok(prog)
}

/// Emits a binary search over `leaves` (sorted by number; the accumulator
/// holds the number): each leaf's block runs when its number is the call's,
/// and every path that finds nothing returns `default`.
fn tree(leaves: &[(u32, Vec<Insn>)], default: u32, prog: &mut Vec<Insn>) {
    match leaves {
        [] => prog.push(ret(default)),
        [(nr, block)] => {
            prog.push(jump(libc::BPF_JEQ, *nr, 1, 0));
            prog.push(ret(default));
            prog.extend_from_slice(block);
        }
        _ => {
            let mid = leaves.len() / 2;
            // nr >= leaves[mid]: the right half, behind a long jump.
            prog.push(jump(libc::BPF_JGE, leaves[mid].0, 0, 1));
            let ja = prog.len();
            prog.push(stmt(libc::BPF_JMP | libc::BPF_JA, 0));
            tree(&leaves[..mid], default, prog);
            prog[ja].k = (prog.len() - ja - 1) as u32;
            tree(&leaves[mid..], default, prog);
        }
    }
}

/// The program as the kernel takes it.
pub fn sock_filters(prog: &[Insn]) -> Vec<libc::sock_filter> {
    prog.iter()
        .map(|i| libc::sock_filter {
            code: i.code,
            jt: i.jt,
            jf: i.jf,
            k: i.k,
        })
        .collect()
}

/// Installs `filters` on the calling thread (and what it execs); allocates
/// nothing (callable after a fork). Without `no_new_privs` the caller needs
/// CAP_SYS_ADMIN, as under runc.
pub fn install(filters: &[libc::sock_filter]) -> std::io::Result<()> {
    let fprog = libc::sock_fprog {
        len: filters.len() as u16,
        filter: filters.as_ptr() as *mut libc::sock_filter,
    };
    // SAFETY: a filter program the kernel copies and checks; the pointer
    // outlives the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_SET_MODE_FILTER,
            0,
            &fprog as *const libc::sock_fprog,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests;
