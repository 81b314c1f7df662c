"""The pilot that chose the mnist benches' recipe: held-out loss, FID, KID and sample class
accuracy against training steps, for CausalFusion and In-context DiT on ``mnist`` (and any
other settings given), every checkpoint of one training run per setting evaluated.

    python benchmarks/pilot.py --out runs/mnist-pilot --jobs 2
    python benchmarks/pilot.py --out runs/mnist-pilot --setting wide=model.hidden_size=128

Each setting is ``name=override[;override...]`` on top of ``benchmarks/configs/mnist-tiny.toml``
plus ``--set``. Writes ``pilot.json``, ``pilot.md`` (a table per setting: a row per checkpoint)
and ``pilot.png`` (each metric against steps) in ``--out``; trained runs and evaluations are
reused when the script runs again. ``--jobs N`` trains and evaluates N settings at a time, each
process on one thread. FID/KID are against the val split (500 images) with the feature
network mnist-cnn; lower FID, KID and held-out ε-MSE are better, higher class accuracy is
better.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent
BASE = ROOT / "configs" / "mnist-tiny.toml"
DEFAULT_SETTINGS = ["causalfusion=method.name=causalfusion", "incontext-dit=method.name=incontext-dit"]


def parse_setting(text: str) -> tuple[str, list[str]]:
    name, sep, overrides = text.partition("=")
    if not sep or not name:
        raise SystemExit(f"--setting {text!r}: give name=override[;override...]")
    return name, [o for o in overrides.split(";") if o]


def run_setting(name: str, overrides: list[str], args: dict) -> dict:
    """Train one setting (or reuse it) and evaluate each of its checkpoints (or reuse that)."""
    import torch

    torch.set_num_threads(1)
    from cfkit import checkpoint, evaluate, plugins
    from cfkit import config as configs
    from cfkit import train as training

    folder = Path(args["out"]) / name
    experiment = configs.load(BASE, [*args["set"], *overrides, f"train.ckpt_every={args['every']}",
                                     f"train.max_steps={args['steps']}", "train.keep_last=1000"])
    done = checkpoint.checkpoints(folder)
    if not done or int(done[-1].name.split("-")[-1]) < args["steps"]:
        training.train(experiment, folder, resume=bool(done), progress=False)
    rows = []
    for ckpt in checkpoint.checkpoints(folder):
        cache = folder / "pilot-eval" / f"{ckpt.name}.json"
        if not cache.exists():
            records = []
            for cfg in args["cfg"]:
                found = evaluate.evaluate(
                    ckpt, ["fid", "kid", "class-accuracy"], num=args["num"], ar_steps=args["ar_steps"],
                    generation={"steps": args["sampling_steps"], "cfg": cfg, "order": "random", "seed": 0,
                                "sampler": plugins.build("samplers", "ddpm", variance=args["variance"])},
                    reference_split="val", progress=False)
                records += [{**r.as_dict(), "cfg": cfg} for r in found.results]
            found = evaluate.evaluate(ckpt, ["heldout-loss"], ar_steps=args["ar_steps"], progress=False)
            records += [{**r.as_dict(), "cfg": None} for r in found.results]
            cache.parent.mkdir(parents=True, exist_ok=True)
            cache.write_text(json.dumps(records, indent=1))
        rows.append({"step": int(ckpt.name.split("-")[-1]), "records": json.loads(cache.read_text())})
    return {"setting": name, "overrides": overrides, "rows": rows}


def columns(result: dict) -> list[tuple[str, int, float | None]]:
    keys = {}
    for row in result["rows"]:
        for r in row["records"]:
            if r["value"] is not None and ("AR step" not in r["name"]) and "std" not in r["name"] \
                    and "±" not in r["name"]:
                keys.setdefault((r["name"], r["ar_steps"], r["cfg"]), None)
    return list(keys)


def value(row: dict, key) -> float | None:
    return next((r["value"] for r in row["records"] if (r["name"], r["ar_steps"], r["cfg"]) == key), None)


def markdown(results: list[dict], args: dict) -> str:
    lines = ["# mnist pilot", "",
             f"`python benchmarks/pilot.py {' '.join(args['argv'])}`: base "
             f"`benchmarks/configs/mnist-tiny.toml` with {args['set'] or 'no'} overrides, "
             f"checkpoints every {args['every']} steps to "
             f"{args['steps']}. Each checkpoint: {args['num']} class-balanced samples per S_eval and CFG "
             f"scale ({args['sampling_steps']} DDPM steps per AR step, {args['variance']} variance, "
             "random order), FID and KID "
             "(mnist-cnn features) against the 500 val images, class accuracy by mnist-cnn; held-out "
             "ε-MSE of the 500 val images (4 draws of t and noise each, the same for every run). "
             "↓ lower is better, ↑ higher is better.", ""]
    for result in results:
        keys = columns(result)
        head = ["step"] + [f"{n} S={s}" + (f" cfg={c:g}" if c is not None else "")
                           + (" ↑" if "accuracy" in n else " ↓") for n, s, c in keys]
        lines += [f"## {result['setting']} ({'; '.join(result['overrides'])})", "",
                  "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for row in result["rows"]:
            cells = [str(row["step"])] + [_number(value(row, k)) for k in keys]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["![pilot](pilot.png)", ""]
    return "\n".join(lines)


def _number(v) -> str:
    if v is None:
        return "—"
    v = float(v)
    return f"{v:.4f}" if abs(v) < 1 else f"{v:.2f}"


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    wanted = [("FID", "FID ↓"), ("KID", "KID ↓"), ("class accuracy", "class accuracy ↑"),
              ("held-out", "held-out ε-MSE ↓")]
    fig, axes = plt.subplots(1, len(wanted), figsize=(5 * len(wanted), 4))
    for ax, (prefix, label) in zip(axes, wanted, strict=True):
        for result in results:
            for key in columns(result):
                if key[0].startswith(prefix):
                    points = [(row["step"], value(row, key)) for row in result["rows"]]
                    points = [(s, float(v)) for s, v in points if v is not None]
                    cfg = f" cfg {key[2]:g}" if key[2] is not None else ""
                    ax.plot(*zip(*points, strict=True), marker="o",
                            label=f"{result['setting']} S={key[1]}{cfg}")
        ax.set_xlabel("training step", fontsize=10)
        ax.set_ylabel(label, fontsize=10)
        if prefix in ("FID", "KID"):  # a setting that fails sits orders of magnitude above
            ax.set_yscale("symlog", linthresh=1.0 if prefix == "FID" else 0.01)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--setting", action="append", help="name=override[;override...]")
    parser.add_argument("--set", action="append", default=[], help="override for every setting")
    parser.add_argument("--steps", type=int, default=2500)
    parser.add_argument("--every", type=int, default=500)
    parser.add_argument("--num", type=int, default=500)
    parser.add_argument("--ar-steps", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--cfg", type=float, nargs="+", default=[1.0, 3.0])
    parser.add_argument("--sampling-steps", type=int, default=50)
    parser.add_argument("--variance", default="fixed-small", choices=["fixed-small", "fixed-large"],
                        help="the DDPM sampler's variance")
    parser.add_argument("--jobs", type=int, default=1)
    args = parser.parse_args(argv)
    options = {**vars(args), "argv": sys.argv[1:] if argv is None else argv}
    settings = [parse_setting(s) for s in (args.setting or DEFAULT_SETTINGS)]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        results = list(pool.map(run_setting, *zip(*settings, strict=True), [options] * len(settings)))
    (out / "pilot.json").write_text(json.dumps({"options": options, "results": results}, indent=1))
    plot(results, out / "pilot.png")
    (out / "pilot.md").write_text(markdown(results, options))
    print(markdown(results, options))


if __name__ == "__main__":
    main()
