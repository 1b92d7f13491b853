"""Self-contained model directories: writing them, loading them, predicting with them.

A model directory holds `config.yaml` (the resolved run config),
`encoder_config.json` (the BERT architecture, so no source checkpoint is
needed), `model.safetensors` (encoder and heads), the tokenizer files,
`metrics.json` and a `README.md` model card.
"""

from __future__ import annotations

import dataclasses

import json
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import yaml
from safetensors.torch import load_file, save_file

from mtbert.config import RunConfig, build_config, save_config
from mtbert.data import EncodedSet, Examples, FileStats, tokenize_cached
from mtbert.encoder import BertConfig, BertEncoder, to_hf_state_dict
from mtbert.errors import MtbertError
from mtbert.evaluate import SetOutputs, predict_set, predict_set_outputs
from mtbert.heads import MultitaskModel
from mtbert.tasks import RegressionTask, get_task
from mtbert.tokenize import Tokenizer

WEIGHTS = "model.safetensors"
ENCODER_CONFIG = "encoder_config.json"
HF_ENCODER = "encoder"


def save_model_dir(directory: Path, *, model: MultitaskModel, config: RunConfig,
                   tokenizer: Tokenizer, metrics: dict[str, float],
                   card: dict[str, Any]) -> None:
    """Write a model directory; the old one is replaced only once the new one is complete."""
    directory = Path(directory)
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_config(config, tmp / "config.yaml")
    (tmp / ENCODER_CONFIG).write_text(json.dumps(model.encoder.config.to_hf_dict(), indent=2))
    state = {k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(tmp / WEIGHTS), metadata={"format": "pt", "producer": "mtbert"})
    for path in tokenizer.files():
        shutil.copy(path, tmp / path.name)
    (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2))
    (tmp / "README.md").write_text(model_card(config, metrics, card))
    old = directory.with_name(directory.name + ".old")
    if directory.exists():
        shutil.rmtree(old, ignore_errors=True)
        directory.rename(old)
    tmp.rename(directory)
    shutil.rmtree(old, ignore_errors=True)


def model_card(config: RunConfig, metrics: dict[str, float], card: dict[str, Any]) -> str:
    """A short README.md: source, parameters, dev metrics, data and versions."""
    lines = ["# mtbert multitask model", "",
             f"Written {datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC} by mtbert.", ""]
    if card.get("source"):
        lines += ["## Source", ""] + [f"- {k}: {v}" for k, v in card["source"].items()] + [""]
    lines += ["## Dev metrics", "", "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {v:.4f} |" for k, v in metrics.items()]
    if card.get("params"):
        lines += ["", "## Parameters", ""]
        lines += [f"- `{k}`: {v}" for k, v in card["params"].items()]
    m, t = config.model, config.train
    lines += ["", "## Model", "",
              f"- encoder: `{m.encoder}`, tasks: {', '.join(config.data.tasks)}",
              f"- pooling {m.pooling}, pooler {m.pooler}, pairs {m.pair_encoding}, "
              f"head hidden {m.head_hidden}, STS head {m.sts_head}, "
              f"STS output {m.sts_output}",
              f"- schedule {t.schedule}, loss {config.loss.method}, lr {t.lr}, "
              f"batch {t.batch_size}, epochs {t.epochs}, seed {t.seed}"]
    if card.get("data"):
        lines += ["", "## Data", "", "| split | file | rows | skipped | sha256 |", "|---|---|---|---|---|"]
        lines += [f"| {k} | {d['file']} | {d['rows']} | {d['skipped']} | {d['sha256'][:12]} |"
                  for k, d in card["data"].items()]
    if card.get("env"):
        lines += ["", "## Versions", ""] + [f"- {k}: {v}" for k, v in card["env"].items()]
    lines += ["", "## Use", "", "```python", "import mtbert",
              "m = mtbert.load(\"THIS_DIR\")", "m.predict(\"sst\", [\"a fine film\"])",
              "m.predict(\"sts\", [(\"a man plays\", \"a person plays\")])", "```",
              "", "or `mtbert eval THIS_DIR` and `mtbert predict THIS_DIR --task sst ...`.", ""]
    return "\n".join(lines)


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


def export_hf_encoder(model_dir: Path, dest: Path | None = None) -> Path:
    """Write a model directory's fine-tuned encoder as a Hugging Face BERT checkpoint:
    config.json, model.safetensors under BertModel's names, and the tokenizer files, so
    that `transformers.AutoModel.from_pretrained(dest)` loads it (default
    MODEL_DIR/encoder). The task heads stay behind: they have no Hugging Face class."""
    model_dir = Path(model_dir)
    for name in (ENCODER_CONFIG, WEIGHTS):
        if not (model_dir / name).exists():
            raise MtbertError(f"{model_dir} is not an mtbert model directory (no {name})")
    dest = Path(dest) if dest is not None else model_dir / HF_ENCODER
    bert = BertConfig.from_dict(json.loads((model_dir / ENCODER_CONFIG).read_text()))
    encoder = BertEncoder(bert)
    state = load_file(str(model_dir / WEIGHTS))
    encoder.load_state_dict({k.removeprefix("encoder."): v for k, v in state.items()
                             if k.startswith("encoder.")}, strict=True)
    return write_hf_encoder(encoder, Tokenizer(model_dir), dest)


def write_hf_encoder(encoder: BertEncoder, tokenizer: Tokenizer, dest: Path,
                     extra: dict[str, torch.Tensor] | None = None) -> Path:
    """An encoder as a Hugging Face BERT directory (config.json, model.safetensors under
    BertModel's names, tokenizer files), which `model.encoder=DEST` loads. `extra` are
    further tensors under their Hugging Face names, e.g. the `cls.predictions.*` MLM head."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "config.json").write_text(json.dumps(encoder.config.to_hf_dict(), indent=2))
    state = {k: v.detach().float().cpu().contiguous()
             for k, v in {**to_hf_state_dict(encoder), **(extra or {})}.items()}
    save_file(state, str(dest / WEIGHTS), metadata={"format": "pt"})
    for path in tokenizer.files():
        shutil.copy(path, dest / path.name)
    return dest


class MultitaskPredictor:
    """A loaded model directory: `predict(task, texts)` and dataset helpers."""

    def __init__(self, directory: Path, device: str | torch.device = "cpu"):
        self.directory = Path(directory)
        for name in ("config.yaml", ENCODER_CONFIG, WEIGHTS):
            if not (self.directory / name).exists():
                raise MtbertError(f"{self.directory} is not an mtbert model directory "
                                  f"(no {name}); export one with `mtbert train` or "
                                  "`mtbert best --export`")
        self.config = build_config(yaml.safe_load((self.directory / "config.yaml").read_text()))
        bert = BertConfig.from_dict(json.loads((self.directory / ENCODER_CONFIG).read_text()))
        self.tasks = {name: get_task(name, score_head=self.config.model.sts_head)
                      for name in self.config.data.tasks}
        self.device = torch.device(device)
        self.model = MultitaskModel(BertEncoder(bert), list(self.tasks.values()),
                                    self.config.model)
        self.model.load_state_dict(load_file(str(self.directory / WEIGHTS)), strict=True)
        self.model.to(self.device).eval()
        self.tokenizer = Tokenizer(self.directory)
        metrics_file = self.directory / "metrics.json"
        self.metrics = json.loads(metrics_file.read_text()) if metrics_file.exists() else {}

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
