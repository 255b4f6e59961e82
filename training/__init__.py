"""The training layer: everything between the entry points (train_caption.py, eval_caption.py) and the library
packages (models/, data/, metrics/), which never import it.

    config.py       load_config (defaults <- YAML <- --opt, validated; older layouts upgraded), config_changes,
                    prepare_output_dir
    inputs.py       check_inputs (every path and hub id, before anything is built), toy inputs on first use
    builders.py     build_captioner (model.family), build_optimizer, learning_rate
    loaders.py      the training loader over data.source (data/sources.py), the evaluation loader, the
                    resumable sampler, the training feature cache
    steps.py        what one batch contributes to the loss (teacher-forced objectives, SCST), accumulation
    loop.py         train_one_epoch
    evaluation.py   generate_captions, evaluate, run_evaluation
    checkpoints.py  training checkpoints and resume
    trainer.py      run_training: the flow that wires them

docs/architecture.md draws the flow.
"""
from .builders import build_captioner, build_optimizer, learning_rate
from .config import CONFIG_DEFAULTS, FREE_FORM_KEYS, USER_ERRORS, config_changes, load_config, prepare_output_dir
from .evaluation import (
    evaluate,
    evaluate_split,
    generate_captions,
    generation_options,
    run_evaluation,
    score,
    scoring_session,
    selection_score,
)
from .inputs import (
    build_toy_assets,
    check_inputs,
    check_scoring_inputs,
    fill_data_paths,
    metric_model_sources,
    resolve_data_paths,
)
from .loaders import ResumableSampler, TrainLoader, build_eval_loader, build_train_loader, cached_feature_dataset
from .loop import NonFiniteLossError, autocast_context, train_one_epoch
from .trainer import ensure_pretrained, run_training

__all__ = [
    "CONFIG_DEFAULTS", "FREE_FORM_KEYS", "USER_ERRORS", "NonFiniteLossError", "ResumableSampler", "TrainLoader",
    "autocast_context", "build_captioner", "build_eval_loader", "build_optimizer", "build_toy_assets",
    "build_train_loader", "cached_feature_dataset", "check_inputs", "config_changes", "check_scoring_inputs", "ensure_pretrained",
    "evaluate", "evaluate_split", "fill_data_paths", "generate_captions", "generation_options", "learning_rate",
    "load_config", "metric_model_sources", "prepare_output_dir", "resolve_data_paths", "run_evaluation",
    "run_training", "score", "scoring_session", "selection_score", "train_one_epoch",
]
