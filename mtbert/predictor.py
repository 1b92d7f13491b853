"""Loading a model directory and predicting with it: `mtbert.load(DIR).predict(...)`,
`mtbert eval` and `mtbert predict` (one file, or every dev and test file).

Nothing here imports the training loop or the study stack: evaluating and
predicting need the model, the tokenizer and the task files only.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from mtbert.config import RunConfig, build_config, read_yaml
from mtbert.data import EncodedSet, Examples, FileStats, tokenize_cached
from mtbert.encoder import BertConfig, BertEncoder
from mtbert.errors import ConfigError, EncoderError, MtbertError
from mtbert.evaluate import SetOutputs, predict_set, predict_set_outputs
from mtbert.formatting import first_line
from mtbert.heads import MultitaskModel
from mtbert.modeldir import ENCODER_CONFIG, WEIGHTS
from mtbert.tasks import RegressionTask, get_task
from mtbert.tokenize import Tokenizer

log = logging.getLogger("mtbert")

# Bounds of encoder_config.json's sizes, so that a corrupt file cannot make even the
# shape check (a model on the meta device) build millions of layers; BERT-large is
# 24 layers, hidden 1024, vocabulary 30522.
_ENCODER_LIMITS = {"vocab_size": (1, 10_000_000), "hidden_size": (1, 65536),
                   "num_hidden_layers": (0, 1024), "num_attention_heads": (1, 4096),
                   "intermediate_size": (1, 1_000_000), "max_position_embeddings": (1, 1_000_000),
                   "type_vocab_size": (1, 1024), "pad_token_id": (0, 10_000_000)}


def _broken(path: Path, what: str) -> MtbertError:
    return MtbertError(f"{path} {what}; export the model again with `mtbert train` or "
                       "`mtbert best --export`")


def _read_run_config(path: Path) -> RunConfig:
    data = read_yaml(path)  # ConfigError naming the file: not YAML, not a mapping, unreadable
    if not data:
        raise _broken(path, "is empty")
    try:
        return build_config(data)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None


def _read_encoder_config(path: Path) -> BertConfig:
    try:
        data = json.loads(path.read_bytes())
    except UnicodeDecodeError:
        raise _broken(path, "is not UTF-8 text") from None
    except json.JSONDecodeError as err:
        raise _broken(path, f"is not valid JSON (line {err.lineno}: {err.msg})") from None
    if not isinstance(data, dict):
        raise _broken(path, "must hold a JSON object of BERT sizes")
    for key, (low, high) in _ENCODER_LIMITS.items():
        value = data.get(key, getattr(BertConfig, key))
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise _broken(path, f"has {key} {_short(repr(value))}; valid: an integer in "
                                f"{low}..{high}")
    for key in ("layer_norm_eps", "hidden_dropout_prob", "attention_probs_dropout_prob"):
        value = data.get(key, getattr(BertConfig, key))
        if (isinstance(value, bool) or not isinstance(value, (int, float))
                or not math.isfinite(value) or not 0 <= value < 1):
            raise _broken(path, f"has {key} {_short(repr(value))}; valid: a number in [0, 1)")
    try:
        return BertConfig.from_dict(data)
    except EncoderError as err:
        raise EncoderError(f"{path}: {err}") from None


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except SafetensorError as err:
        raise _broken(path, f"is not a readable safetensors file ({_short(first_line(err))})"
                      ) from None


def _fitting_model(directory: Path, bert: BertConfig, tasks: list, config: RunConfig,
                   state: dict[str, torch.Tensor]) -> MultitaskModel:
    """The model of the sizes in encoder_config.json and config.yaml, once the weights are
    known to fit it: every key and shape is compared on a model on the meta device first
    (no memory), so a mismatch is one line naming the keys, not a failed allocation or
    load_state_dict's page of text."""
    with torch.device("meta"):
        skeleton = MultitaskModel(BertEncoder(bert), tasks, config.model)
    expected = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    misshaped = [f"{k} {tuple(state[k].shape)} (expected {expected[k]})"
                 for k in expected if k in state and tuple(state[k].shape) != expected[k]]
    problems = [f"{label} {', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''}"
                for label, keys in (("missing", missing), ("unexpected", unexpected),
                                    ("misshaped", misshaped)) if keys]
    if problems:
        raise _broken(directory / WEIGHTS, f"does not fit {ENCODER_CONFIG} and config.yaml: "
                      + "; ".join(problems))
    return MultitaskModel(BertEncoder(bert), tasks, config.model)


def _read_tokenizer(directory: Path) -> Tokenizer:
    try:
        return Tokenizer(directory)
    except MtbertError:
        raise
    except Exception as err:  # noqa: BLE001 - the tokenizers library raises plain Exception
        raise _broken(directory, f"has tokenizer files that cannot be read "
                                 f"({_short(first_line(err))})") from None


def _read_metrics(path: Path) -> dict:
    if not path.exists():
        return {}
    try:
        metrics = json.loads(path.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise _broken(path, "is not valid JSON") from None
    if not isinstance(metrics, dict):
        raise _broken(path, "must hold a JSON object of metrics")
    return metrics


def _short(text: str, limit: int = 80) -> str:
    """A short printable prefix of a value or message read from a file (it may hold
    anything)."""
    shown = "".join(c if c.isprintable() else "?" for c in text[:limit])
    return shown + ("..." if len(text) > limit else "")


class MultitaskPredictor:
    """A loaded model directory: `predict(task, texts)` and dataset helpers."""

    def __init__(self, directory: Path, device: str | torch.device = "cpu"):
        self.directory = Path(directory)
        if not self.directory.is_dir():
            what = "a file" if self.directory.exists() else "not there"
            raise MtbertError(f"{self.directory} is not an mtbert model directory: it is {what}")
        for name in ("config.yaml", ENCODER_CONFIG, WEIGHTS):
            if not (self.directory / name).is_file():
                raise MtbertError(f"{self.directory} is not an mtbert model directory "
                                  f"(no {name}); export one with `mtbert train` or "
                                  "`mtbert best --export`")
        # Each file is checked as it is read: a broken one is one line naming it.
        self.config = _read_run_config(self.directory / "config.yaml")
        bert = _read_encoder_config(self.directory / ENCODER_CONFIG)
        self.tasks = {name: get_task(name, score_head=self.config.model.sts_head)
                      for name in self.config.data.tasks}
        self.device = torch.device(device)
        state = _read_weights(self.directory / WEIGHTS)
        self.model = _fitting_model(self.directory, bert, list(self.tasks.values()),
                                    self.config, state)
        self.model.load_state_dict(state, strict=True)
        self.model.to(self.device).eval()
        self.tokenizer = _read_tokenizer(self.directory)
        self.metrics = _read_metrics(self.directory / "metrics.json")

    def task(self, name: str):
        if name not in self.tasks:
            raise MtbertError(f"this model has no '{name}' head; its tasks: "
                              f"{', '.join(self.tasks)}")
        return self.tasks[name]

    def encode(self, examples: Examples, indices: np.ndarray | None = None) -> EncodedSet:
        # The model's own variant of the task decides outputs (model.sts_head), whichever
        # registry entry the rows were read with.
        examples = dataclasses.replace(examples, task=self.task(examples.task.name))
        columns = tokenize_cached(examples, self.tokenizer, cache_dir=None)
        return EncodedSet(examples, columns, self.tokenizer,
                          max_length=self.config.model.max_length,
                          siamese=self.config.model.pair_encoding == "siamese", indices=indices)

    def predict_examples(self, examples: Examples, batch_size: int = 64, *,
                         progress: bool = False) -> np.ndarray:
        """Class ids or scores of every example, in order (what prediction files hold)."""
        return predict_set(self.model, self.encode(examples), batch_size=batch_size,
                           device=self.device, progress=progress)

    def predict_outputs(self, examples: Examples, batch_size: int = 64, *,
                        progress: bool = False) -> SetOutputs:
        """Predictions plus, for a classification task, the class probabilities (N, classes):
        for qqp, column 1 is the probability of a paraphrase."""
        return predict_set_outputs(self.model, self.encode(examples), batch_size=batch_size,
                                   device=self.device, progress=progress)

    def predict(self, task: str, inputs: Sequence[str | Sequence[str]],
                batch_size: int = 64) -> list:
        """Class ids (sst), 0/1 (qqp) or scores (sts) for sentences or sentence pairs."""
        spec = self.task(task)
        texts = [(x,) if isinstance(x, str) else tuple(x) for x in inputs]
        for text in texts:
            if len(text) != len(spec.text_columns):
                raise MtbertError(f"task {task} takes {len(spec.text_columns)} text(s) per "
                                  f"example, got {len(text)}: {text!r}")
        examples = Examples(spec, [str(i) for i in range(len(texts))], texts, None,
                            FileStats("<memory>", "", len(texts), 0), "")
        values = self.predict_examples(examples, batch_size)
        return [float(v) if isinstance(spec, RegressionTask) else int(v) for v in values]


def load(directory: str | Path, device: str | torch.device = "cpu") -> MultitaskPredictor:
    """Load an exported model directory: `mtbert.load(DIR).predict("sst", [...])`."""
    return MultitaskPredictor(Path(directory), device)


def model_data_dir(model: MultitaskPredictor, data_dir: Path | None) -> Path:
    """Where a model's task files are: `data_dir`, else $MTBERT_DATA_DIR, else the model's
    saved data.dir (it may come from another machine, so that is the last resort), else
    the default."""
    import os

    from mtbert.config import RunConfig
    from mtbert.config import data_dir as default_data_dir

    config = RunConfig() if os.environ.get("MTBERT_DATA_DIR") else model.config
    return data_dir or default_data_dir(config)


def dev_files(model: MultitaskPredictor, data_dir: Path | None) -> dict[str, Path]:
    """The dev file of each of the model's tasks."""
    root = model_data_dir(model, data_dir)
    return {name: root / model.config.data.files[name]["dev"] for name in model.tasks}


def score_files(model: MultitaskPredictor, files: dict[str, Path], *,
                overall: bool) -> dict[str, float]:
    """The metric of each task on its labelled file (task -> path); with `overall`, the
    overall scores too (`mtbert eval`)."""
    from mtbert.data import read_examples
    from mtbert.tasks import overall_scores

    metrics = {}
    for name, path in files.items():
        spec = model.task(name)
        examples = read_examples(path, spec)
        if not examples.ids:
            raise MtbertError(f"{path} has no valid {name} rows to score")
        metrics[spec.metric_key] = spec.score(model.predict_examples(examples), examples.labels)
        log.info("%s: %d examples scored, %d rows skipped", path, len(examples.ids),
                 examples.stats.skipped)
    if overall:
        metrics.update(overall_scores(metrics))
    return metrics


def predict_file(model: MultitaskPredictor, task: str, source: Path, dest: Path, *,
                 progress: bool = False) -> int:
    """Predictions for every valid row of `source` into `dest` (CS224N format); returns
    how many were written."""
    from mtbert.data import read_examples
    from mtbert.evaluate import write_predictions

    spec = model.task(task)
    # Test files carry no labels; dev labels are not needed to predict either.
    examples = read_examples(source, spec, labelled=False)
    if not examples.ids:
        raise MtbertError(f"{source} has no valid {task} rows to predict "
                          f"({examples.stats.skipped} rows skipped)")
    predictions = model.predict_examples(examples, progress=progress)
    write_predictions(dest, spec, examples.ids, predictions)
    log.info("%s: %d predictions from %s (%d rows skipped)", dest, len(examples.ids),
             source, examples.stats.skipped)
    return len(examples.ids)


def predict_all(model: MultitaskPredictor, data_dir: Path | None, output_dir: Path, *,
                progress: bool = False) -> list[Path]:
    """The CS224N prediction files of every dev and test file of the model's tasks found
    in the data directory (`predict --all`); returns the files written."""
    root = model_data_dir(model, data_dir)
    jobs, missing = [], []
    for name, spec in model.tasks.items():
        for split in ("dev", "test"):
            path = root / model.config.data.files[name][split]
            (jobs if path.is_file() else missing).append((name, split, path))
    if not jobs:
        raise MtbertError(f"no dev or test file of the model's tasks in {root}; point "
                          "--data-dir at the task files")
    output_dir.mkdir(parents=True, exist_ok=True)
    for name, split, path in missing:
        log.info("missing: %s %s file %s; no %s", name, split, path,
                 model.tasks[name].output_file(split))
    written = []
    for name, split, path in jobs:
        target = output_dir / model.tasks[name].output_file(split)
        predict_file(model, name, path, target, progress=progress)
        written.append(target)
    log.info("%d prediction files written to %s, %d missing inputs", len(jobs), output_dir,
             len(missing))
    return written
