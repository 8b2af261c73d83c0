"""The embedded default: a synthetic referring dataset in exactly the refer layout and format.

`write_synthetic(out_dir, seed, size)` writes
    out_dir/train2014/COCO_train2014_<id:012d>.jpg          the images (shared by the three datasets)
    out_dir/refcoco/refs(unc).p, instances.json, synth_meta.json     train / val / testA / testB
    out_dir/refcoco+/refs(unc).p, instances.json, synth_meta.json    same scenes, no absolute location words
    out_dir/refcocog/refs(umd).p, instances.json, synth_meta.json    own scenes, longer expressions, train/val/test

Each image holds 3-5 filled shapes on a mildly textured background; every referred object has a distractor
of the same shape or the same colour, and every expression is checked to single out its object among all
objects of the image (by colour, shape, size, absolute position, ordinal or a relation to a landmark), so
a model that ignores the text cannot do well. As in RefCOCO, testA targets are people ("person" figures)
and testB targets are the other shapes. Files are bit-identical for the same seed (fixed JPEG settings,
protocol-2 pickles, sorted JSON, no timestamps).
"""

from __future__ import annotations

import io
import json
import math
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils
from tqdm.auto import tqdm

from remamber.fileio import atomic_write_bytes, atomic_write_json
from remamber.vocabulary import DATASETS as VOCABULARY_DATASETS

GENERATOR_VERSION = 1
JPEG_QUALITY = 90
IMAGE_DIR = "train2014"

# Images per split for each size; objects per split are about 2.7x these numbers. The demo trains a few
# hundred steps: ~1,800 objects per dataset (about 3 epochs) learn the language without being memorised,
# and ~48 images per evaluated split keep the 21 models' evaluations cheap.
SIZES: dict[str, dict[str, dict[str, int]]] = {
    "tiny": {"unc": {"train": 4, "val": 2, "testA": 2, "testB": 2}, "umd": {"train": 4, "val": 2, "test": 2}},
    "demo": {"unc": {"train": 600, "val": 48, "testA": 48, "testB": 48}, "umd": {"train": 600, "val": 48, "test": 48}},
    "small": {"unc": {"train": 600, "val": 100, "testA": 100, "testB": 100},
              "umd": {"train": 600, "val": 100, "test": 100}},
}
DATASETS = {name: facts.split_by for name, facts in VOCABULARY_DATASETS.items()}  # name -> split_by

# (id, name, supercategory); "person" is the people-like family of testA.
CATEGORIES = [(1, "person", "people"), (2, "circle", "shape"), (3, "square", "shape"),
              (4, "triangle", "shape"), (5, "diamond", "shape")]
CAT_ID = {name: cid for cid, name, _ in CATEGORIES}
NOUNS = {"person": ["person", "figure", "guy"], "circle": ["circle", "disc", "ball"],
         "square": ["square", "box", "block"], "triangle": ["triangle"], "diamond": ["diamond", "rhombus"]}
PLURAL = {"person": "people", "box": "boxes", "rhombus": "rhombuses"}
COLOURS = {"red": (215, 40, 40), "green": (40, 160, 60), "blue": (45, 85, 215), "yellow": (240, 205, 35),
           "purple": (140, 60, 185), "orange": (245, 135, 25)}
# Words RefCOCO+ forbids (absolute location); the generator never emits them there.
LOCATION_WORDS = frozenset({"left", "right", "top", "bottom", "upper", "lower", "above", "below", "leftmost",
                            "rightmost", "middle", "center", "centre", "first", "second", "third", "fourth"})
ORDINALS = ["first", "second", "third", "fourth", "fifth"]
GAP = 10.0  # px: positions closer than this are not "left of" each other
SIZE_RATIO = 1.3  # a "bigger" object is at least this much larger (radius) than the next one


@dataclass
class SynthObject:
    ann_id: int
    category: str
    colour: str
    cx: float
    cy: float
    r: float
    polygons: list[list[float]]  # COCO polygons (x0, y0, x1, y1, ...)


@dataclass
class SynthImage:
    image_id: int
    width: int
    height: int
    objects: list[SynthObject]
    jpeg: bytes = b""

    @property
    def file_name(self) -> str:
        return f"COCO_train2014_{self.image_id:012d}.jpg"


@dataclass
class SynthRef:
    ref_id: int
    ann_id: int
    image_id: int
    category_id: int
    split: str
    sentences: list[dict[str, Any]]  # {"raw", "sent", "sent_id", "tokens"}


@dataclass
class SynthData:
    seed: int
    size: str
    images: dict[int, SynthImage] = field(default_factory=dict)
    refs: dict[str, list[SynthRef]] = field(default_factory=dict)  # dataset -> refs

    def counts(self, dataset: str) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for ref in self.refs[dataset]:
            c = out.setdefault(ref.split, {"objects": 0, "images": set(), "sentences": 0})
            c["objects"] += 1
            c["images"].add(ref.image_id)
            c["sentences"] += len(ref.sentences)
        return {s: {"objects": c["objects"], "images": len(c["images"]), "sentences": c["sentences"]}
                for s, c in sorted(out.items())}


# ----------------------------------------------------------------------------------------------- geometry
def _round(values: list[float]) -> list[float]:
    return [round(float(v), 2) for v in values]


def _regular(cx: float, cy: float, rx: float, ry: float, n: int, phase: float = 0.0) -> list[float]:
    pts: list[float] = []
    for k in range(n):
        a = phase + 2 * math.pi * k / n
        pts += [cx + rx * math.cos(a), cy + ry * math.sin(a)]
    return pts


def shape_polygons(category: str, cx: float, cy: float, r: float) -> list[list[float]]:
    """COCO polygons of a shape inside the box (cx +- r, cy +- r). A person is two parts (head, body) that
    overlap by a thin band, as multi-part COCO annotations do."""
    if category == "circle":
        return [_round(_regular(cx, cy, r, r, 28))]
    if category == "square":
        s = 0.85 * r
        return [_round([cx - s, cy - s, cx + s, cy - s, cx + s, cy + s, cx - s, cy + s])]
    if category == "triangle":
        return [_round([cx, cy - r, cx + 0.95 * r, cy + 0.75 * r, cx - 0.95 * r, cy + 0.75 * r])]
    if category == "diamond":
        return [_round([cx, cy - r, cx + 0.75 * r, cy, cx, cy + r, cx - 0.75 * r, cy])]
    if category == "person":
        head_r = 0.36 * r
        head = _regular(cx, cy - r + head_r, head_r, head_r, 16)
        top, bottom = cy - r + 1.8 * head_r, cy + r  # body starts inside the head: a thin overlap band
        body = [cx - 0.32 * r, top, cx + 0.32 * r, top, cx + 0.62 * r, bottom, cx - 0.62 * r, bottom]
        return [_round(head), _round(body)]
    raise ValueError(f"unknown synthetic category {category!r}")


def polygons_rle(polygons: list[list[float]], height: int, width: int) -> dict:
    """Union RLE of polygon parts."""
    return mask_utils.merge(mask_utils.frPyObjects(polygons, height, width), intersect=False)


# ----------------------------------------------------------------------------------------------- scenes
def _sample_objects(rng: np.random.Generator, kind: str, width: int, height: int,
                    first_ann_id: int) -> list[SynthObject] | None:
    """3-5 non-overlapping shapes, most sharing a shape or a colour with another; None if placement failed."""
    n = int(rng.integers(3, 6))
    shapes = [c for _, c, _ in CATEGORIES]
    things = [c for c in shapes if c != "person"]
    colours = list(COLOURS)
    specs: list[tuple[str, str]] = []
    if kind == "people":
        n_people = int(rng.integers(2, min(n, 3) + 1))
        specs += [("person", str(rng.choice(colours))) for _ in range(n_people)]
    pool = things if kind == "things" else shapes
    if kind == "things" and rng.random() < 0.5:
        specs.append(("person", str(rng.choice(colours))))
    while len(specs) < n:
        u = rng.random()
        if specs and u < 0.45:  # a same-shape distractor
            specs.append((specs[int(rng.integers(len(specs)))][0], str(rng.choice(colours))))
        elif specs and u < 0.8:  # a same-colour distractor
            specs.append((str(rng.choice(pool)), specs[int(rng.integers(len(specs)))][1]))
        else:
            specs.append((str(rng.choice(pool)), str(rng.choice(colours))))
    order = rng.permutation(len(specs))
    objects: list[SynthObject] = []
    for k, idx in enumerate(order):
        category, colour = specs[idx]
        for _ in range(200):
            r = float(rng.uniform(15.0, 30.0))
            cx = float(rng.uniform(r + 3, width - r - 3))
            cy = float(rng.uniform(r + 3, height - r - 3))
            if all(math.hypot(cx - o.cx, cy - o.cy) > r + o.r + 4 for o in objects):
                break
        else:
            return None
        objects.append(SynthObject(first_ann_id + k, category, colour, round(cx, 2), round(cy, 2), round(r, 2),
                                   shape_polygons(category, cx, cy, r)))
    return objects


def _render(objects: list[SynthObject], width: int, height: int, rng: np.random.Generator) -> bytes:
    """JPEG bytes: a light background with a gentle gradient, flat-filled shapes, slight noise."""
    base = rng.uniform(185, 235) + rng.uniform(-12, 12, size=3)
    angle = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    ramp = ((xx / width - 0.5) * math.cos(angle) + (yy / height - 0.5) * math.sin(angle)) * rng.uniform(10, 30)
    canvas = Image.fromarray(np.clip(base[None, None, :] + ramp[..., None], 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(canvas)
    for obj in objects:
        fill = tuple(int(np.clip(c + rng.integers(-12, 13), 0, 255)) for c in COLOURS[obj.colour])
        for poly in obj.polygons:
            draw.polygon(list(zip(poly[0::2], poly[1::2])), fill=fill)
    arr = np.asarray(canvas, dtype=np.float32) + rng.normal(0.0, 4.0, size=(height, width, 3))
    buf = io.BytesIO()
    Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "RGB").save(
        buf, format="JPEG", quality=JPEG_QUALITY, subsampling=0, optimize=False, progressive=False)
    return buf.getvalue()


# ----------------------------------------------------------------------------------------------- language
def _plural(noun: str) -> str:
    return PLURAL.get(noun, noun + "s")


@dataclass
class _Candidate:
    kind: str  # attr | size | relation | location | ordinal
    short: str  # RefCOCO style
    long: str  # G-Ref style


def _candidates(t: SynthObject, objs: list[SynthObject], rng: np.random.Generator) -> list[_Candidate]:
    """Expressions that single out `t` among `objs` (all objects of the image)."""
    noun = str(rng.choice(NOUNS[t.category]))
    colour = t.colour
    size_adj = "large " if t.r >= 24 else "small " if t.r <= 17 else ""
    full = f"{size_adj}{colour} {noun}"
    same_shape = [o for o in objs if o.category == t.category]
    same_cs = [o for o in same_shape if o.colour == colour]
    same_colour = [o for o in objs if o.colour == colour]
    out: list[_Candidate] = []
    if len(same_cs) == 1:
        out.append(_Candidate("attr", f"{colour} {noun}", str(rng.choice(
            [f"the {full} in the picture", f"a {full} on the plain background", f"the {colour} coloured {noun}"]))))
    if len(same_shape) == 1:
        out.append(_Candidate("attr", noun, f"the only {noun} in the image, which is {colour}"))
    if len(same_colour) == 1:
        thing = str(rng.choice(["one", "shape", "object", "thing"]))
        out.append(_Candidate("attr", f"{colour} {thing}", f"the only {colour} object, a {size_adj}{noun}"))

    groups = [(same_shape, noun)]
    if 1 < len(same_cs) < len(same_shape):
        groups.append((same_cs, f"{colour} {noun}"))
    for group, label in groups:
        n = len(group)
        if n < 2:
            continue
        others = [o for o in group if o is not t]
        plural = _plural(noun)
        # size
        if t.r >= SIZE_RATIO * max(o.r for o in others):
            word = "bigger" if n == 2 else "biggest"
            out.append(_Candidate("size", f"{word} {label}", f"the {colour} {noun} that is bigger than the other {plural}"))
        if t.r * SIZE_RATIO <= min(o.r for o in others):
            word = "smaller" if n == 2 else "smallest"
            out.append(_Candidate("size", f"{word} {label}", f"the {colour} {noun} which is smaller than the other {plural}"))
        # absolute position
        for axis, lo_word, hi_word, lo_long, hi_long in (
                ("cx", "left", "right", "on the left side of the image", "on the right side of the image"),
                ("cy", "top", "bottom", "near the top of the picture", "at the bottom of the picture")):
            pos_t, pos_o = getattr(t, axis), [getattr(o, axis) for o in others]
            if pos_t + GAP < min(pos_o):
                short = (f"{lo_word} {label}" if n == 2 else f"{lo_word}most {label}") if axis == "cx" else f"{lo_word} {label}"
                out.append(_Candidate("location", short, f"the {full} {lo_long}"))
            if pos_t - GAP > max(pos_o):
                short = (f"{hi_word} {label}" if n == 2 else f"{hi_word}most {label}") if axis == "cx" else f"{hi_word} {label}"
                out.append(_Candidate("location", short, f"the {full} {hi_long}"))
        # ordinal from the left / right
        xs = sorted(o.cx for o in group)
        if n >= 3 and min(b - a for a, b in zip(xs, xs[1:])) >= GAP:
            k = xs.index(t.cx)
            if 0 < k < n - 1:
                side, pos = ("left", k) if rng.random() < 0.5 else ("right", n - 1 - k)
                out.append(_Candidate("ordinal", f"{ORDINALS[pos]} {label} from the {side}",
                                      f"the {full} that is the {ORDINALS[pos]} {noun} counting from the {side}"))
        # relations to a landmark of another shape, named by a unique colour + shape
        for lm in objs:
            if lm.category == t.category or sum(o.category == lm.category and o.colour == lm.colour for o in objs) != 1:
                continue
            lm_name = f"{lm.colour} {NOUNS[lm.category][0]}"
            d_t = math.hypot(t.cx - lm.cx, t.cy - lm.cy)
            if d_t <= 0.7 * min(math.hypot(o.cx - lm.cx, o.cy - lm.cy) for o in others):
                word = str(rng.choice(["next to", "closest to", "near", "beside"]))
                out.append(_Candidate("relation", f"{label} {word} the {lm_name}",
                                      f"the {full} that is {word} the {lm_name}"))
            if t.cx < lm.cx - GAP and all(o.cx > lm.cx + GAP for o in others):
                out.append(_Candidate("location", f"{label} left of the {lm_name}", f"the {full} to the left of the {lm_name}"))
            if t.cx > lm.cx + GAP and all(o.cx < lm.cx - GAP for o in others):
                out.append(_Candidate("location", f"{label} right of the {lm_name}", f"the {full} to the right of the {lm_name}"))
            if t.cy < lm.cy - GAP and all(o.cy > lm.cy + GAP for o in others):
                out.append(_Candidate("location", f"{label} above the {lm_name}", f"the {full} just above the {lm_name}"))
            if t.cy > lm.cy + GAP and all(o.cy < lm.cy - GAP for o in others):
                out.append(_Candidate("location", f"{label} below the {lm_name}", f"the {full} below the {lm_name}"))
    return out


def _surface(text: str, rng: np.random.Generator, article: bool) -> str:
    """Raw expression as an annotator might type it: optional article, sometimes capitalised."""
    if article and rng.random() < 0.4:
        text = "the " + text
    if rng.random() < 0.3:
        text = text[0].upper() + text[1:]
    return text


def _sentences_for(dataset: str, t: SynthObject, objs: list[SynthObject], rng: np.random.Generator) -> list[str]:
    cands = _candidates(t, objs, rng)
    if dataset == "refcoco+":
        cands = [c for c in cands if c.kind in ("attr", "size", "relation")]
    texts = list(dict.fromkeys(c.long if dataset == "refcocog" else c.short for c in cands))
    if not texts:
        return []
    k = int(rng.integers(1, 3 if dataset == "refcocog" else 4))
    picks = rng.permutation(len(texts))[:k]
    return [_surface(texts[i], rng, article=dataset != "refcocog") for i in sorted(picks)]


# ----------------------------------------------------------------------------------------------- assembly
def generate(seed: int = 0, size: str = "demo", progress: bool = False) -> SynthData:
    """Build the synthetic data in memory (images as JPEG bytes); `write_synthetic` writes it out."""
    if size not in SIZES:
        raise ValueError(f"unknown synthetic size {size!r}; expected one of {sorted(SIZES)}")
    data = SynthData(seed=int(seed), size=size, refs={d: [] for d in DATASETS})
    scenes: list[tuple[str, str, SynthImage, np.random.Generator]] = []  # (split_by, split, image, rng)
    next_image_id, next_ann_id = 1, 1
    for family_code, split_by in enumerate(("unc", "umd")):
        for split, n_images in SIZES[size][split_by].items():
            kind = {"testA": "people", "testB": "things"}.get(split, "mixed")
            for i in range(n_images):
                rng = np.random.default_rng([int(seed), family_code, len(scenes), i])
                while True:
                    w, h = int(rng.integers(128, 161)), int(rng.integers(128, 161))
                    objs = _sample_objects(rng, kind, w, h, next_ann_id)
                    if objs is not None:
                        break
                image = SynthImage(next_image_id, w, h, objs)
                scenes.append((split_by, split, image, rng))
                next_image_id += 1
                next_ann_id += len(objs)

    ref_ids = {d: 0 for d in DATASETS}
    sent_ids = {d: 0 for d in DATASETS}
    for scene_i, (split_by, split, image, rng) in enumerate(tqdm(scenes, desc="synth scenes", disable=not progress)):
        kind = {"testA": "people", "testB": "things"}.get(split, "mixed")
        used = False
        for d_code, (dataset, d_split_by) in enumerate(DATASETS.items()):
            if d_split_by != split_by:
                continue
            lang = np.random.default_rng([int(seed), 7 + d_code, scene_i])
            for obj in image.objects:
                eligible = (kind == "mixed" or (kind == "people") == (obj.category == "person"))
                # every target has a distractor of the same kind (same shape or same colour)
                eligible = eligible and any(o is not obj and (o.category == obj.category or o.colour == obj.colour)
                                            for o in image.objects)
                if not eligible or (kind == "mixed" and lang.random() < 0.2):
                    continue
                texts = _sentences_for(dataset, obj, image.objects, lang)
                if not texts:
                    continue
                sentences = []
                for raw in texts:
                    sent = " ".join(raw.lower().split())
                    sentences.append({"tokens": sent.split(), "raw": raw, "sent_id": sent_ids[dataset], "sent": sent})
                    sent_ids[dataset] += 1
                data.refs[dataset].append(SynthRef(ref_ids[dataset], obj.ann_id, image.image_id,
                                                   CAT_ID[obj.category], split, sentences))
                ref_ids[dataset] += 1
                used = True
        if used:
            image.jpeg = _render(image.objects, image.width, image.height, rng)
            data.images[image.image_id] = image
    return data


def _instances(data: SynthData, dataset: str) -> dict[str, Any]:
    image_ids = sorted({r.image_id for r in data.refs[dataset]})
    images, annotations = [], []
    for image_id in image_ids:
        img = data.images[image_id]
        images.append({"id": img.image_id, "file_name": img.file_name, "height": img.height, "width": img.width,
                       "license": 0, "coco_url": "", "flickr_url": "", "date_captured": ""})
        for obj in img.objects:
            rle = polygons_rle(obj.polygons, img.height, img.width)
            x, y, w, h = (float(v) for v in mask_utils.toBbox(rle))
            annotations.append({"id": obj.ann_id, "image_id": img.image_id, "category_id": CAT_ID[obj.category],
                                "segmentation": obj.polygons, "area": float(mask_utils.area(rle)),
                                "bbox": [round(x, 2), round(y, 2), round(w, 2), round(h, 2)], "iscrowd": 0})
    categories = [{"id": cid, "name": name, "supercategory": sup} for cid, name, sup in CATEGORIES]
    return {"info": {"description": f"remamber synthetic {dataset}", "version": str(GENERATOR_VERSION)},
            "images": images, "annotations": annotations, "categories": categories}


def _refs_pickle(data: SynthData, dataset: str) -> bytes:
    refs = []
    for r in data.refs[dataset]:
        img = data.images[r.image_id]
        refs.append({"sent_ids": [s["sent_id"] for s in r.sentences],
                     "file_name": f"{img.file_name[:-4]}_{r.ann_id}.jpg", "ann_id": r.ann_id, "ref_id": r.ref_id,
                     "image_id": r.image_id, "split": r.split, "sentences": r.sentences,
                     "category_id": r.category_id})
    return pickle.dumps(refs, protocol=2)


def write_synthetic(out_dir: str | os.PathLike, seed: int = 0, size: str = "demo",
                    progress: bool = True) -> dict[str, dict[str, dict[str, int]]]:
    """Write the synthetic refcoco / refcoco+ / refcocog (see module doc); returns their counts per split.

    `synth_meta.json` of each dataset is written last; preprocessing validates its counts against it.
    """
    out_dir = Path(out_dir)
    data = generate(seed, size, progress=progress)
    for image in tqdm(data.images.values(), desc="synth images", disable=not progress):
        atomic_write_bytes(out_dir / IMAGE_DIR / image.file_name, image.jpeg)
    summary = {}
    for dataset, split_by in DATASETS.items():
        ddir = out_dir / dataset
        (ddir / "synth_meta.json").unlink(missing_ok=True)
        instances = json.dumps(_instances(data, dataset), sort_keys=True, separators=(",", ":"))
        atomic_write_bytes(ddir / "instances.json", instances.encode("utf-8"))
        atomic_write_bytes(ddir / f"refs({split_by}).p", _refs_pickle(data, dataset))
        counts = data.counts(dataset)
        atomic_write_json(ddir / "synth_meta.json", {"generator": "remamber.data.synth", "version": GENERATOR_VERSION,
                                                     "seed": int(seed), "size": size, "split_by": split_by,
                                                     "counts": counts})
        summary[dataset] = counts
    return summary
