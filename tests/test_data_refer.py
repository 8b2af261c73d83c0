"""The refer reader and preprocessing on a small hand-made fixture (Python-2 style pickle, overlapping
polygons, crowd RLE) with hand-computed masks."""

from __future__ import annotations

import json
import os
import pickle
import pickletools
import struct
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from remamber.data.preprocess import CountMismatchError, clean_sentence, data_hash, preprocess, read_meta
from remamber.data.refer import (ReferError, UnsafePickleError, annotation_mask, decode_mask, load_refer,
                                 load_refs, safe_load_pickle)

# pycocotools' compiled decode warns on every call under numpy 2; the tests use it as a reference
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

H = W = 20


def py2_pickle(obj) -> bytes:
    """Protocol-2 pickle as Python 2 writes it: `bytes` are Python 2 `str` (SHORT_BINSTRING), `str` values
    are Python 2 `unicode` (BINUNICODE). No globals."""
    out = bytearray(b"\x80\x02")

    def emit(o):
        if isinstance(o, bool):
            out.extend(b"\x88" if o else b"\x89")
        elif o is None:
            out.extend(b"N")
        elif isinstance(o, int):
            out.extend(b"J" + struct.pack("<i", o))
        elif isinstance(o, float):
            out.extend(b"G" + struct.pack(">d", o))
        elif isinstance(o, bytes):
            assert len(o) < 256
            out.extend(b"U" + bytes([len(o)]) + o)
        elif isinstance(o, str):
            data = o.encode("utf-8")
            out.extend(b"X" + struct.pack("<I", len(data)) + data)
        elif isinstance(o, list):
            out.extend(b"](")
            for v in o:
                emit(v)
            out.extend(b"e")
        elif isinstance(o, dict):
            out.extend(b"}(")
            for k, v in o.items():
                emit(k)
                emit(v)
            out.extend(b"u")
        else:
            raise TypeError(o)

    emit(obj)
    out.extend(b".")
    return bytes(out)


def _square(x0, y0, x1, y1):
    return [x0, y0, x1, y0, x1, y1, x0, y1]


def _hand_masks():
    a = np.zeros((H, W), bool)
    a[2:10, 2:10] = True  # pycocotools covers pixels 2..9 for a polygon with corners at 2 and 10
    b = np.zeros((H, W), bool)
    b[6:14, 6:14] = True
    crowd = np.zeros((H, W), bool)
    crowd[5:15, 1] = True  # column-major counts [25, 10, 365]: column 1, rows 5..14
    third = np.zeros((H, W), bool)
    third[15:19, 12:18] = True
    return a, b, crowd, third


def _ref(ref_id, ann_id, split, sentences):
    return {b"ref_id": ref_id, b"ann_id": ann_id, b"image_id": 1, b"category_id": 1, b"split": split,
            b"file_name": b"COCO_train2014_000000000001_%d.jpg" % ann_id,
            b"sent_ids": [s[b"sent_id"] for s in sentences], b"sentences": sentences}


def _sent(raw, sent_id):
    return {b"raw": raw, b"sent": raw.lower() if isinstance(raw, bytes) else raw.lower(), b"sent_id": sent_id,
            b"tokens": [b"x"]}


def write_fixture(root: Path, refs=None, annotations=None) -> Path:
    a, b, crowd, third = _hand_masks()
    third_rle = mask_utils.encode(np.asfortranarray(third.astype(np.uint8)))
    if annotations is None:
        annotations = [
            {"id": 11, "image_id": 1, "category_id": 1, "iscrowd": 0, "bbox": [2, 2, 12, 12], "area": 112.0,
             "segmentation": [_square(2, 2, 10, 10), _square(6, 6, 14, 14)]},
            {"id": 12, "image_id": 1, "category_id": 1, "iscrowd": 1, "bbox": [1, 5, 1, 10], "area": 10.0,
             "segmentation": {"size": [H, W], "counts": [25, 10, 365]}},
            {"id": 13, "image_id": 1, "category_id": 2, "iscrowd": 0, "bbox": [12, 15, 6, 4], "area": 24.0,
             "segmentation": {"size": [H, W], "counts": third_rle["counts"].decode("ascii")}},
        ]
    if refs is None:
        refs = [
            _ref(0, 11, b"train", [_sent("the caf\u00e9 sign", 0), _sent("na\u00efve  Left  THING".encode("utf-8"), 1)]),
            _ref(1, 12, b"train", [_sent(b"crowd on the left", 2)]),
            _ref(2, 13, b"val", [_sent(b"small box", 3), _sent(b"bottom right box", 4), _sent(b"it", 5)]),
        ]
    ddir = root / "toy"
    ddir.mkdir(parents=True, exist_ok=True)
    (ddir / "refs(unc).p").write_bytes(py2_pickle(refs))
    (ddir / "instances.json").write_text(json.dumps({
        "images": [{"id": 1, "file_name": "COCO_train2014_000000000001.jpg", "height": H, "width": W}],
        "annotations": annotations, "categories": [{"id": 1, "name": "thing"}, {"id": 2, "name": "box"}]}))
    (root / "train2014").mkdir(exist_ok=True)
    Image.new("RGB", (W, H), (120, 30, 200)).save(root / "train2014" / "COCO_train2014_000000000001.jpg")
    return root


EXPECTED = {"train": {"objects": 2, "images": 1, "sentences": 3}, "val": {"objects": 1, "images": 1, "sentences": 3}}


def test_python2_pickle_is_read_with_str_keys_and_values(tmp_path):
    root = write_fixture(tmp_path)
    blob = (root / "toy" / "refs(unc).p").read_bytes()
    with open(os.devnull, "w") as sink:
        pickletools.dis(blob, out=sink)  # a well-formed protocol-2 stream
    refs = load_refs(root / "toy" / "refs(unc).p")
    assert [r["ref_id"] for r in refs] == [0, 1, 2]
    assert refs[0]["split"] == "train" and refs[2]["split"] == "val"
    assert refs[0]["sentences"][0]["raw"] == "the caf\u00e9 sign"  # py2 unicode
    assert refs[0]["sentences"][1]["raw"] == "na\u00efve  Left  THING"  # py2 str holding UTF-8
    assert all(isinstance(k, str) for k in refs[0])


def test_overlapping_polygons_union_versus_refer_eq1(tmp_path):
    a, b, _, _ = _hand_masks()
    seg = [_square(2, 2, 10, 10), _square(6, 6, 14, 14)]
    union = annotation_mask(seg, H, W, "union")
    eq1 = annotation_mask(seg, H, W, "refer_eq1")
    assert union.sum() == 64 + 64 - 16 == 112
    assert eq1.sum() == 112 - 16 == 96  # the 4x4 overlap drops out, as in the refer API
    np.testing.assert_array_equal(union, a | b)
    np.testing.assert_array_equal(eq1, a ^ b)
    with pytest.raises(ValueError, match="mask_mode"):
        annotation_mask(seg, H, W, "sum")


def test_crowd_uncompressed_rle_and_compressed_rle(tmp_path):
    _, _, crowd, third = _hand_masks()
    refer = load_refer(write_fixture(tmp_path), "toy", "unc")
    by_ann = {r["ann_id"]: r for r in refer.refs}
    for mode in ("union", "refer_eq1"):
        np.testing.assert_array_equal(refer.ref_mask(by_ann[12], mode), crowd)
        np.testing.assert_array_equal(refer.ref_mask(by_ann[13], mode), third)


class _Evil:
    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return os.system, (f"touch {self.target}",)


def test_pickle_building_an_object_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "refs(unc).p"
    path.write_bytes(pickle.dumps([{"ref_id": 0, "x": _Evil(marker)}], protocol=2))
    with pytest.raises(UnsafePickleError, match=r"refs\(unc\)\.p: refusing to load global (posix|nt|os)\.system"):
        safe_load_pickle(path)
    assert not marker.exists()
    # Python 3 bytes in protocol 2 need a global (_codecs.encode): also refused
    path.write_bytes(pickle.dumps([b"abc"], protocol=2))
    with pytest.raises(UnsafePickleError, match="_codecs.encode"):
        safe_load_pickle(path)


def test_corrupt_pickle_names_the_file(tmp_path):
    root = write_fixture(tmp_path)
    p = root / "toy" / "refs(unc).p"
    p.write_bytes(p.read_bytes()[:40])
    with pytest.raises(ReferError, match=r"refs\(unc\)\.p: corrupt or truncated pickle"):
        load_refs(p)


def test_preprocess_round_trip_and_counts(tmp_path):
    a, b, crowd, third = _hand_masks()
    root = write_fixture(tmp_path / "raw")
    meta = preprocess(root, "toy", tmp_path / "idx", split_by="unc", expected_counts=EXPECTED, progress=False)
    assert meta["counts"] == EXPECTED
    assert read_meta(tmp_path / "idx") == meta
    assert meta["data_hash"] == data_hash(tmp_path / "idx")
    train = pd.read_parquet(tmp_path / "idx" / "train.parquet")
    val = pd.read_parquet(tmp_path / "idx" / "val.parquet")
    assert list(train.ref_id) == [0, 1] and list(val.ref_id) == [2]
    row = train.iloc[0]
    assert row.image_path == "train2014/COCO_train2014_000000000001.jpg"
    assert (row.width, row.height) == (W, H)
    assert list(row.sent_ids) == [0, 1]
    assert list(row.sentences_raw) == ["the caf\u00e9 sign", "na\u00efve  Left  THING"]
    assert list(row.sentences) == ["the caf\u00e9 sign", "na\u00efve left thing"]
    assert list(row.bbox) == [2.0, 2.0, 12.0, 12.0]
    np.testing.assert_array_equal(decode_mask(row.mask_counts, H, W), a | b)
    assert row.mask_area == 112
    np.testing.assert_array_equal(decode_mask(train.iloc[1].mask_counts, H, W), crowd)
    np.testing.assert_array_equal(decode_mask(val.iloc[0].mask_counts, H, W), third)

    # refer_eq1 changes the first mask and therefore the data hash
    meta_eq1 = preprocess(root, "toy", tmp_path / "idx_eq1", split_by="unc", mask_mode="refer_eq1",
                          expected_counts=EXPECTED, progress=False)
    eq1 = pd.read_parquet(tmp_path / "idx_eq1" / "train.parquet").iloc[0]
    np.testing.assert_array_equal(decode_mask(eq1.mask_counts, H, W), a ^ b)
    assert meta_eq1["data_hash"] != meta["data_hash"]
    # same inputs, same bytes, same hash
    again = preprocess(root, "toy", tmp_path / "idx2", split_by="unc", expected_counts=EXPECTED, progress=False)
    assert again["data_hash"] == meta["data_hash"]


def test_count_mismatch_shows_expected_and_found(tmp_path):
    root = write_fixture(tmp_path / "raw")
    wrong = {**EXPECTED, "val": {"objects": 1, "images": 1, "sentences": 4}}
    with pytest.raises(CountMismatchError, match=r"val sentences: expected 4, found 3"):
        preprocess(root, "toy", tmp_path / "idx", split_by="unc", expected_counts=wrong, progress=False)
    assert not (tmp_path / "idx" / "meta.json").exists()
    yaml_path = tmp_path / "datasets.yaml"
    yaml_path.write_text(json.dumps({
        "archives": {"a": {"filename": "a.zip", "urls": ["http://127.0.0.1:9/a.zip"], "size": 1, "md5": "0" * 32}},
        "datasets": {"toy": {"archives": ["a"], "split_by": "unc",
                             "counts": {"train": EXPECTED["train"], "testA": EXPECTED["val"]}}}}))
    with pytest.raises(CountMismatchError, match=r"split 'testA': expected .* found no refs"):
        preprocess(root, "toy", tmp_path / "idx", split_by="unc", expected_counts=yaml_path, progress=False)


def test_missing_image_unknown_ids_and_bad_segmentation_name_the_ref(tmp_path):
    root = write_fixture(tmp_path / "a")
    (root / "train2014" / "COCO_train2014_000000000001.jpg").unlink()
    with pytest.raises(ReferError, match=r"COCO_train2014_000000000001\.jpg: image of ref_id 0 .* missing"):
        preprocess(root, "toy", tmp_path / "idx", split_by="unc", progress=False)

    refs = [_ref(0, 11, b"train", [_sent(b"x", 0)]), _ref(7, 99, b"train", [_sent(b"y", 1)])]
    root = write_fixture(tmp_path / "b", refs=refs)
    with pytest.raises(ReferError, match=r"ref_id 7 names unknown ann_id 99"):
        load_refer(root, "toy", "unc")

    bad = [{"id": 11, "image_id": 1, "category_id": 1, "bbox": [0, 0, 1, 1], "segmentation": [[1, 2, 3, 4, 5]]}]
    root = write_fixture(tmp_path / "c", refs=[_ref(5, 11, b"train", [_sent(b"x", 0)])], annotations=bad)
    with pytest.raises(ReferError, match=r"ref_id 5 \(ann_id 11\): malformed polygon"):
        preprocess(root, "toy", tmp_path / "idx", split_by="unc", progress=False)

    bad = [{"id": 11, "image_id": 1, "category_id": 1, "bbox": [0, 0, 1, 1],
            "segmentation": {"size": [H + 1, W], "counts": [H * W]}}]
    root = write_fixture(tmp_path / "d", refs=[_ref(6, 11, b"train", [_sent(b"x", 0)])], annotations=bad)
    with pytest.raises(ReferError, match=r"ref_id 6 \(ann_id 11\): RLE size"):
        preprocess(root, "toy", tmp_path / "idx", split_by="unc", progress=False)

    with pytest.raises(ReferError, match=r"refs\(umd\)\.p: not found"):
        load_refer(root, "toy", "umd")


def test_clean_sentence():
    assert clean_sentence("  The\tBIG\u00a0red\ncircle ") == "the big red circle"
    assert clean_sentence("caf\u0065\u0301") == "caf\u00e9"  # NFKC composes


# --- issue 12 items 5, 6 and 13: degenerate polygons, wordings that name the culprit, empty sentences ---

def test_degenerate_polygon_is_skipped_counted_and_reported(tmp_path, caplog):
    a, _, _, third = _hand_masks()
    anns = [
        {"id": 11, "image_id": 1, "category_id": 1, "bbox": [2, 2, 8, 8],
         "segmentation": [_square(2, 2, 10, 10), [40, 40, 41, 41]]},  # a 2-point part, as in COCO
        {"id": 13, "image_id": 1, "category_id": 2, "bbox": [12, 15, 6, 4],
         "segmentation": [[5, 5], _square(12, 15, 18, 19), [1, 1, 2, 2]]},
    ]
    refs = [_ref(0, 11, b"train", [_sent(b"box", 0)]), _ref(1, 13, b"train", [_sent(b"other", 1)])]
    root = write_fixture(tmp_path / "raw", refs=refs, annotations=anns)
    with caplog.at_level("WARNING", logger="remamber.data.preprocess"):
        meta = preprocess(root, "toy", tmp_path / "idx", split_by="unc", progress=False)
    assert meta["skipped"] == {"degenerate_polygons": 3, "objects_with_degenerate_polygons": 2}
    assert read_meta(tmp_path / "idx")["skipped"] == meta["skipped"]
    assert "skipped 3 polygon(s) of fewer than 3 points in 2 object(s)" in caplog.text
    train = pd.read_parquet(tmp_path / "idx" / "train.parquet")
    np.testing.assert_array_equal(decode_mask(train.iloc[0].mask_counts, H, W), a)  # the good part alone
    np.testing.assert_array_equal(decode_mask(train.iloc[1].mask_counts, H, W), third)
    # a clean dataset reports zero
    meta = preprocess(write_fixture(tmp_path / "clean"), "toy", tmp_path / "idx2", split_by="unc", progress=False)
    assert meta["skipped"] == {"degenerate_polygons": 0, "objects_with_degenerate_polygons": 0}


@pytest.mark.parametrize("segmentation", [[[40, 40, 41, 41]], [[1, 1, 2, 2], [3, 3, 3, 3, 3, 3]]])
def test_object_left_with_no_area_is_an_error(tmp_path, segmentation):
    anns = [{"id": 11, "image_id": 1, "category_id": 1, "bbox": [0, 0, 1, 1], "segmentation": segmentation}]
    root = write_fixture(tmp_path, refs=[_ref(4, 11, b"train", [_sent(b"x", 0)])], annotations=anns)
    with pytest.raises(ReferError, match=r"instances\.json: ref_id 4 \(ann_id 11\): no area left after skipping 1 "
                                         r"polygon\(s\) of fewer than 3 points"):
        preprocess(root, "toy", tmp_path / "idx", split_by="unc", progress=False)


def test_garbage_rle_is_reported_as_malformed(tmp_path):
    anns = [{"id": 11, "image_id": 1, "category_id": 1, "bbox": [0, 0, 1, 1],
             "segmentation": {"size": [H, W], "counts": "0O0O0"}}]  # decodes to 4294967293 "pixels"
    root = write_fixture(tmp_path, refs=[_ref(3, 11, b"train", [_sent(b"x", 0)])], annotations=anns)
    with pytest.raises(ReferError, match=r"ref_id 3 \(ann_id 11\): malformed RLE: its counts cover 4294967293 "
                                         r"pixels, more than the 400 of the size of image 1"):
        preprocess(root, "toy", tmp_path / "idx", split_by="unc", progress=False)


def test_wrong_image_height_in_instances_is_blamed_on_the_image(tmp_path):
    root = write_fixture(tmp_path)
    inst = json.loads((root / "toy" / "instances.json").read_text())
    inst["images"][0]["height"] = H + 7
    (root / "toy" / "instances.json").write_text(json.dumps(inst))
    with pytest.raises(ReferError) as info:
        preprocess(root, "toy", tmp_path / "idx", split_by="unc", progress=False)
    msg = str(info.value)
    assert msg.startswith(f"{root / 'toy' / 'instances.json'}: image 1 (COCO_train2014_000000000001.jpg) has "
                          f"width {W}, height {H + 7} there, but ")
    assert f"is {W}x{H} pixels" in msg and "RLE" not in msg
    # without the image file to compare with, the RLE's error still names the image entry
    refer = load_refer(root, "toy", "unc")
    with pytest.raises(ReferError, match=r"RLE size \[20, 20\] \(height, width\) differs from the size of image 1 "
                                         r"\(COCO_train2014_000000000001\.jpg\) in instances\.json, \(27, 20\)"):
        refer.ref_rle(next(r for r in refer.refs if r["ann_id"] == 12))


def test_unreadable_image_is_named_at_preprocessing(tmp_path):
    root = write_fixture(tmp_path)
    (root / "train2014" / "COCO_train2014_000000000001.jpg").write_bytes(b"not a jpeg at all")
    with pytest.raises(ReferError, match=r"COCO_train2014_000000000001\.jpg: image of ref_id 0 \(image_id 1\) is "
                                         r"not a readable image"):
        preprocess(root, "toy", tmp_path / "idx", split_by="unc", progress=False)


@pytest.mark.parametrize("raw", [b"", b"   \t ", "\u200b\n".encode("utf-8")])
def test_empty_sentence_is_an_error_naming_the_ref(tmp_path, raw):
    refs = [_ref(0, 11, b"train", [_sent(b"fine", 0)]), _ref(9, 12, b"train", [_sent(b"ok", 1), _sent(raw, 2)])]
    root = write_fixture(tmp_path, refs=refs)
    with pytest.raises(ReferError, match=r"refs\(unc\)\.p: ref_id 9 has an empty sentence \(sent_id 2"):
        preprocess(root, "toy", tmp_path / "idx", split_by="unc", progress=False)
    assert not (tmp_path / "idx" / "meta.json").exists()


def test_text_field_sent_feeds_refers_normalised_sentence(tmp_path):
    """The authors feed refer's `sent` (lower-cased, punctuation removed by refer), not `raw`."""
    refs = [
        _ref(0, 11, b"train", [{b"raw": b"The man, on the LEFT!", b"sent": b"the man on the left", b"sent_id": 0,
                                b"tokens": [b"the"]}, _sent(b"crowd", 1)]),
        _ref(1, 12, b"train", [_sent(b"crowd on the left", 2)]),
        _ref(2, 13, b"val", [_sent(b"small box", 3), _sent(b"bottom right box", 4), _sent(b"it", 5)]),
    ]
    root = write_fixture(tmp_path / "raw", refs=refs)
    counts = {"train": {"objects": 2, "images": 1, "sentences": 3}, "val": EXPECTED["val"]}
    raw = preprocess(root, "toy", tmp_path / "raw_idx", split_by="unc", expected_counts=counts, progress=False)
    sent = preprocess(root, "toy", tmp_path / "sent_idx", split_by="unc", expected_counts=counts, progress=False,
                      text_field="sent")
    assert (raw["text_field"], sent["text_field"]) == ("raw", "sent")
    row_raw = pd.read_parquet(tmp_path / "raw_idx" / "train.parquet").iloc[0]
    row_sent = pd.read_parquet(tmp_path / "sent_idx" / "train.parquet").iloc[0]
    assert list(row_raw.sentences) == ["the man, on the left!", "crowd"]
    assert list(row_sent.sentences) == ["the man on the left", "crowd"]
    assert list(row_sent.sentences_raw) == ["The man, on the LEFT!", "crowd"]
    assert sent["data_hash"] != raw["data_hash"]
    with pytest.raises(ValueError, match="unknown text_field 'tokens'"):
        preprocess(root, "toy", tmp_path / "x", split_by="unc", expected_counts=counts, progress=False,
                   text_field="tokens")
