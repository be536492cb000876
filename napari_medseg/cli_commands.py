"""Implementations of the ``napari-medseg`` subcommands (argument parsing lives in cli.py)."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from .cli import CLIError


class TerminalProgress:
    """A one-line progress bar on stderr, redrawn at most every ``interval`` seconds."""

    def __init__(self, interval: float = 0.5, stream=sys.stderr):
        self.interval, self.stream, self.last, self.started = interval, stream, 0.0, time.perf_counter()
        self.stage = None

    def __call__(self, record) -> None:
        now = time.perf_counter()
        if record.stage != self.stage:
            if self.stage is not None:
                self.stream.write("\n")
            self.stage, self.started = record.stage, now
        elif now - self.last < self.interval and record.done < record.total:
            return
        self.last = now
        width = 30
        filled = int(width * record.fraction)
        eta = ""
        if record.total and record.done:
            remaining = (now - self.started) / record.done * (record.total - record.done)
            eta = f" ~{remaining:.0f}s left"
        self.stream.write(f"\r{record.stage:>10} [{'#' * filled}{'.' * (width - filled)}] "
                          f"{record.done}/{record.total}{eta} {record.message[-60:]:<60}")
        self.stream.flush()

    def close(self) -> None:
        if self.stage is not None:
            self.stream.write("\n")


def _not_yet(what: str, issue: int):
    raise CLIError(f"'{what}' is not available in this version yet (issue {issue} of napari-medseg)")


def run_segment(args) -> None:
    _not_yet("segment", 4)


def run_finetune(args) -> None:
    _not_yet("finetune", 7)


def run_train(args) -> None:
    """Train a model on a data folder and write weights + card."""
    from src_models import list_models

    from .core.progress import drain
    from .core.recipe import Recipe
    from .core.training import train

    if args.model not in list_models():
        raise CLIError(f"unknown model {args.model!r}; choose one of: {', '.join(list_models())}")
    if not Path(args.data).is_dir():
        raise CLIError(f"data folder {args.data} does not exist")
    overrides = {"model": args.model, "preset": args.preset, "val_split": args.val_split,
                 "steps": args.steps, "time_budget_s": args.time_budget, "batch": args.batch,
                 "crop": args.crop, "seed": args.seed}
    recipe = (Recipe.from_file(args.recipe, **overrides) if args.recipe
              else Recipe.from_dict({k: v for k, v in overrides.items() if v is not None}))
    out = Path(args.out)
    if not args.resume and out.with_name(out.name + ".safetensors").exists():
        raise CLIError(f"{out}.safetensors already exists; choose another --out")
    bar = TerminalProgress()
    card = drain(train(recipe, args.data, out, device=args.device, resume=args.resume), bar)
    bar.close()
    print(json.dumps({"weights": str(out) + ".safetensors", "time_s": card["training"]["time_s"],
                      "validation": card["metrics"]["validation"].get("mean", {})}, indent=2))


def run_evaluate(args) -> None:
    _not_yet("evaluate", 6)


def run_export(args) -> None:
    _not_yet("export", 8)


def run_bench(args) -> None:
    _not_yet("bench", 4)


def run_demo(args) -> None:
    _not_yet("demo", 2)
