"""The trainer: single process or torchrun (DDP / FSDP), exact resume, safe checkpoints.

Randomness of step ``k`` (plans, noise, label dropout) comes from a generator seeded by
``(seed, k)`` and is drawn for the global batch, of which each process uses its rows; the
data stream is a function of the seed too. So a run is reproducible across world sizes and a
resumed run continues exactly as if it had never stopped. With ``train.grad_accum_steps`` =
k, each process runs its rows in k micro-batches, each drawing the same global randomness
and taking its own rows of it: the step's gradient is that of the whole batch at once.

``train.init_from`` starts a new run from existing weights (fine-tuning) with a fresh
optimizer; ``train.init_skip`` leaves named weights at their fresh initialisation.

Run folder: ``config.json``, ``metrics.csv``, ``loss.png``, ``checkpoints/step-NNNNNNN/``
(each a cfkit checkpoint: ``config.json``, ``model.safetensors``, ``ema.safetensors``,
``optimizer.safetensors`` and ``state.json``).

The trainer holds the parts it runs: the process group (``cfkit.distributed``), the
checkpoint files and their rotation (``cfkit.checkpoint``), the metrics log (``cfkit.runlog``)
and the cached dataset shards (``cfkit.data``).
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import signal
import time
from collections.abc import Callable
from pathlib import Path

import torch

from cfkit import checkpoint, data, precision, runlock
from cfkit import config as configs
from cfkit.distributed import Distributed, barrier
from cfkit.methods import Batch
from cfkit.progress import Progress, say
from cfkit.runlog import RunLog, require_trackers

log = logging.getLogger(__name__)


class TrainingError(RuntimeError):
    """Training stopped (e.g. a non-finite loss); the last good checkpoint is intact."""


def step_generator(seed: int, step: int) -> torch.Generator:
    """The generator of step ``step``'s randomness (plans, noise, label dropout)."""
    return torch.Generator().manual_seed(int(data.digest([seed, step]), 16))


def lr_factor(cfg) -> Callable[[int], float]:
    """The learning rate's factor at a step: linear warmup from 0 over ``warmup_steps``, then
    constant (the reference's schedule) or, with ``lr_schedule = "cosine"``, a half cosine from 1
    to 0 at ``max_steps``."""
    warmup, decay = cfg.warmup_steps, max(1, cfg.max_steps - cfg.warmup_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        if cfg.lr_schedule == "constant":
            return 1.0
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / decay)))
    return factor


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """``ema <- decay * ema + (1 - decay) * model``, every parameter in one multi-tensor op."""
    torch._foreach_lerp_(list(ema.parameters()), [p.detach() for p in model.parameters()], 1 - decay)


def network_width(net: torch.nn.Module) -> int:
    """The hidden size of ``net`` (its config's), which sizes its matmuls; 1024 if it has none."""
    return int(getattr(getattr(net, "config", None), "hidden_size", 1024))


def adamw(net: torch.nn.Module, settings, sharded: bool) -> torch.optim.AdamW:
    """The reference's AdamW over ``net``'s parameters, as one fused kernel where torch has one
    for the device (CPU and CUDA; sharded FSDP parameters take the multi-tensor path)."""
    params = list(net.parameters())
    fused = not sharded and all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    return torch.optim.AdamW(params, lr=settings.learning_rate, betas=settings.betas, eps=settings.eps,
                             weight_decay=settings.weight_decay, fused=fused or None)


class Trainer:
    """Trains ``experiment`` into ``run_dir``; ``resume`` continues from its last checkpoint."""

    def __init__(self, experiment: configs.Experiment, run_dir, resume: bool = False,
                 progress: bool = True):
        self.experiment, self.run_dir, self.progress = experiment, Path(run_dir), progress
        self.settings = experiment.train
        require_trackers(self.settings)  # before any work: a missing extra is named at once
        self.dist = Distributed()
        torch.manual_seed(experiment.seed)
        self.method = experiment.build_method()
        self.net = self.method.model.to(self.dist.device)
        if self.settings.init_from is not None and not resume:  # a resumed run has its own weights
            self._init_weights()
        if self.settings.grad_checkpoint:
            if not hasattr(self.net, "grad_checkpoint"):
                raise ValueError(f"train.grad_checkpoint: the {type(self.net).__name__} network of "
                                 f"method {experiment.method.name} does not support it; allowed: false")
            self.net.grad_checkpoint = True
        self.ema = copy.deepcopy(self.net).requires_grad_(False).eval()
        self.precision = precision.resolve(self.settings.precision, self.dist.device,
                                           network_width(self.net))
        # before the optimizer: FSDP replaces the parameters by their shards
        self.forward = self._wrap(self.net)
        self.optimizer = adamw(self.net, self.settings, self.sharded)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_factor(self.settings)
        )
        self.runlog = RunLog(self.run_dir, self.settings, experiment)
        self.step = 0
        self.corrupt: list[Path] = []  # checkpoints resume skipped, set aside at the next save
        self.resumed_from: Path | None = None  # said once the data is found: a refused run did not resume
        if resume:
            self._resume()
        self.stop_requested = False

    # -- setup -------------------------------------------------------------------------------
    def _init_weights(self) -> None:
        """Start from ``train.init_from``'s weights, but those ``train.init_skip`` names."""
        settings = self.settings
        fresh = checkpoint.init_weights(self.net, settings.init_from, settings.init_skip,
                                        str(self.dist.device))
        if self.dist.is_main:
            log.info("initialised from %s; left at their fresh initialisation: %s", settings.init_from,
                     ", ".join(fresh) or "none")

    def _wrap(self, net):
        self.ddp = None  # the DDP wrapper, whose no_sync skips the all-reduce of a micro-batch
        if self.dist.world_size > 1:
            if self.sharded:
                from torch.distributed.fsdp import fully_shard

                net = fully_shard(net)
                fully_shard(self.ema)  # sharded like the weights it averages
            else:
                from torch.nn.parallel import DistributedDataParallel

                device_ids = [self.dist.device] if self.dist.device.type == "cuda" else None
                net = self.ddp = DistributedDataParallel(net, device_ids=device_ids)
        if self.settings.compile:
            net = torch.compile(net)
        return net

    def _resume(self):
        """Load the last checkpoint; a corrupt one is named in a warning, set aside at the next
        save, and the one before it loaded instead."""
        found = checkpoint.checkpoints(self.run_dir)
        if not found:
            raise TrainingError(f"nothing to resume: no checkpoint in {self.run_dir / 'checkpoints'}")
        for last in reversed(found):
            try:
                self._load(last)
                break
            except checkpoint.CheckpointError as error:
                self.corrupt.append(last)
                instead = (f"resuming from {found[-len(self.corrupt) - 1].name} instead"
                           if len(self.corrupt) < len(found) else "no earlier checkpoint to resume from")
                if self.dist.is_main:  # every process reads it; one says so
                    log.warning("checkpoint %s is corrupt: %s; %s", last, error, instead)
        else:
            raise TrainingError(f"nothing to resume: every checkpoint in {self.run_dir / 'checkpoints'} "
                                "is corrupt (see the warnings above)")
        self.resumed_from = last

    def _load(self, folder: Path) -> None:
        """Resume from the checkpoint ``folder``, or CheckpointError naming its bad file. Every
        file is read and the weights checked before the model changes; what a load failing
        after that leaves behind, the next checkpoint's load overwrites."""
        state = checkpoint.read_json(folder / "state.json")
        device = str(self.dist.device)
        model, ema, optimizer = (checkpoint.read_weights(folder / f"{name}.safetensors", device)
                                 for name in ("model", "ema", "optimizer"))
        for name, weights in (("model", model), ("ema", ema)):
            checkpoint.check_fits(self.net, weights, folder / f"{name}.safetensors",
                                  self.run_dir / "config.json")
        try:  # what is left to go wrong: a state.json that does not match the optimizer
            if self.sharded:
                self._load_sharded(model, ema, optimizer, state["optimizer"])
            else:
                self.net.load_state_dict(model)
                self.ema.load_state_dict(ema)
                self.optimizer.load_state_dict(checkpoint.optimizer_state(optimizer, state["optimizer"]))
            self.scheduler.load_state_dict(state["scheduler"])
            self.step = int(state["step"])
        except (KeyError, TypeError, ValueError) as error:
            raise checkpoint.CheckpointError(f"{folder / 'state.json'}: does not match the "
                                             f"optimizer: {type(error).__name__}: {error}") from None
        self._apply_hyperparameters()

    def _apply_hyperparameters(self) -> None:
        """The config resumed with wins over the optimizer settings saved in the checkpoint,
        so ``--resume --set train.lr=...`` changes the learning rate from the next step."""
        factor = lr_factor(self.settings)(self.scheduler.last_epoch)
        self.scheduler.lr_lambdas = [lr_factor(self.settings)] * len(self.scheduler.lr_lambdas)
        self.scheduler.base_lrs = [self.settings.learning_rate] * len(self.optimizer.param_groups)
        settings = self.settings
        for group in self.optimizer.param_groups:
            group.update(initial_lr=settings.learning_rate, lr=settings.learning_rate * factor,
                         betas=settings.betas, eps=settings.eps, weight_decay=settings.weight_decay)

    @property
    def sharded(self) -> bool:
        return self.settings.distributed == "fsdp" and self.dist.world_size > 1

    def _load_sharded(self, model: dict, ema: dict, tensors: dict, meta: dict) -> None:
        """Load a checkpoint's full (unsharded) tensors into the FSDP shards."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True)
        set_model_state_dict(self.net, model, options=options)
        set_model_state_dict(self.ema, ema, options=options)
        names = [name for name, _ in self.net.named_parameters()]
        set_optimizer_state_dict(self.net, self.optimizer, checkpoint.optimizer_state(tensors, meta, names),
                                 options=options)

    def stream(self) -> data.ShardStream:
        spec = self.experiment.data
        world, micro = self.dist.world_size, self.settings.grad_accum_steps
        if self.settings.batch_size % (world * micro):
            raise configs.ConfigError(
                f"train.batch_size {self.settings.batch_size} is not divisible by {world} processes x "
                f"train.grad_accum_steps {micro}; allowed: a multiple of {world * micro}"
            )
        shards = data.dataset_shards(self.experiment, "train", self.dist.is_main)
        return data.ShardStream(
            shards, self.settings.batch_size // world, seed=self.experiment.seed, rank=self.dist.rank,
            world_size=world, shuffle_buffer=spec.shuffle_buffer, flip=spec.flip,
            skip_batches=self.step,
            # a label outside the model's classes would index past its embedding: skip it
            num_classes=self.experiment.model.get("num_classes"), keys=spec.keys,
        )

    # -- the loop ----------------------------------------------------------------------------
    def micro_batches(self, item: dict, tokenizer) -> list[Batch]:
        """This process's rows of the step's batch (``item``) in ``grad_accum_steps`` micro-batches
        of equal size, each at its place in the global batch, so that it takes its rows of the
        global draws; images are encoded one micro-batch at a time."""
        local = len(item["labels"])
        size = local // self.settings.grad_accum_steps
        return [self.batch(item, tokenizer, slice(start, start + size)) for start in range(0, local, size)]

    def batch(self, item: dict, tokenizer, rows: slice) -> Batch:
        """The micro-batch of ``item``'s ``rows`` ``(n, ...)``, latents on this process's device."""
        device, local = self.dist.device, len(item["labels"])
        if "latents" in item:
            latents = item["latents"][rows].to(device)
        else:
            with torch.no_grad():
                latents = tokenizer.encode(item["images"][rows].to(device))
        captions = item.get("captions")
        return Batch(latents, item["labels"][rows].to(device), offset=self.dist.rank * local + rows.start,
                     global_size=local * self.dist.world_size,
                     captions=None if captions is None else captions[rows])

    def train_step(self, micro_batches: list[Batch]) -> tuple[float, float]:
        """One optimizer step on the batch made of ``micro_batches``; (loss, gradient norm)."""
        self.optimizer.zero_grad(set_to_none=True)
        losses = []
        for index, batch in enumerate(micro_batches):
            # every micro-batch draws the step's randomness afresh and takes its own rows of it
            generator = step_generator(self.experiment.seed, self.step)
            with self._gradient_sync(index == len(micro_batches) - 1):
                with self.precision.autocast(self.dist.device):
                    out = self.method.loss(batch, generator, model=self.forward)
                # each loss is the mean over its rows: their mean over equal micro-batches is the batch's
                (out.loss / len(micro_batches)).backward()
            losses.append(out.loss.detach())  # read once after the loop: one device sync per step
        values = torch.stack(losses).tolist()
        # checked once all processes have run backward (DDP's all-reduce waits for each of them)
        loss = self.dist.mean(sum(values) / len(values))
        self._check_finite("loss", loss)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.net.parameters(), self.settings.grad_clip))
        # a finite loss can still overflow in backward; its step would write NaN weights
        self._check_finite("gradient norm", grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        update_ema(self.ema, self.net, self.settings.ema)
        self.step += 1
        return loss, grad_norm

    def _gradient_sync(self, sync: bool):
        """A context in whose backward the processes all-reduce their gradients only when ``sync``
        (the last micro-batch); the earlier micro-batches accumulate theirs locally."""
        if self.sharded:
            self.net.set_requires_gradient_sync(sync)
        elif self.ddp is not None and not sync:
            return self.ddp.no_sync()
        return contextlib.nullcontext()

    def _check_finite(self, what: str, value: float) -> None:
        if not math.isfinite(value):
            raise TrainingError(
                f"{what} is {value} at step {self.step}; stopped before updating the weights. "
                f"Last good checkpoint: {self._last_checkpoint_text()}"
            )

    def run(self) -> Path:
        """Train to ``train.max_steps``; returns the run folder."""
        # the shards first: a run refused for its data leaves no config.json behind
        tokenizer = self.experiment.data.tokenizer.build()
        stream = self.stream()
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            checkpoint.write_json(self.run_dir / "config.json",
                                  {"experiment": self.experiment.model_dump(mode="json")})
            self.runlog.start(self.step)
            if self.resumed_from is not None:
                say(f"resumed from {self.resumed_from} at step {self.step}")
        batches = iter(data.loader(stream, self.experiment.data.num_workers))
        errors = data.LoaderErrors()
        previous = signal.signal(signal.SIGTERM, self._request_stop)
        progress = self._progress()
        try:
            last_time, images = time.perf_counter(), 0
            announce = self.dist.is_main
            while self.step < self.settings.max_steps:
                item = next(batches)
                errors.update(item)
                loss, grad_norm = self.train_step(self.micro_batches(item, tokenizer))
                if announce:  # once a step ran: a run refused at its first plan ends in its error alone
                    say(f"precision {self.precision.name}: {self.precision.reason}")
                    announce = False
                images += self.settings.batch_size
                progress.update(1)
                if self.step % self.settings.log_every == 0 or self.step == self.settings.max_steps:
                    now = time.perf_counter()
                    self._log_metrics(progress, loss, grad_norm, images / (now - last_time))
                    last_time, images = now, 0
                # SIGTERM reaches the processes at different steps: they agree on one to stop at
                stop = self.dist.mean(float(self.stop_requested)) > 0
                if self.step % self.settings.ckpt_every == 0 or stop:
                    self.save()
                if stop:
                    log.warning("SIGTERM: saved step %d, exiting", self.step)
                    break
            if not checkpoint.is_last(self.run_dir, self.step):
                self.save()
            if errors.shards or errors.samples:
                log.warning("skipped %d corrupt shard(s) and %d corrupt sample(s)",
                            errors.shards, errors.samples)
        except BaseException:
            progress.close(failed=True)  # no last line: the error says where it stopped
            raise
        finally:
            signal.signal(signal.SIGTERM, previous)
            if self.dist.is_main:
                self.runlog.close()
        progress.close()
        if self.dist.is_main:
            self.runlog.plot()
            if self.step >= self.settings.max_steps:
                say(f"finished: {self.run_dir} at step {self.step} "
                    f"({time.perf_counter() - progress.start:.0f} s)")
        return self.run_dir

    def _request_stop(self, signum, frame):
        self.stop_requested = True

    def _progress(self) -> Progress:
        """The steps' progress, rank 0's: a bar (``progress``, on a terminal), else a line each
        ``log_every`` steps (``_log_metrics``)."""
        return Progress(f"train {self.run_dir.name}", "steps", self.settings.max_steps, done=self.step,
                        bar=self.progress, show=self.dist.is_main, every=None)

    def _log_metrics(self, progress: Progress, loss: float, grad_norm: float, rate: float) -> None:
        """One ``log_every`` row of metrics.csv, and the same on the bar or as a line."""
        if self.dist.is_main:
            self.runlog.write(self.step, loss, self.optimizer.param_groups[0]["lr"], grad_norm, rate)
        progress.report(f"loss {loss:.4f}", f"{rate:.1f} images/s")

    # -- checkpoints -------------------------------------------------------------------------
    def save(self) -> Path | None:
        """Write ``checkpoints/step-N`` (a temp folder renamed when complete), then drop all
        but the last ``keep_last``; first set aside the corrupt ones that resume skipped."""
        full_state = self._gather_state()
        if not self.dist.is_main:
            barrier()
            return None
        for corrupt in self.corrupt:
            if corrupt.exists():
                log.warning("moved the corrupt checkpoint %s to %s", corrupt, checkpoint.set_aside(corrupt))
        self.corrupt = []
        model_state, ema_state, (opt_tensors, opt_meta) = full_state
        state = {"step": self.step, "scheduler": self.scheduler.state_dict(), "optimizer": opt_meta,
                 "seed": self.experiment.seed, "world_size": self.dist.world_size}
        final = checkpoint.write_step(self.run_dir, self.step, self.experiment, model_state,
                                      ema_state, opt_tensors, state)
        checkpoint.keep_last(self.run_dir, self.settings.keep_last)
        say(f"saved checkpoint {final}")
        barrier()
        return final

    def _gather_state(self):
        if self.sharded:
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                get_model_state_dict,
                get_optimizer_state_dict,
            )

            options = StateDictOptions(full_state_dict=True, cpu_offload=True)
            names = [name for name, _ in self.net.named_parameters()]
            opt_state = get_optimizer_state_dict(self.net, self.optimizer, options=options)
            return (get_model_state_dict(self.net, options=options),
                    get_model_state_dict(self.ema, options=options),
                    checkpoint.optimizer_tensors(opt_state, names) if self.dist.is_main else None)  # rank 0's
        return (self.net.state_dict(), self.ema.state_dict(),
                checkpoint.optimizer_tensors(self.optimizer.state_dict()))

    def _last_checkpoint_text(self) -> str:
        found = checkpoint.checkpoints(self.run_dir)
        return str(found[-1]) if found else "none yet"


def train(experiment: configs.Experiment, run_dir, resume: bool = False, progress: bool = True) -> Path:
    """Train into ``run_dir``, which no other process may hold meanwhile (``runlock``)."""
    with runlock.hold(run_dir):
        trainer = Trainer(experiment, run_dir, resume, progress)
        try:
            return trainer.run()
        finally:
            trainer.dist.close()


def resume_experiment(run_dir, overrides=()) -> configs.Experiment:
    """The experiment of an existing run folder (with ``--set`` overrides applied)."""
    path = Path(run_dir) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"not a run folder (no config.json): {run_dir}")
    raw = json.loads(path.read_text())["experiment"]
    return configs.validate(configs.apply_overrides(raw, list(overrides)))

