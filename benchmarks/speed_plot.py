"""bench_speed's figure: speed-up over the sliding window against tissue fraction, and the stage breakdown.
Split from bench_speed.py (module size)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from speed_setup import GOALS, REF_STTS_OVER_DIRECT

# -- report ----------------------------------------------------------------------------------------------


def _sweep_axes(ax: Any, result: dict[str, Any]) -> None:
    ax.axhline(1.0, color="k", lw=0.8)
    ax.axhline(GOALS["stts_vs_sliding_speedup"], color="r", ls="--", lw=0.8, label="goal 8x")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("fraction of the canvas covered by tiles (1.0 = mosaic)")
    ax.set_ylabel("sliding time / method time (same rounds)")
    ax.set_title(f"speed-up over sliding window ({result['settings']['sweep_size']}² sweep; * = big slides)\n"
                 "labels: Dice vs sliding", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rsw = result.get("refine_sweep", [])
    fig, axes = plt.subplots(1, 4 if rsw else 3, figsize=(22 if rsw else 17, 4.8))
    if rsw:
        ax = axes[3]
        for k in sorted({r["canvas"] for r in rsw}):
            rs = sorted((r for r in rsw if r["canvas"] == k), key=lambda r: r["refine_threshold"])
            ax.plot([r["flops_saved_vs_sliding"] for r in rs], [r["dice_gt"] - r["dice_gt_sliding"] for r in rs],
                    marker="o", label=f"{k}: Dice(gt) - sliding's")
            for r in rs:
                ax.annotate(f"t={r['refine_threshold']:g}", (r["flops_saved_vs_sliding"], r["dice_gt"] - r["dice_gt_sliding"]),
                            fontsize=6, textcoords="offset points", xytext=(3, 3))
        ax.axvline(GOALS["refine_flops_saved"], color="r", ls="--", lw=0.8, label="goal: 60 % saved")
        ax.axhspan(-GOALS["dice_tolerance"], GOALS["dice_tolerance"], color="g", alpha=0.15, label="Dice within 0.01")
        ax.set_xlabel("FLOPs saved vs sliding window")
        ax.set_ylabel("Dice(refine) - Dice(sliding), vs ground truth")
        ax.set_title("refine: refine_threshold sweep", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    ax = axes[0]
    rows = result.get("sweep", [])
    if not rows and result.get("slides"):  # slides only: speed-up against the canvas side
        for v, mk in (("stts", "o"), ("stts_z4", "s"), ("refine", "^")):
            rs = sorted((r for r in result["slides"] if r["variant"] == v), key=lambda r: r["side"])
            if rs:
                ax.plot([r["side"] for r in rs], [r["speedup_vs_sliding"] for r in rs], marker=mk, label=v)
                for r in rs:
                    est = " (est.)" if r.get("sliding_estimated") else ""
                    ax.annotate(f"{r['speedup_vs_sliding']:.2f}x{est}, Dice {r['dice_gt']:.3f}",
                                (r["side"], r["speedup_vs_sliding"]), fontsize=6, textcoords="offset points", xytext=(3, 3))
        ax.axhline(1.0, color="k", lw=0.8)
        ax.axhline(GOALS["stts_vs_sliding_speedup"], color="r", ls="--", lw=0.8, label="goal 8x")
        ax.set_xscale("log", base=2)
        ax.set_xlabel(f"slide side (px), {result['settings']['slide_fraction']:.0%} covered by tiles")
        ax.set_ylabel("sliding time / method time (same rounds)")
        ax.set_title("speed-up over sliding window; labels: ratio, Dice vs ground truth", fontsize=9)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    for v, mk in (("stts", "o"), ("stts_z4", "s"), ("refine", "^")):
        rs = sorted((r for r in rows if r["variant"] == v), key=lambda r: r["tile_fraction"])
        if rs:
            ax.plot([r["tile_fraction"] for r in rs], [r["speedup_vs_sliding"] for r in rs], marker=mk, label=v)
            for r in rs:
                ax.annotate(f"{r['dice_vs_sliding']:.3f}", (r["tile_fraction"], r["speedup_vs_sliding"]), fontsize=6,
                            textcoords="offset points", xytext=(3, 3))
    for r in result.get("slides", []) if rows else []:
        if r["variant"] in ("stts", "stts_z4"):
            ax.scatter([r["tile_fraction"]], [r["speedup_vs_sliding"]], marker="*", s=80, color="k" if r["variant"] == "stts" else "grey",
                       zorder=5)
            ax.annotate(f"{r['side']}² {r['variant']}", (r["tile_fraction"], r["speedup_vs_sliding"]), fontsize=7,
                        textcoords="offset points", xytext=(4, -9))
    if rows or not result.get("slides"):
        _sweep_axes(ax, result)

    ax = axes[1]
    rows = [r for r in result.get("slides", [])]
    if rows:
        stages = ["rough", "components", "rank", "crops", "fine", "fuse", "upsample", "unaccounted"]
        labels = [f"{r['side']}²\n{r['variant']}" for r in rows]
        bottom = np.zeros(len(rows))
        for st in stages:
            vals = np.array([max(r["unaccounted_s"], 0) if st == "unaccounted" else r["stages_median_s"].get(st, 0.0)
                             for r in rows])
            if vals.any():
                ax.bar(range(len(rows)), vals, bottom=bottom, label=st)
                bottom += vals
        ax.scatter(range(len(rows)), [r["limit_s"] for r in rows], marker="_", s=300, color="k", zorder=5,
                   label="FLOPs / conv peak")
        ax.set_xticks(range(len(rows)), labels, fontsize=7)
        ax.set_yscale("log")
        ax.set_ylabel("seconds (median)")
        ax.set_title("stage breakdown vs the physical limit", fontsize=9)
        ax.legend(fontsize=7)

    ax = axes[2]
    rows = result.get("cells", [])
    if not rows:
        fig.delaxes(ax)
        if not rsw:
            fig.set_size_inches(12, 4.8)
    else:
        ax.plot([r["size"] for r in rows], [r["stts_over_direct"] for r in rows], marker="o", label="ours: stts / direct time")
        ax.plot([r["size"] for r in rows], [r["flops_ratio"] for r in rows], marker="x", ls=":", label="ours: stts / direct FLOPs")
        ax.axhspan(*REF_STTS_OVER_DIRECT, color="orange", alpha=0.3, label="reference 3.5-4.9x")
        loops = {r["size"]: r for r in result.get("loop", []) if r["set"].startswith("cells")}
        if loops:
            ax.plot(sorted(loops), [loops[s]["speedup_fine_stage"] for s in sorted(loops)], marker="s",
                    label="fine stage: loop / batched")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("S")
        ax.set_title(f"cells (dsb2018, {rows[0]['images']} images)", fontsize=9)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    m = result["machine"]
    fig.suptitle(f"{result['network']} | backend {result['settings']['backend']}, {m['threads']} thread(s), "
                 f"{m['cores_available']} cores, load {m['loadavg_start'][0]:.1f}->{m['loadavg_end'][0]:.1f}, "
                 f"conv peak {result['conv_gflops']:.0f} GFLOP/s", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
