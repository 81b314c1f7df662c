"""Table 2's question in the held-out ε-MSE: at each S_eval, is the row the paper finds best
(by FID at that S_eval) also best in the held-out loss, over paired seeds?

    python benchmarks/heldout_pairs.py runs/mnist-ablations/results.json [--json OUT]

Reads a bench's ``results.json`` (nothing is trained or evaluated). For every table with
paper FID columns and held-out ε-MSE columns at the same S_eval, the paper's best row is
compared with every other trained row through ``cfkit.bench.stats.compare``: the mean relative
advantage of the paper's best row (positive: lower loss, the paper's direction) with its 95%
interval over the seeds, the paired t-test p and the MDE at 80% power. The paper has no
held-out loss, so there is no paper effect: a pair *holds* when significant in the paper's
direction, *fails* when significant against it, and is otherwise not resolvable. The held-out
loss needs no structure-blind baseline: it is a likelihood-style score of the val images,
not a sample statistic. Prints markdown; ``--json`` also writes the pairs as JSON.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from cfkit.bench.stats import HOLDS, Cell, compare, verdict_text

HELDOUT = "held-out ε-MSE"
PAPER_FID = re.compile(r"^fid\b.* S=(?P<s>\d+)$")


def cell(data: dict) -> Cell:
    values = tuple(v for v in data.get("values", ()) if v is not None)
    return Cell(values, tuple(data.get("seeds", ())[: len(values)]))


def table_pairs(table: dict) -> list[dict]:
    """The pairs of one table: a dict per (S_eval, other row)."""
    paper_columns = (table.get("paper") or {}).get("columns", [])
    rows = [r for r in table["rows"] if r["kind"] == "model"]
    found = []
    for p_index, p_name in enumerate(paper_columns):
        match = PAPER_FID.match(p_name)
        if not match:
            continue
        s_eval = int(match["s"])
        column = next((i for i, c in enumerate(table["columns"])
                       if c["name"] == HELDOUT and c["ar_steps"] == s_eval), None)
        scored = [r for r in rows if r["paper"] and r["paper"][p_index] is not None]
        if column is None or not scored:
            continue
        best = min(scored, key=lambda r: r["paper"][p_index])
        for other in rows:
            if other is best:
                continue
            pair = compare(cell(best["cells"][column]), cell(other["cells"][column]), "lower",
                           other["label"])
            if pair is None:
                continue
            found.append({"table": table["table"], "s_eval": s_eval, "paper_best": best["label"],
                          "other": other["label"], "seeds": list(pair.seeds), "advantage": pair.mean,
                          "ci95": pair.ci95, "p": pair.p, "mde": pair.mde, "verdict": pair.verdict})
    return found


def markdown(pairs: list[dict]) -> str:
    lines = ["| table | S_eval | paper's best row | other row | seeds | advantage ± 95% CI | p | "
             "MDE | verdict |", "|---|---|---|---|---|---|---|---|---|"]
    for p in pairs:
        interval = "" if p["ci95"] is None else f" ± {p['ci95']:.1%}"
        p_text = "—" if p["p"] is None else f"{p['p']:.2g}"
        mde = "—" if p["mde"] is None else f"{p['mde']:.1%}"
        lines.append(f"| {p['table']} | {p['s_eval']} | {p['paper_best']} | {p['other']} | "
                     f"{len(p['seeds'])} | {p['advantage']:+.1%}{interval} | {p_text} | {mde} | "
                     f"{verdict_text(p['verdict'], len(p['seeds']))} |")
    held = sum(p["verdict"] == HOLDS for p in pairs)
    lines.append(f"\n{held} of {len(pairs)} pairs hold. Advantage: the other row's held-out "
                 "ε-MSE minus the paper's best row's, relative to the latter (positive: the "
                 "paper's best row has the lower loss, as the paper's FID has it).")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", type=Path, help="a bench's results.json")
    parser.add_argument("--json", type=Path, help="also write the pairs here")
    args = parser.parse_args(argv)
    results = json.loads(args.results.read_text())
    pairs = [p for table in results["tables"] for p in table_pairs(table)]
    if not pairs:
        raise SystemExit(f"{args.results}: no table with both paper FID and {HELDOUT} columns "
                         "at the same S_eval")
    print(markdown(pairs))
    if args.json:
        tmp = args.json.with_name(args.json.name + ".tmp")
        tmp.write_text(json.dumps(pairs, indent=1))
        tmp.replace(args.json)


if __name__ == "__main__":
    main()
