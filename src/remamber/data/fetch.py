"""Download, verify and extract the archives of `params/datasets.yaml`.

`fetch` streams each archive into `<name>.part` (resumed over HTTP Range after a cut), retries failures
that made no progress with exponential backoff, falls back to the next mirror (from byte 0) on a permanent
failure or a web page served instead of the archive, verifies size and checksum (once more from byte 0 when
a resumed file fails), and only then renames the file into place. A file that fails verification is moved
aside as `<name>.corrupt`, never left where a later step would use it. `extract` refuses entries that would land
outside the target folder and writes a marker only once every entry is in place.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import http.client
import json
import logging
import os
import shutil
import stat
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Iterable
from pathlib import Path, PurePosixPath

from tqdm.auto import tqdm

from remamber.fileio import atomic_write_json
from remamber.data.catalog import DEFAULT_DATASETS_YAML, ArchiveSpec, load_catalog
from remamber.errors import RemamberError

log = logging.getLogger(__name__)

USER_AGENT = "remamber-fetch/0.1 (+https://github.com/remamber)"
CHUNK_BYTES = 1 << 20


class FetchError(RemamberError, RuntimeError):
    """A download that could not be completed (names the file and the URLs tried)."""


class ChecksumError(FetchError):
    """Every mirror served a file whose checksum did not match."""


class DiskFullError(FetchError):
    """The disk filled up while writing (ENOSPC)."""


class UnsafeArchiveError(RemamberError, ValueError):
    """An archive entry would land outside the target folder (absolute path, `..`, symlink)."""


class CorruptArchiveError(RemamberError, ValueError):
    """An archive that cannot be read (not a zip, truncated, a corrupt entry)."""


class _Transient(Exception):
    """A failure worth retrying on the same URL (cut transfer, timeout, 5xx)."""


class _Permanent(Exception):
    """A failure that retrying the same URL cannot fix (404, wrong size, bad checksum)."""


def file_digest(path: Path, algo: str, progress: bool = False) -> str:
    """Hex digest of a file, read in chunks (bounded memory for the 13.5 GB COCO archive)."""
    h = hashlib.new(algo)
    size = path.stat().st_size
    with open(path, "rb") as f, tqdm(total=size, unit="B", unit_scale=True, unit_divisor=1024,
                                     desc=f"{algo} {path.name}", disable=not progress or size < (64 << 20),
                                     leave=False) as bar:
        while chunk := f.read(CHUNK_BYTES):
            h.update(chunk)
            bar.update(len(chunk))
    return h.hexdigest()


def _stamp(path: Path, spec: ArchiveSpec) -> dict:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "algo": spec.algo, "checksum": spec.checksum}


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".verified")


def _move_aside(path: Path) -> Path:
    corrupt = path.with_name(path.name.removesuffix(".part") + ".corrupt")
    os.replace(path, corrupt)
    return corrupt


def is_verified(path: Path, spec: ArchiveSpec, progress: bool = True) -> bool:
    """True when `path` has the expected size and checksum.

    A sidecar `<name>.verified` (size, mtime, checksum) saves re-hashing an unchanged file; without it the
    file is hashed and, when good, the sidecar is written.
    """
    if not path.is_file() or path.stat().st_size != spec.size:
        return False
    sidecar = _sidecar(path)
    with contextlib.suppress(OSError, ValueError):
        if json.loads(sidecar.read_text()) == _stamp(path, spec):
            return True
    if file_digest(path, spec.algo, progress) != spec.checksum:
        return False
    atomic_write_json(sidecar, _stamp(path, spec))
    return True


def _write(f, chunk: bytes, part: Path, url: str) -> None:
    try:
        f.write(chunk)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise DiskFullError(f"disk full while writing {part} (from {url}); free space and rerun, "
                                f"the partial file is kept for resuming") from exc
        raise


def _content_range_start(header: str | None) -> int | None:
    # "bytes START-END/TOTAL"
    if not header or not header.startswith("bytes "):
        return None
    try:
        return int(header[6:].split("-", 1)[0])
    except ValueError:
        return None


# Content types that are never an archive: an error, rate-limit or login page served with status 200.
_PAGE_TYPES = ("text/html", "application/xhtml+xml")


def _part_size(part: Path) -> int:
    return part.stat().st_size if part.exists() else 0


def _transfer(url: str, part: Path, spec: ArchiveSpec, timeout: float, bar: tqdm) -> bool:
    """Bring `part` to `spec.size` bytes from `url`, resuming from its current length.

    Returns True when bytes were appended to an earlier transfer's (a resume), False for a fresh file.
    """
    have = _part_size(part)
    if have > spec.size:
        part.unlink()
        have = 0
    if have == spec.size:
        return True
    headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
    if have:
        headers["Range"] = f"bytes={have}-"
    request = urllib.request.Request(url, headers=headers)
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:  # our .part does not fit this server's file: start over
            part.unlink()
            raise _Transient(f"HTTP 416 for a resume at byte {have}; restarting") from exc
        if exc.code in (408, 425, 429) or exc.code >= 500:
            raise _Transient(f"HTTP {exc.code} {exc.reason}") from exc
        raise _Permanent(f"HTTP {exc.code} {exc.reason}") from exc
    except (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError) as exc:
        raise _Transient(f"{type(exc).__name__}: {exc}") from exc
    with response:
        content_type = response.headers.get_content_type()
        if content_type in _PAGE_TYPES:  # checked before a byte is written: a page must never enter .part
            raise _Permanent(f"served a web page (Content-Type {content_type}) instead of the archive; "
                             f"the mirror may be rate-limiting or down")
        if have and response.status == 206:
            start = _content_range_start(response.headers.get("Content-Range"))
            if start != have:
                part.unlink()
                raise _Transient(f"server resumed at byte {start}, asked for {have}; restarting")
            mode = "ab"
        elif response.status == 200:
            have, mode = 0, "wb"
        else:
            raise _Permanent(f"unexpected HTTP status {response.status}")
        length = response.headers.get("Content-Length")
        if length is not None and have + int(length) != spec.size:
            raise _Permanent(f"server announces {have + int(length)} bytes, expected {spec.size}")
        bar.reset(total=spec.size)
        bar.update(have)
        try:
            with open(part, mode) as f:
                while chunk := response.read(CHUNK_BYTES):
                    _write(f, chunk, part, url)
                    bar.update(len(chunk))
        except DiskFullError:
            raise
        except (http.client.HTTPException, ConnectionError, TimeoutError, urllib.error.URLError) as exc:
            raise _Transient(f"transfer cut after {part.stat().st_size} bytes: {type(exc).__name__}") from exc
    got = part.stat().st_size
    if got < spec.size:
        raise _Transient(f"transfer cut after {got} of {spec.size} bytes")
    if got > spec.size:
        part.unlink()
        raise _Permanent(f"received {got} bytes, expected {spec.size}")
    return mode == "ab"


def _from_url(url: str, part: Path, spec: ArchiveSpec, retries: int, backoff: float, timeout: float,
              progress: bool, bar: tqdm, leftover: int) -> tuple[bool, str, bool]:
    """Try one mirror: (True, "", False) once `part` holds the verified file, else (False, reason,
    was_checksum). `leftover`: bytes of a `.part` found at the start (resumed, origin unknown)."""
    attempts = no_progress = 0
    best = _part_size(part)  # only an attempt that takes .part past its longest counts as progress
    resumed = False
    notes: list[str] = []  # what happened before a restart from byte 0, for the final message
    retried_from_zero = False
    while True:
        attempts += 1
        try:
            resumed = _transfer(url, part, spec, timeout, bar)
            if not resumed:
                leftover = 0  # a fresh file: no byte of the leftover is in it any more
        except _Transient as exc:
            size = _part_size(part)
            if size > best:
                best, no_progress = size, 0
                log.warning("%s: attempt %d cut after progress to %d bytes (%s); resuming", url, attempts,
                            size, exc)
            else:
                no_progress += 1
                log.warning("%s: attempt %d failed without progress (%d of %d allowed): %s", url, attempts,
                            no_progress, retries + 1, exc)
                if no_progress > retries:
                    return False, "; ".join([*notes, f"{exc} (after {attempts} attempt{'s' if attempts > 1 else ''})"]), False
            time.sleep(backoff * 2 ** max(no_progress - 1, 0))
            continue
        except _Permanent as exc:
            return False, "; ".join([*notes, str(exc)]), False
        digest = file_digest(part, spec.algo, progress)
        if digest == spec.checksum:
            return True, "", False
        mismatch = f"{spec.algo} mismatch: expected {spec.checksum}, got {digest}"
        if resumed and not retried_from_zero:
            # the bytes before the resume may belong to another file or version: one more try from scratch
            what = (f"resumed a leftover {part.name} of {leftover} bytes" if leftover
                    else "resumed a cut transfer")
            notes.append(f"{mismatch} ({what}); retried from byte 0")
            log.warning("%s: %s (%s); retrying from byte 0", url, mismatch, what)
            part.unlink()
            retried_from_zero, resumed, leftover = True, False, 0
            best = no_progress = 0
            continue
        corrupt = _move_aside(part)
        return False, "; ".join([*notes, f"{mismatch}; moved aside to {corrupt}"]), True


def download(spec: ArchiveSpec, dest_dir: str | os.PathLike, retries: int = 4, backoff: float = 1.0,
             timeout: float = 60.0, progress: bool = True) -> Path:
    """Download one archive into `dest_dir/spec.filename`, verified; returns its path.

    Each URL may fail `1 + retries` attempts without progress (cut transfers, timeouts, 5xx), sleeping
    `backoff * 2**k` seconds between them; an attempt that brings the file further does not count, so a
    long download over a flaky link is resumed as often as it moves forward. A permanent failure (404, a
    web page instead of the archive, a wrong size) moves on to the next URL at once, and every mirror after
    the first starts from byte 0: bytes of one server are never completed by another's. A file that fails
    its checksum after a resume is fetched once more from byte 0 before it counts as corrupt.
    """
    if retries < 0:
        raise ValueError(f"retries must be 0 or more, got {retries}")
    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    dest = dest_dir / spec.filename
    if dest.exists():
        if is_verified(dest, spec, progress):
            log.info("%s already present and verified", dest)
            return dest
        corrupt = _move_aside(dest)
        _sidecar(dest).unlink(missing_ok=True)
        log.warning("%s failed verification; moved aside to %s", dest, corrupt)
    part = dest.with_name(dest.name + ".part")
    leftover = _part_size(part)
    if leftover:
        log.info("%s: resuming a leftover %s of %d bytes", spec.filename, part.name, leftover)
    failures: list[tuple[str, str, bool]] = []  # (url, reason, was_checksum)
    with tqdm(total=spec.size, unit="B", unit_scale=True, unit_divisor=1024, desc=spec.filename,
              disable=not progress) as bar:
        for i, url in enumerate(spec.urls):
            if i and part.exists():
                log.info("%s: new mirror %s, discarding %d bytes of the previous one", spec.filename, url,
                         _part_size(part))
                part.unlink()
                leftover = 0
            ok, reason, was_checksum = _from_url(url, part, spec, retries, backoff, timeout, progress, bar,
                                                 leftover)
            if ok:
                os.replace(part, dest)
                atomic_write_json(_sidecar(dest), _stamp(dest, spec))
                return dest
            failures.append((url, reason, was_checksum))
    detail = "\n".join(f"  {url}: {reason}" for url, reason, _ in failures)
    if failures and all(is_checksum for _, _, is_checksum in failures):
        raise ChecksumError(f"{spec.filename}: checksum verification failed on every mirror:\n{detail}")
    raise FetchError(f"{spec.filename}: all {len(spec.urls)} mirror(s) failed:\n{detail}")


def fetch(name_or_names: str | Iterable[str], dest_dir: str | os.PathLike,
          datasets_yaml: str | os.PathLike = DEFAULT_DATASETS_YAML, retries: int = 4, backoff: float = 1.0,
          timeout: float = 60.0, progress: bool = True) -> list[Path]:
    """Download and verify archives named in `datasets_yaml` (keys such as `refcoco` or file names such as
    `refcoco.zip`) into `dest_dir`; returns their paths in order."""
    names = [name_or_names] if isinstance(name_or_names, str) else list(name_or_names)
    catalog = load_catalog(datasets_yaml)
    specs = [catalog.archive(n) for n in names]
    return [download(s, dest_dir, retries=retries, backoff=backoff, timeout=timeout, progress=progress)
            for s in specs]


def _marker(archive: Path, dest_dir: Path) -> Path:
    return dest_dir / f".{archive.name}.extracted"


def _safe_member_path(name: str, archive: Path) -> PurePosixPath:
    """The relative path an entry may be written to, or an error for one that escapes the target folder."""
    norm = name.replace("\\", "/")
    p = PurePosixPath(norm)
    if norm.startswith("/") or p.is_absolute() or (len(norm) > 1 and norm[1] == ":"):
        raise UnsafeArchiveError(f"{archive}: entry {name!r} has an absolute path; refusing to extract")
    if ".." in p.parts:
        raise UnsafeArchiveError(f"{archive}: entry {name!r} would land outside the target folder; refusing")
    return p


def extract(archive: str | os.PathLike, dest_dir: str | os.PathLike, progress: bool = True) -> Path:
    """Extract a zip archive into `dest_dir` safely; returns `dest_dir`.

    Every entry is checked before anything is written. Files are written under a temporary name and renamed;
    the marker `.<archive>.extracted` is written last, so a folder without it is never trusted. With a
    matching marker (same archive size and mtime) nothing is done.
    """
    archive, dest_dir = Path(archive), Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    marker = _marker(archive, dest_dir)
    st = archive.stat()
    stamp = {"archive": archive.name, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    with contextlib.suppress(OSError, ValueError):
        if json.loads(marker.read_text()) == stamp:
            log.info("%s already extracted into %s", archive, dest_dir)
            return dest_dir
    marker.unlink(missing_ok=True)
    try:
        zf = zipfile.ZipFile(archive)
    except zipfile.BadZipFile as exc:
        raise CorruptArchiveError(f"{archive}: not a valid zip archive ({exc}); delete it and fetch again") from exc
    with zf:
        infos = zf.infolist()
        members = []
        for info in infos:
            rel = _safe_member_path(info.filename, archive)
            if stat.S_ISLNK(info.external_attr >> 16):
                raise UnsafeArchiveError(f"{archive}: entry {info.filename!r} is a symbolic link; refusing")
            members.append((info, rel))
        total = sum(info.file_size for info in infos)
        with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=f"extract {archive.name}",
                  disable=not progress) as bar:
            for info, rel in members:
                target = dest_dir.joinpath(*rel.parts)
                if info.is_dir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                tmp = target.with_name(f".{target.name}.extracting")
                try:
                    with zf.open(info) as src, open(tmp, "wb") as dst:
                        shutil.copyfileobj(src, dst, CHUNK_BYTES)
                    os.replace(tmp, target)
                except zipfile.BadZipFile as exc:
                    tmp.unlink(missing_ok=True)
                    raise CorruptArchiveError(f"{archive}: entry {info.filename!r} is corrupt ({exc}); delete the "
                                              f"archive and fetch again") from exc
                except OSError as exc:
                    tmp.unlink(missing_ok=True)
                    if exc.errno == errno.ENOSPC:
                        raise DiskFullError(f"disk full while extracting {archive} into {dest_dir}") from exc
                    raise
                bar.update(info.file_size)
    atomic_write_json(marker, stamp)
    return dest_dir


def is_extracted(archive: str | os.PathLike, dest_dir: str | os.PathLike) -> bool:
    """True when `dest_dir` holds a complete extraction of `archive` (its marker matches)."""
    archive, dest_dir = Path(archive), Path(dest_dir)
    marker = _marker(archive, dest_dir)
    with contextlib.suppress(OSError, ValueError):
        st = archive.stat()
        return json.loads(marker.read_text()) == {"archive": archive.name, "size": st.st_size,
                                                   "mtime_ns": st.st_mtime_ns}
    return False


def fetch_dataset(dataset: str, data_root: str | os.PathLike,
                  datasets_yaml: str | os.PathLike = DEFAULT_DATASETS_YAML, retries: int = 4,
                  backoff: float = 1.0, timeout: float = 60.0, progress: bool = True) -> Path:
    """Fetch and verify every archive of `dataset` (e.g. refcoco.zip and train2014.zip) into `data_root`
    and extract each there, giving the refer layout `<data_root>/<dataset>/refs(...).p` and
    `<data_root>/train2014/`; returns `data_root`. Verified archives and complete extractions are reused."""
    data_root = Path(data_root)
    catalog = load_catalog(datasets_yaml)
    for name in catalog.dataset(dataset).archives:
        (archive,) = fetch(name, data_root, datasets_yaml=datasets_yaml, retries=retries, backoff=backoff,
                           timeout=timeout, progress=progress)
        extract(archive, data_root, progress=progress)
    return data_root
