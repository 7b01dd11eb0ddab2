"""Log-log plots of a sweep: recovery vs N and storage vs N, one line per system.

A failed point is drawn as a red ✕ at the N where the system failed; a system that
is not installed or not run gets no line (the table and JSON say why).  matplotlib
is in the ``bench`` extra and imported here only.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any


def _series(points: list[dict[str, Any]], metric: str) -> dict[str, list[tuple[int, float]]]:
    out: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for p in points:
        agg = p.get("agg") or {}
        v = agg.get(metric)
        if v:
            out[series_label(p)].append((p["turns"], v["p50"]))
    return out


def series_label(p: dict[str, Any]) -> str:
    label = p["system"]
    if (
        p.get("style") == "full"
        and p["system"] not in ("torpor", "plain")
        and not p["system"].startswith("langgraph")
    ):
        label += " (full)"
    if p.get("every"):
        label += f" K={p['every']}"
    return label


def _failures(points: list[dict[str, Any]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for p in points:
        if p.get("failure") and series_label(p) not in out:
            out[series_label(p)] = p["turns"]
    return out


def plot(result: dict[str, Any], out_dir: Path, sizes: tuple[int, int] | None = None) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = result["points"]
    if sizes is None and points:
        sizes = (points[0]["model_bytes"], points[0]["tool_bytes"])
    points = [p for p in points if (p["model_bytes"], p["tool_bytes"]) == sizes]
    files = []
    markers = "osD^vP*X<>hp"
    colors = plt.get_cmap("tab20").colors
    for metric, ylabel, fname in (
        ("recovery_ms", "recovery after kill -9 (ms, p50)", "recovery-vs-n.png"),
        ("recovery_replay_ms", "replay phase of recovery (ms, p50)", "replay-vs-n.png"),
        ("storage_bytes", "stored bytes per session", "storage-vs-n.png"),
    ):
        fig, ax = plt.subplots(figsize=(10, 5.5))
        series = _series(points, metric)
        fails = _failures(points)
        for k, label in enumerate(sorted(series)):
            xs, ys = zip(*sorted(series[label]), strict=True)
            style = (
                {"color": "black", "linewidth": 3, "marker": "s"}
                if label == "torpor"
                else {"color": colors[k % len(colors)], "marker": markers[k % len(markers)]}
            )
            (line,) = ax.plot(xs, ys, label=label, **style)
            if label in fails:
                ax.plot([fails[label]], [ys[-1]], marker="x", color="red", markersize=12, mew=3)
                ax.annotate(
                    f"fails at N={fails[label]}",
                    (fails[label], ys[-1]),
                    textcoords="offset points",
                    xytext=(4, 6),
                    fontsize=7,
                    color=line.get_color(),
                )
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("session length N (turns)")
        ax.set_ylabel(ylabel)
        m, t = sizes or (0, 0)
        ax.set_title(f"{ylabel.split(' (')[0]} vs N — M={m} B, T={t} B, k=2")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        fig.tight_layout()
        path = out_dir / fname
        fig.savefig(path, dpi=110)
        plt.close(fig)
        files.append(path)
    return files
