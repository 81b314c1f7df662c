"""The ``cfkit`` command line."""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import sys
from pathlib import Path

import torch

from cfkit import config as configs
from cfkit import plugins, preflight, progress
from cfkit.convert import CheckpointError
from cfkit.generate import KEEP_REGIONS, SamplingOptions
from cfkit.precision import PRECISIONS
from cfkit.runlock import FolderInUse
from cfkit.train import TrainingError

# torchrun's own parser takes a prefix of one of its options (--numa-binding) as that option
TORCHRUN_NUM = "torchrun reads --num as its own option"


class HelpFormatter(argparse.HelpFormatter):
    """Help that ends each option's text with its default, unless the text says it already;
    defaults that mean "not given" (None, off, an empty list) are left out."""

    def _get_help_string(self, action) -> str:
        text, default = action.help or "", action.default
        unset = default is None or default is False or default == [] or default is argparse.SUPPRESS
        required_positional = not action.option_strings and action.nargs not in ("?", "*")
        if "default" in text or unset or required_positional:
            return text
        shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else str(default)
        return f"{text} (default: {shown.replace('%', '%%')})"  # argparse %-formats help


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` with ``HelpFormatter``; its subcommands' parsers (plugins' too) are
    ``Parser``s, as ``add_subparsers`` makes them of the parser's own class."""

    def __init__(self, *args, formatter_class=HelpFormatter, **kwargs):
        super().__init__(*args, formatter_class=formatter_class, **kwargs)


def _set_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="change one config value (a TOML literal, else a string), e.g. "
                   "train.max_steps=1000 or method.name=dit; repeatable; `cfkit config show` lists the keys")


def _no_progress_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar, even on a terminal (off one there is none): the progress "
                   "lines and the events (resumed, checkpoint saved, finished) stay")


def add_plugins_command(sub) -> None:
    """``cfkit plugins``: its arguments, beside its function."""
    p = sub.add_parser("plugins", help="list every registered component: kind, name, plugin")
    p.set_defaults(run=cmd_plugins)


def cmd_plugins(args) -> int:
    """Every registered component; a name two plugins register is listed twice, marked."""
    registry = plugins.registry(allow_conflicts=True)
    clashes = {(c.kind, c.name) for c in registry.conflicts}
    place = {(c.kind, c.name): i for i, c in enumerate(registry.components())}
    listed = sorted(registry.components() + registry.conflicts, key=lambda c: place[c.kind, c.name])
    rows = [(c.kind, c.name, c.provider, "CONFLICT" if (c.kind, c.name) in clashes else "")
            for c in listed]
    widths = [max(len(r[i]) for r in rows + [("kind", "name", "plugin", "")]) for i in range(4)]
    for row in [("kind", "name", "plugin", "")] + rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    if registry.clashing:
        print(f"warning: {registry.conflict_message()}", file=sys.stderr)
    return 0


def add_config_command(sub) -> None:
    """``cfkit config``: its arguments, beside its function."""
    p = sub.add_parser("config", help="validate or show an experiment config")
    p.add_argument("action", choices=["validate", "show"],
                   help="validate: check the config, naming a bad field and what it allows; show: "
                   "print it as TOML with every default filled in")
    p.add_argument("file", help="experiment config (TOML), e.g. benchmarks/configs/digits-tiny.toml")
    _set_argument(p)
    p.set_defaults(run=cmd_config)


def cmd_config(args) -> int:
    config = configs.load(args.file, args.set)
    if args.action == "validate":
        print(f"{args.file}: valid")
    else:
        print(configs.dump(config), end="")
    return 0


def add_plan_command(sub) -> None:
    """``cfkit plan``: its arguments, beside its function."""
    p = sub.add_parser("plan", help="draw and show one batch's factorisation plan")
    p.add_argument("config", help="experiment config (TOML), e.g. benchmarks/configs/factorisation-demo.toml")
    _set_argument(p)
    p.add_argument("--batch", type=int, default=2, help="samples whose plans are drawn")
    p.add_argument("--seed", type=int, default=None, help="seed of the draw (default: the config's seed)")
    p.add_argument("--json", action="store_true", help="print the plans as one JSON object")
    p.add_argument("--show-mask", action="store_true",
                   help="print sample 0's attention mask (row: query, column: key, # = may attend), "
                   "its condition, clean and noisy tokens marked")
    p.set_defaults(run=cmd_plan)


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
    layout = plan.layout(network.cond_len)
    mask = layout.dense()
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
        from cfkit.masks import Layout, draw

        print(f"mask of sample 0 (T={mask.shape[-1]})")
        print("\n".join(draw(Layout(layout.kind[0], layout.step[0], layout.copy[0]))))
    return 0


def add_convert_command(sub) -> None:
    """``cfkit convert``: its arguments, beside its function."""
    p = sub.add_parser("convert", help="import a checkpoint from another implementation")
    p.add_argument("source", help="where the checkpoint comes from: a converter a plugin registers "
                   "(`cfkit plugins` lists them), e.g. official: the reference trainer's .pt")
    p.add_argument("path", help="the checkpoint file to import, e.g. a .pt")
    p.add_argument("--out", required=True, help="cfkit checkpoint folder to write")
    p.add_argument("--kwargs", help="JSON of the official constructor kwargs (default: the "
                   "checkpoint's .json sidecar if present)")
    p.add_argument("--patch-size", type=int, help="replaces the constructor kwargs' patch_size "
                   "(default: theirs)")
    p.add_argument("--latent-channels", type=int, help="replaces the constructor kwargs' "
                   "latent_channels (default: theirs)")
    p.set_defaults(run=cmd_convert)


def cmd_convert(args) -> int:
    from cfkit import checkpoint, convert

    kwargs = None
    if args.kwargs:
        data = checkpoint.read_json(args.kwargs)
        kwargs = data.get("official_constructor_kwargs", data)
    if args.patch_size is not None or args.latent_channels is not None:
        kwargs = dict(kwargs or {})
        if args.patch_size is not None:
            kwargs["patch_size"] = args.patch_size
        if args.latent_channels is not None:
            kwargs["latent_channels"] = args.latent_channels
    out = convert.converter(args.source)(args.path, args.out, kwargs)
    print(f"wrote {out}")
    return 0


def add_train_command(sub) -> None:
    """``cfkit train``: its arguments, beside its function."""
    p = sub.add_parser("train", help="train an experiment into a run folder")
    p.add_argument("config", nargs="?", help="experiment config (TOML), e.g. "
                   "benchmarks/configs/digits-tiny.toml; not with --resume (the run folder keeps its own)")
    p.add_argument("--out", metavar="RUN_DIR", help="run folder to create: config.json, metrics.csv, "
                   "loss.png, checkpoints/step-N/")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its last checkpoint")
    _set_argument(p)
    _no_progress_argument(p)
    p.add_argument("--allow-remote-shards", action="store_true",
                   help="read pipe: and URL shards (pipe:CMD runs CMD; a config or run folder "
                   "alone never may); same as CFKIT_ALLOW_REMOTE_SHARDS=1")
    p.set_defaults(run=cmd_train)


def cmd_train(args) -> int:
    from cfkit import checkpoint, data, runlock, train

    if args.allow_remote_shards:  # the environment reaches DataLoader workers and subprocesses
        os.environ[data.ALLOW_REMOTE_SHARDS] = "1"

    if args.resume:
        experiment = train.resume_experiment(args.resume, args.set)
        train.train(experiment, args.resume, resume=True, progress=not args.no_progress)
        return 0
    if not (args.config and args.out):
        raise configs.ConfigError("cfkit train needs CONFIG and --out RUN_DIR (or --resume RUN_DIR)")
    experiment = configs.load(args.config, args.set)
    with runlock.hold(args.out):  # first: the checkpoints of a live run are not to resume
        if checkpoint.checkpoints(Path(args.out)):
            raise configs.ConfigError(
                f"{args.out} already holds checkpoints; continue it with --resume {args.out} "
                "or choose another --out"
            )
        train.train(experiment, args.out, progress=not args.no_progress)
    return 0


def _options(texts: list[str]) -> dict:
    """``KEY=VALUE`` texts -> component options (values as TOML literals, else strings)."""
    return {".".join(key): value for key, value in map(configs.parse_override, texts)}


def _dataset(args):
    options = _options(args.option)
    if getattr(args, "source", None) is not None:
        options["path"] = args.source
    return plugins.build("datasets", args.name, **options)


def add_shards_command(sub) -> None:
    """``cfkit shards``: its arguments, beside its function."""
    p = sub.add_parser("shards", help="write a dataset as WebDataset tar shards (under torchrun, "
                       "each process writes its share)")
    p.add_argument("name", help="dataset plugin (e.g. digits, shapes, imagefolder, webdataset)")
    p.add_argument("source", nargs="?", help="a path for datasets that read one (imagefolder: a "
                   "folder; webdataset: shards, e.g. 'train-{000000..000146}.tar')")
    p.add_argument("--out", required=True, help="folder of the shards: new or empty (or, with "
                   "--force, of shards)")
    p.add_argument("--split", default="train", choices=["train", "val"], help="the dataset's split")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    p.add_argument("--encode", metavar="TOKENIZER", help="write latents of this image tokenizer")
    p.add_argument("--tokenizer-option", action="append", default=[], metavar="KEY=VALUE",
                   help="option of the --encode tokenizer, as in a config's tokenizer table, "
                   "e.g. channels=3 or path=kl16.ckpt")
    _device_argument(p)  # where --encode runs (under torchrun, cuda is each process's own GPU)
    p.add_argument("--batch-size", type=int, default=64, help="images --encode encodes at a time")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="dataset option, e.g. size=2000 or image_size=32")
    p.add_argument("--force", action="store_true",
                   help="replace the shards already in --out (the whole set, atomically), or "
                   "discard an unfinished write of other settings")
    _no_progress_argument(p)
    p.set_defaults(run=cmd_shards)


def cmd_shards(args) -> int:
    """Write the shards; a stopped write continues where it stopped when run again."""
    from cfkit import data
    from cfkit.distributed import Distributed

    if args.tokenizer_option and not args.encode:
        raise ValueError("--tokenizer-option needs --encode TOKENIZER")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    identity = {"dataset": args.name, "source": args.source, "options": _options(args.option)}
    tokenizer = None
    if args.encode:
        options = _options(args.tokenizer_option)
        tokenizer = plugins.build("image_tokenizers", args.encode, **options)
        identity["tokenizer"] = {"name": args.encode, **options}
    dataset = _dataset(args)
    group = Distributed()
    try:
        device = _process_device(args.device, group)
        paths = data.write_shards(dataset, args.out, args.split, args.shard_size, tokenizer,
                                  prefix=args.name, batch_size=args.batch_size, force=args.force,
                                  device=device, progress=not args.no_progress, resume=True,
                                  identity=identity, group=(group.rank, group.world_size))
    finally:
        group.close()
    if group.is_main:
        print(f"wrote {len(paths)} shard(s) to {args.out}")
    return 0


def add_tokenizer_train_command(sub) -> None:
    """``cfkit tokenizer``: its arguments, beside its function."""
    p = sub.add_parser("tokenizer", help="text tokenizers: train a BPE tokenizer on captions")
    actions = p.add_subparsers(dest="action", required=True)
    t = actions.add_parser("train", help="train a byte-level BPE tokenizer (load it as text tokenizer bpe)")
    source = t.add_mutually_exclusive_group(required=True)
    source.add_argument("--captions", nargs="+", metavar="FILE",
                        help="caption files: text (one a line), a .json list or .jsonl")
    source.add_argument("--dataset", dest="name", metavar="NAME",
                        help="a dataset plugin with captions (e.g. shapes): its train captions")
    t.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="--dataset option, e.g. size=2000")
    t.add_argument("--vocab-size", type=int, required=True, help="tokens of the vocabulary (the 256 "
                   "bytes, the merges and the special tokens)")
    t.add_argument("--out", required=True, help="tokenizer.json to write")
    t.set_defaults(run=cmd_tokenizer_train)


def cmd_tokenizer_train(args) -> int:
    """Train a byte-level BPE tokenizer on caption files or a dataset's train captions and write
    its tokenizer.json."""
    from cfkit import data
    from cfkit.checkpoint import atomic_write
    from cfkit.tokenizers import read_captions, train_bpe

    if args.option and not args.name:
        raise ValueError("--option sets options of --dataset; give --dataset NAME")
    captions = data.dataset_captions(_dataset(args)) if args.name else read_captions(args.captions)
    tokenizer = train_bpe(captions, args.vocab_size)
    atomic_write(Path(args.out), lambda tmp: tokenizer.save(str(tmp)))
    print(f"wrote {args.out}: {tokenizer.get_vocab_size()} tokens from {len(captions)} captions")
    return 0


def _device_argument(p: argparse.ArgumentParser) -> None:
    """``--device``, resolved by ``preflight.check`` (``auto``: CUDA when present, TF32 on)."""
    p.add_argument("--device", default=preflight.AUTO,
                   help="cpu, cuda, cuda:N, mps, or auto: CUDA when present, else the CPU")


def _generation_arguments(p: argparse.ArgumentParser) -> None:
    """The options ``cfkit sample`` and ``cfkit edit`` share (see cfkit.generate.generate)."""
    split = p.add_mutually_exclusive_group()
    split.add_argument("--ar-steps", type=int, metavar="S", help="S AR steps of equal size (default 1)")
    split.add_argument("--step-sizes", metavar="A,B,...", help="explicit AR step sizes")
    split.add_argument("--schedule", metavar="NAME", help="one draw of a registered schedule")
    _sampling_arguments(p)
    _device_argument(p)
    p.add_argument("--out", required=True, help="folder for samples.npz and the PNGs")
    _no_progress_argument(p)


def _sampling_arguments(p: argparse.ArgumentParser) -> None:
    """How each AR step is sampled (``cfkit sample``, ``edit`` and ``eval``)."""
    p.add_argument("--order", help=f"a registered ordering (default {_shown_default('sampling.order')})")
    p.add_argument("--steps", default="250", help="diffusion steps per AR step (all of them with "
                   "--split-steps): N, ddimN or a comma list, a respacing of the trained steps")
    p.add_argument("--split-steps", action="store_true",
                   help="split the --steps across the AR steps instead of --steps per AR step")
    p.add_argument("--cfg", type=float, default=1.0, metavar="SCALE", help="CFG scale (1 = none)")
    p.add_argument("--cfg-interval", type=float, nargs=2, default=(0.0, float("inf")),
                   metavar=("LO", "HI"), help="guide only at network timesteps LO <= t < HI")
    p.add_argument("--sampler", help=f"a registered sampler (default {_shown_default('sampling.sampler')})")
    p.add_argument("--eta", type=float, help="the sampler's eta option (ddim)")
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="bf16 autocast or fp32; auto: bf16 where its matmuls are native and pay")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise (image i draws from (seed, i)) "
                   "and of drawn orders and schedules")


def _shown_default(key: str) -> str:
    """The default a plugin sets for ``key``, for help text: never an error, so that help works
    whatever the plugins do (a clash is reported when a command runs)."""
    try:
        return str(plugins.default(key))
    except (plugins.NoDefaultError, plugins.DuplicateComponentError):
        return "none: required"


def _sampling_options(args, **fields) -> SamplingOptions:
    """The ``SamplingOptions`` of the sampling arguments (``fields`` replace some)."""
    steps = int(args.steps) if args.steps.isdigit() else args.steps
    step_sizes = getattr(args, "step_sizes", None)
    sizes = None if step_sizes is None else [int(v) for v in step_sizes.split(",")]
    options = dict(ar_steps=getattr(args, "ar_steps", None), step_sizes=sizes,
                   schedule=getattr(args, "schedule", None), steps=steps,
                   split_steps=args.split_steps, cfg=args.cfg, cfg_interval=tuple(args.cfg_interval),
                   sampler_options={} if args.eta is None else {"eta": args.eta},
                   seed=args.seed, batch_size=getattr(args, "batch_size", 250), precision=args.precision)
    # --order and --sampler left out: the plugins' defaults
    given = {name: getattr(args, name) for name in ("order", "sampler") if getattr(args, name) is not None}
    return SamplingOptions.of(**{**options, **given, **fields})


def _write_samples(pipe, result, labels, out) -> None:
    from cfkit.pipeline import save_samples

    save_samples(out, result.latents, labels, None if pipe.tokenizer is None else pipe.decode(result.latents))
    _say_written(pipe, len(labels), out)


def _say_written(pipe, num: int, out) -> None:
    what = "samples.npz, one PNG per image and grid.png" if pipe.tokenizer is not None else (
        "samples.npz with latents only: the checkpoint's image tokenizer does not decode them")
    print(f"wrote {num} sample(s) to {out}: {what}")


def _progress_bar(args):
    """The diffusion steps' ``progress(done, total)``: a bar on a terminal (not with
    --no-progress), else lines (``cfkit.progress``)."""
    return progress.of_steps("diffusion steps", "steps", bar=not args.no_progress)


def add_sample_command(sub) -> None:
    """``cfkit sample``: its arguments, beside its function."""
    p = sub.add_parser("sample", help="generate images (or latents) from a checkpoint")
    p.add_argument("checkpoint", help="cfkit checkpoint folder")
    condition = p.add_mutually_exclusive_group(required=True)
    condition.add_argument("--class", dest="classes", type=int, nargs="+", metavar="C",
                           help="class labels, repeated to --num images")
    condition.add_argument("--prompt", dest="prompts", nargs="+", metavar="TEXT",
                           help="captions of a text-to-image checkpoint, repeated to --num images")
    p.add_argument("--num-samples", "--num", dest="num", type=int,
                   help="number of images (default: one per --class or --prompt); under torchrun "
                   f"write --num-samples ({TORCHRUN_NUM})")
    p.add_argument("--batch-size", type=int, default=250,
                   help="images generated and written at a time per process (default 250); image i "
                   "draws from (seed, i), so the images do not depend on it nor on torchrun's processes")
    _generation_arguments(p)
    p.set_defaults(run=cmd_sample)


def cmd_sample(args) -> int:
    """Under torchrun the processes share the batches; rank 0 gathers and writes them."""
    import cfkit
    from cfkit.distributed import Distributed

    given = args.classes or args.prompts
    num = len(given) if args.num is None else args.num
    if num < 1:
        raise ValueError(f"--num must be >= 1, got {num}")
    repeated = (given * math.ceil(num / len(given)))[:num]
    condition = {"prompts": repeated} if args.prompts else {"classes": repeated}
    group = Distributed()
    try:
        pipe = cfkit.load(args.checkpoint, _process_device(args.device, group))
        progress = _progress_bar(args) if group.is_main else None
        pipe.write_samples(args.out, _sampling_options(args), **condition, group=group, progress=progress)
    finally:
        group.close()
    if group.is_main:
        _say_written(pipe, num, args.out)
    return 0


def _process_device(device: str, group) -> str:
    """``--device`` for this process: under torchrun, ``cuda`` is its own GPU (LOCAL_RANK)."""
    return f"cuda:{group.local_rank}" if device == "cuda" and group.world_size > 1 else device


def _pipeline_reading_images(args, purpose: str):
    """The checkpoint's pipeline and a reader of PNGs into its pixels, for ``purpose``."""
    import cfkit
    from cfkit.pipeline import read_image

    pipe = cfkit.load(args.checkpoint, args.device)
    if pipe.tokenizer is None:
        raise ValueError(f"{args.checkpoint}: its image tokenizer does not give the model's latents, "
                         f"so a PNG cannot be encoded for {purpose}")
    return pipe, lambda path: read_image(path, pipe.tokenizer.channels)


def add_caption_command(sub) -> None:
    """``cfkit caption``: its arguments, beside its function."""
    p = sub.add_parser("caption", help="caption images with a multimodal checkpoint")
    p.add_argument("checkpoint", help="run folder or checkpoint folder")
    p.add_argument("--image", dest="images", nargs="+", required=True, metavar="PNG",
                   help="image files at the checkpoint's size")
    decoding = p.add_mutually_exclusive_group()
    decoding.add_argument("--greedy", action="store_true", help="the most likely id each step (default)")
    decoding.add_argument("--top-k", type=int, metavar="K", help="sample from the K most likely ids")
    decoding.add_argument("--top-p", type=float, metavar="P", help="sample from the top-p nucleus")
    decoding.add_argument("--beams", type=int, metavar="B", help="beam search with B beams")
    p.add_argument("--temperature", type=float, default=1.0, help="of top-k / top-p sampling")
    p.add_argument("--seed", type=int, default=0, help="seed of top-k / top-p sampling (batch b: seed + b)")
    _device_argument(p)
    p.add_argument("--json", action="store_true", help="print a JSON list of {image, caption}")
    p.set_defaults(run=cmd_caption)


def cmd_caption(args) -> int:
    pipe, read = _pipeline_reading_images(args, "captioning")
    images = torch.cat([read(path) for path in args.images])
    decoding = dict(top_k=args.top_k, top_p=args.top_p, beams=args.beams or 1,
                    temperature=args.temperature)
    captions = pipe.caption(images, seed=args.seed, **decoding)
    if args.json:
        print(json.dumps([{"image": path, "caption": text}
                          for path, text in zip(args.images, captions, strict=True)]))
    else:
        for path, text in zip(args.images, captions, strict=True):
            print(f"{path}\t{text}")
    return 0


def add_edit_command(sub) -> None:
    """``cfkit edit``: its arguments, beside its function."""
    p = sub.add_parser("edit", help="zero-shot editing: keep a region, regenerate the rest")
    p.add_argument("checkpoint", help="cfkit checkpoint folder")
    p.add_argument("--image", required=True, help="image file (PNG) at the checkpoint's size")
    p.add_argument("--keep", required=True, choices=KEEP_REGIONS, help="the region of --image kept")
    p.add_argument("--class", dest="class_", type=int, required=True, metavar="C",
                   help="the class of the regenerated tokens")
    _generation_arguments(p)
    p.set_defaults(run=cmd_edit)


def cmd_edit(args) -> int:
    pipe, read = _pipeline_reading_images(args, "editing")
    image = read(args.image)
    labels = torch.tensor([args.class_])
    result = pipe.edit_latents(image, args.keep, labels, _sampling_options(args),
                               progress=_progress_bar(args))
    _write_samples(pipe, result, labels, args.out)
    return 0


def add_eval_command(sub) -> None:
    """``cfkit eval``: its arguments, beside its function."""
    p = sub.add_parser("eval", help="sample a run or checkpoint and evaluate it: eval.json, eval.md")
    p.add_argument("checkpoint", help="run folder or checkpoint folder")
    p.add_argument("--metrics", required=True, metavar="A,B,...",
                   help="metric plugins, e.g. fid,sfid,kid,class-accuracy,is,precision-recall,probe")
    p.add_argument("--num-samples", "--num", dest="num", type=int, default=1000,
                   help="samples per S_eval (default 1000); under torchrun write --num-samples "
                   f"({TORCHRUN_NUM})")
    p.add_argument("--ar-steps", type=int, nargs="+", default=[1], metavar="S",
                   help="the S_eval values to sample with, each in S equal AR steps (default 1)")
    _sampling_arguments(p)
    p.set_defaults(step_sizes=None, schedule=None)
    p.add_argument("--metric-option", action="append", default=[], metavar="METRIC.KEY=VALUE",
                   help="a metric's option, e.g. probe.t=100 or precision-recall.k=5")
    p.add_argument("--features", metavar="NAME",
                   help="feature network (default: the dataset's own classifier when a plugin declares "
                   "one, e.g. digits-cnn, else the declared default, e.g. inception)")
    p.add_argument("--feature-option", action="append", default=[], metavar="KEY=VALUE",
                   help="feature network option, e.g. weights=pt_inception-2015-12-05-6726825d.pth")
    reference = p.add_mutually_exclusive_group()
    reference.add_argument("--reference-split", default="train", choices=["train", "val"],
                           help="the dataset split FID and precision/recall compare with (default train)")
    reference.add_argument("--reference-stats", metavar="FILE",
                           help="compare with FILE instead: pytorch-fid's mu/sigma .npz, cfkit fid "
                           "--save-stats's, or an ADM reference batch .npz (arr_0 images, mu/sigma, "
                           "mu_s/sigma_s), e.g. VIRTUAL_imagenet256_labeled.npz")
    p.add_argument("--batch-size", type=int, default=250,
                   help="images sampled and scored at a time per process (default 250)")
    _device_argument(p)
    p.add_argument("--out", help="folder for eval.json and eval.md (default: the evaluated folder)")
    p.add_argument("--save-samples", action="store_true", help="also write samples-S{S}.npz to --out")
    _no_progress_argument(p)
    p.set_defaults(run=cmd_eval)


def cmd_eval(args) -> int:
    """Under torchrun the processes share the sampling; rank 0 scores and writes the report."""
    from cfkit import evaluate, runlock
    from cfkit.distributed import Distributed

    # --ar-steps lists the S_eval values
    generation = _sampling_options(args, ar_steps=None, step_sizes=None, schedule=None)
    metric_options: dict[str, dict] = {}
    for key, value in _options(args.metric_option).items():
        metric, _, option = key.partition(".")
        if not option:
            raise ValueError(f"--metric-option {key}=...: give METRIC.KEY=VALUE, e.g. probe.t=100")
        metric_options.setdefault(metric, {})[option] = value
    # rank 0 scores while the others wait for its next batch: longer than the default timeout
    group = Distributed(timeout=datetime.timedelta(days=1))
    # An --out folder is held (by rank 0); the evaluated folder is not (a live run may be evaluated).
    try:
        with runlock.hold(args.out) if args.out else contextlib.nullcontext():
            report = evaluate.evaluate(
                args.checkpoint, [m for m in args.metrics.split(",") if m], num=args.num,
                ar_steps=args.ar_steps, generation=generation, metric_options=metric_options,
                features=args.features, feature_options=_options(args.feature_option),
                reference_split=args.reference_split, reference_stats=args.reference_stats,
                batch_size=args.batch_size, device=_process_device(args.device, group),
                progress=not args.no_progress, group=group,
                samples_out=(args.out or args.checkpoint) if args.save_samples else None)
            if report is None:  # another torchrun process: rank 0 reports
                return 0
            written = evaluate.write_report(report, args.out or args.checkpoint)
    finally:
        group.close()
    print(evaluate.summary(report), end="")
    print(f"wrote {', '.join(map(str, written))}")
    return 0


def add_fid_command(sub) -> None:
    """``cfkit fid``: its arguments, beside its function."""
    p = sub.add_parser("fid", help="FID between two folders of images or .npz files")
    p.add_argument("path_a", help="a folder of images, an .npz of arr_0 images or of mu/sigma")
    p.add_argument("path_b", help="the same; with --save-stats, the .npz to write")
    p.add_argument("--features", help="feature network (default: the one a plugin declares the "
                   "default; the built-in inception needs its weights, see README)")
    p.add_argument("--feature-option", action="append", default=[], metavar="KEY=VALUE",
                   help="feature network option, e.g. weights=pt_inception-2015-12-05-6726825d.pth")
    p.add_argument("--save-stats", action="store_true",
                   help="write the statistics of PATH_A to PATH_B (mu, sigma) instead")
    p.add_argument("--batch-size", type=int, default=250, help="images featurised at a time")
    _device_argument(p)
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    _no_progress_argument(p)
    p.set_defaults(run=cmd_fid)


def cmd_fid(args) -> int:
    from cfkit import evaluate
    from cfkit.metrics import default_feature_network

    features = default_feature_network() if args.features is None else args.features
    options = dict(features=features, feature_options=_options(args.feature_option),
                   batch_size=args.batch_size, show_progress=not args.no_progress, device=args.device)
    if args.save_stats:
        statistics = evaluate.save_statistics(args.path_a, args.path_b, **options)
        print(f"wrote {args.path_b}: statistics of {statistics.num} images ({features})")
        return 0
    result = evaluate.fid_between(args.path_a, args.path_b, **options)
    print(json.dumps(result) if args.json else f"{result['name']}: {result['value']:.4f}")
    return 0


def parser() -> argparse.ArgumentParser:
    """The ``cfkit`` parser: the built-in subcommands, then those plugins add through the
    ``register_commands`` hook."""
    root = Parser(prog="cfkit", description=__doc__)
    sub = root.add_subparsers(dest="command", required=True)
    for add in (add_plugins_command,
                add_config_command,
                add_plan_command,
                add_convert_command,
                add_train_command,
                add_shards_command,
                add_tokenizer_train_command,
                add_sample_command,
                add_edit_command,
                add_caption_command,
                add_eval_command,
                add_bench_command,
                add_fid_command):
        add(sub)
    plugins.add_commands(sub)
    return root


def add_bench_command(sub) -> None:
    """``cfkit bench``: its arguments, beside its function."""
    p = sub.add_parser("bench", help="train and evaluate a grid of runs; report.md, results.json, plots")
    p.add_argument("config", nargs="?", help="a bench config, e.g. benchmarks/digits-mini.toml")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="an experiment override for every run, e.g. train.max_steps=100, or, as "
                   "evaluation.KEY=VALUE, of the bench's [evaluation], e.g. evaluation.num=100")
    p.add_argument("--out", help="the bench folder (runs are cached there by config hash)")
    p.add_argument("--shard", default="0/1", metavar="I/N",
                   help="train and evaluate only runs I, I+N, ... (N processes share a grid)")
    p.add_argument("--jobs", type=int, default=1, metavar="N",
                   help="train and evaluate N runs at a time in worker processes, each on its "
                   "share of the CPU threads (default 1)")
    p.add_argument("--report-only", action="store_true",
                   help="train and evaluate nothing: report the runs finished so far")
    p.add_argument("--perf", action="store_true",
                   help="instead: run every benchmark of cfkit.perf and write one table")
    p.add_argument("--size", default="small", choices=["tiny", "small", "issue"],
                   help="--perf model sizes (default small)")
    _no_progress_argument(p)
    p.set_defaults(run=cmd_bench)


def cmd_bench(args) -> int:
    if args.perf:
        from cfkit.perf import report

        return report.main(["--size", args.size] + (["--out", args.out] if args.out else []))
    if not (args.config and args.out):
        raise configs.ConfigError("cfkit bench needs CONFIG and --out DIR (or --perf)")
    from cfkit import bench

    part, slash, parts = args.shard.partition("/")
    if not (slash and part.isdigit() and parts.isdigit()):
        raise ValueError(f"--shard {args.shard!r}: give I/N, e.g. 0/2")
    report = bench.run_bench(args.config, args.out, args.set, progress=not args.no_progress,
                             report_only=args.report_only, shard=(int(part), int(parts)),
                             jobs=args.jobs)
    if not report:  # a torchrun process other than rank 0: it trained, rank 0 reports
        return 0
    main_table = report["tables"][0]
    print(main_table["markdown"])
    for line in [t["line"] for t in main_table["trends"]] + [f"⚠ {w}" for w in main_table["warnings"]]:
        print(f"- {line}")
    print(f"wrote {Path(args.out) / 'report.md'} and results.json ({report['seconds']:.0f} s)")
    return 0


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    progress.show_warnings()
    preflight.keep_freed_memory()
    try:
        preflight.check(args)
        return args.run(args)
    except (configs.ConfigError, plugins.UnknownComponentError, plugins.DuplicateComponentError,
            CheckpointError, FileNotFoundError, FolderInUse, TrainingError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # the environment: a full disk, a file that is not readable
        print(f"error: {preflight.describe(error)}", file=sys.stderr)
        return 2
