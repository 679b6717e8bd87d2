"""The thread runtime of the CPU kernels (npbptt.kernels.runtime) keeps its contract: results
independent of the thread count, BLAS single-threaded inside a call whichever thread calls,
concurrent callers independent, fork/spawn/forkserver children that work, KeyboardInterrupt in a
call followed by a clean call, errors reaching the caller, and no thread spinning when idle.

Everything that could hang runs in a child process under a timeout."""
import os
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest
from threadpoolctl import threadpool_info, threadpool_limits

from npbptt.bptt import bptt_reference
from npbptt.kernels import cpu, runtime
from npbptt.validate import check_inputs
from problems import make_problem

TESTS = os.path.dirname(__file__)


def _validated(prob):
    return check_inputs(prob.net, prob.x, prob.y, prob.state, prob.loss)


def _blas_counts():
    return [d["num_threads"] for d in threadpool_info() if d["user_api"] == "blas"]


def _run_child(code, timeout=180, env=None):
    """Run ``code`` in a fresh interpreter (tests/ on its path); its exit status and output."""
    full = f"import sys; sys.path.insert(0, {TESTS!r})\n" + textwrap.dedent(code)
    e = dict(os.environ, **(env or {}))
    e.pop("NUMBA_ENABLE_CUDASIM", None)
    try:
        done = subprocess.run([sys.executable, "-c", full], capture_output=True, text=True,
                              timeout=timeout, env=e)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"the child hung (killed after {timeout} s): {exc.stdout!r} {exc.stderr!r}")
    return done


# --- the runtime on its own -----------------------------------------------------------------------
@pytest.mark.parametrize("n_tasks, n", [(1, 1), (5, 1), (2, 2), (5, 2), (7, 3), (16, 16)])
def test_groups_run_every_chunk_once_and_chunk_0_last_on_the_calling_thread(n_tasks, n):
    groups = runtime.groups(n_tasks, n)
    assert len(groups) == n
    assert sorted(c for g in groups for c in g) == list(range(n_tasks))
    assert groups[0][-1] == 0
    for g, chunks in enumerate(groups[1:], start=1):     # the workers' chunks: g, g + n, ...
        assert chunks == list(range(g, n_tasks, n))


def test_run_tasks_returns_results_in_chunk_order_whatever_thread_runs_them():
    names = runtime.run_tasks([(lambda c=c: (c, threading.current_thread().name)) for c in range(5)])
    assert [c for c, _ in names] == list(range(5))
    assert names[0][1] == threading.current_thread().name     # chunk 0: the calling thread


@pytest.mark.parametrize("exc", [RuntimeError("chunk failed"), KeyboardInterrupt(), SystemExit(3)])
def test_an_exception_in_a_worker_reaches_the_caller_and_the_next_call_runs(exc):
    """Any exception of a worker's task (a BaseException too) is re-raised in the caller once
    every task has finished; the workers survive it."""
    def boom(r0, r1):
        if r0 > 0:
            raise exc
        return r1
    assert runtime.parallel(boom, [(0, 5)]) == [5]
    with pytest.raises(type(exc)):
        runtime.parallel(boom, [(0, 5), (5, 10)])
    assert runtime.parallel(lambda r0, r1: r1 - r0, [(0, 5), (5, 12), (12, 13)]) == [5, 7, 1]


def test_blas_limit_holds_from_a_thread_that_is_not_the_first():
    """Inside the region every BLAS reads back one thread also when the region is opened by a
    thread other than the one that loaded the BLAS (OpenBLAS ignores openblas_set_num_threads
    from such a thread), and the counts come back afterwards."""
    runtime._blas_libs()
    with threadpool_limits(2, user_api="blas"):             # from the main thread: takes effect
        before = _blas_counts()
        assert all(n == 2 for n in before)
        seen = []

        def other():
            with runtime.blas_single_thread():
                seen.append((_blas_counts(), runtime.blas_limit_holds()))
            seen.append(_blas_counts())

        t = threading.Thread(target=other)
        t.start()
        t.join()
        assert seen[0][0] and all(n == 1 for n in seen[0][0]), seen
        assert seen[0][1]
        assert seen[1] == before


def test_blas_thread_limits_are_restored_after_parallel_chunks():
    prob = make_problem(np.random.default_rng(6), kind="lstm", layers=2, T=5, B=40, H=6)
    x, y, S = _validated(prob)
    cpu.bptt(prob.net, x, y, S, 4, 2, prob.loss)             # load every library first
    before = [(d["filepath"], d["num_threads"]) for d in threadpool_info()]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cpu, "_MIN_ROWS_PER_CHUNK", 1)
        mp.setattr(cpu, "_CHUNK_ROWS", 4)
        cpu.bptt(prob.net, x, y, S, 4, 2, prob.loss)
        cpu.grad_norms(prob.net, x, y, S, prob.loss)
    assert [(d["filepath"], d["num_threads"]) for d in threadpool_info()] == before


def test_blas_single_thread_nests_and_survives_concurrent_callers():
    """Inside the region every BLAS runs one thread, also when regions nest; the caller's limits
    come back only when the last region closes, also with several Python threads calling the
    kernels at once."""
    prob = make_problem(np.random.default_rng(7), kind="lstm", layers=2, T=5, B=40, H=6)
    x, y, S = _validated(prob)
    cpu.bptt(prob.net, x, y, S, 4, 2, prob.loss)
    before = [(d["filepath"], d["num_threads"]) for d in threadpool_info()]
    with runtime.blas_single_thread():
        with runtime.blas_single_thread():
            assert _blas_counts() and all(n == 1 for n in _blas_counts())
        assert all(n == 1 for n in _blas_counts())
    assert [(d["filepath"], d["num_threads"]) for d in threadpool_info()] == before
    errors = []

    def worker():
        try:
            for _ in range(10):
                cpu.bptt(prob.net, x, y, S, 4, 2, prob.loss)
        except Exception as e:          # noqa: BLE001
            errors.append(e)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cpu, "_MIN_ROWS_PER_CHUNK", 1)
        mp.setattr(cpu, "_CHUNK_ROWS", 8)
        threads = [threading.Thread(target=worker) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors
    assert [(d["filepath"], d["num_threads"]) for d in threadpool_info()] == before


# --- the kernels on the runtime -------------------------------------------------------------------
def test_chunks_depend_on_the_batch_size_only():
    prob = make_problem(np.random.default_rng(1), B=4)
    for B, n in ((1, 1), (31, 1), (32, 2), (63, 2), (64, 2), (96, 3), (128, 4), (10_000, 16)):
        chunks = cpu._chunks(prob.net, B)
        assert len(chunks) == n, (B, chunks)
        assert chunks[0][0] == 0 and chunks[-1][1] == B
        assert all(a[1] == b[0] for a, b in zip(chunks, chunks[1:]))
        assert min(r1 - r0 for r0, r1 in chunks) >= min(B, cpu._MIN_ROWS_PER_CHUNK)


def test_concurrent_callers_get_their_own_results():
    """Several Python threads calling the threaded kernels at once, on problems of different shapes
    and both paths (so different per-call plans, one shared worker pool), each get exactly what a
    lone call gives, and the same as the reference."""
    rng = np.random.default_rng(8)
    probs = [make_problem(rng, kind=k, layers=l, T=6, B=B, H=H)
             for k, l, B, H in (("lstm", 2, 40, 6), ("rnn", 1, 33, 5), ("lstm", 1, 24, 40))]
    errors, alone = [], []

    def caller(i):
        prob = probs[i]
        x, y, S = _validated(prob)
        try:
            for _ in range(8):
                loss, grads, S_T = cpu.bptt(prob.net, x, y, S, 5, 3, prob.loss)
                assert loss == alone[i][0]
                assert all(np.array_equal(grads[n], alone[i][1][n]) for n in grads)
                assert all(np.array_equal(a, b) for a, b in zip(S_T, alone[i][2]))
        except Exception as e:          # noqa: BLE001
            errors.append(e)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cpu, "_FUSE_BYTES", 1 << 12)            # the third problem takes the large path
        mp.setattr(cpu, "_MIN_ROWS_PER_CHUNK", 4)
        mp.setattr(cpu, "_CHUNK_ROWS", 8)
        for prob in probs:
            x, y, S = _validated(prob)
            ref = bptt_reference(prob.net, x, y, S, 5, 3, prob.loss)
            got = cpu.bptt(prob.net, x, y, S, 5, 3, prob.loss)
            assert len(cpu._chunks(prob.net, prob.x.shape[1])) >= 3
            for n in ref[1]:
                np.testing.assert_allclose(got[1][n], ref[1][n], rtol=1e-10, atol=1e-12, err_msg=n)
            alone.append(got)
        threads = [threading.Thread(target=caller, args=(i % 3,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors, errors


_HASH = """
import hashlib, numpy as np
from problems import make_problem
from npbptt.kernels import cpu
from npbptt.probe import grad_norms_reference
from npbptt.validate import check_inputs
h = hashlib.sha256()
rng = np.random.default_rng(3)
for kind, layers, B, H, dt in (("lstm", 2, 64, 6, np.float64), ("lstm", 2, 128, 6, np.float32),
                               ("rnn", 1, 96, 5, np.float64), ("lstm", 1, 40, 130, np.float64),
                               ("lstm", 1, 70, 130, np.float32)):
    prob = make_problem(rng, kind=kind, layers=layers, T=7, B=B, H=H, dtype=dt)
    x, y, S = check_inputs(prob.net, prob.x, prob.y, prob.state, prob.loss)
    loss, grads, S_T = cpu.bptt(prob.net, x, y, S, 6, 3, prob.loss)
    L, S2 = cpu.step_losses(prob.net, x, y, S, prob.loss)
    phi = cpu.grad_norms(prob.net, x, y, S, prob.loss)
    for a in [np.float64(loss), L, phi, *S_T, *S2, *grads.values()]:
        h.update(np.ascontiguousarray(a).tobytes())
print(h.hexdigest())
"""


def test_results_are_bitwise_independent_of_the_thread_count():
    """loss, gradients, final states, step losses and phi hash the same with NUMBA_NUM_THREADS
    1, 2 and 3 -- small and large paths, float64 and float32, 2 to 4 chunks (issue 22, item 6:
    before, a resumed run under another thread count differed at ~1e-15)."""
    digests = {}
    for n in (1, 2, 3):
        done = _run_child(_HASH, env={"NUMBA_NUM_THREADS": str(n)})
        assert done.returncode == 0, done.stderr
        digests[n] = done.stdout.strip()
    assert len(set(digests.values())) == 1, digests


# --- processes, signals, idle ---------------------------------------------------------------------
_FORK_DURING_CALL = """
import os, threading, time
import numpy as np
import npbptt
net = npbptt.LSTM(32, 130, 1, 10, seed=0)         # layer by layer (W_hh beyond _FUSE_BYTES)
rng = np.random.default_rng(0)
x, y = rng.standard_normal((40, 32, 32)), rng.integers(0, 10, (40, 32))
state = net.init_state(32)
ref = npbptt.bptt(net, x, y, state, 39, 40)
stop, errors = threading.Event(), []
def loop():                                        # a thread that is not the first, in calls
    try:
        while not stop.is_set():
            r = npbptt.bptt(net, x, y, state, 39, 40)
            assert r.loss == ref.loss
    except BaseException as e:
        errors.append(e)
t = threading.Thread(target=loop); t.start()
time.sleep(0.2)
for i in range(30):
    pid = os.fork()
    if pid == 0:
        code = 3
        try:
            r = npbptt.bptt(net, x[:5], y[:5], state, 4, 5)      # the child computes too
            code = 0 if np.isfinite(r.loss) else 4
        finally:
            os._exit(code)
    deadline = time.monotonic() + 30
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            raise SystemExit(f"fork {i}: the child hung")
        time.sleep(0.01)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"fork {i}: the child exited {os.waitstatus_to_exitcode(status)}")
    time.sleep(0.01 * (i % 5))
stop.set(); t.join(30)
assert not t.is_alive(), "the calling thread hung"
assert not errors, errors
print("ok")
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_fork_while_another_thread_is_in_a_call_never_hangs():
    """30 forks beside a thread (not the first) calling bptt on a layer-by-layer network (H = 130):
    issue 22, item 1 hung in 2 of 4 such runs, OpenBLAS spinning in exec_blas, because the BLAS
    limit did not hold from that thread.  Every child computes, the parent's calls stay equal."""
    done = _run_child(_FORK_DURING_CALL, timeout=240)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stdout + done.stderr


_FORK_AFTER_THREADS = """
import os, sys, time
import numpy as np
from problems import make_problem
from npbptt.kernels import cpu
from npbptt.validate import check_inputs
prob = make_problem(np.random.default_rng(5), kind="lstm", layers=2, T=5, B=32, H=4)
x, y, S = check_inputs(prob.net, prob.x, prob.y, prob.state, prob.loss)
assert len(cpu._chunks(prob.net, 32)) == 2                 # two chunks: a worker thread
_, g_parent, _ = cpu.bptt(prob.net, x, y, S, 4, 4, prob.loss)
pid = os.fork()
if pid == 0:                                                # the child: 0 when it agrees
    code = 1
    try:
        _, g_child, _ = cpu.bptt(prob.net, x, y, S, 4, 4, prob.loss)
        code = 0 if all(np.array_equal(g_child[k], g_parent[k]) for k in g_parent) else 2
    finally:
        os._exit(code)
deadline = time.monotonic() + 60
while True:
    done, status = os.waitpid(pid, os.WNOHANG)
    if done:
        sys.exit(os.waitstatus_to_exitcode(status))
    if time.monotonic() > deadline:
        os.kill(pid, 9)
        sys.exit("the forked child hung in the kernels")
    time.sleep(0.05)
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_forked_child_runs_the_kernels_after_the_parent_started_its_threads():
    """After the parent has run the threaded kernels (worker threads started), a forked child --
    which has none of those threads -- computes bitwise the same result instead of waiting
    forever for a worker that does not exist."""
    done = _run_child(_FORK_AFTER_THREADS)
    assert done.returncode == 0, done.stdout + done.stderr


_START_METHODS = """
import multiprocessing as mp
import numpy as np
import npbptt

def job(seed):
    net = npbptt.LSTM(3, 6, 2, 5, vocab_size=7, seed=seed)
    rng = np.random.default_rng(seed)
    x, y = rng.integers(0, 7, (6, 40)), rng.integers(0, 5, (6, 40))
    r = npbptt.bptt(net, x, y, net.init_state(40), 5, 3)
    return r.loss, {k: v.tobytes() for k, v in r.grads.items()}

if __name__ == "__main__":
    here = [job(s) for s in (1, 2)]                 # the parent's threads are running now
    for method in ("fork", "spawn", "forkserver"):
        with mp.get_context(method).Pool(2) as pool:
            there = pool.map(job, (1, 2), chunksize=1)
        assert there == here, method
    print("ok")
"""


def test_fork_spawn_and_forkserver_children_compute_what_the_parent_does(tmp_path):
    script = tmp_path / "start_methods.py"
    script.write_text(f"import sys; sys.path.insert(0, {TESTS!r})\n" + _START_METHODS)
    try:
        done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                              timeout=240, env={k: v for k, v in os.environ.items()
                                                if k != "NUMBA_ENABLE_CUDASIM"})
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"a child process hung: {exc.stderr!r}")
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stdout + done.stderr


_INTERRUPT = """
import signal, numpy as np
from problems import make_problem
from npbptt.kernels import cpu
from npbptt.validate import check_inputs
def raise_interrupt(signum, frame):
    raise KeyboardInterrupt
signal.signal(signal.SIGALRM, raise_interrupt)
rng = np.random.default_rng(9)
probs = [make_problem(rng, kind="lstm", layers=2, T=30, B=64, H=8),        # small path
         make_problem(rng, kind="lstm", layers=1, T=30, B=64, H=130)]      # layer by layer
interrupted = 0
for prob in probs:
    x, y, S = check_inputs(prob.net, prob.x, prob.y, prob.state, prob.loss)
    ref = cpu.bptt(prob.net, x, y, S, 29, 10, prob.loss)
    for delay in (0.0005, 0.002, 0.005, 0.011, 0.023):
        signal.setitimer(signal.ITIMER_REAL, delay)
        try:
            for _ in range(200):
                cpu.bptt(prob.net, x, y, S, 29, 10, prob.loss)
        except KeyboardInterrupt:
            interrupted += 1
        signal.setitimer(signal.ITIMER_REAL, 0)
        again = cpu.bptt(prob.net, x, y, S, 29, 10, prob.loss)      # a clean call afterwards
        assert again[0] == ref[0]
        assert all(np.array_equal(again[1][k], ref[1][k]) for k in ref[1])
        assert all(np.array_equal(a, b) for a, b in zip(again[2], ref[2]))
assert interrupted == 10, interrupted
print("ok")
"""


def test_keyboard_interrupt_inside_a_call_leaves_the_next_call_exact():
    """SIGALRM raising KeyboardInterrupt at several moments inside calls (small and large paths,
    two chunks): the interrupt reaches the caller, and the next call gives bitwise the result of
    an undisturbed call."""
    done = _run_child(_INTERRUPT)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stdout + done.stderr


_IDLE = """
import time, numpy as np
from problems import make_problem
from npbptt.kernels import cpu
from npbptt.validate import check_inputs
rng = np.random.default_rng(2)
for H in (8, 130):
    prob = make_problem(rng, kind="lstm", layers=1, T=20, B=64, H=H)
    x, y, S = check_inputs(prob.net, prob.x, prob.y, prob.state, prob.loss)
    for _ in range(20):
        cpu.bptt(prob.net, x, y, S, 19, 5, prob.loss)
        cpu.grad_norms(prob.net, x, y, S, prob.loss)
time.sleep(0.3)                                    # the spins before blocking: ~4 ms
c0, w0 = time.process_time(), time.perf_counter()
time.sleep(1.0)
print((time.process_time() - c0) / (time.perf_counter() - w0))
"""


def test_no_thread_is_left_spinning_after_the_calls_return():
    """After a loop of calls, the idle process uses under 5% of one CPU over a second (a worker
    or BLAS thread left spinning would use ~100%)."""
    done = _run_child(_IDLE)
    assert done.returncode == 0, done.stderr
    assert float(done.stdout.strip()) < 0.05, done.stdout
