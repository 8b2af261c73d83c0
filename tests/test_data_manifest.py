import hashlib
import json

from remamber.data.manifest import verify_manifest, write_manifest


def test_manifest_lists_every_file_with_its_hash_and_detects_changes(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.bin").write_bytes(b"hello")
    (tmp_path / "y.txt").write_text("world")
    out = write_manifest(tmp_path)
    entries = {e["path"]: e for e in json.loads(out.read_text())["files"]}
    assert set(entries) == {"a/x.bin", "y.txt"}
    assert entries["a/x.bin"]["sha256"] == hashlib.sha256(b"hello").hexdigest()
    assert entries["y.txt"]["size"] == 5
    assert verify_manifest(tmp_path) == []
    (tmp_path / "y.txt").write_text("World")
    (tmp_path / "a" / "x.bin").unlink()
    problems = verify_manifest(tmp_path)
    assert len(problems) == 2 and any("y.txt" in p for p in problems) and any("x.bin" in p for p in problems)


def test_missing_manifest_is_reported(tmp_path):
    assert "missing" in verify_manifest(tmp_path)[0]
