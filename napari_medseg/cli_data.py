"""``napari-medseg pseudolabel``: turn mask-only images into training data (:mod:`.core.pseudo_labels`)."""
from __future__ import annotations

import json
from pathlib import Path

from .cli import CLIError


def run_pseudolabel(args) -> None:
    """Write ``--out`` with the real instance labels and teacher-completed ones for mask-only images."""
    from .cli_commands import TerminalProgress, model_of_weights
    from .core.pipeline import load_model
    from .core.progress import drain
    from .core.pseudo_labels import pseudolabel_job

    if not Path(args.data).is_dir():
        raise CLIError(f"data folder {args.data} does not exist")
    if Path(args.out).exists():
        raise CLIError(f"{args.out} already exists; choose a new --out folder (nothing is overwritten)")
    model, card = load_model(model_of_weights(args.weights), args.weights, args.device)
    bar = TerminalProgress()
    manifest = drain(pseudolabel_job(model, card, args.data, args.out, tta=args.tta), bar)
    bar.close()
    print(json.dumps({"out": args.out, "completed": len(manifest["ids"]),
                      "real": len(manifest["real_instance_ids"]),
                      "teacher_sha256": manifest["teacher"]["sha256"]}, indent=2))
