//! Scheduling priorities of the server's own helper threads, so that work nobody is waiting
//! on right now never delays a request: the busy-poll spinners run only on idle cores, and
//! batch jobs — their reader and writer threads (which parse and encode rows) and the runtime
//! their rows are driven from — yield to request handling whenever the cores are contended.

use std::sync::Mutex;

use anyhow::Context as _;

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

/// Moves the calling thread, one of a batch job's, to `SCHED_IDLE`. Not just nice 19: under
/// the fair scheduler a woken request thread may wait out a nice-19 thread's time slice (p99s
/// of 3 ms at c=8 beside a job, measured), while a `SCHED_IDLE` thread is preempted at once.
/// Such a thread still gets a sliver of a busy core (weight 3 against 1024), so a job never
/// stops for good, and one holding a lock the request path also wants runs as soon as that
/// request thread blocks on it. A failure is logged and the thread goes on as it is.
pub fn become_background() {
    if let Err(error) = become_idle() {
        tracing::warn!(
            %error,
            "cannot lower a batch job thread's priority; it runs at the default"
        );
    }
}

/// The runtime batch jobs run on: one worker thread, its blocking threads too, all at the idle
/// priority ([`become_background`]). Made once per process and kept for its lifetime (a
/// runtime must not be dropped from async code).
pub fn background_runtime() -> anyhow::Result<tokio::runtime::Handle> {
    static RUNTIME: Mutex<Option<tokio::runtime::Runtime>> = Mutex::new(None);
    let mut held = RUNTIME
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(runtime) = held.as_ref() {
        return Ok(runtime.handle().clone());
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("weft-jobs")
        .on_thread_start(become_background)
        .enable_all()
        .build()
        .context("cannot start the batch jobs' runtime")?;
    let handle = runtime.handle().clone();
    *held = Some(runtime);
    Ok(handle)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The scheduling policy of the calling thread.
    #[allow(unsafe_code)]
    fn own_policy() -> libc::c_int {
        // SAFETY: pid 0 is the calling thread; the call reads no memory of ours.
        unsafe { libc::sched_getscheduler(0) }
    }

    #[test]
    fn a_background_thread_runs_at_idle_priority_and_leaves_the_others_alone() {
        let before = own_policy();
        let inside = std::thread::spawn(|| {
            become_background();
            own_policy()
        })
        .join()
        .unwrap_or(-100);
        assert_eq!(inside, libc::SCHED_IDLE);
        assert_eq!(own_policy(), before, "only the calling thread is lowered");
    }

    #[test]
    fn the_background_runtime_runs_its_tasks_and_blocking_work_at_idle_priority() {
        let runtime = background_runtime().unwrap_or_else(|error| panic!("{error}"));
        let (task, blocking) = std::thread::spawn(move || {
            runtime.block_on(async {
                let task = tokio::spawn(async { own_policy() }).await.unwrap_or(-100);
                let blocking = tokio::task::spawn_blocking(own_policy)
                    .await
                    .unwrap_or(-100);
                (task, blocking)
            })
        })
        .join()
        .unwrap_or((-100, -100));
        assert_eq!((task, blocking), (libc::SCHED_IDLE, libc::SCHED_IDLE));
    }
}
