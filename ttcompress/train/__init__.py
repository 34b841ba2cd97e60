"""Finetuning: cross-entropy + orthogonal loss under singular-value control, with devices, AMP, DDP and resume.

    from ttcompress import load
    from ttcompress.train import FinetuneConfig, finetune

    loaded = load("r20-tt.safetensors")
    config = FinetuneConfig.from_recipe(None, data="cifar10", steps=200, clip_to=1.0)
    result = finetune(loaded, config, out_path="r20-ft.safetensors")

The pieces, one idea per module:

* :mod:`~ttcompress.train.config` — every setting (typed; recipe and keyword coercion, validation);
  :mod:`~ttcompress.train.recipes` — recipe files; :mod:`~ttcompress.train.schedule` — learning-rate schedules;
* :mod:`~ttcompress.train.loss` — the objective (**add a loss term here**);
* :mod:`~ttcompress.train.state` — the run state: what is saved and resumed, and every file the run writes;
* :mod:`~ttcompress.train.loop` — ``train_step`` and the loop; :mod:`~ttcompress.train.hooks` — what runs around
  each step: divergence guard, control, CSV / TensorBoard logs, progress, saving (**add a logged metric here**);
* :mod:`~ttcompress.train.finalize` — verify → recalibrate BatchNorm → evaluate;
* :mod:`~ttcompress.train.finetune` — :func:`finetune`, which sets a run up and puts these together;
* :mod:`~ttcompress.train.distributed` — data-parallel runs under ``torchrun``.

Control methods live in :mod:`ttcompress.control`.
"""

from ttcompress.train.config import FinetuneConfig
from ttcompress.train.finalize import recalibrate_bn
from ttcompress.train.finetune import FinetuneResult, finetune
from ttcompress.train.recipes import find_recipe
from ttcompress.train.schedule import lr_factor, parse_schedule
from ttcompress.train.state import LOG_COLUMNS, run_paths

__all__ = ["LOG_COLUMNS", "FinetuneConfig", "FinetuneResult", "find_recipe", "finetune", "lr_factor",
           "parse_schedule", "recalibrate_bn", "run_paths"]
