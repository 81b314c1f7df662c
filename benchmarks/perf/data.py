"""Time the shard loader against the training step: the module cfkit.perf.data, same flags."""

from cfkit.perf.data import main

if __name__ == "__main__":
    raise SystemExit(main())
