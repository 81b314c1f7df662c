"""benchmarks/heldout_pairs.py: Table 2's question in the held-out loss, from a results.json."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "heldout_pairs.py"
spec = importlib.util.spec_from_file_location("heldout_pairs", SCRIPT)
heldout_pairs = importlib.util.module_from_spec(spec)
spec.loader.exec_module(heldout_pairs)


def _cell(values):
    return {"values": list(values), "seeds": list(range(len(values)))}


def _results(diagonal, other):
    """A Table-2-like table: rows '1' and '8', FID paper columns at S 1 and 8 (row '8' best at
    S = 8), held-out columns at S 1 and 8 with the given per-seed values at S = 8."""
    columns = [{"name": "held-out ε-MSE", "ar_steps": s, "metric": "heldout-loss"} for s in (1, 8)]
    rows = [
        {"label": "1", "kind": "model", "paper": [13.8, 390.2],
         "cells": [_cell([0.06, 0.061, 0.062]), _cell(other)]},
        {"label": "8", "kind": "model", "paper": [54.1, 20.0],
         "cells": [_cell([0.07, 0.069, 0.068]), _cell(diagonal)]},
        {"label": "real-train", "kind": "baseline", "paper": [None, None], "cells": [{}, {}]},
    ]
    table = {"table": "2", "columns": columns, "rows": rows,
             "paper": {"columns": ["fid ↓ S=1", "fid ↓ S=8"]}}
    return {"tables": [table]}


def test_the_paper_best_row_with_a_clearly_lower_loss_holds_at_every_s_eval():
    pairs = heldout_pairs.table_pairs(_results([0.063, 0.064, 0.062], [0.2, 0.25, 0.22])["tables"][0])
    assert [(p["s_eval"], p["paper_best"], p["other"], p["verdict"]) for p in pairs] == [
        (1, "1", "8", "holds"), (8, "8", "1", "holds")]


def test_a_loss_that_favours_the_other_row_fails_and_noise_is_not_resolvable():
    worse = heldout_pairs.table_pairs(_results([0.2, 0.25, 0.22], [0.063, 0.064, 0.062])["tables"][0])
    assert worse[1]["verdict"] == "fails"
    noisy = heldout_pairs.table_pairs(_results([0.06, 0.09, 0.05], [0.07, 0.05, 0.08])["tables"][0])
    assert noisy[1]["verdict"] == "not resolvable"


def test_the_command_prints_the_pairs_and_writes_json(tmp_path, capsys):
    path = tmp_path / "results.json"
    path.write_text(json.dumps(_results([0.063, 0.064, 0.062], [0.2, 0.25, 0.22])))
    heldout_pairs.main([str(path), "--json", str(tmp_path / "pairs.json")])
    assert "2 of 2 pairs hold" in capsys.readouterr().out
    assert len(json.loads((tmp_path / "pairs.json").read_text())) == 2


def test_results_without_heldout_columns_are_a_clear_error(tmp_path):
    data = _results([0.063, 0.064, 0.062], [0.2, 0.25, 0.22])
    for column in data["tables"][0]["columns"]:
        column["name"] = "FID-300"
    path = tmp_path / "results.json"
    path.write_text(json.dumps(data))
    with pytest.raises(SystemExit, match="no table with both paper FID and held-out"):
        heldout_pairs.main([str(path)])
