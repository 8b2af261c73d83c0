"""Check that the demo reports are all there and well formed; optionally print drift against a reference.

usage: python .ci/check_reports.py REPORTS_DIR [--drift-against OLD_METRICS_JSON]
Exit 1 on a missing or malformed report; drift is printed, never fatal.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd

TABLES = [f"table{i}" for i in range(1, 5)]
FIGURES = ["fig4_interaction_vs_attention", "fig5_cube_pca", "fig7_overlays", "training_curves"]
METRICS = ["oIoU", "mIoU", "prec@50", "prec@60", "prec@70", "prec@80", "prec@90"]


def check(reports: Path) -> list[str]:
    problems = []
    for table in TABLES:
        tex, csv = reports / f"{table}.tex", reports / f"{table}.csv"
        if not tex.is_file() or "\\begin{tabular" not in tex.read_text():
            problems.append(f"{tex}: missing or not a LaTeX table")
        try:
            if pd.read_csv(csv).empty:
                problems.append(f"{csv}: empty")
        except (OSError, ValueError) as exc:
            problems.append(f"{csv}: unreadable ({exc})")
    for fig in FIGURES:
        for ext, magic in (("png", b"\x89PNG"), ("pdf", b"%PDF")):
            path = reports / "figures" / f"{fig}.{ext}"
            if not path.is_file() or not path.read_bytes().startswith(magic):
                problems.append(f"{path}: missing or not a {ext.upper()}")
    try:
        records = json.loads((reports / "metrics.json").read_text())
        records = records["records"] if isinstance(records, dict) else records
        for r in records:
            for key in METRICS:
                if not 0.0 <= float(r[key]) <= 100.0:
                    problems.append(f"metrics.json: {key}={r[key]} out of range in {r}")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        problems.append(f"{reports / 'metrics.json'}: malformed ({exc!r})")
    return problems


def _records(path: Path) -> dict[tuple, dict]:
    data = json.loads(path.read_text())
    data = data["records"] if isinstance(data, dict) else data
    return {(r["dataset"], r["variant"], r["resolution"], r["split"]): r for r in data}


def drift(old: Path, new: Path) -> None:
    before, after = _records(old), _records(new)
    worst = 0.0
    for key in sorted(set(before) | set(after)):
        if key not in before or key not in after:
            print(f"  {key}: only in {'new' if key in after else 'committed'} metrics")
            continue
        diffs = {m: abs(float(after[key][m]) - float(before[key][m])) for m in METRICS}
        worst = max(worst, *diffs.values())
        if any(d > 0 for d in diffs.values()):
            print(f"  {'/'.join(map(str, key))}: " + ", ".join(f"{m} {d:+.3f}" for m, d in diffs.items() if d))
    print(f"largest drift from the committed demo numbers: {worst:.4f} points over {len(after)} evaluations")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("reports", type=Path)
    parser.add_argument("--drift-against", type=Path, default=None)
    args = parser.parse_args()
    problems = check(args.reports)
    for p in problems:
        print("MISSING/MALFORMED:", p)
    if problems:
        return 1
    print(f"all {len(TABLES) * 2 + len(FIGURES) * 2 + 1} expected report files are present and well formed")
    if args.drift_against:
        drift(args.drift_against, args.reports / "metrics.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
