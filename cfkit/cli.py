"""The ``cfkit`` command line."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from cfkit import config as configs
from cfkit import plugins
from cfkit.convert import CheckpointError


def cmd_plugins(args) -> int:
    rows = [(c.kind, c.name, c.provider) for c in plugins.registry().components()]
    widths = [max(len(r[i]) for r in rows + [("kind", "name", "plugin")]) for i in range(3)]
    for row in [("kind", "name", "plugin")] + rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    return 0


def cmd_config(args) -> int:
    config = configs.load(args.file, args.set)
    if args.action == "validate":
        print(f"{args.file}: valid")
    else:
        print(configs.dump(config), end="")
    return 0


def cmd_plan(args) -> int:
    """Draw one batch's plan from a config and show it: order, steps, t, weights, mask."""
    config = configs.load(args.config, args.set)
    network = config.network_config()
    generator = torch.Generator().manual_seed(config.seed if args.seed is None else args.seed)
    factorisation = config.factorisation
    diffusion = config.diffusion.build()
    plan = factorisation.planner().draw(args.batch, network.grid, diffusion.num_timesteps, generator)
    from cfkit.weightings import loss_weights

    t = plan.t_per_token()
    weights = loss_weights(
        plan.step_start().unsqueeze(1), t, plan.num_tokens, diffusion.alphas_cumprod,
        factorisation.ar_weighting.build(), factorisation.diffusion_weighting.build(),
    )
    mask = plan.layout(network.cond_len).dense()
    report = {
        "grid": list(network.grid),
        "samples": [
            {
                "order": plan.order[b].tolist(),
                "step_sizes": torch.bincount(plan.step[b]).tolist(),
                "timesteps": plan.t[b, :, : int(plan.num_steps[b])].tolist(),
                "loss_weights": [round(w, 6) for w in weights[b, 0].tolist()],
            }
            for b in range(args.batch)
        ],
        "sequence_length": mask.shape[-1],
        "mask_density": round(mask.float().mean().item(), 6),
    }
    if args.json:
        print(json.dumps(report))
        return 0
    for b, sample in enumerate(report["samples"]):
        print(f"sample {b}: {len(sample['step_sizes'])} AR steps, sizes {sample['step_sizes']}")
        print(f"  order      {sample['order']}")
        print(f"  timesteps  {sample['timesteps']}")
        print(f"  weights    {sample['loss_weights']}")
    print(f"sequence length T={report['sequence_length']}, mask density {report['mask_density']}")
    if args.show_mask:
        for row in mask[0].tolist():
            print("".join("#" if v else "." for v in row))
    return 0


def cmd_convert(args) -> int:
    from cfkit import convert

    kwargs = None
    if args.kwargs:
        data = json.loads(Path(args.kwargs).read_text())
        kwargs = data.get("official_constructor_kwargs", data)
    if args.patch_size is not None or args.latent_channels is not None:
        kwargs = dict(kwargs or {})
        if args.patch_size is not None:
            kwargs["patch_size"] = args.patch_size
        if args.latent_channels is not None:
            kwargs["latent_channels"] = args.latent_channels
    out = convert.convert_official(args.path, args.out, kwargs)
    print(f"wrote {out}")
    return 0


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="cfkit", description=__doc__)
    sub = root.add_subparsers(dest="command", required=True)

    p = sub.add_parser("plugins", help="list every registered component: kind, name, plugin")
    p.set_defaults(run=cmd_plugins)

    p = sub.add_parser("config", help="validate or show an experiment config")
    p.add_argument("action", choices=["validate", "show"])
    p.add_argument("file")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.set_defaults(run=cmd_config)

    p = sub.add_parser("plan", help="draw and show one batch's factorisation plan")
    p.add_argument("config")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--json", action="store_true")
    p.add_argument("--show-mask", action="store_true", help="print sample 0's mask (# = attend)")
    p.set_defaults(run=cmd_plan)

    p = sub.add_parser("convert", help="import a checkpoint from another implementation")
    p.add_argument("source", choices=["official"], help="official: the reference trainer's .pt")
    p.add_argument("path")
    p.add_argument("--out", required=True, help="cfkit checkpoint folder to write")
    p.add_argument("--kwargs", help="JSON of the official constructor kwargs (default: the "
                   "checkpoint's .json sidecar if present)")
    p.add_argument("--patch-size", type=int)
    p.add_argument("--latent-channels", type=int)
    p.set_defaults(run=cmd_convert)
    return root


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.run(args)
    except (configs.ConfigError, plugins.UnknownComponentError, plugins.DuplicateComponentError,
            CheckpointError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
