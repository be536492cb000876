"""Fine-tune on edits: adapt a model to a user's corrections in minutes, as a new weights version.

:func:`finetune_job` is the whole job the widget and the CLI run (a generator: one
:class:`~.progress.Progress` per optimiser step with the live loss; closing it at any yield
cancels, and nothing is written before the last step); :func:`finetune` is its training half for
callers that build :class:`~.finetune_data.EditData` themselves (a benchmark, scripts).

Schedule for few examples (:class:`FinetuneSettings`): the model's own paper loss
(``model.make_loss()``; ReSeg-UNet's weights carry no reconstruction net, so its loss is L_seg
only), AdamW at lr 1e-4 with a short warm-up and cosine decay, every batch 3 edit crops + 5 replay
crops of the starters' domain (:mod:`.replay`; without replay a few H&E corrections wipe out
fluorescence, DESIGN.md §9), optionally the edit crops' few supervised pixels weighted to carry a
fixed share of the loss (``edit_share``, :func:`.finetune_data.weight_edits`), BatchNorm in training
mode (its statistics then follow the edit + replay mixture), a fixed step and time budget, and early
stopping on held-back edits: of the weights whose loss on 8 replay crops stays within 10 % of the
parent's (no forgetting), those with the lowest held-out edit loss are saved. Mixed precision on CUDA.

How these defaults were chosen (measured variants): README, "Fine-tuning on your corrections".
Out of memory: the batch is halved, then training moves to the CPU, each time with a message.
The parent weights are only read; GPU memory is released when the job ends, however it ends.
"""
from __future__ import annotations

import dataclasses
import gc
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from src_models import load_weights, model_from_config, read_card
from src_models.losses import masked_cross_entropy

from .augment import sample_batch
from .devices import pick_device
from .edits import EditError
from .finetune_data import EditData, build_edit_data, weight_edits
from .progress import JobGenerator, Progress
from .replay import load_replay
from .training import lr_factor, param_groups, train_step
from .versions import Version, save_version, write_weights

ENCODER_CHILDREN = ("encoder", "stem", "inc", "down", "down1", "down2", "down3", "down4")
OOM_ERRORS = tuple({getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError),
                    torch.cuda.OutOfMemoryError})


@dataclass(frozen=True)
class FinetuneSettings:
    """Fine-tuning knobs; the defaults suit tens of corrected objects on a CPU (about 2–3 min)."""

    steps: int = 200                    # optimiser steps at most
    time_budget_s: float | None = 150.0  # stop after this many seconds of training (None: no limit)
    lr: float = 1e-4                    # higher rates gain more and forget more (README table)
    weight_decay: float = 1e-4
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1           # cosine floor as a share of lr
    grad_clip: float = 5.0
    edit_batch: int = 3                 # edit crops per batch
    replay_batch: int = 5               # replay crops per batch (0: no replay; forgets)
    edit_share: float = 0.0             # share of each batch's loss carried by the edit crops
    #   (an edit crop supervises ~1 % of its pixels, a replay crop all of them: unweighted, the
    #   edits are ~1 % of the loss); 0 (default): plain pixel mean. 0.25-0.5 gain more on the new
    #   domain but cost the original domain more than 0.02 AJI at some K (README table)
    forgetting_tolerance: float | None = 0.1   # weights whose loss on replay crops (the starters'
    #   domain) exceeds the parent's by more than this share are never kept (None: no check)
    probe_crops: int = 8                # replay crops that measure forgetting at each evaluation
    crop: int | None = None             # crop edge; default the weights' training tile (or 256)
    context: int = 32                   # image context around each edit (pixels)
    ring: int = 4                       # agreed background around edited objects counted as truth
    boundary_width: int = 1
    freeze_bn: bool = False             # True: keep BatchNorm statistics (measured worse)
    freeze_encoder: bool = False        # also fix the encoder's weights
    holdout_fraction: float = 0.2       # share of edit windows held back for early stopping
    eval_every: int = 20                # steps between held-out evaluations
    patience: int = 3                   # evaluations without improvement before stopping
    replay: str | None = "bundled"      # "bundled", a replay folder, or None
    device: str = "auto"
    mixed_precision: bool = True        # float16 autocast on CUDA (ignored elsewhere)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 1 or self.edit_batch < 1 or self.replay_batch < 0:
            raise ValueError("steps and edit_batch must be at least 1, replay_batch at least 0")
        if not 0 < self.lr < 1:
            raise ValueError(f"lr must be in (0, 1), got {self.lr}")
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
                 root=None, cells=None) -> JobGenerator[FinetuneResult]:
    """Detect edits, build training data, fine-tune, write a new version.

    Args:
        parent: weights stem of the run's weights (only read).
        image, labels, model_labels, reviewed, support, normalization, cells: see
            :func:`.finetune_data.build_edit_data`.
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
                           holdout_fraction=settings.holdout_fraction, seed=settings.seed, cells=cells)
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
        loop = _Loop(model, data, replay, settings)
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
    kept = {k: card[k] for k in ("classes", "task", "normalization", "tile_size", "decode") if k in card}
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


# ----------------------------------------------------------------------------- the loop
class _Loop:
    """Optimisation state of one fine-tune (kept in one place so OOM fallbacks can rebuild it)."""

    def __init__(self, model, data: EditData, replay, settings: FinetuneSettings):
        self.data, self.replay, self.settings = data, replay, settings
        self.device = pick_device(settings.device)
        self.model = model
        self.edit_batch, self.replay_batch = settings.edit_batch, settings.replay_batch if replay else 0
        self.rng = np.random.default_rng(settings.seed)
        self.step, self.seconds, self.stopped = 0, 0.0, "steps"
        self.losses: list[float] = []
        self.heldout: list[tuple[int, float]] = []
        self.replay_curve: list[tuple[int, float]] = []   # loss on the probe replay crops
        self.probe = replay[::max(1, len(replay) // settings.probe_crops)][:settings.probe_crops] \
            if replay and settings.forgetting_tolerance is not None else []
        self.edit_loss: dict = {}
        self.warnings: list[str] = []
        self.best_state, self.best_step, self.best_score = None, 0, None
        self.evaluated: list[int] = []
        self._place(self.device)

    def _place(self, device) -> None:
        self.device = torch.device(device)
        self.model.to(self.device).to(memory_format=torch.channels_last)
        if self.settings.freeze_encoder:
            for name, child in self.model.named_children():
                if name in ENCODER_CHILDREN:
                    child.requires_grad_(False)
        self.optimizer = getattr(self, "optimizer", None) or torch.optim.AdamW(
            param_groups(self.model, self.settings), lr=self.settings.lr,
            weight_decay=self.settings.weight_decay)
        for state in self.optimizer.state.values():
            for key, value in state.items():
                if torch.is_tensor(value) and key != "step":
                    state[key] = value.to(self.device)
        use_amp = self.settings.mixed_precision and self.device.type == "cuda"
        self.scaler = _grad_scaler() if use_amp else None
        self.loss_fn = self.model.make_loss().to(self.device)

    def _train_mode(self) -> None:
        self.model.train()
        if self.settings.freeze_bn:
            for module in self.model.modules():
                if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                    module.eval()

    def run(self) -> JobGenerator[None]:
        s = self.settings
        self.edit_loss["before"] = self._masked_ce(self.data.items)
        evaluating = bool(self.data.holdout or self.probe)
        if evaluating:
            self._evaluate()
        started = time.perf_counter()
        self._train_mode()
        while self.step < s.steps:
            elapsed = time.perf_counter() - started
            if s.time_budget_s and elapsed >= s.time_budget_s:
                self.stopped = "time budget"
                break
            fraction = max(self.step / s.steps, elapsed / s.time_budget_s if s.time_budget_s else 0.0)
            for group in self.optimizer.param_groups:
                group["lr"] = s.lr * group.get("lr_scale", 1.0) * lr_factor(fraction, self.step, s)
            metrics = self._step_or_fallback()
            if metrics is None:
                yield Progress("finetune", self.step, s.steps, self.warnings[-1], {"fraction": fraction})
                continue
            self.step += 1
            self.losses.append(metrics["loss"])
            shown = {"loss": metrics["loss"], "fraction": max(self.step / s.steps, fraction)}
            if evaluating and self.step % s.eval_every == 0:
                shown["heldout" if self.data.holdout else "replay_loss"] = self._evaluate()
                self._train_mode()
                if self._should_stop():
                    self.stopped = "early stop"
            self.seconds = time.perf_counter() - started
            yield Progress("finetune", self.step, s.steps,
                           f"step {self.step}/{s.steps} loss {metrics['loss']:.4f}", shown)
            if self.stopped == "early stop":
                break
        self.seconds = time.perf_counter() - started
        if evaluating and self.step and self.evaluated[-1] != self.step:
            self._evaluate()     # the final weights compete too (a time budget may end before eval_every)
        if self.best_state is not None:
            self.model.load_state_dict(self.best_state)
            if self.best_step == 0:
                self.warnings.append("neither held-back edits improved without forgetting the "
                                     "starters' domain: the new version keeps the parent's weights; "
                                     "correct more objects and try again")
        self.edit_loss["after"] = self._masked_ce(self.data.items)

    def _batch(self) -> dict:
        crop = self.settings.crop
        batch = sample_batch(self.data.items, self.edit_batch, crop, self.rng)
        if self.replay_batch:
            extra = sample_batch(self.replay, self.replay_batch, crop, self.rng)
            batch["valid"] = weight_edits(batch["valid"], extra["valid"], self.settings.edit_share)
            batch = {k: torch.cat([batch[k], extra[k]]) for k in batch}
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def _step_or_fallback(self) -> dict | None:
        """One step; on out-of-memory, halve the batch, then move to the CPU (returns None)."""
        try:
            return train_step(self.model, self.loss_fn, self.optimizer, self._batch(),
                              self.settings.grad_clip, scaler=self.scaler)
        except Exception as exc:  # noqa: BLE001 (only out-of-memory errors are handled)
            if not (isinstance(exc, OOM_ERRORS) or "out of memory" in str(exc).lower()):
                raise
        self.optimizer.zero_grad(set_to_none=True)
        _release_memory()
        if self.edit_batch + self.replay_batch > 2:
            self.edit_batch = max(1, self.edit_batch // 2)
            self.replay_batch = max(1, self.replay_batch // 2) if self.replay_batch else 0
            self.warnings.append(f"out of memory on {self.device}: retrying with "
                                 f"{self.edit_batch} + {self.replay_batch} crops per batch")
        elif self.device.type != "cpu":
            self._place("cpu")
            self.warnings.append("out of memory even with the smallest batch: continuing on the CPU "
                                 "(slower)")
        else:
            raise MemoryError("out of memory on the CPU even with one crop per batch; close other "
                              "programs or choose a smaller crop (settings.crop)")
        return None

    def _evaluate(self) -> float:
        """Score the current weights; keep them when they are the best that did not forget.

        Score: the loss on held-out edit windows (lower is better), or with none held out, the
        step (the latest weights). Weights whose loss on the probe replay crops exceeds the
        parent's (step 0) by more than ``forgetting_tolerance`` are not eligible: with few edits a
        strong edit weight can win the held-out edits while wrecking the original domain.
        """
        loss = self._masked_ce(self.data.holdout) if self.data.holdout else None
        if loss is not None:
            self.heldout.append((self.step, loss))
        eligible = True
        if self.probe:
            replay = self._masked_ce(self.probe)
            self.replay_curve.append((self.step, replay))
            eligible = replay <= self.replay_curve[0][1] * (1 + self.settings.forgetting_tolerance)
        self.evaluated.append(self.step)
        score = loss if loss is not None else -float(self.step)
        if eligible and (self.best_score is None or score <= self.best_score):
            self.best_state = {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}
            self.best_step, self.best_score = self.step, score
        return loss if loss is not None else self.replay_curve[-1][1]

    def _should_stop(self) -> bool:
        """``patience`` evaluations in a row without new best (eligible) weights."""
        since_best = sum(1 for step in self.evaluated if step > self.best_step)
        return since_best >= self.settings.patience

    @torch.no_grad()
    def _masked_ce(self, items) -> float:
        """Masked cross-entropy of eval-mode logits on whole windows (deterministic)."""
        was_training = self.model.training
        self.model.eval()
        total = count = 0.0
        m = self.model.size_multiple
        for item in items:
            x = item.image.float()[None].to(self.device)
            h, w = x.shape[-2:]
            ph, pw = (-h) % m, (-w) % m
            x = F.pad(x, (0, pw, 0, ph))
            logits = self.model(x)["logits"][..., :h, :w]
            labels = item.classes.long()[None].to(self.device)
            valid = (torch.ones(labels.shape) if item.valid is None else item.valid.float()[None]
                     ).to(self.device)
            n = float(valid.sum())
            total += float(masked_cross_entropy(logits.float(), labels, valid)) * n
            count += n
        if was_training:
            self._train_mode()
        return total / max(count, 1.0)

    def best_model(self):
        return self.model.to("cpu").to(memory_format=torch.contiguous_format).eval()

    def release(self) -> None:
        """Drop optimiser state and GPU tensors (the job may end on any line)."""
        self.optimizer = self.scaler = self.best_state = None
        self.model.to("cpu")
        _release_memory()


def _grad_scaler():
    """A CUDA gradient scaler (``torch.amp`` since torch 2.3, ``torch.cuda.amp`` before)."""
    if hasattr(torch.amp, "GradScaler"):
        return torch.amp.GradScaler("cuda")
    return torch.cuda.amp.GradScaler()


def _release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()

