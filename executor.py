"""Runs a grid's (variant, seed) runs, in this process or in worker processes (--jobs), and says
how far the grid has got. One job: which process trains which run, with how many threads and on
which device. What a run is and where its rows go is the caller's (harness.run_grid): it passes a
function fn(task) -> rows, picklable (a module's top-level function), and on_done(task, rows).

Several runs at once are faster than one run on every core for the small networks of the cpu and
steps presets (2 cores: 1.74x for the steps preset, results/bench_grid.txt): each worker trains
one run on its own threads, a fresh process per run (its numbers are those of a serial run at the
same thread count, a test), with the standard library's multiprocessing (spawn: no fork of a
process that has started torch's threads). Ctrl-C stops every worker; a run's checkpoint is
written atomically, so the same command resumes it. A run that fails is reported and the others
go on; the grid then exits 1."""
import multiprocessing
import os
import signal
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool

# narrow networks: one thread a run beats threads in one run (--smoke's runs take seconds, less than
# a worker's start: they run here, one after another)
SMALL_PRESETS = ("cpu", "steps")


def cores():
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def plan(jobs, threads, devices, cuda, preset, n_runs):
    """(jobs, threads a run) for n_runs runs. jobs: --jobs or None, the default: on GPUs one run a
    listed device; on a CPU, one run a core for the cpu and steps presets when there are 2 or more
    runs, else 1. threads: --threads, else $OMP_NUM_THREADS, else the cores over the jobs."""
    if jobs is None:
        jobs = len(devices) if cuda else (min(n_runs, cores()) if preset in SMALL_PRESETS and n_runs > 1 else 1)
    jobs = max(1, min(jobs, n_runs))
    return jobs, threads or int(os.environ.get("OMP_NUM_THREADS") or 0) or max(1, cores() // jobs)


def eta(seconds):
    """A duration as 1h02m, 4m10s or 12s."""
    s = int(round(seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def run(fn, tasks, jobs, threads, devices, on_done):
    """Runs fn(task) for every task, jobs at a time (1: here, in order), each on `threads` threads,
    and on_done(task, rows) here as each ends. Prints a line of runs done / total with the grid's
    ETA after each run, and the wall time at the end. Returns the failed tasks' (task, error)."""
    start, failed, done = time.time(), [], []

    def finished(task, rows=None, error=None):
        if error is None:
            on_done(task, rows)
        else:
            failed.append((task, error))
            print(f"[{task.label}] failed: {error}", file=sys.stderr, flush=True)
        done.append(task)
        left = len(tasks) - len(done)
        per_run = (time.time() - start) / len(done) * min(jobs, len(tasks))   # wall time a run, at these jobs
        print(f"[grid] {len(done)}/{len(tasks)} runs done" + (f", eta {eta(per_run * left / jobs)}" if left else "")
              + (f", {len(failed)} failed" if failed else ""), flush=True)

    if jobs == 1:
        import torch
        torch.set_num_threads(threads)
        for i, task in enumerate(tasks):
            try:
                finished(task, fn(task.on_device(devices[i % len(devices)]) if len(devices) > 1 else task))
            except Exception as e:   # a bad config or a bug in one run: the others still run
                if len(tasks) == 1:
                    raise
                finished(task, error=f"{type(e).__name__}: {e}")
    else:
        _run_pool(fn, tasks, jobs, threads, devices, finished)
    print(f"[grid] {len(tasks)} run(s) in {eta(time.time() - start)} wall time ({jobs} at a time, {threads} "
          f"thread(s) each)", flush=True)
    return failed


def _run_pool(fn, tasks, jobs, threads, devices, finished):
    """The tasks in `jobs` worker processes, a fresh one per run; with several devices, a run takes
    whichever is free."""
    ctx = multiprocessing.get_context("spawn")
    free = ctx.Queue()
    for i in range(jobs):   # with 2 devices and 4 jobs: 2 runs on each
        free.put(devices[i % len(devices)] if len(devices) > 1 else None)
    env = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = str(threads)   # the workers' before they import torch
    pool = ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_worker_start, initargs=(threads, free),
                               max_tasks_per_child=1)
    try:
        futures = {pool.submit(_call, fn, task): task for task in tasks}
        for future in as_completed(futures):
            try:
                finished(futures[future], future.result())
            except BrokenProcessPool:
                finished(futures[future], error="its worker process died (killed, or out of memory?)")
            except Exception as e:
                finished(futures[future], error=f"{type(e).__name__}: {e}")
        pool.shutdown()
    except BaseException:   # ^C (or an error here): every worker stops now; checkpoints stay
        for p in list(getattr(pool, "_processes", {}).values()):
            p.terminate()
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    finally:
        if env is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = env


_FREE = None   # a worker's queue of free devices


def _worker_start(threads, free):
    """A worker: ^C is the parent's to handle (it stops the workers); `threads` threads."""
    global _FREE
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _FREE = free
    import torch
    torch.set_num_threads(threads)


def _call(fn, task):
    """fn(task) in a worker, on a free device when the grid has a list of them."""
    device = _FREE.get()
    try:
        return fn(task if device is None else task.on_device(device))
    finally:
        _FREE.put(device)
