"""Shared fixtures: tiny bundles built on the fly (no network, no shared data), and the CLI run in-process."""

from __future__ import annotations

import os

# Before torch, ONNX Runtime or numpy load (as segcli.cli does for users): OpenMP threads that spin while waiting
# burn a core that the other pytest-xdist worker needs; one BLAS thread is all the engines' resizes use.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import contextlib  # noqa: E402
import io  # noqa: E402
import locale  # noqa: E402
import logging  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from segcli.bundle import save_bundle
from segcli.nets import build

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session", autouse=True)
def _frozen_imports():
    """Move what collection imported (torch, ONNX Runtime, every test module: ~460 k objects) out of the
    garbage collector's sight. segcli collects garbage before it measures memory (segcli.memplan.give_back);
    in this long-lived process each full collection walked them all (0.1-0.3 s, ~190 times a run: a quarter of
    the suite's CPU), where a user's process holds a fraction of them. What tests create is still collected."""
    import gc

    gc.collect()
    gc.freeze()
    yield
    gc.unfreeze()


@pytest.fixture(scope="module", autouse=True)
def _frozen_module_state():
    """The same after each test file: what it left alive (module fixtures' results, caches filled on first use,
    e.g. pydicom's dictionaries: +200 k objects after the DICOM tests) is frozen once it is no garbage."""
    import gc

    yield
    gc.collect()
    gc.freeze()


@pytest.fixture(scope="session", autouse=True)
def _onnx_cache(tmp_path_factory):
    """First-use ONNX exports go to a folder of this test session, never the user's ~/.cache; the suite
    runs the default path (``--backend auto`` = ONNX Runtime through the cache), as users do."""
    saved = os.environ.get("SEGCLI_ONNX_CACHE")
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        # pytest-xdist workers share one cache (it is safe across processes, as two jobs of a user's are),
        # so the same tiny networks are exported once, not once per worker
        base = base.parent
    cache = base / "onnx-cache"
    cache.mkdir(exist_ok=True)
    os.environ["SEGCLI_ONNX_CACHE"] = str(cache)
    yield
    if saved is None:
        os.environ.pop("SEGCLI_ONNX_CACHE", None)
    else:
        os.environ["SEGCLI_ONNX_CACHE"] = saved


_SESSION_LOCALE = locale.setlocale(locale.LC_ALL)


@pytest.fixture(autouse=True)
def _restore_locale():
    """SimpleITK's DICOM writer switches the process to the C locale; keep that from leaking between tests.

    Restored to the locale the session started with, not the one a test found: a module-scoped fixture
    that wrote DICOM before the test would otherwise make the C locale the one "restored".
    """
    yield
    locale.setlocale(locale.LC_ALL, _SESSION_LOCALE)


def make_bundle(path: Path, *, in_channels: int = 1, classes=("background", "object"), method: str = "stts",
                size: int = 32, normalization=None, seed: int = 0, arch: str = "unet", config=None) -> Path:
    """A small, randomly initialised bundle: enough to test plumbing, geometry and exit codes."""
    torch.manual_seed(seed)
    config = config or {"features": 4, "depth": 2}
    out_ch = 1 if len(classes) == 2 else len(classes)
    nets = {}
    for role in ("coarse", "fine"):
        m = build(arch, in_channels=in_channels, out_channels=out_ch, **config)
        # Bias the head so a realistic share of pixels comes out foreground.
        nets[role] = (arch, config, m.eval())
    return save_bundle(path, name=path.name, method=method, classes=list(classes), in_channels=in_channels,
                       input_size=size, normalization=normalization or {"kind": "percentile", "lower": 1, "upper": 99},
                       networks=nets, info={"task": "test bundle"})


def _exported(path: Path) -> Path:
    """The bundle with its ONNX exports in the session's cache, as after a user's first run: a first use under a
    small --max-memory is refused for the export's own need (segcli.runtimes.onnx_cache.check_export_budget)."""
    from segcli.api import Segmenter

    Segmenter(path).warm_up("2d")
    return path


@pytest.fixture(scope="session")
def grey_bundle(tmp_path_factory) -> Path:
    return _exported(make_bundle(tmp_path_factory.mktemp("bundles") / "grey"))


@pytest.fixture(scope="session")
def rgb_bundle(tmp_path_factory) -> Path:
    return _exported(make_bundle(tmp_path_factory.mktemp("bundles") / "rgb", in_channels=3,
                                 normalization={"kind": "dtype"}))


def run_cli(*args: str, stdin: str | None = None, env: dict | None = None, timeout: int = 300,
            process: bool = False) -> subprocess.CompletedProcess:
    """Run segcli with its exit code, stdout and stderr, in this process (``cli.main(argv)``: no interpreter,
    torch and ONNX Runtime to start, about 2 s of CPU each) unless a process of its own adds something:
    ``process=True`` (the exit status of a real process, signals, what reaches the real stdout and stderr),
    or a ``--max-memory`` budget, which bounds the whole process (this one holds the test session)."""
    argv = [str(a) for a in args]
    if process or "--max-memory" in argv or "SEGCLI_MAX_MEMORY" in (env or {}):
        e = {**os.environ, "NO_COLOR": "1", **(env or {})}
        return subprocess.run([sys.executable, "-m", "segcli", *argv], capture_output=True, encoding="utf-8",
                              errors="replace", input=stdin, env=e, timeout=timeout, cwd=REPO)
    return _run_in_process(argv, stdin, {"NO_COLOR": "1", **(env or {})})


class _LastResort(logging.Handler):
    """What Python's last-resort handler does in a real process: segcli's warnings on stderr when no
    ``--log-file`` handler took them."""

    def __init__(self, logger: logging.Logger) -> None:
        super().__init__(logging.WARNING)
        self.logger = logger

    def emit(self, record: logging.LogRecord) -> None:
        if all(h is self for h in self.logger.handlers):
            sys.stderr.write(record.getMessage() + "\n")


@contextlib.contextmanager
def _process_state(env: dict):
    """Environment, working folder, signal handlers, stdin and logging as a fresh process has them, restored
    after (the CLI sets handlers and log levels for its whole process)."""
    saved_env, cwd = dict(os.environ), os.getcwd()
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    loggers = {n: logging.getLogger(n) for n in ("segcli", "py.warnings")}
    saved_logs = {n: (lg.handlers[:], lg.level, lg.propagate) for n, lg in loggers.items()}
    saved_stdin = sys.stdin
    os.environ.update(env)
    os.chdir(REPO)
    last = _LastResort(loggers["segcli"])
    loggers["segcli"].addHandler(last)
    loggers["segcli"].propagate = False
    try:
        yield
    finally:
        sys.stdin = saved_stdin
        os.chdir(cwd)
        os.environ.clear()
        os.environ.update(saved_env)
        for sig, h in handlers.items():
            signal.signal(sig, h)
        logging.captureWarnings(False)
        for n, lg in loggers.items():
            for h in lg.handlers:
                if h not in saved_logs[n][0] and h is not last:
                    h.close()
            lg.handlers[:], lg.level, lg.propagate = saved_logs[n]


@contextlib.contextmanager
def _fd_capture(fd: int, into: list[str]):
    """What native code (ONNX Runtime, ITK) writes straight to file descriptor ``fd``, appended to ``into``."""
    saved = os.dup(fd)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), fd)
        try:
            yield
        finally:
            os.dup2(saved, fd)
            os.close(saved)
            tmp.seek(0)
            into.append(tmp.read().decode("utf-8", "replace"))


def _run_in_process(argv: list[str], stdin: str | None, env: dict) -> subprocess.CompletedProcess:
    from segcli import cli

    out, err = io.StringIO(), io.StringIO()
    native: list[str] = []
    sys.stdout.flush()
    sys.stderr.flush()
    with _process_state(env), _fd_capture(1, native), _fd_capture(2, native), contextlib.redirect_stdout(out), \
            contextlib.redirect_stderr(err):
        sys.stdin = io.StringIO(stdin or "")
        try:
            cli.main(argv)
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            if isinstance(exc.code, str):  # as the interpreter does when it exits with a message
                err.write(exc.code + "\n")
    # native writes to fd 2 come first (read from the fd 1 capture too: none expected, so any would show up)
    return subprocess.CompletedProcess(["segcli", *argv], code, out.getvalue(), "".join(native) + err.getvalue())
