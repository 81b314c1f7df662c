"""Time the blocks' CPU inference with the MLP's fused first layer + GELU against unfused: the
module cfkit.perf.mlp, same flags."""

from cfkit.perf.mlp import main

if __name__ == "__main__":
    raise SystemExit(main())
