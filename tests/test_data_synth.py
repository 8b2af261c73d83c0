"""The synthetic referring dataset: layout, determinism, round trip through reader -> preprocess ->
dataset, and a text-blind baseline that must score badly."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from remamber.data.datasets import RefSegDataset
from remamber.data.preprocess import CountMismatchError, clean_sentence, preprocess
from remamber.data.refer import decode_mask, load_instances, load_refer
from remamber.data.synth import COLOURS, LOCATION_WORDS, NOUNS, generate, polygons_rle, write_synthetic

# pycocotools' compiled decode warns on every call under numpy 2; the tests use it as a reference
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

SPLITS = {"refcoco": ("unc", {"train", "val", "testA", "testB"}), "refcoco+": ("unc", {"train", "val", "testA", "testB"}),
          "refcocog": ("umd", {"train", "val", "test"})}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    write_synthetic(root / "raw", seed=0, size="demo", progress=False)
    for dataset, (split_by, _) in SPLITS.items():
        preprocess(root / "raw", dataset, root / "idx" / dataset, split_by=split_by, progress=False)
    return root, generate(0, "demo")


def _tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_layout_matches_the_refer_format(demo):
    root, data = demo
    raw = root / "raw"
    for dataset, (split_by, splits) in SPLITS.items():
        blob = (raw / dataset / f"refs({split_by}).p").read_bytes()
        assert blob[:2] == b"\x80\x02"  # protocol 2, like the originals
        refer = load_refer(raw, dataset, split_by)
        assert {r["split"] for r in refer.refs} == splits
        for ref in refer.refs:
            img = refer.images[ref["image_id"]]
            assert re.fullmatch(r"COCO_train2014_\d{12}\.jpg", img["file_name"])
            assert ref["file_name"] == img["file_name"][:-4] + f"_{ref['ann_id']}.jpg"
            assert (raw / "train2014" / img["file_name"]).is_file()
            assert all(isinstance(p, list) for p in refer.annotations[ref["ann_id"]]["segmentation"])
            assert [s["sent_id"] for s in ref["sentences"]] == ref["sent_ids"]
        assert json.loads((raw / dataset / "synth_meta.json").read_text())["counts"] == data.counts(dataset)


def test_demo_size_and_splits_follow_refcoco(demo):
    _, data = demo
    for dataset in SPLITS:
        counts = data.counts(dataset)
        # 600 train images, 48 per evaluated split (about 2.7 objects each, some without an expression)
        assert 1400 <= counts["train"]["objects"] <= 2000, counts
        for split, c in counts.items():
            if split != "train":
                assert 80 <= c["objects"] <= 170, (dataset, split, c)
    for dataset in ("refcoco", "refcoco+"):
        cats = {split: {r.category_id for r in data.refs[dataset] if r.split == split} for split in ("testA", "testB")}
        assert cats["testA"] == {1}  # testA: people
        assert 1 not in cats["testB"]  # testB: everything else
    for image in data.images.values():
        assert 3 <= len(image.objects) <= 5
        assert 128 <= image.width <= 160 and 128 <= image.height <= 160


def test_expressions_need_the_text(demo):
    _, data = demo
    words = {d: [w for r in data.refs[d] for s in r.sentences for w in s["sent"].split()] for d in SPLITS}
    assert not set(words["refcoco+"]) & LOCATION_WORDS  # RefCOCO+: no absolute location words
    assert set(words["refcoco"]) & {"left", "right", "top", "bottom", "second"}
    n_words = {d: np.mean([len(s["tokens"]) for r in data.refs[d] for s in r.sentences]) for d in SPLITS}
    assert n_words["refcocog"] > 1.8 * n_words["refcoco"], n_words  # G-Ref: longer expressions
    nouns = {n: cat for cat, ns in NOUNS.items() for n in ns}
    checked = 0
    for dataset in SPLITS:
        for ref in data.refs[dataset]:
            objs = data.images[ref.image_id].objects
            target = next(o for o in objs if o.ann_id == ref.ann_id)
            # a distractor of the same kind (same shape or same colour) is always present
            assert any(o is not target and (o.category == target.category or o.colour == target.colour) for o in objs)
            for s in ref.sentences:
                m = re.fullmatch(r"(?:the )?(\w+) (\w+)", s["sent"])
                if m and m.group(1) in COLOURS and m.group(2) in nouns:  # "<colour> <shape>" names exactly one object
                    matching = [o for o in objs if o.colour == m.group(1) and o.category == nouns[m.group(2)]]
                    assert matching == [target], s["raw"]
                    checked += 1
    assert checked > 50


def test_round_trip_through_reader_preprocess_and_dataset(demo):
    root, data = demo
    for dataset in SPLITS:
        idx = root / "idx" / dataset
        for split in SPLITS[dataset][1]:
            refs = [r for r in data.refs[dataset] if r.split == split]
            table = pd.read_parquet(idx / f"{split}.parquet")
            assert list(table.ref_id) == [r.ref_id for r in refs]
            for ref, row in zip(refs, table.itertuples()):
                image = data.images[ref.image_id]
                obj = next(o for o in image.objects if o.ann_id == ref.ann_id)
                assert list(row.sentences_raw) == [s["raw"] for s in ref.sentences]
                assert list(row.sent_ids) == [s["sent_id"] for s in ref.sentences]
                expected = mask_utils.decode(polygons_rle(obj.polygons, image.height, image.width)).astype(bool)
                np.testing.assert_array_equal(decode_mask(row.mask_counts, row.height, row.width), expected)
                # the pixels under the mask have the object's colour (image and mask are aligned)
                pixels = np.asarray(Image.open(root / "raw" / row.image_path).convert("RGB"))[expected]
                assert np.abs(np.median(pixels, axis=0) - np.array(COLOURS[obj.colour])).max() < 25
            ds = RefSegDataset(idx, split, "eval", 64, root / "raw")
            items = [ds[i] for i in range(len(ds))]
            assert [it["text"] for it in items] == [clean_sentence(s["raw"]) for r in refs for s in r.sentences]
            assert [it["sent_id"] for it in items] == [s["sent_id"] for r in refs for s in r.sentences]


def test_same_seed_identical_bytes_different_seed_differs(tmp_path):
    write_synthetic(tmp_path / "a", seed=3, size="tiny", progress=False)
    write_synthetic(tmp_path / "b", seed=3, size="tiny", progress=False)
    write_synthetic(tmp_path / "c", seed=4, size="tiny", progress=False)
    a, b, c = (_tree_digest(tmp_path / n) for n in "abc")
    assert a == b
    assert len(a) > 10
    common = set(a) & set(c)
    assert a["refcoco/refs(unc).p"] != c["refcoco/refs(unc).p"]
    assert sum(a[k] != c[k] for k in common if k.endswith(".jpg")) > 5


def test_synth_meta_counts_are_validated(tmp_path):
    write_synthetic(tmp_path, seed=0, size="tiny", progress=False)
    meta_path = tmp_path / "refcoco" / "synth_meta.json"
    meta = json.loads(meta_path.read_text())
    meta["counts"]["val"]["objects"] += 1
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(CountMismatchError, match=r"val objects: expected \d+, found \d+"):
        preprocess(tmp_path, "refcoco", tmp_path / "idx", progress=False)
    with pytest.raises(ValueError, match="unknown synthetic size"):
        write_synthetic(tmp_path / "x", size="huge")


def test_text_blind_baselines_score_badly(demo):
    """mIoU = mean over sentences of |P & G| / |P | G|, with P a text-blind guess among the image's objects."""
    root, _ = demo
    figures = {}
    for dataset in SPLITS:
        inst = load_instances(root / "raw" / dataset / "instances.json")
        table = pd.read_parquet(root / "idx" / dataset / "val.parquet")
        ious = {"largest": [], "centre": [], "ground truth": []}
        for row in table.itertuples():
            h, w = row.height, row.width
            anns = [a for a in inst["annotations"].values() if a["image_id"] == row.image_id]
            masks = {a["id"]: mask_utils.decode(polygons_rle(a["segmentation"], h, w)).astype(bool) for a in anns}
            largest = max(masks, key=lambda k: masks[k].sum())
            centre = min(anns, key=lambda a: (a["bbox"][0] + a["bbox"][2] / 2 - w / 2) ** 2
                         + (a["bbox"][1] + a["bbox"][3] / 2 - h / 2) ** 2)["id"]
            gt = decode_mask(row.mask_counts, h, w)
            for name, pred in (("largest", masks[largest]), ("centre", masks[centre]), ("ground truth", gt)):
                iou = (pred & gt).sum() / (pred | gt).sum()
                ious[name] += [iou] * len(row.sentences)  # one sample per sentence
        figures[dataset] = {k: 100 * float(np.mean(v)) for k, v in ious.items()}
        print(f"{dataset} val mIoU: " + ", ".join(f"{k} {v:.1f}" for k, v in figures[dataset].items()))
    for dataset, f in figures.items():
        assert f["largest"] < 40 and f["centre"] < 40, (dataset, f)
        assert f["ground truth"] == 100.0



def test_manifest_records_and_verifies_the_synthetic_folder(tmp_path):
    from remamber.data.manifest import verify_manifest, write_manifest

    write_synthetic(tmp_path, seed=0, size="tiny", progress=False)
    out = write_manifest(tmp_path)
    entries = {e["path"]: e for e in json.loads(out.read_text())["files"]}
    refs = tmp_path / "refcoco" / "refs(unc).p"
    assert entries["refcoco/refs(unc).p"]["sha256"] == hashlib.sha256(refs.read_bytes()).hexdigest()
    assert len([k for k in entries if k.startswith("train2014/")]) == len(list((tmp_path / "train2014").iterdir()))
    assert verify_manifest(tmp_path) == []
    refs.write_bytes(refs.read_bytes() + b"x")
    assert any("refs(unc).p" in p for p in verify_manifest(tmp_path))
