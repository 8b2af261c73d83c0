"""Checks of a processed index that a job runs before spending time on it.

`check_images` finds every missing image of the splits a job reads before the first step (a missing val
image used to surface after a whole training epoch). `count_long_sentences` counts the sentences the text
encoder will cut at `max_text_len` tokens, so truncation is reported instead of silent.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any
from pathlib import Path

import pyarrow.parquet as pq

from remamber.data.preprocess import index_path
from remamber.errors import RemamberError

log = logging.getLogger(__name__)


class ImageFileError(RemamberError, OSError):
    """An image an index names is missing, unreadable (truncated, not an image) or of the wrong size."""


class MissingImageError(ImageFileError, FileNotFoundError):
    """An image an index names is not there."""


def _column(index_dir: str | os.PathLike, split: str, name: str) -> list:
    path = index_path(index_dir, split)
    if not path.is_file():
        available = sorted(p.stem for p in Path(index_dir).glob("*.parquet"))
        raise FileNotFoundError(f"{path}: no index for split {split!r}; available: {available}")
    return pq.read_table(path, columns=[name]).column(name).to_pylist()


def check_images(index_dir: str | os.PathLike, splits: Iterable[str], data_root: str | os.PathLike) -> int:
    """Raise ImageFileError naming the missing files (the first 5 and how many) when an image of one of
    `splits` is not under `data_root`; returns the number of distinct images checked. Only existence is
    checked (a stat per image): decoding every image would cost as much as an epoch."""
    data_root = Path(data_root)
    missing: dict[str, list[str]] = {}
    seen: set[str] = set()
    for split in splits:
        for rel in _column(index_dir, split, "image_path"):
            if rel in seen:
                continue
            seen.add(rel)
            if not (data_root / rel).is_file():
                missing.setdefault(split, []).append(rel)
    if missing:
        n = sum(len(v) for v in missing.values())
        first = [str(data_root / rel) for rels in missing.values() for rel in rels][:5]
        per_split = ", ".join(f"{split}: {len(rels)}" for split, rels in missing.items())
        raise MissingImageError(f"{data_root}: {n} image(s) named by the index {index_dir} are missing ({per_split}), "
                             f"e.g. {', '.join(first)}; fetch/extract (or synthesise) the data again")
    return len(seen)


def count_long_sentences(sentences: Sequence[str], token_lengths: Callable[[list[str]], list[int]],
                         max_len: int, where: str, batch: int = 4096) -> int:
    """How many `sentences` are longer than `max_len` tokens (special tokens included), logged as a
    warning with the longest length; `token_lengths` maps a list of texts to their untruncated lengths."""
    long, longest = 0, 0
    for i in range(0, len(sentences), batch):
        lengths = token_lengths(list(sentences[i:i + batch]))
        long += sum(n > max_len for n in lengths)
        longest = max([longest, *lengths])
    if long:
        log.warning("%s: %d of %d sentences are longer than max_text_len = %d tokens (longest %d) and are "
                    "truncated", where, long, len(sentences), max_len, longest)
    return long


def split_sentences(index_dir: str | os.PathLike, split: str) -> list[str]:
    """Every sentence of a split's index, in index order."""
    return [s for sents in _column(index_dir, split, "sentences") for s in sents]


def hf_token_lengths(tokenizer) -> Callable[[list[str]], list[int]]:
    """`token_lengths` for a Hugging Face tokenizer (what `TextEncoder.tokenize` uses, without truncation)."""
    def lengths(texts: list[str]) -> list[int]:
        return [len(ids) for ids in tokenizer(texts, truncation=False)["input_ids"]]
    return lengths


def _tokenizer_and_limit(model) -> tuple[Any, int | None]:
    """The model's Hugging Face tokenizer and max_text_len (None, None without such a text encoder)."""
    encoder = getattr(model, "text_encoder", None)
    tokenizer, max_len = getattr(encoder, "tokenizer", None), getattr(encoder, "max_text_len", None)
    if tokenizer is None or max_len is None:
        return None, None
    return tokenizer, int(max_len)


def report_long_sentences(model, index_dir: str | os.PathLike, splits: Iterable[str]) -> dict[str, int]:
    """count_long_sentences for each split with the model's own tokenizer and max_text_len (None when the
    model has no Hugging Face text encoder); returns {split: count}."""
    tokenizer, max_len = _tokenizer_and_limit(model)
    if tokenizer is None:
        return {}
    counter = hf_token_lengths(tokenizer)
    return {split: count_long_sentences(split_sentences(index_dir, split), counter, max_len,
                                        f"{index_path(index_dir, split)}")
            for split in splits}


def report_long_text(model, text: str) -> int | None:
    """The token count of one expression (prediction on one's own image), with a warning when the text
    encoder will cut it at max_text_len; None when the model has no Hugging Face text encoder."""
    tokenizer, max_len = _tokenizer_and_limit(model)
    if tokenizer is None:
        return None
    [n] = hf_token_lengths(tokenizer)([text])
    if n > max_len:
        log.warning("the text has %d tokens, more than max_text_len = %d: only its first %d are read "
                    "(special tokens included)", n, max_len, max_len)
    return n
