"""Tables and crossing points of a sweep result.

N* — where a peer's recovery curve crosses torpor's — comes from a least-squares
line ``recovery(N) = fixed + per_turn * N`` fitted to the peer's p50s at one
(M, T, style, K), and torpor's mean p50 restore time ``R`` at the same (M, T):
``N* = (R - fixed) / per_turn``.  ``N* < 0`` means torpor recovers faster at every N
(the peer's fixed cost alone exceeds R); ``None`` means the peer's recovery did not
grow with N in the measured range.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from torpor.bench.thesis.plots import series_label


def merge(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Several sweeps (e.g. one per group of systems, run one after another) as one
    result: their points in order, each system's status from the sweep that ran it,
    crossings recomputed over everything.  A point measured again (same system, N,
    M, T, style and K) in a later sweep replaces the earlier one."""
    if not results:
        raise ValueError("nothing to merge")
    out: dict[str, Any] = {
        "benchmark": "thesis",
        "mode": "merged",
        "machine": results[0].get("machine"),
        "systems": {},
        "points": [],
        "sweeps": [],
    }
    for r in results:
        for name, info in r.get("systems", {}).items():
            if out["systems"].get(name, {}).get("status") != "ok":
                out["systems"][name] = info
        out["points"] += r.get("points", [])
        out["sweeps"].append(
            {k: r.get(k) for k in ("mode", "plan", "started", "seconds", "machine")}
        )
    latest: dict[tuple, dict[str, Any]] = {}
    for p in out["points"]:
        key = tuple(p.get(k) for k in ("system", "turns", "model_bytes", "tool_bytes"))
        latest[(*key, p.get("style"), p.get("every"))] = p
    out["points"] = list(latest.values())
    out["crossings"] = crossings(out)
    out["crossings_replay"] = crossings(out, "recovery_replay_ms")
    return out


def fit(xy: list[tuple[float, float]]) -> tuple[float, float] | None:
    if len(xy) < 2:
        return None
    n = len(xy)
    mx = sum(x for x, _ in xy) / n
    my = sum(y for _, y in xy) / n
    sxx = sum((x - mx) ** 2 for x, _ in xy)
    if sxx == 0:
        return None
    b = sum((x - mx) * (y - my) for x, y in xy) / sxx
    return my - b * mx, b


def crossings(result: dict[str, Any], metric: str = "recovery_ms") -> list[dict[str, Any]]:
    """N* per peer series; ``metric`` ``recovery_ms`` (the whole recovery) or
    ``recovery_replay_ms`` (only rebuilding the state: torpor's VM restore against the
    peers' replay or checkpoint load, without process start and imports)."""
    groups: dict[tuple, list[tuple[float, float]]] = defaultdict(list)
    torpor: dict[tuple, list[float]] = defaultdict(list)
    for p in result["points"]:
        v = (p.get("agg") or {}).get(metric)
        if not v:
            continue
        size = (p["model_bytes"], p["tool_bytes"])
        if p["system"] == "torpor":
            torpor[size].append(v["p50"])
        elif not p["system"].startswith("torpor"):
            groups[(series_label(p), *size)].append((p["turns"], v["p50"]))
    out = []
    for (label, m, t), xy in sorted(groups.items()):
        f = fit(xy)
        if f is None:
            continue  # one N only (e.g. a size point): no curve to cross
        r = torpor.get((m, t))
        row: dict[str, Any] = {
            "series": label,
            "model_bytes": m,
            "tool_bytes": t,
            "points": len(xy),
        }
        if f:
            row["fixed_ms"], row["per_turn_ms"] = f
        if r:
            row["torpor_ms"] = sum(r) / len(r)
        if f and r:
            fixed, per = f
            row["n_star"] = (row["torpor_ms"] - fixed) / per if per > 0 else None
        out.append(row)
    return out


def rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """One flat row per (system, point), for tables."""
    out = []
    for name, info in result["systems"].items():
        if info["status"] != "ok":
            out.append({"system": name, "status": info["status"]})
    for p in result["points"]:
        agg = p.get("agg") or {}
        c = agg.get("checks", {})
        rec = agg.get("recovery_ms")
        out.append(
            {
                "system": series_label(p),
                "N": p["turns"],
                "M": p["model_bytes"],
                "T": p["tool_bytes"],
                "trials": agg.get("trials", 0),
                "recovery_p50": rec["p50"] if rec else None,
                "recovery_p95": rec["p95"] if rec else None,
                "replay_p50": (agg.get("recovery_replay_ms") or {}).get("p50"),
                "detect_p50": (agg.get("recovery_detect_ms") or {}).get("p50"),
                "bytes_read": (agg.get("recovery_bytes_read") or {}).get("p50"),
                "storage": (agg.get("storage_bytes") or {}).get("p50"),
                "turn_ms": (agg.get("turn_ms") or {}).get("p50"),
                "turn_wall_ms": (agg.get("turn_wall_ms") or {}).get("p50"),
                "turn_wall_last_ms": (agg.get("turn_wall_last_ms") or {}).get("p50"),
                "messages_ok": c.get("messages_ok"),
                "workspace_ok": c.get("workspace_ok"),
                "twice": c.get("side_effects_twice"),
                "process_kept": c.get("bg_kept"),
                "status": p.get("failure")
                or p.get("skipped")
                or ("ok" if agg.get("ok") else ("checks failed" if agg else "")),
            }
        )
    return out


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "—"
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def fmt_ms(v: float | None) -> str:
    return "—" if v is None else (f"{v:,.0f}" if v >= 10 else f"{v:.1f}")


def markdown(result: dict[str, Any]) -> str:
    """The sweep as Markdown tables (docs/thesis.md is written from these)."""
    lines = [
        "| system | N | M/T | trials | recovery p50 / p95 ms | detect | replay | read | "
        "stored | turn ms | turn wall (last 10 %) | msgs | files | twice | process | status |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---:|---|---|",
    ]
    yes = lambda v: "—" if v is None else ("ok" if v else "**NO**")  # noqa: E731
    for r in rows(result):
        if "N" not in r:
            lines.append(f"| {r['system']} |{' |' * 14} {r['status']} |")
            continue
        proc = "—" if r["process_kept"] is None else ("kept" if r["process_kept"] else "lost")
        lines.append(
            f"| {r['system']} | {r['N']} | {fmt_bytes(r['M'])}/{fmt_bytes(r['T'])} | "
            f"{r['trials']} | {fmt_ms(r['recovery_p50'])} / "
            f"{fmt_ms(r['recovery_p95'])} | {fmt_ms(r['detect_p50'])} | "
            f"{fmt_ms(r['replay_p50'])} | {fmt_bytes(r['bytes_read'])} | "
            f"{fmt_bytes(r['storage'])} | {fmt_ms(r['turn_ms'])} | "
            f"{fmt_ms(r['turn_wall_ms'])} ({fmt_ms(r['turn_wall_last_ms'])}) | "
            f"{yes(r['messages_ok'])} | "
            f"{yes(r['workspace_ok'])} | {'—' if r['twice'] is None else r['twice']} | "
            f"{proc} | {(r['status'] or '')[:160]} |"
        )
    for metric, what in (
        ("recovery_ms", "whole recovery"),
        ("recovery_replay_ms", "replay phase only"),
    ):
        xs = crossings(result, metric)
        if not xs:
            continue
        lines += [
            "",
            f"N* on the {what}:",
            "",
            "| series | M/T | fixed ms | per turn ms | torpor ms | N* |",
            "|---|---|---:|---:|---:|---:|",
        ]
        for x in xs:
            n = x.get("n_star")
            ns = "—" if n is None else ("< 0: torpor faster at every N" if n < 0 else f"{n:,.0f}")
            per = f"{x['per_turn_ms']:.3f}" if "per_turn_ms" in x else "—"
            size = f"{fmt_bytes(x['model_bytes'])}/{fmt_bytes(x['tool_bytes'])}"
            lines.append(
                f"| {x['series']} | {size} | {fmt_ms(x.get('fixed_ms'))} | {per} | "
                f"{fmt_ms(x.get('torpor_ms'))} | {ns} |"
            )
    return "\n".join(lines) + "\n"
