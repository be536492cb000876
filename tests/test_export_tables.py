"""Export labels (issue 8): measurement tables (CSV) and GeoJSON polygons, block-wise."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from skimage.measure import regionprops

from export_fixtures import RUN, UNCERTAINTY, blobs, make_store, rasterise
from napari_medseg.core.export import export_labels
from napari_medseg.core.progress import drain


@pytest.fixture
def labels():
    return blobs()


@pytest.fixture
def store(tmp_path, labels):
    return make_store(tmp_path / "run.medseg.zarr", labels)


# ----------------------------------------------------------------------------- tables
def test_csv_rows_match_regionprops_across_blocks(tmp_path, store, labels):
    intensity = np.random.default_rng(2).random(labels.shape).astype(np.float32)
    result = drain(export_labels(store[0], tmp_path / "o.csv", "csv", image=intensity, block=64))
    table = pd.read_csv(result.path)
    props = {p.label: p for p in regionprops(labels.astype(np.int64), intensity_image=intensity)}
    assert result.objects == len(table) == len(props) and list(table["label"]) == sorted(props)
    maps = store[1]
    for row in table.itertuples():
        p = props[row.label]
        mask = labels == row.label
        assert row.area == p.area
        assert (row.centroid_y, row.centroid_x) == pytest.approx(p.centroid)
        assert (row.bbox_y0, row.bbox_x0, row.bbox_y1, row.bbox_x1) == p.bbox
        assert row.equivalent_diameter == pytest.approx(p.equivalent_diameter_area)
        assert row.mean_intensity == pytest.approx(p.intensity_mean, rel=1e-5)
        for name in UNCERTAINTY:
            assert getattr(row, f"mean_{name}") == pytest.approx(maps[name][0][mask].mean(), rel=1e-5)
        assert row.area_um2 == pytest.approx(p.area * 0.25)
    assert set(table["model"]) == {"vunet"} and set(table["weights_sha256"]) == {RUN["weights_sha256"]}


def test_csv_of_a_plain_array_has_no_run_columns(tmp_path, labels):
    table = pd.read_csv(drain(export_labels(labels, tmp_path / "p.csv", "csv")).path)
    assert "model" not in table and "mean_intensity" not in table and "area_um2" not in table
    assert table["area"].sum() == (labels > 0).sum()


# ----------------------------------------------------------------------------- GeoJSON
def check_qupath_feature_collection(data: dict) -> None:
    """What QuPath's GeoJSON import needs (≥ 0.4): a FeatureCollection of Features with closed
    Polygon/MultiPolygon rings of ≥ 4 [x, y] numbers, objectType and numeric measurements."""
    assert data["type"] == "FeatureCollection" and isinstance(data["features"], list)
    for feature in data["features"]:
        assert feature["type"] == "Feature" and isinstance(feature["id"], str)
        geometry = feature["geometry"]
        assert geometry["type"] in ("Polygon", "MultiPolygon")
        polygons = [geometry["coordinates"]] if geometry["type"] == "Polygon" else geometry["coordinates"]
        for rings in polygons:
            for ring in rings:
                assert len(ring) >= 4 and ring[0] == ring[-1]
                assert all(len(p) == 2 and all(isinstance(v, (int, float)) for v in p) for p in ring)
        props = feature["properties"]
        assert props["objectType"] == "detection"
        assert all(isinstance(k, str) and isinstance(v, (int, float))
                   for k, v in props["measurements"].items())
        if "classification" in props:
            assert isinstance(props["classification"]["name"], str)


def test_geojson_polygons_cover_their_objects(tmp_path, store, labels):
    result = drain(export_labels(store[0], tmp_path / "o.geojson", "geojson", block=64,
                                 classification="Nucleus"))
    text = result.path.read_text()
    data = json.loads(text)
    check_qupath_feature_collection(data)
    assert result.objects == len(data["features"]) == len(np.unique(labels)) - 1
    kinds = {}
    for feature in data["features"]:
        label = feature["properties"]["label"]
        drawn, mask = rasterise(feature["geometry"], labels.shape), labels == label
        iou = (drawn & mask).sum() / (drawn | mask).sum()
        assert iou >= 0.95, (label, iou)
        assert feature["properties"]["measurements"]["area"] == mask.sum()
        assert "mean_entropy" in feature["properties"]["measurements"]
        kinds[label] = feature["geometry"]["type"]
    assert kinds[998] == "MultiPolygon"
    holed = next(f for f in data["features"] if f["properties"]["label"] == 999)
    assert len(holed["geometry"]["coordinates"]) == 2                    # outer ring + the hole
    assert data["napari_medseg"]["model"] == "vunet"


def test_geojson_large_objects_are_traced_on_their_own(tmp_path):
    labels = np.zeros((200, 200), np.uint16)
    labels[5:190, 10:195] = 7           # larger than a block
    labels[50:60, 50:60] = 8            # inside it
    data = json.loads(drain(export_labels(labels, tmp_path / "g.geojson", "geojson", block=64))
                      .path.read_text())
    for feature in data["features"]:
        drawn = rasterise(feature["geometry"], labels.shape)
        assert (drawn == (labels == feature["properties"]["label"])).all()
