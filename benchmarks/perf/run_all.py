"""Run every perf benchmark and write one table: the module cfkit.perf.report, same flags."""

from cfkit.perf.report import main

if __name__ == "__main__":
    raise SystemExit(main())
