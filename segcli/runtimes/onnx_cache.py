"""First-use ONNX exports in a per-user cache, so every bundle runs on ONNX Runtime without a user step.

``--backend auto`` (the default) on the CPU runs a network on ONNX Runtime: the bundle's own export
when it carries one, else an export made on first use and kept in a cache folder. Why a cache and
not shipped files: an fp32 export doubles a bundle's size (the repository keeps bundles near
10 MB), and bundles users train themselves get the same speed with no extra command.

* **Where**: ``$SEGCLI_ONNX_CACHE``, else ``$XDG_CACHE_HOME/segcli/onnx``, else
  ``~/.cache/segcli/onnx``. ``SEGCLI_ONNX_CACHE=off`` (or ``--onnx-cache off``) turns it off: the
  bundle then runs on torch unless it carries an export.
* **Key**: the network's recorded weights SHA-256 plus its architecture, configuration, channel and
  class counts, the opset and this exporter's version; new weights never reuse an old export.
* **Trust**: the weights file is hashed against ``segcli.json`` on every use (as the torch path
  does), the cached file's SHA-256 must match its sidecar record, and its metadata must name the
  same weights; anything else is ignored and rebuilt.
* **Faithful**: each export is checked against torch on two input shapes (:func:`segcli.export.parity`)
  before it is recorded; a network that does not export faithfully is recorded as such, once,
  and keeps running on torch.
* **Safe**: files are written under a temporary name and renamed (atomic); an exclusive lock file
  makes a second process that starts at the same time wait for the first export, then reuse it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from segcli import __version__, export
from segcli.bundle import load_bundle, resolve_model, sha256_file
from segcli.errors import BundleError, SegcliError, UsageError
from segcli.memory import human, peak_rss_bytes
from segcli.runtimes.predictor import int8_ok

log = logging.getLogger("segcli")

ENV = "SEGCLI_ONNX_CACHE"
OFF = ("off", "0", "none", "false", "no")
#: Bumped when the export recipe changes, so older cached files are not reused.
EXPORT_VERSION = 1
OPSET = 17

MB = 10**6
#: What an export holds at its peak, in the child process that imports torch and onnx, traces the network and
#: checks it on ONNX Runtime (parity on a batch of 2 at S x S). Measured as the child's own peak (VmHWM) for
#: the shipped bundles: U-Net f16 (975 k parameters) 392 MB at S = 64, 404-412 at 128, 452-475 at 256; ARSM
#: (209 k) 378 MB at 128. The same export of a tiny test network peaked at 340 MB on most runs and at 443-445
#: MB on the first test run in a fresh environment (three times of three; the cause is not pinned down), so
#: the base covered the higher figure. Since the export runs in a ``python -c`` child (2026-12-06), ``polyp``'s
#: first use on a fresh machine peaked at 500-503 MB in the child (88 MB parent), 2.6 MB over a base of 470:
#: the base is 530 MB. ``export_need`` = base + per parameter + per pixel of the parity batch.
EXPORT_BASE = 530 * MB
EXPORT_PER_PARAM = 24  # the weights held about six times as float32 (module, trace, proto, bytes, session)
EXPORT_PER_PIXEL = 800  # activations of the traced and the parity batch, per pixel of 2 x S x S
#: What this process grows by from one export to the next, run back to back before any runtime loads
#: (segcli.inferer.Inferer.warm_up): the process pool's bookkeeping, measured 3-9 MB.
EXPORT_SLACK = 16 * MB
#: Exports this process ran: the parent's RSS when the child started, the child's measured peak, the need
#: predicted (MB); the ``--json`` report's memory section carries them.
EXPORTS: list[dict[str, Any]] = []


def cache_root(setting: str | None = None) -> Path | None:
    """The cache folder: ``setting`` (``--onnx-cache``), else the environment, else the per-user default; None when off."""
    value = setting if setting is not None else os.environ.get(ENV)
    if value is not None and value.strip().lower() in OFF:
        return None
    if value and value.strip():
        return Path(value).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "segcli" / "onnx"


def cache_key(bundle: Any, role: str) -> str:
    """What the export depends on, hashed: recorded weights hash, architecture, shapes, opset, recipe."""
    spec = bundle.network(role)
    doc = {"weights_sha256": spec.sha256, "arch": spec.arch, "config": spec.config, "in_channels": bundle.in_channels,
           "n_classes": bundle.n_classes, "opset": OPSET, "recipe": EXPORT_VERSION}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


def cache_paths(root: Path, bundle: Any, role: str) -> tuple[Path, Path]:
    """(the .onnx, its JSON record) for one network."""
    key = cache_key(bundle, role)[:40]
    return root / f"{key}.onnx", root / f"{key}.json"


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    """An exclusive lock on ``lock_path`` (waits for another exporter); a no-op where fcntl is missing."""
    try:
        import fcntl  # lazy: Unix-only; Windows takes the branch below
    except ImportError:  # pragma: no cover - Windows: the atomic rename alone keeps the cache consistent
        yield
        return
    with open(lock_path, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except BaseException:  # a full disk, a signal: no partial file is left to pile up
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def _remove_stale_partials(root: Path) -> None:
    """Partial files of exporters that are gone (killed before their clean-up ran)."""
    for p in root.glob(".*.partial-*"):
        pid = p.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            with contextlib.suppress(OSError):
                p.unlink()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def _read_record(path: Path) -> dict[str, Any] | None:
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


#: The SHA-256 :func:`lookup` verified for the bytes it returned, by the export's path: a predictor built from
#: them keys its memory record by it (segcli.memplan) without hashing the model again.
VERIFIED: dict[str, str] = {}


def lookup(root: Path, bundle: Any, role: str) -> tuple[bytes | None, dict[str, Any] | None]:
    """The verified cached export's bytes and record, ``(None, record)`` for a recorded refusal, or ``(None, None)``."""
    onnx_path, rec_path = cache_paths(root, bundle, role)
    if onnx_path.is_symlink() or rec_path.is_symlink():  # a cache entry is a file segcli wrote, never a link
        log.warning("cached ONNX export %s is a symbolic link; removing it and exporting again", onnx_path)
        for p in (onnx_path, rec_path):
            with contextlib.suppress(OSError):
                p.unlink()
        return None, None
    rec = _read_record(rec_path)
    if rec is None:
        return None, None
    if not rec.get("ok"):
        return None, rec
    try:
        data = onnx_path.read_bytes()
    except OSError:
        return None, None
    weights = bundle.network(role).sha256 or ""
    # The binding: the export embeds the weights' hash in its own metadata (segcli.export.onnx_metadata), so
    # another network put in its place, with its record edited to match, is still caught on every load.
    if hashlib.sha256(data).hexdigest() != rec.get("sha256") or rec.get("weights_sha256") != weights \
            or not weights or weights.encode() not in data:
        log.warning("cached ONNX export %s does not match its record or the bundle's weights; exporting again",
                    onnx_path)
        for p in (onnx_path, rec_path):
            with contextlib.suppress(OSError):
                p.unlink()
        return None, None
    VERIFIED[str(onnx_path)] = str(rec["sha256"])
    return data, rec


def build(root: Path, bundle: Any, role: str) -> tuple[bytes | None, dict[str, Any]]:
    """Export ``role`` into the cache (under the lock; another process may have done it meanwhile)."""
    root.mkdir(parents=True, exist_ok=True)
    onnx_path, rec_path = cache_paths(root, bundle, role)
    _remove_stale_partials(root)
    with _exclusive(root / f"{onnx_path.stem}.lock"):
        data, rec = lookup(root, bundle, role)
        if data is not None or rec is not None:
            return data, rec or {}
        t0 = time.perf_counter()
        module = bundle.load_module(role)  # verifies the weights' SHA-256
        rec = {"bundle": bundle.name, "role": role, "weights_sha256": bundle.network(role).sha256,
               "segcli": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        try:
            model = export.export_module(module, in_channels=bundle.in_channels, input_size=bundle.input_size, opset=OPSET,
                                  metadata=export.onnx_metadata(bundle, role))
            data = model.SerializeToString()
            diff = export.parity(module, data, export.validation_inputs(bundle.in_channels, bundle.input_size))
        except SegcliError as exc:
            rec.update(ok=False, reason=str(exc))
            _write_atomic(rec_path, json.dumps(rec, indent=1).encode())
            return None, rec
        rec["max_rel_logit_diff"] = diff
        if diff > export.PARITY_TOL:
            rec.update(ok=False, reason=f"ONNX Runtime disagrees with torch (max relative logit difference {diff:.2e})")
            _write_atomic(rec_path, json.dumps(rec, indent=1).encode())
            return None, rec
        _write_atomic(onnx_path, data)
        rec.update(ok=True, sha256=hashlib.sha256(data).hexdigest(), bytes=len(data),
                   export_seconds=round(time.perf_counter() - t0, 2))
        _write_atomic(rec_path, json.dumps(rec, indent=1).encode())  # the record last: it is what makes the file count
        log.info("exported %s/%s to ONNX for ONNX Runtime (%.1f s, cached in %s)", bundle.name, role,
                 rec["export_seconds"], root)
        return data, rec


def child_main(argv: list[str]) -> int:
    """The export child (:func:`_build_isolated`): build ``role`` of the bundle into the cache, then print its own
    peak (not ru_maxrss, which carries the parent's) as the last line of stdout, for the parent's account of
    the budget."""
    root, bundle_path, allow_unhashed, role = argv
    bundle = load_bundle(Path(bundle_path))
    bundle.allow_unhashed = allow_unhashed == "1"
    build(Path(root), bundle, role)
    print(json.dumps({"export_peak_bytes": peak_rss_bytes()}))
    return 0


def _build_isolated(root: Path, bundle: Any, role: str) -> tuple[bytes | None, dict[str, Any]]:
    """:func:`build` in a short-lived child interpreter when torch is not loaded here yet.

    Exporting imports torch (about 300 MB of RSS that never goes back): in the process that then runs the
    networks on ONNX Runtime it made a first run need 385 MB where the next ones need 130 (segcli.memplan
    counts what the process holds). Where torch is already loaded, the export runs here. The child is a
    fresh ``python -c`` with this process's import path, not a multiprocessing child: spawning one re-runs
    the caller's main script, so a user's script without an ``if __name__ == "__main__"`` guard failed its
    first prediction with "BrokenProcessPool".
    """
    if "torch" in sys.modules:
        return build(root, bundle, role)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    code = "import sys; from segcli.runtimes.onnx_cache import child_main; sys.exit(child_main(sys.argv[1:]))"
    proc = subprocess.run([sys.executable, "-c", code, str(root), str(bundle.path),
                           "1" if getattr(bundle, "allow_unhashed", False) else "0", role],
                          capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:  # (a Ctrl-C reaches this process too, and stops it in subprocess.run)
        lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
        why = (f"killed by signal {-proc.returncode}" + (" (out of memory?)" if proc.returncode == -9 else "")
               if proc.returncode < 0 else lines[-1] if lines else f"exit status {proc.returncode}")
        raise SegcliError(f"the ONNX export of the {role} network failed: {why}", bundle.path)
    data, rec = lookup(root, bundle, role)
    try:
        extra = json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        extra = {}
    return data, {**(rec or {}), **extra}


def export_need(bundle: Any, role: str) -> int:
    """Bytes the export of ``role`` holds at its peak, beside the process that asked for it (see
    :data:`EXPORT_BASE`): from the weights' size and the bundle's input size, before anything is exported."""
    side = int(bundle.input_size)
    return EXPORT_BASE + EXPORT_PER_PARAM * (_weights_bytes(bundle, role) // 4) + EXPORT_PER_PIXEL * 2 * side * side


def _weights_bytes(bundle: Any, role: str) -> int:
    try:
        return int(bundle.weights_path(role).stat().st_size)
    except OSError:
        return 0


def _rss() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):  # no /proc (macOS): the peak so far stands in for it
        import resource  # lazy: Unix-only (this branch is the no-/proc fallback)

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def check_export_budget(bundle: Any, roles: list[str] | tuple[str, ...], budget: int,
                        slack: int = EXPORT_SLACK) -> int:
    """Refuse (exit 2, before any work) first-use exports of ``roles`` that would not fit ``budget``
    (``--max-memory``) beside this process as it is now (+ ``slack``, what it grows by until the last of
    them starts): a cgroup counts the child and its parent together. Returns this process's RSS (bytes)."""
    here = _rss()
    need = here + slack + max(export_need(bundle, r) for r in roles)
    if need > budget:
        raise UsageError(f"first use of model {bundle.name} needs about {human(need)} to export its ONNX graph; "
                         f"--max-memory is {human(budget)} (run it once without --max-memory first: the export "
                         "is cached)")
    return here


def cached_export(bundle: Any, role: str, setting: str | None = None,
                  budget: int | None = None) -> tuple[bytes | None, str]:
    """The network's faithful ONNX export from the cache, building it on first use; ``(None, why)`` when none.

    ``budget`` (``--max-memory``, bytes): a first-use export that would not fit it is refused before it starts
    (:func:`check_export_budget`), and one that went over it after all is said."""
    root = cache_root(setting)
    if root is None:
        return None, "the ONNX cache is off"
    if not bundle.network(role).sha256:
        return None, "the weights have no recorded SHA-256 to key an export by"
    verify_weights(bundle, role)
    data, rec = lookup(root, bundle, role)
    if data is None and rec is None:
        here = check_export_budget(bundle, [role], budget, slack=0) if budget is not None else _rss()
        try:
            data, rec = _build_isolated(root, bundle, role)
            _said(bundle, role, here, rec or {}, budget)
        except ImportError as exc:
            return None, f"exporting needs torch and onnx ({exc.name} is missing)"
        except OSError as exc:
            return None, f"cannot write the ONNX cache {root}: {exc.strerror or exc}"
    if data is None:
        return None, str((rec or {}).get("reason", "no export"))
    return data, str(cache_paths(root, bundle, role)[0])


def _said(bundle: Any, role: str, here: int, rec: dict[str, Any], budget: int | None) -> None:
    """Keep what the export took (:data:`EXPORTS`); say so when it went over the budget after all."""
    peak = int(rec.get("export_peak_bytes") or 0)
    EXPORTS.append({"bundle": bundle.name, "role": role, "parent_mb": round(here / MB, 1),
                    "child_peak_mb": round(peak / MB, 1),
                    "need_mb": round((here + export_need(bundle, role)) / MB, 1)})
    if budget is not None and here + peak > budget:
        log.warning("the ONNX export of %s/%s took %.1f MB with this process (%.1f MB), over --max-memory "
                    "%.1f MB", bundle.name, role, peak / MB, here / MB, budget / MB)


def verify_weights(bundle: Any, role: str) -> None:
    """The weights file must still match segcli.json, as the torch path requires (a cache never hides tampering)."""
    spec = bundle.network(role)
    path = bundle.weights_path(role)
    if sha256_file(path) != spec.sha256:
        raise BundleError(f"{spec.weights} does not match its recorded SHA-256 (corrupted or tampered); refused", bundle.path)


def first_use(bundle: Any, role: str, setting: str | None = None) -> bool:
    """Whether ``--backend auto`` exports ``role`` on its first use here: no record in the cache yet.

    Reads nothing: :func:`status` reads and hashes the cached export (10-20 ms a network), and the export's
    own :func:`lookup` does so again before the session is made."""
    if int8_ok(bundle, role) or bundle.network(role).onnx:
        return False
    root = cache_root(setting)
    if root is None or (root.exists() and not root.is_dir()):
        return False
    return not cache_paths(root, bundle, role)[1].is_file()


def status(bundle: Any, role: str, setting: str | None = None) -> str:
    """What ``--backend auto`` will run for ``role`` on the CPU, without exporting anything (``segcli doctor``)."""
    if int8_ok(bundle, role):  # what --precision auto runs on the CPU
        return "onnxruntime int8 (the bundle's checked int8 export; --precision fp32 for fp32)"
    if bundle.network(role).onnx:
        return "onnxruntime fp32 (the bundle's export)"
    root = cache_root(setting)
    if root is None:
        return "torch fp32 (ONNX cache off)"
    if root.exists() and not root.is_dir():
        return f"refused: the ONNX cache {root} is a file, not a folder (predict stops with exit 2)"
    data, rec = lookup(root, bundle, role)
    if data is not None:
        return "onnxruntime fp32 (cached export)"
    if rec is not None:
        return f"torch fp32 (export refused: {rec.get('reason')})"
    return "onnxruntime fp32 (exported on first use)"


#: Bumped when the way network costs are measured changes (2: freed heap handed back before each
#: measurement; version-1 records could read a batch-1 cost near zero), so older records are measured again.
MEMORY_RECORD_VERSION = 2


def _memory_path(digest: str, setting: str | None = None) -> Path | None:
    root = cache_root(setting)
    return None if root is None else root / f"memory-{digest[:40]}.json"


def memory_record(digest: str, size: int, setting: str | None = None) -> dict[int, int] | None:
    """The measured ``{batch: bytes}`` of the export whose SHA-256 is ``digest`` at input size ``size``
    (:func:`segcli.memplan.measure_onnx`), kept beside the cached exports; None when not measured yet."""
    path = _memory_path(digest, setting)
    doc = _read_record(path) if path is not None else None
    if (doc or {}).get("version") != MEMORY_RECORD_VERSION:
        return None
    table = (doc or {}).get("sizes", {}).get(str(int(size)))
    if not isinstance(table, dict) or not table:
        return None
    try:
        return {int(b): int(v) for b, v in table.items()}
    except (TypeError, ValueError):
        return None


def save_memory_record(digest: str, size: int, table: dict[int, int], setting: str | None = None) -> None:
    """Record a measured cost table (atomic; a cache that cannot be written only means measuring again)."""
    path = _memory_path(digest, setting)
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        doc = _read_record(path) or {}
        if doc.get("version") != MEMORY_RECORD_VERSION:
            doc = {"sha256": digest, "version": MEMORY_RECORD_VERSION, "sizes": {}}
        doc.setdefault("sizes", {})[str(int(size))] = {str(b): int(v) for b, v in sorted(table.items())}
        doc["measured"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        _write_atomic(path, json.dumps(doc, indent=1).encode())
    except OSError as exc:
        log.info("cannot record the network's memory cost in %s: %s", path, exc)


def export_to_cache(model: str | os.PathLike[str]) -> dict[str, str]:
    """Fill the cache for a shipped bundle, as its first use would, without writing into the bundle: shipped
    bundles belong to the installation (read-only for a cluster's users, replaced by an upgrade). Returns
    where each network's export is, or raises with the reason an export was refused."""
    if cache_root() is None:
        raise UsageError("the ONNX cache is off (SEGCLI_ONNX_CACHE); a shipped bundle is exported into the cache, "
                         "never into the installation")
    bundle = load_bundle(resolve_model(model))
    where: dict[str, str] = {}
    for role in bundle.networks:
        data, info = cached_export(bundle, role)
        if data is None:
            raise SegcliError(f"{bundle.name}/{role}: no ONNX export ({info})")
        where[role] = info
    return where
