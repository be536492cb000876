"""Fine-tuned weights as versions in a per-user model folder, with an "active" pointer to roll back.

Layout (``~/.local/share/napari-medseg/models/``, or the folder named by ``NAPARI_MEDSEG_MODELS``)::

    models/
      <architecture>/
        <version id>/weights.safetensors    tensors (safetensors; never pickled)
        <version id>/weights.json           card: parent (sha256, version, path), edits used,
                                            fine-tuning settings, loss curves, time, device
        active.json                         {"active": <version id | weights path | null>,
                                             "history": [earlier actives, newest last]}

A version is written into a hidden temporary folder and renamed into place in one step, so a
cancelled or crashed fine-tune never leaves a half-written version; a parent is never modified.
Versions form a tree through their cards' ``parent.sha256``; weights outside the folder (bundled
starters, the user's own files) appear as roots. ``active.json`` is replaced atomically too.
"""
from __future__ import annotations

import datetime
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from src_models import WeightsError, read_card, save_weights
from src_models.weights_io import temporary_folder, weights_paths, write_json_atomic

ENV_VAR = "NAPARI_MEDSEG_MODELS"
WEIGHTS_STEM = "weights"
ACTIVE_FILE = "active.json"
PARTIAL_PREFIX = ".partial-"


class VersionError(ValueError):
    """A version or pointer cannot be read, found or written; the message says what to do."""


def models_dir() -> Path:
    """The per-user model folder (``NAPARI_MEDSEG_MODELS`` overrides the default)."""
    override = os.environ.get(ENV_VAR)
    if override:
        return Path(override).expanduser()
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "napari-medseg" / "models"


@dataclass
class Version:
    """One weights file known to the version tree.

    Attributes:
        id: version id (folder name), or the weights path for roots outside the folder.
        path: weights stem (``.safetensors``/``.json`` are added), None for a missing root.
        card: its card (an empty dict for a missing root).
        parent_sha: sha256 of the parent's tensors, or None.
        children: versions fine-tuned from this one.
    """

    id: str
    path: Path | None
    card: dict
    parent_sha: str | None = None
    children: list["Version"] = field(default_factory=list)

    @property
    def sha256(self) -> str | None:
        return self.card.get("sha256")

    @property
    def created(self) -> str:
        return self.card.get("created", "")

    def details(self) -> str:
        """Edits used, held-out loss and time, e.g. ``"30 edits · held-out loss 0.41→0.22 · 95 s"``."""
        info = self.card.get("finetune") or {}
        parts = []
        edits = (info.get("edits") or {}).get("counts")
        if edits:
            parts.append(f"{sum(v for k, v in edits.items() if k != 'reviewed')} edits"
                         + (f", {edits['reviewed']} reviewed" if edits.get("reviewed") else ""))
        held = info.get("heldout_loss") or {}
        if held.get("before") is not None and held.get("best") is not None:
            parts.append(f"held-out loss {held['before']:.3f}→{held['best']:.3f}")
        if info.get("time_s") is not None:
            parts.append(f"{info['time_s']:.0f} s")
        if not info and self.card.get("version"):
            parts.append(str(self.card["version"]))
        if self.path is None:
            parts.append("(missing)")
        return " · ".join(parts)

    def describe(self) -> str:
        """One line for a version list: the id (or file name) and :meth:`details`."""
        name = self.id if self.path is None or self.id != str(self.path) else Path(self.id).name
        return " · ".join(p for p in (name, self.details()) if p)


def version_id(sha256: str, when: datetime.datetime | None = None) -> str:
    """``YYYYMMDD-HHMMSS-<sha prefix>``: sortable by time and unique per tensors."""
    when = when or datetime.datetime.now(datetime.timezone.utc)
    return f"{when.strftime('%Y%m%d-%H%M%S')}-{sha256[:8]}"


def arch_dir(architecture: str, root: Path | None = None) -> Path:
    """Folder of one architecture's versions."""
    if not architecture or "/" in architecture or architecture.startswith("."):
        raise VersionError(f"bad architecture name {architecture!r}")
    return (root or models_dir()) / architecture


# ----------------------------------------------------------------------------- writing
def write_weights(model, stem: str | os.PathLike, card: dict, half: bool = False) -> dict:
    """Save weights so that both files appear together or not at all.

    Both files are written in a hidden temporary folder beside ``stem`` and then renamed into
    place (tensors first, card last); existing files are refused, never replaced.

    Returns:
        The card as written.
    """
    tensors, card_path = weights_paths(stem)
    if tensors.exists() or card_path.exists():
        raise VersionError(f"{tensors} already exists; choose another name (a fine-tune never "
                           "overwrites weights)")
    tensors.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_folder(tensors.parent, PARTIAL_PREFIX)
    try:
        written = save_weights(model, tmp / WEIGHTS_STEM, card, half=half)
        tmp_tensors, tmp_card = weights_paths(tmp / WEIGHTS_STEM)
        os.replace(tmp_tensors, tensors)
        try:
            os.replace(tmp_card, card_path)
        except BaseException:
            tensors.unlink(missing_ok=True)
            raise
        return written
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def save_version(model, card: dict, root: Path | None = None, half: bool = False) -> Version:
    """Write ``model`` as a new version of its architecture (never touching any other version).

    Args:
        model: the fine-tuned network.
        card: card fields (``parent``, ``finetune``...); ``version`` and ``created`` are set here.
        root: model folder (default :func:`models_dir`).
        half: store float16 tensors.

    Returns:
        The new :class:`Version`.
    """
    folder = arch_dir(model.name, root)
    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    tmp = temporary_folder(folder, PARTIAL_PREFIX)
    try:
        draft = save_weights(model, tmp / WEIGHTS_STEM,
                             {**card, "created": now.isoformat(timespec="microseconds")}, half=half)
        vid = version_id(draft["sha256"], now)
        for n in range(2, 100):      # the same tensors saved twice within a second
            if not (folder / vid).exists():
                break
            vid = f"{version_id(draft['sha256'], now)}-{n}"
        final_card = {**draft, "version": vid}
        # the card is rewritten with the id; the tensors (and so the sha256) stay as they are
        _, card_path = weights_paths(tmp / WEIGHTS_STEM)
        card_path.write_text(json.dumps(final_card, indent=2))
        target = folder / vid
        os.replace(tmp, target)      # atomic; fails rather than replacing a finished version
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Version(vid, target / WEIGHTS_STEM, final_card, (card.get("parent") or {}).get("sha256"))


def remove_partial(architecture: str, root: Path | None = None) -> int:
    """Delete temporary folders left by a crash (never a finished version); returns how many."""
    folder = arch_dir(architecture, root)
    removed = 0
    for path in folder.glob(PARTIAL_PREFIX + "*") if folder.is_dir() else ():
        shutil.rmtree(path, ignore_errors=True)
        removed += 1
    return removed


# ----------------------------------------------------------------------------- reading
def list_versions(architecture: str, root: Path | None = None) -> list[Version]:
    """Every finished version of an architecture, oldest first (unreadable folders skipped)."""
    folder = arch_dir(architecture, root)
    found = []
    if not folder.is_dir():
        return found
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        stem = sub / WEIGHTS_STEM
        try:
            card = read_card(stem)
        except WeightsError:
            continue
        if card.get("architecture") != architecture or not weights_paths(stem)[0].exists():
            continue
        found.append(Version(sub.name, stem, card, (card.get("parent") or {}).get("sha256")))
    return sorted(found, key=lambda v: (v.created, v.id))


def version_tree(architecture: str, root: Path | None = None, extra=()) -> list[Version]:
    """Versions as a forest: roots are parents outside the folder (or versions without parent).

    Args:
        extra: weights stems outside the folder (e.g. bundled starters) shown as roots even
            without children.

    Returns:
        Root :class:`Version` nodes; each node's ``children`` are sorted oldest first.
    """
    versions = list_versions(architecture, root)
    by_sha = {v.sha256: v for v in versions}
    roots: list[Version] = []
    outside: dict[str, Version] = {}
    for stem in extra:
        try:
            card = read_card(stem)
        except WeightsError:
            continue
        if card.get("architecture") == architecture and card["sha256"] not in by_sha:
            node = outside.setdefault(card["sha256"], Version(str(stem), Path(stem), card))
            if node not in roots:
                roots.append(node)
    for v in versions:
        parent = by_sha.get(v.parent_sha) or outside.get(v.parent_sha)
        if parent is None and v.parent_sha:
            info = v.card.get("parent") or {}
            path = info.get("path")
            exists = bool(path) and weights_paths(path)[0].exists()
            parent = Version(path or info.get("version") or v.parent_sha[:12],
                             Path(path) if exists else None,
                             {"sha256": v.parent_sha, **({} if not exists else _card_or_empty(path))})
            outside[v.parent_sha] = parent
            roots.append(parent)
        if parent is None:
            roots.append(v)
        else:
            parent.children.append(v)
    return roots


def walk(nodes: list[Version], depth: int = 0):
    """``(depth, version)`` for every node of a forest, parents before children."""
    for node in nodes:
        yield depth, node
        yield from walk(node.children, depth + 1)


def format_tree(architecture: str, root: Path | None = None, extra=()) -> str:
    """The version tree as indented text, the active version marked with ``*``."""
    active = active_path(architecture, root)
    lines = []
    for depth, node in walk(version_tree(architecture, root, extra)):
        mark = "*" if active is not None and node.path is not None and _same(node.path, active) else " "
        lines.append(f"{mark} {'  ' * depth}{node.describe()}")
    return "\n".join(lines) or f"no versions of {architecture} in {arch_dir(architecture, root)}"


def find_version(architecture: str, key: str, root: Path | None = None) -> Version:
    """A version by id, id prefix or sha256 prefix (exactly one must match)."""
    versions = list_versions(architecture, root)
    matches = [v for v in versions if v.id == key] or [
        v for v in versions if v.id.startswith(key) or (v.sha256 or "").startswith(key)]
    if len(matches) != 1:
        known = ", ".join(v.id for v in versions) or "none"
        raise VersionError(f"{'no' if not matches else 'more than one'} {architecture} version "
                           f"matches {key!r}; known versions: {known}")
    return matches[0]


def find_by_sha(sha256: str, architecture: str, root: Path | None = None, candidates=()) -> Path | None:
    """Weights stem whose tensors have ``sha256``: a version, else one of ``candidates``."""
    for v in list_versions(architecture, root):
        if v.sha256 == sha256:
            return v.path
    for stem in candidates:
        try:
            if stem and read_card(stem).get("sha256") == sha256:
                return Path(stem)
        except WeightsError:
            continue
    return None


# ----------------------------------------------------------------------------- active pointer
def _active_file(architecture: str, root: Path | None) -> Path:
    return arch_dir(architecture, root) / ACTIVE_FILE


def read_active(architecture: str, root: Path | None = None) -> dict:
    """``{"active": id | path | None, "history": [...]}`` (defaults when absent or unreadable)."""
    path = _active_file(architecture, root)
    try:
        data = json.loads(path.read_text())
        return {"active": data.get("active"), "history": list(data.get("history") or [])}
    except (OSError, json.JSONDecodeError, AttributeError):
        return {"active": None, "history": []}


def _write_active(architecture: str, data: dict, root: Path | None) -> None:
    path = _active_file(architecture, root)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, data)


def resolve(architecture: str, key: str | None, root: Path | None = None) -> Path | None:
    """Weights stem of a pointer value: a version id, or a weights path outside the folder."""
    if not key:
        return None
    folder = arch_dir(architecture, root)
    if (folder / key / (WEIGHTS_STEM + ".json")).exists():
        return folder / key / WEIGHTS_STEM
    if weights_paths(key)[0].exists():
        return Path(key)
    return None


def active_path(architecture: str, root: Path | None = None) -> Path | None:
    """Weights the user adopted for ``architecture`` (None: use the bundled starter)."""
    return resolve(architecture, read_active(architecture, root)["active"], root)


def adopt(architecture: str, key: str | os.PathLike | None, root: Path | None = None) -> Path | None:
    """Make a version (id, or a weights path) the active weights; None means the bundled starter.

    Returns:
        The weights stem now active.
    """
    value = None if key is None else str(key)
    if value is not None and resolve(architecture, value, root) is None:
        value = find_version(architecture, value, root).id
    data = read_active(architecture, root)
    if data["active"] != value:
        data["history"] = (data["history"] + [data["active"]])[-50:]
        data["active"] = value
        _write_active(architecture, data, root)
    return resolve(architecture, value, root)


def rollback(architecture: str, root: Path | None = None) -> Path | None:
    """Make the parent of the active version active (one click back up the tree).

    A version whose parent lies outside the folder rolls back to that parent's path when the file
    still exists, else to the bundled starter (None). Returns the weights stem now active.
    """
    data = read_active(architecture, root)
    current = resolve(architecture, data["active"], root)
    if current is None:
        raise VersionError(f"no fine-tuned {architecture} version is active; nothing to roll back")
    parent = (_card_or_empty(current).get("parent") or {})
    target = find_by_sha(parent.get("sha256", ""), architecture, root) if parent.get("sha256") else None
    if target is None and parent.get("path") and weights_paths(parent["path"])[0].exists():
        target = Path(parent["path"])
    folder = arch_dir(architecture, root)
    key = None
    if target is not None:
        key = target.parent.name if target.parent.parent == folder else str(target)
    return adopt(architecture, key, root)


def _card_or_empty(path) -> dict:
    try:
        return read_card(path)
    except WeightsError:
        return {}


def _same(a: Path, b: Path) -> bool:
    try:
        return Path(a).resolve() == Path(b).resolve()
    except OSError:
        return str(a) == str(b)
