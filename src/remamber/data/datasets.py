"""Torch datasets over the parquet indices written by `remamber.data.preprocess`.

`mode="train"`: one item per referred object; each epoch draws one sentence per object from a generator
seeded by (seed, epoch, index), so an epoch is reproducible and independent of worker count and order.
`mode="eval"`: one item per (object, sentence), in index order, with the mask at the original image size.
The index is read into plain Python lists at construction; images are opened per item, so no file handle
lives across a DataLoader fork.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from remamber.data.checks import ImageFileError, MissingImageError
from remamber.data.controls import TEXT_MODES, shuffled_sources
from remamber.data.preprocess import IndexDataError, index_path
from remamber.data.refer import decode_mask
from remamber.data.transforms import image_to_tensor, mask_to_tensor

MODES = ("train", "eval")
_STACKED = ("image", "mask")


class RefSegDataset(Dataset):
    """Referring segmentation samples of one split.

    Items (R = resolution):
      train: {"image": float32 (3, R, R), "mask": float32 (1, R, R) in {0,1}, "text": str, "ref_id": int,
              "sent_id": int}
      eval:  the same plus "orig_mask": bool ndarray (H, W), "orig_size": (H, W), "image_path": str
    """

    def __init__(self, index_dir: str | os.PathLike, split: str, mode: str, resolution: int,
                 data_root: str | os.PathLike, seed: int = 0, max_items: int | None = None,
                 text: str = "matched", cache_max_bytes: int = 0):
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
        if not isinstance(resolution, int) or resolution <= 0:
            raise ValueError(f"resolution must be a positive integer, got {resolution!r}")
        if max_items is not None and max_items <= 0:
            raise ValueError(f"max_items must be positive or None, got {max_items!r}")
        path = index_path(index_dir, split)
        if not (Path(index_dir) / "meta.json").is_file():
            raise FileNotFoundError(f"{Path(index_dir) / 'meta.json'}: not found; {index_dir} is not a complete "
                                    f"processed index (run preprocessing)")
        if not path.is_file():
            available = sorted(p.stem for p in Path(index_dir).glob("*.parquet"))
            raise FileNotFoundError(f"{path}: no index for split {split!r}; available: {available}")
        columns = ["ref_id", "image_path", "width", "height", "sent_ids", "sentences", "mask_counts"]
        table = pq.read_table(path, columns=columns).to_pydict()
        self.index_dir, self.split, self.mode = Path(index_dir), split, mode
        self.resolution, self.data_root, self.seed = resolution, Path(data_root), int(seed)
        self.epoch = 0
        self._objects: list[dict[str, Any]] = [dict(zip(columns, values)) for values in zip(*table.values())]
        for row, obj in enumerate(self._objects):
            if not obj["sentences"]:
                raise IndexDataError(f"{path}: row {row} (ref_id {obj['ref_id']}) has no sentences")
            for j, sentence in enumerate(obj["sentences"]):
                if not sentence or not sentence.strip():  # scored silently as an empty prompt otherwise
                    raise IndexDataError(f"{path}: row {row} (ref_id {obj['ref_id']}) has an empty sentence "
                                         f"(sentence {j}, sent_id {obj['sent_ids'][j]}); preprocess the data again")
        self.num_objects = len(self._objects)
        self.num_sentences = sum(len(o["sentences"]) for o in self._objects)
        if mode == "eval":
            self._items = [(i, j) for i, o in enumerate(self._objects) for j in range(len(o["sentences"]))]
        else:
            self._items = [(i, -1) for i in range(self.num_objects)]
        if max_items is not None:
            self._items = self._items[:max_items]
        # The shuffled-text control (remamber.data.controls): item i reads the sentence of item
        # _text_source[i], which belongs to another image.
        if text not in TEXT_MODES:
            raise ValueError(f"text must be one of {TEXT_MODES}, got {text!r}")
        if text == "shuffled" and mode != "eval":
            raise ValueError("the shuffled-text control is an evaluation: use mode='eval'")
        self.text = text
        # Train mode, no augmentation: an object's resized image and mask are the same every epoch. Keep
        # them in memory when they fit in cache_max_bytes (small sets: the CPU demo), else read per item.
        per_object = 4 * 4 * resolution * resolution  # float32 image (3 channels) + mask (1)
        self._decoded: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = (
            {} if mode == "train" and self.num_objects * per_object <= cache_max_bytes else None)
        self._text_source: list[int] | None = None
        if text == "shuffled":
            self._text_source = shuffled_sources([self._objects[i]["image_path"] for i, _ in self._items], self.seed)

    def set_epoch(self, epoch: int) -> None:
        """Select the sentence draw of `epoch` (train mode); call at the start of every epoch."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self._items)

    def sentences(self) -> list[str]:
        """Every sentence an item can read (train: all of each object's; eval: each item's own; the
        shuffled control reads the same set), in index order, repeats kept."""
        return [sentence for obj_i, sent_j in self._items
                for sentence in (self._objects[obj_i]["sentences"] if sent_j < 0
                                 else [self._objects[obj_i]["sentences"][sent_j]])]

    def sentence_index(self, index: int) -> int:
        """The sentence drawn for item `index` in the current epoch (train) or the item's own (eval)."""
        obj_i, sent_j = self._items[index]
        if sent_j >= 0:
            return sent_j
        rng = np.random.default_rng([self.seed, self.epoch, obj_i])
        return int(rng.integers(len(self._objects[obj_i]["sentences"])))

    def __getitem__(self, index: int) -> dict[str, Any]:
        obj_i, _ = self._items[index]
        obj = self._objects[obj_i]
        j = self.sentence_index(index)
        if self._decoded is not None and obj_i in self._decoded:
            image, mask_t = self._decoded[obj_i]
            return {"image": image, "mask": mask_t, "text": obj["sentences"][j], "ref_id": int(obj["ref_id"]),
                    "sent_id": int(obj["sent_ids"][j])}
        image_file = self.data_root / obj["image_path"]
        try:
            with Image.open(image_file) as im:
                im.load()
                if im.size != (obj["width"], obj["height"]):
                    raise ImageFileError(f"{image_file}: size {im.size} differs from the index "
                                         f"({obj['width']}, {obj['height']}) for ref_id {obj['ref_id']}")
                image = image_to_tensor(im, self.resolution)
        except FileNotFoundError as exc:
            raise MissingImageError(f"{image_file}: image of ref_id {obj['ref_id']} is missing") from exc
        except (UnidentifiedImageError, OSError) as exc:
            if isinstance(exc, ImageFileError):
                raise
            # PIL's own message ("image file is truncated") does not say which file
            raise ImageFileError(f"{image_file}: image of ref_id {obj['ref_id']} cannot be read ({exc}); the file "
                                 f"is truncated or corrupt: fetch and extract (or synthesise) it again") from exc
        mask = decode_mask(obj["mask_counts"], obj["height"], obj["width"])  # bool (H, W)
        text = obj["sentences"][j]
        if self._text_source is not None:
            src_i, src_j = self._items[self._text_source[index]]
            text = self._objects[src_i]["sentences"][src_j]
        item: dict[str, Any] = {
            "image": image,
            "mask": mask_to_tensor(mask, self.resolution),
            "text": text,
            "ref_id": int(obj["ref_id"]),
            "sent_id": int(obj["sent_ids"][j]),
        }
        if self._decoded is not None:
            self._decoded[obj_i] = (item["image"], item["mask"])
        if self.mode == "eval":
            item["orig_mask"] = mask
            item["orig_size"] = (int(obj["height"]), int(obj["width"]))
            item["image_path"] = obj["image_path"]
        return item


def collate_batch(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack "image" (B, 3, R, R) and "mask" (B, 1, R, R); every other key becomes a list of length B."""
    if not items:
        raise ValueError("collate_batch needs at least one item")
    out: dict[str, Any] = {}
    for key in items[0]:
        values = [it[key] for it in items]
        out[key] = torch.stack(values) if key in _STACKED else values
    return out
