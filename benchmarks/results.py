"""What a workload reports: one row of the table (plain data, no Django)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class Result:
    """One figure set against its baseline and target."""

    workload: str
    db: str
    figure: float | None
    unit: str
    baseline: float | None = None
    baseline_label: str = ""
    ratio: float | None = None
    target: str = ""
    met: bool | None = None
    """None when the target does not apply on this database, or the run is a smoke run."""
    details: dict[str, Any] = field(default_factory=dict)
    error: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Result:
        return cls(**data)


def fmt(value: float | None, unit: str) -> str:
    """A figure with its unit, rounded for reading."""
    if value is None:
        return "-"
    if unit == "items/s":
        return f"{value:,.0f} items/s"
    if unit == "x":
        return f"{value:.2f}x"
    digits = 1 if abs(value) >= 100 else 2 if abs(value) >= 1 else 3
    return f"{value:,.{digits}f} {unit}"


def table(results: list[Result]) -> str:
    """The results as an aligned plain-text (and Markdown) table."""
    header = ["workload", "db", "figure", "baseline", "ratio", "target", "met?"]
    rows = [header]
    for r in results:
        met = {True: "yes", False: "NO", None: "-"}[r.met]
        if r.error:
            met = "ERROR"
        baseline = fmt(r.baseline, r.unit)
        if r.baseline_label:
            baseline = f"{baseline} ({r.baseline_label})" if r.baseline is not None else "-"
        rows.append(
            [
                r.workload,
                r.db,
                fmt(r.figure, r.unit),
                baseline,
                "-" if r.ratio is None else f"{r.ratio:.2f}",
                r.target,
                met,
            ]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = [
        "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |"
        for row in rows
    ]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)
