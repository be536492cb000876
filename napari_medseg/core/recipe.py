"""Training recipes: every knob of a training run in one frozen, JSON-recorded dataclass."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Recipe:
    """A training run, recorded verbatim in the weights card so it can be reproduced.

    Defaults are the "lite" CPU recipe for the three-class nuclei task.
    """

    model: str = "vunet"
    preset: str = "lite"
    num_classes: int | None = None    # None: 3 (background/interior/boundary) for instance labels,
    #                                   2 ({membrane, cell}) for semantic masks such as ISBI 2012
    in_channels: int = 3
    steps: int = 1500                 # optimiser steps (the schedule anneals over these or the time budget)
    pretrain_steps: int = 300         # auxiliary stage (ReSeg-UNet reconstruction), if the model has one
    pretrain_time_fraction: float = 0.2  # share of time_budget_s the auxiliary stage may use
    batch: int = 8
    crop: int = 256
    lr: float = 2e-3                  # higher than the papers' 1e-4: short from-scratch CPU schedules
    weight_decay: float = 1e-4
    warmup_steps: int = 50
    min_lr_ratio: float = 0.02        # cosine floor as a fraction of lr
    grad_clip: float = 5.0
    boundary_width: int = 1           # px of the boundary class inside each nucleus edge
    separation_weight: float = 0.0    # U-Net w0: extra loss weight between touching instances (0: off)
    separation_sigma: float = 5.0     # U-Net σ in px of that weight (targets.separation_weights)
    val_split: float = 0.15
    seed: int = 0
    checkpoint_every: int = 100
    time_budget_s: float | None = None
    kl_warmup_fraction: float = 0.1   # V-UNet: KL weight ramps 0 → 1 over this share of training
    model_overrides: dict = field(default_factory=dict)  # model config fields, e.g. {"ce_weight": 0.5}
    modality_weights: dict = field(default_factory=lambda: {
        "fluorescence": 1.0, "histology_color": 2.5, "brightfield_gray": 4.0})
    pixel_size_um: float | None = None  # µm per pixel of the training images, when one: the card's
    #                                     inference.pixel_size_um, to which segmentation resamples

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "Recipe":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown recipe field(s) {sorted(unknown)}; known: {sorted(known)}")
        return cls(**values)

    @classmethod
    def from_file(cls, path: str | Path, **overrides) -> "Recipe":
        """Load a JSON recipe, or the replay recipe of a weights card (:meth:`replaying`), then apply
        non-None ``overrides``."""
        values = json.loads(Path(path).read_text())
        if is_weights_card(values):
            values = cls.replaying(values).to_dict()
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls.from_dict(values)

    @classmethod
    def replaying(cls, card: dict) -> "Recipe":
        """The recipe that re-runs the training recorded in a weights card, step for step, on any machine.

        A run stopped by its time budget annealed its learning rate over the clock (progress = elapsed /
        budget), so its recipe alone replays differently on a faster or slower machine. The replay recipe
        anneals over the steps the run actually took instead (``steps`` = ``steps_done``,
        ``pretrain_steps`` = ``pretrain_steps_done``, no time budget): the same schedule at a steady speed,
        and with the fixed seed the same batches in the same order.
        """
        training = card.get("training") or {}
        if "recipe" not in training or "steps_done" not in training:
            raise ValueError("this weights card records no training recipe (not trained by napari-medseg train)")
        recipe = cls.from_dict(training["recipe"])
        return dataclasses.replace(recipe, steps=int(training["steps_done"]), time_budget_s=None,
                                   pretrain_steps=int(training.get("pretrain_steps_done") or 0))


def is_weights_card(values: dict) -> bool:
    """Whether a JSON document is a weights card (which holds its recipe) rather than a recipe."""
    return isinstance(values.get("training"), dict) and "architecture" in values
