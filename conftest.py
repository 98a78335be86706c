"""The suite runs on the CPU everywhere: on a GPU machine CUDA would pick other kernels
(bitwise reruns, torchrun's rank-to-GPU mapping, NCCL tolerances). Hiding the GPUs here, before
torch is imported, covers the tests and every subprocess they start.

One thread per process, here and in every subprocess (they inherit the environment): torch
otherwise starts one thread per core in each process, and beside one other CPU-bound process on
2 cores a 12-epoch smoke run took 100 s instead of 12.8 s (issue 30).

Subprocesses: start them with run() / popen() below, never subprocess.* directly. Each gets its
own process group (a torchrun agent and its workers, a script and whatever it starts), and that
group is killed when the test ends for any reason: its own timeout, pytest-timeout's, a failed
assert, ^C. A test that runs long then fails alone; no orphan keeps a core busy or holds a CSV's
lock (harness.finished_runs's flock is released when its holder dies)."""
import os

os.environ["CUDA_VISIBLE_DEVICES"] = ""
os.environ["OMP_NUM_THREADS"] = "1"
os.environ["MKL_NUM_THREADS"] = "1"

import ctypes   # noqa: E402
import faulthandler   # noqa: E402
import signal   # noqa: E402
import subprocess   # noqa: E402
import sys   # noqa: E402

import numpy as np   # noqa: E402
import pytest   # noqa: E402
import torch   # noqa: E402

torch.set_num_threads(1)

STARTED = []   # every Popen a test started, killed (with its group) when the test ends


# prctl looked up here, in the parent: between fork and exec the child should only call it, not
# load libraries (another thread may hold the loader's lock at the fork)
try:
    _PRCTL = ctypes.CDLL(None, use_errno=True).prctl if sys.platform == "linux" else None
except (OSError, AttributeError):
    _PRCTL = None


def _child_setup():
    """In the child, before exec: SIGINT at its default, as a terminal's foreground job has it (a
    suite started in the background, `pytest ... &`, ignores SIGINT, and exec keeps an ignored
    signal ignored: a test's ^C would not reach its process); and on Linux, SIGKILL it if pytest
    itself dies (a hard crash, or the backstop below ending the run), so that nothing is left
    running even then."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    if _PRCTL:
        _PRCTL(1, int(signal.SIGKILL))   # 1 = PR_SET_PDEATHSIG


def popen(args, **kw):
    """subprocess.Popen in a new session (its own process group), text mode, registered for cleanup."""
    p = subprocess.Popen(args, start_new_session=True, text=True,
                         preexec_fn=_child_setup, **kw)
    STARTED.append(p)
    return p


def kill_group(p):
    """SIGKILL p's whole process group (it leads it: start_new_session) and reap p."""
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass   # the group is gone already
    try:
        p.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pass


def run(args, timeout=240, **kw):
    """subprocess.run's (returncode, stdout, stderr) with output captured, in its own process group.
    Past `timeout` seconds the group is killed and the test fails naming the command (the
    timeouts are sized for a machine whose cores are all busy: the suite's longest subprocess runs
    take ~30 s there)."""
    p = popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(p)
        p.communicate()
        pytest.fail(f"ran past its {timeout} s limit and was killed with its process group: {' '.join(map(str, args))}")
    except BaseException:   # pytest-timeout's signal, ^C: no orphan either
        kill_group(p)
        raise
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


# A backstop for what pytest-timeout's signal method cannot stop: a test stuck inside one native
# call never returns to Python, so its SIGALRM handler never runs. faulthandler's watchdog is a C
# thread: it dumps every thread's traceback and ends the run (as the thread method would), and
# _child_setup takes the subprocesses down with it. It fires this long after the test's own
# timeout (pytest.ini's, or its @pytest.mark.timeout), so it never pre-empts a timeout that works.
BACKSTOP_EXTRA_S = 120
_backstop_fd = None   # the terminal's stderr, kept before pytest captures the tests' output


def pytest_configure(config):
    """Runs while pytest's capture is suspended: fd 2 is still the terminal (or CI's log) here."""
    global _backstop_fd
    _backstop_fd = os.dup(sys.stderr.fileno())


@pytest.fixture(autouse=True)
def _seeded_and_cleaned(request):
    """Every test starts from the same global RNG state, so a threshold that passes once always
    passes; and ends with no subprocess of its own still running."""
    torch.manual_seed(0)
    np.random.seed(0)
    marker = request.node.get_closest_marker("timeout")
    limit = float(marker.args[0] if marker and marker.args else request.config.getini("timeout") or 0)
    faulthandler.dump_traceback_later(limit + BACKSTOP_EXTRA_S if limit else BACKSTOP_EXTRA_S * 10, exit=True,
                                      file=_backstop_fd if _backstop_fd is not None else sys.__stderr__)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()
        while STARTED:
            kill_group(STARTED.pop())
