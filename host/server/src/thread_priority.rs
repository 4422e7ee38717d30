//! Scheduling priorities of the server's own helper threads, so that work nobody is waiting
//! on right now never delays a request: the busy-poll spinners run only on idle cores, and a
//! batch job's reader and writer threads (which parse and encode its rows) yield to request
//! handling whenever the cores are contended.

/// Moves the calling thread to the `SCHED_IDLE` scheduling policy: it runs only when no other
/// thread of the machine wants the core.
#[allow(unsafe_code)]
pub fn become_idle() -> std::io::Result<()> {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: pid 0 is the calling thread; `param` is a valid sched_param that outlives the
    // call, which only reads it.
    let result = unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) };
    if result == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// The nice value of background threads: the lowest. Against threads at the default 0, the
/// scheduler gives them about 1.5 % of a contended core (weight 15 against 1024), and all of
/// an idle one.
const BACKGROUND_NICE: libc::c_int = 19;

/// Lowers the calling thread to nice 19, for a batch job's own threads. Not `SCHED_IDLE`: a
/// job thread must still make progress on a busy machine, or one holding a lock the request
/// path also takes (the batcher's queue, the store) could hold it for as long as the cores
/// stay busy. A failure is logged and the thread goes on at its priority.
pub fn become_background() {
    // SAFETY: gettid has no preconditions and cannot fail.
    #[allow(unsafe_code)]
    let thread = unsafe { libc::gettid() };
    let Ok(thread) = libc::id_t::try_from(thread) else {
        return;
    };
    // On Linux the nice value is per thread: PRIO_PROCESS with a thread id changes only it.
    // SAFETY: plain system call on this thread's id; it reads no memory of ours.
    #[allow(unsafe_code)]
    let result = unsafe { libc::setpriority(libc::PRIO_PROCESS, thread, BACKGROUND_NICE) };
    if result != 0 {
        tracing::warn!(
            error = %std::io::Error::last_os_error(),
            "cannot lower a batch job thread's priority; it runs at the default"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The nice value of the calling thread.
    #[allow(unsafe_code)]
    fn own_nice() -> libc::c_int {
        // SAFETY: as in become_background.
        let thread = unsafe { libc::gettid() } as libc::id_t;
        // SAFETY: as in become_background.
        unsafe { libc::getpriority(libc::PRIO_PROCESS, thread) }
    }

    #[test]
    fn a_background_thread_runs_at_nice_19_and_leaves_the_others_alone() {
        let before = own_nice();
        let inside = std::thread::spawn(|| {
            become_background();
            own_nice()
        })
        .join()
        .unwrap_or(-100);
        assert_eq!(inside, BACKGROUND_NICE);
        assert_eq!(own_nice(), before, "only the calling thread is lowered");
    }
}
