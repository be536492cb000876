"""Training from scratch on a labelled folder: ``train(recipe, data_dir, out)`` is a job generator.

The same data pipeline (normalisation, targets, augmentation) and each model's own paper loss are
used by fine-tuning. Runs are reproducible from the recipe (fixed seed), resumable from the
checkpoint written next to the output every ``checkpoint_every`` steps, and end by writing
half-precision safetensors weights plus a card with the recipe, data licence, time, hardware and
validation metrics.
"""
from __future__ import annotations

import dataclasses
import math
import platform
import time
from pathlib import Path

import numpy as np
import torch

from src_models import create_model, load_weights, save_weights

from .augment import TrainItem, sample_batch
from .checkpoint import checkpoint_paths, load_checkpoint, save_checkpoint
from .datasets import Sample, load_folder, split
from .devices import pick_device
from .normalize import normalize_image
from .progress import JobGenerator, Progress
from .pseudo_labels import read_manifest
from .recipe import Recipe
from .targets import CLASS_NAMES, instances_to_classes, semantic_to_classes, separation_weights

DATA_LICENCES = {
    "dsb2018": "CC0 1.0 (Kaggle DSB2018 / BBBC038, Caicedo et al. 2019)",
    "isbi2012": "no data licence; cite Cardona 2010 and Arganda-Carreras 2015; do not redistribute",
    "monuseg2018": "CC BY-NC-SA 4.0 (Kumar et al. 2017/2019); non-commercial",
}


def data_licence(*names: str | None) -> str:
    """Licence of the first known dataset named in ``names`` (a folder name, or for a folder written
    by :mod:`.pseudo_labels` also its source folder's name), else ``"unknown"``."""
    return next((licence for name in names if name for key, licence in DATA_LICENCES.items() if key in name),
                "unknown")


def make_items(samples: list[Sample], recipe: Recipe) -> list[TrainItem]:
    """Normalised images and class targets in memory, with sampling weights (and separation pixel
    weights for instance labels when ``recipe.separation_weight`` > 0)."""
    items = []
    for s in samples:
        image = torch.from_numpy(normalize_image(s.image, recipe.in_channels)).half()
        classes = (instances_to_classes(s.labels, recipe.boundary_width) if s.kind == "instances"
                   else semantic_to_classes(s.labels))
        area_factor = min(4.0, math.sqrt(s.labels.size / 256**2))
        weight = recipe.modality_weights.get(s.modality, 1.0) * area_factor
        pixel_weight = None
        if s.kind == "instances" and recipe.separation_weight > 0:
            pixel_weight = torch.from_numpy(separation_weights(
                s.labels, recipe.separation_weight, recipe.separation_sigma)).half()
        items.append(TrainItem(image, torch.from_numpy(classes), None, weight, s.labels, pixel_weight))
    return items


def warm_start_lineage(init_card: dict) -> dict:
    """The ``training.init`` entry of a card trained from ``init_card``'s weights: that run's sha256,
    version, data, recipe, steps and seconds, nesting its own ``init`` so a starter continued several
    times names every earlier run and how to replay it (cards written before a field existed lack it)."""
    trained = init_card.get("training") or {}
    lineage = {"sha256": init_card["sha256"], "version": init_card.get("version"),
               "steps_done": trained.get("steps_done"), "time_s": trained.get("time_s")}
    if "recipe" in trained:
        lineage |= {"data": trained.get("data"), "recipe": trained["recipe"],
                    "pretrain_steps_done": trained.get("pretrain_steps_done")}
    return lineage | {"init": trained.get("init")}


def lr_factor(progress: float, step: int, recipe: Recipe) -> float:
    """Linear warm-up then cosine decay to ``min_lr_ratio``; ``progress`` in [0, 1]."""
    if step < recipe.warmup_steps:
        return (step + 1) / recipe.warmup_steps
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return recipe.min_lr_ratio + (1 - recipe.min_lr_ratio) * cosine


def param_groups(model: torch.nn.Module, recipe: Recipe) -> list[dict]:
    """One group per learning-rate scale (modules may set ``offset_lr_scale`` / ``lr_scale``)."""
    scaled: dict[float, list] = {}
    seen = set()
    for module in model.modules():
        scale = getattr(module, "offset_lr_scale", getattr(module, "lr_scale", None))
        target = getattr(module, "offset_conv", None) if hasattr(module, "offset_lr_scale") else module
        if scale is None or target is None:
            continue
        for p in target.parameters():
            if id(p) not in seen:
                scaled.setdefault(float(scale), []).append(p)
                seen.add(id(p))
    rest = [p for p in model.parameters() if id(p) not in seen and p.requires_grad]
    groups = [{"params": rest, "lr": recipe.lr, "lr_scale": 1.0}]
    groups += [{"params": ps, "lr": recipe.lr * s, "lr_scale": s} for s, ps in scaled.items()]
    return groups


def train_step(network, loss_fn, optimizer, batch: dict, grad_clip: float, make_input=None,
               scaler: "torch.amp.GradScaler | None" = None) -> dict[str, float]:
    """One optimiser step on one batch (shared by training and fine-tuning).

    Args:
        network: the model, in training mode, on the batch's device.
        loss_fn: ``loss(outputs, batch) -> {"loss": scalar, ...terms}``.
        optimizer: its optimiser.
        batch: ``{"image", "labels", "valid"}`` tensors (see :func:`.augment.sample_batch`).
        grad_clip: maximum gradient norm.
        make_input: optional ``batch -> network input`` (e.g. ReSeg-UNet's reconstruction stage).
        scaler: a CUDA ``GradScaler``: run the forward pass under float16 autocast (mixed precision).

    Returns:
        Every loss term as a float.
    """
    inputs = make_input(batch) if make_input else batch["image"]
    inputs = inputs.contiguous(memory_format=torch.channels_last)
    if scaler is None:
        terms = loss_fn(network(inputs), batch)
        optimizer.zero_grad(set_to_none=True)
        terms["loss"].backward()
        torch.nn.utils.clip_grad_norm_(network.parameters(), grad_clip)
        optimizer.step()
    else:
        with torch.autocast(device_type=inputs.device.type, dtype=torch.float16):
            terms = loss_fn(network(inputs), batch)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(terms["loss"]).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(network.parameters(), grad_clip)
        scaler.step(optimizer)
        scaler.update()
    return {k: float(v.detach()) for k, v in terms.items()}


def _run_steps(name, network, loss_fn, optimizer, items, recipe, rng, start_step, total_steps,
               started, elapsed_before, make_input=None, checkpoint=None) -> JobGenerator[int]:
    """Optimise ``network`` for ``total_steps``; yields one Progress per step; returns steps done."""
    network.train()
    step = start_step
    budget = recipe.time_budget_s
    while step < total_steps:
        elapsed = elapsed_before + time.perf_counter() - started
        progress = max(step / total_steps, elapsed / budget if budget else 0.0)
        if budget and elapsed >= budget:
            break
        for group in optimizer.param_groups:
            group["lr"] = recipe.lr * group.get("lr_scale", 1.0) * lr_factor(progress, step, recipe)
        if hasattr(loss_fn, "kl_weight_scale"):
            loss_fn.kl_weight_scale = min(1.0, progress / max(recipe.kl_warmup_fraction, 1e-6))
        batch = sample_batch(items, recipe.batch, recipe.crop, rng)
        metrics = train_step(network, loss_fn, optimizer, batch, recipe.grad_clip, make_input)
        step += 1
        yield Progress(name, step, total_steps, f"{name} step {step}/{total_steps} loss {metrics['loss']:.4f}",
                       metrics)
        if checkpoint and step % recipe.checkpoint_every == 0:
            checkpoint(step, elapsed_before + time.perf_counter() - started)
    return step


def _hardware(dev: torch.device) -> str:
    """Where a run trained, for its card: processor, torch threads, device (and the GPU's name)."""
    where = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, {dev}"
    return f"{where} ({torch.cuda.get_device_name(dev)})" if dev.type == "cuda" else where


def _random_state(rng: np.random.Generator, dev: torch.device) -> dict:
    """The batch sampler's and torch's random states, as JSON, so a resumed run draws what the
    uninterrupted one would have."""
    state = {"numpy": rng.bit_generator.state, "torch": torch.get_rng_state().tolist()}
    if dev.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(dev).tolist()
    return state


def _restore_random_state(state: dict, recipe: Recipe, dev: torch.device) -> np.random.Generator:
    """Restore :func:`_random_state` from a checkpoint (older checkpoints: re-seed from the step)."""
    saved = state.get("random")
    if saved is None:
        torch.manual_seed(recipe.seed + state["step"] + state["pretrain_step"])
        return np.random.default_rng([recipe.seed, state["step"], state["pretrain_step"]])
    rng = np.random.default_rng()
    rng.bit_generator.state = saved["numpy"]
    torch.set_rng_state(torch.tensor(saved["torch"], dtype=torch.uint8))
    if "cuda" in saved and dev.type == "cuda":
        torch.cuda.set_rng_state(torch.tensor(saved["cuda"], dtype=torch.uint8), dev)
    return rng


def train(recipe: Recipe, data_dir: str | Path, out: str | Path, device: str = "auto",
          resume: bool = False, data_name: str | None = None,
          init: str | Path | None = None) -> JobGenerator[dict]:
    """Train ``recipe.model`` on ``data_dir`` and write weights to ``out``.

    Args:
        init: weights to start from (same architecture and config) instead of random
            initialisation, e.g. to continue training starter weights; recorded in the card.

    Yields:
        Progress per optimiser step (stage ``"pretrain"`` then ``"train"``), then ``"validate"``.
    Returns:
        The weights card that was written.
    """
    out = Path(out)
    torch.manual_seed(recipe.seed)
    rng = np.random.default_rng(recipe.seed)
    dev = pick_device(device)
    samples = load_folder(data_dir)
    if recipe.num_classes is None:
        recipe = dataclasses.replace(recipe, num_classes=3 if samples[0].kind == "instances" else 2)
    train_samples, val_samples = split(samples, recipe.val_split)
    items = make_items(train_samples, recipe)
    model = create_model(recipe.model, recipe.preset, in_channels=recipe.in_channels,
                         num_classes=recipe.num_classes,
                         **recipe.model_overrides).to(dev).to(memory_format=torch.channels_last)
    init_card = None
    if init is not None:
        start, init_card = load_weights(init, dev, expect_architecture=recipe.model)
        if start.config != model.config:
            raise ValueError(f"--init weights {init} have another config than the recipe's "
                             f"{recipe.model} {recipe.preset}; start from matching weights")
        model.load_state_dict(start.state_dict())
    stage = model.pretrain_stage()
    optimizer = torch.optim.AdamW(param_groups(model, recipe), lr=recipe.lr, weight_decay=recipe.weight_decay)
    modules = {"model": model}
    optimizers = {"model": optimizer}
    stage_opt = None
    if stage is not None:
        stage.network.to(dev).to(memory_format=torch.channels_last)
        stage_opt = torch.optim.AdamW(stage.network.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
        modules[stage.name] = stage.network
        optimizers[stage.name] = stage_opt
    state = {"pretrain_step": 0, "step": 0, "elapsed": 0.0, "pretrain_elapsed": 0.0}
    if resume:
        state = load_checkpoint(out, modules, optimizers)
        rng = _restore_random_state(state, recipe, dev)
    started = time.perf_counter()

    def checkpoint(step, elapsed, key="step"):
        state[key] = step
        state["elapsed" if key == "step" else "pretrain_elapsed"] = elapsed
        state["random"] = _random_state(rng, dev)
        save_checkpoint(out, modules, optimizers, state)

    if stage is not None:
        budget = recipe.time_budget_s and recipe.time_budget_s * recipe.pretrain_time_fraction
        pretrain_before, pretrain_started = state["pretrain_elapsed"], time.perf_counter()
        done = yield from _run_steps(
            "pretrain", stage.network, stage.loss, stage_opt, items,
            dataclasses.replace(recipe, time_budget_s=budget), rng, state["pretrain_step"],
            recipe.pretrain_steps, pretrain_started, pretrain_before, stage.make_input,
            lambda s, e: checkpoint(s, e, "pretrain_step"))
        state["pretrain_step"] = done
        state["pretrain_elapsed"] = pretrain_before + time.perf_counter() - pretrain_started
        stage.network.eval()
        loss_fn = model.make_loss(**{stage.loss_kwarg: stage.network})
    else:
        loss_fn = model.make_loss()
    # state["elapsed"] moves forward at every checkpoint, so remember where this run started from
    elapsed_before, started = state["elapsed"], time.perf_counter()
    steps_done = yield from _run_steps("train", model, loss_fn, optimizer, items, recipe, rng, state["step"],
                                       recipe.steps, started, elapsed_before, None, checkpoint)
    checkpoint(steps_done, elapsed_before + time.perf_counter() - started)
    train_time = state["elapsed"] + state["pretrain_elapsed"]
    from .decode_tuning import tune_decode
    from .validation import evaluate_samples

    metrics, decode, tuning = {}, None, None
    if val_samples:
        eval_card = {"architecture": model.name, "sha256": "unsaved", "config": model.config.to_dict(),
                     "tile_size": recipe.crop}
        if recipe.num_classes == 3:
            yield Progress("tune decode", 0, 1, f"choosing decoding thresholds on {len(val_samples)} "
                           "validation images")
            tuning = tune_decode(model.eval(), eval_card, val_samples)
            decode = eval_card["decode"] = tuning["settings"]
        yield Progress("validate", 0, len(val_samples), f"validating on {len(val_samples)} images")
        metrics = evaluate_samples(model.eval(), val_samples, recipe, card=eval_card,
                                   probabilities=tuning and tuning["probabilities"])
    data_name = data_name or Path(data_dir).name
    pseudo = read_manifest(data_dir)
    card = {
        "classes": list(CLASS_NAMES[:recipe.num_classes]) if recipe.num_classes == 3
        else ["membrane", "cell"],
        "task": "instances" if recipe.num_classes == 3 else "semantic",
        "normalization": {"method": "percentile", "low_percentile": 1.0, "high_percentile": 99.8,
                          "joint_channels": True, "in_channels": recipe.in_channels},
        "tile_size": recipe.crop,
        "training": {
            "data": data_name, "data_path": str(data_dir),
            "licence": data_licence(data_name, pseudo and Path(pseudo["source"]).name),
            "train_images": len(train_samples), "val_images": len(val_samples),
            "val_ids": [s.id for s in val_samples],
            "pseudo_labels": pseudo and {"images": len(pseudo["ids"]), "source": pseudo["source"],
                                         "teacher_sha256": pseudo["teacher"]["sha256"]},
            "recipe": recipe.to_dict(), "steps_done": steps_done,
            "pretrain_steps_done": state["pretrain_step"],
            "time_s": round(train_time, 1),
            "hardware": _hardware(dev),
            "torch": torch.__version__,
            "init": init_card and warm_start_lineage(init_card),
        },
        "metrics": {"validation": metrics} | ({"decode_tuning": {
            "on": "validation split", "n_images": tuning["n_images"], "before": tuning["before"],
            "after": tuning["after"], "objective": "mean F1@0.5 + mean AJI", "grid": tuning["grid"]}}
            if tuning else {}),
        **({"decode": decode} if decode else {}),
        **({"inference": {"pixel_size_um": recipe.pixel_size_um}} if recipe.pixel_size_um else {}),
        "parent": None,     # fine-tuned lineage only (versions.py); a warm start is training.init
        "version": f"{recipe.model}-{recipe.preset}-{data_name}",
    }
    card = save_weights(model.cpu(), out, card, half=True, overwrite=True)
    for path in checkpoint_paths(out):
        path.unlink(missing_ok=True)
    return card
