"""What a benchmark run found: the rows with their targets, printed as a table, written as JSON, drawn.

A row pairs pdp with its floor, measured in the same round; a run has several rounds, and each figure is
the median over them with the lowest and highest beside it. The ratio is taken round by round (pdp over
the floor measured just before it), so that a slower or faster moment of the machine weighs on both.
The targets are issue 9's; a row without one is there to explain the others.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

TIMES, DASH = "\u00d7", "\u2013"  # the signs of the table: 1.5x, 3.1-3.4


@dataclass(frozen=True)
class Spec:
    """What a row measures and what it must reach. ``target`` bounds the ratio (``≤`` when lower is
    better, ``≥`` when higher is), or the value itself for a ``scaling`` row; ``ceiling`` bounds the value."""

    id: str
    what: str
    floor: str
    unit: str
    better: Literal["lower", "higher"]
    target: float | None = None
    ceiling: float | None = None
    scaling: bool = False
    must_sustain: bool = False

    @property
    def target_text(self) -> str:
        parts = []
        if self.target is not None:
            sign = "≤" if self.better == "lower" else "≥"
            parts.append(f"{sign} {self.target:g}{TIMES}" + (" (w2/w1)" if self.scaling else ""))
        if self.ceiling is not None:
            parts.append(f"≤ {self.ceiling:g} {self.unit}")
        if self.must_sustain:
            parts.insert(0, "sustained")
        return ", ".join(parts)


#: What each floor is, under the table.
FLOOR_NOTES = (
    "regorus eval_rule: the shipped policy's own evaluation (regorus Engine.eval_rule) of the input pdp builds "
    "for the request, the input set once beforehand",
    "raw ES256 verify / raw chain verify: cryptography's ECDSA P-256 verification of the token's signature / "
    "x509.verification of the client certificate against its CA (2 levels)",
    "bare grpcio / bare uvicorn: grpcio's sync server answering pdp's OK CheckResponse as a constant / "
    "uvicorn + starlette answering pdp's /v1/check JSON and /ext_authz headers as constants; "
    "wN: N processes, as pdp serve --workers N",
)


def _spread(values: Sequence[float]) -> dict[str, Any]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": list(values)}


@dataclass
class Row:
    spec: Spec
    pdp: list[float] = field(default_factory=list)
    floor: list[float] = field(default_factory=list)
    #: For rows at a fixed rate: whether pdp kept up with the offered rate, round by round.
    sustained: list[bool] = field(default_factory=list)
    note: str = ""

    @property
    def ratios(self) -> list[float]:
        return [p / f for p, f in zip(self.pdp, self.floor, strict=True) if f > 0]

    @property
    def met(self) -> bool | None:
        s = self.spec
        if s.target is None and s.ceiling is None:
            return None
        value = statistics.median(self.pdp)
        ok = True
        if s.target is not None:
            judged = value if s.scaling else statistics.median(self.ratios)
            ok = judged <= s.target if s.better == "lower" else judged >= s.target
        if s.ceiling is not None:
            ok = ok and value <= s.ceiling
        if s.must_sustain:
            ok = ok and all(self.sustained)
        return ok

    def as_dict(self) -> dict[str, Any]:
        s = self.spec
        out: dict[str, Any] = {"id": s.id, "what": s.what, "floor_what": s.floor, "unit": s.unit,
                               "better": s.better, "pdp": _spread(self.pdp), "floor": _spread(self.floor),
                               "ratio": _spread(self.ratios), "target": s.target_text or None, "met": self.met}
        if self.sustained:
            out["sustained"] = self.sustained
        if self.note:
            out["note"] = self.note
        return out


def _figure(values: Sequence[float]) -> str:
    def fmt(x: float) -> str:
        return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}"

    if not values:
        return "-"
    mid, lo, hi = statistics.median(values), min(values), max(values)
    return fmt(mid) if len(values) == 1 else f"{fmt(mid)} ({fmt(lo)}{DASH}{fmt(hi)})"


def table(rows: Sequence[Row]) -> str:
    """The rows as fixed-width text: figure (lowest to highest), ratio, target and whether it is met."""
    head = ("what", "unit", "pdp", "floor", "the floor", "pdp/floor", "target", "")
    lines = [head]
    for row in rows:
        s = row.spec
        ratio = _figure(row.ratios) + (TIMES if row.ratios else "")
        verdict = {True: "met", False: "MISSED", None: ""}[row.met]
        lines.append((s.what, s.unit, _figure(row.pdp), _figure(row.floor), s.floor, ratio, s.target_text,
                      verdict))
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    out = []
    for n, line in enumerate(lines):
        out.append("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip())
        if n == 0:
            out.append("  ".join("-" * w for w in widths).rstrip())
    out += ["", *FLOOR_NOTES]
    return "\n".join(out)


def _tool_version(command: list[str]) -> str:
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=10, check=False)  # noqa: S603
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    return ((proc.stdout or proc.stderr).strip().splitlines() or ["?"])[0]


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    model = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions: dict[str, str | None] = {}
    for dist in ("grpcio", "uvicorn", "starlette", "h11", "gordon-to-regorus", "cryptography", "protobuf"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    return {"cpu": model, "cores": os.cpu_count(), "load_average": os.getloadavg(), "system": platform.platform(),
            "python": sys.version.split()[0], "packages": versions,
            "h2load": _tool_version(["h2load", "--version"]), "wrk": _tool_version(["wrk", "-v"])}


def write_json(path: Path, rows: Sequence[Row], latency: Sequence[dict[str, Any]], info: dict[str, Any]) -> None:
    doc = {**info, "rows": [r.as_dict() for r in rows], "latency": list(latency)}
    path.write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n")


_COLORS = {("pdp", 1): "#1f77b4", ("floor", 1): "#ff7f0e", ("pdp", 2): "#2ca02c", ("floor", 2): "#d62728"}


def plot(path: Path, latency: Sequence[dict[str, Any]], title: str) -> None:
    """Latency (p50 dashed, p99 solid, medians over the rounds) against the offered rate, for pdp and the
    floors, one panel per transport; the closed-loop runs (16 in flight) are drawn at their achieved rate."""
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    transports = [("grpc", "gRPC Check (h2load)"), ("http", "HTTP /v1/check (h2load --h1; wrk at 16)")]
    fig = Figure(figsize=(12, 5.6), layout="constrained")
    axes = fig.subplots(1, len(transports), sharey=True)
    for ax, (transport, label) in zip(axes, transports, strict=True):
        for (server, workers), color in _COLORS.items():
            runs = [x for x in latency if x["transport"] == transport and x["server"] == server
                    and x["workers"] == workers]
            fixed = sorted({x["offered"] for x in runs if x["offered"] is not None})
            name = f"{'pdp' if server == 'pdp' else 'bare'} --workers {workers}"
            for key, style in (("p99_ms", "-"), ("p50_ms", "--")):
                ys = [statistics.median(x[key] for x in runs if x["offered"] == rate) for rate in fixed]
                if fixed:
                    ax.plot(fixed, ys, style, color=color, marker="o", label=name if key == "p99_ms" else None)
                closed = [x for x in runs if x["offered"] is None]
                if closed:
                    ax.plot([statistics.median(x["rate"] for x in closed)],
                            [statistics.median(x[key] for x in closed)], marker="*", markersize=11,
                            color=color, linestyle="none", alpha=1.0 if key == "p99_ms" else 0.5)
        ax.set_title(label)
        ax.set_xlabel("offered load (req/s); ★ 16 in flight, at the rate reached")
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("latency (ms): p99 solid, p50 dashed")
    handles, labels = axes[0].get_legend_handles_labels()
    handles.append(Line2D([], [], marker="*", color="grey", linestyle="none", markersize=11))
    labels.append("16 in flight")
    fig.legend(handles, labels, loc="outside lower center", ncol=len(labels), fontsize="small")
    fig.suptitle(title)
    fig.savefig(path, dpi=110)
