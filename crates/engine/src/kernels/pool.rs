//! A fixed-size thread pool for the data-parallel kernels of one forward pass.
//!
//! A decode step dispatches a few hundred small jobs, so dispatch must cost well under a
//! microsecond: after each job, workers busy-wait on an atomic job word for ~50 µs, then
//! poll it while yielding their core for ~2 ms, and only then park on a condition
//! variable (an idle server burns no CPU). The calling thread takes tasks too, so a pool
//! of `n` threads has `n - 1` workers.
//!
//! Every job is published as one 64-bit word — generation, task count and the next
//! unclaimed task index — and a task is claimed by a compare-and-swap on that word, so a
//! worker can never claim a task of a job other than the one it read. [`ThreadPool::run`]
//! returns only after all tasks of its job have finished, which is what lets tasks
//! borrow from the caller's stack.

use std::any::Any;
use std::cell::{Cell, UnsafeCell};
use std::ops::Range;
use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::KernelError;

/// How long an idle worker busy-waits for the next job (the gaps inside a forward pass
/// are microseconds)…
const SPIN: Duration = Duration::from_micros(50);
/// …then keeps polling but yields its core between polls (another process's threads may
/// need it), until it parks.
const YIELD_BEFORE_PARK: Duration = Duration::from_micros(2000);

/// 16 bits each for the task count and the next task, 32 for the generation: a worker
/// would have to stall between reading and swapping the job word for 2³² jobs to be
/// fooled by a wrapped generation.
const TASK_BITS: u32 = 16;
const TASK_MASK: u64 = (1 << TASK_BITS) - 1;
const GEN_MASK: u64 = (1 << (64 - 2 * TASK_BITS)) - 1;
/// The most tasks one published job can hold; `run` splits larger counts into rounds.
const MAX_TASKS_PER_JOB: usize = TASK_MASK as usize;

/// The published job word: generation | task count | next unclaimed task.
#[derive(Clone, Copy, PartialEq, Eq)]
struct JobWord(u64);

impl JobWord {
    fn new(generation: u64, n_tasks: usize, next: usize) -> Self {
        Self(
            ((generation & GEN_MASK) << (2 * TASK_BITS))
                | ((n_tasks as u64) << TASK_BITS)
                | next as u64,
        )
    }
    fn generation(self) -> u64 {
        self.0 >> (2 * TASK_BITS)
    }
    fn n_tasks(self) -> usize {
        ((self.0 >> TASK_BITS) & TASK_MASK) as usize
    }
    fn next(self) -> usize {
        (self.0 & TASK_MASK) as usize
    }
}

/// Keeps a hot atomic on its own cache lines.
#[repr(align(128))]
struct Padded<T>(T);

type TaskFn<'a> = dyn Fn(usize) + Sync + 'a;

struct Shared {
    job_word: Padded<AtomicU64>,
    finished: Padded<AtomicUsize>,
    /// The current job's closure. Written by the dispatching thread only while no task
    /// is claimable or running; read by a thread only after it claimed a task.
    task: UnsafeCell<Option<*const TaskFn<'static>>>,
    panic: Mutex<Option<Box<dyn Any + Send>>>,
    sleepers: AtomicUsize,
    sleep_lock: Mutex<()>,
    wake: Condvar,
    shutdown: AtomicBool,
}

// SAFETY: the only non-Sync field is `task`. It is written by the single dispatching
// thread (serialised by `ThreadPool::dispatch_lock`) before the job word that makes its
// tasks claimable is published with release ordering, and it is read only by a thread
// that claimed a task of that job (acquire CAS on the job word). It is not written again
// until every claimed task has finished (`finished` reaches the task count), so reads and
// writes never overlap. The closure it points to is `Sync`.
unsafe impl Sync for Shared {}
// SAFETY: see `Sync`; the raw pointer is only dereferenced under the protocol above.
unsafe impl Send for Shared {}

thread_local! {
    /// Set on pool workers and on a caller while it executes tasks: a nested `run` from
    /// such a thread executes its tasks inline instead of dispatching (which would
    /// deadlock on the dispatch lock or wait for itself).
    static INSIDE_POOL: Cell<bool> = const { Cell::new(false) };
}

/// A fixed set of threads that execute the tasks of one job at a time.
pub struct ThreadPool {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
    dispatch_lock: Mutex<u64>,
    n_threads: usize,
}

impl std::fmt::Debug for ThreadPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ThreadPool")
            .field("n_threads", &self.n_threads)
            .finish()
    }
}

impl ThreadPool {
    /// A pool of `n_threads` threads in all: the calling thread plus `n_threads - 1`
    /// workers.
    pub fn new(n_threads: usize) -> Result<Self, KernelError> {
        if n_threads == 0 {
            return Err(KernelError::ZeroThreads);
        }
        let shared = Arc::new(Shared {
            job_word: Padded(AtomicU64::new(JobWord::new(0, 0, 0).0)),
            finished: Padded(AtomicUsize::new(0)),
            task: UnsafeCell::new(None),
            panic: Mutex::new(None),
            sleepers: AtomicUsize::new(0),
            sleep_lock: Mutex::new(()),
            wake: Condvar::new(),
            shutdown: AtomicBool::new(false),
        });
        let mut pool = Self {
            shared,
            workers: Vec::with_capacity(n_threads - 1),
            dispatch_lock: Mutex::new(0),
            n_threads,
        };
        for index in 1..n_threads {
            let shared = Arc::clone(&pool.shared);
            let handle = std::thread::Builder::new()
                .name(format!("tandem-kernel-{index}"))
                .spawn(move || worker_loop(&shared))
                .map_err(|e| KernelError::Spawn(e.to_string()))?;
            pool.workers.push(handle);
        }
        Ok(pool)
    }

    /// A pool with one thread per available core.
    pub fn with_available_parallelism() -> Result<Self, KernelError> {
        Self::new(available_threads())
    }

    /// Threads that execute tasks, the caller included.
    pub fn n_threads(&self) -> usize {
        self.n_threads
    }

    /// Calls `task(i)` exactly once for every `i` in `0..n_tasks`, spread over the pool's
    /// threads (the calling thread included), and returns when all calls have returned.
    ///
    /// Tasks are handed out in index order to whichever thread is free. If a task
    /// panics, the remaining tasks still run and the first panic is resumed on the
    /// caller afterwards. Calls from several threads are serialised; a call from inside a
    /// task runs its tasks inline on that thread.
    pub fn run<F: Fn(usize) + Sync>(&self, n_tasks: usize, task: F) {
        if n_tasks == 0 {
            return;
        }
        if self.n_threads == 1 || n_tasks == 1 || INSIDE_POOL.with(Cell::get) {
            (0..n_tasks).for_each(task);
            return;
        }
        let mut start = 0;
        while start < n_tasks {
            let count = (n_tasks - start).min(MAX_TASKS_PER_JOB);
            let offset_task = |i: usize| task(start + i);
            self.dispatch(count, &offset_task);
            start += count;
        }
    }

    /// Splits `range` into consecutive chunks of `chunk` items (the last may be shorter)
    /// and calls `body` once per chunk, in parallel. A `chunk` of 0 is treated as 1.
    pub fn run_chunks<F: Fn(Range<usize>) + Sync>(
        &self,
        range: Range<usize>,
        chunk: usize,
        body: F,
    ) {
        let chunk = chunk.max(1);
        let len = range.end.saturating_sub(range.start);
        self.run(len.div_ceil(chunk), |i| {
            let start = range.start + i * chunk;
            body(start..(start + chunk).min(range.end));
        });
    }

    fn dispatch(&self, n_tasks: usize, task: &TaskFn<'_>) {
        let mut generation = self
            .dispatch_lock
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let shared = &*self.shared;
        // SAFETY: erasing the closure's lifetime is sound because the pointer is only
        // dereferenced by threads that claimed a task of this job, and this function does
        // not return (or unwind) before every claimed task has finished running.
        let erased: *const TaskFn<'static> =
            unsafe { std::mem::transmute(task as *const TaskFn<'_>) };
        // SAFETY: no task of any job is claimable or running (the previous dispatch
        // waited for all of its tasks), so nobody reads `task` concurrently; the dispatch
        // lock makes this the only writer.
        unsafe { *shared.task.get() = Some(erased) };
        shared.finished.0.store(0, Ordering::Relaxed);
        *generation = (*generation + 1) & GEN_MASK;
        let word = JobWord::new(*generation, n_tasks, 0);
        shared.job_word.0.store(word.0, Ordering::SeqCst);
        if shared.sleepers.load(Ordering::SeqCst) > 0 {
            let _guard = shared
                .sleep_lock
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            shared.wake.notify_all();
        }

        INSIDE_POOL.with(|inside| inside.set(true));
        run_claimed_tasks(shared, *generation);
        INSIDE_POOL.with(|inside| inside.set(false));
        wait_until_finished(shared, n_tasks);

        // SAFETY: all tasks finished; nobody reads `task` until the next dispatch.
        unsafe { *shared.task.get() = None };
        let panic = shared
            .panic
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        drop(generation);
        if let Some(payload) = panic {
            resume_unwind(payload);
        }
    }
}

impl Drop for ThreadPool {
    fn drop(&mut self) {
        self.shared.shutdown.store(true, Ordering::SeqCst);
        {
            let _guard = self
                .shared
                .sleep_lock
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            self.shared.wake.notify_all();
        }
        for worker in self.workers.drain(..) {
            // A worker only exits by returning from `worker_loop`; tasks' panics are
            // caught inside it, so there is nothing to report here.
            let _ = worker.join();
        }
    }
}

/// The number of threads the machine offers (at least 1).
pub fn available_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

fn worker_loop(shared: &Shared) {
    INSIDE_POOL.with(|inside| inside.set(true));
    let mut seen = JobWord(shared.job_word.0.load(Ordering::Acquire)).generation();
    while let Some(generation) = wait_for_new_job(shared, seen) {
        seen = generation;
        run_claimed_tasks(shared, generation);
    }
}

/// Waits until a job with a generation other than `seen` is published: spins, then
/// polls while yielding, then parks. Returns its generation, or `None` when the pool
/// shuts down.
fn wait_for_new_job(shared: &Shared, seen: u64) -> Option<u64> {
    let started = Instant::now();
    while started.elapsed() < SPIN {
        for _ in 0..64 {
            if let Some(event) = poll_for_job(shared, seen) {
                return event;
            }
            std::hint::spin_loop();
        }
    }
    while started.elapsed() < YIELD_BEFORE_PARK {
        if let Some(event) = poll_for_job(shared, seen) {
            return event;
        }
        std::thread::yield_now();
    }
    park_until_new_job(shared, seen)
}

/// `Some(None)` on shutdown, `Some(Some(generation))` for a new job, `None` otherwise.
#[inline]
fn poll_for_job(shared: &Shared, seen: u64) -> Option<Option<u64>> {
    if shared.shutdown.load(Ordering::Relaxed) {
        return Some(None);
    }
    let generation = JobWord(shared.job_word.0.load(Ordering::Acquire)).generation();
    (generation != seen).then_some(Some(generation))
}

fn park_until_new_job(shared: &Shared, seen: u64) -> Option<u64> {
    let mut guard: MutexGuard<'_, ()> = shared
        .sleep_lock
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    shared.sleepers.fetch_add(1, Ordering::SeqCst);
    let result = loop {
        if shared.shutdown.load(Ordering::SeqCst) {
            break None;
        }
        let generation = JobWord(shared.job_word.0.load(Ordering::SeqCst)).generation();
        if generation != seen {
            break Some(generation);
        }
        guard = shared
            .wake
            .wait(guard)
            .unwrap_or_else(PoisonError::into_inner);
    };
    shared.sleepers.fetch_sub(1, Ordering::SeqCst);
    result
}

/// Claims and runs tasks of job `generation` until none is left.
fn run_claimed_tasks(shared: &Shared, generation: u64) {
    let mut word = JobWord(shared.job_word.0.load(Ordering::Acquire));
    loop {
        if word.generation() != generation || word.next() >= word.n_tasks() {
            return;
        }
        let claimed = JobWord::new(generation, word.n_tasks(), word.next() + 1);
        match shared.job_word.0.compare_exchange_weak(
            word.0,
            claimed.0,
            Ordering::AcqRel,
            Ordering::Acquire,
        ) {
            Ok(_) => {
                run_one_task(shared, word.next());
                word = JobWord(shared.job_word.0.load(Ordering::Acquire));
            }
            Err(current) => word = JobWord(current),
        }
    }
}

fn run_one_task(shared: &Shared, index: usize) {
    // SAFETY: this thread claimed a task of the current job, so `task` holds that job's
    // closure and the dispatching thread keeps it alive until `finished` counts this task.
    let task = unsafe { (*shared.task.get()).map(|ptr| &*ptr) };
    if let Some(task) = task
        && let Err(payload) = catch_unwind(AssertUnwindSafe(|| task(index)))
    {
        let mut slot = shared.panic.lock().unwrap_or_else(PoisonError::into_inner);
        slot.get_or_insert(payload);
    }
    shared.finished.0.fetch_add(1, Ordering::Release);
}

fn wait_until_finished(shared: &Shared, n_tasks: usize) {
    let mut spins: u32 = 0;
    while shared.finished.0.load(Ordering::Acquire) < n_tasks {
        std::hint::spin_loop();
        spins = spins.wrapping_add(1);
        // A worker may have been descheduled mid-task on a busy machine: let it run.
        if spins.is_multiple_of(4096) {
            std::thread::yield_now();
        }
    }
}
