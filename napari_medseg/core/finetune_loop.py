"""The optimisation loop of a fine-tune (:func:`.finetune.finetune` drives it): batches of edit and
replay crops, out-of-memory fallbacks, held-out evaluation with the forgetting guard, best weights.
"""
from __future__ import annotations

import gc
import time
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from src_models.losses import masked_cross_entropy

from .augment import sample_batch
from .devices import pick_device
from .finetune_data import EditData, weight_edits
from .progress import JobGenerator, Progress
from .training import lr_factor, param_groups, train_step

if TYPE_CHECKING:
    from .finetune import FinetuneSettings

ENCODER_CHILDREN = ("encoder", "stem", "inc", "down", "down1", "down2", "down3", "down4")
OOM_ERRORS = tuple({getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError),
                    torch.cuda.OutOfMemoryError})


class FinetuneLoop:
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
        self.parent = {name: p.detach().clone() for name, p in model.named_parameters()} \
            if settings.anchor else {}
        self._names = {id(p): name for name, p in model.named_parameters()}

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
            self._pull_towards_parent()
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

    @torch.no_grad()
    def _pull_towards_parent(self) -> None:
        """L2-SP in decoupled form: w ← w − lr · anchor · (w − w_parent) for every trained weight,
        so the edits move the model only as far as they keep pulling it."""
        if not self.parent:
            return
        for group in self.optimizer.param_groups:
            rate = min(1.0, group["lr"] * self.settings.anchor)
            for param in group["params"]:
                if param.requires_grad:
                    start = self.parent[self._names[id(param)]].to(param.device)
                    param.sub_(rate * (param - start))

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

