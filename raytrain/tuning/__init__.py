"""Hyperparameter search: Ray Tune + Optuna (TPE) + ASHA over full Ray Train runs.

    from raytrain.tuning import load_space, run_tune, export_best, ablation_table
"""
from .ablations import ablation_table, write_ablation_table
from .driver import TuneSettings, run_tune
from .experiment import experiment_dir
from .export import export_best, load_trials
from .space import SearchSpace, load_space

__all__ = ["SearchSpace", "TuneSettings", "ablation_table", "experiment_dir", "export_best",
           "load_space", "load_trials", "run_tune", "write_ablation_table"]
