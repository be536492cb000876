"""What the Segment widget remembers between napari sessions, and the weights it offers (Qt-free).

State is a small JSON file in ``~/.config/napari-medseg/segment_widget.json`` (or the folder named
by ``NAPARI_MEDSEG_CONFIG_DIR``); a missing or damaged file just means defaults.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from .core.pipeline import RANDOM_WEIGHTS
from .core.resources import bundled_weights, starter_weights

STATE_FILE = "segment_widget.json"
MAX_RECENT_WEIGHTS = 10


def config_dir() -> Path:
    """The per-user configuration folder of napari-medseg."""
    override = os.environ.get("NAPARI_MEDSEG_CONFIG_DIR")
    return Path(override).expanduser() if override else Path.home() / ".config" / "napari-medseg"


@dataclass
class SegmentState:
    """Remembered choices of the Segment widget (0 / -1 mean "auto" for tile / overlap)."""

    model: str = "vunet"
    weights: dict = field(default_factory=dict)        # model → chosen weights value
    recent_weights: list = field(default_factory=list)  # weight files the user picked before
    device: str = "auto"
    tile: int = 0
    overlap: int = -1
    mc_samples: int = 8
    tta: int = 0                  # test-time views; 0 = the weights card's choice
    scale: float = 0.0            # resampling factor; 0 = from the pixel sizes
    area: str = "whole"
    output_folder: str = ""


def load_state() -> SegmentState:
    """The remembered state, or defaults when there is none (or it cannot be read)."""
    path = config_dir() / STATE_FILE
    try:
        values = json.loads(path.read_text())
    except (OSError, ValueError):
        return SegmentState()
    known = {f.name for f in dataclasses.fields(SegmentState)}
    try:
        return SegmentState(**{k: v for k, v in values.items() if k in known})
    except TypeError:
        return SegmentState()


def save_state(state: SegmentState) -> None:
    """Write the state; failing to write (read-only home...) is not worth bothering the user."""
    folder = config_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / STATE_FILE).write_text(json.dumps(dataclasses.asdict(state), indent=1))
    except OSError:
        pass


def remember_weights(state: SegmentState, path: str) -> None:
    """Put a user-chosen weights file first in the recent list."""
    recent = [p for p in state.recent_weights if p != path]
    state.recent_weights = [path] + recent[: MAX_RECENT_WEIGHTS - 1]


@dataclass(frozen=True)
class WeightsChoice:
    """One entry of the weights picker: label shown, value passed to ``load_model``, tooltip."""

    label: str
    value: str | None
    description: str


def weights_choices(model_name: str, recent: list[str] = ()) -> list[WeightsChoice]:
    """Weights available for a model: bundled starter, user-picked files made for this model
    (fine-tuned versions included), and random weights for trying the pipeline."""
    from src_models import read_card

    from .core import versions

    choices = []
    starter = starter_weights(model_name)
    active, fine_tuned = _user_versions(versions, model_name)
    if active is not None:
        choices.append(WeightsChoice(f"active: {_version_name(active)}", str(active.path),
                                     _describe(active.card, "weights you adopted")))
    if starter is not None:
        card = _card(read_card, starter)
        choices.append(WeightsChoice(f"starter: {Path(starter).name} (bundled)", str(starter),
                                     _describe(card, "bundled starter weights")))
    for stem in bundled_weights(model_name):   # weights for a narrower domain, e.g. H&E tissue
        if stem != starter:
            card = _card(read_card, stem)
            use = (card or {}).get("use") or {}
            licence = f", {use['licence_short']}" if use.get("licence_short") else ""
            choices.append(WeightsChoice(f"bundled: {stem.name}{licence}", str(stem),
                                         _describe(card, "bundled weights")))
    for version in reversed(fine_tuned):       # newest first
        if active is not None and version.path == active.path:
            continue
        choices.append(WeightsChoice(f"fine-tuned: {version.id}", str(version.path),
                                     _describe(version.card, "fine-tuned version")))
    shown = {c.value for c in choices}
    for path in recent:
        card = _card(read_card, path)
        if card is None or card.get("architecture") != model_name or path in shown:
            continue
        choices.append(WeightsChoice(f"file: {Path(path).name}", path,
                                     _describe(card, f"weights file {path}")))
    choices.append(WeightsChoice(
        "random weights (untrained)", RANDOM_WEIGHTS,
        "untrained network: for trying the pipeline only, its labels are meaningless"))
    return choices


def _user_versions(versions, model_name: str):
    """(active version or None, fine-tuned versions oldest first) from the per-user model folder;
    an unreadable folder hides them rather than breaking the widget."""
    try:
        fine_tuned = versions.list_versions(model_name)
        active_stem = versions.active_path(model_name)
    except (versions.VersionError, OSError, ValueError):
        return None, []
    if active_stem is None:
        return None, fine_tuned
    match = [v for v in fine_tuned if v.path == active_stem]
    if match:
        return match[0], fine_tuned
    from src_models import read_card

    card = _card(read_card, active_stem)
    if card is None or card.get("architecture") != model_name:
        return None, fine_tuned
    return versions.Version(str(active_stem), active_stem, card), fine_tuned


def _version_name(version) -> str:
    return version.id if version.id != str(version.path) else Path(version.id).name


def default_tta(weights: str | None) -> int:
    """Test-time views the weights' card recommends (1 for random weights or an unreadable card)."""
    from src_models import read_card

    from .core.inference_plan import resolve_tta

    card = _card(read_card, weights) if weights else None
    try:
        return resolve_tta(card, None)
    except ValueError:
        return 1


def _card(read_card, path) -> dict | None:
    try:
        return read_card(path)
    except Exception:  # a missing or damaged card only hides that entry
        return None


def _describe(card: dict | None, fallback: str) -> str:
    """One line from a weights card: version, training data and licence, validation scores."""
    if not card:
        return fallback
    parts = [card.get("version") or fallback]
    use = card.get("use") or {}
    if use.get("for"):
        parts.append(f"for {use['for']}")
    training = card.get("training") or {}
    if training.get("data"):
        parts.append(f"trained on {training['data']} ({training.get('licence', 'licence unknown')})")
    parent = card.get("parent")
    if parent:
        name = parent.get("version") or (parent.get("sha256") or "?")[:8] if isinstance(parent, dict) else parent
        parts.append(f"fine-tuned from {name}")
    scores = ((card.get("metrics") or {}).get("validation") or {}).get("mean") or {}
    shown = ", ".join(f"{k} {scores[k]:.2f}" for k in ("f1", "aji", "dice") if k in scores)
    if shown:
        parts.append(f"validation {shown}")
    return "; ".join(parts)
