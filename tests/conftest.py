"""Shared fixtures: tiny bundles built on the fly (no network, no shared data)."""

from __future__ import annotations

import locale
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from segcli.bundle import save_bundle
from segcli.nets import build

REPO = Path(__file__).resolve().parent.parent


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


@pytest.fixture(scope="session")
def grey_bundle(tmp_path_factory) -> Path:
    return make_bundle(tmp_path_factory.mktemp("bundles") / "grey")


@pytest.fixture(scope="session")
def rgb_bundle(tmp_path_factory) -> Path:
    return make_bundle(tmp_path_factory.mktemp("bundles") / "rgb", in_channels=3,
                       normalization={"kind": "dtype"})


def run_cli(*args: str, stdin: str | None = None, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run segcli as a user does: a subprocess, with its exit code, stdout and stderr."""
    e = {**os.environ, "NO_COLOR": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "segcli", *map(str, args)], capture_output=True, encoding="utf-8", errors="replace",
                          input=stdin, env=e, timeout=timeout, cwd=REPO)
