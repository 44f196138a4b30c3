//! The CPU backend's worker threads: the calling thread plus `threads - 1`
//! helpers that share each parallel loop by claiming task indices from an
//! atomic counter. A forward step issues ~30 parallel loops per token, each
//! tens of microseconds long, so helpers spin between loops instead of
//! sleeping (a futex wake-up costs about as much as a small loop); they park
//! once no work has come for `SPIN` outside a step. The machine may be
//! shared, so spinners yield now and then, and a loop never waits for a
//! helper that has not started on it: the caller retires the job and only
//! waits for helpers holding a reference to it.
//!
//! This is deliberately not a general pool: one loop at a time, run from the
//! thread that owns the `Team`, no nesting, no futures.

use std::cell::UnsafeCell;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle, Thread};
use std::time::{Duration, Instant};

/// How long an idle helper spins outside a forward step before parking.
const SPIN: Duration = Duration::from_micros(300);

/// One parallel loop: tasks `0..tasks` of `f`, claimed through `next`.
struct Job<'a> {
    tasks: usize,
    next: AtomicUsize,
    /// Tasks finished.
    done: AtomicUsize,
    panicked: AtomicBool,
    f: &'a (dyn Fn(usize) + Sync),
}

impl Job<'_> {
    /// Runs tasks until none is left.
    fn work(&self) {
        loop {
            let i = self.next.fetch_add(1, Ordering::Relaxed);
            if i >= self.tasks {
                return;
            }
            (self.f)(i);
            self.done.fetch_add(1, Ordering::Release);
        }
    }

    /// After a task panicked: counts it and every unclaimed task as done,
    /// so `run` stops waiting and re-raises the panic.
    fn abandon(&self) {
        let left = self
            .tasks
            .saturating_sub(self.next.swap(self.tasks, Ordering::Relaxed));
        self.done.fetch_add(left + 1, Ordering::Release);
    }
}

struct Shared {
    /// Bumped once per job; helpers compare it with the last one they ran.
    generation: AtomicUsize,
    /// The current job, null between jobs; valid while non-null.
    job: AtomicPtr<Job<'static>>,
    /// Helpers that may be dereferencing `job`.
    refs: AtomicUsize,
    /// Inside a forward step: helpers spin without time limit.
    active: AtomicBool,
    /// Per helper: parked (or about to park), so `run` must unpark it.
    sleeping: Vec<AtomicBool>,
    quit: AtomicBool,
}

/// The calling thread and its helpers.
pub struct Team {
    shared: Arc<Shared>,
    helpers: Vec<(Thread, JoinHandle<()>)>,
    /// Keeps `Team` `!Sync`: `run` must not be entered from two threads.
    _not_sync: std::marker::PhantomData<UnsafeCell<()>>,
}

impl Team {
    /// A team of `threads` threads in all (at least one: the caller).
    pub fn new(threads: usize) -> std::io::Result<Team> {
        let helpers = threads.max(1) - 1;
        let shared = Arc::new(Shared {
            generation: AtomicUsize::new(0),
            job: AtomicPtr::new(std::ptr::null_mut()),
            refs: AtomicUsize::new(0),
            active: AtomicBool::new(false),
            sleeping: (0..helpers).map(|_| AtomicBool::new(false)).collect(),
            quit: AtomicBool::new(false),
        });
        let mut team = Team {
            shared: shared.clone(),
            helpers: Vec::with_capacity(helpers),
            _not_sync: std::marker::PhantomData,
        };
        for i in 0..helpers {
            let shared = shared.clone();
            let handle = thread::Builder::new()
                .name(format!("llama2-cpu-{}", i + 1))
                .spawn(move || helper(&shared, i))?;
            team.helpers.push((handle.thread().clone(), handle));
        }
        Ok(team)
    }

    /// Threads in the team, the caller included.
    pub fn threads(&self) -> usize {
        self.helpers.len() + 1
    }

    /// Marks the start (`true`) or end of a forward step: helpers spin for
    /// the whole step, then park after `SPIN` without work.
    pub fn set_active(&self, active: bool) {
        self.shared.active.store(active, Ordering::Relaxed);
    }

    /// Runs `f(0)` .. `f(tasks - 1)` across the team and returns when all
    /// have finished. A panic in any task is re-raised here.
    pub fn run(&self, tasks: usize, f: &(dyn Fn(usize) + Sync)) {
        if self.helpers.is_empty() || tasks <= 1 {
            (0..tasks).for_each(f);
            return;
        }
        let job = Job {
            tasks,
            next: AtomicUsize::new(0),
            done: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
            f,
        };
        let s = &*self.shared;
        // SAFETY: helpers dereference the pointer only while counted in
        // `refs` and after reading it non-null; this function clears it and
        // then waits for `refs` to drop to zero before returning (or
        // unwinding), so `job` and `f` outlive every use.
        let ptr = unsafe {
            std::mem::transmute::<*const Job<'_>, *mut Job<'static>>(&job as *const Job<'_>)
        };
        s.job.store(ptr, Ordering::SeqCst);
        s.generation.fetch_add(1, Ordering::SeqCst);
        for (i, (t, _)) in self.helpers.iter().enumerate() {
            if s.sleeping[i].swap(false, Ordering::SeqCst) {
                t.unpark();
            }
        }
        let mine = catch_unwind(AssertUnwindSafe(|| job.work()));
        if mine.is_err() {
            job.abandon();
        }
        wait_until(|| job.done.load(Ordering::Acquire) >= job.tasks);
        s.job.store(std::ptr::null_mut(), Ordering::SeqCst);
        wait_until(|| s.refs.load(Ordering::SeqCst) == 0);
        if let Err(p) = mine {
            std::panic::resume_unwind(p);
        }
        assert!(
            !job.panicked.load(Ordering::Relaxed),
            "a CPU worker thread panicked"
        );
    }

    /// Splits `data` into chunks of `chunk` elements (the last may be
    /// shorter) and runs `f(k, chunk_k)` for each across the team.
    pub fn for_each_chunk<T: Send>(
        &self,
        data: &mut [T],
        chunk: usize,
        f: impl Fn(usize, &mut [T]) + Sync,
    ) {
        let chunk = chunk.max(1);
        let len = data.len();
        let base = SendPtr(data.as_mut_ptr());
        self.run(len.div_ceil(chunk), &|k| {
            let start = k * chunk;
            let end = (start + chunk).min(len);
            // SAFETY: task `k` is run exactly once and owns elements
            // `start..end`, disjoint from every other task's; `data` is
            // borrowed mutably for the whole of `run`.
            let part =
                unsafe { std::slice::from_raw_parts_mut(base.get().add(start), end - start) };
            f(k, part)
        });
    }
}

/// A pointer that may cross threads; users guarantee disjoint access.
struct SendPtr<T>(*mut T);
// SAFETY: only used by `for_each_chunk`, whose tasks touch disjoint elements
// of a slice of `Send` values.
unsafe impl<T: Send> Sync for SendPtr<T> {}

impl<T> SendPtr<T> {
    fn get(&self) -> *mut T {
        self.0
    }
}

impl Drop for Team {
    fn drop(&mut self) {
        self.shared.quit.store(true, Ordering::SeqCst);
        for (t, h) in self.helpers.drain(..) {
            t.unpark();
            let _ = h.join();
        }
    }
}

/// Spins until `ready`, yielding the core now and then in case the thread
/// being waited for is not running.
fn wait_until(ready: impl Fn() -> bool) {
    let mut spins = 0u32;
    while !ready() {
        spins = spins.wrapping_add(1);
        if spins.is_multiple_of(64) {
            thread::yield_now();
        } else {
            std::hint::spin_loop();
        }
    }
}

/// A helper's loop: wait for a new generation (spinning, then parking), run
/// the job's tasks, check out.
fn helper(s: &Shared, i: usize) {
    let mut seen = 0;
    loop {
        let mut idle_since = Instant::now();
        let mut spins = 0u32;
        loop {
            let g = s.generation.load(Ordering::Acquire);
            if g != seen {
                seen = g;
                break;
            }
            if s.quit.load(Ordering::Relaxed) {
                return;
            }
            spins = spins.wrapping_add(1);
            if !spins.is_multiple_of(256) {
                std::hint::spin_loop();
                continue;
            }
            thread::yield_now();
            if s.active.load(Ordering::Relaxed) {
                idle_since = Instant::now();
                continue;
            }
            if idle_since.elapsed() < SPIN {
                continue;
            }
            s.sleeping[i].store(true, Ordering::SeqCst);
            if s.generation.load(Ordering::SeqCst) == seen && !s.quit.load(Ordering::SeqCst) {
                thread::park();
            }
            s.sleeping[i].store(false, Ordering::SeqCst);
            idle_since = Instant::now();
        }
        s.refs.fetch_add(1, Ordering::SeqCst);
        let job = s.job.load(Ordering::SeqCst);
        if !job.is_null() {
            // SAFETY: non-null and read while counted in `refs`: `run` keeps
            // the job alive until `refs` drops to zero after clearing it.
            let job = unsafe { &*job };
            if catch_unwind(AssertUnwindSafe(|| job.work())).is_err() {
                job.panicked.store(true, Ordering::Relaxed);
                job.abandon();
            }
        }
        s.refs.fetch_sub(1, Ordering::Release);
    }
}
