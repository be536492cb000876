"""The Segment widget's settings form: image, model, weights, device, tiles, area, output."""
from __future__ import annotations

from pathlib import Path

from qtpy.QtCore import Signal
from qtpy.QtWidgets import (QComboBox, QFileDialog, QFormLayout, QHBoxLayout, QLabel, QLineEdit,
                            QSpinBox, QToolButton, QWidget)

from napari.utils.notifications import show_warning

from src_models import list_models, model_class, read_card

from ..core.devices import available_devices
from ..widget_state import SegmentState, default_tta, remember_weights, weights_choices
from ._combo import compact

MODEL_TITLES = {"vunet": "V-UNet", "reseg_unet": "ReSeg-UNet", "pranet_v2": "PraNet-V2",
                "iau_net": "IAU-Net", "gca_resunet": "GCA-ResUNet"}
MAP_KINDS = {"uncertainty": "uncertainty maps", "background": "DSRA background maps",
             "attention": "attention maps"}
CHOOSE_FILE = "__choose_file__"


class SegmentForm(QWidget):
    """Controls whose values make a run's request; emits ``changed`` when any of them changes."""

    changed = Signal()

    def __init__(self, state: SegmentState, parent=None):
        super().__init__(parent)
        self.state = state
        form = QFormLayout(self)
        form.setContentsMargins(0, 0, 0, 0)
        self.image = compact(QComboBox(toolTip="Image layer to segment (2D; RGB and multichannel are "
                                               "fine; for stacks, the plane shown is segmented)"))
        form.addRow("Image", self.image)
        self.model = QComboBox(toolTip="Network to run; the line below says what it offers")
        for name in list_models():
            self.model.addItem(MODEL_TITLES.get(name, name), name)
        form.addRow("Model", self.model)
        self.model_info = QLabel(wordWrap=True)
        self.model_info.setStyleSheet("color: gray")
        form.addRow("", self.model_info)
        self.weights = compact(QComboBox(toolTip="Weights for the model: bundled starter weights, "
                                                 "weights files you chose (fine-tuned versions too), "
                                                 "or random weights to try the pipeline"))
        form.addRow("Weights", self.weights)
        self.device = QComboBox()
        form.addRow("Device", self.device)
        self.tile = _spin(0, 8192, 32, "auto", "Tile edge in the model's pixels (when Resample "
                          "scales tiles by s, one covers tile / s image pixels). auto: the model's "
                          "training size (blend mode) or 1024 (crop mode)")
        self.overlap = _spin(-1, 2048, 8, "auto", "Overlap (blend) or halo (crop) in the model's "
                             "pixels. auto: a quarter tile, or the model's receptive field")
        tiles = QHBoxLayout()
        tiles.addWidget(self.tile)
        tiles.addWidget(QLabel("overlap"))
        tiles.addWidget(self.overlap)
        form.addRow("Tile", tiles)
        self.mc_samples = _spin(0, 64, 1, "none", "Monte-Carlo samples of V-UNet's latents: more give "
                                "smoother variance and mutual-information maps, each costs about "
                                "one decoder pass. none: entropy map only")
        form.addRow("MC samples", self.mc_samples)
        self.tta = QComboBox(toolTip="Test-time augmentation: average the network's maps over flipped "
                                     "and transposed views of each tile. Slightly better masks and "
                                     "splits; each view costs one more pass (8 views: about 5x time)")
        self.tta.addItem("weights' default", 0)
        for views, text in ((1, "off (1 view)"), (2, "2 views"), (4, "4 views (flips)"),
                            (8, "8 views (flips + transposes)")):
            self.tta.addItem(text, views)
        form.addRow("Test-time flips", self.tta)
        self.scale = QComboBox(toolTip="Resample tiles to the pixel size the weights were trained at "
                                       "(model pixels per image pixel; maps and labels stay on the "
                                       "image's grid). auto: from the image's pixel size and the "
                                       "weights' (H&E weights: 0.25 µm, 40x), when both are known")
        for factor, text in ((0.0, "auto (pixel sizes)"), (1.0, "off (as stored)"),
                             (2.0, "2x (e.g. 20x slide, 40x weights)"), (4.0, "4x (e.g. 10x slide)"),
                             (0.5, "0.5x (e.g. 80x scan)")):
            self.scale.addItem(text, factor)
        form.addRow("Resample", self.scale)
        self.area = QComboBox(toolTip="Segment the whole image, or only the part visible in the "
                                      "canvas (grown to whole 512-pixel chunks)")
        self.area.addItem("whole image", "whole")
        self.area.addItem("current view only", "view")
        form.addRow("Area", self.area)
        form.addRow("Output", self._output_row())
        self._fill_devices()
        self._restore()
        self.model.currentIndexChanged.connect(self._on_model)
        self.weights.activated.connect(self._on_weights)
        for widget in (self.device, self.area, self.weights, self.tta, self.scale):
            widget.currentIndexChanged.connect(self.changed)
        self.weights.currentIndexChanged.connect(self._show_default_tta)
        for spin in (self.tile, self.overlap, self.mc_samples):
            spin.valueChanged.connect(self.changed)
        self.output.textChanged.connect(self.changed)

    # ------------------------------------------------------------------ values
    def model_name(self) -> str:
        return self.model.currentData()

    def weights_value(self) -> str | None:
        value = self.weights.currentData()
        return None if value == CHOOSE_FILE else value

    def tta_views(self) -> int | None:
        """Chosen test-time views, or None for the weights card's default."""
        return self.tta.currentData() or None

    def scale_value(self) -> float | None:
        """Chosen resampling factor, or None for automatic (from pixel sizes)."""
        return self.scale.currentData() or None

    def offers_uncertainty(self) -> bool:
        return "uncertainty" in model_class(self.model_name()).aux_kinds

    def store_state(self) -> SegmentState:
        """Copy the controls into the remembered state and return it."""
        state = self.state
        state.model = self.model_name()
        if self.weights_value():
            state.weights[state.model] = self.weights_value()
        state.device = self.device.currentData()
        state.tile, state.overlap = self.tile.value(), self.overlap.value()
        state.mc_samples = self.mc_samples.value()
        state.tta = self.tta.currentData()
        state.scale = self.scale.currentData()
        state.area = self.area.currentData()
        state.output_folder = self.output.text().strip()
        return state

    def set_running(self, running: bool) -> None:
        for widget in (self.image, self.model, self.weights, self.device, self.tile, self.overlap,
                       self.tta, self.scale, self.area, self.output):
            widget.setEnabled(not running)
        self.mc_samples.setEnabled(not running and self.offers_uncertainty())

    # ------------------------------------------------------------------ filling
    def _restore(self) -> None:
        s = self.state
        _select(self.model, s.model)
        _select(self.device, s.device)
        _select(self.area, s.area)
        _select(self.tta, s.tta)
        _select(self.scale, s.scale)
        self.tile.setValue(s.tile)
        self.overlap.setValue(s.overlap)
        self.mc_samples.setValue(s.mc_samples)
        self.output.setText(s.output_folder)
        self._on_model()

    def _fill_devices(self) -> None:
        found = available_devices()
        self.device.addItem(f"auto ({found[0]})", "auto")
        for name in found:
            self.device.addItem(name, name)
        missing = [kind for kind in ("cuda", "mps") if not any(d.startswith(kind) for d in found)]
        for kind in missing:
            self.device.addItem(f"{kind} (not found)", kind)
            item = self.device.model().item(self.device.count() - 1)
            item.setEnabled(False)
        self.device.setToolTip(f"Where the network runs. Found here: {', '.join(found)}"
                               + (f"; not found: {', '.join(missing)}" if missing else "")
                               + ". auto picks CUDA, then MPS, then the CPU")

    def _on_model(self, *_) -> None:
        name = self.model_name()
        cls = model_class(name)
        offers = [MAP_KINDS[k] for k in cls.aux_kinds if k in MAP_KINDS]
        self.model_info.setText(cls.description + (f". Offers {', '.join(offers)}." if offers else "."))
        self.model.setToolTip(self.model_info.text())
        self.mc_samples.setEnabled(self.offers_uncertainty())
        self.fill_weights()
        self.changed.emit()

    def fill_weights(self, select: str | None = None) -> None:
        name = self.model_name()
        self.weights.blockSignals(True)
        self.weights.clear()
        choices = weights_choices(name, self.state.recent_weights)
        for choice in choices:
            self.weights.addItem(choice.label, choice.value)
            self.weights.setItemData(self.weights.count() - 1, choice.description, _tooltip_role())
        self.weights.addItem("choose a weights file…", CHOOSE_FILE)
        wanted = select or self.state.weights.get(name)
        if not _select(self.weights, wanted):
            self.weights.setCurrentIndex(0)
        self.weights.blockSignals(False)
        self._show_default_tta()

    def _show_default_tta(self, *_) -> None:
        views = default_tta(self.weights_value())
        self.tta.setItemText(0, f"weights' default ({'off' if views == 1 else f'{views} views'})")

    def _on_weights(self, index: int) -> None:
        if self.weights.itemData(index) != CHOOSE_FILE:
            return
        path, _ = QFileDialog.getOpenFileName(self, "Weights file", str(Path.home()),
                                              "Weights (*.safetensors *.json)")
        if not path:
            self.fill_weights()
            return
        error = self.use_weights_file(path)
        if error:
            show_warning(error)

    def use_weights_file(self, path: str) -> str | None:
        """Add a weights file to the picker (if it is made for this model); the error otherwise."""
        stem = str(Path(path).with_suffix(""))
        try:
            card = read_card(stem)
        except Exception as exc:  # the card's own message says what is wrong
            self.fill_weights()
            return str(exc)
        if card.get("architecture") != self.model_name():
            self.fill_weights()
            return (f"{Path(path).name} holds weights for {card.get('architecture')!r}; choose "
                    f"that model, or weights made for {self.model_name()!r}")
        remember_weights(self.state, stem)
        self.fill_weights(select=stem)
        self.changed.emit()
        return None

    def _output_row(self) -> QHBoxLayout:
        self.output = QLineEdit(placeholderText="next to the image file, else ~/napari-medseg",
                                toolTip="Folder for the output zarr (<image>.<model>.medseg.zarr). "
                                        "Empty: next to the image file, else ~/napari-medseg")
        browse = QToolButton(text="…", toolTip="Choose the output folder")
        browse.clicked.connect(self._choose_output)
        row = QHBoxLayout()
        row.addWidget(self.output)
        row.addWidget(browse)
        return row

    def _choose_output(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Output folder",
                                                  self.output.text() or str(Path.home()))
        if folder:
            self.output.setText(folder)
            self.changed.emit()


def _spin(low: int, high: int, step: int, special: str, tooltip: str) -> QSpinBox:
    spin = QSpinBox(minimum=low, maximum=high, singleStep=step, toolTip=tooltip)
    spin.setSpecialValueText(special)
    return spin


def _select(combo: QComboBox, value) -> bool:
    index = combo.findData(value)
    if index >= 0:
        combo.setCurrentIndex(index)
    return index >= 0


def _tooltip_role():
    from qtpy.QtCore import Qt

    return Qt.ToolTipRole
