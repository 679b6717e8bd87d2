"""The thread runtime the CPU kernels run on: a fixed split of work into chunks, run by persistent
worker threads, with every BLAS held at one thread meanwhile.  No arithmetic lives here.

The contract the kernels (:mod:`npbptt.kernels.cpu`) rely on, and :mod:`tests.test_concurrency`
checks:

1. **Results do not depend on the thread count.**  :func:`run_tasks` receives one task per chunk;
   the chunks are fixed by the caller from the problem alone (``npbptt.kernels.cpu._chunks``: the
   batch size), never from the number of threads.  Threads only decide *who* runs a chunk: with
   n threads, thread g runs chunks g, g + n, g + 2n, ... one after the other, and the results
   come back in chunk order, so every sum over chunks is formed in the same order whatever
   ``NUMBA_NUM_THREADS`` is.
2. **BLAS is single-threaded inside a call, whichever thread calls.**  A chunk calls BLAS on its
   own rows; a multi-threaded BLAS would spin-wait at every small GEMM of the recurrence and, with
   OpenBLAS, could hang a ``fork()`` made meanwhile.  :func:`blas_single_thread` holds every
   loaded BLAS at one thread while any call is open, in any thread, and restores the previous
   counts when the last one closes.  OpenBLAS ignores ``openblas_set_num_threads`` called from a
   thread other than the one that loaded it (seen with OpenBLAS 0.3.30/0.3.31: the count read
   back stays 2), so for OpenBLAS the limit is set with ``openblas_set_num_threads_local``, which
   takes effect from any thread; the count is read back and, if any BLAS still reports more than
   one thread, the call runs its chunks serially in the calling thread instead of in parallel.
3. **Concurrent callers are independent.**  Each calling thread has its own workspaces (one per
   chunk index, :func:`caller_workspaces`); the worker threads are shared, fed through one queue.
4. **fork() is safe.**  A forked child has none of the parent's worker threads: the runtime starts
   afresh in it (no queue, no workers, a new lock; a child forked during a call keeps BLAS at one
   thread).  Child processes started by spawn or forkserver import it afresh anyway.
5. **Nothing runs when idle.**  A worker that finds no task spins for ~4 ms (without the GIL) and
   then blocks on the queue: no thread uses CPU time between calls.
6. **Errors reach the caller.**  An exception in any task (``KeyboardInterrupt`` included) is
   re-raised in the calling thread once every task of the call has finished; the workers survive
   it, and the next call runs normally.
"""
import contextlib
import math
import os
import queue
import threading

import numba
import numpy as np

from . import _cpu_jit as jit

__all__ = ["run_tasks", "parallel", "n_threads", "blas_single_thread", "blas_limit_holds",
           "Workspace", "caller_workspaces", "ws", "release_workspace", "NO_FLAGS", "SPINS"]

_lock = threading.Lock()


def n_threads():
    """How many threads a call may use: ``NUMBA_NUM_THREADS`` (numba's default: the CPU count).

    Not ``numba.get_num_threads()``: it starts numba's own threading layer (which no kernel here
    uses) and takes numba's process-wide launch lock at every call; a ``fork()`` while another
    thread held that lock left the child waiting on it forever (seen 1 in ~60 runs of
    tests/test_concurrency.py's fork test, the child's stack in numba's ``_launch_threads``)."""
    return max(1, int(numba.config.NUMBA_NUM_THREADS))


# --- BLAS threads ---------------------------------------------------------------------------------
class _Blas:
    """One loaded BLAS library: get and set its thread count from any thread."""

    def __init__(self, lc):
        self.lc = lc
        dll = getattr(lc, "dynlib", None)
        local = getattr(dll, "openblas_set_num_threads_local", None) if lc.internal_api == "openblas" else None
        self._local = local

    def get(self):
        return self.lc.get_num_threads()

    def set(self, n):
        if self._local is not None:
            self._local(int(n))
        else:
            self.lc.set_num_threads(n)


_libs = None                     # [_Blas] of the BLAS libraries loaded when first needed
_depth = 0                       # how many blas_single_thread regions are open (any thread)
_saved = []                      # [(_Blas, its thread count before the first open region)]
_holds = True                    # whether every BLAS read back one thread in the open regions


def _blas_libs():
    """The loaded BLAS libraries (the one numba's kernels call, SciPy's, among them), found once:
    threadpoolctl's ``select`` costs ~10 us a call."""
    global _libs
    if _libs is None:
        import scipy.linalg.cython_blas  # noqa: F401  (the BLAS numba's np.dot calls)
        from threadpoolctl import ThreadpoolController
        _libs = [_Blas(lc) for lc in ThreadpoolController().select(user_api="blas").lib_controllers]
    return _libs


@contextlib.contextmanager
def blas_single_thread():
    """Hold every loaded BLAS at one thread for the duration, from whichever thread; the previous
    counts come back when the last of any concurrently open regions closes (contract 2)."""
    global _depth, _saved, _holds
    with _lock:
        libs = _blas_libs()
        if _depth == 0:
            _saved = [(b, b.get()) for b in libs]
            for b, n in _saved:
                if n != 1:
                    b.set(1)
            _holds = all(b.get() == 1 for b in libs)
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                for b, n in _saved:
                    if n != 1:
                        b.set(n)
                _saved = []


def blas_limit_holds():
    """Whether, inside the open :func:`blas_single_thread` regions, every BLAS runs one thread."""
    return _holds


# --- workspaces -----------------------------------------------------------------------------------
class Workspace:
    """Scratch buffers reused from call to call.  A freshly allocated large array costs a page
    fault per page on first touch, which for W1-sized problems costs as much as the arithmetic.
    One workspace per (calling thread, chunk index), so concurrent calls and the chunks of one
    call never share buffers; arrays returned to users are always fresh."""

    def __init__(self):
        self.bufs = {}
        self.views = {}          # key -> (shape, dtype, the view last handed out)
        self.plans = {}          # the small path's plans by call shape, most recent last

    def get(self, key, shape, dtype):
        hit = self.views.get(key)
        if hit is not None and hit[0] == shape and hit[1] == dtype:
            return hit[2]
        n = math.prod(shape)
        dtype = np.dtype(dtype)
        buf = self.bufs.get((key, dtype))
        if buf is None or buf.size < n:
            buf = np.empty(max(n, 1), dtype)
            self.bufs[(key, dtype)] = buf
        view = buf[:n].reshape(shape)
        self.views[key] = (tuple(shape), dtype, view)
        return view


_workspaces = {}                 # (calling thread ident, chunk index) -> Workspace
_current = threading.local()     # .ws: the workspace of the chunk this thread is working on


def caller_workspaces(n):
    """Workspaces 0..n-1 of the calling thread (one per chunk of its calls)."""
    caller = threading.get_ident()
    with _lock:
        return [_workspaces.setdefault((caller, c), Workspace()) for c in range(n)]


def ws():
    """The workspace of the chunk the current thread is computing."""
    return _current.ws


def release_workspace():
    """Free the scratch buffers kept between calls."""
    with _lock:
        _workspaces.clear()


# --- worker threads -------------------------------------------------------------------------------
# How long the calling thread, its own tasks done, spins for the workers' (jit.wait_flags) before
# it blocks, and how long an idle worker spins for the next task before it blocks: ~4 ms each
# (~1 ns a round; why so long: docs/kernels.md).
SPINS = 1 << 22
_IDLE_SPINS = 1 << 22
NO_FLAGS = np.zeros(0, np.int64)
_MAX_WORKERS = 256
_posted = np.zeros(_MAX_WORKERS, np.int64)   # _posted[w] = 1: a task was queued since w looked
_tasks = None                    # queue.SimpleQueue of (task, group, reply queue, done flags)
_n_workers = 0


def _worker(w):
    """Worker thread w: runs queued tasks; between them it spins (without the GIL) for up to
    _IDLE_SPINS rounds on _posted[w] before it blocks on the queue, so that in a loop of calls the
    next task neither waits for a sleeping thread to wake up nor costs its poster the system call
    that wakes it.  A task's caller learns that its result is in the reply queue from flag
    ``done[g - 1]``, set inside that spin once the GIL is let go."""
    flag = _posted[w:w + 1]
    signal, k = NO_FLAGS, 0                  # the done flag still to set, and where
    while True:
        flag[0] = 0
        try:
            item = _tasks.get_nowait()
        except queue.Empty:
            item = None
        if item is None:
            try:
                posted = jit.wait_flags(flag, _IDLE_SPINS, signal, k)
            except BaseException:    # noqa: BLE001 (never: but a dead worker would hang callers)
                if signal.shape[0]:
                    signal[k] = 1
                posted = False
            signal = NO_FLAGS
            if posted:
                continue             # something was posted: take it (or, taken, spin again)
            item = _tasks.get()
        elif signal.shape[0]:
            signal[k] = 1
            signal = NO_FLAGS
        task, g, reply, done = item
        try:
            reply.put((g, True, task(g)))
        except BaseException as e:   # noqa: BLE001 (handed to the caller, which re-raises it)
            reply.put((g, False, e))
        signal, k = done, g - 1      # after the reply: the caller's get() then never blocks


def _start_workers(n):
    global _tasks, _n_workers
    with _lock:
        if _tasks is None:
            _tasks = queue.SimpleQueue()
        while _n_workers < min(n, _MAX_WORKERS):
            threading.Thread(target=_worker, args=(_n_workers,), name=f"npbptt-kernels-{_n_workers}",
                             daemon=True).start()
            _n_workers += 1


def groups(n_tasks, n):
    """Which chunks each of n threads runs (contract 1): thread g runs g, g + n, ...; the calling
    thread (g = 0) runs chunk 0 last, so that a task of chunk 0 can gather the others' results."""
    out = [list(range(g, n_tasks, n)) for g in range(n)]
    out[0] = out[0][1:] + [0]
    return out


def run_tasks(tasks, first_waits=False):
    """[task() for task in tasks], each task one chunk, run by up to :func:`n_threads` threads:
    the calling thread and persistent daemon workers (the kernels and NumPy's BLAS release the
    GIL), BLAS held at one thread meanwhile.  Task c computes in workspace c of the calling thread
    (:func:`ws`).  An exception in any task is re-raised once all have finished.

    The calling thread waits for the workers by spinning without the GIL (jit.wait_flags on flags
    each worker sets after handing in its results), not by blocking.  With ``first_waits`` the
    calling thread's tasks are called as ``task(flags, posted)``: the first one it runs gets
    ``posted`` (its first kernel tells the idle workers that their tasks are queued, see
    :func:`_worker`), chunk 0's, run last, gets ``flags`` (its last kernel waits for the workers),
    the others empty arrays; the workers' tasks are called without arguments."""
    spaces = caller_workspaces(len(tasks))
    results = [None] * len(tasks)
    with blas_single_thread():
        n = min(n_threads(), len(tasks)) if blas_limit_holds() else 1
        plan = groups(len(tasks), n)

        def run_group(g, flags=NO_FLAGS, posted=NO_FLAGS):
            chunks = plan[g]
            for i, c in enumerate(chunks):
                _current.ws = spaces[c]
                if g == 0 and first_waits:
                    results[c] = tasks[c](flags if c == 0 else NO_FLAGS, posted if i == 0 else NO_FLAGS)
                else:
                    results[c] = tasks[c]()

        if n == 1:
            run_group(0)
            return results
        _start_workers(n - 1)
        reply, flags = queue.SimpleQueue(), np.zeros(n - 1, np.int64)
        for g in range(1, n):
            _tasks.put((run_group, g, reply, flags))
        posted = _posted[:_n_workers]
        if not first_waits:
            posted[:] = 1
        try:
            if first_waits:
                run_group(0, flags, posted)
            else:
                run_group(0)
        finally:
            jit.wait_flags(flags, SPINS, NO_FLAGS, 0)
            done = [reply.get() for _ in range(1, n)]
    for _, ok, value in sorted(done, key=lambda r: r[0]):
        if not ok:
            raise value
    return results


def parallel(fn, chunks):
    """[fn(r0, r1) for (r0, r1) in chunks], by :func:`run_tasks`, each chunk in its workspace."""
    return run_tasks([(lambda r0=r0, r1=r1: fn(r0, r1)) for r0, r1 in chunks])


# --- fork -----------------------------------------------------------------------------------------
def _after_fork_in_child():
    """Contract 4: a forked child has none of the parent's worker threads (a queued task would
    never run) and may hold a lock some parent thread held: start afresh.  A child forked while
    a call of the parent was open keeps its BLAS at one thread (what the open call had set):
    raising it again would make the BLAS start its thread pool, under locks a parent thread may
    have held at the fork."""
    global _tasks, _n_workers, _lock, _depth, _saved, _holds
    _tasks, _n_workers = None, 0
    _posted[:] = 0
    _lock = threading.Lock()
    _depth, _saved, _holds = 0, [], True
    _workspaces.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)
