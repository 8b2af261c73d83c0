"""Evaluation on a split other than val, prediction PNGs, load_model, and the MLflow runs they log."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image

from remamber.config import ExperimentConfig
from remamber.engine.checkpoint import file_sha256, load_model
from remamber.engine.evaluate import evaluate
from remamber.engine.predict import predict
from remamber.data.preprocess import data_hash
from remamber.engine.jobs import out_dir_id
from remamber.engine.train import train

RES = 32
CONTRACT_KEYS = {"dataset", "variant", "resolution", "split", "protocol", "n", "oIoU", "mIoU", "prec@50",
                 "prec@60", "prec@70", "prec@80", "prec@90", "checkpoint", "checkpoint_sha256", "config_name",
                 "text", "index", "index_data_hash"}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One epoch of the tiny twister on the tiny synthetic RefCOCO, tracked in a temporary SQLite store."""
    from remamber.data.preprocess import preprocess
    from remamber.data.synth import write_synthetic

    root = tmp_path_factory.mktemp("engine_eval")
    write_synthetic(root / "raw", seed=0, size="tiny", progress=False)
    preprocess(root / "raw", "refcoco", root / "processed" / "refcoco", progress=False)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    raw = {
        "name": "evaltest", "results": str(root / "results"),
        "data": {"source": "synthetic", "raw": str(root / "raw"), "processed": str(root / "processed"),
                 "synth_size": "tiny", "synth_seed": 0, "mask_mode": "union",
                 "datasets": {"refcoco": {"split_by": "unc", "splits": ["val", "testA", "testB"]}}},
        "model": {"backbone": "vmamba_tiny_test", "text_encoder": "tiny-random-bert", "pretrained_backbone": None,
                  "max_text_len": 12, "local_dim": 32, "channel_scan_width": 32, "channel_scan_grid": 4},
        "train": {"epochs": 1, "global_batch_size": 4, "per_device_batch_size": 4, "lr_new": 1e-3,
                  "lr_pretrained": 2e-4, "min_lr": 1e-5, "weight_decay": 1e-4, "betas": [0.9, 0.999],
                  "amp": False, "ema_decay": None, "grad_clip": None, "seed": 0, "num_workers": 0,
                  "val_subset": 2, "deterministic": True},
        "evaluate": {"protocol": "original", "batch_size": 3, "num_workers": 0},
        "tracking": {"enabled": True, "uri": uri, "on_error": "fail"},
        "experiments": {"resolutions": {"low": RES},
                        "tables": {"table1": {"resolution": "low", "datasets": ["refcoco"],
                                              "variants": ["twister"]},
                                   "table3": {"resolution": "low", "datasets": ["refcoco"],
                                              "variants": ["twister"]}}},
    }
    cfg_path = root / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(raw, sort_keys=False))
    cfg = ExperimentConfig.from_yaml(cfg_path)
    result = train(cfg, "refcoco", "twister", RES, root / "model")
    return {"root": root, "cfg": cfg, "uri": uri, "result": result, "best": Path(result["best"]),
            "scored": _calibrated_copy(Path(result["best"]), root)}


def _calibrated_copy(best: Path, root: Path) -> Path:
    """After one epoch the tiny model predicts (almost) nothing, so every IoU would be 0 and a comparison
    of metrics could not fail. Shift the logit bias to the median logit of a few test images, so about
    half the pixels are foreground and the IoUs spread out; save it through the engine's own API."""
    from remamber.data.datasets import RefSegDataset
    from remamber.engine.checkpoint import save_checkpoint

    model, meta = load_model(best)
    ds = RefSegDataset(root / "processed" / "refcoco", "testB", "eval", RES, root / "raw")
    with torch.no_grad():
        items = [ds[k] for k in range(min(4, len(ds)))]
        ids, am = model.tokenize([it["text"] for it in items])
        logits = model(torch.stack([it["image"] for it in items]), ids, am)
        head = dict(model.named_parameters())["decoder.head.bias"]
        head -= logits.median()
    path = best.parent / "calibrated.pt"  # beside best.pt: its evaluations belong to that training's run
    save_checkpoint(path, model, meta)
    return path


def _reference_metrics(model, index_dir, data_root, split, protocol):
    """Independent scoring, one sample at a time, with the definitions written out inline."""
    from remamber.data.datasets import RefSegDataset

    ds = RefSegDataset(index_dir, split, "eval", RES, data_root)
    inter, union, ious = 0, 0, []
    with torch.no_grad():
        for k in range(len(ds)):
            item = ds[k]
            ids, mask = model.tokenize([item["text"]])
            logits = model(item["image"][None], ids, mask)
            if protocol == "original":
                logits = F.interpolate(logits, size=item["orig_size"], mode="nearest")
                target = item["orig_mask"]
            else:
                target = item["mask"][0].numpy() > 0.5
            pred = (torch.sigmoid(logits[0, 0]) > 0.5).numpy()
            i, u = int((pred & target).sum()), int((pred | target).sum())
            inter, union = inter + i, union + u
            ious.append(i / u if u else 0.0)
    return len(ds), 100 * inter / union, 100 * float(np.mean(ious)), 100 * float(np.mean(np.array(ious) >= 0.5))


def test_evaluate_testB_writes_contract_metrics_and_nested_run(trained, tmp_path):
    from mlflow import MlflowClient

    root, best, scored = trained["root"], trained["best"], trained["scored"]
    index_dir, data_root = root / "processed" / "refcoco", root / "raw"
    out = tmp_path / "metrics" / "testB.json"
    record = evaluate(scored, "testB", out, batch_size=1, tracking_uri=trained["uri"])
    written = json.loads(out.read_text())
    assert written == record and set(written) == CONTRACT_KEYS
    assert (written["dataset"], written["variant"], written["resolution"], written["split"]) == \
        ("refcoco", "twister", RES, "testB")
    assert written["protocol"] == "original" and written["config_name"] == "evaltest"
    assert written["checkpoint_sha256"] == file_sha256(scored)
    assert written["index"] == str(index_dir) and written["index_data_hash"] == data_hash(index_dir)
    meta = json.loads((index_dir / "meta.json").read_text())
    assert written["n"] == meta["counts"]["testB"]["sentences"]  # every sentence of every object

    model, ck_meta = load_model(scored)
    assert ck_meta["dataset"] == "refcoco" and ck_meta["resolution"] == RES and ck_meta["weights"] == "raw"
    n, o_iou, m_iou, p50 = _reference_metrics(model, index_dir, data_root, "testB", "original")
    assert written["n"] == n
    assert written["oIoU"] == pytest.approx(o_iou, abs=1e-9)
    assert written["mIoU"] == pytest.approx(m_iou, abs=1e-9)
    assert written["prec@50"] == pytest.approx(p50, abs=1e-9)
    print(f"testB (calibrated tiny model): oIoU {o_iou:.2f}, mIoU {m_iou:.2f}, prec@50 {p50:.1f}")
    assert 0 < written["mIoU"] < 100 and written["oIoU"] != written["mIoU"]  # a comparison that can fail

    # LAVT's protocol on the same split, at the input resolution.
    lavt = evaluate(scored, "testB", tmp_path / "testB_input.json", protocol="input", batch_size=1,
                    tracking=False)
    n, o_iou, m_iou, _ = _reference_metrics(model, index_dir, data_root, "testB", "input")
    assert lavt["protocol"] == "input" and lavt["n"] == n
    assert lavt["oIoU"] == pytest.approx(o_iou, abs=1e-9) and lavt["mIoU"] == pytest.approx(m_iou, abs=1e-9)

    # MLflow: the training run (experiment = first table) and the nested testB run under it.
    client = MlflowClient(tracking_uri=trained["uri"])
    exp = client.get_experiment_by_name("table1")
    runs = client.search_runs([exp.experiment_id])
    parent = [r for r in runs if r.data.tags.get("mlflow.runName") == "evaltest/refcoco/twister/32"]
    assert len(parent) == 1
    parent = parent[0]
    # Keyed by output folder too: the key is "<run key>@<id of the folder>".
    assert parent.data.tags["remamber.run_key"] == \
        f"evaltest/refcoco/twister/32@{out_dir_id(trained['root'] / 'model')}"
    # The UI: a model-training experiment; Source and Version columns; the Dataset column.
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    assert parent.data.tags["mlflow.source.name"].startswith(
        f"remamber@{parent.data.tags['mlflow.source.git.commit'][:10]}")
    # (HEAD may move while the suite runs: other commits land; the commit's origin is tested in tracking.)
    assert re.fullmatch(r"[0-9a-f]{40}", parent.data.tags["mlflow.source.git.commit"])
    [train_input] = parent.inputs.dataset_inputs
    assert (train_input.dataset.name, train_input.dataset.digest) == ("refcoco", data_hash(index_dir)[:16])
    assert json.loads(train_input.dataset.source) == {"uri": str(index_dir)}
    assert {t.key: t.value for t in train_input.tags} == {"mlflow.data.context": "train",
                                                          "remamber.data_hash": data_hash(index_dir)}
    assert parent.data.params["train.epochs"] == "1" and parent.data.params["job.variant"] == "twister"
    assert parent.data.tags["remamber.tables"] == "table1,table3"
    assert parent.data.tags["remamber.config_hash"] == trained["cfg"].config_hash()
    assert parent.data.tags["remamber.checkpoint_sha256"] == file_sha256(best)
    assert [m.step for m in client.get_metric_history(parent.info.run_id, "val_mIoU")] == [1]
    assert "history.json" in [a.path for a in client.list_artifacts(parent.info.run_id)]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 1
    assert children[0].data.metrics["mIoU"] == pytest.approx(written["mIoU"])
    assert children[0].data.tags["remamber.data_hash"] == data_hash(index_dir)
    [eval_input] = children[0].inputs.dataset_inputs
    assert eval_input.dataset.digest == data_hash(index_dir)[:16]


def test_eval_provenance_is_the_evaluated_index(trained, tmp_path, monkeypatch):
    """Issue 12 item 11: evaluated on another index than the training's, the eval run's data-hash tag and
    metrics.json name that index, not the training data."""
    import shutil

    from mlflow import MlflowClient

    root = trained["root"]
    other = tmp_path / "other-index"
    shutil.copytree(root / "processed" / "refcoco", other)
    shutil.copy(other / "testB.parquet", other / "extra.parquet")  # other bytes -> another data hash
    assert data_hash(other) != data_hash(root / "processed" / "refcoco")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", trained["uri"])
    record = evaluate(trained["scored"], "testB", tmp_path / "m.json", index_dir=other, batch_size=4)
    assert record["index"] == str(other) and record["index_data_hash"] == data_hash(other)
    client = MlflowClient(tracking_uri=trained["uri"])
    runs = client.search_runs([client.get_experiment_by_name("table1").experiment_id],
                              filter_string=f"tags.`remamber.data_hash` = '{data_hash(other)}'")
    assert [r.data.tags["remamber.split"] for r in runs] == ["testB"]
    assert runs[0].data.tags["remamber.train_data_hash"] == data_hash(root / "processed" / "refcoco")


def test_checkpoint_does_not_choose_the_tracking_store(trained, tmp_path, monkeypatch):
    """Issue 12 item 9: the store named in a checkpoint's config is never used (nor created); the user's
    MLFLOW_TRACKING_URI is."""
    from remamber.engine.checkpoint import read_checkpoint
    from mlflow import MlflowClient

    state = read_checkpoint(trained["scored"])
    planted = tmp_path / "planted.db"
    state["meta"]["config"]["tracking"]["uri"] = f"sqlite:///{planted}"
    edited = tmp_path / "edited.pt"
    torch.save(state, edited)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", trained["uri"])
    evaluate(edited, "testA", tmp_path / "testA.json", batch_size=4)
    assert not planted.exists()
    client = MlflowClient(tracking_uri=trained["uri"])
    runs = client.search_runs([client.get_experiment_by_name("table1").experiment_id],
                              filter_string="tags.`remamber.split` = 'testA'")
    assert len(runs) == 1 and runs[0].data.tags["remamber.checkpoint_sha256"] == file_sha256(edited)


def test_evaluate_checks_destination_before_scoring(trained, tmp_path, monkeypatch):
    """Issue 12 item 14: --out naming a folder fails at once (nothing scored) and leaves no temporary."""
    import remamber.engine.evaluate as evaluate_module

    def never(*args, **kwargs):
        raise AssertionError("scored before the destination was checked")

    monkeypatch.setattr(evaluate_module, "score_loader", never)
    dest = tmp_path / "outdir"
    dest.mkdir()
    with pytest.raises(ValueError, match=r"--out .*outdir: is a folder"):
        evaluate(trained["scored"], "testB", dest, tracking=False)
    assert list(tmp_path.iterdir()) == [dest] and list(dest.iterdir()) == []


def test_evaluate_unknown_split_is_named(trained, tmp_path):
    with pytest.raises(FileNotFoundError, match="no index for split 'testC'"):
        evaluate(trained["best"], "testC", tmp_path / "x.json", tracking=False)
    assert not (tmp_path / "x.json").exists()


def test_predict_writes_image_sized_pngs(trained, tmp_path):
    root, best = trained["root"], trained["scored"]
    image_path = sorted((root / "raw" / "train2014").glob("*.jpg"))[0]
    image = Image.open(image_path).convert("RGB")
    text = "the red circle on the left"
    out = tmp_path / "pred" / "overlay.png"
    mask = predict(best, image_path, text, out)
    mask_png = Image.open(tmp_path / "pred" / "overlay_mask.png")
    overlay_png = Image.open(out)
    assert mask_png.size == overlay_png.size == image.size
    mask_arr = np.asarray(mask_png)
    assert set(np.unique(mask_arr)) <= {0, 255}
    assert np.array_equal(mask_arr == 255, mask)
    # Outside the mask the overlay is the image itself; inside it is tinted.
    over, img = np.asarray(overlay_png), np.asarray(image)
    assert np.array_equal(over[~mask], img[~mask])
    assert mask.any() and not mask.all()
    assert not np.array_equal(over[mask], img[mask])
    # The same preprocessing and threshold as evaluation, written out independently.
    from remamber.data.transforms import image_to_tensor

    model, _ = load_model(best)
    with torch.no_grad():
        ids, am = model.tokenize([text])
        logits = model(image_to_tensor(image, RES)[None], ids, am)
    expected = (torch.sigmoid(F.interpolate(logits, size=(image.height, image.width), mode="nearest"))[0, 0]
                > 0.5).numpy()
    assert np.array_equal(mask, expected)

    custom = tmp_path / "m.png"
    predict(best, image_path, text, tmp_path / "o.png", mask_out=custom)
    assert np.array_equal(np.asarray(Image.open(custom)), mask_arr)
    with pytest.raises(FileNotFoundError, match="nope.jpg: image not found"):
        predict(best, tmp_path / "nope.jpg", text, tmp_path / "x.png")
    with pytest.raises(ValueError, match="non-empty expression"):
        predict(best, image_path, "  ", tmp_path / "x.png")
