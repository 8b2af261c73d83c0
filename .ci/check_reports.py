"""Check that the demo reports are all there and well formed; optionally print drift against a reference.

usage: python .ci/check_reports.py REPORTS_DIR [--drift-against OLD_METRICS_JSON] [--science]
Exit 1 on a missing or malformed report; drift is printed, never fatal. --science prints whether the demo
shows what it must (the twister uses the text: above the text-blind baselines, below itself with shuffled
text) and exits 1 when it does not.
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
    return {(r["dataset"], r["variant"], r["resolution"], r["split"], r.get("text", "matched")): r for r in data}


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


def science(path: Path) -> list[str]:
    """The demo's bars (issue 10): on every dataset's val split, every Table 1 fusion above the best
    text-blind baseline; on RefCOCO val the twister at least 20 mIoU points above it with prec@50 >= 50, and
    at least 15 points above itself with shuffled text."""
    records = _records(path)
    failures = []
    low = min(r["resolution"] for r in records.values() if r["resolution"] is not None)
    for dataset in sorted({k[0] for k in records}):
        blind = {k[1]: r["mIoU"] for k, r in records.items() if k[0] == dataset and k[3] == "val" and k[4] == "none"}
        if not blind:
            continue
        best_blind = max(blind.values())
        for variant in ("attention", "in_context", "norm_adaptation", "twister"):
            r = records.get((dataset, variant, low, "val", "matched"))
            if r is None:
                continue
            ok = r["mIoU"] > best_blind
            print(f"  {dataset} val {variant:16s} mIoU {r['mIoU']:5.1f} vs best text-blind {best_blind:5.1f}"
                  f" ({max(blind, key=blind.get)}): {'ok' if ok else 'FAIL'}")
            if not ok:
                failures.append(f"{dataset} val {variant}: not above the text-blind baselines")
    twister = records.get(("refcoco", "twister", low, "val", "matched"))
    shuffled = records.get(("refcoco", "twister", low, "val", "shuffled"))
    blind = [r["mIoU"] for k, r in records.items() if k[0] == "refcoco" and k[3] == "val" and k[4] == "none"]
    if twister is None or shuffled is None or not blind:
        return failures + ["refcoco val: twister, shuffled-text or baseline record missing"]
    checks = [(twister["mIoU"] - max(blind) >= 20, f"twister - best text-blind = {twister['mIoU'] - max(blind):.1f} >= 20"),
              (twister["prec@50"] >= 50, f"twister prec@50 = {twister['prec@50']:.1f} >= 50"),
              (twister["mIoU"] - shuffled["mIoU"] >= 15,
               f"twister matched - shuffled text = {twister['mIoU'] - shuffled['mIoU']:.1f} >= 15")]
    for ok, text in checks:
        print(f"  refcoco val: {text}: {'ok' if ok else 'FAIL'}")
        if not ok:
            failures.append(f"refcoco val: {text} does not hold")
    return failures


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("reports", type=Path)
    parser.add_argument("--drift-against", type=Path, default=None)
    parser.add_argument("--science", action="store_true")
    args = parser.parse_args()
    problems = check(args.reports)
    for p in problems:
        print("MISSING/MALFORMED:", p)
    if problems:
        return 1
    print(f"all {len(TABLES) * 2 + len(FIGURES) * 2 + 1} expected report files are present and well formed")
    if args.drift_against:
        drift(args.drift_against, args.reports / "metrics.json")
    if args.science:
        print("does the demo show the text being used?")
        failures = science(args.reports / "metrics.json")
        for f in failures:
            print("SCIENCE:", f)
        return 1 if failures else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
