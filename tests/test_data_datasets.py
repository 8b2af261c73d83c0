"""RefSegDataset / collate_batch on the tiny synthetic data."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from remamber.data.datasets import RefSegDataset, collate_batch
from remamber.data.preprocess import preprocess
from remamber.data.refer import decode_mask
from remamber.data.synth import write_synthetic

R = 48
MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    write_synthetic(root / "raw", seed=0, size="tiny", progress=False)
    preprocess(root / "raw", "refcoco", root / "idx", progress=False)
    return root / "idx", root / "raw"


def test_train_mode_draws_are_reproducible_per_epoch(tiny):
    idx, raw = tiny
    table = pd.read_parquet(idx / "train.parquet")
    ds = RefSegDataset(idx, "train", "train", R, raw, seed=0)
    assert len(ds) == ds.num_objects == len(table)
    assert ds.num_sentences == sum(len(s) for s in table.sentences)

    def draws(d, epoch, order):
        d.set_epoch(epoch)
        return {i: (d[i]["text"], d[i]["sent_id"]) for i in order}

    forward = range(len(ds))
    e0 = draws(ds, 0, forward)
    assert e0 == draws(ds, 0, reversed(forward))  # independent of access order (hence of workers)
    other = RefSegDataset(idx, "train", "train", R, raw, seed=0)
    assert draws(other, 0, forward) == e0
    e1 = draws(ds, 1, forward)
    multi = [i for i in forward if len(table.sentences[i]) > 1]
    assert multi, "the fixture needs objects with several sentences"
    assert any(e0[i] != e1[i] for i in multi)
    seeded = RefSegDataset(idx, "train", "train", R, raw, seed=5)
    assert any(draws(seeded, 0, forward)[i] != e0[i] for i in multi) or \
        any(draws(seeded, 1, forward)[i] != e1[i] for i in multi)
    for i in forward:  # a draw is one of the object's own sentences, with its id
        for text, sent_id in (e0[i], e1[i]):
            j = list(table.sent_ids[i]).index(sent_id)
            assert text == table.sentences[i][j]
    # over many epochs every sentence of a multi-sentence object is drawn
    i = multi[0]
    seen = {draws(ds, e, [i])[i][1] for e in range(40)}
    assert seen == set(table.sent_ids[i])


def test_eval_mode_yields_every_sentence_in_a_fixed_order(tiny):
    idx, raw = tiny
    table = pd.read_parquet(idx / "val.parquet")
    ds = RefSegDataset(idx, "val", "eval", R, raw)
    expected = [(r, s) for r, ids in zip(table.ref_id, table.sent_ids) for s in ids]
    assert len(ds) == ds.num_sentences == len(expected)
    assert ds.num_objects == len(table)
    assert [(ds[i]["ref_id"], ds[i]["sent_id"]) for i in range(len(ds))] == expected
    sub = RefSegDataset(idx, "val", "eval", R, raw, max_items=3)
    assert len(sub) == 3
    assert [sub[i]["sent_id"] for i in range(3)] == [s for _, s in expected[:3]]


def test_item_shapes_dtypes_and_normalisation(tiny):
    idx, raw = tiny
    ds = RefSegDataset(idx, "val", "eval", R, raw)
    row = pd.read_parquet(idx / "val.parquet").iloc[0]
    item = ds[0]
    assert item["image"].dtype == torch.float32 and item["image"].shape == (3, R, R)
    assert item["mask"].dtype == torch.float32 and item["mask"].shape == (1, R, R)
    assert set(item["mask"].unique().tolist()) == {0.0, 1.0}
    assert item["orig_mask"].dtype == np.bool_ and item["orig_mask"].shape == (row.height, row.width)
    assert item["orig_size"] == (row.height, row.width)
    assert item["image_path"] == row.image_path
    assert isinstance(item["text"], str) and isinstance(item["ref_id"], int)
    # independent reference: PIL bilinear resize, /255, ImageNet mean/std, CHW
    pil = Image.open(raw / row.image_path).convert("RGB").resize((R, R), Image.BILINEAR)
    ref = (np.asarray(pil, np.float32) / 255.0 - MEAN) / STD
    np.testing.assert_allclose(item["image"].numpy(), ref.transpose(2, 0, 1), atol=1e-6)
    assert abs(float(item["image"][0].mean()) - float(ref[..., 0].mean())) < 1e-5
    # nearest resize of the original mask
    gt = decode_mask(row.mask_counts, row.height, row.width)
    np.testing.assert_array_equal(item["orig_mask"], gt)
    near = np.asarray(Image.fromarray(gt.astype(np.uint8) * 255).resize((R, R), Image.NEAREST)) > 0
    np.testing.assert_array_equal(item["mask"][0].numpy() == 1.0, near)
    assert 0.005 < float(item["mask"].mean()) < 0.5


def test_collate_and_dataloader_with_two_workers(tiny):
    idx, raw = tiny
    ds = RefSegDataset(idx, "train", "train", R, raw, seed=1)
    ds.set_epoch(2)
    serial = list(DataLoader(ds, batch_size=4, shuffle=False, num_workers=0, collate_fn=collate_batch))
    parallel = list(DataLoader(ds, batch_size=4, shuffle=False, num_workers=2, collate_fn=collate_batch))
    assert len(serial) == len(parallel) == -(-len(ds) // 4)
    for a, b in zip(serial, parallel):
        assert set(a) == {"image", "mask", "text", "ref_id", "sent_id"}
        assert a["image"].shape[1:] == (3, R, R) and a["mask"].shape[1:] == (1, R, R)
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])
        assert a["text"] == b["text"] and a["sent_id"] == b["sent_id"]
        assert isinstance(a["text"], list) and isinstance(a["ref_id"], list)
    ev = RefSegDataset(idx, "val", "eval", R, raw)
    batch = collate_batch([ev[0], ev[1]])
    assert batch["image"].shape == (2, 3, R, R)
    assert isinstance(batch["orig_mask"], list) and batch["orig_mask"][0].dtype == np.bool_
    assert batch["orig_size"] == [ev[0]["orig_size"], ev[1]["orig_size"]]


def test_bad_inputs_are_named(tiny, tmp_path):
    idx, raw = tiny
    with pytest.raises(FileNotFoundError, match=r"testC\.parquet: no index for split 'testC'; available: \["):
        RefSegDataset(idx, "testC", "eval", R, raw)
    with pytest.raises(ValueError, match=r"unknown mode 'test'"):
        RefSegDataset(idx, "val", "test", R, raw)
    with pytest.raises(ValueError, match="resolution"):
        RefSegDataset(idx, "val", "eval", 0, raw)
    with pytest.raises(FileNotFoundError, match=r"meta\.json: not found"):
        RefSegDataset(tmp_path, "val", "eval", R, raw)
    ds = RefSegDataset(idx, "val", "eval", R, tmp_path)  # wrong data_root
    with pytest.raises(FileNotFoundError, match=r"image of ref_id \d+ is missing"):
        ds[0]


# --- issue 12 item 13: bad data found early and named -----------------------------------------------

import shutil  # noqa: E402

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from remamber.data.checks import (ImageFileError, MissingImageError, check_images,  # noqa: E402
                                  count_long_sentences)
from remamber.data.preprocess import IndexDataError, index_path  # noqa: E402


def _with_cut_image(tiny, tmp_path, keep):
    """A copy of the raw data whose first val image is cut to keep(size) bytes: (index, dataset, image)."""
    idx, raw = tiny
    copy = tmp_path / "raw"
    shutil.copytree(raw, copy)
    ds = RefSegDataset(idx, "val", "eval", R, copy)
    victim = copy / ds[0]["image_path"]
    victim.write_bytes(victim.read_bytes()[: keep(victim.stat().st_size)])
    return idx, ds, victim


def test_truncated_image_names_the_file(tiny, tmp_path):
    idx, ds, victim = _with_cut_image(tiny, tmp_path, keep=lambda size: size // 2)  # a cut download
    with pytest.raises(ImageFileError, match=rf"{victim.name}: image of ref_id \d+ cannot be read \(image file is "
                                             rf"truncated"):
        ds[0]
    victim.write_bytes(b"GIF89a not really")
    with pytest.raises(ImageFileError, match=rf"{victim.name}: image of ref_id \d+ cannot be read"):
        ds[0]


def test_check_images_finds_every_missing_image_of_the_job_splits(tiny, tmp_path):
    idx, raw = tiny
    val_images = sorted(set(pd.read_parquet(idx / "val.parquet").image_path))
    train_images = set(pd.read_parquet(idx / "train.parquet").image_path)
    expected = len(train_images | set(val_images))
    assert check_images(idx, ["train", "val"], raw) == expected
    copy = tmp_path / "raw"
    shutil.copytree(raw, copy)
    only_val = [p for p in val_images if p not in train_images]
    assert only_val, "the fixture needs a val image that no train object uses"
    (copy / only_val[0]).unlink()
    assert check_images(idx, ["train"], copy) == len(train_images)  # a job that reads train only is fine
    with pytest.raises(MissingImageError, match=rf"1 image\(s\) named by the index .* are missing \(val: 1\), "
                                                rf"e\.g\. .*{only_val[0]}"):
        check_images(idx, ["train", "val"], copy)


def test_empty_sentence_in_an_index_names_index_and_row(tiny, tmp_path):
    idx, raw = tiny
    bad = tmp_path / "idx"
    shutil.copytree(idx, bad)
    table = pq.read_table(bad / "val.parquet").to_pylist()
    table[2]["sentences"] = [*table[2]["sentences"][:-1], "  "]
    pq.write_table(pa.Table.from_pylist(table, schema=pq.read_schema(bad / "val.parquet")), bad / "val.parquet")
    j = len(table[2]["sentences"]) - 1
    with pytest.raises(IndexDataError, match=rf"val\.parquet: row 2 \(ref_id {table[2]['ref_id']}\) has an empty "
                                             rf"sentence \(sentence {j}, sent_id {table[2]['sent_ids'][j]}\)"):
        RefSegDataset(bad, "val", "eval", R, raw)


@pytest.mark.parametrize("split", ["../../x", "../idx/val", "val/..", "", "val.parquet", "a b"])
def test_split_that_is_not_a_plain_name_is_refused(tiny, split):
    idx, raw = tiny
    with pytest.raises(IndexDataError, match="is not a plain split name"):
        index_path(idx, split)
    with pytest.raises(IndexDataError, match="is not a plain split name"):
        RefSegDataset(idx, split, "eval", R, raw)
    assert index_path(idx, "testA") == idx / "testA.parquet"


def test_long_sentences_are_counted_and_reported(caplog):
    words = ["one two", "one two three four five", "a b c d e f", ""]

    def lengths(texts):
        return [len(t.split()) + 2 for t in texts]  # + [CLS] and [SEP], as a BERT tokenizer counts
    with caplog.at_level("WARNING", logger="remamber.data.checks"):
        assert count_long_sentences(words, lengths, 6, "idx/val.parquet", batch=3) == 2  # 7 and 8 tokens
    assert "idx/val.parquet: 2 of 4 sentences are longer than max_text_len = 6 tokens (longest 8)" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="remamber.data.checks"):
        assert count_long_sentences(words, lengths, 8, "x", batch=2) == 0
    assert caplog.text == ""


def test_long_sentences_with_the_demo_tokenizer(tiny):
    from remamber.data.checks import hf_token_lengths, split_sentences
    from remamber.models.text import _bert_tokenizer, minilm_dir

    idx, _ = tiny
    tokenizer = _bert_tokenizer(minilm_dir())
    lengths = hf_token_lengths(tokenizer)
    assert lengths(["the red circle", "left"]) == [5, 3]  # [CLS] the red circle [SEP]
    sentences = split_sentences(idx, "val")
    assert len(sentences) == sum(len(s) for s in pd.read_parquet(idx / "val.parquet").sentences)
    true_lengths = [len(tokenizer(s)["input_ids"]) for s in sentences]
    for max_len in (4, 6, 20):
        assert count_long_sentences(sentences, lengths, max_len, "val") == sum(n > max_len for n in true_lengths)


def test_decoded_cache_gives_the_same_items(tiny):
    idx, raw = tiny
    plain = RefSegDataset(idx, "train", "train", R, raw, seed=0)
    cached = RefSegDataset(idx, "train", "train", R, raw, seed=0, cache_max_bytes=1 << 30)
    small = RefSegDataset(idx, "train", "train", R, raw, seed=0, cache_max_bytes=16)  # does not fit: off
    assert cached._decoded == {} and small._decoded is None and plain._decoded is None
    for epoch in (0, 1):  # second epoch served from memory, with that epoch's sentence draw
        for d in (plain, cached):
            d.set_epoch(epoch)
        for i in range(len(plain)):
            a, b = plain[i], cached[i]
            assert a.keys() == b.keys() and a["text"] == b["text"] and a["sent_id"] == b["sent_id"]
            assert torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])
    assert len(cached._decoded) == len(cached)


def test_worker_errors_reach_the_cli_as_the_original_message(tiny, tmp_path):
    """torch folds a worker's traceback into the message it re-raises; the CLI keeps the original line."""
    from remamber.cli import _user_message

    idx, ds, victim = _with_cut_image(tiny, tmp_path, keep=lambda size: 200)
    with pytest.raises(ImageFileError) as info:
        list(DataLoader(ds, batch_size=2, num_workers=1, collate_fn=collate_batch))
    assert "Original Traceback" in str(info.value)
    message = _user_message(info.value)
    assert message.startswith(f"{victim}: image of ref_id ") and message.endswith("(in a data-loading worker)")
    assert "\n" not in message and "Traceback" not in message
