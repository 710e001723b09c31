"""``raytrain bench gpu``: one GPU check, in one process, in under 6 minutes.

    raytrain bench gpu --json --out bench_gpu.json       # on one GPU
    raytrain bench gpu --device cpu --quick --json       # tiny sizes (the test suite runs it)

No Ray: the bare loop (``train.loop.run_loop`` with ``train.session.BareSession``), so
start-up stays short. Synthetic 1920x1080 scenes are rendered on the spot and written as
shards; everything goes through the real data path (``pipeline.Loader``, persistent
DataLoader workers) and the real training step. Sections of the result:

* ``train``: persons/s (``loop.Throughput``: training steps after 2 warm-up steps) and
  peak memory (``torch.cuda.max_memory_allocated`` over the run, validation included)
  for R50 (batch 48) and H48 (batch 20), M = 5, S = 224: fp32 (cuDNN's default TF32
  convolutions), and bf16 autocast (``optim.amp=bf16``) with the model in
  ``channels_last``; the R50 bf16 step once more with ``data.device_crop``; ViT-B/16
  (batch 48) and ViT-H/16 (batch 12) with bf16 autocast, from their configs (AdamW,
  layer-wise lr decay).
* ``data_path``: CPU-seconds per person of the data path, with crops made in the loader
  workers and on the device: the loader workers and the training process (pinning, the
  move to the device, the crops) over a whole epoch after a first one, no training.
* ``inference``: 5-RoI images/s (one image = one person's M crops; the network with the
  SMPL layer, inputs already on the device, eval mode): fp32 at batch 1 (the paper's
  way), bf16 batched (the training batch, ``channels_last``), and the latter with the
  encoder (the backbone, nearly all of the work) under ``torch.compile`` (skipped when the
  time budget would not allow it; fusion, decoders and the SMPL layer stay eager).
* ``precision``: one training batch, loss and gradient with bf16 autocast against fp32
  (TF32 off), from the same weights, dropout off.

``--quick`` swaps in small backbones (``vit_tiny`` for both ViTs), 64 px crops, batch 2
and a few steps, and
``torch.compile`` with the ``eager`` backend (inductor's C++ build takes minutes on a CPU).
Without CUDA, mixed precision is off in the training runs (``optim.amp`` is for GPUs);
the precision check and the batched inference then run CPU bf16 autocast.
"""

from __future__ import annotations

import copy
import json
import os
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ..config import load_config, shipped_config
from ..train.session import BareSession

#: (config, backbone, persons per step) of each model; ``--quick`` keeps the configs.
MODELS = {"r50": ("r50_paper.yaml", "resnet50", 48), "h48": ("h48_paper.yaml", "hrnet_w48", 20),
          "vit_b": ("vit_b_paper.yaml", "vit_base", 48), "vit_h": ("vit_h_paper.yaml", "vit_huge", 12)}
QUICK_MODELS = {"r50": ("r50_paper.yaml", "mobilenetv3_small_050", 2),
                "h48": ("h48_paper.yaml", "resnet10t", 2),
                "vit_b": ("vit_b_paper.yaml", "vit_tiny", 2), "vit_h": ("vit_h_paper.yaml", "vit_tiny", 2)}
#: (name, model, bf16, channels_last, crops on the device) of each training run; the ViTs'
#: one convolution (the patch embedding) gains nothing from channels_last.
TRAIN_RUNS = (("r50_fp32", "r50", False, False, False), ("r50_bf16_cl", "r50", True, True, False),
              ("r50_bf16_cl_device_crop", "r50", True, True, True),
              ("h48_fp32", "h48", False, False, False), ("h48_bf16_cl", "h48", True, True, False),
              ("vit_b_bf16", "vit_b", True, False, False), ("vit_h_bf16", "vit_h", True, False, False))
#: The models whose inference is measured (the paper's two).
INFER_MODELS = ("r50", "h48")


class _Sizes:
    def __init__(self, quick: bool):
        self.quick = quick
        self.models = QUICK_MODELS if quick else MODELS
        self.crop = 64 if quick else 224
        self.steps = 3 if quick else 20          # per training run; 2 are warm-up
        self.scenes = 4 if quick else 48         # rendered; the epoch repeats them under new keys
        self.infer_seconds = 0.2 if quick else 3.0
        self.warmup_runs = 1 if quick else 3     # inference: cuDNN algorithm choice, compilation
        self.compile_backend = "eager" if quick else "inductor"
        # on the GPU no compile starts that would end past the budget (compile_reserve_s)
        self.budget_s = float("inf") if quick else 330
        self.compile_reserve_s = 120


class _Session(BareSession):
    """The bare session, optionally putting the model in ``channels_last``."""

    def __init__(self, run_dir: str, device: str, channels_last: bool):
        super().__init__(run_dir, device)
        self.channels_last = channels_last

    def prepare_model(self, model):
        model = super().prepare_model(model)
        return model.to(memory_format=torch.channels_last) if self.channels_last else model


def run_gpu_bench(quick: bool = False, device: str | None = None, out: str | None = None) -> dict:
    """Run every section; write the result to ``out`` (if given) and return it."""
    start = time.perf_counter()
    device = _resolve_device(device)
    sizes = _Sizes(quick)
    loader_workers = max(1, min(12, (os.cpu_count() or 2) - 4))
    result = {"device": _device_name(device), "torch": torch.__version__, "quick": quick,
              "crop_size": sizes.crop, "num_rois": 5, "steps_per_run": sizes.steps,
              "loader_workers": loader_workers, "memory": _memory_kind(device),
              "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32, "train": {}}
    with tempfile.TemporaryDirectory(prefix="raytrain-bench-gpu-") as tmp:
        shards = _write_shards(tmp, sizes, max(m[2] for m in sizes.models.values()))
        result["startup_s"] = round(time.perf_counter() - start, 1)
        models = {}
        for name, model, bf16, channels_last, device_crop in TRAIN_RUNS:
            cfg = _config(sizes, model, shards, f"{tmp}/{name}", device, bf16, device_crop, loader_workers)
            result["train"][name], trained = _train_run(cfg, device, channels_last, sizes.steps)
            if model in INFER_MODELS:
                models.setdefault(model, (cfg, trained.cpu()))  # off the device: not in later peaks
            del trained
            _log(f"train {name}: {result['train'][name]}")
        result["data_path"] = {
            "cpu_crop": _data_path_cost(models["r50"][0], device, device_crop=False),
            "device_crop": _data_path_cost(models["r50"][0], device, device_crop=True)}
        _log(f"data path: {result['data_path']}")
        result["precision"] = _precision_check(*models["r50"], device)
        _log(f"precision: {result['precision']}")
        result["inference"] = {}
        deadline = start + sizes.budget_s
        for model, (cfg, trained) in models.items():
            result["inference"][model] = _inference(cfg, trained, device, sizes, deadline)
            _log(f"inference {model}: {result['inference'][model]}")
    result["seconds"] = round(time.perf_counter() - start, 1)
    result["seconds_since_process_start"] = _process_age()
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(result, indent=1) + "\n")
    return result


# ----------------------------------------------------------------------------- set-up


def _resolve_device(device: str | None) -> torch.device:
    if device is None and not torch.cuda.is_available():
        raise SystemExit("raytrain bench gpu: no CUDA device here; pass --device cpu (with --quick "
                         "for the smoke run)")
    return torch.device(device or "cuda")


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def _memory_kind(device: torch.device) -> str:
    if device.type == "cuda":
        return "torch.cuda.max_memory_allocated per run"
    return "process max RSS so far (not per run: no device memory on the CPU)"


def _log(line: str) -> None:
    print(f"[bench gpu] {line}", flush=True)


def _write_shards(root: str, sizes: _Sizes, batch: int) -> tuple[str, str]:
    """Rendered HD scenes as (train, val) shards; the training epoch holds exactly
    ``steps`` batches of the largest batch size (copies under new keys)."""
    from ..synthetic.people import SyntheticGenerator
    from .data import HD, write_bench_shards

    encoded = SyntheticGenerator(HD).encoded(0, range(sizes.scenes))
    copies = -(-sizes.steps * batch // sizes.scenes)
    write_bench_shards(encoded, f"{root}/train", copies=copies)
    write_bench_shards(encoded[:8], f"{root}/val", copies=1)  # 8 at most
    return f"{root}/train", f"{root}/val"


def _config(sizes: _Sizes, model: str, shards, run_dir: str, device: torch.device, bf16: bool,
            device_crop: bool, loader_workers: int):
    from ..synthetic.body_model import with_default_body_model

    config, backbone, batch = sizes.models[model]
    amp = "bf16" if bf16 and device.type == "cuda" else "none"
    return with_default_body_model(load_config(str(shipped_config(config)), [
        "data.mixture=[]", f"data.train_shards={shards[0]}", f"data.val_shards={shards[1]}",
        f"data.crop_size={sizes.crop}", f"data.batch_size={batch}", f"data.val_batch_size={min(batch, 8)}",
        f"data.loader_workers={loader_workers}", "data.shuffle_buffer=256", "data.max_val_samples=8",
        f"data.device_crop={str(device_crop).lower()}", f"model.backbone={backbone}",
        f"optim.amp={amp}", f"optim.max_steps={sizes.steps}", "optim.epochs=1000",
        f"train.val_every={sizes.steps}", f"train.checkpoint_every={sizes.steps}",
        f"train.log_every={sizes.steps}", "train.tensorboard=false", f"train.storage_path={run_dir}",
        "ray.num_workers=1", f"ray.use_gpu={str(device.type == 'cuda').lower()}",
        f"ray.cpus_per_worker={1 if sizes.quick else 2}", "name=bench-gpu"]))


# ----------------------------------------------------------------------------- sections


def _train_run(cfg, device: torch.device, channels_last: bool, steps: int) -> tuple[dict, torch.nn.Module]:
    """One bare training run -> (persons/s, peak memory, ...), the trained model."""
    from ..train.loop import run_loop

    session = _Session(cfg.train.storage_path, str(device), channels_last)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    metrics = run_loop(cfg, session)
    row = {"persons_per_s": round(metrics["train_persons_per_s"], 2),
           "peak_memory_gib": round(_peak_memory_gib(device), 3),
           "amp": cfg.optim.amp, "channels_last": channels_last,
           "device_crop": cfg.data.device_crop, "batch_size": cfg.data.batch_size,
           "backbone": cfg.model.backbone, "seconds": round(time.perf_counter() - t0, 1)}
    return row, session.model


def _peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB on Linux


def _data_path_cost(cfg, device: torch.device, device_crop: bool) -> dict:
    """CPU-seconds per person of loading a batch onto the device, crops made there or in
    the workers: the second of two epochs (the first forks the workers), no training."""
    from ..data.pipeline import Loader
    from ..train.loop import batch_to_device
    from .data import _loader_cpu_seconds

    cfg = copy.deepcopy(cfg)
    cfg.data.device_crop = device_crop
    persons = workers = main = wall = 0.0
    with Loader(cfg, "train") as loader:
        for epoch in range(2):
            main0, total0, wall0 = time.process_time(), _loader_cpu_seconds(), time.perf_counter()
            done = 0
            for batch in loader.epoch(epoch):
                images = batch_to_device(batch, device, cfg.data.crop_size)["images"]
                done += images.shape[0]
                loader.release(batch)  # as the training loop does after each step
            _sync(device)
            if epoch == 1:
                main = time.process_time() - main0
                workers = _loader_cpu_seconds() - total0 - main
                wall, persons = time.perf_counter() - wall0, done
    return {"loader_cpu_s_per_person": round(workers / persons, 6),
            "main_cpu_s_per_person": round(main / persons, 6),
            "persons_per_wall_s": round(persons / wall, 1), "persons": int(persons)}


def _one_batch(cfg, device: torch.device) -> dict:
    """The first training batch of ``cfg`` on ``device``, read in this process."""
    from ..data.pipeline import Loader
    from ..train.loop import batch_to_device

    cfg = copy.deepcopy(cfg)
    cfg.data.loader_workers, cfg.data.shuffle_buffer = 0, cfg.data.batch_size
    with Loader(cfg, "train") as loader:
        batch = next(loader.epoch(0))
    return batch_to_device(batch, device, cfg.data.crop_size)


def _precision_check(cfg, model, device: torch.device) -> dict:
    """Loss and gradient of one batch with bf16 autocast against fp32 (TF32 off), from the
    same weights, in training mode (batch statistics) with dropout off."""
    from ..body import load_body_model
    from ..train.loop import batch_losses, forward

    batch = _one_batch(cfg, device)
    body = load_body_model(cfg.model.smpl_dir, genders=("neutral", "male", "female")).to(device)
    model = model.to(device).float()
    results = {}
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        for name, amp in (("fp32", False), ("bf16", True)):
            copy_ = copy.deepcopy(model).train()
            for module in copy_.modules():  # dropout off: its masks are drawn per dtype
                if isinstance(module, torch.nn.Dropout):
                    module.eval()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                pred = forward(copy_, batch)
            total, _ = batch_losses(cfg, body, pred, batch)
            total.backward()
            grads = [p.grad.flatten().double() for p in copy_.parameters() if p.grad is not None]
            results[name] = (float(total.detach()), torch.cat(grads))
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    (loss32, g32), (loss16, g16) = results["fp32"], results["bf16"]
    loss_rel = abs(loss16 - loss32) / abs(loss32)
    grad_cos = float(torch.nn.functional.cosine_similarity(g16, g32, dim=0))
    grad_rel = float((g16 - g32).norm() / g32.norm())
    return {"loss_fp32": loss32, "loss_bf16": loss16, "loss_rel_diff": loss_rel, "grad_cosine": grad_cos,
            "grad_rel_diff": grad_rel, "tolerance": {"loss_rel_diff": 0.02, "grad_cosine": 0.99},
            "agree": bool(np.isfinite(loss16) and loss_rel <= 0.02 and grad_cos >= 0.99),
            "batch_size": cfg.data.batch_size, "backbone": cfg.model.backbone}


def _inference(cfg, model, device: torch.device, sizes: _Sizes, deadline: float) -> dict:
    """5-RoI images/s (persons/s) of the network: fp32 batch 1, bf16 batched, compiled."""
    batch = _one_batch(cfg, device)
    model = model.to(device).float().eval()
    out = {"fp32_batch1": _images_per_s(model, _first(batch, 1), device, False, sizes)}
    model = model.to(memory_format=torch.channels_last)
    batched = f"bf16_batch{len(batch['keys'])}"
    out[batched] = _images_per_s(model, batch, device, True, sizes)
    if time.perf_counter() + sizes.compile_reserve_s > deadline:
        out[f"{batched}_compiled"] = {"skipped": "time budget"}
        return out
    t0 = time.perf_counter()
    model.encoder = torch.compile(model.encoder, backend=sizes.compile_backend)  # the last use of model
    row = _images_per_s(model, batch, device, True, sizes)
    row.update(compile_backend=sizes.compile_backend, compile_s=round(time.perf_counter() - t0, 1),
               speedup=round(row["images_per_s"] / out[batched]["images_per_s"], 3))
    out[f"{batched}_compiled"] = row
    return out


def _first(batch: dict, n: int) -> dict:
    return {k: v[:n] for k, v in batch.items()}


@torch.no_grad()
def _images_per_s(model, batch: dict, device: torch.device, amp: bool, sizes: _Sizes) -> dict:
    """Persons (images of M RoIs) per second of ``model`` on ``batch`` (already on device),
    over at least ``sizes.infer_seconds`` and 3 runs after the warm-up."""
    from ..train.loop import forward

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            forward(model, batch)

    for _ in range(sizes.warmup_runs):
        step()
    _sync(device)
    runs, t0 = 0, time.perf_counter()
    while runs < 3 or time.perf_counter() - t0 < sizes.infer_seconds:
        for _ in range(3):  # a few launches in flight between synchronisations
            step()
        runs += 3
        _sync(device)
    elapsed = time.perf_counter() - t0
    persons = len(batch["keys"])
    return {"images_per_s": round(runs * persons / elapsed, 2), "batch_size": persons,
            "amp": "bf16" if amp else "none", "runs": runs}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _process_age() -> float:
    """Seconds since this process started (Linux /proc), start-up of Python included."""
    try:
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        return round(uptime - int(fields[19]) / os.sysconf("SC_CLK_TCK"), 1)
    except (OSError, ValueError, IndexError):
        return float("nan")
