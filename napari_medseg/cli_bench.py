"""``napari-medseg bench``: the benchmarks behind the README's tables (tiling, models, finetune)."""
from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

from .cli import CLIError


def run_bench(args) -> None:
    """Benchmarks that print a markdown table: ``tiling``, ``models``, ``finetune``."""
    if args.which == "models":
        from .core.bench_models import format_table as model_table_text
        from .core.bench_models import model_table, starter_table

        rows = model_table(speed=not args.quick)
        print(model_table_text(rows))
        print()
        print(starter_table(rows))
        return
    if args.which == "finetune":
        _run_finetune_bench(args)
        return
    from .core.bench_tiling import BenchConfig, format_table, run_tiling_bench

    def ints(text):
        try:
            return tuple(int(v) for v in text.split(",")) if text else None
        except ValueError:
            raise CLIError(f"expected comma-separated integers, got {text!r} (e.g. 4096,8192)") from None

    def names(text):
        return tuple(v.strip() for v in text.split(",") if v.strip()) if text else None

    options = {"model": args.model or "reseg_unet", "sizes": ints(args.sizes), "timing_size": args.timing_size,
               "seam_size": args.seam_size, "seam_models": names(args.seam_models),
               "stitch_size": args.stitch_size, "parts": names(args.parts), "repeats": args.repeats,
               "workers": args.workers, "workdir": args.workdir}
    if args.quick:
        config = BenchConfig.quick_preset(**options)
    else:
        config = BenchConfig(**{k: v for k, v in options.items() if v is not None})
    report = run_tiling_bench(config)
    print(format_table(report))
    if args.json_path:
        Path(args.json_path).write_text(report.to_json())
    if report.failed:
        print(f"napari-medseg: {len(report.failed)} benchmark row(s) failed or errored", file=sys.stderr)


def _run_finetune_bench(args) -> None:
    """The simulated-user fine-tune benchmark (:mod:`.core.bench_finetune`)."""
    from .core.bench_finetune import FinetuneBenchConfig, format_table, run_finetune_bench, save_plot
    from .core.finetune import FinetuneSettings

    defaults = FinetuneBenchConfig()
    try:
        ks = tuple(int(v) for v in args.ks.split(",")) if args.ks else defaults.ks
    except ValueError:
        raise CLIError(f"--ks takes comma-separated integers, got {args.ks!r} (e.g. 10,30,100)") from None
    config = FinetuneBenchConfig(
        model=args.model or defaults.model, weights=args.weights, ks=ks,
        new_domain=args.new_domain or defaults.new_domain,
        original_domain=args.original_domain or defaults.original_domain,
        correct_image=args.correct_image)
    if args.quick:   # a smoke run: few images, a few steps
        config = dataclasses.replace(config, ks=ks if args.ks else (3, 10), new_images=2, original_images=3,
                                     settings=FinetuneSettings(steps=4, time_budget_s=None, eval_every=2))
    for folder in (config.new_domain, config.original_domain):
        if not Path(folder).is_dir():
            raise CLIError(f"data folder {folder} does not exist; pass --new-domain/--original-domain")
    report = run_finetune_bench(config, workdir=args.workdir)
    print(format_table(report))
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(report, indent=2))
    if args.plot:
        saved = save_plot(report, args.plot)
        print(f"plot: {saved}" if saved else "no plot: matplotlib is not installed "
              "(pip install \"napari-medseg[bench]\")", file=sys.stderr)
