"""Which patches should refine re-segment? Dice against the fraction of patches refined, per ranking criterion.

For each image the rough pass runs once and the fine network runs on EVERY grid patch once (exactly as
``segcli.engines.refine`` does them); any budget is then a composite of the two, so every criterion is
scored on the same network outputs. Fine FLOPs are proportional to the number of patches refined (every
patch is one fine input of the same size), so "fraction of patches" is "fraction of fine FLOPs".

Criteria (higher score = refine first):

* ``pixel``, ``mean``: the engine's criteria (Cruz et al.'s code; the seed paper's |mean - 0.5|).
* ``pixel-cal``, ``expected-errors``: the same rough probabilities after temperature scaling fitted on
  the FIT cases (NLL over their pixels); ``expected-errors`` is the calibrated expected count of wrong
  rough pixels in the patch, sum of (1 - max_k p_k).
* ``learned``: ridge regression, fitted on the FIT cases, of each patch's measured gain (rough errors
  minus fine errors, pixels, inside the scored region) on rough-pass features: raw and calibrated
  uncertainty, entropy, foreground fraction, rough-mask boundary length, input mean, std and mean
  gradient magnitude (fine detail the rough pass cannot resolve).
* ``oracle``: the measured gain itself, which no criterion computed before the fine pass can beat: the
  upper bound on what any ranking could save.

The rough-pass network's own FLOPs are not in the fraction (they are paid once per image whatever the
budget). Curves are per-image top-k (the engine's ``--patches N``). With ``--loo`` each case is scored
with the temperature and predictor fitted on the other cases (leave one out) when no separate fit split
exists.

    python benchmarks/refine_ranking.py --model models/retina-vessels --data ../shared/data/drive \\
        --loo 23 25 27 40 --fov --json OUT.json --plot OUT.png
    python benchmarks/refine_ranking.py --model runs/retina-t3 --data ../shared/data/drive \\
        --fit 30 31 36 --test 23 25 27 40 --fov --json OUT.json --plot OUT.png
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

CRITERIA = ("pixel", "mean", "pixel-cal", "expected-errors", "learned", "oracle")
FEATURES = ("pixel", "mean", "pixel-cal", "expected-errors", "entropy", "fg-fraction", "boundary", "input-mean",
            "input-std", "input-gradient", "valid-fraction")


@dataclass
class Case:
    """One image's rough and per-patch fine outputs, with its ground truth and scored region."""

    name: str
    grid: np.ndarray  # (n, 4) full-resolution boxes
    rough_probs: np.ndarray  # (K, H, W) rough probabilities upsampled to full resolution
    rough: np.ndarray  # (H, W) rough labels
    fine: list[np.ndarray]  # fine labels per patch
    image: np.ndarray  # (C, H, W) normalised input
    gt: np.ndarray  # (H, W) labels
    valid: np.ndarray  # (H, W) bool: the pixels scored (FOV, or all)


def collect(model: str, data: Path, names: list[str], fov: bool) -> list[Case]:
    """Run the bundle's rough pass and its fine network on every patch of each case."""
    from segcli import io
    from segcli.api import Segmenter
    from segcli.engines.base import rough_input, upsample_labels
    from segcli.fusion import labels_from_probs
    from segcli.geometry import patch_grid
    from segcli.resize import resize

    seg = Segmenter(model, threads=1, overrides={"patches": 10**9})
    images = {p.stem: p for p in (data / "images").iterdir()}
    cases = []
    for name in names:
        array = io.open_image(images[name]).array
        staged = seg.stage_2d(array)
        kw, plane = staged.kwargs, staged.plane
        coarse, fine = seg.predictor(staged.bundle, "coarse"), seg.predictor(staged.bundle, "fine")
        H, W = plane.shape
        fine_size = kw.get("fine_size") or kw["size"]
        x, (h, w) = rough_input(plane, kw["size"], kw["keep_aspect"])
        low = coarse(x[None])[0][:, :h, :w]
        rough, probs = upsample_labels(low, (H, W), kw["threshold"], want_probs=True)
        grid = patch_grid((H, W), kw.get("patch_size") or fine_size)
        fine_labels = []
        for box in grid:
            xb = resize(plane.region(box), (fine_size, fine_size), "area")[None]
            p = resize(fine(xb)[0], (int(box[2] - box[0]), int(box[3] - box[1])), "bilinear")
            fine_labels.append(labels_from_probs(p, kw["threshold"]))
        gt = np.asarray(io.open_image(data / "masks" / f"{name}.png").array)[..., 0]
        gt = (gt > 0).astype(np.uint8) if probs.shape[0] == 2 else gt.astype(np.uint8)
        valid = (np.asarray(io.open_image(data / "fov" / f"{name}.png").array)[..., 0] > 0) if fov else \
            np.ones((H, W), bool)
        full = plane.region(np.asarray([0, 0, H, W]))
        cases.append(Case(name, grid, probs, rough, fine_labels, full, gt, valid))
        print(f"collected {name}: {len(grid)} patches", flush=True)
    return cases


# ------------------------------------------------------------------------------------------ calibration
def calibrate(probs: np.ndarray, t: float) -> np.ndarray:
    """Temperature scaling on probabilities: softmax(log p / T)."""
    z = np.log(np.clip(probs, 1e-6, 1.0)) / t
    z -= z.max(axis=0, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=0, keepdims=True)


def fit_temperature(cases: list[Case], n_pix: int = 200_000, seed: int = 0) -> float:
    """T minimising the NLL of the calibrated rough probabilities over (a sample of) the scored pixels."""
    rng = np.random.default_rng(seed)
    ps, ys = [], []
    for c in cases:
        idx = np.flatnonzero(c.valid)
        idx = rng.choice(idx, min(len(idx), n_pix // max(len(cases), 1)), replace=False)
        ps.append(c.rough_probs.reshape(c.rough_probs.shape[0], -1)[:, idx])
        ys.append(c.gt.reshape(-1)[idx])
    p, y = np.concatenate(ps, axis=1), np.concatenate(ys)
    best = (np.inf, 1.0)
    for t in np.exp(np.linspace(np.log(0.2), np.log(10.0), 81)):
        q = calibrate(p[:, None, :], t)[:, 0, :]
        nll = -np.mean(np.log(np.clip(q[y, np.arange(len(y))], 1e-9, 1.0)))
        best = min(best, (nll, float(t)))
    return best[1]


# ------------------------------------------------------------------------------------------ patch features
def _margin(probs: np.ndarray) -> np.ndarray:
    """1 - (top-1 minus top-2 probability) per pixel: the engine's pixel uncertainty."""
    top2 = np.sort(probs, axis=0)[-2:]
    return 1.0 - (top2[1] - top2[0])


def features(c: Case, t: float) -> np.ndarray:
    """(n, len(FEATURES)) rough-pass features per patch; nothing here needs the fine pass or the truth."""
    cal = calibrate(c.rough_probs, t)
    u_raw, u_cal = _margin(c.rough_probs), _margin(cal)
    err = 1.0 - cal.max(axis=0)
    ent = -(cal * np.log(np.clip(cal, 1e-9, 1.0))).sum(axis=0)
    edge = np.zeros(c.rough.shape, np.float32)
    edge[:, 1:] += c.rough[:, 1:] != c.rough[:, :-1]
    edge[1:, :] += c.rough[1:, :] != c.rough[:-1, :]
    gy, gx = np.gradient(c.image.mean(axis=0))
    grad = np.hypot(gy, gx)
    rows = []
    for y0, x0, y1, x1 in c.grid:
        sl = (slice(y0, y1), slice(x0, x1))
        m = c.rough_probs[:, y0:y1, x0:x1].reshape(c.rough_probs.shape[0], -1).mean(axis=1)
        top2 = np.sort(m)[-2:]
        img = c.image[:, y0:y1, x0:x1]
        rows.append([u_raw[sl].mean(), 1.0 - (top2[1] - top2[0]), u_cal[sl].mean(), err[sl].sum(), ent[sl].mean(),
                     float((c.rough[sl] > 0).mean()), edge[sl].mean(), float(img.mean()),
                     float(img.reshape(img.shape[0], -1).std(axis=1).max()), float(grad[sl].mean()),
                     float(c.valid[sl].mean())])
    return np.asarray(rows, dtype=np.float64)


def gains(c: Case) -> np.ndarray:
    """Measured gain of refining each patch alone: rough errors minus fine errors in the scored region."""
    out = []
    for (y0, x0, y1, x1), f in zip(c.grid, c.fine, strict=True):
        v, g = c.valid[y0:y1, x0:x1], c.gt[y0:y1, x0:x1]
        out.append(float(((c.rough[y0:y1, x0:x1] != g) & v).sum() - ((f != g) & v).sum()))
    return np.asarray(out)


class Ridge:
    """Standardised ridge regression of per-patch gain (fraction of the patch) on the features."""

    def __init__(self, lam: float = 1.0) -> None:
        self.lam = lam

    def fit(self, x: np.ndarray, y: np.ndarray) -> Ridge:
        self.mu, self.sd = x.mean(axis=0), x.std(axis=0) + 1e-9
        z = np.c_[(x - self.mu) / self.sd, np.ones(len(x))]
        reg = self.lam * np.eye(z.shape[1])
        reg[-1, -1] = 0.0
        self.w = np.linalg.solve(z.T @ z + reg, z.T @ y)
        return self

    def predict(self, x: np.ndarray) -> np.ndarray:
        return np.c_[(x - self.mu) / self.sd, np.ones(len(x))] @ self.w


# ------------------------------------------------------------------------------------------ curves
def composite(c: Case, chosen: np.ndarray) -> np.ndarray:
    """The engine's output when ``chosen`` patches (in rank order) are refined: later writes win."""
    out = c.rough.copy()
    for i in chosen:
        y0, x0, y1, x1 = c.grid[i]
        out[y0:y1, x0:x1] = c.fine[i]
    return out


def score(preds: list[np.ndarray], cases: list[Case], k: int) -> dict[str, float]:
    """Mean per-image Dice of the foreground (binary) and the pooled mIoU over all K classes."""
    inter, union, dices = np.zeros(k), np.zeros(k), []
    for p, c in zip(preds, cases, strict=True):
        v = c.valid
        a, b = (p > 0) & v, (c.gt > 0) & v
        s = int(a.sum() + b.sum())
        dices.append(1.0 if s == 0 else 2.0 * int((a & b).sum()) / s)
        for j in range(k):
            pa, gb = (p == j) & v, (c.gt == j) & v
            inter[j] += (pa & gb).sum()
            union[j] += (pa | gb).sum()
    ok = union > 0
    return {"dice": float(np.mean(dices)), "miou": float(np.mean(inter[ok] / union[ok]))}


def curves(cases: list[Case], scores: dict[str, list[np.ndarray]], fractions: np.ndarray, k: int) -> dict:
    """Per criterion, the metrics at each fraction of patches (per-image top-k, the engine's budget)."""
    out: dict[str, list[dict[str, float]]] = {}
    for crit, per_case in scores.items():
        rows = []
        for f in fractions:
            preds = []
            for c, s in zip(cases, per_case, strict=True):
                n = int(round(f * len(c.grid)))
                order = np.lexsort((np.arange(len(s)), -s))[:n]
                preds.append(composite(c, order))
            rows.append({"fraction": float(f), **score(preds, cases, k)})
        out[crit] = rows
    return out


def rank_scores(fit: list[Case], test: list[Case]) -> tuple[dict[str, list[np.ndarray]], dict[str, Any]]:
    """Every criterion's patch scores on ``test``, with calibration and predictor fitted on ``fit``."""
    t = fit_temperature(fit)
    xf = np.concatenate([features(c, t) for c in fit])
    area = np.concatenate([[(b[2] - b[0]) * (b[3] - b[1]) for b in c.grid] for c in fit])
    model = Ridge().fit(xf, np.concatenate([gains(c) for c in fit]) / area)
    out: dict[str, list[np.ndarray]] = {k: [] for k in CRITERIA}
    for c in test:
        x = features(c, t)
        a = np.asarray([(b[2] - b[0]) * (b[3] - b[1]) for b in c.grid], dtype=np.float64)
        for j, name in enumerate(FEATURES[:4]):
            out[name].append(x[:, j])
        out["learned"].append(model.predict(x) * a)
        out["oracle"].append(gains(c))
    return out, {"temperature": t, "ridge_weights": dict(zip([*FEATURES, "bias"], model.w.round(4).tolist(),
                                                                strict=True))}


def loo_scores(cases: list[Case]) -> tuple[dict[str, list[np.ndarray]], list[dict[str, Any]]]:
    """Each case ranked by the calibration and predictor fitted on all the other cases."""
    out: dict[str, list[np.ndarray]] = {k: [] for k in CRITERIA}
    fits = []
    for i, c in enumerate(cases):
        s, info = rank_scores(cases[:i] + cases[i + 1:], [c])
        for k in CRITERIA:
            out[k].extend(s[k])
        fits.append({"held_out": c.name, **info})
    return out, fits


def summarise(table: dict[str, list[dict[str, float]]], metric: str, tol: float) -> dict[str, Any]:
    """Per criterion: the smallest fraction whose metric is within ``tol`` of refining every patch."""
    ref = table["pixel"][-1][metric]
    out = {}
    for crit, rows in table.items():
        ok = [r["fraction"] for r in rows if r[metric] >= ref - tol]
        frac = min(ok) if ok else None
        out[crit] = {"min_fraction": frac, "fine_flops_saved": None if frac is None else 1.0 - frac,
                     "metric_at_min": None if frac is None else next(r[metric] for r in rows if r["fraction"] == frac)}
    return {"reference_all_patches": ref, "tolerance": tol, "metric": metric, "criteria": out}


def plot(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = doc["summary"]["metric"]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for crit, rows in doc["curves"].items():
        style = "k--" if crit == "oracle" else "-"
        ax.plot([r["fraction"] for r in rows], [r[metric] for r in rows], style, marker=".", label=crit)
    ref = doc["summary"]["reference_all_patches"]
    ax.axhline(ref - doc["summary"]["tolerance"], color="grey", lw=0.8, ls=":", label=f"all patches - {doc['summary']['tolerance']}")
    ax.set(xlabel="fraction of patches refined (= fraction of fine FLOPs)",
           ylabel={"dice": "Dice (mean over images)", "miou": "mIoU (pooled)"}[metric],
           title=f"{doc['model']}: {len(doc['test_cases'])} images, {doc['protocol']}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--fit", nargs="*", default=[], help="cases that fit the temperature and the predictor")
    ap.add_argument("--test", nargs="*", default=[], help="cases scored")
    ap.add_argument("--loo", nargs="*", default=[], help="leave-one-out over these cases instead of --fit/--test")
    ap.add_argument("--fov", action="store_true", help="score inside DATA/fov masks (DRIVE)")
    ap.add_argument("--metric", default="dice", choices=("dice", "miou"))
    ap.add_argument("--tol", type=float, default=0.01)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--plot", type=Path, default=None)
    args = ap.parse_args()
    if args.loo:
        test = collect(args.model, args.data, args.loo, args.fov)
        scores, fits = loo_scores(test)
    else:
        fit = collect(args.model, args.data, args.fit, args.fov)
        test = collect(args.model, args.data, args.test, args.fov)
        scores, info = rank_scores(fit, test)
        fits = [info]
    n = len(test[0].grid)
    k = int(test[0].rough_probs.shape[0])
    table = curves(test, scores, np.arange(n + 1) / n, k)
    doc = {"model": args.model, "data": str(args.data), "fit_cases": args.fit, "test_cases": [c.name for c in test],
           "protocol": "leave-one-out" if args.loo else "fit/test", "patches_per_image": n, "fits": fits,
           "curves": table, "summary": summarise(table, args.metric, args.tol)}
    for crit, s in doc["summary"]["criteria"].items():
        print(f"{crit:>16}: {args.metric} within {args.tol} of all-patches "
              f"({doc['summary']['reference_all_patches']:.4f}) from fraction {s['min_fraction']}", flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(doc, indent=1))
    if args.plot:
        plot(doc, args.plot)


if __name__ == "__main__":
    main()
