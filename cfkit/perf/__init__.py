"""The performance suite: timed benchmarks of cfkit and the report that runs them all.

Each module is a command with one JSON object on stdout (``--json``): ``masks`` (the dense
mask build), ``train_step`` (a training step per method and dtype, the matmul peak, the MFU),
``sample`` (KV-cached sampling against its baselines) and ``data`` (the shard loader against
the training step). ``report`` runs each of them as ``python -m cfkit.perf.NAME`` and writes
one table; ``cfkit bench --perf`` calls it. The scripts in a checkout's ``benchmarks/perf``
(``python benchmarks/perf/train_step.py ...``) run these modules with the same flags.
"""
