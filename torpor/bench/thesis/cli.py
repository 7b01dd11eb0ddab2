"""``torpor bench thesis``: parse options, run the sweep, print a table, write JSON + PNGs.

Registered under ``torpor bench`` by ``bench.add_command(thesis)`` in the CLI module.
"""

from __future__ import annotations

import json
import signal
import tempfile
import time
from pathlib import Path
from typing import Any

import click

QUICK = {"turns": [3, 8], "sizes": [(1024, 1024)], "trials": 1, "every": [0], "timeout": 180.0}
MEDIUM = {
    "turns": [10, 100, 1000],
    "sizes": [(1024, 1024)],
    "trials": 3,
    "every": [0, 50],
    "timeout": 300.0,
}
FULL = {
    "turns": [10, 100, 1000, 5000, 10000, 20000],
    "sizes": [(1024, 1024), (10240, 10240), (102400, 102400)],
    "trials": 5,
    "every": [0, 100],
    "timeout": 3600.0,
}


def print_table(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    from torpor.bench.thesis.report import crossings, fmt_bytes, fmt_ms, rows

    con = Console(width=max(Console().width, 180))
    t = Table(title="torpor bench thesis — recovery after kill -9 at turn N-1")
    for col in (
        "system",
        "N",
        "M/T",
        "recovery p50/p95 ms",
        "detect",
        "replay",
        "read",
        "stored",
        "turn ms",
        "msgs",
        "files",
        "twice",
        "process",
        "status",
    ):
        t.add_column(col, overflow="fold")
    for r in rows(result):
        if "N" not in r:
            t.add_row(r["system"], *([""] * 12), f"[yellow]{r['status']}")
            continue
        ok = lambda v: "—" if v is None else ("[green]ok" if v else "[red]NO")  # noqa: E731
        t.add_row(
            r["system"],
            str(r["N"]),
            f"{fmt_bytes(r['M'])}/{fmt_bytes(r['T'])}",
            f"{fmt_ms(r['recovery_p50'])} / {fmt_ms(r['recovery_p95'])}",
            fmt_ms(r["detect_p50"]),
            fmt_ms(r["replay_p50"]),
            fmt_bytes(r["bytes_read"]),
            fmt_bytes(r["storage"]),
            fmt_ms(r["turn_ms"]),
            ok(r["messages_ok"]),
            ok(r["workspace_ok"]),
            "—" if r["twice"] is None else str(r["twice"]),
            "—" if r["process_kept"] is None else ("kept" if r["process_kept"] else "lost"),
            r["status"] if r["status"] in ("ok", "") else f"[red]{r['status'][:120]}",
        )
    con.print(t)
    xs = crossings(result)
    if xs:
        c = Table(title="where each peer's recovery line crosses torpor's (N*)")
        for col in ("series", "M/T", "fixed ms", "per turn ms", "torpor ms", "N*"):
            c.add_column(col)
        for x in xs:
            n = x.get("n_star")
            c.add_row(
                x["series"],
                f"{fmt_bytes(x['model_bytes'])}/{fmt_bytes(x['tool_bytes'])}",
                fmt_ms(x.get("fixed_ms")),
                f"{x['per_turn_ms']:.4f}" if "per_turn_ms" in x else "—",
                fmt_ms(x.get("torpor_ms")),
                "—"
                if n is None
                else ("never (torpor faster at every N)" if n < 0 else f"{n:,.0f}"),
            )
        con.print(c)


_out_option = click.option(
    "--out",
    "out_dir",
    type=click.Path(path_type=Path),
    default=Path("bench-results/thesis"),
    show_default=True,
    help="Folder for the JSON, the plots (and the Markdown tables).",
)


@click.command(name="thesis")
@click.option("--quick", "mode", flag_value="quick", help="Tiny N, 1 trial: CI smoke.")
@click.option("--medium", "mode", flag_value="medium", help="N up to 1k, 3 trials.")
@click.option(
    "--full",
    "mode",
    flag_value="full",
    default=True,
    help="The issue's sweep (hours): N to 20k, M/T to 100 KB, 5 trials.",
)
@click.option("--systems", default="", help="Comma-separated names (default: all).")
@click.option("--turns", default="", help="Override N, e.g. 10,100,1000.")
@click.option("--sizes", default="", help="Override M:T pairs in bytes, e.g. 1024:1024.")
@click.option("--trials", type=int, default=0, help="Override trials per point.")
@click.option("--styles", default="delta,full", show_default=True)
@click.option("--every", default="", help="Override continue-as-new periods, e.g. 0,50.")
@_out_option
@click.option("--timeout", type=float, default=0, help="Override seconds per run.")
@click.option("--keep", is_flag=True, help="Keep each run's directory (debugging).")
def thesis(
    mode: str,
    systems: str,
    turns: str,
    sizes: str,
    trials: int,
    styles: str,
    every: str,
    out_dir: Path,
    timeout: float,
    keep: bool,
) -> None:
    """torpor vs replay engines vs checkpointers on one deterministic agent workload."""
    from torpor.bench.stats import machine
    from torpor.bench.thesis.harness import Plan, sweep
    from torpor.bench.thesis.peers import ALL, get

    base = {"quick": QUICK, "medium": MEDIUM, "full": FULL}[mode]
    plan = Plan(
        turns=[int(x) for x in turns.split(",")] if turns else list(base["turns"]),
        sizes=[tuple(int(v) for v in s.split(":")) for s in sizes.split(",")]  # type: ignore[misc]
        if sizes
        else list(base["sizes"]),
        trials=trials or base["trials"],
        every=[int(x) for x in every.split(",")] if every else list(base["every"]),
        styles=styles.split(","),
        timeout=timeout or base["timeout"],
        budget_s=timeout or base["timeout"],
    )
    names = [s.strip() for s in systems.split(",") if s.strip()] or list(ALL)
    try:
        chosen = [get(n) for n in names]
    except KeyError as e:
        raise click.UsageError(str(e.args[0])) from None
    out_dir.mkdir(parents=True, exist_ok=True)

    def interrupted(signo: int, frame: Any) -> None:
        # SIGTERM (or SIGINT, which a background job ignores) must still run the
        # harness's clean-up: kill the workers, stop the servers
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupted)
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="torpor-thesis-") as tmp:
        result = sweep(
            chosen,
            plan,
            Path(tmp),
            progress=lambda m: click.echo(f"[{time.time() - t0:6.0f} s] {m}", err=True),
            keep=keep,
            checkpoint=lambda r: (out_dir / "partial.json").write_text(json.dumps(r, default=str)),
        )
    result.update(
        benchmark="thesis",
        mode=mode,
        machine=machine(),
        started=t0,
        seconds=time.time() - t0,
        plan={
            "turns": plan.turns,
            "sizes": plan.sizes,
            "trials": plan.trials,
            "every": plan.every,
            "styles": plan.styles,
            "tools": plan.tools,
        },
    )
    from torpor.bench.thesis.report import crossings

    result["crossings"] = crossings(result)
    result["crossings_replay"] = crossings(result, "recovery_replay_ms")
    (out_dir / "thesis.json").write_text(json.dumps(result, indent=1, default=str))
    try:
        from torpor.bench.thesis.plots import plot

        pngs = [str(p) for p in plot(result, out_dir)]
    except ImportError:
        pngs = []
        click.echo("matplotlib is not installed (pip install 'torpor[bench]'): no plots", err=True)
    print_table(result)
    click.echo(f"wrote {out_dir / 'thesis.json'} {' '.join(pngs)}")


@click.command(name="thesis-report")
@click.argument(
    "results", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path)
)
@_out_option
def thesis_report(results: tuple[Path, ...], out_dir: Path) -> None:
    """Merge sweeps' thesis.json files into one: JSON, plots, Markdown tables.

    For a sweep run in parts (one group of systems at a time, or a long point added
    later): `torpor bench thesis-report a/thesis.json b/thesis.json --out docs/thesis`.
    """
    from torpor.bench.thesis.report import markdown, merge

    loaded = []
    for p in results:
        try:
            loaded.append(json.loads(p.read_text()))
        except ValueError as e:
            raise click.UsageError(f"{p} is not a thesis result: {e}") from None
        if not isinstance(loaded[-1], dict) or "points" not in loaded[-1]:
            raise click.UsageError(f"{p} is not a thesis result (no points)")
    result = merge(loaded)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(result, indent=1, default=str))
    (out_dir / "tables.md").write_text(markdown(result))
    pngs: list[str] = []
    try:
        from torpor.bench.thesis.plots import plot

        pngs = [str(p) for p in plot(result, out_dir)]
    except ImportError:
        click.echo("matplotlib is not installed (pip install 'torpor[bench]'): no plots", err=True)
    print_table(result)
    click.echo(f"wrote {out_dir / 'results.json'} {out_dir / 'tables.md'} {' '.join(pngs)}")
