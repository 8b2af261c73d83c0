"""Engine building blocks on toy modules: optimizer groups, schedule, EMA, sharding, RNG and checkpoint I/O."""

import math
import random
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from remamber.engine.checkpoint import (
    CheckpointError, atomic_torch_save, file_sha256, read_checkpoint, save_checkpoint,
)
from remamber.engine.distributed import (
    GlobalBatchSampler, batch_split, epoch_seed, rng_state, set_rng_state,
)
from remamber.engine.optim import CosineEpochSchedule, ModelEMA, build_optimizer, cosine_lr, optimizer_groups


def _train_cfg(**kw):
    base = dict(lr_new=1e-3, lr_pretrained=2e-4, weight_decay=1e-4, betas=(0.9, 0.999), min_lr=1e-5,
                weight_decay_scope="weights")
    base.update(kw)
    return SimpleNamespace(**base)


class _Toy(nn.Module):
    def __init__(self, leave_out=False):
        super().__init__()
        self.text = nn.Linear(3, 4)
        self.backbone = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
        self.head = nn.Linear(4, 1)
        self.A_log = nn.Parameter(torch.zeros(4, 1))
        self.A_log._no_weight_decay = True
        self.leave_out = leave_out

    def param_groups(self):
        new = list(self.head.parameters()) + ([] if self.leave_out else [self.A_log])
        return {"text_encoder": list(self.text.parameters()), "backbone": list(self.backbone.parameters()),
                "new": new}


def _group(groups, name):
    return next(g for g in groups if g["name"] == name)


def test_optimizer_groups_lrs_and_decay():
    model = _Toy()
    groups = optimizer_groups(model, _train_cfg(), pretrained_backbone=True)
    assert _group(groups, "text_encoder/decay")["lr"] == 2e-4
    assert _group(groups, "backbone/decay")["lr"] == 2e-4
    assert _group(groups, "new/decay")["lr"] == 1e-3
    # Biases, norm weights and parameters marked _no_weight_decay get no decay.
    assert _group(groups, "backbone/no_decay")["weight_decay"] == 0.0
    assert len(_group(groups, "backbone/no_decay")["params"]) == 3  # linear bias, LN weight, LN bias
    assert any(p is model.A_log for p in _group(groups, "new/no_decay")["params"])
    assert _group(groups, "new/decay")["weight_decay"] == 1e-4
    assert [p for p in _group(groups, "new/decay")["params"]] == [model.head.weight]
    # A backbone trained from scratch counts as new.
    scratch = optimizer_groups(model, _train_cfg(), pretrained_backbone=False)
    assert _group(scratch, "backbone/decay")["lr"] == 1e-3
    assert _group(scratch, "text_encoder/decay")["lr"] == 2e-4
    with pytest.raises(ValueError, match="1 trainable parameters are in none"):
        optimizer_groups(_Toy(leave_out=True), _train_cfg(), pretrained_backbone=True)


def test_cosine_schedule_per_epoch():
    assert cosine_lr(1e-3, 1e-5, 0, 4) == 1e-3
    assert cosine_lr(1e-3, 1e-5, 2, 4) == pytest.approx((1e-3 + 1e-5) / 2, rel=1e-12)
    assert cosine_lr(1e-3, 1e-5, 1, 4) == pytest.approx(1e-5 + (1e-3 - 1e-5) * (1 + math.cos(math.pi / 4)) / 2)
    model = _Toy()
    opt = torch.optim.AdamW(optimizer_groups(model, _train_cfg(), True))
    sched = CosineEpochSchedule(opt, 1e-5, 4)
    sched.set_epoch(3)
    lrs = {g["name"]: g["lr"] for g in opt.param_groups}
    assert lrs["new/decay"] == pytest.approx(cosine_lr(1e-3, 1e-5, 3, 4))
    assert lrs["text_encoder/decay"] == pytest.approx(cosine_lr(2e-4, 1e-5, 3, 4))
    opt2 = torch.optim.AdamW(optimizer_groups(model, _train_cfg(), True))
    CosineEpochSchedule(opt2, 0.0, 1).load_state_dict(sched.state_dict())
    assert [g["lr"] for g in opt2.param_groups] == [g["lr"] for g in opt.param_groups]


def test_fused_adamw_steps_as_the_per_tensor_reference():
    """build_optimizer takes the fused AdamW on CPU; its steps equal the per-tensor loop to float rounding."""
    torch.manual_seed(0)
    fused_model, loop_model = _Toy(), _Toy()
    loop_model.load_state_dict(fused_model.state_dict())
    start = {k: v.clone() for k, v in fused_model.state_dict().items()}
    fused = build_optimizer(fused_model, _train_cfg(), True)
    assert fused.defaults["fused"] is True
    loop = torch.optim.AdamW(optimizer_groups(loop_model, _train_cfg(), True), lr=1e-3, betas=(0.9, 0.999),
                             weight_decay=1e-4, foreach=False)
    for _ in range(5):
        grads = [torch.randn_like(p) for p in fused_model.parameters()]
        for model, opt in ((fused_model, fused), (loop_model, loop)):
            for p, g in zip(model.parameters(), grads):
                p.grad = g.clone()
            opt.step()
    for a, b in zip(fused_model.parameters(), loop_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert all(not torch.equal(v, start[k]) for k, v in fused_model.state_dict().items())  # every one moved


def test_ema_update_hand_computed():
    model = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema = ModelEMA(model, decay=0.9)
    with torch.no_grad():
        model.weight.fill_(3.0)
    ema.update(model)  # 0.9 * 1 + 0.1 * 3 = 1.2
    assert ema.module.weight.item() == pytest.approx(1.2)
    ema.update(model)  # 0.9 * 1.2 + 0.1 * 3 = 1.38
    assert ema.module.weight.item() == pytest.approx(1.38)
    assert not ema.module.weight.requires_grad


def test_sharding_keeps_the_global_batch():
    n, per_device, world = 23, 2, 2
    single = list(GlobalBatchSampler(n, per_device, 1, 0, accumulation=world, seed=5, epoch=3))
    ranks = [list(GlobalBatchSampler(n, per_device, world, r, accumulation=1, seed=5, epoch=3))
             for r in range(world)]
    steps = n // (per_device * world)
    assert len(single) == steps * world and all(len(r) == steps for r in ranks)
    for s in range(steps):
        one = sorted(single[2 * s] + single[2 * s + 1])
        many = sorted(ranks[0][s] + ranks[1][s])
        assert one == many  # the same items in every global batch
        assert single[2 * s] == ranks[0][s] and single[2 * s + 1] == ranks[1][s]
    # The micro-batch's place in the epoch (which seeds dropout/drop-path) is the same for both.
    one = GlobalBatchSampler(n, per_device, 1, 0, accumulation=world, seed=5, epoch=3)
    split = [GlobalBatchSampler(n, per_device, world, r, accumulation=1, seed=5, epoch=3) for r in range(world)]
    for r in range(world):
        for local, batch in enumerate(split[r]):
            assert single[split[r].global_micro_index(local)] == batch
    assert [one.global_micro_index(i) for i in range(len(one))] == list(range(len(one)))
    flat = [i for b in single for i in b]
    assert len(set(flat)) == len(flat) == steps * per_device * world  # tail of 3 dropped, no repeats
    assert single == list(GlobalBatchSampler(n, per_device, 1, 0, world, seed=5, epoch=3))
    assert single != list(GlobalBatchSampler(n, per_device, 1, 0, world, seed=5, epoch=4))
    assert epoch_seed(0, 1) != epoch_seed(1, 0)
    assert batch_split(64, 8, 4) == 2
    with pytest.raises(ValueError, match="global_batch_size 64 is not divisible by .* 8 x world size 3"):
        batch_split(64, 8, 3)


def test_rng_state_round_trip_through_weights_only(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    state = rng_state()
    expected = (random.random(), float(np.random.rand()), torch.rand(1).item())
    path = tmp_path / "rng.pt"
    torch.save(state, path)
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    set_rng_state(torch.load(path, weights_only=True))
    assert (random.random(), float(np.random.rand()), torch.rand(1).item()) == expected


class _Configured(nn.Linear):
    config = SimpleNamespace(to_dict=lambda: {"backbone": "toy"})


def _meta(**kw):
    meta = {"config": {"name": "t"}, "dataset": "refcoco", "variant": "twister", "resolution": 32,
            "epoch": 1, "data_hash": "abc"}
    meta.update(kw)
    return meta


def test_checkpoint_write_read_and_errors(tmp_path):
    model = _Configured(2, 3)
    path = tmp_path / "ck" / "last.pt"
    save_checkpoint(path, model, _meta(), training={"history": [{"epoch": 1, "loss": 0.5}]})
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.pt"]  # no temporary left behind
    state = read_checkpoint(path)
    assert state["meta"]["model_config"] == {"backbone": "toy"}
    assert torch.equal(state["model"]["weight"], model.weight.detach())
    assert state["training"]["history"][0]["loss"] == 0.5
    assert len(file_sha256(path)) == 64

    with pytest.raises(ValueError, match="lacks data_hash"):
        save_checkpoint(tmp_path / "x.pt", model, {k: v for k, v in _meta().items() if k != "data_hash"})
    with pytest.raises(CheckpointError, match="missing.pt: checkpoint not found"):
        read_checkpoint(tmp_path / "missing.pt")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="truncated.pt: cannot read checkpoint"):
        read_checkpoint(truncated)
    foreign = tmp_path / "foreign.pt"
    atomic_torch_save({"weights": torch.zeros(1)}, foreign)
    with pytest.raises(CheckpointError, match="foreign.pt: not a remamber checkpoint"):
        read_checkpoint(foreign)
    # An arbitrary object in the pickle is refused by weights_only, never constructed.
    evil = tmp_path / "evil.pt"
    torch.save({"format": "remamber-checkpoint-v1", "meta": SimpleNamespace(x=1)}, evil)
    with pytest.raises(CheckpointError, match="evil.pt: refused: the file holds objects other than tensors") \
            as refused:
        read_checkpoint(evil)
    # torch's own message advises retrying with weights_only=False (running the file's code): not passed on,
    # neither in the message nor in the exception chain a --debug traceback would print.
    assert "weights_only" not in str(refused.value) and "SimpleNamespace" in str(refused.value)
    assert "safe_globals" not in str(refused.value)  # nor its advice to allowlist what it refused
    assert refused.value.__cause__ is None and refused.value.__suppress_context__
    # A pickle that would run os.system (legacy format) is refused the same way, nothing run.
    import os

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'ran'}",))

    legacy = tmp_path / "legacy.pt"
    torch.save({"format": "remamber-checkpoint-v1", "meta": Evil()}, legacy, _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match=r"legacy\.pt: refused: .*GLOBAL (posix|os|nt)\.system") as refused:
        read_checkpoint(legacy)
    assert "weights_only" not in str(refused.value) and not (tmp_path / "ran").exists()


def test_frozen_text_encoder_stays_eval_without_grads_and_out_of_the_optimizer():
    """train.freeze_text_encoder: the encoder's parameters get no gradient, it stays in eval mode (dropout
    off) when the model is switched to training, builds no autograd graph, and AdamW never sees it."""
    from remamber.models import build_model, variant_config

    torch.manual_seed(0)
    model = build_model(variant_config("twister", backbone="vmamba_tiny_test", text_encoder="tiny-random-bert",
                                       max_text_len=12, local_dim=32, channel_scan_width=32,
                                       channel_scan_grid=4))
    encoder = model.text_encoder
    assert encoder.model.config.hidden_dropout_prob > 0  # dropout exists, so eval mode matters
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    encoder.freeze()
    model.train()
    assert model.training and model.backbone.training
    assert not any(m.training for m in encoder.modules())
    assert not any(p.requires_grad for p in encoder.parameters())
    ids, mask = model.tokenize(["the red ball on the left", "a cat"])
    tokens, pooled = encoder(ids, mask)
    assert tokens.grad_fn is None and pooled.grad_fn is None
    again, _ = encoder(ids, mask)
    assert torch.equal(tokens, again)  # no dropout: the same sentence gives the same features
    groups = optimizer_groups(model, _train_cfg(), pretrained_backbone=False)
    assert not any(g["name"].startswith("text_encoder") for g in groups)
    in_optimizer = {id(p) for g in groups for p in g["params"]}
    assert in_optimizer == {id(p) for n, p in model.named_parameters() if not n.startswith("text_encoder.")}
    # One optimizer step on a real loss leaves the encoder's weights bit-identical.
    opt = torch.optim.AdamW(groups)
    logits = model(torch.randn(2, 3, 32, 32), ids, mask)
    logits.mean().backward()
    opt.step()
    assert all(torch.equal(before[k], v) for k, v in encoder.state_dict().items())


def test_device_resolution_fills_in_the_cuda_index(monkeypatch):
    """Issue 12 item 8: `--device cuda` (no index) is this process's GPU: the current CUDA device, or
    LOCAL_RANK under torchrun. Checked without a GPU by standing in for torch.cuda."""
    from remamber.engine.distributed import DistInfo, resolve_device

    made_current = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: made_current.append(d))
    single, ddp = DistInfo(0, 1, 0), DistInfo(1, 4, 3)
    assert resolve_device("cuda", single) == torch.device("cuda", 2)
    assert resolve_device(None, single) == torch.device("cuda", 2)
    assert resolve_device("cuda", ddp) == torch.device("cuda", 3)
    assert resolve_device("cuda:1", ddp) == torch.device("cuda", 1)
    assert made_current == [torch.device("cuda", i) for i in (2, 2, 3, 1)]
    assert all(d.index is not None for d in made_current)
    assert resolve_device("cpu", single) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device(None, single) == torch.device("cpu")
    with pytest.raises(ValueError, match="--device cuda: CUDA is not available here"):
        resolve_device("cuda", single)
    with pytest.raises(ValueError, match="--device 'gpu0': not a device name"):
        resolve_device("gpu0", single)


def test_prediction_png_writer_leaves_nothing_when_a_save_fails(tmp_path, monkeypatch):
    """Issue 12 item 14 (leftovers), for predict's PNGs: a save cut by an error leaves neither the target
    nor a temporary (the writer used to leave `.<name>.tmp-<pid>.png` behind)."""
    from PIL import Image

    from remamber.engine import predict

    real_save = Image.Image.save

    def save_then_fail(self, fp, *args, **kwargs):
        real_save(self, fp, *args, **kwargs)
        raise OSError("No space left on device")

    monkeypatch.setattr(Image.Image, "save", save_then_fail)
    with pytest.raises(OSError, match="No space left"):
        predict._save_png_atomic(Image.new("L", (4, 3)), tmp_path / "out" / "mask.png")
    assert list((tmp_path / "out").iterdir()) == []
    monkeypatch.setattr(Image.Image, "save", real_save)
    predict._save_png_atomic(Image.new("L", (4, 3), 255), tmp_path / "out" / "mask.png")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["mask.png"]
    with Image.open(tmp_path / "out" / "mask.png") as im:
        assert im.format == "PNG" and im.size == (4, 3)


# --- The authors' optimiser recipe as options (issue 14): train.weight_decay_scope, train.lr_schedule ---

def _decay_by_name(model, groups):
    by_id = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    return {name: by_id[id(p)] for name, p in model.named_parameters()}


def test_weight_decay_scope_per_parameter_name():
    """weights (ours): biases, norm weights and marked SSM parameters are exempt; all (the authors' AdamW
    with groups that set no decay of their own): every parameter decays by weight_decay."""
    model = _Toy()
    ours = _decay_by_name(model, optimizer_groups(model, _train_cfg(weight_decay_scope="weights"), True))
    assert ours == {"A_log": 0.0, "text.weight": 1e-4, "text.bias": 0.0,
                    "backbone.0.weight": 1e-4, "backbone.0.bias": 0.0,
                    "backbone.1.weight": 0.0, "backbone.1.bias": 0.0,
                    "head.weight": 1e-4, "head.bias": 0.0}
    authors = _decay_by_name(model, optimizer_groups(model, _train_cfg(weight_decay_scope="all"), True))
    assert authors == {name: 1e-4 for name, _ in model.named_parameters()}
    # The learning rates do not depend on the scope; "all" leaves no empty no_decay groups.
    groups = optimizer_groups(model, _train_cfg(weight_decay_scope="all"), True)
    assert {g["name"]: g["lr"] for g in groups} == {
        "text_encoder/decay": 2e-4, "backbone/decay": 2e-4, "new/decay": 1e-3}
    opt = build_optimizer(model, _train_cfg(weight_decay_scope="all"), True)
    assert all(g["weight_decay"] == 1e-4 for g in opt.param_groups)
    with pytest.raises(ValueError, match="weight_decay_scope"):
        optimizer_groups(model, _train_cfg(weight_decay_scope="some"), True)


def test_weight_decay_scope_on_the_model_exempts_its_ssm_parameters():
    """On the built tiny model: "weights" exempts every 1-D parameter and every A_logs/Ds, decays the rest;
    "all" decays every parameter."""
    from remamber.models import build_model, variant_config

    torch.manual_seed(0)
    model = build_model(variant_config("twister", local_dim=16, channel_scan_grid=4, channel_scan_width=16))
    ours = _decay_by_name(model, optimizer_groups(model, _train_cfg(weight_decay_scope="weights"), False))
    exempt = {n for n, p in model.named_parameters()
              if p.ndim == 1 or n.endswith("A_logs") or n.endswith("Ds")}
    assert any(n.endswith("A_logs") for n in exempt) and any(n.endswith("Ds") for n in exempt)
    assert {n for n, wd in ours.items() if wd == 0.0} == exempt
    assert {wd for n, wd in ours.items() if n not in exempt} == {1e-4}
    authors = _decay_by_name(model, optimizer_groups(model, _train_cfg(weight_decay_scope="all"), False))
    assert set(authors.values()) == {1e-4}


# lr(e) for base 1e-3, min 1e-5, 4 epochs, computed by hand: 1e-5 + 9.9e-4 * (1 + cos(pi * t / 4)) / 2
# t = 0: 1e-3; t = 1: 1e-5 + 9.9e-4 * 0.8535533906 = 8.5501785669e-4; t = 2: 5.05e-4;
# t = 3: 1e-5 + 9.9e-4 * 0.1464466094 = 1.5498214331e-4.
_OURS = [1e-3, 8.5501785669e-4, 5.05e-4, 1.5498214331e-4]
# The authors': timm's CosineLRScheduler stepped after each epoch with that epoch's index, so epoch e runs
# at t = e - 1 (epoch 0 at the base rate the optimizer was built with).
_AUTHORS = [1e-3, 1e-3, 8.5501785669e-4, 5.05e-4]


@pytest.mark.parametrize(("lagged", "want"), [(False, _OURS), (True, _AUTHORS)])
def test_cosine_schedule_lr_per_epoch_by_hand(lagged, want):
    model = _Toy()
    opt = torch.optim.AdamW(optimizer_groups(model, _train_cfg(), True))
    sched = CosineEpochSchedule(opt, 1e-5, 4, lagged=lagged)
    got = []
    for epoch in range(4):
        sched.set_epoch(epoch)
        got.append(_group(opt.param_groups, "new/decay")["lr"])
        # Every group follows the same cosine factor between its own base rate and min_lr.
        factor = (want[epoch] - 1e-5) / 9.9e-4
        assert _group(opt.param_groups, "text_encoder/decay")["lr"] == pytest.approx(
            1e-5 + 1.9e-4 * factor, rel=1e-9)
    assert got == pytest.approx(want, rel=1e-9)
    # A resumed schedule (built from the same config) sets the same rates.
    opt2 = torch.optim.AdamW(optimizer_groups(model, _train_cfg(), True))
    CosineEpochSchedule(opt2, 1e-5, 4, lagged=lagged).load_state_dict(sched.state_dict())
    assert [g["lr"] for g in opt2.param_groups] == [g["lr"] for g in opt.param_groups]


def test_seed_everything_switches_deterministic_algorithms_on_without_importing_inductor():
    """deterministic: torch's deterministic-algorithms switch on (warn-only, for CUDA kernels without a
    deterministic version), set without importing torch._inductor (1.5 s a process); in a fresh process."""
    code = ("import sys, torch\n"
            "from remamber.engine.distributed import seed_everything\n"
            "assert not torch.are_deterministic_algorithms_enabled()\n"
            "seed_everything(0, True)\n"
            "print(torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),"
            " 'torch._inductor.config' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["True", "True", "False"]
