"""VMamba backbone: every registered configuration runs, SS2D matches an independent float64
recurrence, VMamba-B has 87.5M parameters, and the official checkpoint layout loads key for key."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from remamber.models import BACKBONES, VMambaBackbone, backbone_config, load_vmamba_checkpoint
from remamber.models.ss2d import SS2D


def _out_size(size: int, stages: int) -> list[int]:
    sizes, s = [], math.ceil(math.ceil(size / 2) / 2)
    for _ in range(stages):
        sizes.append(s)
        s = math.ceil(s / 2)
    return sizes


@pytest.mark.parametrize("name", ["vmamba_tiny_test", "vmamba_demo"])
@pytest.mark.parametrize("hw", [(64, 64), (45, 37)])
def test_small_backbones_forward_backward_any_size(name, hw):
    torch.manual_seed(0)
    cfg = backbone_config(name)
    model = VMambaBackbone(cfg)
    x = torch.randn(2, 3, *hw, requires_grad=True)
    outs = model(x)
    assert len(outs) == len(cfg.dims)
    for out, dim, h, w in zip(outs, cfg.dims, _out_size(hw[0], 4), _out_size(hw[1], 4)):
        assert out.shape == (2, dim, h, w)
        assert torch.isfinite(out).all()
    sum(o.square().mean() for o in outs).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    no_grad = [n for n, p in model.named_parameters() if p.grad is None]
    assert not no_grad, f"parameters without gradient: {no_grad}"


def test_vmamba_base_runs_on_a_tiny_input():
    torch.manual_seed(0)
    model = VMambaBackbone(backbone_config("vmamba_base"))
    x = torch.randn(1, 3, 40, 33)
    outs = model(x)
    assert [tuple(o.shape) for o in outs] == [(1, 128, 10, 9), (1, 256, 5, 5), (1, 512, 3, 3), (1, 1024, 2, 2)]
    outs[-1].mean().backward()
    assert model.patch_embed[0].weight.grad is not None


def test_vmamba_base_has_87_5m_parameters_without_head():
    with torch.device("meta"):
        model = VMambaBackbone(backbone_config("vmamba_base"))
    n = sum(p.numel() for p in model.parameters())
    print(f"vmamba_base parameters without head: {n / 1e6:.3f}M")
    assert abs(n - 87.5e6) / 87.5e6 < 0.02


def test_unknown_backbone_is_a_clear_error():
    with pytest.raises(KeyError, match="vmamba_huge.*known backbones.*vmamba_base"):
        backbone_config("vmamba_huge")
    assert set(BACKBONES) >= {"vmamba_base", "vmamba_demo", "vmamba_tiny_test"}


# ---------------------------------------------------------------------------------------------
# SS2D against an independent float64 implementation written from the VMamba / Mamba equations.

def _reference_ss2d(module: SS2D, x: torch.Tensor) -> torch.Tensor:
    p = {k: v.detach().double() for k, v in module.state_dict().items()}
    x = x.double()
    b, _, h, w = x.shape
    u = torch.einsum("oi,bihw->bohw", p["in_proj.weight"], x)
    u = F.conv2d(u, p["conv2d.weight"], None, padding=1, groups=u.shape[1])
    u = F.silu(u)
    d = u.shape[1]
    k_dirs, rn, _ = p["x_proj_weight"].shape
    n = p["A_logs"].shape[1]
    r = rn - 2 * n
    a = -torch.exp(p["A_logs"]).reshape(k_dirs, d, n)
    dskip = p["Ds"].reshape(k_dirs, d)
    # positions (row, col) visited by each direction
    row_major = [(i, j) for i in range(h) for j in range(w)]
    col_major = [(i, j) for j in range(w) for i in range(h)]
    orders = [row_major, col_major, row_major[::-1], col_major[::-1]]
    y = torch.zeros(b, d, h, w, dtype=torch.float64)
    for k, order in enumerate(orders):
        state = torch.zeros(b, d, n, dtype=torch.float64)
        for (i, j) in order:
            ut = u[:, :, i, j]  # (B, D)
            proj = ut @ p["x_proj_weight"][k].T  # (B, R + 2N)
            dt = F.softplus(proj[:, :r] @ p["dt_projs_weight"][k].T + p["dt_projs_bias"][k])  # (B, D)
            bt, ct = proj[:, r:r + n], proj[:, r + n:]
            state = torch.exp(dt[..., None] * a[k]) * state + dt[..., None] * bt[:, None, :] * ut[..., None]
            y[:, :, i, j] += (state * ct[:, None, :]).sum(-1) + dskip[k] * ut
    y = F.layer_norm(y.permute(0, 2, 3, 1), (d,), p["out_norm.weight"], p["out_norm.bias"], module.out_norm.eps)
    return torch.einsum("oi,bhwi->bohw", p["out_proj.weight"], y)


@pytest.mark.parametrize("d_state", [1, 3])
def test_ss2d_matches_float64_sequential_reference(d_state):
    torch.manual_seed(1)
    module = SS2D(6, d_state=d_state, d_in=10)
    with torch.no_grad():  # move A and dt off their initial values so every term matters
        module.A_logs.add_(0.3 * torch.randn_like(module.A_logs))
        module.Ds.add_(0.5 * torch.randn_like(module.Ds))
        module.dt_projs_bias.add_(torch.rand_like(module.dt_projs_bias))
    x = torch.randn(2, 10, 3, 5)
    got = module(x)
    want = _reference_ss2d(module, x)
    assert got.shape == (2, 6, 3, 5)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# The official checkpoint layout, written out independently from MzeroMiko/VMamba
# (vssm_base_0229: patchembed v2, downsample v3, ln2d, forward type v05_noz, ssm_conv_bias false).

def _official_vmamba_state_dict(dims, depths, d_state=1, ssm_ratio=2.0, mlp_ratio=4.0, classes=1000):
    sd: dict[str, torch.Tensor] = {}

    def put(key, *shape):
        sd[key] = torch.randn(*shape)

    c0 = dims[0]
    put("patch_embed.0.weight", c0 // 2, 3, 3, 3)
    put("patch_embed.0.bias", c0 // 2)
    put("patch_embed.2.weight", c0 // 2)
    put("patch_embed.2.bias", c0 // 2)
    put("patch_embed.5.weight", c0, c0 // 2, 3, 3)
    put("patch_embed.5.bias", c0)
    put("patch_embed.7.weight", c0)
    put("patch_embed.7.bias", c0)
    for i, (c, depth) in enumerate(zip(dims, depths)):
        di, r, hid = int(ssm_ratio * c), math.ceil(c / 16), int(mlp_ratio * c)
        for j in range(depth):
            pre = f"layers.{i}.blocks.{j}."
            put(pre + "norm.weight", c)
            put(pre + "norm.bias", c)
            put(pre + "op.in_proj.weight", di, c)
            put(pre + "op.conv2d.weight", di, 1, 3, 3)
            put(pre + "op.x_proj_weight", 4, r + 2 * d_state, di)
            put(pre + "op.dt_projs_weight", 4, di, r)
            put(pre + "op.dt_projs_bias", 4, di)
            put(pre + "op.A_logs", 4 * di, d_state)
            put(pre + "op.Ds", 4 * di)
            put(pre + "op.out_norm.weight", di)
            put(pre + "op.out_norm.bias", di)
            put(pre + "op.out_proj.weight", c, di)
            put(pre + "norm2.weight", c)
            put(pre + "norm2.bias", c)
            put(pre + "mlp.fc1.weight", hid, c)
            put(pre + "mlp.fc1.bias", hid)
            put(pre + "mlp.fc2.weight", c, hid)
            put(pre + "mlp.fc2.bias", c)
        if i < len(dims) - 1:
            put(f"layers.{i}.downsample.1.weight", dims[i + 1], c, 3, 3)
            put(f"layers.{i}.downsample.1.bias", dims[i + 1])
            put(f"layers.{i}.downsample.3.weight", dims[i + 1])
            put(f"layers.{i}.downsample.3.bias", dims[i + 1])
    put("classifier.norm.weight", dims[-1])
    put("classifier.norm.bias", dims[-1])
    put("classifier.head.weight", classes, dims[-1])
    put("classifier.head.bias", classes)
    return sd


def test_official_key_layout_loads_with_no_unexpected_keys(tmp_path):
    cfg = backbone_config("vmamba_demo")
    sd = _official_vmamba_state_dict(cfg.dims, cfg.depths, mlp_ratio=cfg.mlp_ratio)
    path = tmp_path / "vssm.pth"
    torch.save({"model": sd, "epoch": 237}, path)
    model = VMambaBackbone(cfg)
    report = load_vmamba_checkpoint(model, path)
    assert report.unexpected == []
    assert report.missing == []
    assert report.mismatched == []
    assert sorted(report.ignored) == sorted(k for k in sd if k.startswith("classifier."))
    own = model.state_dict()
    for key, value in sd.items():
        if not key.startswith("classifier."):
            assert torch.equal(own[key], value), key


def test_vmamba_base_key_layout_matches_without_allocating():
    cfg = backbone_config("vmamba_base")
    with torch.device("meta"):
        model = VMambaBackbone(cfg)
    # compare names and shapes only (the real state dict would be 350 MB of random numbers)
    with torch.device("meta"):
        sd = _official_vmamba_state_dict(cfg.dims, cfg.depths)
    official = {k: tuple(v.shape) for k, v in sd.items() if not k.startswith("classifier.")}
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours == official


def test_shape_mismatch_names_the_key(tmp_path):
    cfg = backbone_config("vmamba_tiny_test")
    sd = _official_vmamba_state_dict(cfg.dims, cfg.depths, mlp_ratio=cfg.mlp_ratio)
    sd["layers.1.blocks.0.op.out_proj.weight"] = torch.randn(3, 3)
    path = tmp_path / "bad.pth"
    torch.save({"model": sd}, path)
    with pytest.raises(ValueError, match=r"layers\.1\.blocks\.0\.op\.out_proj\.weight.*\(3, 3\)"):
        load_vmamba_checkpoint(VMambaBackbone(cfg), path)
    report = load_vmamba_checkpoint(VMambaBackbone(cfg), path, allow_shape_mismatch=True)
    assert [m[0] for m in report.mismatched] == ["layers.1.blocks.0.op.out_proj.weight"]
    assert report.missing == []  # a mismatched key is reported once, as mismatched


def test_missing_keys_are_an_error_and_unknown_keys_are_reported(tmp_path):
    cfg = backbone_config("vmamba_tiny_test")
    sd = _official_vmamba_state_dict(cfg.dims, cfg.depths, mlp_ratio=cfg.mlp_ratio)
    del sd["layers.0.blocks.0.norm.weight"]
    sd["outnorm0.weight"] = torch.randn(8)
    path = tmp_path / "partial.pth"
    torch.save(sd, path)  # a bare state dict (no 'model' wrapper) is accepted too
    with pytest.raises(ValueError, match=r"partial\.pth: 1 of the backbone's \d+ keys are missing.*"
                                         r"layers\.0\.blocks\.0\.norm\.weight"):
        load_vmamba_checkpoint(VMambaBackbone(cfg), path)
    report = load_vmamba_checkpoint(VMambaBackbone(cfg), path, allow_missing=True)
    assert report.missing == ["layers.0.blocks.0.norm.weight"]
    assert report.unexpected == ["outnorm0.weight"]


def test_a_file_that_matches_no_key_is_an_error(tmp_path):
    model = VMambaBackbone(backbone_config("vmamba_tiny_test"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    path = tmp_path / "resnet.pth"
    torch.save({"model": {"conv1.weight": torch.randn(4, 3, 7, 7), "fc.bias": torch.randn(10)}}, path)
    with pytest.raises(ValueError, match=r"resnet\.pth: none of its 2 tensors matches the backbone's \d+ keys"):
        load_vmamba_checkpoint(model, path)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


class _CfgNode(dict):
    """Pickled like yacs' CfgNode (a dict subclass with attributes); records any code run at load."""

    ran: list[str] = []

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.__dict__["__immutable__"] = False
        self.__dict__["__deprecated_keys__"] = set()

    def __setstate__(self, state):
        _CfgNode.ran.append("__setstate__")
        self.__dict__.update(state)


def test_vmamba_training_checkpoint_with_an_unimportable_config_class_loads(tmp_path, monkeypatch):
    """VMamba's ckpt_epoch_N.pth: {'model', 'optimizer', 'lr_scheduler', 'max_accuracy', 'scaler', 'epoch',
    'config': a yacs CfgNode}. weights_only=True alone refuses it; the config is stubbed, never run."""
    import importlib.util
    import sys
    import types

    cfg = backbone_config("vmamba_tiny_test")
    sd = _official_vmamba_state_dict(cfg.dims, cfg.depths, mlp_ratio=cfg.mlp_ratio)
    fake = types.ModuleType("yacs_stand_in.config")
    _CfgNode.__module__, _CfgNode.__qualname__ = "yacs_stand_in.config", "CfgNode"
    fake.CfgNode = _CfgNode
    config = _CfgNode({"MODEL": _CfgNode({"TYPE": "vssm", "NAME": "vssm_base_0229"}), "SEED": 0})
    path = tmp_path / "ckpt_epoch_237.pth"
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "yacs_stand_in", types.ModuleType("yacs_stand_in"))
        m.setitem(sys.modules, "yacs_stand_in.config", fake)
        torch.save({"model": sd, "optimizer": {"state": {}, "param_groups": [{"lr": 1e-3}]},
                    "lr_scheduler": {"last_epoch": 237}, "max_accuracy": 83.9, "scaler": {"scale": 65536.0},
                    "epoch": 237, "config": config}, path)
        with pytest.raises(Exception, match="yacs_stand_in.config.CfgNode"):  # what the old loader hit
            torch.load(path, weights_only=True)
        # even while the class is importable, it is stubbed: none of its code runs
        model = VMambaBackbone(cfg)
        report = load_vmamba_checkpoint(model, path)
        assert _CfgNode.ran == []
    assert importlib.util.find_spec("yacs_stand_in") is None
    report = load_vmamba_checkpoint(VMambaBackbone(cfg), path)  # and once it is not importable at all
    assert report.missing == [] and report.unexpected == []
    assert report.loaded == len(model.state_dict())
    own = model.state_dict()
    assert all(torch.equal(own[k], v) for k, v in sd.items() if not k.startswith("classifier."))
    assert _CfgNode.ran == []


def test_checkpoint_file_is_checked_against_its_pinned_size_and_sha256(tmp_path, caplog):
    import hashlib
    import logging

    from remamber.models.backbone import verify_checkpoint_file

    path = tmp_path / "w.pth"
    path.write_bytes(b"0123456789")
    digest = hashlib.sha256(b"0123456789").hexdigest()
    verify_checkpoint_file(path, digest, 10)
    with pytest.raises(ValueError, match=r"w\.pth: size 10 bytes, expected 11"):
        verify_checkpoint_file(path, digest, 11)
    with pytest.raises(ValueError, match=rf"w\.pth: sha256 {digest}, expected {'0' * 64}"):
        verify_checkpoint_file(path, "0" * 64, 10)
    with caplog.at_level(logging.WARNING, logger="remamber.models.backbone"):
        verify_checkpoint_file(path, None, None)
    assert "no sha256/size pinned" in caplog.text and "w.pth" in caplog.text


def test_pins_are_read_from_params_datasets_yaml(tmp_path, monkeypatch):
    import shutil
    from pathlib import Path

    from remamber.data.catalog import pinned_pretrained as _pinned_backbone

    root = Path(__file__).resolve().parents[1]
    (tmp_path / "params").mkdir()
    text = (root / "params" / "datasets.yaml").read_text()
    monkeypatch.chdir(tmp_path)
    shutil.copy(root / "params" / "datasets.yaml", tmp_path / "params" / "datasets.yaml")
    assert _pinned_backbone("data/pretrained/vssm_base_0229_ckpt_epoch_237.pth") == (None, None)  # not published
    assert _pinned_backbone("other.pth") == (None, None)
    pinned = text.replace("    sha256: null\n    size: null", f"    sha256: {'ab' * 32}\n    size: 12")
    assert pinned != text
    (tmp_path / "params" / "datasets.yaml").write_text(pinned)
    assert _pinned_backbone("x/vssm_base_0229_ckpt_epoch_237.pth") == ("ab" * 32, 12)
    (tmp_path / "params" / "datasets.yaml").write_text(pinned.replace("size: 12", "size: twelve"))
    with pytest.raises(ValueError, match=r"pretrained\.backbone\.size must be a positive byte count.*'twelve'"):
        _pinned_backbone("vssm_base_0229_ckpt_epoch_237.pth")


def test_unreadable_checkpoints_are_clear_errors(tmp_path):
    model = VMambaBackbone(backbone_config("vmamba_tiny_test"))
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_vmamba_checkpoint(model, tmp_path / "nope.pth")
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="garbage.pth"):
        load_vmamba_checkpoint(model, garbage)
    wrong = tmp_path / "list.pth"
    torch.save([1, 2, 3], wrong)
    with pytest.raises(ValueError, match="list.pth.*state dict"):
        load_vmamba_checkpoint(model, wrong)


class _Record(torch.nn.Module):
    """Identity that keeps what it was given."""

    def forward(self, x):
        self.seen = x
        return x


def _skip_only(module, d_skip):
    """B = C = 0, so each direction's scan output is its skip term D_k * u exactly."""
    with torch.no_grad():
        module.x_proj_weight.zero_()
        module.Ds.copy_(torch.tensor(d_skip).repeat_interleave(module.Ds.numel() // len(d_skip)))
    module.out_norm = _Record()


def _summed_in_fp32(y: torch.Tensor, total: float) -> bool:
    """y = total * u with u a bf16 value is exact in fp32 (u has 8 significant bits); a bf16 sum of the
    directions rounds, and y / total is then (almost everywhere) no bf16 value."""
    u = y.float() / total
    return y.dtype == torch.float32 and torch.equal(u.bfloat16().float(), u)


def test_ss2d_sums_its_four_directions_in_fp32():
    """VMamba's (and the authors') scan kernel returns fp32 per direction and the merge adds in fp32."""
    torch.manual_seed(0)
    module = SS2D(16)
    _skip_only(module, [256.0, 1.0, 1.0, 1.0])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        module(torch.randn(2, 16, 6, 5))
    assert _summed_in_fp32(module.out_norm.seen, 259.0)
