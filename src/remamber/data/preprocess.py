"""Refer data -> one compact parquet index per split, plus `meta.json`.

Index row = one referred object: ids, image path (relative to data_root), image size, sentences (raw,
cleaned, sent_ids), bbox and the mask as COCO RLE (counts as str). Counts per split are validated against
params/datasets.yaml (real data) or the generator's `synth_meta.json` (synthetic data).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, UnidentifiedImageError
from pycocotools import mask as mask_utils
from tqdm.auto import tqdm

from remamber.fileio import atomic_open, atomic_write_json
from remamber.data.catalog import COUNT_KEYS, CatalogError, load_catalog, parse_counts
from remamber.vocabulary import DATASETS
from remamber.data.refer import MASK_MODES, ReferError, load_refer
from remamber.errors import RemamberError

log = logging.getLogger(__name__)

INDEX_FORMAT_VERSION = 1
DEFAULT_SPLIT_BY = {name: facts.split_by for name, facts in DATASETS.items()}
IMAGE_DIR = "train2014"  # every refer dataset draws its images from COCO train2014
TEXT_FIELDS = ("raw", "sent")  # refer sentence fields that can become the model's text
SYNTH_META = "synth_meta.json"

SCHEMA = pa.schema([
    ("ref_id", pa.int64()),
    ("ann_id", pa.int64()),
    ("image_id", pa.int64()),
    ("category_id", pa.int64()),
    ("image_path", pa.string()),
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("sent_ids", pa.list_(pa.int64())),
    ("sentences_raw", pa.list_(pa.string())),
    ("sentences", pa.list_(pa.string())),
    ("bbox", pa.list_(pa.float64())),
    ("mask_counts", pa.string()),
    ("mask_area", pa.int64()),
])

_SPACES = re.compile(r"\s+")
_SPLIT_NAME = re.compile(r"[A-Za-z0-9_+-]+")


class CountMismatchError(RemamberError, ValueError):
    """Counts of a processed dataset differ from the expected ones."""


class IndexDataError(RemamberError, ValueError):
    """A processed index (or a request for one) that cannot be used: bad split name, empty sentence, ..."""


def clean_sentence(raw: str) -> str:
    """Unicode-normalised, lower-cased, control characters removed, whitespace collapsed."""
    text = unicodedata.normalize("NFKC", raw)
    text = "".join(" " if unicodedata.category(c).startswith("C") else c for c in text)
    return _SPACES.sub(" ", text).strip().lower()


def check_split_name(split: str) -> str:
    """`split` itself when it is a plain name (letters, digits, `_`, `+`, `-`), else a ValueError: a split
    names a file inside the index folder, so `../x` or `a/b` must never reach the file system."""
    if not isinstance(split, str) or not _SPLIT_NAME.fullmatch(split):
        raise IndexDataError(f"split {split!r} is not a plain split name (letters, digits, '_', '+', '-'; "
                             f"e.g. val, testA)")
    return split


def index_path(index_dir: str | os.PathLike, split: str) -> Path:
    return Path(index_dir) / f"{check_split_name(split)}.parquet"


def data_hash(index_dir: str | os.PathLike) -> str:
    """Stable sha256 of the parquet index files of `index_dir` (names and bytes, sorted by name)."""
    index_dir = Path(index_dir)
    files = sorted(index_dir.glob("*.parquet"))
    if not files:
        raise FileNotFoundError(f"{index_dir}: no parquet index files (run preprocessing first)")
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode("utf-8") + b"\0")
        h.update(hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()


def read_meta(index_dir: str | os.PathLike) -> dict[str, Any]:
    path = Path(index_dir) / "meta.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found; {index_dir} is not a (complete) processed index")
    return json.loads(path.read_text(encoding="utf-8"))


def _check_image(path: Path, img: dict, ref_id: int, instances_file: Path) -> None:
    """The image exists, is an image, and has the size instances.json gives it (its header only is read:
    a wrong height/width entry is found here, named, rather than blamed on the mask later)."""
    where = f"image of ref_id {ref_id} (image_id {img['id']})"
    try:
        with Image.open(path) as im:
            size = im.size
    except FileNotFoundError:
        raise ReferError(f"{path}: {where} is missing") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise ReferError(f"{path}: {where} is not a readable image ({exc}); fetch and extract it again") from exc
    if size != (img["width"], img["height"]):
        raise ReferError(f"{instances_file}: image {img['id']} ({img['file_name']}) has width {img['width']}, "
                         f"height {img['height']} there, but {path} is {size[0]}x{size[1]} pixels; fix the "
                         f"image's entry (or replace the file)")


def _expected_counts(data_root: Path, dataset: str, split_by: str,
                     expected_counts: Mapping | str | os.PathLike | None) -> tuple[dict | None, str]:
    """The counts to validate against and a description of where they come from."""
    synth = data_root / dataset / SYNTH_META
    if expected_counts is None and synth.is_file():
        meta = json.loads(synth.read_text(encoding="utf-8"))
        if meta.get("split_by") != split_by:
            raise CountMismatchError(f"{synth}: written for split_by {meta.get('split_by')!r}, "
                                     f"preprocessing asks for {split_by!r}")
        return parse_counts(meta.get("counts"), "counts", synth), str(synth)
    if expected_counts is None:
        return None, "nothing"
    if isinstance(expected_counts, Mapping):
        return parse_counts(dict(expected_counts), "expected_counts", "<expected_counts argument>"), \
            "the expected_counts argument"
    catalog = load_catalog(expected_counts)
    spec = catalog.dataset(dataset)
    if spec.split_by != split_by:
        raise CatalogError(f"{catalog.path}: counts of {dataset!r} are for split_by {spec.split_by!r}, "
                           f"not {split_by!r}")
    return spec.counts, str(catalog.path)


def check_counts(found: dict[str, dict[str, int]], expected: dict[str, dict[str, int]], what: str,
                 source: str) -> None:
    """Raise CountMismatchError listing every difference (expected vs found)."""
    problems = []
    for split in sorted(expected.keys() | found.keys()):
        if split not in found:
            problems.append(f"split {split!r}: expected {expected[split]}, found no refs")
        elif split not in expected:
            problems.append(f"split {split!r}: not expected, found {found[split]}")
        else:
            for k in COUNT_KEYS:
                if expected[split][k] != found[split][k]:
                    problems.append(f"{split} {k}: expected {expected[split][k]}, found {found[split][k]}")
    if problems:
        raise CountMismatchError(f"{what}: counts do not match {source}:\n  " + "\n  ".join(problems))


def preprocess(data_root: str | os.PathLike, dataset: str, out_dir: str | os.PathLike,
               split_by: str | None = None, mask_mode: str = "union",
               expected_counts: Mapping | str | os.PathLike | None = None, progress: bool = True,
               text_field: str = "raw") -> dict:
    """Write `out_dir/<split>.parquet` for every split and `out_dir/meta.json`; returns the meta dict.

    `expected_counts`: a `{split: {objects, images, sentences}}` mapping or the path of a datasets.yaml;
    None uses `<data_root>/<dataset>/synth_meta.json` when the generator wrote one, else skips the check
    with a warning. meta.json is written last, so an index without it is incomplete.
    `text_field`: which refer sentence field becomes the model's text: `raw` (as annotated) or `sent`
    (refer's lower-cased, punctuation-free version, the one the authors feed to CLIP).
    """
    data_root, out_dir = Path(data_root), Path(out_dir)
    if mask_mode not in MASK_MODES:
        raise ValueError(f"unknown mask_mode {mask_mode!r}; expected one of {MASK_MODES}")
    if text_field not in TEXT_FIELDS:
        raise ValueError(f"unknown text_field {text_field!r}; expected one of {TEXT_FIELDS}")
    if split_by is None:
        if dataset not in DEFAULT_SPLIT_BY:
            raise IndexDataError(f"no default split_by for dataset {dataset!r} (known: "
                                 f"{', '.join(sorted(DEFAULT_SPLIT_BY))}); pass --split-by (split_by=) with the "
                                 f"name in its refs(<split_by>).p file, e.g. --split-by unc")
        split_by = DEFAULT_SPLIT_BY[dataset]
    expected, source = _expected_counts(data_root, dataset, split_by, expected_counts)
    refer = load_refer(data_root, dataset, split_by)

    rows: dict[str, list[dict]] = defaultdict(list)
    images_ok: dict[int, str] = {}
    skipped: Counter = Counter({"degenerate_polygons": 0, "objects_with_degenerate_polygons": 0})
    for ref in tqdm(sorted(refer.refs, key=lambda r: r["ref_id"]), desc=f"preprocess {dataset}",
                    unit="obj", disable=not progress):
        rid = ref["ref_id"]
        img = refer.images[ref["image_id"]]
        if ref["image_id"] not in images_ok:
            rel = f"{IMAGE_DIR}/{img['file_name']}"
            _check_image(data_root / rel, img, rid, refer.instances_file)
            images_ok[ref["image_id"]] = rel
        for s in ref["sentences"]:
            if not isinstance(s.get(text_field), str):
                raise ReferError(f"{refer.refs_file}: ref_id {rid} sentence {s['sent_id']} has no text field "
                                 f"{text_field!r}; use text_field 'raw'")
            if not clean_sentence(s[text_field]):
                raise ReferError(f"{refer.refs_file}: ref_id {rid} has an empty sentence (sent_id {s['sent_id']}, "
                                 f"{text_field} {s[text_field]!r}); a model cannot be scored on it")
        rle = refer.ref_rle(ref, mask_mode, stats=skipped)
        ann = refer.annotations[ref["ann_id"]]
        bbox = ann.get("bbox")
        if not (isinstance(bbox, list) and len(bbox) == 4):
            raise ReferError(f"{refer.instances_file}: ref_id {rid} (ann_id {ref['ann_id']}) has a malformed bbox {bbox!r}")
        rows[str(ref["split"])].append({
            "ref_id": rid, "ann_id": ref["ann_id"], "image_id": ref["image_id"],
            "category_id": ref["category_id"], "image_path": images_ok[ref["image_id"]],
            "width": int(img["width"]), "height": int(img["height"]),
            "sent_ids": [int(s["sent_id"]) for s in ref["sentences"]],
            "sentences_raw": [s["raw"] for s in ref["sentences"]],
            "sentences": [clean_sentence(s[text_field]) for s in ref["sentences"]],
            "bbox": [float(v) for v in bbox],
            "mask_counts": rle["counts"].decode("ascii") if isinstance(rle["counts"], bytes) else rle["counts"],
            "mask_area": int(mask_utils.area(rle)),
        })

    counts = {split: {"objects": len(r), "images": len({x["image_id"] for x in r}),
                      "sentences": sum(len(x["sent_ids"]) for x in r)} for split, r in sorted(rows.items())}
    if skipped["degenerate_polygons"]:
        log.warning("%s (%s): skipped %d polygon(s) of fewer than 3 points in %d object(s); each object kept "
                    "its other parts", dataset, split_by, skipped["degenerate_polygons"],
                    skipped["objects_with_degenerate_polygons"])
    if expected is None:
        log.warning("%s (%s): no expected counts given; counts not validated: %s", dataset, split_by, counts)
    else:
        check_counts(counts, expected, f"{dataset} ({split_by}) in {data_root}", source)

    out_dir.mkdir(parents=True, exist_ok=True)
    meta_path = out_dir / "meta.json"
    meta_path.unlink(missing_ok=True)  # the index is incomplete until meta.json is back
    for stale in out_dir.glob("*.parquet"):
        if stale.stem not in rows:
            stale.unlink()
    for split, split_rows in rows.items():
        table = pa.Table.from_pylist(split_rows, schema=SCHEMA)
        with atomic_open(index_path(out_dir, split)) as f:
            pq.write_table(table, f, compression="zstd")
    meta = {"format_version": INDEX_FORMAT_VERSION, "dataset": dataset, "split_by": split_by,
            "mask_mode": mask_mode, "text_field": text_field, "splits": sorted(rows), "counts": counts,
            "counts_validated_against": source, "skipped": dict(sorted(skipped.items())),
            "data_hash": data_hash(out_dir)}
    atomic_write_json(meta_path, meta)
    return meta
