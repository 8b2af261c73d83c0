"""The paper's figures from inspection dumps (``remamber.engine.inspect``) and training histories.

Each figure is written as ``<out_base>.png`` and ``<out_base>.pdf``, atomically, with matplotlib's
object API on the Agg canvas (no pyplot global state) and no timestamps in the PDF, so the same
inputs give the same files. Sizes are fixed by the grid: every 2-D panel is ``PANEL_IN`` inches at
``DPI`` (so 200 x 200 px), which the tests check.
"""

from __future__ import annotations

import json
import math
import textwrap
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from remamber.fileio import atomic_write_with as write_with
from remamber.formats import load_inspection
from remamber.vocabulary import variant_label

DPI = 100
PANEL_IN = 2.0
PANEL_3D_IN = 3.0
CURVE_PANEL_IN = (4.0, 3.0)
IMAGE_COLOUR, TEXT_COLOUR, MIXED_COLOUR, TARGET_COLOUR = "tab:red", "tab:blue", "tab:purple", "black"


# ---- inputs ----


def _load(path: str | Path) -> dict[str, np.ndarray]:
    return load_inspection(path)


def _require(data: Mapping[str, np.ndarray], keys: list[str], path: str | Path) -> None:
    missing = [k for k in keys if k not in data]
    if missing:
        raise ValueError(f"{path}: inspection file lacks {missing} (is it from the right variant?)")


def _stage_keys(data: Mapping[str, np.ndarray], prefix: str) -> list[str]:
    keys = [k for k in data if k.startswith(prefix + "_s") and k[len(prefix) + 2:].isdigit()]
    return sorted(keys, key=lambda k: int(k[len(prefix) + 2:]))


def _same_samples(a: Mapping, b: Mapping, path_a: str | Path, path_b: str | Path) -> None:
    for key in ("ref_ids", "sent_ids"):
        if key in a and key in b and not np.array_equal(a[key], b[key]):
            raise ValueError(f"{path_a} and {path_b} show different samples ({key} differ): dump both "
                             "from the same split with the same n_samples")


# ---- numeric helpers ----


def pca_project(points: np.ndarray, k: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """points (N, D) -> (projection (N, k), explained variance (k,)), computed in float64 from the
    eigendecomposition of the covariance. Each component's sign is fixed so that its largest
    |loading| is positive (deterministic output). Components beyond D are zero."""
    x = np.asarray(points, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"pca_project needs an (N>=2, D) array, got shape {x.shape}")
    centred = x - x.mean(axis=0, keepdims=True)
    cov = centred.T @ centred / (x.shape[0] - 1)
    eigvals, eigvecs = np.linalg.eigh(cov)  # ascending
    order = np.argsort(eigvals)[::-1][:k]
    comps = eigvecs[:, order]
    signs = np.sign(comps[np.abs(comps).argmax(axis=0), np.arange(comps.shape[1])])
    comps = comps * np.where(signs == 0, 1.0, signs)
    projected = centred @ comps
    variance = np.clip(eigvals[order], 0.0, None)
    if projected.shape[1] < k:
        pad = k - projected.shape[1]
        projected = np.pad(projected, ((0, 0), (0, pad)))
        variance = np.pad(variance, (0, pad))
    return projected, variance


def token_mean_map(maps: np.ndarray, token_mask: np.ndarray) -> np.ndarray:
    """maps (L, h, w), token_mask (L,) bool -> (h, w): the mean over the expression's real tokens."""
    mask = np.asarray(token_mask, dtype=bool)
    if mask.shape[0] != maps.shape[0]:
        raise ValueError(f"token mask of length {mask.shape[0]} does not match {maps.shape[0]} maps")
    if not mask.any():
        raise ValueError("the expression has no real tokens")
    return maps[mask].astype(np.float64).mean(axis=0)


def resize_map(values: np.ndarray, size: int) -> np.ndarray:
    """(h, w) -> (size, size) in [0, 1]: min-max scaled at the map's own size (a constant map gives
    zeros rather than amplified rounding noise), then resized bilinearly (half-pixel centres)."""
    import torch
    import torch.nn.functional as F

    values = np.asarray(values, dtype=np.float64)
    lo, hi = values.min(), values.max()
    scaled = (values - lo) / (hi - lo) if hi > lo else np.zeros_like(values)
    t = torch.from_numpy(np.ascontiguousarray(scaled))[None, None]
    out = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)[0, 0].numpy()
    return np.clip(out, 0.0, 1.0)


def mask_iou(pred: np.ndarray, target: np.ndarray) -> float:
    inter = np.logical_and(pred, target).sum()
    union = np.logical_or(pred, target).sum()
    return float(inter / union) if union else 0.0


# ---- drawing helpers ----


def _new_figure(width_in: float, height_in: float) -> Figure:
    fig = Figure(figsize=(width_in, height_in), dpi=DPI)
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, out_base: str | Path) -> tuple[Path, Path]:
    out_base = Path(out_base)
    png, pdf = out_base.with_name(out_base.name + ".png"), out_base.with_name(out_base.name + ".pdf")
    write_with(png, lambda tmp: fig.savefig(tmp, format="png", dpi=DPI, metadata={"Software": None}))
    write_with(pdf, lambda tmp: fig.savefig(tmp, format="pdf", metadata={"CreationDate": None, "ModDate": None}))
    return png, pdf


def _show(ax, image: np.ndarray, title: str | None = None, fontsize: float = 6.5,
          outline: np.ndarray | None = None) -> None:
    """Draw an image; ``outline`` (bool mask) is drawn as a lime contour (the ground truth), so it
    never recolours the object the way a filled overlay would."""
    ax.imshow(image, interpolation="nearest")
    if outline is not None and outline.any() and not outline.all():
        ax.contour(outline.astype(float), levels=[0.5], colors=["lime"], linewidths=1.2)
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=fontsize)


def _overlay(image: np.ndarray, mask: np.ndarray, colour: tuple[float, float, float], alpha: float = 0.5) -> np.ndarray:
    """uint8 (R, R, 3) image with a translucent colour where mask is true."""
    out = image.astype(np.float64) / 255.0
    tint = np.asarray(colour, dtype=np.float64)
    out[mask] = (1 - alpha) * out[mask] + alpha * tint
    return out


def _heat(image: np.ndarray, heat: np.ndarray, alpha: float = 0.55) -> np.ndarray:
    from matplotlib import colormaps

    coloured = colormaps["jet"](heat)[..., :3]
    return (1 - alpha) * image.astype(np.float64) / 255.0 + alpha * coloured


def _wrap(text: str, width: int = 34) -> str:
    return "\n".join(textwrap.wrap(str(text), width)[:3])


def _label(name: str) -> str:
    return variant_label(name)


# ---- figures ----


def fig_interaction_vs_attention(
    twister_npz: str | Path, attention_npz: str | Path, out_base: str | Path
) -> tuple[Path, Path]:
    """Paper Fig. 4. Per sample two rows: the cross-attention maps of the attention variant across
    depth (up) and the local interaction maps of Mamba Twister (Eq. 5) across depth (down); the first
    column shows the image with the expression (up) and the ground truth contour (down). Each stage's map is
    the mean over the expression's real tokens, resized to the image and min-max scaled.
    Size: (1 + n_stages) x (2 x n_samples) panels."""
    tw, at = _load(twister_npz), _load(attention_npz)
    tw_keys, at_keys = _stage_keys(tw, "interaction_maps"), _stage_keys(at, "attention_maps")
    if not tw_keys:
        raise ValueError(f"{twister_npz}: no interaction_maps_s* (needs a variant with the local interaction)")
    if not at_keys:
        raise ValueError(f"{attention_npz}: no attention_maps_s* (needs the attention variant)")
    for data, path in ((tw, twister_npz), (at, attention_npz)):
        _require(data, ["images", "gt_masks", "texts", "token_mask"], path)
    _same_samples(tw, at, twister_npz, attention_npz)
    n, size = tw["images"].shape[0], tw["images"].shape[1]
    stages = max(len(tw_keys), len(at_keys))
    fig = _new_figure(PANEL_IN * (1 + stages), PANEL_IN * 2 * n)
    axes = fig.subplots(2 * n, 1 + stages, squeeze=False)
    fig.subplots_adjust(left=0.01, right=0.99, top=0.97, bottom=0.01, wspace=0.04, hspace=0.25)
    for i in range(n):
        image = tw["images"][i]
        _show(axes[2 * i, 0], image, _wrap(f"\u201c{tw['texts'][i]}\u201d"))
        _show(axes[2 * i + 1, 0], image, "ground truth", outline=tw["gt_masks"][i])
        for row, data, keys, name in ((2 * i, at, at_keys, "attention"), (2 * i + 1, tw, tw_keys, "interaction")):
            for s in range(stages):
                ax = axes[row, 1 + s]
                if s >= len(keys):
                    ax.set_axis_off()
                    continue
                heat = resize_map(token_mean_map(data[keys[s]][i], data["token_mask"][i]), size)
                _show(ax, _heat(data["images"][i], heat), f"{name}, stage {s + 1}")
    return _save(fig, out_base)


def _cube_points(
    features: np.ndarray, slices: dict[str, tuple[int, int]], cube_channels: int
) -> list[tuple[str, np.ndarray]]:
    """(P*C or C, h, w) features -> named point sets of shape (h*w, C)."""
    if features.shape[0] == cube_channels and slices:
        text = "global_text" if "global_text" in slices else next((n for n in slices if n != "image"), None)
        sets = [("image", slices["image"])] + ([("text", slices[text])] if text else [])
        return [(name, features[a:b].reshape(b - a, -1).T) for name, (a, b) in sets]
    return [("mixed", features.reshape(features.shape[0], -1).T)]


def fig_cube_pca(twister_npz: str | Path, out_base: str | Path, sample: int = 0, stage: int = 0) -> tuple[Path, Path]:
    """Paper Fig. 5: PCA to 3-D of the pixel features of the hybrid cube (last Twister block of
    ``stage``, one ``sample``) before the scans, after the channel scan and after the spatial scan.

    Before the scans (and after the channel scan, which keeps the cube's P*C channels), the cube is
    split by its channel slices: the image part gives one C-d point per pixel (red) and the text part
    another (blue); the text part is the global text vector F~_t broadcast over the pixels (the
    paper's "duplicated H x W times"), or the local part F~_c for the local-only ablation. PCA is fit
    on the union of both point sets, per panel.

    The spatial scan maps the whole 3C cube to C channels per pixel, so after it there is no image or
    text part left to separate: that panel shows one point per pixel (purple, "mixed"), with the
    pixels of the referred object (ground truth pooled to the map size) in black. A panel whose map
    has C channels for another reason (e.g. the channel scan of the spatial-channel order, which runs
    after the spatial scan) is drawn the same way. Size: 3 panels of 3 x 3 inches.
    """
    data = _load(twister_npz)
    key = f"cube_s{stage}"
    _require(data, [key, f"cube_after_channel_s{stage}", f"cube_after_spatial_s{stage}", f"cube_slices_s{stage}",
                    "cube_slice_names", "gt_masks"], twister_npz)
    if not 0 <= sample < data[key].shape[0]:
        raise ValueError(f"{twister_npz}: sample {sample} out of range (0..{data[key].shape[0] - 1})")
    names = [str(n) for n in data["cube_slice_names"]]
    slices = {n: (int(a), int(b)) for n, (a, b) in zip(names, data[f"cube_slices_s{stage}"])}
    cube_channels = data[key].shape[1]
    fig = _new_figure(3 * PANEL_3D_IN, PANEL_3D_IN)
    fig.subplots_adjust(left=0.0, right=1.0, top=0.9, bottom=0.02, wspace=0.05)
    panels = (("cube", "(a) input cube"), ("cube_after_channel", "(b) after Channel Scan"),
              ("cube_after_spatial", "(c) after Spatial Scan"))
    for p, (name, title) in enumerate(panels):
        features = data[f"{name}_s{stage}"][sample].astype(np.float64)
        sets = _cube_points(features, slices, cube_channels)
        projected, _ = pca_project(np.concatenate([pts for _, pts in sets], axis=0))
        ax = fig.add_subplot(1, 3, p + 1, projection="3d")
        start = 0
        for set_name, pts in sets:
            xyz = projected[start:start + len(pts)]
            start += len(pts)
            if set_name == "mixed":
                target = _pool_mask(data["gt_masks"][sample], features.shape[1:]).reshape(-1)
                ax.scatter(*xyz[~target].T, s=3, c=MIXED_COLOUR, label="image+text (mixed)", depthshade=False)
                ax.scatter(*xyz[target].T, s=3, c=TARGET_COLOUR, label="referred object", depthshade=False)
            else:
                colour = IMAGE_COLOUR if set_name == "image" else TEXT_COLOUR
                ax.scatter(*xyz.T, s=3, c=colour, label=set_name, depthshade=False)
        ax.set_title(title, fontsize=9)
        ax.tick_params(labelsize=5)
        ax.legend(fontsize=6, loc="upper left")
    return _save(fig, out_base)


def _pool_mask(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """(R, R) bool -> (h, w) bool: a cell is the object when at least half its pixels are."""
    import torch
    import torch.nn.functional as F

    t = torch.from_numpy(mask.astype(np.float32))[None, None]
    return (F.adaptive_avg_pool2d(t, shape)[0, 0].numpy() >= 0.5)


def fig_overlays(npz_by_variant: Mapping[str, str | Path], out_base: str | Path) -> tuple[Path, Path]:
    """Paper Figs. 6-7: rows = samples (the expression as row title), columns = the image, then each
    variant's prediction (probability > 0.5, red) with its IoU; the ground truth is the lime contour.
    Size: (1 + n_variants) x n_samples panels."""
    if not npz_by_variant:
        raise ValueError("fig_overlays needs at least one variant")
    loaded = {label: _load(path) for label, path in npz_by_variant.items()}
    labels = list(loaded)
    first_label = labels[0]
    first = loaded[first_label]
    for label, data in loaded.items():
        _require(data, ["images", "gt_masks", "probs", "texts"], npz_by_variant[label])
        _same_samples(first, data, npz_by_variant[first_label], npz_by_variant[label])
        if data["probs"].shape != first["probs"].shape:
            raise ValueError(f"{npz_by_variant[label]}: predictions of shape {data['probs'].shape} do not match "
                             f"{npz_by_variant[first_label]} ({first['probs'].shape}); dump at one resolution")
    n = first["images"].shape[0]
    fig = _new_figure(PANEL_IN * (1 + len(labels)), PANEL_IN * n)
    axes = fig.subplots(n, 1 + len(labels), squeeze=False)
    fig.subplots_adjust(left=0.01, right=0.99, top=0.93, bottom=0.01, wspace=0.04, hspace=0.3)
    for i in range(n):
        image, gt = first["images"][i], first["gt_masks"][i]
        _show(axes[i, 0], image, _wrap(f"\u201c{first['texts'][i]}\u201d"), outline=gt)
        for j, label in enumerate(labels):
            pred = loaded[label]["probs"][i] > 0.5
            title = f"{_label(label)}\nIoU {100 * mask_iou(pred, gt):.1f}"
            _show(axes[i, 1 + j], _overlay(image, pred, (1.0, 0.15, 0.15)), title, outline=gt)
    return _save(fig, out_base)


def _read_history(path: str | Path) -> list[dict]:
    path = Path(path)
    try:
        history = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: training history not found") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(history, list) or not history:
        raise ValueError(f"{path}: expected a non-empty list of per-epoch records")
    for i, entry in enumerate(history):
        missing = [k for k in ("epoch", "loss", "val_mIoU") if not isinstance(entry, dict) or k not in entry]
        if missing:
            raise ValueError(f"{path}: epoch record #{i} lacks {missing}")
    return history


def fig_training_curves(histories: Mapping[str, str | Path], out_base: str | Path) -> tuple[Path, Path]:
    """Training loss and validation mIoU per epoch, one line per labelled ``history.json``.
    Size: 2 panels of 4 x 3 inches."""
    if not histories:
        raise ValueError("fig_training_curves needs at least one history")
    loaded = {label: _read_history(path) for label, path in histories.items()}
    fig = _new_figure(2 * CURVE_PANEL_IN[0], CURVE_PANEL_IN[1])
    ax_loss, ax_miou = fig.subplots(1, 2, squeeze=True)
    fig.subplots_adjust(left=0.08, right=0.98, top=0.9, bottom=0.15, wspace=0.3)
    for label, history in loaded.items():
        epochs = [int(e["epoch"]) for e in history]
        loss = [float(e["loss"]) for e in history]
        miou = [float(e["val_mIoU"]) if e["val_mIoU"] is not None else math.nan for e in history]
        ax_loss.plot(epochs, loss, marker="o", ms=3, label=_label(label))
        ax_miou.plot(epochs, miou, marker="o", ms=3, label=_label(label))
    ax_loss.set(xlabel="epoch", ylabel="training loss (Dice + BCE)", title="Loss")
    ax_miou.set(xlabel="epoch", ylabel="val mIoU (%)", title="Validation mIoU")
    from matplotlib.ticker import MaxNLocator

    for ax in (ax_loss, ax_miou):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    return _save(fig, out_base)
