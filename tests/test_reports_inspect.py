"""Figure data dump: a tiny model checkpoint written through the engine's API, dumped on a tiny
synthetic split, read back without pickle and checked against an independent forward pass."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from remamber.data.datasets import RefSegDataset
from remamber.data.preprocess import preprocess
from remamber.data.synth import write_synthetic
from remamber.engine.checkpoint import load_model, save_checkpoint
from remamber.engine.inspect import dump_inspection, select_items
from remamber.formats import load_inspection
from remamber.models import build_model, variant_config
from remamber.reports import figures

RES = 32
N_SAMPLES = 3


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("inspect")
    write_synthetic(root / "raw", seed=0, size="tiny", progress=False)
    preprocess(root / "raw", "refcoco", root / "processed" / "refcoco", progress=False)
    config = {"data": {"processed": str(root / "processed"), "raw": str(root / "raw")}}
    out = {"root": root, "ckpt": {}, "npz": {}}
    for variant in ("twister", "attention"):
        torch.manual_seed(1)
        model = build_model(variant_config(variant))
        ckpt = root / f"{variant}.pt"
        save_checkpoint(ckpt, model, {"config": config, "dataset": "refcoco", "variant": variant,
                                      "resolution": RES, "epoch": 0, "data_hash": "test"})
        out["ckpt"][variant] = ckpt
        # defaults for index_dir / data_root come from the checkpoint's config
        out["npz"][variant] = dump_inspection(ckpt, "val", root / "dumps" / f"{variant}.npz", n_samples=N_SAMPLES)
    return out


def test_select_items_first_distinct_objects() -> None:
    assert select_items([7, 7, 3, 3, 3, 9, 7, 4], 3) == [0, 2, 5]
    assert select_items([1, 1], 4) == [0]


def test_dump_round_trip_against_direct_forward(setup: dict) -> None:
    root = setup["root"]
    data = load_inspection(setup["npz"]["twister"])
    with np.load(setup["npz"]["twister"], allow_pickle=False) as raw:  # plain arrays only
        assert all(raw[k].dtype != object for k in raw.files)

    ds = RefSegDataset(root / "processed" / "refcoco", "val", "eval", RES, root / "raw")
    ref_ids = [ds[i]["ref_id"] for i in range(len(ds))]
    chosen = select_items(ref_ids, N_SAMPLES)
    items = [ds[i] for i in chosen]
    assert len(set(data["ref_ids"].tolist())) == N_SAMPLES
    assert data["ref_ids"].tolist() == [it["ref_id"] for it in items]
    assert data["sent_ids"].tolist() == [it["sent_id"] for it in items]
    assert data["texts"].tolist() == [it["text"] for it in items]
    assert data["texts"].dtype.kind == "U"
    assert str(data["variant"]) == "twister" and int(data["resolution"]) == RES and str(data["split"]) == "val"

    # images: the input resized from the JPEG itself (independent of the normalisation round trip)
    assert data["images"].dtype == np.uint8 and data["images"].shape == (N_SAMPLES, RES, RES, 3)
    for k, it in enumerate(items):
        with Image.open(root / "raw" / it["image_path"]) as im:
            expected = np.asarray(im.convert("RGB").resize((RES, RES), Image.BILINEAR), dtype=np.int16)
        assert np.abs(data["images"][k].astype(np.int16) - expected).max() <= 1
        np.testing.assert_array_equal(data["gt_masks"][k], it["mask"][0].numpy() > 0.5)

    model, _ = load_model(setup["ckpt"]["twister"])
    ids, mask = model.tokenize([it["text"] for it in items])
    with torch.no_grad():
        logits, trace = model(torch.stack([it["image"] for it in items]), ids, mask, inspect=True)
    np.testing.assert_array_equal(data["token_mask"], mask.numpy().astype(bool))
    np.testing.assert_array_equal(data["input_ids"], ids.numpy())
    np.testing.assert_allclose(data["probs"], torch.sigmoid(logits[:, 0]).numpy(), atol=1e-6)
    n_stages = int(data["n_stages"])
    assert n_stages == len(trace["interaction_maps"])
    for s in range(n_stages):
        np.testing.assert_allclose(data[f"interaction_maps_s{s}"], trace["interaction_maps"][s].numpy(), atol=1e-5)
        for key in ("cube", "cube_after_channel", "cube_after_spatial"):
            np.testing.assert_allclose(data[f"{key}_s{s}"].astype(np.float32),
                                       trace[key][s].numpy().astype(np.float16).astype(np.float32), atol=2e-3)
        slices = trace["cube_slices"][s]
        assert data["cube_slice_names"].tolist() == list(slices)
        assert data[f"cube_slices_s{s}"].tolist() == [list(v) for v in slices.values()]
    assert not any(k.startswith("attention_maps") for k in data)

    attention = load_inspection(setup["npz"]["attention"])
    assert [k for k in attention if k.startswith("attention_maps")] == [f"attention_maps_s{s}" for s in range(n_stages)]
    assert not any(k.startswith("cube") or k.startswith("interaction") for k in attention)
    np.testing.assert_array_equal(attention["sent_ids"], data["sent_ids"])  # every variant: same samples


def test_dump_is_deterministic_and_atomic(setup: dict, tmp_path: Path) -> None:
    again = dump_inspection(setup["ckpt"]["twister"], "val", tmp_path / "again.npz", n_samples=N_SAMPLES, seed=5)
    first, second = load_inspection(setup["npz"]["twister"]), load_inspection(again)
    assert first.keys() == second.keys()
    for key in first:
        np.testing.assert_array_equal(first[key], second[key], err_msg=key)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again.npz"]
    with pytest.raises(FileNotFoundError, match="no index for split 'nosuch'"):
        dump_inspection(setup["ckpt"]["twister"], "nosuch", tmp_path / "bad.npz")
    assert not (tmp_path / "bad.npz").exists()


def test_figures_from_real_dumps(setup: dict, tmp_path: Path) -> None:
    npz = setup["npz"]
    png, pdf = figures.fig_interaction_vs_attention(npz["twister"], npz["attention"], tmp_path / "fig4")
    with Image.open(png) as im:
        assert im.size == (int(figures.PANEL_IN * figures.DPI) * 5, int(figures.PANEL_IN * figures.DPI) * 2 * N_SAMPLES)
    figures.fig_cube_pca(npz["twister"], tmp_path / "fig5")
    figures.fig_overlays(npz, tmp_path / "fig7")
    assert all((tmp_path / f"{name}.{ext}").stat().st_size > 0
               for name in ("fig4", "fig5", "fig7") for ext in ("png", "pdf"))
