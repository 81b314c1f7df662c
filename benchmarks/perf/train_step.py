"""Time full training steps of a cfkit method: the module cfkit.perf.train_step, same flags."""

from cfkit.perf.train_step import main

if __name__ == "__main__":
    raise SystemExit(main())
