"""VMamba backbone (channel-first), its named configurations and the official-checkpoint loader.

Layout and parameter names follow MzeroMiko/VMamba `vssm_base_0229` (patch embed v2, downsample v3,
ln2d norm, forward type v05_noz), so `vssm_base_0229_ckpt_epoch_237.pth` loads key for key:

    patch_embed.{0,5}   stride-2 3x3 convs 3 -> C0/2 -> C0 ({2,7}: LayerNorm2d; 4: GELU)
    layers.i.blocks.j   VSSBlock (norm, op = SS2D, norm2, mlp.fc1, mlp.fc2)
    layers.i.downsample stride-2 3x3 conv C -> 2C (index 1) + LayerNorm2d (index 3); Identity last

The Identity entries in the Sequentials only keep the official indices.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import re
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from remamber.models.layers import LayerNorm2d, trunc_normal_init
from remamber.models.ss2d import VSSBlock

log = logging.getLogger(__name__)

__all__ = [
    "BackboneConfig",
    "BACKBONES",
    "backbone_config",
    "VMambaStage",
    "VMambaBackbone",
    "LoadReport",
    "load_vmamba_checkpoint",
    "verify_checkpoint_file",
]


@dataclass(frozen=True)
class BackboneConfig:
    """Sizes of a VMamba backbone. dims/depths per stage; SSM sizes shared by every block."""

    dims: tuple[int, ...]
    depths: tuple[int, ...]
    d_state: int = 1
    ssm_ratio: float = 2.0
    dt_rank: int | str = "auto"
    mlp_ratio: float = 4.0

    def __post_init__(self) -> None:
        if len(self.dims) != len(self.depths) or not self.dims:
            raise ValueError(f"dims {self.dims} and depths {self.depths} must be non-empty and of equal length")


BACKBONES: dict[str, BackboneConfig] = {
    # VMamba-B (vssm_base_0229): 87.5M parameters without the classifier head.
    "vmamba_base": BackboneConfig(dims=(128, 256, 512, 1024), depths=(2, 2, 15, 2)),
    # CPU demo: trains at 64-96 px on two cores.
    "vmamba_demo": BackboneConfig(dims=(16, 32, 64, 128), depths=(1, 1, 2, 1)),
    # Unit tests: the smallest model that still has every part.
    "vmamba_tiny_test": BackboneConfig(dims=(8, 16, 24, 32), depths=(1, 1, 1, 1), mlp_ratio=2.0),
}


def backbone_config(name: str) -> BackboneConfig:
    """The registered configuration `name`; unknown names raise listing the known ones."""
    try:
        return BACKBONES[name]
    except KeyError:
        raise KeyError(f"unknown backbone {name!r}; known backbones: {sorted(BACKBONES)}") from None


class VMambaStage(nn.Module):
    """One stage: `blocks` (VSS blocks at width C) then `downsample` (C -> C_next, stride 2)."""

    def __init__(self, blocks: nn.Sequential, downsample: nn.Module) -> None:
        super().__init__()
        self.blocks = blocks
        self.downsample = downsample


def _patch_embed(out_dim: int) -> nn.Sequential:
    half = out_dim // 2
    return nn.Sequential(
        nn.Conv2d(3, half, kernel_size=3, stride=2, padding=1),
        nn.Identity(),
        LayerNorm2d(half),
        nn.Identity(),
        nn.GELU(),
        nn.Conv2d(half, out_dim, kernel_size=3, stride=2, padding=1),
        nn.Identity(),
        LayerNorm2d(out_dim),
    )


def _downsample(dim: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Identity(),
        nn.Conv2d(dim, out_dim, kernel_size=3, stride=2, padding=1),
        nn.Identity(),
        LayerNorm2d(out_dim),
    )


class VMambaBackbone(nn.Module):
    """VMamba feature extractor.

    forward(images (B, 3, H, W)) -> list of stage outputs (B, C_i, H_i, W_i) with
    H_1 = ceil(ceil(H/2)/2) and each later stage ceil(H_{i-1}/2): padded stride-2 convs, so any
    input size works. Drop-path rises linearly from 0 to `drop_path_rate` over all blocks.
    The ReMamber assembly calls `patch_embed`, `layers[i].blocks` and `layers[i].downsample`
    itself to place fusion between them.
    """

    def __init__(self, config: BackboneConfig, drop_path_rate: float = 0.1) -> None:
        super().__init__()
        self.config = config
        self.dims = list(config.dims)
        total = sum(config.depths)
        rates = [drop_path_rate * i / max(total - 1, 1) for i in range(total)]
        self.patch_embed = _patch_embed(config.dims[0])
        self.layers = nn.ModuleList()
        start = 0
        for i, (dim, depth) in enumerate(zip(config.dims, config.depths)):
            blocks = nn.Sequential(
                *[
                    VSSBlock(
                        dim,
                        drop_path=rates[start + j],
                        d_state=config.d_state,
                        ssm_ratio=config.ssm_ratio,
                        dt_rank=config.dt_rank,
                        mlp_ratio=config.mlp_ratio,
                    )
                    for j in range(depth)
                ]
            )
            start += depth
            last = i == len(config.dims) - 1
            down = nn.Identity() if last else _downsample(dim, config.dims[i + 1])
            self.layers.append(VMambaStage(blocks, down))
        self.apply(trunc_normal_init)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        x = self.patch_embed(images)
        outs = []
        for stage in self.layers:
            x = stage.blocks(x)
            outs.append(x)
            x = stage.downsample(x)
        return outs


@dataclass
class LoadReport:
    """What `load_vmamba_checkpoint` did.

    missing: our keys absent from the checkpoint (kept at their initialisation);
    unexpected: checkpoint keys with no counterpart here (not loaded);
    mismatched: (key, checkpoint shape, our shape) -- only filled when allowed, else an error;
    ignored: checkpoint keys deliberately skipped (the ImageNet classifier head).
    """

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    loaded: int = 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_IGNORED_PREFIXES = ("classifier.",)


def _extract_state_dict(obj: object, path: str) -> Mapping[str, torch.Tensor]:
    if isinstance(obj, Mapping) and "model" in obj and isinstance(obj["model"], Mapping):
        obj = obj["model"]
    elif isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path}: expected a state dict (optionally under key 'model'), got {type(obj).__name__}")
    for key, value in obj.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise ValueError(f"{path}: entry {key!r} is not a named tensor ({type(value).__name__})")
    return obj


def _inert_stub(full_name: str) -> type:
    """A stand-in for a class that a checkpoint pickles but that we neither import nor run (VMamba's
    training script pickles its yacs `CfgNode` under `config`). Creating or calling the stub returns an
    empty OrderedDict, which absorbs the pickled items and state; torch's weights-only unpickler still
    does all the reading, so nothing but tensors, containers and these stubs can come out."""

    def __new__(cls, *args, **kwargs):  # noqa: ARG001 - the pickled arguments are deliberately dropped
        return OrderedDict()

    module, _, name = full_name.rpartition(".")
    return type(name or full_name, (), {"__new__": __new__, "__module__": f"stub:{module}"})


def _read_checkpoint(path: str) -> object:
    """torch.load(weights_only=True), with inert stubs for the globals it would refuse."""
    try:
        unknown = sorted(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # noqa: BLE001 - not a zip checkpoint: the plain load below says what is wrong
        unknown = []
    if unknown:
        log.info("%s: reading without importing or running %s", path, ", ".join(unknown))
    try:
        with torch.serialization.safe_globals([(_inert_stub(name), name) for name in unknown]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - re-raised with the file name
        # torch's message advises retrying with weights_only=False (running the file's code): keep only its
        # finding, and not even the chain (a --debug traceback would print it).
        found = next((line.strip().replace("WeightsUnpickler error: ", "") for line in str(exc).splitlines()
                      if line.strip() and "weights_only" not in line and "Weights only" not in line
                      and "you have two options" not in line), type(exc).__name__)
        found = re.split(r"\. Please| was not an allowed global", found)[0]  # and its allowlisting advice
        raise ValueError(f"{path}: cannot be read as a weights-only torch checkpoint: {found}") from None


def verify_checkpoint_file(path: str | os.PathLike, sha256: str | None, size: int | None) -> None:
    """Check a file against its pinned size and sha256; ValueError naming the file and both values.

    With nothing pinned, log a warning (the file is then only checked by its keys and shapes)."""
    path = os.fspath(path)
    if sha256 is None and size is None:
        log.warning("%s: no sha256/size pinned for this file (params/datasets.yaml pretrained.backbone); it is "
                    "loaded unverified. Pin `sha256sum` and the byte size of the official file there.", path)
        return
    actual_size = os.path.getsize(path)
    if size is not None and actual_size != size:
        raise ValueError(f"{path}: size {actual_size} bytes, expected {size} (params/datasets.yaml); "
                         "a truncated or different file: download it again")
    if sha256 is not None:
        digest = hashlib.sha256()
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
        if digest.hexdigest() != sha256.lower():
            raise ValueError(f"{path}: sha256 {digest.hexdigest()}, expected {sha256} (params/datasets.yaml); "
                             "a corrupt or different file: download it again")


def load_vmamba_checkpoint(
    backbone: VMambaBackbone,
    path: str | os.PathLike,
    allow_shape_mismatch: bool = False,
    allow_missing: bool = False,
) -> LoadReport:
    """Load official VMamba weights (state dict under `model`) into `backbone`.

    Reads with `torch.load(weights_only=True)`; classes the file pickles besides tensors (VMamba's yacs
    `CfgNode` under `config`) are replaced by inert stubs, never imported or run, and only the state
    dict is used. Raises ValueError naming the file when nothing matches the backbone's keys, when
    backbone keys are missing from the file (unless `allow_missing`), or when a key's shape differs
    (unless `allow_shape_mismatch`, then it is reported and skipped): training from random weights at
    the pretrained learning rate must not pass silently. Keys of the classifier head are reported as
    `ignored`; anything else unknown as `unexpected`.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"backbone checkpoint not found: {path}")
    source = _extract_state_dict(_read_checkpoint(path), path)
    own = backbone.state_dict()
    report = LoadReport()
    to_load: dict[str, torch.Tensor] = {}
    for key, tensor in source.items():
        if key.startswith(_IGNORED_PREFIXES):
            report.ignored.append(key)
        elif key not in own:
            report.unexpected.append(key)
        elif tuple(tensor.shape) != tuple(own[key].shape):
            if not allow_shape_mismatch:
                raise ValueError(
                    f"{path}: shape mismatch for key {key!r}: checkpoint {tuple(tensor.shape)} "
                    f"vs model {tuple(own[key].shape)}"
                )
            report.mismatched.append((key, tuple(tensor.shape), tuple(own[key].shape)))
        else:
            to_load[key] = tensor
    report.missing = [k for k in own if k not in to_load and k not in {m[0] for m in report.mismatched}]
    if not to_load:
        raise ValueError(
            f"{path}: none of its {len(source)} tensors matches the backbone's {len(own)} keys (its first keys: "
            f"{list(source)[:3]}); is it a VMamba checkpoint of this backbone's size?"
        )
    if report.missing and not allow_missing:
        raise ValueError(
            f"{path}: {len(report.missing)} of the backbone's {len(own)} keys are missing from the file "
            f"(first: {report.missing[:3]}); is it a VMamba checkpoint of this backbone's size?"
        )
    backbone.load_state_dict(to_load, strict=False)
    report.loaded = len(to_load)
    return report
