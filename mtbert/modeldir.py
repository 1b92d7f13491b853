"""The model directory: the self-contained format every trained model is written in.

A model directory holds `config.yaml` (the resolved run config),
`encoder_config.json` (the BERT architecture, so no source checkpoint is
needed), `model.safetensors` (encoder and heads), the tokenizer files,
`metrics.json` and a `README.md` model card. `mtbert.predictor` loads it; this
module writes it, its card, and the encoder alone in Hugging Face format.
"""

from __future__ import annotations

import json
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from mtbert.config import RunConfig, save_config
from mtbert.encoder import BertConfig, BertEncoder, to_hf_state_dict
from mtbert.errors import MtbertError
from mtbert.heads import MultitaskModel
from mtbert.rundir import naming
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
    with naming(tmp, partial=tmp):  # a full disk: nothing half-written stays
        tmp.mkdir(parents=True)
        save_config(config, tmp / "config.yaml")
        (tmp / ENCODER_CONFIG).write_text(json.dumps(model.encoder.config.to_hf_dict(),
                                                     indent=2), encoding="utf-8")
        state = {k: v.detach().float().cpu().contiguous()
                 for k, v in model.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS), metadata={"format": "pt", "producer": "mtbert"})
        for path in tokenizer.files():
            shutil.copy(path, tmp / path.name)
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2), encoding="utf-8")
        (tmp / "README.md").write_text(model_card(config, metrics, card), encoding="utf-8")
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
    bert = BertConfig.from_dict(json.loads(
        (model_dir / ENCODER_CONFIG).read_text(encoding="utf-8")))
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
    written = [dest / "config.json", dest / WEIGHTS, *(dest / p.name for p in tokenizer.files())]
    try:
        with naming(dest):
            dest.mkdir(parents=True, exist_ok=True)
            written[0].write_text(json.dumps(encoder.config.to_hf_dict(), indent=2),
                                  encoding="utf-8")
            state = {k: v.detach().float().cpu().contiguous()
                     for k, v in {**to_hf_state_dict(encoder), **(extra or {})}.items()}
            save_file(state, str(dest / WEIGHTS), metadata={"format": "pt"})
            for path in tokenizer.files():
                shutil.copy(path, dest / path.name)
    except OSError:
        # A full disk: none of the encoder's files stay, so that the same command (or its
        # --resume, from a state saved beside them) runs again once there is space.
        for path in written:
            path.unlink(missing_ok=True)
        raise
    return dest


