"""Figures from synthetic inspection dumps and histories: files, pixel sizes, determinism, helpers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from remamber.reports import figures
from remamber.reports.figures import DPI, PANEL_IN, mask_iou, pca_project, resize_map, token_mean_map

N, R, L, C = 3, 32, 6, 4
STAGE_SIZES = (8, 4, 2, 1)
PANEL_PX = int(PANEL_IN * DPI)


def write_dump(path: Path, variant: str, seed: int = 0, ref_ids=(3, 5, 9)) -> Path:
    """An inspection file with the layout of remamber.engine.inspect, random contents."""
    rng = np.random.default_rng(seed)
    arrays = {
        "images": rng.integers(0, 256, (N, R, R, 3), dtype=np.uint8),
        "gt_masks": np.zeros((N, R, R), dtype=bool),
        "probs": rng.random((N, R, R), dtype=np.float32),
        "texts": np.asarray(["the red ball", "left square on the top row of the picture", "a"], dtype=str),
        "token_mask": np.arange(L)[None, :] < np.array([[4], [6], [2]]),
        "ref_ids": np.asarray(ref_ids, dtype=np.int64),
        "sent_ids": np.asarray(ref_ids, dtype=np.int64) * 10,
        "variant": np.asarray(variant),
    }
    arrays["gt_masks"][:, 8:20, 10:24] = True
    key = "attention_maps" if variant == "attention" else "interaction_maps"
    for s, h in enumerate(STAGE_SIZES):
        arrays[f"{key}_s{s}"] = rng.standard_normal((N, L, h, h)).astype(np.float32)
        if variant != "attention":
            dim = C * 2**s
            arrays[f"cube_s{s}"] = rng.standard_normal((N, 3 * dim, h, h)).astype(np.float16)
            arrays[f"cube_after_channel_s{s}"] = rng.standard_normal((N, 3 * dim, h, h)).astype(np.float16)
            arrays[f"cube_after_spatial_s{s}"] = rng.standard_normal((N, dim, h, h)).astype(np.float16)
            arrays[f"cube_slices_s{s}"] = np.asarray([[0, dim], [dim, 2 * dim], [2 * dim, 3 * dim]])
    if variant != "attention":
        arrays["cube_slice_names"] = np.asarray(["image", "global_text", "local"])
    np.savez_compressed(path, **arrays)
    return path


def png_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as im:
        return im.size


def check_outputs(paths: tuple[Path, Path], size: tuple[int, int]) -> None:
    png, pdf = paths
    assert png.suffix == ".png" and pdf.suffix == ".pdf"
    assert png_size(png) == size
    assert pdf.read_bytes().startswith(b"%PDF") and pdf.stat().st_size > 1000
    assert not [p for p in png.parent.iterdir() if p.name.endswith(".tmp")]


@pytest.fixture()
def dumps(tmp_path: Path) -> dict[str, Path]:
    return {v: write_dump(tmp_path / f"{v}.npz", v, seed=i) for i, v in enumerate(["twister", "attention", "parallel"])}


# ---- helpers against independent references ----


def test_pca_matches_numpy_svd() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((50, 6)) @ np.diag([5.0, 3.0, 2.0, 1.0, 0.5, 0.1]) + 7.0
    projected, variance = pca_project(x, 3)
    centred = x - x.mean(axis=0)
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    reference = centred @ vt[:3].T
    signs = np.sign((projected * reference).sum(axis=0))  # components are defined up to sign
    np.testing.assert_allclose(projected, reference * signs, atol=1e-9)
    np.testing.assert_allclose(variance, s[:3] ** 2 / (len(x) - 1), rtol=1e-9)


def test_pca_on_a_line_and_degenerate_inputs() -> None:
    t = np.arange(5.0)
    points = np.stack([t, 2 * t, np.zeros(5)], axis=1)  # all on the direction (1, 2, 0)/sqrt(5)
    projected, variance = pca_project(points, 3)
    np.testing.assert_allclose(projected[:, 0], (t - 2.0) * np.sqrt(5.0), atol=1e-12)  # sign: +largest loading
    np.testing.assert_allclose(projected[:, 1:], 0.0, atol=1e-12)
    np.testing.assert_allclose(variance, [5.0 * 2.5, 0.0, 0.0], atol=1e-12)
    two_d, var2 = pca_project(np.array([[0.0, 0.0], [2.0, 0.0], [4.0, 0.0]]), 3)  # D < k: zero padding
    assert two_d.shape == (3, 3) and var2[2] == 0.0
    with pytest.raises(ValueError, match="N>=2"):
        pca_project(np.ones((1, 3)))


def test_token_mean_map_and_resize() -> None:
    maps = np.stack([np.full((2, 2), 1.0), np.full((2, 2), 3.0), np.full((2, 2), 100.0)])
    np.testing.assert_allclose(token_mean_map(maps, np.array([True, True, False])), np.full((2, 2), 2.0))
    with pytest.raises(ValueError, match="no real tokens"):
        token_mean_map(maps, np.zeros(3, dtype=bool))
    assert not resize_map(np.full((1, 1), 5.0), 8).any()  # constant: zeros, no amplified noise
    up = resize_map(np.array([[0.0, 2.0], [2.0, 4.0]]), 4)
    # half-pixel bilinear of the scaled map [[0, .5], [.5, 1]]: corners keep the end values
    np.testing.assert_allclose([up[0, 0], up[3, 3], up[0, 3]], [0.0, 1.0, 0.5])
    np.testing.assert_allclose(up[1, 1], 0.75 * 0.75 * 0.0 + 2 * 0.75 * 0.25 * 0.5 + 0.25 * 0.25 * 1.0)


def test_mask_iou() -> None:
    a = np.zeros((4, 4), bool)
    b = np.zeros((4, 4), bool)
    a[:2, :2] = True  # 4 pixels
    b[1:3, 1:3] = True  # 4 pixels, 1 shared
    assert mask_iou(a, b) == pytest.approx(1 / 7)
    assert mask_iou(np.zeros((2, 2), bool), np.zeros((2, 2), bool)) == 0.0


# ---- figures ----


def test_fig_interaction_vs_attention(dumps: dict[str, Path], tmp_path: Path) -> None:
    out = figures.fig_interaction_vs_attention(dumps["twister"], dumps["attention"], tmp_path / "out" / "fig4")
    check_outputs(out, (PANEL_PX * (1 + len(STAGE_SIZES)), PANEL_PX * 2 * N))
    again = figures.fig_interaction_vs_attention(dumps["twister"], dumps["attention"], tmp_path / "again" / "fig4")
    assert out[0].read_bytes() == again[0].read_bytes()
    assert out[1].read_bytes() == again[1].read_bytes()


def test_fig_cube_pca(dumps: dict[str, Path], tmp_path: Path) -> None:
    out = figures.fig_cube_pca(dumps["twister"], tmp_path / "fig5")
    check_outputs(out, (int(3 * figures.PANEL_3D_IN * DPI), int(figures.PANEL_3D_IN * DPI)))
    with pytest.raises(ValueError, match="sample 7 out of range"):
        figures.fig_cube_pca(dumps["twister"], tmp_path / "bad", sample=7)
    with pytest.raises(ValueError, match=r"attention\.npz.*cube_s0"):
        figures.fig_cube_pca(dumps["attention"], tmp_path / "bad")


def test_cube_points_split_by_slices() -> None:
    features = np.arange(3 * 2 * 2 * 2, dtype=float).reshape(6, 2, 2)  # P*C = 6, C = 2, 2x2 pixels
    slices = {"image": (0, 2), "global_text": (2, 4), "local": (4, 6)}
    sets = dict(figures._cube_points(features, slices, cube_channels=6))
    assert list(sets) == ["image", "text"]
    np.testing.assert_array_equal(sets["image"], features[0:2].reshape(2, 4).T)  # one C-d point per pixel
    np.testing.assert_array_equal(sets["text"], features[2:4].reshape(2, 4).T)
    mixed = figures._cube_points(features[:2], slices, cube_channels=6)
    assert [name for name, _ in mixed] == ["mixed"] and mixed[0][1].shape == (4, 2)
    local_only = dict(figures._cube_points(features[:4], {"image": (0, 2), "local": (2, 4)}, cube_channels=4))
    np.testing.assert_array_equal(local_only["text"], features[2:4].reshape(2, 4).T)


def test_fig_overlays(dumps: dict[str, Path], tmp_path: Path) -> None:
    out = figures.fig_overlays(dumps, tmp_path / "fig7")
    check_outputs(out, (PANEL_PX * (1 + len(dumps)), PANEL_PX * N))
    other = write_dump(tmp_path / "other.npz", "in_context", ref_ids=(1, 2, 3))
    with pytest.raises(ValueError, match=r"other\.npz.*different samples"):
        figures.fig_overlays({"twister": dumps["twister"], "in_context": other}, tmp_path / "bad")
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        figures.fig_overlays({"twister": tmp_path / "missing.npz"}, tmp_path / "bad")
    assert not (tmp_path / "bad.png").exists()


def test_fig_training_curves(tmp_path: Path) -> None:
    histories = {}
    for label, scale in (("twister", 1.0), ("attention", 2.0)):
        path = tmp_path / f"{label}.json"
        path.write_text(json.dumps([{"epoch": e, "loss": scale / (e + 1), "val_mIoU": 10.0 * e / scale,
                                     "lr": 1e-3, "val_oIoU": 1.0, "images_per_s": 5.0, "seconds": 1.0}
                                    for e in range(5)]))
        histories[label] = path
    out = figures.fig_training_curves(histories, tmp_path / "curves")
    check_outputs(out, (int(2 * figures.CURVE_PANEL_IN[0] * DPI), int(figures.CURVE_PANEL_IN[1] * DPI)))
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps([{"epoch": 0, "loss": 1.0}]))
    with pytest.raises(ValueError, match=r"broken\.json.*val_mIoU"):
        figures.fig_training_curves({"x": broken}, tmp_path / "bad")
