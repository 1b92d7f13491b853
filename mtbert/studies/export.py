"""A trial's model, exported: the best checkpoint of a study copied into a self-contained
model directory whose card names the study, the trial, how it was chosen and its data.

The checkpoint is loaded (every tensor, every shape against its config) before
anything is written, and the export is built in a temporary directory beside
the target and renamed into place when complete: a failed export leaves
nothing behind, and running it again works. With W&B settings the finished
directory is also logged as a W&B model artifact next to the study's trial
runs (`log_export`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from mtbert.config import build_config
from mtbert.errors import MtbertError
from mtbert.formatting import first_line
from mtbert.modeldir import HF_ENCODER, WEIGHTS, export_hf_encoder, model_card
from mtbert.rundir import naming, read_summary
from mtbert.safeyaml import load_yaml
from mtbert.studies.configurations import config_of
from mtbert.studies.job import CHECKPOINT, WANDB_RUN_ID, WandbSettings
from mtbert.tasks import METRIC_KEYS

log = logging.getLogger("mtbert")


def check_checkpoint(checkpoint: Path, number: int) -> None:
    """Load the model directory as `mtbert.load` would: a truncated or damaged checkpoint
    is refused before it is copied anywhere."""
    from mtbert.predictor import MultitaskPredictor

    try:
        MultitaskPredictor(checkpoint, "cpu")
    except MtbertError as err:
        raise MtbertError(f"trial {number}'s checkpoint at {checkpoint} cannot be exported: "
                          f"{err}") from None
    except (OSError, RuntimeError, ValueError, KeyError) as err:  # safetensors, torch
        raise MtbertError(f"trial {number}'s checkpoint at {checkpoint} is damaged: "
                          f"{first_line(err)}") from None


def export_trial(trial, *, study: str, storage: str, dest: Path,
                 selection: dict[str, Any] | None = None, hf: bool = False,
                 seeds: list[int | None] | None = None,
                 wandb: WandbSettings | None = None) -> Path:
    """Copy a trial's best checkpoint into `dest`, with a model card naming its source
    (and `selection`: how the trial was chosen, e.g. from a configuration's seeds); with
    `hf`, also the encoder in Hugging Face format under dest/encoder; with `wandb`, then
    log it as a W&B model artifact (`seeds`: of the configuration's seed runs when it was
    chosen by mean over seeds; default: the trial's)."""
    checkpoint = Path(trial.user_attrs.get(CHECKPOINT, ""))
    if not (checkpoint / WEIGHTS).exists():
        raise MtbertError(f"trial {trial.number} has no checkpoint at {checkpoint} (only the "
                          "top --keep-top trials keep theirs; was it run on another machine?)")
    dest = Path(dest)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise MtbertError(f"{dest} exists and is not empty; export into a new directory")
    check_checkpoint(checkpoint, trial.number)
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(f".{dest.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        with naming(dest, partial=partial):  # a full disk: one line naming dest
            config = _build(checkpoint, partial, card={
                "source": {"study": study, "trial": trial.number, "storage": storage,
                           "run": str(checkpoint.parent), **(selection or {})},
                "params": trial.params}, hf=hf)
        if dest.exists():
            dest.rmdir()  # empty, checked above
        partial.rename(dest)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    if wandb is not None:
        log_export(dest, trial, study=study, wandb=wandb, selection=selection,
                   seeds=seeds if seeds is not None else [config.train.seed])
    return dest


def _build(checkpoint: Path, partial: Path, *, card: dict[str, Any], hf: bool):
    """The export in `partial`: the checkpoint, its card (with the run's data and versions
    where its summary.json is readable), the HF encoder with `hf`; returns its config."""
    shutil.copytree(checkpoint, partial)
    config = build_config(load_yaml((partial / "config.yaml").read_text(encoding="utf-8"),
                                    str(partial / "config.yaml")))
    metrics = json.loads((partial / "metrics.json").read_text(encoding="utf-8"))
    summary = read_summary(checkpoint.parent) or {}  # damaged: a warning names it
    card = {**card, "data": summary.get("data"), "env": summary.get("env")}
    (partial / "README.md").write_text(model_card(config, metrics, card), encoding="utf-8")
    if hf:
        export_hf_encoder(partial, partial / HF_ENCODER)
    return config


def log_export(model_dir: Path, trial, *, study: str, wandb: WandbSettings,
               seeds: list[int | None], selection: dict[str, Any] | None = None) -> str | None:
    """Log an exported model directory as the W&B model artifact `<study>-model`, aliases
    `best` and `trial-N`, in a run of job type `export` in the study's group; its metadata
    names the trial, its parameters, its metrics (at its best evaluation) and `seeds`.
    Returns the run id; W&B disabled or failing logs no artifact and is no error."""
    from mtbert.tracking import log_model_artifact

    if wandb.mode == "disabled":
        log.warning("W&B is disabled (--wandb-mode or $WANDB_MODE): no model artifact logged")
        return None
    config_id = config_of(trial)
    metadata = {"study": study, "trial": trial.number, "config_id": config_id,
                "params": trial.params,
                "metrics": {k: trial.user_attrs[k] for k in METRIC_KEYS
                            if k in trial.user_attrs},
                "seeds": seeds, "wandb_run_id": trial.user_attrs.get(WANDB_RUN_ID),
                **({"selection": selection} if selection else {})}
    name = f"{study}-model"
    run_id = log_model_artifact(
        model_dir, mode=wandb.mode, project=wandb.project, group=study,
        run_name=f"{study}-export-trial-{trial.number}", artifact=name,
        aliases=["best", f"trial-{trial.number}"], metadata=metadata,
        directory=Path(wandb.dir))
    if run_id:
        log.info("W&B: model artifact %s:best in run %s of group %s (%s)", name, run_id, study,
                 wandb.mode)
    return run_id
