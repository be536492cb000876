"""Rows, report and markdown table of the tiling benchmark (:mod:`.bench_tiling`)."""
from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import asdict, dataclass, field

import numpy as np
import torch


@dataclass
class Row:
    """One line of the table. ``status``: pass, fail, info (no target), skipped or error."""

    part: str
    check: str
    measured: str
    target: str
    status: str
    value: float | None = None
    details: dict = field(default_factory=dict)


@dataclass
class BenchReport:
    """The rows of one benchmark run, its command and environment."""

    command: str
    environment: dict
    rows: list[Row]
    seconds: float = 0.0

    def to_json(self) -> str:
        return json.dumps({"command": self.command, "environment": self.environment,
                           "seconds": round(self.seconds, 1), "rows": [asdict(r) for r in self.rows]},
                          indent=2, default=_jsonable)

    @property
    def failed(self) -> list[Row]:
        return [r for r in self.rows if r.status in ("fail", "error")]


def _jsonable(value):
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    return str(value)


def check(value: float, limit: float, below: bool = True) -> str:
    """``"pass"`` when ``value`` is finite and within ``limit`` (≤ by default, ≥ with below=False)."""
    ok = math.isfinite(value) and (value <= limit if below else value >= limit)
    return "pass" if ok else "fail"


def megabytes(value: float) -> str:
    """Bytes as ``"1,234 MB"`` (10⁶ bytes)."""
    return f"{value / 1e6:,.0f} MB"


def format_table(report: BenchReport) -> str:
    """The report as markdown: a title, the command, the environment and one table."""
    env = report.environment
    lines = ["## Tiling benchmark", "", f"Command: `{report.command}`", "",
             f"Machine: {env['cpus']} CPU cores, torch {env['torch']} ({env['torch_threads']} "
             f"thread(s)), device cpu; model {env['model']} lite, random weights"
             + (f", tiles {env['tiles']}" if env.get("tiles") else "") + f"; MONAI {env['monai']}; "
             f"total {report.seconds:.0f} s.", "",
             "| part | check | measured | target | result |", "|---|---|---|---|---|"]
    for row in report.rows:
        cells = [row.part, row.check, row.measured, row.target, row.status]
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return "\n".join(lines)


def environment(model: str) -> dict:
    """Machine, library versions and thread settings shown above the table."""
    try:
        import monai
        monai_version = monai.__version__
    except ImportError:
        monai_version = "not installed"
    return {"cpus": os.cpu_count(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "python": sys.version.split()[0],
            "model": model, "monai": monai_version, "platform": sys.platform}
