//! Two halves of a short section at once, the second on a helper thread that stays awake
//! between sections.
//!
//! A small-batch step (batch 8: about half a millisecond) has a few parallel sections of
//! 20-200 µs each. rayon parks an idle thread after a few microseconds of spinning, and waking
//! a parked thread took ~45 µs on the 2-vCPU VMs this was measured on (a futex wake-up, median
//! of 2,000), as long as the section it was woken for; a spinning thread answers in ~0.2 µs.
//! So [`join`] hands the second half to one process-wide helper that spins (yielding the CPU
//! to anything else runnable) for [`SPIN`] after each section before it parks.
//!
//! One caller at a time: a [`join`] that finds the helper busy (another trainer in the same
//! process, or a `join` inside a `join`) runs both halves itself, one after the other, as it
//! does on a thread whose products are serial ([`super::linalg::join`]'s halves). With a
//! single rayon thread it never starts the helper, and after [`share_the_cores`] it uses it no
//! more.

use std::cell::UnsafeCell;
use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, TryLockError};
use std::thread::Thread;
use std::time::{Duration, Instant};

/// How long the helper spins for the next section before it parks.
const SPIN: Duration = Duration::from_micros(500);

/// A type-erased `FnOnce` on the caller's stack, valid until the helper reports it finished.
#[derive(Clone, Copy)]
struct Job {
    call: unsafe fn(*mut ()),
    data: *mut (),
}

struct Shared {
    /// Sections posted so far; the helper runs section `posted` when it moves.
    posted: AtomicU64,
    /// Sections the helper has finished.
    finished: AtomicU64,
    /// Whether the helper is parked (or about to be) and needs an unpark.
    sleeping: AtomicBool,
    /// The helper's half of the section: written before `posted` moves, read after.
    job: UnsafeCell<Option<Job>>,
    /// A panic of the helper's half, handed back to the caller.
    panic: Mutex<Option<Box<dyn std::any::Any + Send>>>,
}

// SAFETY: `job` is written only by the one caller holding `HELPER`'s lock, before it
// publishes the section through `posted` (release), and read by the helper only after it sees
// that (acquire) and before it stores `finished`; once it has posted, the caller does not
// return, or unwind, until then (its `Wait` guard). Every other field is atomic or locked.
unsafe impl Sync for Shared {}
unsafe impl Send for Shared {}

struct Helper {
    shared: Arc<Shared>,
    thread: Thread,
}

static HELPER: OnceLock<Option<Mutex<Helper>>> = OnceLock::new();

/// Set by [`share_the_cores`]: no section goes to the helper.
static OFF: AtomicBool = AtomicBool::new(false);

/// Keeps every training step on its own thread (and rayon's pool) from now on, for a process
/// whose trainers share the cores (a coordinator with several local workers): a helper that
/// spins between one trainer's sections would take time from the others.
pub fn share_the_cores() {
    OFF.store(true, Ordering::Relaxed);
}

fn helper() -> Option<&'static Mutex<Helper>> {
    HELPER
        .get_or_init(|| {
            if rayon::current_num_threads() < 2 {
                return None;
            }
            let shared = Arc::new(Shared {
                posted: AtomicU64::new(0),
                finished: AtomicU64::new(0),
                sleeping: AtomicBool::new(false),
                job: UnsafeCell::new(None),
                panic: Mutex::new(None),
            });
            let theirs = Arc::clone(&shared);
            let handle = std::thread::Builder::new()
                .name("msae-duo".into())
                .spawn(move || serve(&theirs))
                .ok()?;
            Some(Mutex::new(Helper { shared, thread: handle.thread().clone() }))
        })
        .as_ref()
}

/// Whether rayon has exactly two threads, so the helper is as wide as rayon's pool (wider
/// pools keep rayon for the large products).
pub(crate) fn is_the_pool() -> bool {
    rayon::current_num_threads() == 2 && !OFF.load(Ordering::Relaxed)
}

/// Whether [`share_the_cores`] has turned the helper off.
pub(crate) fn is_off() -> bool {
    OFF.load(Ordering::Relaxed)
}

/// The helper's loop: wait for a section (spinning, then parked), run its half, report.
fn serve(shared: &Shared) {
    let mut seen = 0;
    loop {
        let mut since = Instant::now();
        let mut spins = 0u32;
        while shared.posted.load(Ordering::Acquire) == seen {
            std::hint::spin_loop();
            spins = spins.wrapping_add(1);
            if !spins.is_multiple_of(64) {
                continue;
            }
            if since.elapsed() < SPIN {
                std::thread::yield_now();
                continue;
            }
            // SeqCst pairs with the caller's post-then-check: either it sees `sleeping` and
            // unparks, or this re-check sees its section.
            shared.sleeping.store(true, Ordering::SeqCst);
            if shared.posted.load(Ordering::SeqCst) == seen {
                std::thread::park();
            }
            shared.sleeping.store(false, Ordering::SeqCst);
            since = Instant::now();
        }
        seen += 1;
        // SAFETY: see `Shared`: the caller wrote the job before posting section `seen` and
        // keeps its data alive until `finished` reaches it.
        let job = unsafe { (*shared.job.get()).expect("a posted section has a job") };
        if let Err(panic) = catch_unwind(AssertUnwindSafe(|| unsafe { (job.call)(job.data) })) {
            *shared.panic.lock().unwrap_or_else(|e| e.into_inner()) = Some(panic);
        }
        shared.finished.store(seen, Ordering::Release);
    }
}

/// Runs `a` here and `b` on the helper at once, each with its products serial; both run
/// here, `a` first and each still with serial products, when the helper is busy, off or
/// absent. A panic in either is raised here once both halves have ended.
pub(crate) fn join<RA, RB: Send>(
    a: impl FnOnce() -> RA,
    b: impl FnOnce() -> RB + Send,
) -> (RA, RB) {
    join_with(false, a, b)
}

/// [`join`]; `queue` waits for a busy helper instead of running serially (for the tests,
/// which share the helper and must use it).
fn join_with<RA, RB: Send, FB: FnOnce() -> RB + Send>(
    queue: bool,
    a: impl FnOnce() -> RA,
    b: FB,
) -> (RA, RB) {
    use super::linalg::serially;
    let on = !is_off() && !super::linalg::is_serial();
    let Some(lock) = on.then(helper).flatten() else {
        return (serially(a), serially(b));
    };
    let taken = if queue { lock.lock().map_err(TryLockError::from) } else { lock.try_lock() };
    let helper = match taken {
        Ok(guard) => guard,
        Err(TryLockError::Poisoned(e)) => e.into_inner(),
        Err(TryLockError::WouldBlock) => return (serially(a), serially(b)),
    };
    let shared = &*helper.shared;
    // A helper panic left behind by a section whose own half panicked first.
    shared.panic.lock().unwrap_or_else(|e| e.into_inner()).take();

    unsafe fn call<F: FnOnce() -> R, R>(data: *mut ()) {
        // SAFETY: `data` is the slot that `join_with` posted, alive until it sees the
        // section finished, and only the helper touches it meanwhile.
        let slot = unsafe { &mut *data.cast::<(Option<F>, Option<R>)>() };
        let f = slot.0.take().expect("a section's job runs once");
        slot.1 = Some(serially(f));
    }
    let mut slot: (Option<FB>, Option<RB>) = (Some(b), None);
    let section = shared.posted.load(Ordering::Relaxed) + 1;
    // SAFETY: the helper reads `job` only after `posted` moves to `section`, below.
    unsafe {
        *shared.job.get() = Some(Job { call: call::<FB, RB>, data: (&raw mut slot).cast() });
    }
    shared.posted.store(section, Ordering::SeqCst);
    if shared.sleeping.load(Ordering::SeqCst) {
        helper.thread.unpark();
    }

    /// Waits for the helper's half even while `a` unwinds: it borrows this frame.
    struct Wait<'s>(&'s Shared, u64);
    impl Drop for Wait<'_> {
        fn drop(&mut self) {
            let mut spins = 0u32;
            while self.0.finished.load(Ordering::Acquire) < self.1 {
                std::hint::spin_loop();
                spins = spins.wrapping_add(1);
                if spins.is_multiple_of(64) {
                    std::thread::yield_now();
                }
            }
        }
    }
    let wait = Wait(shared, section);
    let ra = serially(a);
    drop(wait);
    if let Some(panic) = shared.panic.lock().unwrap_or_else(|e| e.into_inner()).take() {
        resume_unwind(panic);
    }
    (ra, slot.1.take().expect("the helper ran its half"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_halves_run_and_return_their_results() {
        let mut left = vec![0u32; 1000];
        let mut right = vec![0u32; 1000];
        for round in 0..200u32 {
            let (a, b) = join(
                || {
                    left.iter_mut().for_each(|v| *v += round);
                    left[0]
                },
                || {
                    right.iter_mut().for_each(|v| *v += 2 * round);
                    right[999]
                },
            );
            assert_eq!((a, b), ((0..=round).sum(), 2 * (0..=round).sum::<u32>()));
        }
    }

    #[test]
    fn a_join_inside_a_join_runs_serially() {
        let (inner, x) = join(|| join(|| 1, || 2), || 3);
        assert_eq!((inner, x), ((1, 2), 3));
    }

    #[test]
    fn the_helper_parks_and_wakes_for_the_next_section() {
        if helper().is_none() {
            return; // One rayon thread: no helper to observe.
        }
        let on = |n: u32| move || (n, std::thread::current().name().map(String::from));
        let (_, (_, there)) = join_with(true, on(1), on(2));
        assert_eq!(there.as_deref(), Some("msae-duo"), "the second half ran on the helper");
        std::thread::sleep(SPIN * 4);
        let (_, (n, there)) = join_with(true, on(3), on(4));
        assert_eq!((n, there.as_deref()), (4, Some("msae-duo")));
    }

    #[test]
    fn a_panic_on_the_helper_reaches_the_caller_and_the_helper_survives() {
        let caught = catch_unwind(|| join_with(true, || 1, || -> u32 { panic!("helper half") }));
        let message = caught.unwrap_err();
        assert_eq!(message.downcast_ref::<&str>(), Some(&"helper half"));
        assert_eq!(join_with(true, || 5, || 6), (5, 6));
    }

    #[test]
    fn a_panic_here_waits_for_the_helper_half() {
        if helper().is_none() {
            return; // One rayon thread: `b` never starts once `a` has panicked.
        }
        let done = AtomicBool::new(false);
        let caught = catch_unwind(AssertUnwindSafe(|| {
            join_with(
                true,
                || -> u32 { panic!("caller half") },
                || {
                    std::thread::sleep(Duration::from_millis(20));
                    done.store(true, Ordering::SeqCst);
                },
            )
        }));
        assert!(caught.is_err());
        assert!(done.load(Ordering::SeqCst), "the helper's half ended before the unwind");
    }
}
