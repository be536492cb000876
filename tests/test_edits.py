"""Edit detection (added, deleted, split, merged, redrawn), support masks, re-run merge (Qt-free)."""
from __future__ import annotations

import numpy as np
import pytest
from skimage.draw import disk

from napari_medseg.core.edits import EditError, Reviewed, detect_edits, support_mask
from napari_medseg.core.rerun import label_differences, merge_labels, protected_mask


def disks(shape, centres, radius=6, first_id=1) -> np.ndarray:
    labels = np.zeros(shape, np.uint32)
    for k, (y, x) in enumerate(centres):
        labels[disk((y, x), radius, shape=shape)] = first_id + k
    return labels


@pytest.fixture
def model_labels() -> np.ndarray:
    return disks((96, 96), [(16, 16), (16, 48), (48, 16), (48, 48), (80, 80)])


def kinds(edit_set) -> dict:
    return {k: v for k, v in edit_set.counts().items() if v}


def test_no_edits(model_labels):
    found = detect_edits(model_labels.copy(), model_labels)
    assert found.edits == () and found.empty and found.describe() == "no edits"


def test_added_and_deleted(model_labels):
    current = model_labels.copy()
    current[disk((80, 20), 6)] = 77              # a nucleus the model missed
    current[current == 4] = 0                     # a false positive erased
    found = detect_edits(current, model_labels)
    assert kinds(found) == {"added": 1, "deleted": 1}
    added = next(e for e in found.edits if e.kind == "added")
    assert added.current_ids == (77,) and added.model_ids == ()
    assert added.box == (75, 86, 15, 26)
    deleted = next(e for e in found.edits if e.kind == "deleted")
    assert deleted.model_ids == (4,)


def test_split_merge_redraw_relabel(model_labels):
    current = model_labels.copy()
    half = (current == 1) & (np.arange(96)[None, :] >= 16)
    current[half] = 50                                      # split object 1 in two
    current[(current == 3) | (current == 4)] = 3            # merge 3 and 4 (they do not touch:
    current[44:53, 21:44] = 3                               # the user bridged the gap)
    current[disk((16, 50), 8)] = 2                          # object 2 redrawn larger
    current[current == 5] = 99                              # object 5 only relabelled
    found = detect_edits(current, model_labels)
    assert kinds(found) == {"split": 1, "merged": 1, "redrawn": 1, "relabelled": 1}
    split = next(e for e in found.edits if e.kind == "split")
    assert split.model_ids == (1,) and split.current_ids == (1, 50)
    merged = next(e for e in found.edits if e.kind == "merged")
    assert merged.model_ids == (3, 4) and merged.current_ids == (3,)
    assert not found.empty      # relabelling alone would be


def test_detection_is_chunked_and_joins_objects_across_chunks():
    model = disks((200, 200), [(64, 64), (150, 40)], radius=10)    # object 1 straddles 4 chunks
    current = model.copy()
    current[(current == 1) & (np.arange(200)[:, None] < 64)] = 9    # split along the chunk border
    found = detect_edits(current, model, chunk=64)
    assert found.chunks_scanned == 16
    assert kinds(found) == {"split": 1}
    assert found.edits[0].box == (55, 74, 55, 74)       # whole object, both chunk rows


def test_shape_mismatch_and_missing_model_labels(model_labels):
    with pytest.raises(EditError, match="another image"):
        detect_edits(np.zeros((50, 50), np.uint32), model_labels)
    with pytest.raises(EditError, match="no recorded model labels"):
        detect_edits(model_labels, None)
    with pytest.raises(EditError, match="integer"):
        detect_edits(model_labels.astype(np.float32), model_labels)


def test_support_masks_unreviewed_pixels_out(model_labels):
    current = model_labels.copy()
    current[disk((80, 20), 6)] = 77
    found = detect_edits(current, model_labels)
    window = (0, 96, 0, 96)
    support = support_mask(current, model_labels, found, window, ring=3)
    assert support[current == 77].all()                              # the added object
    assert support[77, 20 + 6 + 2] and not support[77, 20 + 6 + 5]  # a 3-pixel ring of background
    assert not support[model_labels == 1].any()                       # untouched objects: unknown
    assert not support[5, 90]                                          # far background: unknown


def test_reviewed_rectangle_is_complete_truth(model_labels):
    rect = np.array([[0, 0], [0, 31.5], [31.5, 31.5], [31.5, 0]])     # napari rectangle vertices
    found = detect_edits(model_labels.copy(), model_labels, reviewed=[rect])
    assert not found.empty and found.counts()["reviewed"] == 1
    support = support_mask(model_labels, model_labels, found, (0, 96, 0, 96))
    assert support[:32, :32].all() and not support[32:].any() and not support[:, 32:].any()
    polygon = Reviewed(np.array([[0, 0], [0, 40], [40, 0]], float), (0, 40, 0, 40))
    mask = polygon.mask((0, 96, 0, 96))
    assert mask[5, 5] and not mask[35, 35]
    outside = detect_edits(model_labels, model_labels, reviewed=[rect + 500])
    assert outside.reviewed == ()


def test_merge_keeps_edits_and_replaces_the_rest(model_labels):
    current = model_labels.copy()
    current[disk((80, 20), 6)] = 77                 # user added
    current[current == 4] = 0                        # user deleted
    new = disks((96, 96), [(17, 17), (16, 48), (48, 16), (48, 48), (80, 80), (80, 21), (10, 85)],
                first_id=1000)
    protect = protected_mask(current, model_labels)
    merged = merge_labels(current, new, protect)
    assert (merged[current == 77] == 77).all()                       # the added object kept
    assert (merged[model_labels == 4] == 0).all()                    # the deletion kept
    assert not np.isin(1005, merged)                                 # new guess at the edited object dropped
    assert (merged[new == 1006] == 1006).all()                       # new object elsewhere taken
    assert (merged[new == 1000] == 1000).all()                       # unedited objects replaced
    assert not np.isin(1, merged)


def test_merge_replaces_colliding_ids():
    old = np.zeros((40, 40), np.uint32)
    old[5:10, 5:10] = 7
    new = np.zeros_like(old)
    new[25:35, 25:35] = 7            # another object that happens to have the same ID
    merged = merge_labels(old, new, old > 0)
    assert (merged[5:10, 5:10] == 7).all()
    assert len(np.unique(merged[25:35, 25:35])) == 1 and merged[30, 30] not in (0, 7)


def test_label_differences():
    a = disks((64, 64), [(16, 16), (48, 48)])
    b = disks((64, 64), [(16, 17), (40, 10)])
    diff = label_differences(a, b)
    assert diff["only_a"] == 1 and diff["only_b"] == 1 and diff["different_objects"] == 2


def test_snapshot_and_block_wise_rerun_on_a_store(tmp_path):
    from napari_medseg.core.inference import InferenceSettings
    from napari_medseg.core.pipeline import load_model, run_segmentation
    from napari_medseg.core.progress import drain
    from napari_medseg.core.rerun import merge_rerun, model_labels, snapshot_model_labels
    from napari_medseg.core.store import OutputStore

    image = (disks((256, 256), [(40, 40), (120, 200), (200, 100)], radius=12) > 0) * 200
    model, card = load_model("reseg_unet", "random", "cpu")
    settings = InferenceSettings(device="cpu", mc_samples=0, chunk=64, superblock=128)
    result = drain(run_segmentation(image.astype(np.uint8), model, card, tmp_path / "run.zarr", settings))
    store = OutputStore.open(result.output)
    original = np.asarray(store.labels()[...])
    # run_segmentation snapshots the model's labels block by block as they are decoded
    assert np.array_equal(np.asarray(model_labels(store)[...]), original)
    snapshot_model_labels(store)
    assert np.array_equal(np.asarray(model_labels(store)[...]), original)
    edited = original.copy()
    edited[disk((126, 126), 8)] = 777                       # an edit across four blocks
    store.labels()[...] = edited
    fresh = disks((256, 256), [(40, 40), (120, 200), (126, 128), (230, 20)], radius=10, first_id=5000)
    merged = drain(merge_rerun(store, fresh))
    assert merged.blocks == 4 and merged.protected_pixels > 0
    labels = np.asarray(store.labels()[...])
    assert (labels[disk((126, 126), 8)] == 777).all()        # the edit is kept
    assert not np.isin(5002, labels)                         # the new guess at it is dropped
    assert (labels[fresh == 5003] == 5003).all()             # elsewhere the new labels win
    assert np.array_equal(np.asarray(model_labels(store)[...]), fresh)


def test_rerun_job_replaces_probabilities_and_records_the_new_weights(tmp_path):
    """A re-run with other weights keeps the edit, and the probabilities the user sees are the new
    model's (level 0 and the pyramid), with the re-run recorded in the store's provenance."""
    import torch
    from src_models import save_weights

    from napari_medseg.core.inference import InferenceSettings
    from napari_medseg.core.pipeline import load_model, run_segmentation
    from napari_medseg.core.progress import drain
    from napari_medseg.core.rerun import rerun_job
    from napari_medseg.core.store import OutputStore

    image = ((disks((256, 256), [(40, 40), (120, 200), (200, 100)], radius=12) > 0) * 200).astype(np.uint8)
    model, card = load_model("reseg_unet", "random", "cpu")
    settings = InferenceSettings(device="cpu", mc_samples=0, chunk=64, superblock=128)
    store = OutputStore.open(drain(run_segmentation(image, model, card, tmp_path / "run.zarr", settings)).output)
    edited = np.asarray(store.labels()[...]).copy()
    edited[disk((126, 126), 8)] = 777
    store.labels()[...] = edited
    old_probs = store.read_map("probs")
    old_level1 = np.asarray(store.array("probs", 1)[...]).astype(int)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    save_weights(model, tmp_path / "child", {**card, "version": "child-v1"})
    drain(rerun_job(image, store.path, tmp_path / "child", "reseg_unet", device="cpu"))

    _, child_card = load_model("reseg_unet", tmp_path / "child", "cpu")
    direct = OutputStore.open(drain(run_segmentation(image, model, child_card, tmp_path / "direct.zarr",
                                                      settings)).output, mode="r")
    store = OutputStore.open(store.path, mode="r")
    new_probs = store.read_map("probs")
    assert not np.array_equal(new_probs, old_probs)
    assert np.array_equal(new_probs, direct.read_map("probs"))
    # level 1 is rebuilt from the stored uint8 level 0 (the direct run averaged floats): ±1 step
    level1 = np.asarray(store.array("probs", 1)[...]).astype(int)
    assert np.abs(level1 - np.asarray(direct.array("probs", 1)[...]).astype(int)).max() <= 1
    assert np.abs(level1 - old_level1).max() > 1
    assert (np.asarray(store.labels()[...])[disk((126, 126), 8)] == 777).all()
    (record,) = store.attrs["reruns"]
    assert record["weights_path"] == str(tmp_path / "child") and record["weights_version"] == "child-v1"
    assert record["region"] == [0, 256, 0, 256] and record["protected_pixels"] > 0
