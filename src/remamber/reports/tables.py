"""Tables 1-4 of the paper as LaTeX (booktabs) and CSV, from evaluation metrics records.

A record is one ``metrics.json`` of the evaluation step: ``dataset``, ``variant``, ``resolution``,
``split``, ``config_name``, metrics in percent (``mIoU``, ``oIoU``, ``prec@50`` .. ``prec@90``).
A table ``spec`` is one entry of the experiment matrix: ``{"resolution": int, "datasets": [...],
"variants": [...]}`` (optionally ``"splits": {dataset: [...]}`` to override the paper's splits).

Every table shows our rows beside the paper's printed numbers: the DataFrame/CSV carries a
``source`` column (``ours`` / ``paper``); in LaTeX paper rows are italic and labelled *paper*
(Table 2's literature rows are additionally daggered as quoted). The best of OUR rows per column is
bold (only when there are at least two of our rows to compare).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from remamber.errors import RemamberError
from remamber.vocabulary import BASELINES, DATASETS, SHUFFLED_TEXT, SHUFFLED_TEXT_VARIANT, variant_label
from remamber.reports import latex
from remamber.fileio import atomic_write_text as write_text_atomic
from remamber.fileio import atomic_write_with as write_with
from remamber.reports.paper_numbers import (
    TABLE1_LAYOUT,
    TABLE2_COLUMNS,
    TABLE2_LITERATURE,
    TABLE2_REMAMBER,
    fusion_numbers,
)

PAPER_LOW_RESOLUTION = 256  # Tables 1, 3, 4 of the paper
PAPER_HIGH_RESOLUTION = 480  # Table 2
DATASET_NAMES = {name: facts.label for name, facts in DATASETS.items()}
METRIC_LABELS = {
    "mIoU": "mIoU", "oIoU": "oIoU",
    "prec@50": "Pr@50", "prec@60": "Pr@60", "prec@70": "Pr@70", "prec@80": "Pr@80", "prec@90": "Pr@90",
}
# Check-mark columns of the ablation tables: per variant either one cell per column, or a label
# spanning them all (as the paper prints "Parallel", "Spatial-Channel", "Channel-Spatial").
_Y, _N = latex.CHECK, latex.DASH
ABLATION_COLUMNS = {
    "table3": (("Channel Scan", "Spatial Scan"), {
        "channel_only": ((_Y, _N), "Channel Scan only"),
        "spatial_only": ((_N, _Y), "Spatial Scan only"),
        "parallel": ("Parallel", "Parallel"),
        "spatial_channel": ("Spatial-Channel", "Spatial-Channel"),
        "twister": ("Channel-Spatial", "Channel-Spatial"),
    }),
    "table4": (("Image", "Global", "Local"), {
        "global_only": ((_Y, _Y, _N), "Image + Global"),
        "local_only": ((_Y, _N, _Y), "Image + Local"),
        "twister": ((_Y, _Y, _Y), "Image + Global + Local"),
    }),
}
CAPTIONS = {
    "table1": "Comparison with other modality fusion variants (paper Table 1)",
    "table2": "Comparison with the state of the art, oIoU (paper Table 2)",
    "table3": "Ablation on the combination of the two scans, RefCOCO (paper Table 3)",
    "table4": "Ablation on global and local interaction, RefCOCO (paper Table 4)",
}
# Evaluation-only rows (params: a table's `controls`): how much the models use the text. A record's
# "text" is "matched" (ordinary; the default when absent), "shuffled" (every sentence moved to another
# image) or "none" (a text-blind baseline, scored at the original size whatever the table's resolution).
CONTROL_ROWS = {
    SHUFFLED_TEXT: (SHUFFLED_TEXT_VARIANT, "shuffled", f"{variant_label(SHUFFLED_TEXT_VARIANT)}, shuffled text"),
    **{kind: (kind, "none", label) for kind, label in BASELINES.items()},
}
REQUIRED_RECORD_KEYS = ("dataset", "variant", "resolution", "split")
META_COLUMNS = ["dataset", "variant", "name", "source", "resolution"]
TABLE2_META_COLUMNS = ["method", "backbone", "variant", "source", "resolution"]


class MissingRecordError(RemamberError, LookupError):
    """A cell of a table has no evaluation record (or the record lacks the metric)."""


# ---- inputs ----


def _check_spec(name: str, spec: Mapping[str, Any]) -> tuple[int, list[str], list[str], dict[str, tuple[str, ...]]]:
    """Validate a matrix entry; returns (resolution, datasets, variants, splits per dataset)."""
    if not isinstance(spec, Mapping):
        raise ValueError(f"{name}: table spec must be a mapping, got {type(spec).__name__}")
    unknown = sorted(set(spec) - {"resolution", "datasets", "variants", "splits", "controls"})
    if unknown:
        raise ValueError(f"{name}: unknown table spec key(s) {unknown}")
    resolution = spec.get("resolution")
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution <= 0:
        raise ValueError(f"{name}: spec 'resolution' must be a positive int, got {resolution!r}")
    datasets, variants = spec.get("datasets"), spec.get("variants")
    for key, values in (("datasets", datasets), ("variants", variants)):
        if not isinstance(values, Sequence) or isinstance(values, str) or not values:
            raise ValueError(f"{name}: spec {key!r} must be a non-empty list, got {values!r}")
    for dataset in datasets:
        if dataset not in TABLE1_LAYOUT:
            raise ValueError(f"{name}: unknown dataset {dataset!r}; known: {sorted(TABLE1_LAYOUT)}")
    for control in spec.get("controls") or ():
        if control not in CONTROL_ROWS:
            raise ValueError(f"{name}: unknown control {control!r}; known: {sorted(CONTROL_ROWS)}")
    overrides = spec.get("splits") or {}
    splits = {d: tuple(overrides.get(d, TABLE1_LAYOUT[d][0])) for d in datasets}
    return resolution, list(datasets), list(variants), splits


def _describe(record: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={record.get(k)!r}" for k in ("config_name", *REQUIRED_RECORD_KEYS) if k in record)


def _text(record: Mapping[str, Any]) -> str:
    return str(record.get("text", "matched"))


def _index_records(name: str, records: Sequence[Mapping[str, Any]], resolution: int) -> dict[tuple[str, str, str, str], Mapping[str, Any]]:
    """(dataset, variant, split, text) -> record, for the records at ``resolution`` and the text-blind
    ones (which have no resolution)."""
    index: dict[tuple[str, str, str, str], Mapping[str, Any]] = {}
    for i, record in enumerate(records):
        if not isinstance(record, Mapping):
            raise ValueError(f"{name}: record #{i} is a {type(record).__name__}, not a metrics mapping")
        missing = [k for k in REQUIRED_RECORD_KEYS if k not in record]
        if missing:
            raise ValueError(f"{name}: record #{i} ({_describe(record)}) lacks key(s) {missing}")
        if _text(record) != "none" and int(record["resolution"]) != resolution:
            continue
        key = (str(record["dataset"]), str(record["variant"]), str(record["split"]), _text(record))
        if key in index:
            raise ValueError(
                f"{name}: two evaluation records for dataset={key[0]!r} variant={key[1]!r} split={key[2]!r} "
                f"text={key[3]!r} at resolution {resolution} ({_describe(index[key])} and {_describe(record)})"
            )
        index[key] = record
    return index


def _our_value(name: str, index: Mapping, dataset: str, variant: str, split: str, metric: str, resolution: int,
               text: str = "matched") -> float:
    record = index.get((dataset, variant, split, text))
    if record is None:
        what = "" if text == "matched" else f" text={text!r}"
        raise MissingRecordError(
            f"{name}: no evaluation record for dataset={dataset!r} variant={variant!r} split={split!r}{what} "
            f"at resolution {resolution}"
        )
    if metric not in record:
        raise MissingRecordError(f"{name}: record ({_describe(record)}) has no metric {metric!r}")
    value = float(record[metric])
    if not math.isfinite(value):
        raise ValueError(f"{name}: record ({_describe(record)}) has non-finite {metric}={value}")
    return value


def _config_names(index: Mapping) -> str:
    names = sorted({str(r["config_name"]) for r in index.values() if r.get("config_name") is not None})
    return ", ".join(names)


# ---- DataFrames ----


def _fusion_frame(name: str, spec: Mapping[str, Any], records: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    resolution, datasets, variants, splits = _check_spec(name, spec)
    index = _index_records(name, records, resolution)
    rows: list[dict[str, Any]] = []
    columns = list(META_COLUMNS)
    for dataset in datasets:
        metrics = TABLE1_LAYOUT[dataset][1]
        cols = [f"{split}/{metric}" for split in splits[dataset] for metric in metrics]
        columns += [c for c in cols if c not in columns]
        for variant in variants:
            display = _display_name(name, variant)
            ours = {
                f"{split}/{metric}": _our_value(name, index, dataset, variant, split, metric, resolution)
                for split in splits[dataset]
                for metric in metrics
            }
            rows.append({"dataset": dataset, "variant": variant, "name": display, "source": "ours",
                         "resolution": resolution, **ours})
            paper = fusion_numbers(name, dataset, variant)
            if paper is not None:
                cells = {c: paper.get(c.split("/")[0], {}).get(c.split("/")[1], math.nan) for c in cols}
                rows.append({"dataset": dataset, "variant": variant, "name": display, "source": "paper",
                             "resolution": PAPER_LOW_RESOLUTION, **cells})
        for control in spec.get("controls") or ():
            variant, text, display = CONTROL_ROWS[control]
            cells = {c: _our_value(name, index, dataset, variant, c.split("/")[0], c.split("/")[1], resolution, text)
                     for c in cols}
            rows.append({"dataset": dataset, "variant": variant, "name": display, "source": "control",
                         "resolution": resolution if text != "none" else None, **cells})
    return pd.DataFrame(rows, columns=columns)


def _table2_frame(name: str, spec: Mapping[str, Any], records: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    resolution, datasets, variants, splits = _check_spec(name, spec)
    index = _index_records(name, records, resolution)
    pairs = [(d, s) for d in datasets for s in splits[d]]
    columns = TABLE2_META_COLUMNS + [f"{d}/{s}/oIoU" for d, s in pairs]

    def quoted(cells: tuple[str | None, ...]) -> dict[str, float]:
        printed = dict(zip(TABLE2_COLUMNS, cells))
        return {f"{d}/{s}/oIoU": float(printed[(d, s)]) if printed.get((d, s)) else math.nan for d, s in pairs}

    rows: list[dict[str, Any]] = [
        {"method": method, "backbone": backbone, "variant": "", "source": "paper",
         "resolution": PAPER_HIGH_RESOLUTION, **quoted(cells)}
        for method, backbone, cells in TABLE2_LITERATURE
    ]
    method, backbone, cells = TABLE2_REMAMBER
    rows.append({"method": method, "backbone": backbone, "variant": "twister", "source": "paper",
                 "resolution": PAPER_HIGH_RESOLUTION, **quoted(cells)})
    for variant in variants:
        label = "ReMamber (ours)" if variant == "twister" else f"{_display_name(name, variant)} (ours)"
        ours = {f"{d}/{s}/oIoU": _our_value(name, index, d, variant, s, "oIoU", resolution) for d, s in pairs}
        rows.append({"method": label, "backbone": "VMamba", "variant": variant, "source": "ours",
                     "resolution": resolution, **ours})
    return pd.DataFrame(rows, columns=columns)


def _display_name(name: str, variant: str) -> str:
    if name in ABLATION_COLUMNS and variant in ABLATION_COLUMNS[name][1]:
        return ABLATION_COLUMNS[name][1][variant][1]
    return variant_label(variant)


def build_table(name: str, spec: Mapping[str, Any], records: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """One row per (dataset, variant, source) with columns ``<split>/<metric>`` (Tables 1, 3, 4 and
    any other name, laid out like Table 1), or for ``table2`` one row per method with columns
    ``<dataset>/<split>/oIoU``. Raises :class:`MissingRecordError` naming dataset/variant/split
    for a missing cell."""
    if name == "table2":
        return _table2_frame(name, spec, records)
    return _fusion_frame(name, spec, records)


# ---- LaTeX ----


def _fmt(value: float, decimals: int) -> str:
    return latex.DASH if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{decimals}f}"


def _best_cells(frame: pd.DataFrame, columns: list[str], decimals: int) -> set[tuple[int, str]]:
    """(row index, column) of the maxima of OUR rows per column, compared as displayed."""
    ours = frame[frame["source"] == "ours"]
    if len(ours) < 2:
        return set()
    best = set()
    for column in columns:
        shown = ours[column].round(decimals)
        best |= {(i, column) for i in shown.index[shown == shown.max()]}
    return best


def _fusion_latex(name: str, spec: Mapping[str, Any], frame: pd.DataFrame, config_names: str) -> str:
    resolution, datasets, variants, splits = _check_spec(name, spec)
    check_headers, check_cells = ABLATION_COLUMNS.get(name, ((), {}))
    left = list(check_headers) if check_headers else ["Variant"]
    n_left = len(left) + 1  # + Source
    n_metric = max(len(splits[d]) * len(TABLE1_LAYOUT[d][1]) for d in datasets)
    n_cols = n_left + n_metric
    body: list[str] = []
    for block, dataset in enumerate(datasets):
        metrics = TABLE1_LAYOUT[dataset][1]
        cols = [f"{s}/{m}" for s in splits[dataset] for m in metrics]
        part = frame[frame["dataset"] == dataset]
        best = _best_cells(part, cols, 1)
        body.append(r"\toprule" if block == 0 else r"\midrule")
        body.append(latex.row([latex.multicolumn(n_cols, "l", latex.bold("Dataset: " + latex.escape(DATASET_NAMES[dataset])))]))
        body.append(latex.row([""] * n_left + [latex.multicolumn(len(metrics), "c", latex.escape(s)) for s in splits[dataset]]))
        body.append("".join(
            rf"\cmidrule(lr){{{n_left + 1 + k * len(metrics)}-{n_left + (k + 1) * len(metrics)}}}"
            for k in range(len(splits[dataset]))
        ))
        body.append(latex.row([latex.stacked(h) for h in left] + ["Source"] + [METRIC_LABELS[m] for m in metrics] * len(splits[dataset])))
        body.append(r"\midrule")
        for variant in variants:
            rows = part[(part["variant"] == variant) & (part["source"] != "control")]
            height = len(rows)
            for k, (i, record) in enumerate(rows.iterrows()):
                is_ours = record["source"] == "ours"
                label = _label_cells(variant, name, check_cells, len(left), height if k == 0 else 0)
                values = []
                for column in cols:
                    cell = _fmt(record[column], 1)
                    if (i, column) in best:
                        cell = latex.bold(cell)
                    values.append(cell if is_ours else latex.italic(cell))
                source = "ours" if is_ours else latex.italic("paper")
                body.append(latex.row(label + [source] + values))
        controls = part[part["source"] == "control"]
        if len(controls):
            body.append(r"\midrule")
        for _, record in controls.iterrows():
            text = latex.escape(record["name"])
            label = [text] if len(left) == 1 else [latex.multicolumn(len(left), "l", text)]
            body.append(latex.row(label + ["control"] + [_fmt(record[c], 1) for c in cols]))
    body.append(r"\bottomrule")
    caption = (
        f"{CAPTIONS.get(name, latex.escape(name))}, resolution {resolution}"
        f"{', config ' + latex.escape(config_names) if config_names else ''}. "
        r"Rows \textit{paper}: numbers printed in the paper (resolution "
        f"{PAPER_LOW_RESOLUTION}). Bold: best of our rows."
        + (" Rows marked control: the Mamba Twister evaluated with every sentence moved to another image, and "
           "text-blind guesses that pick one object of the image without reading the expression."
           if spec.get("controls") else "")
    )
    return latex.wrap_table(body, "l" * n_left + "c" * n_metric, caption, f"tab:{latex.escape(name)}")


def _label_cells(variant: str, name: str, check_cells: Mapping, n_left: int, height: int) -> list[str]:
    """Left cells of one row: the variant name (or check marks) on the first row of its group,
    spanning the group with multirow; empty cells on the following rows."""
    spec = check_cells.get(variant)
    if spec is None or isinstance(spec[0], str):
        text = latex.escape(spec[0] if spec else _display_name(name, variant))
        content = latex.multirow(height, text) if height else ""
        return [content] if n_left == 1 else [latex.multicolumn(n_left, "c", content)]
    return [latex.multirow(height, mark) if height else "" for mark in spec[0]]


def _table2_latex(spec: Mapping[str, Any], frame: pd.DataFrame, config_names: str) -> str:
    resolution, datasets, _, splits = _check_spec("table2", spec)
    columns = [c for c in frame.columns if c.endswith("/oIoU")]
    n_cols = 2 + len(columns)
    printed = {(m, b): dict(zip(TABLE2_COLUMNS, cells)) for m, b, cells in (*TABLE2_LITERATURE, TABLE2_REMAMBER)}
    best = _best_cells(frame, columns, 2)
    body = [r"\toprule"]
    body.append(latex.row(["", ""] + [latex.multicolumn(len(splits[d]), "c", latex.escape(DATASET_NAMES[d])) for d in datasets]))
    start = 3
    rules = ""
    for d in datasets:
        rules += rf"\cmidrule(lr){{{start}-{start + len(splits[d]) - 1}}}"
        start += len(splits[d])
    body.append(rules)
    split_labels = [f"{s}U" if d == "refcocog" else s for d in datasets for s in splits[d]]
    body.append(latex.row(["Method", "Backbone"] + [latex.escape(s) for s in split_labels]))
    body.append(r"\midrule")
    body.append(latex.row([latex.multicolumn(n_cols, "l", latex.italic(
        f"Quoted from the paper (Table 2, resolution {PAPER_HIGH_RESOLUTION})"))]))
    for i, record in frame.iterrows():
        if record["source"] != "paper":
            continue
        cells = printed[(record["method"], record["backbone"])]
        values = []
        for column in columns:
            dataset, split, _ = column.split("/")
            values.append(cells.get((dataset, split)) or latex.DASH)
        method = latex.escape(record["method"]) + r"$^\dagger$"
        if record["variant"]:  # the paper's own ReMamber row: the reference for ours
            body.append(latex.row([latex.italic(method), latex.italic(latex.escape(record["backbone"]))] + [latex.italic(v) for v in values]))
        else:
            body.append(latex.row([method, latex.escape(record["backbone"])] + values))
    body.append(r"\midrule")
    note = f"This reproduction (resolution {resolution}{', config ' + latex.escape(config_names) if config_names else ''})"
    body.append(latex.row([latex.multicolumn(n_cols, "l", latex.italic(note))]))
    for i, record in frame.iterrows():
        if record["source"] != "ours":
            continue
        values = [latex.bold(_fmt(record[c], 2)) if (i, c) in best else _fmt(record[c], 2) for c in columns]
        body.append(latex.row([latex.escape(record["method"]), latex.escape(record["backbone"])] + values))
    body.append(r"\bottomrule")
    caption = (
        f"{CAPTIONS['table2']}. Rows marked $^\\dagger$ are quoted from the paper; the italic "
        "ReMamber row is the paper's result for the model this pipeline reproduces."
    )
    return latex.wrap_table(body, "ll" + "c" * len(columns), caption, "tab:table2",
                            notes=[r"{$^\dagger$ quoted from the paper (ECCV 2024), not re-run.}"])


def render_latex(name: str, spec: Mapping[str, Any], records: Sequence[Mapping[str, Any]]) -> str:
    """The LaTeX ``table`` float of ``build_table(name, spec, records)``."""
    frame = build_table(name, spec, records)
    resolution = _check_spec(name, spec)[0]
    config_names = _config_names(_index_records(name, records, resolution))
    if name == "table2":
        return _table2_latex(spec, frame, config_names)
    return _fusion_latex(name, spec, frame, config_names)


def write_table(name: str, spec: Mapping[str, Any], records: Sequence[Mapping[str, Any]], out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``<out_dir>/<name>.tex`` and ``<out_dir>/<name>.csv`` (each atomically); returns both paths.

    Both are built before either is written, so a bad input leaves no new file behind."""
    out_dir = Path(out_dir)
    frame = build_table(name, spec, records)
    tex = render_latex(name, spec, records)
    tex_path, csv_path = out_dir / f"{name}.tex", out_dir / f"{name}.csv"
    write_with(csv_path, lambda tmp: frame.to_csv(tmp, index=False, lineterminator="\n"))
    write_text_atomic(tex_path, tex)
    return tex_path, csv_path


def write_metrics_summary(records: Sequence[Mapping[str, Any]], out_path: str | Path) -> Path:
    """All evaluation records in one JSON list, sorted by (config_name, dataset, variant, resolution,
    split, protocol) with sorted keys, so identical inputs give a byte-identical file."""
    for i, record in enumerate(records):
        if not isinstance(record, Mapping):
            raise ValueError(f"metrics summary: record #{i} is a {type(record).__name__}, not a mapping")
        missing = [k for k in REQUIRED_RECORD_KEYS if k not in record]
        if missing:
            raise ValueError(f"metrics summary: record #{i} ({_describe(record)}) lacks key(s) {missing}")

    def key(record: Mapping[str, Any]) -> tuple:
        resolution = -1 if record["resolution"] is None else int(record["resolution"])
        return (str(record.get("config_name", "")), str(record["dataset"]), str(record["variant"]),
                resolution, str(record["split"]), str(record.get("protocol", "")), _text(record))

    ordered = sorted((dict(r) for r in records), key=key)
    out_path = Path(out_path)
    write_text_atomic(out_path, json.dumps(ordered, indent=2, sort_keys=True) + "\n")
    return out_path
