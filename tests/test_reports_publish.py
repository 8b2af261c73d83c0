import pytest

from remamber.reports.publish import publish


def test_publish_copies_bytes_into_a_new_folder_and_replaces_an_old_copy(tmp_path):
    src = tmp_path / "results" / "table1.tex"
    src.parent.mkdir()
    src.write_bytes(b"\\begin{tabular}{l}x\\end{tabular}\n")
    dst = tmp_path / "reports" / "table1.tex"
    assert publish(src, dst) == dst and dst.read_bytes() == src.read_bytes()
    src.write_bytes(b"new")
    publish(src, dst)
    assert dst.read_bytes() == b"new"
    assert sorted(p.name for p in dst.parent.iterdir()) == ["table1.tex"]  # no temporary left behind


def test_publishing_a_missing_file_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.csv"):
        publish(tmp_path / "missing.csv", tmp_path / "out.csv")
