"""Comparative benchmarks (``cfkit bench``): grids of training runs, each evaluated at several
S_eval and CFG scales, reported as the paper's tables.

- ``schema``: the bench config (pydantic), its runs and their keys;
- ``runner``: trains, evaluates and scores baselines, writing files only;
- ``stats``: the statistics of the tables (paired over seeds), pure;
- ``report``: reads the runs' files and writes results.json, report.md and the plots
  (``plots``).
"""

from cfkit.bench.runner import evaluate_run, run_bench, train_run
from cfkit.bench.schema import Bench, Evaluation, Grid, Overrides, Run, Variant, experiment_key, load

__all__ = ["Bench", "Evaluation", "Grid", "Overrides", "Run", "Variant", "evaluate_run", "experiment_key",
           "load", "run_bench", "train_run"]
