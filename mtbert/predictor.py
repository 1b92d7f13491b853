"""Loading a model directory and predicting with it: `mtbert.load(DIR).predict(...)`,
`mtbert eval` and `mtbert predict` (one file, or every dev and test file).

Nothing here imports the training loop or the study stack: evaluating and
predicting need the model, the tokenizer and the task files only.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import yaml
from safetensors.torch import load_file

from mtbert.config import build_config
from mtbert.data import EncodedSet, Examples, FileStats, tokenize_cached
from mtbert.encoder import BertConfig, BertEncoder
from mtbert.errors import MtbertError
from mtbert.evaluate import SetOutputs, predict_set, predict_set_outputs
from mtbert.heads import MultitaskModel
from mtbert.modeldir import ENCODER_CONFIG, WEIGHTS
from mtbert.tasks import RegressionTask, get_task
from mtbert.tokenize import Tokenizer


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
