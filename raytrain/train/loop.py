"""The training loop: one function for Ray Train workers and for the bare benchmark.

    run_loop(cfg, session)  # session: RaySession inside TorchTrainer, BareSession otherwise

Per step: uint8 crops (with `data.device_crop`: decoded regions, cropped on the device) ->
normalise on device -> network -> losses -> (the ranks agree that none met a data error or
a non-finite loss: `ranks.stop_together`) -> backward -> Adam. Every `train.val_every` steps:
validation (MPJPE, PA-MPJPE, PVE, camera error in mm; crops made in the CPU workers)
reduced over ranks. Every `train.checkpoint_every` steps and at the end: a checkpoint
with model, optimiser, scheduler, step, RNG and the data position (epoch, samples
consumed).
"""
import logging
import math
import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from ..body import BodyModelError, load_body_model, load_mean_params
from ..checkpoints import CheckpointError, CheckpointManager
from ..config import ExperimentConfig, config_from_raw
from ..data.device_crop import crop_batch
from ..data.errors import DataError, user_line
from ..data.pipeline import Loader, epoch_length
from ..eval.protocol import validate
from ..losses import compute_losses, contrastive_warmup, gather_negatives
from ..model import build_model, normalize_images
from ..ranks import PeerStopped, stop_together
from .fatal import NonFiniteLoss, fatal_path, read_fatal_error, record_fatal_error
from .logger import RunLogger
from .optim import build_optimizer

log = logging.getLogger(__name__)


class Throughput:
    """Persons/s over training steps only (validation and checkpoints paused out)."""

    def __init__(self, warmup_steps: int = 2):
        self.warmup, self.steps, self.persons, self.elapsed, self.t = warmup_steps, 0, 0, 0.0, None

    def tick(self, persons: int):
        now = time.perf_counter()
        self.steps += 1
        if self.t is not None and self.steps > self.warmup:
            self.elapsed += now - self.t
            self.persons += persons
        self.t = now

    def pause(self):
        self.t = None

    def rate(self) -> float:
        return self.persons / self.elapsed if self.elapsed > 0 else 0.0


def ray_train_worker(loop_config: dict):
    """Entry point of every Ray Train worker: {"config": raw config, "console": queue or
    None, "run_dir": the run's directory, which holds the fatal file}. On a deterministic
    error (bad data, a non-finite loss) every rank returns normally, so that Ray restarts
    nothing: the rank that met it records it in the fatal file, the others stop with it
    (``fatal.py``)."""
    from ..console import forward_to_driver
    from .session import RaySession
    forward_to_driver(loop_config.get("console"))
    run_dir = loop_config.get("run_dir")
    fatal = fatal_path(run_dir) if run_dir else None
    session = RaySession(run_dir=run_dir)
    if session.rank == 0:
        log.info("[raytrain] worker group started: %d worker(s)", session.world_size)
    recorded = read_fatal_error(fatal) if fatal else None  # restarted: do nothing again
    if recorded is not None:
        if session.rank == 0:
            log.info("[raytrain] not retried: an earlier attempt stopped on %s", recorded)
        return
    try:
        run_loop(config_from_raw(loop_config["config"]), session)
    except PeerStopped:
        return
    except (DataError, NonFiniteLoss, BodyModelError, CheckpointError) as error:  # the same on every try
        if fatal and record_fatal_error(fatal, error):
            return
        # Ray Train has no public way to fail a run without its restarts: say they are expected
        log.warning("[raytrain] rank %d: %s; the stop could not be recorded in %s, so Ray restarts the worker "
                    "group up to ray.max_failures=%s times: the restarts are expected and meet the same error",
                    session.rank, user_line(error), fatal, loop_config["config"].get("ray", {}).get("max_failures"))
        raise  # unrecorded: the driver learns of it from Ray
    finally:
        session.close()  # a checkpoint staged when the run failed


def run_loop(cfg: ExperimentConfig, session, max_steps: int | None = None) -> dict:
    torch.manual_seed(cfg.seed + session.rank)
    torch.set_num_threads(max(1, int(round(cfg.ray.cpus_per_worker))))
    device = session.device
    body = load_body_model(cfg.model.smpl_dir, genders=("neutral", "male", "female"))
    model = session.prepare_model(initial_network(cfg, body))
    body = body.to(device)
    optimizer = build_optimizer(cfg.optim, model)
    total_steps = run_steps(cfg, session.world_size, max_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg, total_steps))
    scaler = torch.amp.GradScaler("cuda", enabled=cfg.optim.amp == "fp16")
    checkpoints = CheckpointManager(session, cfg, model=model, optimizer=optimizer, scheduler=scheduler,
                                    scaler=scaler)
    pos = checkpoints.restore()
    if pos.step:
        log.info("[raytrain] rank %d: resumed from step %d (epoch %d, %d samples into it)",
                 session.rank, pos.step, pos.epoch, pos.samples_in_epoch)
    logger = RunLogger(cfg, session, total_steps)
    throughput = Throughput(warmup_steps=2)
    metrics = {}
    # this rank's batches, and its validation batches: workers kept from one epoch (or
    # validation) to the next, stopped when the run ends
    feed = Loader(cfg, "train", session.rank, session.world_size)
    val_loader = Loader(cfg, "val", session.rank, session.world_size)
    try:
        while pos.step < total_steps:
            batches = feed.epoch(pos.epoch, skip=pos.samples_in_epoch)
            batch, problem = next_batch(batches)
            stop_together(problem, device)  # before the epoch's first forward pass
            while batch is not None:
                loss = step_loss(cfg, model, body, batch, device, step=pos.step + 1)
                done = loss.step >= total_steps
                # the next batch is fetched now so that one agreement per step covers it
                # (before its forward pass) and this loss (before its backward pass)
                following, problem = (None, None) if done else next_batch(batches)
                stop_together(loss.error or problem, device)
                terms = optimise(cfg, model, optimizer, scheduler, scaler, loss)
                feed.release(batch)  # its images are read no more: the worker may refill them
                pos.step += 1
                pos.samples_in_epoch += len(batch["keys"])
                throughput.tick(len(batch["keys"]) * session.world_size)
                logger.step(pos, terms, len(batch["keys"]), scheduler.get_last_lr()[0], batch["keys"],
                            batch.get("sources"))
                want_checkpoint = pos.step % cfg.train.checkpoint_every == 0 or done
                # every checkpoint carries a fresh val_mpjpe: Ray keeps the best K by it
                validated = pos.step % cfg.train.val_every == 0 or want_checkpoint
                if validated:
                    throughput.pause()
                    metrics = validate(cfg, model, body, session, device, val_loader)
                    metrics["train_persons_per_s"] = throughput.rate()
                    logger.validation(pos, metrics)
                # Ray hears of validations and checkpoints only (Tune and ASHA read those; the
                # progress lines are logged): a Train V2 report waits for the controller to take
                # the previous one, and it polls every 2 s
                if want_checkpoint:
                    checkpoints.save(pos, metrics, _report_metrics(pos, {}, metrics, feed))
                elif validated:
                    session.report(_report_metrics(pos, terms, metrics, feed))
                batch = following
            if pos.step < total_steps:
                pos.epoch += 1
                pos.samples_in_epoch = 0
    finally:
        feed.close()
        val_loader.close()
    logger.close()
    session.model = model
    return metrics


def initial_network(cfg: ExperimentConfig, body) -> torch.nn.Module:
    """The network training starts from: backbone weights from ``model.backbone_checkpoint``
    or ``model.pretrained``, decoders from SMPL's mean parameters. A trained network is
    built by ``checkpoints.load_trained_model`` instead, from its own weights."""
    return build_model(cfg.model, body_model=body, mean_params=load_mean_params(cfg.model.smpl_dir))


def next_batch(batches: Iterator[dict]) -> tuple[dict | None, DataError | None]:
    """(the next batch or None at the epoch's end, the data error met fetching it or None):
    a data error met opening or reading the shards is returned, not raised, so that the
    ranks can stop together (``ranks.stop_together``)."""
    try:
        return next(batches), None
    except StopIteration:
        return None, None
    except DataError as error:
        return None, error


@dataclass
class StepLoss:
    """A training step up to its loss; ``error``: the NonFiniteLoss to stop on, or None."""
    step: int
    batch: dict                 # on the device
    total: torch.Tensor         # () float32, with its graph
    terms: dict                 # name -> () tensor
    error: NonFiniteLoss | None


def step_loss(cfg, model, body, batch, device, step: int = 0) -> StepLoss:
    """Forward pass and losses of training step ``step``; a NaN or infinite loss gives
    ``error`` (naming the step, the batch's sample keys and the loss terms): nothing of it
    may reach the backward pass."""
    batch = batch_to_device(batch, device, cfg.data.crop_size)
    model.train()
    with _autocast(cfg, device):
        pred = forward(model, batch)
    total, terms = batch_losses(cfg, body, pred, batch, step)
    error = None
    if not torch.isfinite(total.detach()):
        error = NonFiniteLoss(step, batch["keys"], _as_floats(terms, total))
    return StepLoss(step, batch, total, terms, error)


def _as_floats(terms: dict, total: torch.Tensor) -> dict[str, float]:
    """The loss terms and their weighted total as floats (progress lines, error messages)."""
    return {**{k: float(v) for k, v in terms.items()}, "total": float(total.detach())}


def optimise(cfg, model, optimizer, scheduler, scaler, loss: StepLoss) -> dict[str, float]:
    """Backward pass and optimiser step of a finite loss -> the loss terms as floats.
    ``NonFiniteLoss`` before the optimiser step when the gradient norm is NaN or infinite
    (without fp16's own skipping); under DDP the norm is of all-reduced gradients, the
    same on every rank, so every rank stops there."""
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss.total).backward()
    if cfg.optim.grad_clip > 0:
        scaler.unscale_(optimizer)
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
    elif not scaler.is_enabled():
        norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
    else:
        norm = None  # fp16: the scaler skips steps with non-finite gradients itself
    terms = _as_floats(loss.terms, loss.total)
    if norm is not None and not scaler.is_enabled() and not torch.isfinite(norm):
        raise NonFiniteLoss(loss.step, loss.batch["keys"], {**terms, "grad_norm": float(norm)}, what="gradient")
    scaler.step(optimizer)
    scaler.update()
    scheduler.step()
    return terms


def train_step(cfg, model, body, optimizer, scheduler, scaler, batch, device, step: int = 0) -> dict[str, float]:
    """One optimisation step of one process; ``NonFiniteLoss`` (naming ``step``, the
    batch's sample keys and the loss terms) before the backward pass when the loss is NaN
    or infinite, and before the optimiser step when the gradient is (without fp16's own
    skipping). ``run_loop`` runs the same two halves with the ranks' agreement between."""
    loss = step_loss(cfg, model, body, batch, device, step)
    if loss.error is not None:
        raise loss.error
    return optimise(cfg, model, optimizer, scheduler, scaler, loss)


def batch_to_device(batch: dict, device, crop_size: int) -> dict:
    """The batch's tensors on `device`; a batch of `data.device_crop` gets its crops made there."""
    batch = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
    return crop_batch(batch, crop_size)


def forward(model, batch: dict) -> dict:
    """The network on a batch already on its device (uint8 crops normalised there)."""
    return model(normalize_images(batch["images"]), batch["boxes"], batch["image_size"], batch["focal"])


def batch_losses(cfg, body, pred: dict, batch: dict, step: int | None = None):
    """(total, terms) of the training losses, in float32, for a prediction on `batch` at
    training step `step` (the L_cont warm-up; None: past it)."""
    pred = {k: v.float() for k, v in pred.items()}
    with torch.no_grad():
        gt_vertices = body.forward_axis_angle(batch["pose"], batch["betas"]).vertices
    negatives = gather_negatives(pred["z"]) if cfg.loss.gather_negatives else None
    factor = 1.0 if step is None else contrastive_warmup(step, cfg.loss.cont_warmup_steps)
    return compute_losses(pred, batch, cfg.loss, gt_vertices, negatives, cont_factor=factor)


def _report_metrics(pos, terms, metrics, feed):
    out = {"step": pos.step, "epoch": pos.epoch}
    out.update({f"loss_{k}": v for k, v in terms.items()})
    out.update(metrics)
    out.update({f"bad_{k}": v for k, v in feed.bad_counts.items()})
    return out


def run_steps(cfg: ExperimentConfig, world_size: int, max_steps: int | None = None) -> int:
    """Optimiser steps of a run of ``cfg`` on ``world_size`` ranks: ``optim.epochs`` epochs
    of each rank's whole batches (``data.batch_size / world_size`` persons each), capped by
    ``optim.max_steps`` and ``max_steps``. The loop's end and the schedule's length, and
    ASHA's ``max_t`` in ``raytrain tune``."""
    per_rank = cfg.data.batch_size // world_size
    per_epoch = max(1, epoch_length(cfg, "train", 0, world_size) // per_rank)
    total = cfg.optim.epochs * per_epoch
    for cap in (cfg.optim.max_steps, max_steps):
        if cap:
            total = min(total, cap)
    return total


def _lr_lambda(cfg, total_steps):
    warmup, kind = cfg.optim.warmup_steps, cfg.optim.lr_schedule

    def factor(step):
        if warmup and step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        if kind == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        if kind == "step":
            return 0.1 ** int(progress * 3)
        return 1.0
    return factor


def _autocast(cfg, device):
    if cfg.optim.amp == "none" or device.type != "cuda":
        return nullcontext()
    dtype = torch.bfloat16 if cfg.optim.amp == "bf16" else torch.float16
    return torch.autocast("cuda", dtype=dtype)
