"""Counted training FLOPs: the matmuls of the transformer blocks, as ``cfkit.perf`` and
``cfkit bench`` count them.

``step_flops`` is the count of one training step from the sizes of what the blocks ran;
``training_flops`` finds those sizes for an experiment (the sequence its method's blocks
really run, condition tokens included, and for a plan-based method the (query, key) pairs
its mask allows) and multiplies by the training steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cfkit.transformer import SplitMask

FLOPS_COUNTED = (
    "matmul FLOPs of the transformer blocks only, per step: per layer "
    "2*B*T*(4 + 2*mlp_ratio)*D^2 (qkv, output projection, MLP; 24*B*T*D^2 at mlp_ratio 4) "
    "plus 4*B*T^2*D (QK^T and AV, dense even where the mask hides keys), times 3 for "
    "forward + backward; T is the sequence length the blocks actually ran (condition, clean "
    "and noisy tokens). Embeddings, adaLN, final layer, norms, softmax, loss and optimizer "
    "are not counted. tflops/mfu use this dense count; tflops_executed/mfu_executed count "
    "only the attention blocks the kernels compute (the sdpa SplitMask skips context->noisy "
    "and copy->other-copy blocks). Both count every row of the last block, whose context "
    "rows the sdpa path skips (their outputs are read by no one)."
)


def step_flops(batch: int, seq_len: float, dim: int, depth: int, mlp_ratio: float,
               attention_pairs: float | None = None) -> float:
    """Counted matmul FLOPs of one training step (see FLOPS_COUNTED). ``attention_pairs`` is
    the number of (query, key) pairs attention computes per sequence; dense ``T^2`` if None."""
    pairs = seq_len**2 if attention_pairs is None else attention_pairs
    per_layer = 2 * batch * seq_len * (4 + 2 * mlp_ratio) * dim**2 + 4 * batch * pairs * dim
    return 3.0 * depth * per_layer


def executed_pairs(seq_len: int, mask) -> int:
    """(query, key) pairs the attention kernels really compute per sequence: a SplitMask
    skips the blocks its rule forbids (context -> noisy, copy -> other copy)."""
    if not isinstance(mask, SplitMask):
        return seq_len**2
    context = mask.context.shape[-1]
    length = (seq_len - context) // mask.copies
    return context**2 + mask.copies * length * (context + length)


@dataclass(frozen=True)
class TrainingFlops:
    """Counted FLOPs of a training run: ``per_step`` (mean over drawn plans) times ``steps``.
    ``attention`` says how attention was counted: ``"mask"`` (the pairs the method's mask
    allows) or ``"dense"`` (T^2 pairs)."""

    per_step: float
    steps: int
    sequence_length: float
    attention: str

    @property
    def total(self) -> float:
        return self.per_step * self.steps

    def record(self) -> dict:
        return {"train_flops": self.total, "flops_per_step": self.per_step,
                "sequence_length": self.sequence_length, "attention_counted": self.attention}


@torch.no_grad()
def training_flops(experiment, draws: int = 16) -> TrainingFlops:
    """The counted training FLOPs of ``experiment``: global batch ``train.batch_size``, the
    width, depth and MLP ratio of its network, and the sequence its blocks run, measured by
    running its loss on a one-image batch of zeros for ``draws`` plans (seeds 0, 1, ...,
    so the count is the same for every seed of a setting). Attention counts the (query, key)
    pairs the plan's mask allows when the blocks ran exactly the plan's layout (CausalFusion,
    In-context DiT); otherwise (DiT's full attention, multimodal sequences with caption
    tokens, timestep tokens) it counts the dense T^2 pairs, an upper bound. The model is
    built on the CPU with its own random state, so the caller's is untouched; at ImageNet
    sizes the ``draws`` CPU forward passes take seconds."""
    from cfkit.methods import Batch

    with torch.random.fork_rng(devices=[]):
        method = experiment.build_method()
    model, config = method.model.eval(), method.model.config
    seen: list[tuple[int, object]] = []
    hook = model.blocks[0].register_forward_pre_hook(
        lambda module, inputs: seen.append((inputs[0].shape[1], inputs[1] if len(inputs) > 1 else None)))
    latents = torch.zeros(1, config.latent_channels, config.input_size, config.input_size)
    lengths, pairs, by_mask = [], [], True
    try:
        for draw in range(draws):
            seen.clear()
            batch = Batch(latents, torch.zeros(1, dtype=torch.long), captions=[["a"]])
            out = method.loss(batch, torch.Generator().manual_seed(draw))
            length = seen[0][0]
            dense = None if out.plan is None else out.plan.layout(config.cond_len).dense()
            if dense is not None and dense.shape[-1] == length:
                pairs.append(float(dense[0].sum()))
            else:
                by_mask = False
                pairs.append(float(length**2))
            lengths.append(float(length))
    finally:
        hook.remove()
    mean_length, mean_pairs = sum(lengths) / draws, sum(pairs) / draws
    # step_flops is linear in the pairs, so the mean of the counts is the count of the means
    per_step = step_flops(experiment.train.batch_size, mean_length, config.hidden_size, config.depth,
                          config.mlp_ratio, mean_pairs)
    return TrainingFlops(per_step, experiment.train.max_steps, mean_length,
                         "mask" if by_mask else "dense")
