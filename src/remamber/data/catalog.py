"""Loader of `params/datasets.yaml`: archive sources and checksums, expected counts, pretrained names.

Validation is strict: a missing or unknown key, or a value of the wrong type, is an error naming the file
and the key path.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from remamber.errors import RemamberError

DEFAULT_DATASETS_YAML = Path("params") / "datasets.yaml"
COUNT_KEYS = ("objects", "images", "sentences")
HASH_ALGOS = ("sha256", "md5")


class CatalogError(RemamberError, ValueError):
    """A malformed datasets.yaml (the message names the file and the key)."""


@dataclass(frozen=True)
class ArchiveSpec:
    name: str
    filename: str
    urls: tuple[str, ...]
    size: int
    algo: str  # "sha256" | "md5"
    checksum: str  # lowercase hex digest
    num_images: int | None = None


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    archives: tuple[str, ...]
    split_by: str
    counts: dict[str, dict[str, int]]  # split -> {objects, images, sentences}


@dataclass(frozen=True)
class Catalog:
    path: Path
    archives: dict[str, ArchiveSpec]
    datasets: dict[str, DatasetSpec]
    pretrained: dict[str, Any] = field(default_factory=dict)

    def archive(self, name: str) -> ArchiveSpec:
        """Look an archive up by key (`refcoco`) or file name (`refcoco.zip`)."""
        if name in self.archives:
            return self.archives[name]
        for spec in self.archives.values():
            if spec.filename == name:
                return spec
        raise CatalogError(f"{self.path}: unknown archive {name!r}; known: {sorted(self.archives)}")

    def dataset(self, name: str) -> DatasetSpec:
        if name not in self.datasets:
            raise CatalogError(f"{self.path}: unknown dataset {name!r}; known: {sorted(self.datasets)}")
        return self.datasets[name]


def _require_mapping(value: Any, where: str, path: Path) -> dict:
    if not isinstance(value, dict):
        raise CatalogError(f"{path}: {where} must be a mapping, got {type(value).__name__}")
    return value


def _check_keys(d: dict, required: set[str], optional: set[str], where: str, path: Path) -> None:
    missing = required - d.keys()
    if missing:
        raise CatalogError(f"{path}: {where} is missing key(s) {sorted(missing)}")
    unknown = d.keys() - required - optional
    if unknown:
        raise CatalogError(f"{path}: {where} has unknown key(s) {sorted(unknown)} (allowed: "
                           f"{sorted(required | optional)})")


def _int(value: Any, where: str, path: Path) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise CatalogError(f"{path}: {where} must be a non-negative integer, got {value!r}")
    return value


def _parse_archive(name: str, d: Any, path: Path) -> ArchiveSpec:
    where = f"archives.{name}"
    d = _require_mapping(d, where, path)
    _check_keys(d, {"filename", "urls", "size"}, {"sha256", "md5", "num_images"}, where, path)
    algos = [a for a in HASH_ALGOS if a in d]
    if len(algos) != 1:
        raise CatalogError(f"{path}: {where} needs exactly one checksum key of {list(HASH_ALGOS)}, got {algos}")
    algo = algos[0]
    digest = d[algo]
    expected_len = {"sha256": 64, "md5": 32}[algo]
    if not isinstance(digest, str) or len(digest) != expected_len or any(c not in "0123456789abcdefABCDEF" for c in digest):
        raise CatalogError(f"{path}: {where}.{algo} must be {expected_len} hex digits, got {digest!r}")
    urls = d["urls"]
    if not isinstance(urls, list) or not urls or not all(isinstance(u, str) and "://" in u for u in urls):
        raise CatalogError(f"{path}: {where}.urls must be a non-empty list of URLs, got {urls!r}")
    filename = d["filename"]
    if not isinstance(filename, str) or not filename or os.sep in filename or "/" in filename:
        raise CatalogError(f"{path}: {where}.filename must be a plain file name, got {filename!r}")
    num_images = d.get("num_images")
    return ArchiveSpec(name=name, filename=filename, urls=tuple(urls), size=_int(d["size"], f"{where}.size", path),
                       algo=algo, checksum=digest.lower(),
                       num_images=None if num_images is None else _int(num_images, f"{where}.num_images", path))


def parse_counts(d: Any, where: str, path: Path | str) -> dict[str, dict[str, int]]:
    """Validate a `{split: {objects, images, sentences}}` mapping."""
    path = Path(path)
    d = _require_mapping(d, where, path)
    out: dict[str, dict[str, int]] = {}
    for split, counts in d.items():
        counts = _require_mapping(counts, f"{where}.{split}", path)
        _check_keys(counts, set(COUNT_KEYS), set(), f"{where}.{split}", path)
        out[str(split)] = {k: _int(counts[k], f"{where}.{split}.{k}", path) for k in COUNT_KEYS}
    return out


def _parse_dataset(name: str, d: Any, archives: dict[str, ArchiveSpec], path: Path) -> DatasetSpec:
    where = f"datasets.{name}"
    d = _require_mapping(d, where, path)
    _check_keys(d, {"archives", "split_by", "counts"}, set(), where, path)
    names = d["archives"]
    if not isinstance(names, list) or not names:
        raise CatalogError(f"{path}: {where}.archives must be a non-empty list")
    for a in names:
        if a not in archives:
            raise CatalogError(f"{path}: {where}.archives names unknown archive {a!r}; known: {sorted(archives)}")
    if not isinstance(d["split_by"], str):
        raise CatalogError(f"{path}: {where}.split_by must be a string, got {d['split_by']!r}")
    return DatasetSpec(name=name, archives=tuple(names), split_by=d["split_by"],
                       counts=parse_counts(d["counts"], f"{where}.counts", path))


def load_catalog(path: str | os.PathLike = DEFAULT_DATASETS_YAML) -> Catalog:
    """Read and validate a datasets.yaml."""
    path = Path(path)
    if not path.is_file():
        raise CatalogError(f"{path}: datasets file not found")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise CatalogError(f"{path}: not valid YAML: {exc}") from exc
    raw = _require_mapping(raw, "top level", path)
    _check_keys(raw, {"archives", "datasets"}, {"pretrained"}, "top level", path)
    archives = {str(k): _parse_archive(str(k), v, path) for k, v in _require_mapping(raw["archives"], "archives", path).items()}
    datasets = {str(k): _parse_dataset(str(k), v, archives, path)
                for k, v in _require_mapping(raw["datasets"], "datasets", path).items()}
    pretrained = raw.get("pretrained") or {}
    _require_mapping(pretrained, "pretrained", path)
    return Catalog(path=path, archives=archives, datasets=datasets, pretrained=pretrained)


def pinned_pretrained(path, catalog_path: str | os.PathLike = DEFAULT_DATASETS_YAML) -> tuple[str | None, int | None]:
    """(sha256, size) that params/datasets.yaml pins for this file name under pretrained.backbone, or
    (None, None) when the catalog is not here or pins another file."""
    catalog_path = Path(catalog_path)
    if not catalog_path.is_file():
        return None, None
    entry = load_catalog(catalog_path).pretrained.get("backbone") or {}
    if not isinstance(entry, dict) or entry.get("name") != os.path.basename(os.fspath(path)):
        return None, None
    sha256, size = entry.get("sha256"), entry.get("size")
    where = f"{catalog_path}: pretrained.backbone"
    if sha256 is not None and not (isinstance(sha256, str) and re.fullmatch(r"[0-9a-fA-F]{64}", sha256)):
        raise CatalogError(f"{where}.sha256 must be 64 hex digits or null, got {sha256!r}")
    if size is not None and not (isinstance(size, int) and not isinstance(size, bool) and size > 0):
        raise CatalogError(f"{where}.size must be a positive byte count or null, got {size!r}")
    return sha256, size
