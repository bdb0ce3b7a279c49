"""The experiment report: `report.md` plus PNG plots, from the runs' metrics.parquet and eval.parquet."""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq


def _series(rows: list[dict], key: str) -> np.ndarray:
    return np.array([r.get(key) if r.get(key) is not None else math.nan for r in rows], dtype=float)


def _window_mean(x: np.ndarray, part: slice) -> float:
    v = x[part]
    v = v[np.isfinite(v)]
    return float(v.mean()) if len(v) else math.nan


def _fmt(values: list[float]) -> str:
    v = np.array([x for x in values if np.isfinite(x)])
    if not len(v):
        return "n/a"
    return f"{v.mean():.3f} ± {v.std():.3f}" if len(v) > 1 else f"{v.mean():.3f}"


def load_runs(root: Path, runs: list[tuple[str, int]]) -> dict[str, list[dict]]:
    """arm -> [{"seed", "metrics": rows, "eval": rows}] for the runs that finished."""
    out: dict[str, list[dict]] = defaultdict(list)
    for arm, seed in runs:
        d = root / f"{arm}-seed{seed}"
        if not (d / "metrics.parquet").exists():
            continue
        ev = pq.read_table(d / "eval.parquet").to_pylist() if (d / "eval.parquet").exists() else []
        out[arm].append({"seed": seed, "metrics": pq.read_table(d / "metrics.parquet").to_pylist(), "eval": ev})
    return out


def arm_table(data: dict[str, list[dict]], probe: str = "hack") -> list[dict]:
    """One row per arm: start/end means (first 5 / last 10 steps) over seeds, and the last evaluation."""
    rows = []
    for arm, runs in data.items():
        row: dict = {"arm": arm, "seeds": len(runs)}
        for key, label in (("rollout/hack_rate", "hack"), ("rollout/correct_rate", "correct"),
                           ("rollout/task_reward", "task_reward"), ("rollout/shaped_reward", "shaped_reward")):
            row[f"{label}_start"] = [_window_mean(_series(r["metrics"], key), slice(0, 5)) for r in runs]
            row[f"{label}_end"] = [_window_mean(_series(r["metrics"], key), slice(-10, None)) for r in runs]
        for what in ("auroc_live", "auroc_frozen", "auroc_retrained", "score_gap"):
            key = f"eval/{probe}_{what}"
            row[what] = [r["eval"][-1].get(key, math.nan) if r["eval"] else math.nan for r in runs]
            row[what + "_start"] = [r["eval"][0].get(key, math.nan) if r["eval"] else math.nan for r in runs]
        rows.append(row)
    return rows


def _plot_metric(data, key: str, ylabel: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for arm, runs in data.items():
        curves = [_series(r["metrics"], key) for r in runs]
        n = min(len(c) for c in curves)
        stack = np.stack([c[:n] for c in curves])
        steps = np.arange(1, n + 1)
        mean = np.nanmean(stack, 0)
        line, = ax.plot(steps, mean, label=f"{arm} (n={len(runs)})")
        if len(runs) > 1:
            ax.fill_between(steps, np.nanmin(stack, 0), np.nanmax(stack, 0), color=line.get_color(), alpha=0.2)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_auroc(data, probe: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    styles = {"auroc_live": "-", "auroc_frozen": ":", "auroc_retrained": "--"}
    for i, (arm, runs) in enumerate(data.items()):
        color = f"C{i}"
        for what, style in styles.items():
            evs = [r["eval"] for r in runs if r["eval"]]
            if not evs:
                continue
            steps = [e["step"] for e in evs[0]]
            vals = np.nanmean([[e.get(f"eval/{probe}_{what}", math.nan) for e in ev[: len(steps)]] for ev in evs], 0)
            ax.plot(steps, vals, style, color=color, marker="o", label=f"{arm}: {what.replace('auroc_', '')}")
    ax.set_xlabel("step")
    ax.set_ylabel(f"AUROC of probe '{probe}' on the held-out labelled set")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(root: Path, exp_path: str, runs: list[tuple[str, int]], probe: str = "hack") -> Path:
    data = load_runs(root, runs)
    if not data:
        raise ValueError(f"no finished runs under {root}")
    _plot_metric(data, "rollout/hack_rate", "hack rate (ground truth)", root / "hack_rate.png")
    _plot_metric(data, "rollout/task_reward", "task reward (verifier)", root / "task_reward.png")
    _plot_metric(data, "rollout/correct_rate", "correct rate (ground truth)", root / "correct_rate.png")
    _plot_auroc(data, probe, root / "probe_auroc.png")
    table = arm_table(data, probe)
    lines = [
        "# probe-rl experiment report", "",
        f"Experiment file: `{exp_path}`; runs in `{root}`. Values are mean ± std over seeds; *start* is the mean",
        "of the first 5 steps, *end* the mean of the last 10. Rates come from the task's ground truth",
        "(correct / hack / wrong), independent of any probe.", "",
        "| arm | seeds | hack rate start → end | correct rate start → end | task reward start → end |",
        "|---|---|---|---|---|",
    ]
    for r in table:
        lines.append(f"| {r['arm']} | {r['seeds']} | {_fmt(r['hack_start'])} → {_fmt(r['hack_end'])} | "
                     f"{_fmt(r['correct_start'])} → {_fmt(r['correct_end'])} | "
                     f"{_fmt(r['task_reward_start'])} → {_fmt(r['task_reward_end'])} |")
    lines += [
        "", f"## Does the probe still work? (probe `{probe}`, held-out labelled set, last evaluation)", "",
        "*live*: the training probe on the trained policy's activations; *frozen*: on the frozen initial",
        "copy's; *retrained*: a probe fitted afresh to the trained policy. A live AUROC that collapses while",
        "the retrained one holds means the representation moved (obfuscation), not the behaviour.", "",
        "| arm | AUROC live (start → end) | AUROC frozen | AUROC retrained | live − frozen score gap on rollouts |",
        "|---|---|---|---|---|",
    ]
    for r in table:
        lines.append(f"| {r['arm']} | {_fmt(r['auroc_live_start'])} → {_fmt(r['auroc_live'])} | "
                     f"{_fmt(r['auroc_frozen'])} | {_fmt(r['auroc_retrained'])} | {_fmt(r['score_gap'])} |")
    lines += ["", "![hack rate](hack_rate.png)", "", "![task reward](task_reward.png)", "",
              "![correct rate](correct_rate.png)", "", "![probe AUROC](probe_auroc.png)", ""]
    path = root / "report.md"
    path.write_text("\n".join(lines))
    return path
