"""A markdown table of `echo-agent eval` reports on the real-audio suite's splits, with chance beside each cell.

    for s in test test_seen test_phrasing test_open test_threads; do
      echo-agent eval runs/suite/$s.json --out runs/baseline/$s.json --limit 540
    done
    python bench/suite_table.py runs/baseline/*.json

Chance for a multiple-choice item is 1 / its number of choices (answers are balanced, so always picking one
choice scores about that); open questions have no chance level (shown as 0). Rows: domain/category; columns:
one per report (its split), then accuracy by thread turn for reports that have threads.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path
from typing import Any


def _chance(predictions: list[dict[str, Any]]) -> dict[str, float]:
    """Mean chance accuracy per task/category (and overall under "micro")."""
    by: dict[str, list[float]] = defaultdict(list)
    for rec in predictions:
        c = 1.0 / len(rec["choices"]) if rec["choices"] else 0.0
        by[f"{rec['task']}/{rec['category']}"].append(c)
        by[rec["task"]].append(c)
        by["micro"].append(c)
    return {k: sum(v) / len(v) for k, v in by.items()}


def _cell(acc: float | None, chance: float | None) -> str:
    if acc is None:
        return "–"
    return f"{100 * acc:.1f} ({100 * chance:.0f})" if chance is not None else f"{100 * acc:.1f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("reports", nargs="+", type=Path, help="eval --out reports (R.json) of suite splits")
    args = ap.parse_args(argv)
    columns: list[tuple[str, dict[str, float], dict[str, float], dict[str, Any]]] = []
    rows: list[str] = []
    for path in args.reports:
        report = json.loads(path.read_text())
        preds = json.loads(Path(report["predictions"]).read_text())
        split = preds[0]["split"] if preds else path.stem
        acc = {g: s["accuracy"] for g, s in report["per_category"].items()}
        acc |= {g: s["accuracy"] for g, s in (report.get("by_domain") or {}).items()}
        acc["micro"] = report["micro_accuracy"]
        columns.append((f"{split} (n={report['n']})", acc, _chance(preds), report.get("by_turn") or {}))
        rows += [g for g in report["per_category"] if g not in rows]
    rows = sorted(rows) + sorted({g.split("/")[0] for g in rows}) + ["micro"]
    print("| | " + " | ".join(name for name, *_ in columns) + " |")
    print("|---|" + "---|" * len(columns))
    for r in rows:
        print(f"| {r} | " + " | ".join(_cell(a.get(r), c.get(r)) for _, a, c, _ in columns) + " |")
    for name, _, _, turns in columns:
        if turns:
            cells = ", ".join(f"turn {t}: {100 * s['accuracy']:.1f} (n={s['n']})" for t, s in sorted(turns.items()))
            print(f"\n{name} by turn: {cells}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
