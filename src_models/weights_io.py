"""Weights as files a user can see: ``<stem>.safetensors`` tensors + ``<stem>.json`` card.

Nothing is ever unpickled. Both files are written to temporary names and renamed into place, so an
interrupted save never leaves a half-written file under the final name. Loading rebuilds the model
from the card, checks the tensors' sha256 and that every tensor matches, and refuses a mismatch with
one clear message.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .base import SegmentationModel
from .registry import model_from_config

CARD_FORMAT = 1


class WeightsError(ValueError):
    """A weights file or card is missing, corrupt or does not fit its model."""


def weights_paths(path: str | os.PathLike) -> tuple[Path, Path]:
    """``(tensors, card)`` paths for ``path`` given with or without a suffix."""
    p = Path(path)
    if p.suffix in (".safetensors", ".json"):
        p = p.with_suffix("")
    return p.with_name(p.name + ".safetensors"), p.with_name(p.name + ".json")


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def temporary_sibling(final: Path) -> Path:
    """A fresh hidden temporary file next to ``final`` (same filesystem, so renaming it onto
    ``final`` is atomic), with the permissions a plain ``open(final, "w")`` would give it
    (``mkstemp`` makes it owner-only, 0600, which colleagues could not read once renamed)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())
    finally:
        os.close(fd)
    return Path(tmp)


def _umask() -> int:
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def temporary_folder(parent: Path, prefix: str) -> Path:
    """``tempfile.mkdtemp`` in ``parent`` with the permissions of a plain ``mkdir`` (not 0700)."""
    folder = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    folder.chmod(0o777 & ~_umask())
    return folder


def _atomic_write(final: Path, write) -> None:
    """Call ``write(tmp_path)`` then rename onto ``final`` (same folder, so the rename is atomic)."""
    tmp = temporary_sibling(final)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~_umask())   # writers that recreate the file (safetensors) reset it
        os.replace(tmp, final)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | os.PathLike, data: dict) -> None:
    """Write ``data`` as indented JSON to ``path`` in one step (a temporary file renamed into place),
    so readers never see a half-written card or pointer file."""
    final = Path(path)
    _atomic_write(final, lambda tmp: tmp.write_text(json.dumps(data, indent=2)))


def save_weights(model: SegmentationModel, path: str | os.PathLike, card: dict | None = None,
                 half: bool = False, overwrite: bool = False) -> dict:
    """Save ``model`` as safetensors + JSON card.

    Args:
        model: any registered network.
        path: destination stem (``.safetensors`` / ``.json`` are added).
        card: extra card fields (classes, normalisation, training, metrics, parent, ...).
        half: store floating tensors as float16 (loading casts back to float32).
        overwrite: replace existing files; otherwise refuse.

    Returns:
        The card as written (with architecture, config and sha256 filled in).
    """
    tensors_path, card_path = weights_paths(path)
    if not overwrite and (tensors_path.exists() or card_path.exists()):
        raise WeightsError(f"{tensors_path} already exists; choose another name or pass overwrite=True")
    tensors_path.parent.mkdir(parents=True, exist_ok=True)
    state = {}
    for key, value in model.state_dict().items():
        value = value.detach().cpu().contiguous()
        if half and value.is_floating_point():
            value = value.half()
        state[key] = value
    full_card = {
        "format": CARD_FORMAT,
        **(card or {}),
        "architecture": model.name,
        "config": model.config.to_dict(),
        "parameters": model.num_parameters(),
        "dtype": "float16" if half else "float32",
    }
    _atomic_write(tensors_path, lambda tmp: save_file(state, str(tmp), metadata={"architecture": model.name}))
    full_card["sha256"] = file_sha256(tensors_path)
    text = json.dumps(full_card, indent=2, sort_keys=False)
    _atomic_write(card_path, lambda tmp: tmp.write_text(text))
    return full_card


def read_card(path: str | os.PathLike) -> dict:
    """The JSON card of a weights file, with a clear error when it is missing or not JSON."""
    tensors_path, card_path = weights_paths(path)
    if not card_path.exists():
        raise WeightsError(f"no model card {card_path.name} next to {tensors_path}; "
                           "weights need their JSON card to be loaded")
    try:
        card = json.loads(card_path.read_text())
    except json.JSONDecodeError as exc:
        raise WeightsError(f"model card {card_path} is not valid JSON ({exc})") from None
    for key in ("architecture", "config", "sha256"):
        if key not in card:
            raise WeightsError(f"model card {card_path} lacks the field {key!r}")
    return card


def load_weights(path: str | os.PathLike, device: str | torch.device = "cpu",
                 expect_architecture: str | None = None) -> tuple[SegmentationModel, dict]:
    """Rebuild a model from its card and load its tensors (never unpickling anything).

    Args:
        path: weights stem or either of its two files.
        device: where to put the model.
        expect_architecture: refuse weights of another architecture with a clear message.

    Returns:
        ``(model in eval mode, card)``.
    """
    tensors_path, card_path = weights_paths(path)
    if not tensors_path.exists():
        raise WeightsError(f"weights file {tensors_path} does not exist")
    card = read_card(path)
    arch = card["architecture"]
    if expect_architecture and arch != expect_architecture:
        raise WeightsError(f"{tensors_path.name} holds weights for {arch!r}, not {expect_architecture!r}; "
                           f"pick weights made for {expect_architecture} or choose model {arch!r}")
    if file_sha256(tensors_path) != card["sha256"]:
        raise WeightsError(f"{tensors_path} does not match the sha256 in its card: the file is truncated, "
                           "corrupt or was replaced; restore it or retrain")
    try:
        model = model_from_config(arch, card["config"])
    except (KeyError, ValueError, TypeError) as exc:
        raise WeightsError(f"card {card_path.name} cannot build a model: {exc}") from None
    try:
        state = load_file(str(tensors_path))
    except (SafetensorError, OSError) as exc:
        raise WeightsError(f"cannot read {tensors_path}: {exc}") from None
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if expected[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        raise WeightsError(
            f"{tensors_path.name} does not fit a {arch} built from its card: "
            f"{len(missing)} missing, {len(unexpected)} unexpected, {len(wrong)} mis-shaped tensors "
            f"(e.g. {(missing + unexpected + wrong)[:3]})")
    state = {k: v.to(expected[k].dtype) for k, v in state.items()}
    model.load_state_dict(state, strict=True)
    return model.to(device).eval(), card
