"""The CUDA paths in one run (FlexAttention, bf16, compile, NCCL): the module
cfkit.perf.gpu_check, same flags."""

from cfkit.perf.gpu_check import main

if __name__ == "__main__":
    raise SystemExit(main())
