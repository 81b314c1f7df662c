"""The ``cfkit`` command line."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

from cfkit import config as configs
from cfkit import plugins
from cfkit.convert import CheckpointError
from cfkit.generate import KEEP_REGIONS, component
from cfkit.train import TrainingError


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


def cmd_train(args) -> int:
    from cfkit import train

    if args.resume:
        experiment = train.resume_experiment(args.resume, args.set)
        train.train(experiment, args.resume, resume=True, progress=not args.no_progress)
        return 0
    if not (args.config and args.out):
        raise configs.ConfigError("cfkit train needs CONFIG and --out RUN_DIR (or --resume RUN_DIR)")
    experiment = configs.load(args.config, args.set)
    if train.checkpoints(Path(args.out)):
        raise configs.ConfigError(
            f"{args.out} already holds checkpoints; continue it with --resume {args.out} "
            "or choose another --out"
        )
    train.train(experiment, args.out, progress=not args.no_progress)
    return 0


def cmd_shards(args) -> int:
    from cfkit import data

    options = dict(configs.parse_override(text) for text in args.option)
    options = {".".join(k): v for k, v in options.items()}
    if args.source is not None:
        options["path"] = args.source
    dataset = plugins.build("datasets", args.name, **options)
    tokenizer = plugins.build("image_tokenizers", args.encode) if args.encode else None
    paths = data.write_shards(dataset, args.out, args.split, args.shard_size, tokenizer,
                              prefix=args.name)
    print(f"wrote {len(paths)} shard(s) to {args.out}")
    return 0


def cmd_tokenizer_train(args) -> int:
    """Train a byte-level BPE tokenizer on caption files and write its tokenizer.json."""
    from cfkit.checkpoint import atomic_write
    from cfkit.tokenizers import read_captions, train_bpe

    captions = read_captions(args.captions)
    tokenizer = train_bpe(captions, args.vocab_size)
    atomic_write(Path(args.out), lambda tmp: tokenizer.save(str(tmp)))
    print(f"wrote {args.out}: {tokenizer.get_vocab_size()} tokens from {len(captions)} captions")
    return 0


def _generation_arguments(p: argparse.ArgumentParser) -> None:
    """The options ``cfkit sample`` and ``cfkit edit`` share (see cfkit.generate.generate)."""
    split = p.add_mutually_exclusive_group()
    split.add_argument("--ar-steps", type=int, metavar="S", help="S AR steps of equal size (default 1)")
    split.add_argument("--step-sizes", metavar="A,B,...", help="explicit AR step sizes")
    split.add_argument("--schedule", metavar="NAME", help="one draw of a registered schedule")
    p.add_argument("--order", default="random", help="a registered ordering (default random)")
    p.add_argument("--steps", default="250", help="diffusion steps: N, ddimN or a comma list")
    p.add_argument("--split-steps", action="store_true",
                   help="split the --steps across the AR steps instead of --steps per AR step")
    p.add_argument("--cfg", type=float, default=1.0, metavar="SCALE", help="CFG scale (1 = none)")
    p.add_argument("--cfg-interval", type=float, nargs=2, default=(0.0, float("inf")),
                   metavar=("LO", "HI"), help="guide only at network timesteps LO <= t < HI")
    p.add_argument("--sampler", default="ddpm", help="a registered sampler (default ddpm)")
    p.add_argument("--eta", type=float, help="the sampler's eta option (ddim)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", required=True, help="folder for samples.npz and the PNGs")
    p.add_argument("--no-progress", action="store_true")


def _generation_options(args) -> dict:
    steps = int(args.steps) if args.steps.isdigit() else args.steps
    sampler = args.sampler
    if args.eta is not None:
        sampler = component("samplers", args.sampler, eta=args.eta)
    sizes = None if args.step_sizes is None else [int(v) for v in args.step_sizes.split(",")]
    return dict(ar_steps=args.ar_steps, step_sizes=sizes, schedule=args.schedule, order=args.order,
                steps=steps, split_steps=args.split_steps, cfg=args.cfg,
                cfg_interval=tuple(args.cfg_interval), sampler=sampler, seed=args.seed)


def _write_samples(pipe, result, labels, out) -> None:
    from cfkit.pipeline import save_samples

    images = None if pipe.tokenizer is None else pipe.decode(result.latents)
    save_samples(out, result.latents, labels, images)
    what = "samples.npz, one PNG per image and grid.png" if images is not None else (
        "samples.npz with latents only: the checkpoint's image tokenizer does not decode them")
    print(f"wrote {len(result.latents)} sample(s) to {out}: {what}")


def _progress_bar(args):
    """A ``progress(done, total)`` callback drawing a tqdm bar on stderr from its first call
    (so that bad options fail before any bar) and closing it when done."""
    from tqdm import tqdm

    bars = []

    def progress(done: int, total: int) -> None:
        if not bars:
            bars.append(tqdm(total=total, unit="step", desc="diffusion steps",
                             disable=args.no_progress, file=sys.stderr))
        bars[0].update(done - bars[0].n)
        if done == total:
            bars[0].close()

    return progress


def cmd_sample(args) -> int:
    import cfkit

    pipe = cfkit.load(args.checkpoint, args.device)
    num = len(args.classes) if args.num is None else args.num
    if num < 1:
        raise ValueError(f"--num must be >= 1, got {num}")
    labels = torch.tensor(args.classes).repeat(math.ceil(num / len(args.classes)))[:num]
    result = pipe.generate_latents(labels, progress=_progress_bar(args), **_generation_options(args))
    _write_samples(pipe, result, labels, args.out)
    return 0


def cmd_edit(args) -> int:
    import cfkit
    from cfkit.pipeline import read_image

    pipe = cfkit.load(args.checkpoint, args.device)
    if pipe.tokenizer is None:
        raise ValueError(f"{args.checkpoint}: its image tokenizer does not give the model's latents, "
                         "so a PNG cannot be encoded for editing")
    image = read_image(args.image, pipe.tokenizer.channels)
    labels = torch.tensor([args.class_])
    result = pipe.edit_latents(image, args.keep, labels, progress=_progress_bar(args),
                               **_generation_options(args))
    _write_samples(pipe, result, labels, args.out)
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

    p = sub.add_parser("train", help="train an experiment into a run folder")
    p.add_argument("config", nargs="?")
    p.add_argument("--out", help="run folder")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its last checkpoint")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(run=cmd_train)

    p = sub.add_parser("shards", help="write a dataset as WebDataset tar shards")
    p.add_argument("name", help="dataset plugin (e.g. digits, shapes, imagefolder)")
    p.add_argument("source", nargs="?", help="a path for datasets that read one (imagefolder)")
    p.add_argument("--out", required=True)
    p.add_argument("--split", default="train", choices=["train", "val"])
    p.add_argument("--shard-size", type=int, default=1000)
    p.add_argument("--encode", metavar="TOKENIZER", help="write latents of this image tokenizer")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="dataset option, e.g. size=2000 or image_size=32")
    p.set_defaults(run=cmd_shards)

    p = sub.add_parser("tokenizer", help="text tokenizers: train a BPE tokenizer on captions")
    actions = p.add_subparsers(dest="action", required=True)
    t = actions.add_parser("train", help="train a byte-level BPE tokenizer (load it as text tokenizer bpe)")
    t.add_argument("--captions", nargs="+", required=True, metavar="FILE",
                   help="caption files: text (one a line), a .json list or .jsonl")
    t.add_argument("--vocab-size", type=int, required=True)
    t.add_argument("--out", required=True, help="tokenizer.json to write")
    t.set_defaults(run=cmd_tokenizer_train)
    p = sub.add_parser("sample", help="generate images (or latents) from a checkpoint")
    p.add_argument("checkpoint", help="cfkit checkpoint folder")
    p.add_argument("--class", dest="classes", type=int, nargs="+", required=True, metavar="C",
                   help="class labels, repeated to --num images")
    p.add_argument("--num", type=int, help="number of images (default: one per --class)")
    _generation_arguments(p)
    p.set_defaults(run=cmd_sample)

    p = sub.add_parser("edit", help="zero-shot editing: keep a region, regenerate the rest")
    p.add_argument("checkpoint", help="cfkit checkpoint folder")
    p.add_argument("--image", required=True, help="image file (PNG) at the checkpoint's size")
    p.add_argument("--keep", required=True, choices=KEEP_REGIONS)
    p.add_argument("--class", dest="class_", type=int, required=True, metavar="C",
                   help="the class of the regenerated tokens")
    _generation_arguments(p)
    p.set_defaults(run=cmd_edit)
    return root


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.run(args)
    except (configs.ConfigError, plugins.UnknownComponentError, plugins.DuplicateComponentError,
            CheckpointError, FileNotFoundError, TrainingError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
