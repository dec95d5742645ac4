"""Person-specific lip-sync from the user's own video: one command over data/ and train/.

    python -m talkformer_core.finetune --video V.mp4 --out person.safetensors [...]

One concern a module: ``presets`` (the preset names and the config each names), ``run`` (the run:
inputs, budget, resume, both training stages, the mouth model), ``holdout`` (scoring on held-out
frames against the baselines), ``dubbing`` (the dubbing report), ``cli`` (the command line).
The public names are re-exported here.
"""
from .cli import build_parser, main
from .dubbing import DUB_ROWS, DUB_TABLE_HEADER, dubbing_report, dubbing_table_rows, format_dubbing
from .holdout import (METHODS, HoldoutData, baselines, format_report, generate, holdout_report, load_holdout,
                      reference_frame, report_table, score, verdicts)
from .presets import PRESETS, finetune_config
from .run import (FinetuneResult, finetune, fit_mouth_model, mouth_training_data, state_path, validate_inputs,
                  work_dir_for)

__all__ = ["DUB_ROWS", "DUB_TABLE_HEADER", "METHODS", "PRESETS", "FinetuneResult", "HoldoutData", "baselines", "build_parser",
           "dubbing_report", "dubbing_table_rows", "finetune", "finetune_config", "fit_mouth_model", "format_dubbing", "format_report",
           "generate", "holdout_report", "load_holdout", "main", "mouth_training_data", "reference_frame",
           "report_table", "score", "state_path", "validate_inputs", "verdicts", "work_dir_for"]
