"""Time building the dense generalised causal mask: the module cfkit.perf.masks, same flags."""

from cfkit.perf.masks import main

if __name__ == "__main__":
    raise SystemExit(main())
