"""`raytrain bench infer`: persons/s of `raytrain predict`'s path, one person per forward
pass and batched.

Both paths run the code of `raytrain predict` on the same synthetic full-frame JPEGs and
person boxes (rendered in memory, ``raytrain.synthetic``): ``predict.crop.PersonCropper``
(JPEG decode at libjpeg's reduced scale + RoI crops, the training cropper) and
``predict.model.InferenceModel`` (the validation forward pass, pose to axis-angle, joints
projected to the image), float32:

- ``batch1_fp32``: one person per forward pass (crop, then forward), as a stream of single
  requests would run;
- ``batched_fp32``: ``batch_size`` persons per forward pass.

Reading files and writing JSON lines are not timed. The network has random weights (its
speed does not depend on them). Configs: ``demo`` (mobilenetv3_small_050, 64 px, 5 RoIs)
and, without ``--quick``, ``r50_paper`` (ResNet-50, 224 px, 5 RoIs). On the CPU the bench
runs one torch thread (``threads``) and reports persons per wall-clock second and per
CPU-second of the process (``process_time``: what a shared machine's other load does not
change).
"""
import time

import torch


def bench_frames(n: int, crop_size: int, seed: int = 3):
    """n full-frame synthetic pictures: [(name, jpeg bytes, (W, H), bbox [x, y, w, h])]."""
    import json

    from ..predict.crop import BOX_SCALE
    from ..synthetic.people import SyntheticConfig, SyntheticGenerator, encode_raw, with_storage
    cfg = with_storage(SyntheticConfig(crop_size=crop_size, image_sizes=((640, 480), (480, 640), (800, 600))),
                       "full")
    frames = []
    for raw in SyntheticGenerator(cfg).samples(seed, range(n)):
        sample = encode_raw(raw)
        meta = json.loads(sample["json"])
        cx, cy, b = meta["box"]
        side = b / BOX_SCALE  # the detection box that predict enlarges back to b
        frames.append((sample["__key__"], sample["jpg"], tuple(meta["image_size"]),
                       (cx - side / 2, cy - side / 2, side, side)))
    return frames


def inference_model(config: str, overrides=(), device: str = "cpu"):
    """The network of a config with random weights, as ``load_inference_model`` returns it."""
    from ..body import load_body_model
    from ..checkpoints import trained_network
    from ..config import load_config, shipped_config
    from ..predict.model import InferenceModel
    from ..synthetic.body_model import with_default_body_model
    cfg = with_default_body_model(load_config(str(shipped_config(config)), list(overrides)))
    body = load_body_model(cfg.model.smpl_dir)
    model = trained_network(cfg, body_model=body).to(device).eval()   # the network predict loads
    return InferenceModel(model=model, cfg=cfg, checkpoint="(random weights)", config_source=config,
                          device=torch.device(device), faces=body.faces)


def _units(frames):
    from ..predict.inputs import Detection, Unit
    return [(Unit(name=name, frame=None, size=size, data=data), [Detection(bbox=bbox)])
            for name, data, size, bbox in frames]


def batch1_rate(model, cropper, units, persons: int) -> tuple[float, float]:
    """(persons per second, persons per CPU-second), one person per forward pass."""
    from ..predict.inputs import SkipLog
    start, cpu, done = time.perf_counter(), time.process_time(), 0
    while done < persons:
        for unit, detections in units:
            items = list(cropper.crops(unit, detections, SkipLog()))
            model(items)
            done += len(items)
            if done >= persons:
                break
    return done / (time.perf_counter() - start), done / (time.process_time() - cpu)


def batched_rate(model, cropper, units, persons: int, batch_size: int) -> tuple[float, float]:
    """(persons per second, persons per CPU-second), batch_size persons per forward pass."""
    from ..predict.inputs import SkipLog
    start, cpu, done, pending = time.perf_counter(), time.process_time(), 0, []
    while done < persons:
        for unit, detections in units:
            items = list(cropper.crops(unit, detections, SkipLog()))
            pending.extend(items)
            if len(pending) >= batch_size:
                model(pending[:batch_size])
                done += batch_size
                pending = pending[batch_size:]
                if done >= persons:
                    break
    return done / (time.perf_counter() - start), done / (time.process_time() - cpu)


def bench_config(config: str, overrides, frames, batch1_persons: int, batched_persons: int,
                 batch_size: int, device: str) -> dict:
    from ..predict.crop import PersonCropper
    model = inference_model(config, overrides, device)
    cropper = PersonCropper(model.cfg.rois, model.crop_size)
    units = _units(frames)
    batched_rate(model, cropper, units, batch_size, batch_size)        # warm-up
    batch1_rate(model, cropper, units, 2)
    batch1 = batch1_rate(model, cropper, units, batch1_persons)
    batched = batched_rate(model, cropper, units, batched_persons, batch_size)
    return {"config": config, "overrides": list(overrides), "backbone": model.cfg.model.backbone,
            "crop_size": model.crop_size, "num_rois": model.num_rois, "batch_size": batch_size,
            "batch1_fp32_persons_per_s": round(batch1[0], 2),
            "batched_fp32_persons_per_s": round(batched[0], 2),
            "batch1_fp32_persons_per_cpu_s": round(batch1[1], 2),
            "batched_fp32_persons_per_cpu_s": round(batched[1], 2),
            "batch1_persons": batch1_persons, "batched_persons": batched_persons}


def run_infer_bench(quick: bool = False, device: str | None = None, threads: int = 1) -> dict:
    """Persons/s of the predict path; the first config's numbers at the top level, every
    config's under ``runs``."""
    import os
    t0 = time.perf_counter()
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        torch.set_num_threads(threads)
    frames = bench_frames(4 if quick else 16, crop_size=64)
    if quick:  # a smaller network and fewer persons: within a minute on 2 busy cores
        plans = [("demo", ("model.decoder_hidden=64", "rois.num_rois=2"), 4, 16, 8)]
    else:
        plans = [("demo", (), 64, 256, 16), ("r50_paper", (), 8, 32, 16)]
    runs = []
    for config, overrides, batch1_persons, batched_persons, batch_size in plans:
        print(f"[bench infer] {config} {' '.join(overrides)}", flush=True)
        runs.append(bench_config(config, overrides, frames, batch1_persons, batched_persons, batch_size, device))
    result = dict(runs[0])
    result.update({"device": device, "torch_threads": torch.get_num_threads(), "runs": runs,
                   "load_average": [round(v, 2) for v in os.getloadavg()],
                   "seconds": round(time.perf_counter() - t0, 1)})
    return result
