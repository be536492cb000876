"""Fine-tune on edits: adapt a model to a user's corrections in minutes, as a new weights version.

:func:`finetune_job` is the whole job the widget and the CLI run (a generator: one
:class:`~.progress.Progress` per optimiser step with the live loss; closing it at any yield
cancels, and nothing is written before the last step); :func:`finetune` is its training half for
callers that build :class:`~.finetune_data.EditData` themselves (a benchmark, scripts).

Schedule for few examples (:class:`FinetuneSettings`): the model's own paper loss
(``model.make_loss()``; ReSeg-UNet's weights carry no reconstruction net, so its loss is L_seg
only), AdamW at lr 3e-4 with a short warm-up and cosine decay, every batch 3 edit crops + 5 replay
crops of the starters' domain (:mod:`.replay`; without replay a few H&E corrections wipe out
fluorescence, DESIGN.md §9), the edit crops' few supervised pixels weighted to carry a quarter of the
loss (``edit_share``, :func:`.finetune_data.weight_edits`), weights pulled back towards the parent's
after every step (``anchor``, L2-SP), BatchNorm statistics kept at the parent's (``freeze_bn``: left
to follow the edit + replay mixture they cost the original domain most of its accuracy drop), a fixed
step and time budget, and early stopping on held-back edits: of the weights whose loss on 8 replay
crops stays within 10 % of the parent's (no forgetting), those with the lowest held-out edit loss
are saved. Mixed precision on CUDA.

How these defaults were chosen (measured variants): README, "Fine-tuning on your corrections".
Out of memory: the batch is halved, then training moves to the CPU, each time with a message.
The parent weights are only read; GPU memory is released when the job ends, however it ends.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from src_models import load_weights, model_from_config, read_card

from .edits import EditError
from .finetune_data import EditData, build_edit_data
from .finetune_loop import FinetuneLoop
from .progress import JobGenerator, Progress
from .replay import load_replay
from .versions import Version, save_version, write_weights


@dataclass(frozen=True)
class FinetuneSettings:
    """Fine-tuning knobs; the defaults suit tens of corrected objects on a CPU (about 2–3 min)."""

    steps: int = 200                    # optimiser steps at most
    time_budget_s: float | None = 150.0  # stop after this many seconds of training (None: no limit)
    lr: float = 3e-4                    # higher rates gain more and forget more (README table)
    weight_decay: float = 1e-4
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1           # cosine floor as a share of lr
    grad_clip: float = 5.0
    edit_batch: int = 3                 # edit crops per batch
    replay_batch: int = 5               # replay crops per batch (0: no replay; forgets)
    edit_share: float = 0.35            # share of each batch's loss carried by the edit crops
    #   (an edit crop supervises ~1 % of its pixels, a replay crop all of them: unweighted, the
    #   edits are ~1 % of the loss); 0: plain pixel mean. Scored with 8 test-time views, 0.5 cost
    #   the original domain 0.03 AJI at K = 30 and 0.35 under 0.02 (3 seeds), gaining +0.15-0.18 (README)
    anchor: float = 100.0               # after each step, weights move back towards the parent's by
    #   lr × anchor × (w − w_parent) (L2-SP, decoupled like AdamW's decay); 0: no pull
    forgetting_tolerance: float | None = 0.1   # weights whose loss on replay crops (the starters'
    #   domain) exceeds the parent's by more than this share are never kept (None: no check)
    probe_crops: int = 8                # replay crops that measure forgetting at each evaluation
    crop: int | None = None             # crop edge; default the weights' training tile (or 256)
    context: int = 32                   # image context around each edit (pixels)
    ring: int = 4                       # agreed background around edited objects counted as truth
    boundary_width: int = 1
    freeze_bn: bool = True              # keep the parent's BatchNorm statistics (False: they follow
    #   the edit + replay batches, which cost the original domain 0.03-0.05 more AJI; README)
    freeze_encoder: bool = False        # also fix the encoder's weights
    holdout_fraction: float = 0.2       # share of edit windows held back for early stopping
    eval_every: int = 5                 # steps between held-out evaluations (each costs ~1 step;
    #   every 20 left so few candidates that the forgetting guard could refuse them all)
    patience: int = 12                  # evaluations without improvement before stopping
    replay: str | None = "bundled"      # "bundled", a replay folder, or None
    device: str = "auto"
    mixed_precision: bool = True        # float16 autocast on CUDA (ignored elsewhere)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 1 or self.edit_batch < 1 or self.replay_batch < 0:
            raise ValueError("steps and edit_batch must be at least 1, replay_batch at least 0")
        if not 0 < self.lr < 1:
            raise ValueError(f"lr must be in (0, 1), got {self.lr}")
        if self.anchor < 0:
            raise ValueError(f"anchor must be at least 0, got {self.anchor}")
        if not 0 <= self.edit_share < 1:
            raise ValueError(f"edit_share must be in [0, 1), got {self.edit_share}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class FinetuneResult:
    """What a fine-tune produced.

    Attributes:
        path: weights stem written. card: its card. version: the version, when saved as one.
        stopped: ``"steps"``, ``"time budget"`` or ``"early stop"``.
        steps: optimiser steps run. seconds: training time.
        losses: training loss per step.
        heldout: ``[(step, loss)]`` held-out evaluations (step 0 = parent).
        edit_loss: ``{"before", "after"}`` masked cross-entropy on the training edit windows.
        warnings: messages shown to the user (out of memory, CPU fallback...).
    """

    path: Path
    card: dict
    version: Version | None
    stopped: str
    steps: int
    seconds: float
    losses: list[float]
    heldout: list[tuple[int, float]]
    edit_loss: dict
    warnings: list[str]


def default_crop(model, card: dict) -> int:
    """The weights' training tile (models pooling over a tile need it), rounded to their size
    multiple; 256 when unknown."""
    tile = int(card.get("tile_size") or (card.get("training") or {}).get("recipe", {}).get("crop") or 256)
    m = model.size_multiple
    return max(m, tile // m * m)


def _crop(model, card: dict, settings: FinetuneSettings) -> int:
    """The crop edge: the settings' or :func:`default_crop`, a multiple of the model's size step."""
    m = model.size_multiple
    return max(m, (settings.crop or default_crop(model, card)) // m * m)


def _check_three_classes(model, parent) -> None:
    if model.config.num_classes != 3:
        raise EditError(f"fine-tuning on edits needs a three-class instance model "
                        f"(background, interior, boundary); {Path(parent).name} has "
                        f"{model.config.num_classes} classes")


# ----------------------------------------------------------------------------- the whole job
def finetune_job(parent, image, labels, model_labels=None, *, reviewed=(), support=None,
                 normalization=None, settings: FinetuneSettings = FinetuneSettings(), out=None,
                 root=None, cells=None, scale: float = 1.0) -> JobGenerator[FinetuneResult]:
    """Detect edits, build training data, fine-tune, write a new version.

    Args:
        parent: weights stem of the run's weights (only read).
        image, labels, model_labels, reviewed, support, normalization, cells, scale: see
            :func:`.finetune_data.build_edit_data` (``scale``: the run's, :func:`.finetune_data.run_scale`).
        settings: the schedule.
        out: write the weights to this stem instead of a new version in the model folder.
        root: model folder (default :func:`.versions.models_dir`).

    Yields:
        ``"edits"`` (finding edits), then ``"finetune"`` per step (metrics ``loss``, ``fraction``
        and, at evaluations, ``heldout``).
    """
    card = read_card(parent)
    probe = model_from_config(card["architecture"], card["config"])
    _check_three_classes(probe, parent)
    crop = _crop(probe, card, settings)
    yield Progress("edits", 0, 1, "finding edits")
    data = build_edit_data(image, labels, model_labels, in_channels=probe.config.in_channels,
                           crop=crop, reviewed=reviewed, support=support, normalization=normalization,
                           card=card, context=settings.context, ring=settings.ring,
                           boundary_width=settings.boundary_width,
                           holdout_fraction=settings.holdout_fraction, seed=settings.seed, cells=cells,
                           scale=scale)
    del probe
    yield Progress("edits", 1, 1, f"found {data.edits.describe()}: {len(data.items)} training and "
                   f"{len(data.holdout)} held-out windows")
    return (yield from finetune(parent, data, dataclasses.replace(settings, crop=crop), out=out, root=root))


def finetune(parent, data: EditData, settings: FinetuneSettings = FinetuneSettings(), out=None,
             root=None) -> JobGenerator[FinetuneResult]:
    """Fine-tune the weights at ``parent`` on ``data`` and write the child (see module docstring).

    Nothing is written until the last step is done: closing the generator earlier (Cancel) leaves
    no file behind. Raises :class:`~.edits.EditError` for weights that cannot learn from edits.
    """
    parent = Path(parent)
    model, card = load_weights(parent, "cpu")
    _check_three_classes(model, parent)
    settings = dataclasses.replace(settings, crop=_crop(model, card, settings))
    replay = []
    if settings.replay and settings.replay_batch:
        folder = None if settings.replay == "bundled" else settings.replay
        replay = load_replay(model.config.in_channels, folder, settings.boundary_width)
    torch.manual_seed(settings.seed)
    loop = None
    try:
        loop = FinetuneLoop(model, data, replay, settings)
        yield from loop.run()
        model = loop.best_model()
        child_card = _child_card(card, parent, data, settings, loop, len(replay))
        version = None
        if out is not None:
            written = write_weights(model, out, child_card)
            path = Path(out)
        else:
            version = save_version(model, child_card, root)
            written, path = version.card, version.path
    finally:
        if loop is not None:
            loop.release()
    return FinetuneResult(path, written, version, loop.stopped, loop.step, loop.seconds,
                          loop.losses, loop.heldout, loop.edit_loss, loop.warnings)


def _child_card(card, parent, data, settings, loop, replay_crops) -> dict:
    kept = {k: card[k] for k in ("classes", "task", "normalization", "tile_size", "decode", "inference")
            if k in card}
    best_step = loop.best_step if loop.best_state is not None else loop.step
    best = next((v for s, v in loop.heldout if s == best_step), None)
    return {
        **kept,
        "parent": {"sha256": card["sha256"], "version": card.get("version"), "path": str(parent)},
        "training": card.get("training"),
        "finetune": {
            **data.summary(),
            "settings": settings.to_dict(),
            "loss": "the model's paper loss (make_loss()); ReSeg-UNet: L_seg only",
            "replay_crops": replay_crops,
            "steps_done": loop.step, "stopped": loop.stopped, "time_s": round(loop.seconds, 1),
            "device": str(loop.device),
            "loss_curve": [round(v, 5) for v in loop.losses],
            "heldout_curve": [[s, round(v, 5)] for s, v in loop.heldout],
            "heldout_loss": {"before": loop.heldout[0][1] if loop.heldout else None,
                             "best": best, "best_step": best_step},
            "replay_curve": [[s, round(v, 5)] for s, v in loop.replay_curve],
            "edit_loss": loop.edit_loss,
            "warnings": loop.warnings,
        },
        "metrics": {},
    }
