"""Resumable training checkpoints: model + optimiser tensors in safetensors, the rest in JSON.

Nothing is pickled. The optimiser's per-parameter state tensors are stored under
``opt/<param index>/<name>``; scalars (steps, RNG states, elapsed time) go to the JSON side file.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .export import temporary_sibling


def checkpoint_paths(stem: str | os.PathLike) -> tuple[Path, Path]:
    """``(tensors, state json)`` paths of the checkpoint next to a weights stem."""
    base = Path(stem)
    return base.with_name(base.name + ".ckpt.safetensors"), base.with_name(base.name + ".ckpt.json")


def save_checkpoint(stem, modules: dict[str, torch.nn.Module], optimizers: dict[str, torch.optim.Optimizer],
                    state: dict) -> None:
    """Atomically write a checkpoint.

    Args:
        stem: weights stem the checkpoint belongs to.
        modules: named modules whose state dicts are saved (e.g. ``{"model": net}``).
        optimizers: named optimisers (their param_groups go to JSON, their tensors to safetensors).
        state: JSON-serialisable training state (step, elapsed, RNG states, ...).
    """
    tensors, meta = {}, {"state": state, "param_groups": {}, "opt_scalars": {}}
    for name, module in modules.items():
        for key, value in module.state_dict().items():
            tensors[f"{name}/{key}"] = value.detach().cpu().contiguous()
    for name, opt in optimizers.items():
        sd = opt.state_dict()
        meta["param_groups"][name] = sd["param_groups"]
        for index, per_param in sd["state"].items():
            for key, value in per_param.items():
                if torch.is_tensor(value):
                    tensors[f"opt:{name}/{index}/{key}"] = value.detach().cpu().contiguous()
                else:
                    meta["opt_scalars"][f"{name}/{index}/{key}"] = value
    tensor_path, json_path = checkpoint_paths(stem)
    tensor_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(tensor_path)
    save_file(tensors, str(tmp))
    os.replace(tmp, tensor_path)
    tmp = temporary_sibling(json_path)
    tmp.write_text(json.dumps(meta))
    os.replace(tmp, json_path)


def load_checkpoint(stem, modules: dict[str, torch.nn.Module],
                    optimizers: dict[str, torch.optim.Optimizer]) -> dict:
    """Restore modules and optimisers in place; return the saved training state."""
    tensor_path, json_path = checkpoint_paths(stem)
    if not tensor_path.exists() or not json_path.exists():
        raise FileNotFoundError(f"no checkpoint to resume next to {stem} (expected {tensor_path.name})")
    tensors = load_file(str(tensor_path))
    meta = json.loads(json_path.read_text())
    for name, module in modules.items():
        prefix = f"{name}/"
        module.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
    for name, opt in optimizers.items():
        per_param: dict[int, dict] = {}
        for key, value in tensors.items():
            if key.startswith(f"opt:{name}/"):
                _, index, field = key.split("/", 2)
                per_param.setdefault(int(index), {})[field] = value
        for key, value in meta["opt_scalars"].items():
            opt_name, index, field = key.split("/", 2)
            if opt_name == name:
                per_param.setdefault(int(index), {})[field] = value
        opt.load_state_dict({"state": per_param, "param_groups": meta["param_groups"][name]})
    return meta["state"]
