//! The model worker's sandbox, applied by the worker to itself after ONNX Runtime is loaded and
//! the shared arena mapped, and before it reads a single byte of a tenant's model.
//!
//! Layers, each enough on its own for what it covers:
//! - **Landlock** (Linux 5.13+): every filesystem access right is handled and none granted, so
//!   no path can be opened, listed, written or executed; from ABI 4 TCP bind/connect are denied
//!   too, and from ABI 6 abstract Unix sockets and signals outside the sandbox.
//! - **seccomp** (a deny list, so ONNX Runtime's own syscalls keep working): no new sockets, no
//!   exec, no child processes (threads only), no ptrace, pidfds or cross-process memory access,
//!   no signals, rlimits, priorities or CPU affinity aimed at another process (the server runs
//!   as the same user), no mounts, namespaces, BPF, keyrings, io_uring, kernel modules or
//!   `open_by_handle_at`, no x32 calls. Denied calls fail with `EPERM` (`ENOSYS` for clone3
//!   and x32).
//! - **rlimits**: address space (the tenant's `model_memory_mb` above the worker's baseline),
//!   no core dumps, no file growth, few descriptors; plus `no_new_privs` and a lower CPU
//!   priority than the server's own threads.
//!
//! The environment is empty and the working directory `/` (set by the server when spawning).
//!
//! Landlock is required: a kernel without it gets an error that says so, unless the operator
//! starts the server with `--allow-weak-model-sandbox` (then seccomp and rlimits still apply).

use std::collections::BTreeMap;

use landlock::{ABI, Access, AccessFs, AccessNet, Ruleset, RulesetAttr, RulesetStatus, Scope};
use rustix::process::{Resource, Rlimit};
use seccompiler::{SeccompAction, SeccompFilter, TargetArch};
use weft_core::{Error, Result};

/// What the sandbox may be, set by the server.
#[derive(Clone, Debug)]
pub struct SandboxPolicy {
    /// Bytes of address space the worker may add to what it has when the sandbox closes.
    pub memory_limit: Option<u64>,
    /// Accept a kernel without Landlock (seccomp and rlimits only).
    pub allow_weak: bool,
    /// Nice value of the worker (0 = the server's own priority; higher yields the CPU to the
    /// server's request handling under contention).
    pub nice: i32,
}

/// Applies the sandbox to the calling process; returns a one-line description of what holds.
pub fn apply(policy: &SandboxPolicy) -> Result<String> {
    // Landlock binds the calling thread and the threads it starts later, so no other thread
    // may exist yet (one started before would stay outside the sandbox).
    if let Ok(tasks) = std::fs::read_dir("/proc/self/task") {
        let count = tasks.count();
        if count > 1 {
            return Err(Error::internal(format!(
                "the model worker has {count} threads before its sandbox closes; it must have one"
            )));
        }
    }
    let mut holds = Vec::new();
    rustix::thread::set_no_new_privs(true)
        .map_err(|error| Error::internal(format!("cannot set no_new_privs: {error}")))?;
    limits(policy, &mut holds)?;
    landlock(policy, &mut holds)?;
    seccomp(&mut holds)?;
    Ok(holds.join(", "))
}

fn set(resource: Resource, value: u64) -> Result<()> {
    rustix::process::setrlimit(
        resource,
        Rlimit {
            current: Some(value),
            maximum: Some(value),
        },
    )
    .map_err(|error| Error::internal(format!("cannot set {resource:?} limit: {error}")))
}

fn limits(policy: &SandboxPolicy, holds: &mut Vec<String>) -> Result<()> {
    set(Resource::Core, 0)?;
    set(Resource::Fsize, 0)?;
    set(Resource::Nofile, 64)?;
    if let Some(limit) = policy.memory_limit {
        let baseline = address_space_now().unwrap_or(0);
        set(Resource::As, baseline.saturating_add(limit))?;
        holds.push(format!("address space {} MiB above baseline", limit >> 20));
    }
    if policy.nice != 0 {
        let _ = rustix::process::setpriority_process(None, policy.nice.clamp(0, 19));
        holds.push(format!("nice {}", policy.nice.clamp(0, 19)));
    }
    holds.push("rlimits".into());
    Ok(())
}

/// The process's current virtual size (first field of /proc/self/statm, in pages).
fn address_space_now() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = text.split_whitespace().next()?.parse().ok()?;
    Some(pages * rustix::param::page_size() as u64)
}

fn landlock(policy: &SandboxPolicy, holds: &mut Vec<String>) -> Result<()> {
    let abi = ABI::V6;
    let refused = |error: landlock::RulesetError| {
        Error::unavailable(format!("cannot build the Landlock sandbox: {error}"))
    };
    // Best effort: network (ABI 4) and scopes (ABI 6) are taken where the kernel has them
    // (seccomp denies new sockets regardless); filesystem rights exist from ABI 1 on, so any
    // enforcement at all covers the filesystem.
    let status = Ruleset::default()
        .handle_access(AccessFs::from_all(abi))
        .map_err(refused)?
        .handle_access(AccessNet::from_all(abi))
        .map_err(refused)?
        .scope(Scope::from_all(abi))
        .map_err(refused)?
        .create()
        .map_err(refused)?
        .restrict_self()
        .map_err(refused)?;
    match status.ruleset {
        RulesetStatus::FullyEnforced => holds.push("landlock (filesystem, network, scopes)".into()),
        RulesetStatus::PartiallyEnforced => holds.push("landlock (filesystem)".into()),
        RulesetStatus::NotEnforced if policy.allow_weak => {
            holds.push("NO landlock (kernel lacks it; --allow-weak-model-sandbox)".into())
        }
        RulesetStatus::NotEnforced => {
            return Err(Error::unavailable(
                "this kernel does not enforce Landlock, so a tenant model's worker could read \
                 the server's files; use Linux 5.13 or newer with Landlock enabled, or start \
                 the server with --allow-weak-model-sandbox to accept seccomp and rlimits only",
            ));
        }
    }
    Ok(())
}

fn seccomp(holds: &mut Vec<String>) -> Result<()> {
    use seccompiler::{SeccompCmpArgLen as Len, SeccompCmpOp as Op, SeccompCondition, SeccompRule};
    let pid = u64::from(
        rustix::process::getpid()
            .as_raw_nonzero()
            .get()
            .unsigned_abs(),
    );
    let condition = |arg: u8, len: Len, op: Op, value: u64| {
        SeccompCondition::new(arg, len, op, value)
            .map_err(|error| Error::internal(format!("seccomp condition: {error}")))
    };
    let rule = |conditions: Vec<SeccompCondition>| {
        SeccompRule::new(conditions)
            .map_err(|error| Error::internal(format!("seccomp rule: {error}")))
    };
    let always: &[i64] = &[
        libc::SYS_socket,
        libc::SYS_socketpair,
        libc::SYS_connect,
        libc::SYS_bind,
        libc::SYS_listen,
        libc::SYS_accept,
        libc::SYS_accept4,
        libc::SYS_execve,
        libc::SYS_execveat,
        libc::SYS_fork,
        libc::SYS_vfork,
        libc::SYS_ptrace,
        libc::SYS_process_vm_readv,
        libc::SYS_process_vm_writev,
        libc::SYS_process_madvise,
        libc::SYS_kcmp,
        libc::SYS_pidfd_open,
        libc::SYS_pidfd_send_signal,
        libc::SYS_pidfd_getfd,
        libc::SYS_tkill,
        libc::SYS_mount,
        libc::SYS_umount2,
        libc::SYS_pivot_root,
        libc::SYS_chroot,
        libc::SYS_unshare,
        libc::SYS_setns,
        libc::SYS_bpf,
        libc::SYS_perf_event_open,
        libc::SYS_keyctl,
        libc::SYS_add_key,
        libc::SYS_request_key,
        libc::SYS_init_module,
        libc::SYS_finit_module,
        libc::SYS_delete_module,
        libc::SYS_kexec_load,
        libc::SYS_userfaultfd,
        libc::SYS_io_uring_setup,
        libc::SYS_open_by_handle_at,
        libc::SYS_name_to_handle_at,
        libc::SYS_memfd_create,
    ];
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> =
        always.iter().map(|&call| (call, Vec::new())).collect();
    // Calls that may only aim at the worker itself (pid 0 or its own pid): the server runs
    // as the same user, so these would otherwise reach it.
    let not_self = |arg: u8| -> Result<Vec<SeccompCondition>> {
        Ok(vec![
            condition(arg, Len::Dword, Op::Ne, 0)?,
            condition(arg, Len::Dword, Op::Ne, pid)?,
        ])
    };
    // kill(0) and kill(-1) reach the process group and every process: only its own pid.
    rules.insert(
        libc::SYS_kill,
        vec![rule(vec![condition(0, Len::Dword, Op::Ne, pid)?])?],
    );
    rules.insert(
        libc::SYS_tgkill,
        vec![rule(vec![condition(0, Len::Dword, Op::Ne, pid)?])?],
    );
    rules.insert(libc::SYS_prlimit64, vec![rule(not_self(0)?)?]);
    rules.insert(libc::SYS_setpriority, vec![rule(not_self(1)?)?]);
    for call in [
        libc::SYS_sched_setaffinity,
        libc::SYS_sched_setscheduler,
        libc::SYS_sched_setparam,
        libc::SYS_sched_setattr,
    ] {
        rules.insert(call, vec![rule(not_self(0)?)?]);
    }
    // Threads only: a child process would escape the address-space limit (it is per process)
    // and the parent-death signal.
    rules.insert(
        libc::SYS_clone,
        vec![rule(vec![condition(
            0,
            Len::Qword,
            Op::MaskedEq(libc::CLONE_THREAD as u64),
            0,
        )?])?],
    );
    apply_filter(rules, libc::EPERM)?;
    // clone3 cannot be inspected (its flags are in memory): ENOSYS makes glibc fall back to
    // clone, which the filter above does inspect.
    apply_filter(
        [(libc::SYS_clone3, Vec::new())].into_iter().collect(),
        libc::ENOSYS,
    )?;
    refuse_x32()?;
    holds.push("seccomp".into());
    Ok(())
}

fn apply_filter(rules: BTreeMap<i64, Vec<seccompiler::SeccompRule>>, errno: i32) -> Result<()> {
    let arch = TargetArch::try_from(std::env::consts::ARCH)
        .map_err(|error| Error::unavailable(format!("no seccomp filter for this CPU: {error}")))?;
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(errno as u32),
        arch,
    )
    .map_err(|error| Error::internal(format!("cannot build the seccomp filter: {error}")))?;
    let program: seccompiler::BpfProgram = filter
        .try_into()
        .map_err(|error| Error::internal(format!("cannot compile the seccomp filter: {error}")))?;
    seccompiler::apply_filter_all_threads(&program)
        .map_err(|error| Error::internal(format!("cannot apply the seccomp filter: {error}")))
}

/// x32 system calls (numbers with bit 30 set) share x86_64's architecture tag, so a deny list
/// keyed by number would not see them: refuse every one of them (ENOSYS).
#[cfg(target_arch = "x86_64")]
fn refuse_x32() -> Result<()> {
    use seccompiler::sock_filter;
    const LOAD_NR: u16 = 0x20; // BPF_LD | BPF_W | BPF_ABS, offset 0: seccomp_data.nr
    const JUMP_IF_GE: u16 = 0x35; // BPF_JMP | BPF_JGE | BPF_K
    const RETURN: u16 = 0x06; // BPF_RET | BPF_K
    let program = vec![
        sock_filter {
            code: LOAD_NR,
            jt: 0,
            jf: 0,
            k: 0,
        },
        sock_filter {
            code: JUMP_IF_GE,
            jt: 0,
            jf: 1,
            k: 0x4000_0000,
        },
        sock_filter {
            code: RETURN,
            jt: 0,
            jf: 0,
            k: 0x0005_0000 | libc::ENOSYS as u32, // SECCOMP_RET_ERRNO
        },
        sock_filter {
            code: RETURN,
            jt: 0,
            jf: 0,
            k: 0x7fff_0000, // SECCOMP_RET_ALLOW
        },
    ];
    seccompiler::apply_filter_all_threads(&program)
        .map_err(|error| Error::internal(format!("cannot apply the x32 seccomp filter: {error}")))
}

#[cfg(not(target_arch = "x86_64"))]
fn refuse_x32() -> Result<()> {
    Ok(())
}
