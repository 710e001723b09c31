"""`raytrain {shard,train,tune,eval,predict,demo,study,bench,doctor}`: thin argument parsing over the package."""
import argparse
import contextlib
import errno
import functools
import json
import logging
import sys

from .config import ConfigError, load_config

log = logging.getLogger("raytrain.cli")


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from .console import setup_console
    setup_console()
    try:
        return args.func(args) or 0
    except KeyboardInterrupt:  # Ctrl-C: what was left is safe, say so in one line
        print(f"raytrain: interrupted{INTERRUPTED.get(args.command, '')}", file=sys.stderr)
        return 130
    except ConfigError as err:
        print(f"raytrain: config error: {err}", file=sys.stderr)
        return 2
    except Exception as err:
        from .body.model import BodyModelError
        from .checkpoints import CheckpointError
        if isinstance(err, CheckpointError):
            print(f"raytrain: checkpoint error: {err}", file=sys.stderr)
            return 2
        if isinstance(err, BodyModelError):
            print(f"raytrain: body model error: {err}", file=sys.stderr)
            return 2
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            print(f"raytrain: cannot write {err.filename or 'a file'}: {err.strerror}", file=sys.stderr)
            return 1
        if not _deterministic(err):
            raise
        print(f"raytrain: stopped: {_user_line(err)}", file=sys.stderr)
        return 1


#: What an interrupted command leaves behind, by command.
INTERRUPTED = {"shard": ": the output folder stays marked unfinished (readers, doctor and training refuse it); "
                        "rerun the command with --overwrite (with --ray: the same command resumes it)"}


def _deterministic(err: Exception) -> bool:
    """Errors of the data or the run that a traceback would not help with."""
    from .data.errors import DataError
    from .train.fatal import NonFiniteLoss, RunStopped
    return isinstance(err, (DataError, RunStopped, NonFiniteLoss))


def _user_line(err: Exception) -> str:
    from .data.errors import user_line
    return user_line(err)


def build_parser():
    parser = argparse.ArgumentParser(prog="raytrain", description=__doc__)
    sub = parser.add_subparsers(dest="command")

    shard = sub.add_parser("shard", help="write WebDataset shards (one converter per source)")
    shard_sub = shard.add_subparsers(dest="source")
    converters = _converters()
    for name in converters.names():
        entry = converters.get(name)
        source = shard_sub.add_parser(name, help=entry.help, description=entry.help)
        entry.add_arguments(source)
        source.set_defaults(func=entry.run)

    train = sub.add_parser("train", help="train with Ray Train (DDP) from a YAML config")
    _config_args(train)
    train.set_defaults(func=cmd_train)

    tune = sub.add_parser("tune", help="hyperparameter search with Ray Tune + Optuna")
    _config_args(tune)
    tune.add_argument("--space", required=True, help="search space YAML, or a shipped one by name (tune/spaces: paper)")
    tune.add_argument("--trials", type=int, default=8)
    tune.add_argument("--resume", action="store_true", help="finish an interrupted experiment")
    tune.set_defaults(func=cmd_tune)

    ev = sub.add_parser("eval", help="evaluate checkpoints (3DPW / H36M protocols)")
    ev.add_argument("--checkpoint", help="a checkpoint directory (local, s3:// or gs://)")
    ev.add_argument("--experiment", help="a tune or train experiment directory (local, s3:// or gs://)")
    ev.add_argument("--best", action="store_true", help="with --experiment: the best trial(s)")
    ev.add_argument("--top", type=int, default=1)
    ev.add_argument("--data", required=True, help="shards to evaluate on")
    ev.add_argument("--out", default=None, help="report directory")
    ev.add_argument("--overwrite", action="store_true", help="replace the report a previous run wrote in --out")
    ev.add_argument("--config", default=None, help="config YAML to use instead of the checkpoint's own")
    ev.add_argument("--max-samples", type=int, default=0, help="evaluate at most this many persons (0: all)")
    ev.add_argument("--smpl-dir", default=None, help="SMPL files to score with (default: --config's "
                    "model.smpl_dir, else the synthetic body model; never the checkpoint's)")
    ev.set_defaults(func=cmd_eval)

    pr = sub.add_parser("predict", help="run a checkpoint on images, folders, globs, videos, s3 prefixes")
    from .predict.options import add_arguments
    add_arguments(pr)
    pr.set_defaults(func=cmd_predict)

    demo = sub.add_parser("demo", help="the whole story on synthetic data, on this machine")
    demo.add_argument("--out", default="runs/demo")
    demo.add_argument("--quick", action="store_true", help="a smaller run for smoke tests")
    demo.set_defaults(func=cmd_demo)

    study = sub.add_parser("study", help="the paper's claims, one or more seeds each, on a synthetic "
                           "benchmark (docs/study.md)")
    study.add_argument("--config", default=None, help="base config (default: study, i.e. configs/study.yaml)")
    study.add_argument("--space", default=None, help="variants file (default: study, i.e. tune/spaces/study.yaml)")
    study.add_argument("--variants", default=None, help="comma-separated variant names (default: the four "
                       "claim variants cliff,m5,m5_cam,full)")
    study.add_argument("--seeds", type=int, default=None, help="seeds per variant (default 1; --quick: 2)")
    study.add_argument("--steps", type=int, default=None, help="training steps per run (default 10000; "
                       "--quick: 2)")
    study.add_argument("--parallel", type=int, default=None, help="runs at a time, one process and core each "
                       "(default 2; --quick: 1, in this process)")
    study.add_argument("--out", default="docs/study", help="results.json, table.md, study.png go here")
    study.add_argument("--work", default="runs/study", help="shards and run directories")
    study.add_argument("--quick", action="store_true", help="tiny splits, 2 steps, 3 variants: a smoke test")
    study.add_argument("--heading", type=float, default=None, help="people face the camera within "
                       "+- this many degrees (default 30; 180: any heading, the hard benchmark)")
    study.add_argument("--pose-scale", type=float, default=None, help="body joints uniform in this "
                       "fraction of their limits (default 0.3; the hard benchmark: 0.6)")
    study.add_argument("--device", default="cpu", help="torch device of every run (cuda: one GPU shared by "
                       "the --parallel runs)")
    study.add_argument("overrides", nargs="*", help="dotted overrides of the base config")
    study.set_defaults(func=cmd_study)

    bench = sub.add_parser("bench", help="benchmarks (results go to BENCHMARKS.md)")
    bench.add_argument("what", choices=["data", "train", "gpu", "infer"])
    bench.add_argument("--json", action="store_true", help="print one JSON object")
    bench.add_argument("--quick", action="store_true", help="finish within a minute")
    bench.add_argument("--device", default=None, help="gpu: torch device (default: cuda)")
    bench.add_argument("--out", default="runs/bench_gpu.json", help="gpu: JSON file to write")
    bench.set_defaults(func=cmd_bench)

    doctor = sub.add_parser("doctor", help="check the environment and say what is missing")
    doctor.add_argument("--config", default=None)
    doctor.add_argument("--smpl-dir", default=None)
    doctor.set_defaults(func=cmd_doctor)
    return parser


def _config_args(p):
    p.add_argument("--config", required=True, help="experiment YAML, or a shipped one by name (configs: r50_paper)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.backbone=hrnet_w48")


def _converters():
    """The converter registry, with the synthetic source (library code never imports it)."""
    from .data.convert.sources import CONVERTERS, ShardSource
    if "synthetic" not in CONVERTERS:
        CONVERTERS.register("synthetic", ShardSource(
            help="render synthetic people with exact labels", add_arguments=_synthetic_args,
            run=cmd_shard_synthetic))
    return CONVERTERS


def _synthetic_args(synth):
    synth.add_argument("--out", required=True, help="output directory or s3://, gs:// URL")
    synth.add_argument("--n", type=int, default=1000, help="number of person samples")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--workers", type=int, default=1, help="parallel rendering processes")
    synth.add_argument("--maxcount", type=int, default=500, help="samples per shard")
    synth.add_argument("--full-frame", action="store_true", help="store full frames instead of context regions")
    synth.add_argument("--overwrite", action="store_true", help="replace a shard set already in --out")


def cmd_shard_synthetic(args):
    from .data.convert.common import ConversionError, prepare_output
    from .synthetic.people import shard_synthetic, with_storage
    try:
        prepare_output(args.out, args.overwrite)
    except ConversionError as err:
        raise ConfigError(str(err)) from None
    cfg = with_storage(None, "full") if args.full_frame else None
    shard_synthetic(args.out, n=args.n, seed=args.seed, workers=args.workers, maxcount=args.maxcount,
                    cfg=cfg)   # logs "wrote N samples in K shards to OUT"


def _load_config(args):
    """The command's config, with the synthetic body model where no SMPL files are given."""
    from .synthetic.body_model import with_default_body_model
    return with_default_body_model(load_config(args.config, args.overrides))


def cmd_train(args):
    from .train.launch import run_log_path, run_training
    from .train.run_identity import RunFinished
    cfg = _load_config(args)
    _log_to(run_log_path(cfg))
    try:
        result = run_training(cfg)
    except RunFinished as finished:  # nothing trained: say so, claim no result
        print(f"raytrain: {finished}", file=sys.stderr)
        return 0
    print(json.dumps({"metrics": _plain(result.metrics), "checkpoint": str(result.checkpoint.path)
                      if result.checkpoint else None}, indent=2))
    return 0 if result.error is None else 1


def cmd_tune(args):
    from .train.launch import run_log_path
    from .tuning.driver import run_tune
    from .tuning.experiment import experiment_dir
    cfg = _load_config(args)
    _log_to(run_log_path(cfg, experiment=experiment_dir(cfg)))
    run_tune(cfg, args.space, args.trials, resume=args.resume)


def cmd_eval(args):
    from .eval.run import run_eval
    smpl_dir = _smpl_dir(args, "eval", file=sys.stdout)
    run_eval(checkpoint=args.checkpoint, experiment=args.experiment, best=args.best, top=args.top,
             data=args.data, out=args.out, config=args.config, max_samples=args.max_samples,
             smpl_dir=smpl_dir, overwrite=args.overwrite)


def _smpl_dir(args, command: str, file=None) -> str:
    """--smpl-dir, else --config's model.smpl_dir, else the synthetic body model (printed to
    `file`, default stderr)."""
    smpl_dir, source = args.smpl_dir, "--smpl-dir"
    if smpl_dir is None and args.config:
        smpl_dir, source = load_config(args.config).model.smpl_dir, f"model.smpl_dir of {args.config}"
    if smpl_dir is None:
        from .synthetic.body_model import default_body_model_dir
        smpl_dir, source = str(default_body_model_dir()), "the synthetic body model"
    print(f"[{command}] body model: {smpl_dir} ({source})", file=file or sys.stderr, flush=True)
    return smpl_dir


def cmd_predict(args):
    from .predict.run import PredictOptions, run_predict
    opts = PredictOptions.from_args(args)
    opts.check()
    opts.smpl_dir = _smpl_dir(args, "predict")
    if opts.ray:
        from .predict.ray import run_predict_ray
        run_predict_ray(opts)
    else:
        run_predict(opts)
    return 0


def cmd_demo(args):
    from pathlib import Path

    from .apps.demo import run_demo
    _log_to(Path(args.out).resolve() / "demo.log")
    run_demo(args.out, quick=args.quick)


def cmd_study(args):
    from .apps.study import run_study
    variants = [v.strip() for v in args.variants.split(",") if v.strip()] if args.variants else None
    if any(value is not None and value < 1 for value in (args.seeds, args.steps, args.parallel)):
        raise ConfigError("--seeds, --steps and --parallel must be at least 1")
    run_study(config=args.config, space=args.space, variants=variants, seeds=args.seeds, steps=args.steps,
              out=args.out, work=args.work, parallel=args.parallel, quick=args.quick,
              overrides=tuple(args.overrides), device=args.device, heading_deg=args.heading,
              pose_scale=args.pose_scale)


def cmd_bench(args):
    if args.what == "data":
        from .bench.data import run_data_bench as bench
    elif args.what == "gpu":
        from .bench.gpu import run_gpu_bench
        bench = functools.partial(run_gpu_bench, device=args.device, out=args.out)
    elif args.what == "infer":
        from .bench.infer import run_infer_bench as bench
    else:
        from .bench.train import run_train_bench as bench
    if args.json:  # stdout carries the JSON object alone; progress goes to stderr
        with contextlib.redirect_stdout(sys.stderr):
            result = bench(quick=args.quick)
        print(json.dumps(result))
    else:
        print(json.dumps(bench(quick=args.quick), indent=2))


def cmd_doctor(args):
    from .apps.doctor import run_doctor
    return run_doctor(config=args.config, smpl_dir=args.smpl_dir)


def _log_to(path):
    """The run's log file; says once where it and Ray's own logs are."""
    from .console import add_log_file
    log.info("[raytrain] log: %s (Ray's own processes: /tmp/ray/session_latest/logs)", add_log_file(path))


def _plain(metrics):
    return {k: v for k, v in (metrics or {}).items() if isinstance(v, (int, float, str))}


if __name__ == "__main__":
    sys.exit(main())
