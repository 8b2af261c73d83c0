"""Reader of the refer format (`refs(<split_by>).p` + `instances.json`) and of its masks.

The pickle goes through a restricted unpickler: plain containers, strings, bytes, numbers, None and bools
only. Any global lookup (`find_class`) is refused before anything is built, so a pickle that tries to run
code (`__reduce__` -> os.system) fails without executing it. Python 2 pickles are read with
`encoding="bytes"` and every bytes value is decoded as UTF-8 (latin-1 as a fallback).
"""

from __future__ import annotations

import io
import json
import os
import pickle
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from remamber.errors import RemamberError

MASK_MODES = ("union", "refer_eq1")
REF_KEYS = ("ref_id", "ann_id", "image_id", "category_id", "split", "sentences")
SENTENCE_KEYS = ("raw", "sent_id")


def rle_decode(rle: dict | list[dict]) -> np.ndarray:
    """pycocotools decode (uint8 (H, W) for one RLE, (H, W, P) for a list), without the DeprecationWarning
    its compiled code raises under numpy 2 on every call."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"__array__ implementation", category=DeprecationWarning)
        return mask_utils.decode(rle)


class ReferError(RemamberError, ValueError):
    """Malformed refer data (the message names the file and, where it applies, the ref_id)."""


class UnsafePickleError(ReferError):
    """The pickle asked for a global (class/function): refused."""


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file: io.BufferedIOBase, source: str):
        super().__init__(file, encoding="bytes")
        self._source = source

    def find_class(self, module: str, name: str) -> Any:  # noqa: D401 - pickle API
        raise UnsafePickleError(f"{self._source}: refusing to load global {module}.{name} from a pickle; "
                                f"refer pickles hold plain containers only")

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError(f"{self._source}: refusing persistent id {pid!r} in a pickle")


def _decode(b: bytes) -> str:
    try:
        return b.decode("utf-8")
    except UnicodeDecodeError:
        return b.decode("latin-1")


def _to_str(obj: Any) -> Any:
    """Recursively turn bytes (Python 2 `str`) into str, keys included."""
    if isinstance(obj, bytes):
        return _decode(obj)
    if isinstance(obj, dict):
        return {_to_str(k): _to_str(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_str(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_to_str(v) for v in obj)
    return obj


def safe_load_pickle(path: str | os.PathLike) -> Any:
    """Load a pickle of plain data only (see module doc); errors name the file."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ReferError(f"{path}: cannot read ({exc.strerror})") from exc
    try:
        obj = _RestrictedUnpickler(io.BytesIO(data), str(path)).load()
    except UnsafePickleError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, KeyError, AttributeError) as exc:
        raise ReferError(f"{path}: corrupt or truncated pickle ({type(exc).__name__}: {exc})") from exc
    return _to_str(obj)


def load_refs(path: str | os.PathLike) -> list[dict]:
    """Read and check a `refs(<split_by>).p`: a list of refs with the keys of `REF_KEYS`."""
    path = Path(path)
    refs = safe_load_pickle(path)
    if not isinstance(refs, list):
        raise ReferError(f"{path}: expected a list of refs, got {type(refs).__name__}")
    seen: set[int] = set()
    for i, ref in enumerate(refs):
        if not isinstance(ref, dict):
            raise ReferError(f"{path}: entry {i} is a {type(ref).__name__}, not a ref dict")
        missing = [k for k in REF_KEYS if k not in ref]
        ident = ref.get("ref_id", f"#{i}")
        if missing:
            raise ReferError(f"{path}: ref_id {ident} lacks key(s) {missing}")
        for k in ("ref_id", "ann_id", "image_id", "category_id"):
            if isinstance(ref[k], bool) or not isinstance(ref[k], int):
                raise ReferError(f"{path}: ref_id {ident}: {k} must be an integer, got {ref[k]!r}")
        if ref["ref_id"] in seen:
            raise ReferError(f"{path}: duplicate ref_id {ref['ref_id']}")
        seen.add(ref["ref_id"])
        sentences = ref["sentences"]
        if not isinstance(sentences, list) or not sentences:
            raise ReferError(f"{path}: ref_id {ident} has no sentences")
        for s in sentences:
            if not isinstance(s, dict) or any(k not in s for k in SENTENCE_KEYS) or not isinstance(s["raw"], str):
                raise ReferError(f"{path}: ref_id {ident} has a malformed sentence {s!r}")
    return refs


def load_instances(path: str | os.PathLike) -> dict[str, Any]:
    """Read `instances.json`; returns `{"images": {id: img}, "annotations": {id: ann}, "categories": {id: cat}}`."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ReferError(f"{path}: cannot read ({exc.strerror})") from exc
    except json.JSONDecodeError as exc:
        raise ReferError(f"{path}: not valid JSON ({exc})") from exc
    for key in ("images", "annotations", "categories"):
        if not isinstance(raw.get(key), list):
            raise ReferError(f"{path}: missing list {key!r}")
    try:
        return {
            "images": {img["id"]: img for img in raw["images"]},
            "annotations": {ann["id"]: ann for ann in raw["annotations"]},
            "categories": {cat["id"]: cat for cat in raw["categories"]},
        }
    except (KeyError, TypeError) as exc:
        raise ReferError(f"{path}: an image/annotation/category lacks an 'id' ({exc})") from exc


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _segmentation_rles(segmentation: Any, height: int, width: int, where: str, image: str,
                       stats: Counter | None) -> list[dict]:
    """COCO segmentation (polygon list, compressed RLE or uncompressed RLE) -> list of compressed RLE parts.

    A polygon of fewer than 3 points (COCO has a few, e.g. `[40, 40, 41, 41]`) encloses nothing: it is
    skipped and counted in `stats["degenerate_polygons"]`, as the refer tools and detectron2 tolerate
    them. Only an object left with no area is an error.
    """
    if isinstance(segmentation, list):
        if not segmentation:
            raise ReferError(f"{where}: empty polygon list")
        polys, degenerate = [], 0
        for poly in segmentation:
            if not isinstance(poly, list) or len(poly) % 2 or not all(_is_number(v) for v in poly):
                raise ReferError(f"{where}: malformed polygon (need an even list of numbers x1, y1, x2, y2, ...): "
                                 f"{poly!r:.80}")
            if len(poly) < 6:
                degenerate += 1
                continue
            polys.append([float(v) for v in poly])
        parts = [mask_utils.frPyObjects([p], height, width)[0] for p in polys]
        if degenerate:
            if not parts or int(mask_utils.area(mask_utils.merge(parts, intersect=False))) == 0:
                raise ReferError(f"{where}: no area left after skipping {degenerate} polygon(s) of fewer than "
                                 f"3 points: {segmentation!r:.80}")
            if stats is not None:
                stats["degenerate_polygons"] += degenerate
                stats["objects_with_degenerate_polygons"] += 1
        return parts
    if isinstance(segmentation, dict) and "counts" in segmentation and "size" in segmentation:
        size = list(segmentation["size"])
        if size != [height, width]:
            raise ReferError(f"{where}: RLE size {size} (height, width) differs from {image}, "
                             f"({height}, {width}); one of the two is wrong")
        counts = segmentation["counts"]
        if isinstance(counts, list):  # uncompressed RLE (iscrowd annotations)
            if not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts):
                raise ReferError(f"{where}: malformed uncompressed RLE: counts must be non-negative integers")
            if sum(counts) != height * width:
                raise ReferError(f"{where}: malformed uncompressed RLE: counts sum to {sum(counts)}, expected "
                                 f"{height * width} for {image} ({height}, {width})")
            return [mask_utils.frPyObjects(segmentation, height, width)]
        if isinstance(counts, str):
            try:
                counts = counts.encode("ascii")
            except UnicodeEncodeError as exc:
                raise ReferError(f"{where}: malformed RLE: counts string is not ASCII") from exc
        if not isinstance(counts, bytes):
            raise ReferError(f"{where}: malformed RLE: counts must be a list or a string, got "
                             f"{type(counts).__name__}")
        rle = {"size": [height, width], "counts": counts}
        try:
            total = int(mask_utils.area(rle))
        except Exception as exc:  # pycocotools raises bare exceptions on garbage
            raise ReferError(f"{where}: malformed RLE: undecodable counts ({exc})") from exc
        if total > height * width:  # garbage counts decode to wrapped-around run lengths
            raise ReferError(f"{where}: malformed RLE: its counts cover {total} pixels, more than the "
                             f"{height * width} of {image} ({height}, {width})")
        return [rle]
    raise ReferError(f"{where}: segmentation is neither polygons nor RLE: {segmentation!r:.80}")


def annotation_rle(segmentation: Any, height: int, width: int, mask_mode: str = "union",
                   where: str = "annotation", image: str = "the image", stats: Counter | None = None
                   ) -> dict[str, Any]:
    """Compressed COCO RLE `{"size": [H, W], "counts": bytes}` of a segmentation's mask.

    `union`: a pixel belongs to the object if any part covers it. `refer_eq1`: the refer API's behaviour,
    which sums the part masks and keeps pixels equal to 1 (pixels covered by two parts drop out).
    `stats` (a Counter) receives the count of skipped degenerate polygons; `image` names the image in
    errors.
    """
    if mask_mode not in MASK_MODES:
        raise ValueError(f"unknown mask_mode {mask_mode!r}; expected one of {MASK_MODES}")
    parts = _segmentation_rles(segmentation, height, width, where, image, stats)
    if len(parts) == 1:
        return parts[0]
    if mask_mode == "union":  # merge in RLE space: no decode needed
        return mask_utils.merge(parts, intersect=False)
    total = rle_decode(parts).astype(np.int32).sum(axis=2)  # (H, W) part count per pixel
    return mask_utils.encode(np.asfortranarray((total == 1).astype(np.uint8)))


def annotation_mask(segmentation: Any, height: int, width: int, mask_mode: str = "union",
                    where: str = "annotation") -> np.ndarray:
    """bool (H, W) mask of a COCO segmentation (see `annotation_rle` for the modes)."""
    return rle_decode(annotation_rle(segmentation, height, width, mask_mode, where)).astype(bool)


def encode_mask(mask: np.ndarray) -> dict[str, Any]:
    """bool (H, W) -> COCO RLE `{"size": [H, W], "counts": str}`."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def decode_mask(counts: str, height: int, width: int) -> np.ndarray:
    """COCO RLE counts string -> bool (H, W)."""
    return rle_decode({"size": [height, width], "counts": counts.encode("ascii")}).astype(bool)


def refs_path(data_root: str | os.PathLike, dataset: str, split_by: str) -> Path:
    return Path(data_root) / dataset / f"refs({split_by}).p"


@dataclass
class ReferData:
    """refs + instances of one dataset, cross-checked (every ref's annotation and image exist)."""

    dataset: str
    split_by: str
    refs: list[dict]
    images: dict[int, dict]
    annotations: dict[int, dict]
    categories: dict[int, dict]
    refs_file: Path
    instances_file: Path

    def image_size(self, ref: dict) -> tuple[int, int]:
        img = self.images[ref["image_id"]]
        return int(img["height"]), int(img["width"])

    def ref_rle(self, ref: dict, mask_mode: str = "union", stats: Counter | None = None) -> dict[str, Any]:
        """Compressed RLE of the ref's annotation mask; errors name the ref_id and the image."""
        ann = self.annotations[ref["ann_id"]]
        h, w = self.image_size(ref)
        where = f"{self.instances_file}: ref_id {ref['ref_id']} (ann_id {ref['ann_id']})"
        img = self.images[ref["image_id"]]
        image = f"the size of image {ref['image_id']} ({img.get('file_name')}) in {self.instances_file.name}"
        if "segmentation" not in ann:
            raise ReferError(f"{where}: annotation has no segmentation")
        return annotation_rle(ann["segmentation"], h, w, mask_mode, where, image=image, stats=stats)

    def ref_mask(self, ref: dict, mask_mode: str = "union") -> np.ndarray:
        """bool (H, W) mask of the ref's annotation; errors name the ref_id."""
        return rle_decode(self.ref_rle(ref, mask_mode)).astype(bool)


def load_refer(data_root: str | os.PathLike, dataset: str, split_by: str) -> ReferData:
    """Read `<data_root>/<dataset>/refs(<split_by>).p` and `instances.json` and check that they agree."""
    rpath = refs_path(data_root, dataset, split_by)
    ipath = Path(data_root) / dataset / "instances.json"
    if not rpath.is_file():
        raise ReferError(f"{rpath}: not found (dataset {dataset!r}, split_by {split_by!r})")
    refs = load_refs(rpath)
    inst = load_instances(ipath)
    for ref in refs:
        rid = ref["ref_id"]
        if ref["ann_id"] not in inst["annotations"]:
            raise ReferError(f"{rpath}: ref_id {rid} names unknown ann_id {ref['ann_id']} (not in {ipath})")
        if ref["image_id"] not in inst["images"]:
            raise ReferError(f"{rpath}: ref_id {rid} names unknown image_id {ref['image_id']} (not in {ipath})")
        if inst["annotations"][ref["ann_id"]].get("image_id") != ref["image_id"]:
            raise ReferError(f"{rpath}: ref_id {rid}: ann_id {ref['ann_id']} belongs to image "
                             f"{inst['annotations'][ref['ann_id']].get('image_id')}, not {ref['image_id']}")
        img = inst["images"][ref["image_id"]]
        if not all(isinstance(img.get(k), int) and img[k] > 0 for k in ("height", "width")) or "file_name" not in img:
            raise ReferError(f"{ipath}: image {ref['image_id']} (ref_id {rid}) lacks file_name/height/width")
    return ReferData(dataset=dataset, split_by=split_by, refs=refs, images=inst["images"],
                     annotations=inst["annotations"], categories=inst["categories"], refs_file=rpath,
                     instances_file=ipath)
