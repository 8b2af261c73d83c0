"""Tables 1-4 from synthetic evaluation records: layout, values, bold, paper rows, CSV, errors."""

from __future__ import annotations

import json
import math
import random
import re
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest

from remamber.reports import paper_numbers
from remamber.reports.tables import (
    MissingRecordError,
    build_table,
    render_latex,
    write_metrics_summary,
    write_table,
)

SPLITS = {"refcoco": ["val", "testA", "testB"], "refcoco+": ["val", "testA", "testB"], "refcocog": ["val", "test"]}
METRICS = ["mIoU", "oIoU", "prec@50", "prec@60", "prec@70", "prec@80", "prec@90"]
FUSION = ["attention", "in_context", "norm_adaptation", "twister"]
SPECS = {
    "table1": {"resolution": 64, "datasets": ["refcoco", "refcoco+", "refcocog"], "variants": FUSION},
    "table2": {"resolution": 96, "datasets": ["refcoco", "refcoco+", "refcocog"], "variants": ["twister"]},
    "table3": {"resolution": 64, "datasets": ["refcoco"],
               "variants": ["channel_only", "spatial_only", "parallel", "spatial_channel", "twister"]},
    "table4": {"resolution": 64, "datasets": ["refcoco"], "variants": ["global_only", "local_only", "twister"]},
}
ALL_VARIANTS = sorted({v for spec in SPECS.values() for v in spec["variants"]})

# Verbatim lines of the paper text (tab-separated cells as extracted), the reference for the
# transcription in paper_numbers.
PAPER_LINES = {
    ("table1", "refcoco", "attention"): "Attention\t65.3\t62.3\t75.1\t60.6\t67.5\t64.4\t79.1\t65.4\t61.7\t58.0\t69.6\t53.4\t",
    ("table1", "refcoco+", "norm_adaptation"): "Adaptation\t60.3\t55.2\t68.2\t57.3\t64.2\t59.9\t73.4\t62.9\t53.9\t48.7\t59.0\t47.2\t",
    ("table1", "refcocog", "twister"): "Mamba Twister\t61.1\t58.0\t68.4\t62.8\t55.2\t18.4\t61.2\t59.0\t69.0\t63.4\t55.5\t18.7\t",
    ("table3", "refcoco", "channel_only"): "✓\t-\t62.3\t60.1\t70.7\t57.2\t64.9\t63.2\t74.3\t61.9\t59.7\t57.5\t66.3\t51.9",
    ("table3", "refcoco", "spatial_channel"): "Spatial-Channel\t\t71.4\t68.8\t82.4\t70.8\t73.3\t71.4\t84.9\t74.2\t67.9\t64.7\t76.5\t64.4",
    ("table4", "refcoco", "local_only"): "\\checkmark\t-\t✓\t69.9\t67.9\t80.6\t68.2\t72.2\t70.6\t83.9\t73.1\t66.4\t63.8\t75.3\t61.7",
}
PAPER_TABLE2_LINES = [
    "CAC [3]\tDeepLab ResNet-101\t58.90\t61.77\t53.81\t-\t-\t-\t46.37\t46.95",
    "ReSTR [24]\tViT-B-16\t67.22\t69.3\t64.45\t55.78\t60.44\t48.27\t54.48\t-",
    "LAVT [53]\tSwin-B\t72.73\t75.82\t68.79\t62.14\t68.38\t55.10\t61.24\t62.10",
    "ReMamber (Ours)\tMamba-B\t74.54\t76.74\t70.89\t65.00\t70.78\t57.53\t63.9\t64.0",
]


def value_for(dataset: str, variant: str, split: str, metric: str, resolution: int) -> float:
    """Distinct, reproducible values; twister is best everywhere except attention on val/oIoU."""
    rng = random.Random(f"{dataset}|{variant}|{split}|{metric}|{resolution}")
    base = 60.0 if variant == "twister" else 10.0
    if variant == "attention" and split == "val" and metric == "oIoU":
        base = 90.0
    return base + rng.uniform(0, 20)


def make_records(config_name: str = "demo") -> list[dict]:
    records = []
    for dataset, splits in SPLITS.items():
        for variant in ALL_VARIANTS:
            for resolution in (64, 96):
                for split in splits:
                    record = {"dataset": dataset, "variant": variant, "resolution": resolution, "split": split,
                              "config_name": config_name, "protocol": "original", "n": 7,
                              "checkpoint": f"results/{dataset}/{variant}/best.pt"}
                    record.update({m: value_for(dataset, variant, split, m, resolution) for m in METRICS})
                    records.append(record)
    return records


@pytest.fixture(scope="module")
def records() -> list[dict]:
    return make_records()


# ---- transcription ----


@pytest.mark.parametrize("key", list(PAPER_LINES))
def test_paper_numbers_match_paper_text(key: tuple[str, str, str]) -> None:
    table, dataset, variant = key
    printed = [float(x) for x in re.findall(r"\d+\.\d+", PAPER_LINES[key])]
    cells = paper_numbers.fusion_numbers(table, dataset, variant)
    splits, metrics = paper_numbers.TABLE1_LAYOUT[dataset]
    assert [cells[s][m] for s in splits for m in metrics] == printed


def test_table2_numbers_match_paper_text() -> None:
    rows = {(m, b): c for m, b, c in (*paper_numbers.TABLE2_LITERATURE, paper_numbers.TABLE2_REMAMBER)}
    for line in PAPER_TABLE2_LINES:
        method, backbone, *cells = line.split("\t")
        method = method.replace(" (Ours)", "")
        assert rows[(method, backbone)] == tuple(None if c == "-" else c for c in cells)
    assert len(paper_numbers.TABLE2_LITERATURE) == 20
    assert paper_numbers.remamber_oiou("refcocog", "test") == "64.0"


# ---- DataFrames ----


def test_table1_frame(records: list[dict]) -> None:
    frame = build_table("table1", SPECS["table1"], records)
    assert len(frame) == 3 * 4 * 2  # datasets x variants x (ours, paper)
    assert list(frame.columns[:5]) == ["dataset", "variant", "name", "source", "resolution"]
    assert "val/prec@70" in frame.columns and "test/prec@90" in frame.columns
    assert list(frame[frame["dataset"] == "refcoco"]["name"].unique()) == [
        "Attention", "In-Context", "Adaptation", "Mamba Twister"]
    for _, row in frame[frame["source"] == "ours"].iterrows():
        splits, metrics = paper_numbers.TABLE1_LAYOUT[row["dataset"]]
        for split in splits:
            for metric in metrics:
                assert row[f"{split}/{metric}"] == value_for(row["dataset"], row["variant"], split, metric, 64)
        assert row["resolution"] == 64
    gref = frame[(frame["dataset"] == "refcocog")]
    assert gref["testA/mIoU"].isna().all()  # G-Ref has no testA
    paper = frame[(frame["source"] == "paper") & (frame["dataset"] == "refcoco+") & (frame["variant"] == "twister")]
    assert paper.iloc[0]["testB/prec@70"] == 47.8 and paper.iloc[0]["resolution"] == 256


def test_table2_frame(records: list[dict]) -> None:
    frame = build_table("table2", SPECS["table2"], records)
    assert len(frame) == 20 + 1 + 1
    ours = frame[frame["source"] == "ours"].iloc[0]
    assert ours["method"] == "ReMamber (ours)" and ours["resolution"] == 96
    assert ours["refcocog/test/oIoU"] == value_for("refcocog", "twister", "test", "oIoU", 96)
    rmi = frame[frame["method"] == "RMI [29]"].iloc[0]
    assert rmi["refcoco/testB/oIoU"] == 45.57 and math.isnan(rmi["refcocog/val/oIoU"])


def test_missing_record_names_the_cell(records: list[dict]) -> None:
    without = [r for r in records if not (r["dataset"] == "refcoco+" and r["variant"] == "in_context"
                                          and r["split"] == "testB" and r["resolution"] == 64)]
    with pytest.raises(MissingRecordError, match=r"dataset='refcoco\+' variant='in_context' split='testB'"):
        build_table("table1", SPECS["table1"], without)
    lacking = [dict(r) for r in records]
    for r in lacking:
        if r["dataset"] == "refcocog" and r["variant"] == "twister" and r["split"] == "val":
            del r["prec@90"]
    with pytest.raises(MissingRecordError, match="prec@90"):
        build_table("table1", SPECS["table1"], lacking)


def test_bad_inputs_are_named(records: list[dict]) -> None:
    with pytest.raises(ValueError, match="two evaluation records.*'attention'"):
        build_table("table1", SPECS["table1"], records + [dict(records[0], variant="attention")])
    with pytest.raises(ValueError, match="unknown dataset 'refclef'"):
        build_table("table1", {**SPECS["table1"], "datasets": ["refclef"]}, records)
    with pytest.raises(ValueError, match="'resolution'"):
        build_table("table1", {**SPECS["table1"], "resolution": "low"}, records)
    with pytest.raises(ValueError, match=r"lacks key\(s\) \['split'\]"):
        build_table("table1", SPECS["table1"], [{"dataset": "refcoco", "variant": "twister", "resolution": 64}])


# ---- LaTeX ----


def data_rows(tex: str) -> list[list[str]]:
    """Cells of the body rows that carry a Source cell (ours / paper)."""
    rows = []
    for line in tex.splitlines():
        cells = [c.strip() for c in line.removesuffix(r"\\").split("&")]
        if "ours" in cells or r"\textit{paper}" in cells:
            rows.append(cells)
    return rows


def number(cell: str) -> float:
    return float(re.sub(r"\\text(bf|it)\{(.*)\}", r"\2", cell))


@pytest.mark.parametrize("name", ["table1", "table3", "table4"])
def test_bold_marks_best_of_our_rows(name: str, records: list[dict]) -> None:
    tex = render_latex(name, SPECS[name], records)
    rows = data_rows(tex)
    n_ours = len(SPECS[name]["variants"])
    n_datasets = len(SPECS[name]["datasets"])
    assert sum("ours" in r for r in rows) == n_ours * n_datasets
    assert sum(r"\textit{paper}" in r for r in rows) == n_ours * n_datasets  # every variant has a paper row
    for block in range(n_datasets):
        block_rows = rows[block * 2 * n_ours:(block + 1) * 2 * n_ours]
        # label cells differ per row (a multicolumn span is one cell): cut after the Source cell
        ours = [r[r.index("ours") + 1:] for r in block_rows if "ours" in r]
        paper = [r[r.index(r"\textit{paper}") + 1:] for r in block_rows if r"\textit{paper}" in r]
        assert len({len(r) for r in ours + paper}) == 1
        for col in range(len(ours[0])):
            values = [number(r[col]) for r in ours]
            bolded = [r[col].startswith(r"\textbf") for r in ours]
            assert bolded == [v == max(values) for v in values]
        for r in paper:
            assert all(c.startswith(r"\textit") and r"\textbf" not in c for c in r)
    if name == "table1":  # attention wins val/oIoU on every dataset, twister the rest
        first_ours = rows[0]
        assert first_ours[first_ours.index("ours") + 2].startswith(r"\textbf")


def test_ablation_check_marks(records: list[dict]) -> None:
    tex3 = render_latex("table3", SPECS["table3"], records)
    assert r"\shortstack{Channel\\Scan} & \shortstack{Spatial\\Scan} & Source" in tex3
    assert r"\multirow{2}{*}{$\surd$} & \multirow{2}{*}{--} & ours" in tex3  # channel only
    assert r"\multicolumn{2}{c}{\multirow{2}{*}{Channel-Spatial}} & ours" in tex3
    tex4 = render_latex("table4", SPECS["table4"], records)
    assert r"\shortstack{Image} & \shortstack{Global} & \shortstack{Local} & Source" in tex4
    rows = [r for r in data_rows(tex4) if "ours" in r]
    marks = [[re.sub(r"\\multirow\{2\}\{\*\}\{(.*)\}", r"\1", c) for c in r[:3]] for r in rows]
    assert marks == [[r"$\surd$", r"$\surd$", "--"], [r"$\surd$", "--", r"$\surd$"], [r"$\surd$"] * 3]


def test_table2_latex_marks_quoted_rows(records: list[dict]) -> None:
    tex = render_latex("table2", SPECS["table2"], make_records("demo_x&y"))
    assert "LAVT [53]$^\\dagger$ & Swin-B & 72.73" in tex
    assert "MAttNet [55]$^\\dagger$ & MaskRCNN ResNet-101 & 56.51 & 62.37 & 51.7 &" in tex  # printed precision
    assert r"\textit{ReMamber$^\dagger$} & \textit{Mamba-B} & \textit{74.54}" in tex
    assert "demo\\_x\\&y" in tex and "demo_x&y" not in tex
    ours = [line for line in tex.splitlines() if line.startswith("ReMamber (ours)")]
    expected = f"{value_for('refcoco', 'twister', 'val', 'oIoU', 96):.2f}"
    assert len(ours) == 1 and f"& {expected} &" in ours[0]
    assert r"\textbf" not in ours[0]  # a single row of ours: nothing to compare
    assert "& valU & testU" in tex


# ---- files ----


def test_write_table_csv_round_trip(records: list[dict], tmp_path: Path) -> None:
    for name, spec in SPECS.items():
        tex_path, csv_path = write_table(name, spec, records, tmp_path / "reports")
        assert tex_path.read_text() == render_latex(name, spec, records)
        frame = build_table(name, spec, records)
        back = pd.read_csv(csv_path, keep_default_na=False, na_values=[""])
        back = back.fillna({c: "" for c in back.columns if not pd.api.types.is_numeric_dtype(back[c])})
        pd.testing.assert_frame_equal(back, frame, check_dtype=False)
        assert set(back["source"]) == {"ours", "paper"}
    assert sorted(p.name for p in (tmp_path / "reports").iterdir()) == sorted(
        f"{n}.{ext}" for n in SPECS for ext in ("tex", "csv"))


def test_failed_table_writes_nothing(records: list[dict], tmp_path: Path) -> None:
    with pytest.raises(MissingRecordError):
        write_table("table1", SPECS["table1"], records[:5], tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_metrics_summary_sorted_and_stable(records: list[dict], tmp_path: Path) -> None:
    shuffled = list(records)
    random.Random(1).shuffle(shuffled)
    a = write_metrics_summary(records, tmp_path / "a" / "metrics.json")
    b = write_metrics_summary(shuffled, tmp_path / "b" / "metrics.json")
    assert a.read_bytes() == b.read_bytes()
    back = json.loads(a.read_text())
    assert len(back) == len(records)
    keys = [(r["dataset"], r["variant"], r["resolution"], r["split"]) for r in back]
    assert keys == sorted(keys)
    assert {json.dumps(r, sort_keys=True) for r in back} == {json.dumps(r, sort_keys=True) for r in records}
    with pytest.raises(ValueError, match="lacks key"):
        write_metrics_summary([{"dataset": "refcoco"}], tmp_path / "c.json")
    assert not (tmp_path / "c.json").exists()


def _latex_ready() -> str | None:
    if shutil.which("pdflatex") is None:
        return "pdflatex is not installed"
    for sty in ("booktabs.sty", "multirow.sty"):
        found = subprocess.run(["kpsewhich", sty], capture_output=True, text=True).stdout.strip()
        if not found:
            return f"the TeX installation lacks {sty}"
    return None


@pytest.mark.skipif(_latex_ready() is not None, reason=f"cannot compile LaTeX here: {_latex_ready()}")
def test_tables_compile_with_pdflatex(records: list[dict], tmp_path: Path) -> None:
    """Compiles in a document with only booktabs+multirow; with graphicx the wide tables are scaled
    to the text width (no overfull box)."""
    for name, spec in SPECS.items():
        write_table(name, spec, records, tmp_path)
    inputs = "\n".join(rf"\input{{{name}.tex}}" for name in SPECS)
    for doc, packages in (("minimal", "booktabs,multirow"), ("graphicx", "booktabs,multirow,graphicx")):
        (tmp_path / f"{doc}.tex").write_text(
            f"\\documentclass{{article}}\n\\usepackage{{{packages}}}\n\\begin{{document}}\n"
            f"{inputs}\n\\end{{document}}\n"
        )
        run = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", f"{doc}.tex"],
                             cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stdout[-3000:]
        assert (tmp_path / f"{doc}.pdf").stat().st_size > 0
    log = (tmp_path / "graphicx.log").read_text(errors="replace")
    assert "Overfull \\hbox" not in log, "a table is wider than the text"


# ---- controls: the shuffled-text twister and the text-blind baselines ----


def _control_records() -> list[dict]:
    out = []
    for dataset, splits in SPLITS.items():
        for split in splits:
            shuffled = {"dataset": dataset, "variant": "twister", "resolution": 64, "split": split, "text": "shuffled",
                        "config_name": "demo", "protocol": "original", "n": 7}
            shuffled.update({m: 5.0 for m in METRICS})
            out.append(shuffled)
            for k, kind in enumerate(("largest_object", "centre_object", "random_object")):
                blind = {"dataset": dataset, "variant": kind, "resolution": None, "split": split, "text": "none",
                         "protocol": "original", "n": 7}
                blind.update({m: 20.0 + k for m in METRICS})
                out.append(blind)
    return out


def test_table1_control_rows(records: list[dict], tmp_path: Path) -> None:
    spec = dict(SPECS["table1"], controls=["shuffled_text", "largest_object", "centre_object", "random_object"])
    matched = [dict(r, text="matched") if i % 2 else r for i, r in enumerate(records)]  # "text" may be absent
    frame = build_table("table1", spec, matched + _control_records())
    assert len(frame) == 3 * (4 * 2 + 4)
    controls = frame[frame["source"] == "control"]
    assert list(controls[controls["dataset"] == "refcoco"]["name"]) == [
        "Mamba Twister, shuffled text", "Largest object (no text)", "Object nearest the centre (no text)",
        "Random object (no text)"]
    shuffled = controls[controls["variant"] == "twister"]
    assert (shuffled["val/mIoU"] == 5.0).all()
    assert (controls[controls["variant"] == "centre_object"]["val/prec@50"] == 21.0).all()
    # the matched twister row keeps its own numbers (no clash with the shuffled record)
    ours = frame[(frame["source"] == "ours") & (frame["variant"] == "twister") & (frame["dataset"] == "refcoco")]
    assert ours.iloc[0]["val/mIoU"] == value_for("refcoco", "twister", "val", "mIoU", 64)
    tex = render_latex("table1", spec, matched + _control_records())
    assert tex.count("Random object (no text)") == 3 and tex.count("& control &") == 12
    # controls never take the bold of "best of our rows"
    assert r"\textbf{60" not in tex.split("Mamba Twister, shuffled text")[1].split(r"\\")[0]
    # a missing control record is named, with its text
    with pytest.raises(MissingRecordError, match="variant='twister' split='val' text='shuffled'"):
        build_table("table1", spec, matched + [r for r in _control_records() if r.get("text") != "shuffled"])
    path = write_metrics_summary(matched + _control_records(), tmp_path / "metrics.json")
    again = write_metrics_summary(list(reversed(matched + _control_records())), tmp_path / "again.json")
    assert path.read_bytes() == again.read_bytes()


def test_unknown_control_is_named() -> None:
    with pytest.raises(ValueError, match="unknown control 'no_text'"):
        build_table("table1", dict(SPECS["table1"], controls=["no_text"]), [])
