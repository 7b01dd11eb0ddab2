"""Human-readable text for session log entries (the CLI and the demo print these)."""

from __future__ import annotations

import json
from typing import Any


def _short(payload: dict[str, Any], limit: int = 100) -> str:
    text = json.dumps(payload, ensure_ascii=False)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def durability_text(p: dict[str, Any]) -> str:
    """``" (bucket: local 12 ms, bucket 80 ms)"``: how a checkpoint was durable, as its
    entry records it (torpor.store.home.durability_fields); "" for entries without."""
    how = p.get("durability")
    if not isinstance(how, str):
        return ""
    parts = []
    for key, label in (("commit_local_ms", "local"), ("commit_bucket_ms", "bucket")):
        ms = p.get(key)
        if isinstance(ms, int | float):
            parts.append(f"{label} {ms:.0f} ms")
    return f" ({how}{': ' + ', '.join(parts) if parts else ''})"


def describe(e: Any) -> str:
    """One human line for a log entry."""
    p = e.payload
    k = e.kind.value
    if k == "user":
        return f"user: {p['content']}"
    if k == "model_request":
        return f"model {p.get('model', '')} step {p.get('step', 0)} ({p.get('messages', 0)} msgs)"
    if k == "model_response":
        calls = ", ".join(c["name"] for c in p.get("tool_calls", []))
        usage = p.get("usage", {})
        tok = f"{usage.get('input_tokens', 0)}+{usage.get('output_tokens', 0)} tok"
        lat = f"{p.get('latency_ms', 0):.0f} ms"
        what = f"calls {calls}" if calls else f"answer: {p.get('text', '')}"
        return f"model: {what} [{tok}, {lat}]"
    if k == "tool_call":
        return f"tool {p['name']} {_short(p.get('arguments', {}), 80)}"
    if k == "tool_result":
        out = p.get("content", "").strip().replace("\n", "⏎ ")
        out = out if len(out) <= 80 else out[:79] + "…"
        flag = " [error]" if p.get("is_error") else ""
        return f"result {p['name']}{flag} ({p.get('ms', 0):.0f} ms): {out}"
    if k == "checkpoint":
        stored = f"{human_size(p.get('stored_bytes', 0))} stored"
        if p.get("journal"):  # torpor.snapshot.journal: stored behind the turn
            stored = f"{human_size(p.get('journal_bytes', 0))} journaled, stored behind"
        return (
            f"checkpoint {p['snapshot'][:12]} ({p.get('reason', '')}): "
            f"{stored}, paused {p.get('pause_ms', 0):.0f} ms, "
            f"durable {p.get('durable_ms', 0):.0f} ms{durability_text(p)}"
        )
    if k == "vm":
        how = p.get("reason", "")
        extra = f" from checkpoint {p['checkpoint']}" if "checkpoint" in p else ""
        ms = f" in {p['ms']:.0f} ms" if "ms" in p else ""
        return f"vm {p.get('name', p.get('vm', '')[:12])} ({how}{extra}{ms})"
    if k == "resume":
        return f"resumed VM in {p.get('ms', 0):.0f} ms"
    if k == "hibernate":
        return f"hibernated (snapshot {p.get('snapshot', '')[:12]})"
    if k == "supersede":
        return f"superseded {p.get('seqs')}: {p.get('reason', '')}"
    if k == "fork":
        return f"forked from {p.get('parent', '')[:12]} at entry {p.get('at')}"
    if k == "error":
        return f"error ({p.get('stage', '')}): {p.get('error', '')}"
    return f"{k} {_short(p)}"


def human_size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"
