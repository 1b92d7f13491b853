"""A trial's model, exported: the best checkpoint of a study copied into a self-contained
model directory whose card names the study, the trial, how it was chosen and its data."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import yaml

from mtbert.config import build_config
from mtbert.errors import MtbertError
from mtbert.modeldir import WEIGHTS, model_card


def export_trial(trial, *, study: str, storage: str, dest: Path,
                 selection: dict[str, Any] | None = None) -> Path:
    """Copy a trial's best checkpoint into `dest`, with a model card naming its source
    (and `selection`: how the trial was chosen, e.g. from a configuration's seeds)."""
    checkpoint = Path(trial.user_attrs.get("checkpoint", ""))
    if not (checkpoint / WEIGHTS).exists():
        raise MtbertError(f"trial {trial.number} has no checkpoint at {checkpoint} (only the "
                          "top --keep-top trials keep theirs; was it run on another machine?)")
    dest = Path(dest)
    if dest.exists() and any(dest.iterdir()):
        raise MtbertError(f"{dest} exists and is not empty; export into a new directory")
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(checkpoint, dest, dirs_exist_ok=True)
    config = build_config(yaml.safe_load((dest / "config.yaml").read_text()))
    metrics = json.loads((dest / "metrics.json").read_text())
    summary_file = checkpoint.parent / "summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.exists() else {}
    card = {"source": {"study": study, "trial": trial.number, "storage": storage,
                       "run": str(checkpoint.parent), **(selection or {})},
            "params": trial.params, "data": summary.get("data"), "env": summary.get("env")}
    (dest / "README.md").write_text(model_card(config, metrics, card))
    return dest


