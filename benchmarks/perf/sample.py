"""Time generation's diffusion steps, KV-cached and not: the module cfkit.perf.sample, same flags."""

from cfkit.perf.sample import main

if __name__ == "__main__":
    raise SystemExit(main())
