"""fetch / extract / datasets.yaml against a local HTTP server (127.0.0.1) started by the tests."""

from __future__ import annotations

import errno
import hashlib
import http.server
import os
import stat
import threading
import time
import zipfile
from pathlib import Path

import pytest
import yaml

from remamber.data import fetch as fetch_mod
from remamber.data.catalog import CatalogError, load_catalog
from remamber.data.fetch import (ChecksumError, DiskFullError, FetchError, UnsafeArchiveError, extract, fetch,
                                 is_extracted)

PAYLOAD = os.urandom(3 * 1024 * 1024 + 123)  # > one 1 MiB chunk, so a cut lands mid-stream


class _Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args) -> None:  # keep test output quiet
        pass

    def do_GET(self) -> None:
        srv = self.server
        srv.requests.append((self.path, self.headers.get("Range")))
        if self.path in srv.missing or self.path not in srv.files:
            self.send_error(404, "Not Found")
            return
        if self.path in srv.stall:  # answer later than the client's timeout
            time.sleep(srv.stall[self.path])
        data = srv.files[self.path]
        if self.path in srv.corrupt:
            data = bytes([data[0] ^ 0xFF]) + data[1:]
        start = 0
        rng = self.headers.get("Range")
        if rng and not srv.ignore_range:
            start = int(rng.removeprefix("bytes=").split("-")[0])
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        if self.path in srv.content_type:
            self.send_header("Content-Type", srv.content_type[self.path])
        if self.path not in srv.no_length:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if srv.cut_times.get(self.path, 0) > 0:  # cut the transfer half-way, that many times
            srv.cut_times[self.path] -= 1
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        if self.path in srv.cut_once:  # cut the transfer half-way, once
            srv.cut_once.discard(self.path)
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)


class _Server(http.server.ThreadingHTTPServer):
    def handle_error(self, request, client_address) -> None:
        pass  # a client that hangs up mid-transfer (the disk-full test) is expected here


@pytest.fixture()
def server():
    httpd = _Server(("127.0.0.1", 0), _Handler)
    httpd.files, httpd.requests = {}, []
    httpd.missing, httpd.corrupt, httpd.cut_once = set(), set(), set()
    httpd.ignore_range = False
    httpd.content_type, httpd.no_length, httpd.cut_times, httpd.stall = {}, set(), {}, {}
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    httpd.base = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def _catalog(tmp_path: Path, urls: list[str], payload: bytes = PAYLOAD, algo: str = "sha256") -> Path:
    digest = hashlib.new(algo, payload).hexdigest()
    spec = {"archives": {"blob": {"filename": "blob.zip", "urls": urls, "size": len(payload), algo: digest}},
            "datasets": {"toy": {"archives": ["blob"], "split_by": "unc",
                                 "counts": {"train": {"objects": 1, "images": 1, "sentences": 2}}}}}
    path = tmp_path / "datasets.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_complete_download_then_no_second_download(server, tmp_path):
    server.files["/a/blob.zip"] = PAYLOAD
    cat = _catalog(tmp_path, [server.base + "/a/blob.zip"], algo="md5")
    (path,) = fetch("blob", tmp_path / "raw", datasets_yaml=cat, backoff=0, progress=False)
    assert path == tmp_path / "raw" / "blob.zip"
    assert path.read_bytes() == PAYLOAD
    assert not path.with_name("blob.zip.part").exists()
    n = len(server.requests)
    # already present and verified: not downloaded again (by file name too)
    assert fetch(["blob.zip"], tmp_path / "raw", datasets_yaml=cat, backoff=0, progress=False) == [path]
    assert len(server.requests) == n


def test_cut_transfer_is_resumed_with_a_range_request(server, tmp_path):
    server.files["/blob.zip"] = PAYLOAD
    server.cut_once.add("/blob.zip")
    cat = _catalog(tmp_path, [server.base + "/blob.zip"])
    (path,) = fetch("blob", tmp_path, datasets_yaml=cat, backoff=0, progress=False)
    assert path.read_bytes() == PAYLOAD
    assert len(server.requests) == 2
    assert server.requests[0][1] is None
    half = (len(PAYLOAD)) // 2
    assert server.requests[1][1] == f"bytes={half}-"


def test_server_ignoring_range_restarts_from_zero(server, tmp_path):
    server.files["/blob.zip"] = PAYLOAD
    server.cut_once.add("/blob.zip")
    server.ignore_range = True
    cat = _catalog(tmp_path, [server.base + "/blob.zip"])
    (path,) = fetch("blob", tmp_path, datasets_yaml=cat, backoff=0, progress=False)
    assert path.read_bytes() == PAYLOAD


def test_corrupt_file_is_a_checksum_error_and_moved_aside(server, tmp_path):
    server.files["/blob.zip"] = PAYLOAD
    server.corrupt.add("/blob.zip")
    cat = _catalog(tmp_path, [server.base + "/blob.zip"])
    with pytest.raises(ChecksumError, match=r"blob\.zip.*checksum") as info:
        fetch("blob", tmp_path, datasets_yaml=cat, backoff=0, progress=False)
    assert server.base + "/blob.zip" in str(info.value)
    assert not (tmp_path / "blob.zip").exists()
    assert not (tmp_path / "blob.zip.part").exists()
    assert (tmp_path / "blob.zip.corrupt").read_bytes()[1:] == PAYLOAD[1:]


def test_bad_existing_file_is_moved_aside_and_replaced(server, tmp_path):
    server.files["/blob.zip"] = PAYLOAD
    cat = _catalog(tmp_path, [server.base + "/blob.zip"])
    (tmp_path / "blob.zip").write_bytes(b"x" * len(PAYLOAD))
    (path,) = fetch("blob", tmp_path, datasets_yaml=cat, backoff=0, progress=False)
    assert path.read_bytes() == PAYLOAD
    assert (tmp_path / "blob.zip.corrupt").read_bytes() == b"x" * len(PAYLOAD)


def test_404_falls_back_to_the_next_mirror(server, tmp_path):
    server.files["/mirror2/blob.zip"] = PAYLOAD
    cat = _catalog(tmp_path, [server.base + "/mirror1/blob.zip", server.base + "/mirror2/blob.zip"])
    (path,) = fetch("blob", tmp_path, datasets_yaml=cat, backoff=0, progress=False)
    assert path.read_bytes() == PAYLOAD
    assert [p for p, _ in server.requests] == ["/mirror1/blob.zip", "/mirror2/blob.zip"]  # 404 is not retried


def test_exhausted_mirror_list_names_every_url(server, tmp_path):
    urls = [server.base + "/gone1/blob.zip", server.base + "/gone2/blob.zip"]
    cat = _catalog(tmp_path, urls)
    with pytest.raises(FetchError, match=r"blob\.zip: all 2 mirror\(s\) failed") as info:
        fetch("blob", tmp_path, datasets_yaml=cat, backoff=0, progress=False)
    for url in urls:
        assert f"{url}: HTTP 404" in str(info.value)
    assert not (tmp_path / "blob.zip").exists()


def test_unreachable_host_is_retried_then_fails(tmp_path):
    import socket
    with socket.socket() as s:  # a port with nothing listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cat = _catalog(tmp_path, [f"http://127.0.0.1:{port}/blob.zip"])
    with pytest.raises(FetchError, match=r"after 3 attempts"):
        fetch("blob", tmp_path, datasets_yaml=cat, retries=2, backoff=0, progress=False)


def test_full_disk_is_a_clear_error(server, tmp_path, monkeypatch):
    server.files["/blob.zip"] = PAYLOAD
    cat = _catalog(tmp_path, [server.base + "/blob.zip"])

    def enospc_write(f, chunk, part, url):
        class Full:  # a file object on a full disk
            def write(self, _):
                raise OSError(errno.ENOSPC, "No space left on device")
        return original(Full(), chunk, part, url)

    original = fetch_mod._write
    monkeypatch.setattr(fetch_mod, "_write", enospc_write)
    with pytest.raises(DiskFullError, match=r"disk full while writing .*blob\.zip\.part"):
        fetch("blob", tmp_path, datasets_yaml=cat, backoff=0, progress=False)
    assert not (tmp_path / "blob.zip").exists()


def test_unknown_archive_and_bad_catalog_are_named(tmp_path):
    cat = _catalog(tmp_path, ["http://127.0.0.1:9/blob.zip"])
    with pytest.raises(CatalogError, match=r"unknown archive 'nope'"):
        fetch("nope", tmp_path, datasets_yaml=cat, progress=False)
    spec = yaml.safe_load(cat.read_text())
    spec["archives"]["blob"]["sha265"] = spec["archives"]["blob"].pop("sha256")  # a typo
    cat.write_text(yaml.safe_dump(spec))
    with pytest.raises(CatalogError, match=r"archives\.blob has unknown key\(s\) \['sha265'\]"):
        load_catalog(cat)
    with pytest.raises(CatalogError, match=r"not found"):
        load_catalog(tmp_path / "missing.yaml")


def test_project_datasets_yaml_is_valid():
    root = Path(__file__).resolve().parents[1]
    catalog = load_catalog(root / "params" / "datasets.yaml")
    assert catalog.archive("refcoco.zip").size == 53_993_993
    assert catalog.archive("train2014").algo == "md5"
    assert catalog.archive("refcoco").urls[0].startswith("https://web.archive.org/web/20220413011718id_/")
    assert catalog.dataset("refcoco+").counts["testB"] == {"objects": 1798, "images": 750, "sentences": 4889}
    assert catalog.dataset("refcocog").split_by == "umd"
    for name in ("refcoco", "refcoco+", "refcocog"):
        assert catalog.dataset(name).archives[-1] == "train2014"


def _zip(path: Path, entries: dict[str, bytes], symlink: str | None = None) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
        if symlink:
            info = zipfile.ZipInfo(symlink)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, "/etc/passwd")
    return path


def test_extract_writes_files_and_marker(tmp_path):
    archive = _zip(tmp_path / "refcoco.zip", {"refcoco/refs(unc).p": b"abc", "refcoco/instances.json": b"{}"})
    out = tmp_path / "raw"
    assert not is_extracted(archive, out)
    extract(archive, out, progress=False)
    assert (out / "refcoco" / "refs(unc).p").read_bytes() == b"abc"
    assert is_extracted(archive, out)
    (out / "refcoco" / "refs(unc).p").write_bytes(b"changed")
    extract(archive, out, progress=False)  # marker matches: nothing rewritten
    assert (out / "refcoco" / "refs(unc).p").read_bytes() == b"changed"


@pytest.mark.parametrize("bad", ["../evil.txt", "refcoco/../../evil.txt", "/abs/evil.txt"])
def test_extract_refuses_entries_outside_the_target(tmp_path, bad):
    archive = _zip(tmp_path / "bad.zip", {"ok.txt": b"1", bad: b"2"})
    out = tmp_path / "out" / "inner"
    with pytest.raises(UnsafeArchiveError, match=r"bad\.zip: entry"):
        extract(archive, out, progress=False)
    assert not (tmp_path / "out" / "evil.txt").exists() and not (tmp_path / "evil.txt").exists()
    assert not (out / "ok.txt").exists()  # checked before anything is written
    assert not is_extracted(archive, out)


def test_extract_refuses_symlinks(tmp_path):
    archive = _zip(tmp_path / "link.zip", {"a.txt": b"1"}, symlink="link")
    with pytest.raises(UnsafeArchiveError, match=r"symbolic link"):
        extract(archive, tmp_path / "out", progress=False)


def test_extract_truncated_archive_is_a_clear_error(tmp_path):
    archive = _zip(tmp_path / "t.zip", {"a.bin": os.urandom(50_000)})
    archive.write_bytes(archive.read_bytes()[:20_000])
    with pytest.raises(ValueError, match=r"t\.zip"):
        extract(archive, tmp_path / "out", progress=False)
    assert not is_extracted(archive, tmp_path / "out")


def test_fetch_dataset_downloads_and_extracts_each_archive(server, tmp_path):
    import io
    blobs = {}
    for name, entries in {"refs": {"toy/refs(unc).p": b"p", "toy/instances.json": b"{}"},
                          "imgs": {"train2014/COCO_train2014_000000000001.jpg": b"jpg"}}.items():
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as zf:
            for n, d in entries.items():
                zf.writestr(n, d)
        blobs[name] = buf.getvalue()
        server.files[f"/{name}.zip"] = blobs[name]
    spec = {"archives": {n: {"filename": f"{n}.zip", "urls": [f"{server.base}/{n}.zip"], "size": len(b),
                             "sha256": hashlib.sha256(b).hexdigest()} for n, b in blobs.items()},
            "datasets": {"toy": {"archives": ["refs", "imgs"], "split_by": "unc",
                                 "counts": {"train": {"objects": 1, "images": 1, "sentences": 1}}}}}
    cat = tmp_path / "datasets.yaml"
    cat.write_text(yaml.safe_dump(spec))
    root = fetch_mod.fetch_dataset("toy", tmp_path / "raw", datasets_yaml=cat, backoff=0, progress=False)
    assert (root / "toy" / "refs(unc).p").read_bytes() == b"p"
    assert (root / "train2014" / "COCO_train2014_000000000001.jpg").read_bytes() == b"jpg"
    assert is_extracted(root / "refs.zip", root) and is_extracted(root / "imgs.zip", root)


# --- issue 12 items 1, 2, 7: mirrors that serve pages, leftovers of another file, progress-only retries ---

RATE_LIMIT_PAGE = b"Too many requests; slow down and try later.\n" * 2  # 90 bytes, not an archive


def test_page_without_length_on_first_mirror_does_not_poison_the_next(server, tmp_path):
    # mirror 1 answers 200, no Content-Length, a short non-archive body (a rate-limit page as octet-stream)
    server.files["/m1/blob.zip"] = RATE_LIMIT_PAGE
    server.no_length.add("/m1/blob.zip")
    server.ignore_range = True  # like such a mirror, it answers every request with the page
    server.files["/m2/blob.zip"] = PAYLOAD
    cat = _catalog(tmp_path, [server.base + "/m1/blob.zip", server.base + "/m2/blob.zip"])
    (path,) = fetch("blob", tmp_path, datasets_yaml=cat, retries=1, backoff=0, progress=False)
    assert path.read_bytes() == PAYLOAD
    m2 = [rng for p, rng in server.requests if p == "/m2/blob.zip"]
    assert m2 == [None]  # the new mirror starts from byte 0, never resumes the page's bytes
    assert not (tmp_path / "blob.zip.corrupt").exists()


def test_html_page_is_refused_before_anything_is_written(server, tmp_path):
    server.files["/m1/blob.zip"] = b"<html><body>rate limited</body></html>"
    server.content_type["/m1/blob.zip"] = "text/html; charset=utf-8"
    server.no_length.add("/m1/blob.zip")
    cat = _catalog(tmp_path, [server.base + "/m1/blob.zip"])
    with pytest.raises(FetchError, match=r"m1/blob\.zip: served a web page \(Content-Type text/html\)"):
        fetch("blob", tmp_path, datasets_yaml=cat, backoff=0, progress=False)
    assert len(server.requests) == 1  # a page is not retried on the same mirror
    assert not (tmp_path / "blob.zip.part").exists()
    server.files["/m2/blob.zip"] = PAYLOAD
    cat = _catalog(tmp_path, [server.base + "/m1/blob.zip", server.base + "/m2/blob.zip"])
    (path,) = fetch("blob", tmp_path, datasets_yaml=cat, backoff=0, progress=False)
    assert path.read_bytes() == PAYLOAD
    assert server.requests[-1] == ("/m2/blob.zip", None)


def test_leftover_part_of_another_file_is_fetched_again_from_zero(server, tmp_path):
    server.files["/blob.zip"] = PAYLOAD
    cat = _catalog(tmp_path, [server.base + "/blob.zip"])
    (tmp_path / "blob.zip.part").write_bytes(os.urandom(1000))  # from some other download
    (path,) = fetch("blob", tmp_path, datasets_yaml=cat, backoff=0, progress=False)
    assert path.read_bytes() == PAYLOAD
    assert [rng for _, rng in server.requests] == ["bytes=1000-", None]  # resumed, then once from 0
    assert not (tmp_path / "blob.zip.part").exists()


def test_checksum_error_of_a_resumed_leftover_says_so(server, tmp_path):
    server.files["/blob.zip"] = PAYLOAD
    server.corrupt.add("/blob.zip")  # the mirror itself serves a bad file: the retry from 0 fails too
    cat = _catalog(tmp_path, [server.base + "/blob.zip"])
    (tmp_path / "blob.zip.part").write_bytes(os.urandom(1000))
    with pytest.raises(ChecksumError) as info:
        fetch("blob", tmp_path, datasets_yaml=cat, backoff=0, progress=False)
    msg = str(info.value)
    assert "resumed a leftover blob.zip.part of 1000 bytes" in msg and "retried from byte 0" in msg
    assert [rng for _, rng in server.requests] == ["bytes=1000-", None]
    assert (tmp_path / "blob.zip.corrupt").read_bytes()[1:] == PAYLOAD[1:]  # the from-0 copy is kept aside


def test_only_attempts_without_progress_count_toward_retries(server, tmp_path):
    server.files["/blob.zip"] = PAYLOAD
    server.cut_times["/blob.zip"] = 6  # six cuts, each after new bytes arrived
    cat = _catalog(tmp_path, [server.base + "/blob.zip"])
    (path,) = fetch("blob", tmp_path, datasets_yaml=cat, retries=1, backoff=0, progress=False)
    assert path.read_bytes() == PAYLOAD
    assert len(server.requests) == 7
    # each resume asks for the byte after the last one received
    have, expected = 0, []
    for _ in range(6):
        have += (len(PAYLOAD) - have) // 2
        expected.append(f"bytes={have}-")
    assert [rng for _, rng in server.requests[1:]] == expected


def test_attempts_without_progress_exhaust_the_retries(server, tmp_path):
    server.files["/blob.zip"] = RATE_LIMIT_PAGE  # announced size never reached
    server.no_length.add("/blob.zip")
    server.ignore_range = True
    cat = _catalog(tmp_path, [server.base + "/blob.zip"])
    with pytest.raises(FetchError, match=r"after 3 attempts"):  # 1 with progress + 2 without (retries=1)
        fetch("blob", tmp_path, datasets_yaml=cat, retries=1, backoff=0, progress=False)


def test_cli_fetch_retries_and_timeout(server, tmp_path, capsys):
    from remamber.cli import main

    server.files["/slow/blob.zip"] = PAYLOAD
    server.stall["/slow/blob.zip"] = 1.5
    cat = _catalog(tmp_path, [server.base + "/slow/blob.zip"])
    t0 = time.monotonic()
    rc = main(["fetch", "blob", "--dest", str(tmp_path / "raw"), "--datasets-yaml", str(cat),
               "--retries", "0", "--timeout", "0.3"])
    assert rc == 2 and time.monotonic() - t0 < 1.4  # one attempt, cut by the 0.3 s timeout
    err = capsys.readouterr().err  # after the progress bar's lines
    assert "\nremamber: error: blob.zip: all 1 mirror(s) failed" in err
    assert "timed out" in err and "(after 1 attempt)" in err
    assert len(server.requests) == 1
    for bad in (["--retries", "-1"], ["--timeout", "0"], ["--timeout", "soon"]):
        with pytest.raises(SystemExit) as exit_info:
            main(["fetch", "blob", "--dest", str(tmp_path), *bad])
        assert exit_info.value.code == 2


def test_cli_checksum_error_is_the_message_without_traceback(server, tmp_path, capsys, monkeypatch):
    """Issue 12 item 6: every mirror serving a bad file ends the command with the message alone (one line
    per mirror), exit status 2; the bad copy is moved aside."""
    from remamber.cli import main

    monkeypatch.delenv("REMAMBER_DEBUG", raising=False)
    server.files["/blob.zip"] = PAYLOAD
    server.corrupt.add("/blob.zip")
    cat = _catalog(tmp_path, [server.base + "/blob.zip"])
    assert main(["fetch", "blob", "--dest", str(tmp_path / "raw"), "--datasets-yaml", str(cat)]) == 2
    err = capsys.readouterr().err
    assert "\nremamber: error: blob.zip: checksum verification failed on every mirror:\n" in err, err
    assert "sha256 mismatch" in err and "Traceback" not in err
    assert (tmp_path / "raw" / "blob.zip.corrupt").is_file() and not (tmp_path / "raw" / "blob.zip").exists()
