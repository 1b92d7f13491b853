"""The one typed run configuration: every key, its default and its meaning.

Configs are nested dataclasses. `load_config` merges, in order, the defaults,
a YAML file and `--set KEY=VALUE` overrides, then checks every key and value:
an unknown key or a bad value raises `ConfigError` naming it and what would be
valid. The resolved config is written next to every result (`config.yaml`).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from mtbert.errors import ConfigError
from mtbert.safeyaml import MAX_DEPTH, load_yaml, read_text, shown
from mtbert.rundir import naming
from mtbert.tasks import METRIC_KEYS, TASKS


# Seeds go to numpy, torch and CUDA generators; 32 bits is what all of them take.
SEED_MAX = 2**32 - 1
# Upper bounds of the size keys: far above any sensible run, low enough that a typo
# (an extra digit or two) is refused at once rather than as an out-of-memory error
# minutes into a run.
MAX_UNITS = 65536  # model.head_hidden, batch sizes
MAX_EPOCHS = 10_000
MAX_STEPS = 10_000_000
MAX_EXAMPLES = 1_000_000_000


def _opt(default: Any, help: str, **checks: Any) -> Any:
    """A config field with its documentation and value checks.

    Checks: `min`, `max` (numbers, or each number of a list or mapping; every float
    must also be finite), `choices` (a tuple, or the name of a registry), `unique` (a
    list names each item at most once).
    """
    meta = {"help": help, **checks}
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ModelConfig:
    encoder: str = _opt("minilm-l6", "Encoder checkpoint: 'minilm-l6' (offline default), a local "
                        "Hugging Face BERT directory, or a Hub id such as bert-base-uncased.")
    pooling: Literal["cls", "mean"] = _opt("cls", "Sentence embedding: the [CLS] vector or the "
                                           "mean of the token vectors.")
    pooler: Literal["shared", "per_task", "none"] = _opt(
        "shared", "Dense+tanh pooler on the embedding: BERT's own (shared by all heads), one "
        "per task head (initialised from BERT's), or none.")
    head_hidden: int = _opt(0, "Units of a hidden ReLU layer in each head (0 = linear head).",
                            min=0, max=MAX_UNITS)
    dropout: float = _opt(0.1, "Dropout before each head layer.", min=0.0, max=0.99)
    pair_encoding: Literal["concat", "siamese"] = _opt(
        "concat", "Pairs: one pass over '[CLS] a [SEP] b [SEP]' (concat) or one pass per "
        "sentence with features u, v, |u-v|, u*v (siamese).")
    siamese_cosine: bool = _opt(False, "Siamese only: add cos(u, v) to the pair features.")
    sts_output: Literal["raw", "clamp", "sigmoid"] = _opt(
        "sigmoid", "STS score of the regression head: the raw output, clamped to [0, 5], or "
        "5*sigmoid.")
    sts_head: Literal["regression", "cosine", "classes"] = _opt(
        "regression", "STS head: an MLP regressing the score (MSE); 5*cos(u, v) of the siamese "
        "embeddings, no weights (MSE, Sentence-BERT; needs pair_encoding=siamese); or 6 "
        "classes of the rounded score 0..5 (cross-entropy), predicting the expected score.")
    max_length: int = _opt(128, "Longest token sequence (pairs are truncated longest-first).",
                           min=8, max=512)


@dataclass
class DataConfig:
    dir: str | None = _opt(None, "Directory of the task files; else $MTBERT_DATA_DIR, else "
                           "~/.cache/mtbert/data.")
    tasks: list[str] = _opt(list(TASKS), "Tasks to train and evaluate (one task = single-task "
                            "training).", choices=tuple(TASKS), unique=True)
    files: dict[str, dict[str, str]] = _opt(
        {name: dict(task.files) for name, task in TASKS.items()},
        "File name per task and split, relative to data.dir.")
    max_train_examples: int = _opt(0, "Cap on training examples per task, a seeded random "
                                   "sample (0 = all).", min=0, max=MAX_EXAMPLES)
    max_eval_examples: int = _opt(0, "Cap on dev examples per task, a seeded random sample "
                                  "(0 = all).", min=0, max=MAX_EXAMPLES)
    cache_dir: str | None = _opt(None, "Token cache; else $MTBERT_CACHE_DIR, else "
                                 "~/.cache/mtbert/tokens.")


@dataclass
class TrainConfig:
    epochs: int = _opt(3, "Training epochs (an evaluation on dev after each).", min=1,
                       max=MAX_EPOCHS)
    steps_per_epoch: int = _opt(0, "Optimizer steps per epoch; 0 = one pass over all "
                                "training examples.", min=0, max=MAX_STEPS)
    batch_size: int = _opt(32, "Examples per batch (one task per batch).", min=1,
                           max=MAX_UNITS)
    eval_batch_size: int = _opt(128, "Examples per batch at evaluation.", min=1,
                                max=MAX_UNITS)
    lr: float = _opt(5e-5, "Peak learning rate of the encoder's top layer and the heads.",
                     min=0.0)
    seed: int = _opt(0, "Seed of sampling, shuffling, dropout and initialisation.", min=0,
                     max=SEED_MAX)
    schedule: str = _opt("round_robin_batch", "Task-sampling schedule.",
                         choices="schedules")
    alpha: float = _opt(1.0, "proportional: p_i proportional to N_i^alpha (1 = by size, "
                        "0 = uniform).", min=0.0)
    alpha_start: float = _opt(1.0, "annealed: alpha at the first epoch.", min=0.0)
    alpha_end: float = _opt(0.2, "annealed: alpha at the last epoch.", min=0.0)
    alpha_shape: Literal["linear", "cosine"] = _opt(
        "linear", "annealed: how alpha moves from alpha_start to alpha_end over the epochs.")
    temperature: float = _opt(2.0, "temperature: p_i proportional to N_i^(1/T) (1 = by size, "
                              "large = uniform).", min=1e-3)
    target_task: str = _opt("sts", "smart_round_robin: the task trained last in every epoch.",
                            choices=tuple(TASKS))
    triple_batch_truncate: bool = _opt(
        False, "triple_batch with full passes: end the pass with the smallest task instead "
        "of cycling the smaller tasks until the largest is done.")
    batches_per_step: int = _opt(
        1, "proportional, annealed, temperature: batches per optimizer step, the task of each "
        "drawn independently; the step's loss is their sum, so that sampling combines with "
        "loss weights, pcgrad and gradnorm. With steps_per_epoch 0 an epoch keeps its "
        "batches, in ceil(batches / this) steps.", min=1, max=MAX_UNITS)
    grad_accum: int = _opt(1, "Batches accumulated per optimizer step.", min=1,
                           max=MAX_UNITS)
    patience: int = _opt(0, "Stop after this many evaluations without improvement "
                         "(0 = never).", min=0, max=MAX_EPOCHS)
    select_metric: str = _opt("overall/geometric", "Metric that picks the best checkpoint.",
                              choices=METRIC_KEYS)
    log_every: int = _opt(10, "Optimizer steps between loss readings (progress bar).", min=1,
                          max=MAX_STEPS)
    log_grad_conflict_every: int = _opt(
        0, "Every this many optimizer steps, log the cosine similarity of each pair of task "
        "gradients on the shared encoder as grad_cos/<a>-<b> (0 = off).", min=0,
        max=MAX_STEPS)
    # Fast path: how batches reach the encoder (mtbert/fastpath.py).
    packing: Literal["auto", "packed", "padded"] = _opt(
        "auto", "Batches as packed real tokens (no padding) or padded to their longest "
        "member; auto = packed (faster on CPU, see bench/RESULTS.md), padded = the reference "
        "path.")
    packed_attention: Literal["auto", "grid", "nested", "varlen"] = _opt(
        "auto", "Attention kernel of packed batches: grid = one padded SDPA over a grid, "
        "nested = nested jagged SDPA, varlen = torch's varlen_attn (CUDA, torch >= 2.10, no "
        "attention dropout); auto = grid on every device until bench/gpu_check.py measures "
        "otherwise (mtbert/encoder.py).")
    bucket_by_length: bool = _opt(False, "Training batches of similar lengths (shuffled "
                                  "windows of 50 batches sorted by length), batch order "
                                  "shuffled; each example still once per pass.")


@dataclass
class OptimConfig:
    weight_decay: float = _opt(0.01, "AdamW weight decay (not on biases and LayerNorms).",
                               min=0.0)
    warmup: float = _opt(0.1, "Fraction of all steps with linear warm-up, then linear decay "
                         "to 0.", min=0.0, max=1.0)
    max_grad_norm: float = _opt(1.0, "Gradient clipping norm (0 = off).", min=0.0)
    layer_decay: float = _opt(1.0, "Layer-wise LR decay xi: layer l gets lr*xi^(L-l), "
                              "embeddings lr*xi^L (layers 1..L); 1.0 = off.", min=0.0, max=1.0)
    layer_scales: dict[str, float] = _opt(
        {}, "LR multiplier per encoder layer set, layers numbered 0..L-1: e.g. "
        "{'0-7': 1.0, '8-11': 2.0}; keys are 'N', 'N-M' or 'embeddings'.", min=0.0)
    freeze: Literal["none", "encoder", "embeddings"] = _opt(
        "none", "Frozen parameters: none, the whole encoder incl. its pooler (heads only), or "
        "the embeddings.")
    train_layers: list[int] = _opt(
        [], "If set, only these encoder layers (0..L-1) and the heads train: single-layer "
        "probing.", min=0, unique=True)
    unfreeze_after: int = _opt(0, "Unfreeze everything after this many epochs (0 = never).",
                               min=0, max=MAX_EPOCHS)
    head_lr: dict[str, float] = _opt({}, "Peak LR of each task's head and pooler (default: "
                                     "train.lr).", min=0.0)


@dataclass
class LossConfig:
    method: str = _opt("sum", "How task losses combine.", choices="losses")
    weights: dict[str, float] = _opt({name: 1.0 for name in TASKS},
                                     "weighted: weight of each task's loss.", min=0.0)
    weight_lr: float = _opt(0.01, "uncertainty, liebel, gradnorm: peak LR of the learned "
                            "loss weights (they follow the warm-up and decay of train.lr).",
                            min=0.0)
    gradnorm_alpha: float = _opt(1.5, "gradnorm: asymmetry alpha; larger pulls the task "
                                 "training rates together harder (Chen et al. 2018).", min=0.0)
    dwa_temperature: float = _opt(2.0, "dwa: softmax temperature of the loss-ratio weights "
                                  "(Liu et al. 2019).", min=1e-3)
    dwa_window: int = _opt(
        0, "dwa: compare the tasks' mean losses over windows of this many optimizer steps "
        "(counted across epochs) instead of over epochs; the weights change after every "
        "window from the second on (0 = per epoch).", min=0, max=MAX_STEPS)
    contrastive: Literal["none", "mnrl", "cosine_mse"] = _opt(
        "none", "Auxiliary in-batch loss on the siamese embeddings of the pair tasks, added to "
        "the task's loss: mnrl = multiple-negatives ranking (Henderson et al. 2017), "
        "cosine_mse = the batch's cosine matrix against the labels on its diagonal. Needs "
        "model.pair_encoding=siamese.")
    contrastive_weight: float = _opt(1.0, "Weight of the auxiliary loss in the task's loss.",
                                     min=0.0)
    contrastive_tasks: list[str] = _opt(
        [name for name, task in TASKS.items() if task.is_pair],
        "Pair tasks that get the auxiliary loss.",
        choices=tuple(name for name, task in TASKS.items() if task.is_pair), unique=True)
    mnrl_scale: float = _opt(20.0, "mnrl: scale of the cosine logits (Sentence-BERT's 20).",
                             min=1e-3)
    mnrl_threshold: float = _opt(4.0, "mnrl: a score-task (STS) pair with a gold score at "
                                 "least this is a positive anchor; qqp uses is_duplicate=1.",
                                 min=0.0)


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _registry_choices(name: str) -> tuple[str, ...]:
    # Imported here: the registries live with their implementations.
    if name == "schedules":
        from mtbert.schedules import SCHEDULES
        return tuple(SCHEDULES)
    from mtbert.balancing import LOSS_METHODS
    return tuple(LOSS_METHODS)


def _coerce(key: str, value: Any, tp: Any, meta: dict[str, Any]) -> Any:
    """`value` as type `tp`, or a ConfigError naming key, value and what is valid."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none", "")):
            return None
        return _coerce(key, value, next(a for a in args if a is not type(None)), meta)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"bad value {shown(value)} for {key}; valid: {', '.join(args)}")
        return value
    if origin is list:
        given = value
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"bad value {shown(value)} for {key}; expected a list")
        items = [_coerce(key, v, args[0], _bounds(meta)) for v in value]
        choices = meta.get("choices")
        for item in items:
            if choices and item not in choices:
                raise ConfigError(f"bad value {shown(item)} in {key}; valid: {', '.join(choices)}")
        if not items and choices:
            raise ConfigError(f"{key} is empty; valid: {', '.join(choices)}")
        repeated = [item for i, item in enumerate(items) if item in items[:i]]
        if meta.get("unique") and repeated:
            valid = f"; valid: {', '.join(choices)}" if choices else ""
            raise ConfigError(f"bad value {shown(given)} for {key}; {shown(repeated[0])} is "
                              f"listed more than once (each at most once{valid})")
        return items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"bad value {shown(value)} for {key}; expected a mapping")
        return {str(k): _coerce(f"{key}.{k}", v, args[1], _bounds(meta))
                for k, v in value.items()}
    if tp is bool:
        # Booleans only as booleans: a quoted "false" or "no" is a string, and a string
        # read as a truth value is how `log: "false"` once meant log scale on.
        if not isinstance(value, bool):
            raise ConfigError(f"bad value {shown(value)} for {key}; expected true or false "
                              "(unquoted)")
        return value
    if tp in (int, float):
        low, high = meta.get("min"), meta.get("max")
        bounds = f"{low if low is not None else '-inf'}..{high if high is not None else 'inf'}"
        try:
            if isinstance(value, bool):
                raise ValueError
            number = float(value) if tp is float else _as_int(value)
        except (TypeError, ValueError, OverflowError):  # OverflowError: int("inf")
            kind = "an integer" if tp is int else "a number"
            raise ConfigError(f"bad value {shown(value)} for {key}; expected {kind}, valid range: "
                              f"{bounds}") from None
        # NaN passes every comparison and inf every lower bound: neither is a setting.
        if not math.isfinite(number):
            raise ConfigError(f"bad value {shown(value)} for {key}; expected a finite number, "
                              f"valid range: {bounds}")
        if (low is not None and number < low) or (high is not None and number > high):
            raise ConfigError(f"bad value {shown(value)} for {key}; valid range: {bounds}")
        return number
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"bad value {shown(value)} for {key}; expected a string")
        value = str(value)
        choices = meta.get("choices")
        if isinstance(choices, str):
            choices = _registry_choices(choices)
        if choices and value not in choices:
            raise ConfigError(f"bad value {shown(value)} for {key}; valid: {', '.join(choices)}")
        return value
    raise TypeError(f"config field {key} has an unsupported type {tp!r}")


def _bounds(meta: dict[str, Any]) -> dict[str, Any]:
    """The checks of a list or mapping that apply to each of its numbers."""
    return {name: meta[name] for name in ("min", "max") if name in meta}


def _as_int(value: Any) -> int:
    if isinstance(value, int):
        return value  # exact, however large (a float would round it)
    number = float(value)
    if number != int(number):
        raise ValueError
    return int(number)


def _build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            valid = ", ".join(f"{prefix}{name}" for name in fields)
            raise ConfigError(f"unknown config key '{prefix}{key}'; valid keys: {valid}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"'{prefix}{key}' must be a mapping of keys under it")
            kwargs[key] = _build(tp, value, f"{prefix}{key}.")
        else:
            kwargs[key] = _coerce(f"{prefix}{key}", value, tp, dict(fields[key].metadata))
    return cls(**kwargs)


def _check(config: RunConfig) -> None:
    """Checks that span several keys."""
    for name, splits in config.data.files.items():
        if name not in TASKS:
            raise ConfigError(f"unknown task '{name}' in data.files; valid: {', '.join(TASKS)}")
        for split in splits:
            if split not in TASKS[name].files:
                raise ConfigError(f"unknown split 'data.files.{name}.{split}'; valid: "
                                  f"{', '.join(TASKS[name].files)}")
    for name in config.loss.weights:
        if name not in TASKS:
            raise ConfigError(f"unknown task '{name}' in loss.weights; valid: {', '.join(TASKS)}")
    for name in config.optim.head_lr:
        if name not in TASKS:
            raise ConfigError(f"unknown task '{name}' in optim.head_lr; valid: {', '.join(TASKS)}")
    for spec in config.optim.layer_scales:
        parse_layer_set(spec)
    siamese = config.model.pair_encoding == "siamese"
    if config.model.sts_head == "cosine" and not siamese:
        raise ConfigError("model.sts_head=cosine compares the two sentence embeddings; set "
                          "model.pair_encoding=siamese (or model.sts_head regression or classes)")
    if config.loss.contrastive != "none":
        if not siamese:
            raise ConfigError(f"loss.contrastive={config.loss.contrastive} needs one embedding "
                              "per sentence; set model.pair_encoding=siamese (or "
                              "loss.contrastive=none)")
        if not set(config.loss.contrastive_tasks) & set(config.data.tasks):
            raise ConfigError(f"loss.contrastive={config.loss.contrastive}: none of "
                              f"loss.contrastive_tasks ({', '.join(config.loss.contrastive_tasks)})"
                              f" is in data.tasks ({', '.join(config.data.tasks)})")
    task = config.train.select_metric.split("/")[0]
    if task in TASKS and task not in config.data.tasks:
        raise ConfigError(f"train.select_metric {config.train.select_metric} names a task not "
                          f"in data.tasks ({', '.join(config.data.tasks)})")


def parse_layer_set(spec: str) -> tuple[int, int] | None:
    """An optim.layer_scales key: 'N' or 'N-M' -> (N, M) inclusive; 'embeddings' -> None."""
    text = str(spec).strip()
    if text == "embeddings":
        return None
    low, sep, high = text.partition("-")
    try:
        first, last = int(low), int(high) if sep else int(low)
    except ValueError:
        raise ConfigError(f"bad key '{spec}' in optim.layer_scales; valid: 'N', 'N-M' "
                          "(encoder layers from 0) or 'embeddings'") from None
    if first < 0 or last < first:
        raise ConfigError(f"bad key '{spec}' in optim.layer_scales; expected N-M with "
                          "0 <= N <= M")
    return first, last


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def parse_override(item: str) -> tuple[list[str], Any]:
    """'train.lr=2e-5' -> (['train', 'lr'], '2e-5'); values are YAML scalars or lists."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"bad --set {shown(item)}; expected KEY=VALUE, e.g. train.lr=2e-5")
    check_key_depth(key.strip(), f"--set {shown(key.strip())}")
    try:
        value = load_yaml(raw, f"--set {key.strip()}") if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def check_key_depth(key: str, where: str) -> None:
    """A dotted key nests at most MAX_DEPTH levels, as a YAML document does."""
    if key.count(".") >= MAX_DEPTH:
        raise ConfigError(f"{where} nests deeper than {MAX_DEPTH} levels "
                          f"({key.count('.') + 1} dotted parts)")


def overrides_to_dict(items: list[str]) -> dict[str, Any]:
    """`--set` items as one nested mapping; for a repeated key the last value wins."""
    nested: dict[str, Any] = {}
    for item in items:
        path, value = parse_override(item)
        node = nested
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"bad --set {shown(item)}: {part} is not a mapping")
        node[path[-1]] = value
    return nested


def read_yaml(path: str | Path, what: str = "config file") -> dict[str, Any]:
    """A YAML file of a mapping (a run config, a spec: `what` names it in an error)."""
    path = Path(path)
    try:
        data = load_yaml(read_text(path, f"{what} {path}"), f"{what} {path}")
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise ConfigError(f"{what} {path} is not valid YAML{where}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {path} must hold a mapping of config keys")
    return data


def build_config(data: dict[str, Any]) -> RunConfig:
    """A checked RunConfig from a (partial) nested mapping over the defaults."""
    merged = deep_merge(RunConfig().to_dict(), data)
    config = _build(RunConfig, merged)
    _check(config)
    return config


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                extra: dict[str, Any] | None = None) -> RunConfig:
    """Defaults < YAML file < `extra` < `--set` overrides, checked."""
    data = read_yaml(path) if path else {}
    data = deep_merge(data, extra or {})
    data = deep_merge(data, overrides_to_dict(overrides or []))
    return build_config(data)


def save_config(config: RunConfig, path: Path) -> None:
    with naming(path):
        Path(path).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False),
                              encoding="utf-8")


def describe() -> list[tuple[str, str, str]]:
    """Every config key as (dotted key, default, meaning), for `mtbert config --show`."""
    rows: list[tuple[str, str, str]] = []
    defaults = RunConfig()
    for section in dataclasses.fields(RunConfig):
        section_value = getattr(defaults, section.name)
        for f in dataclasses.fields(section_value):
            key = f"{section.name}.{f.name}"
            value = getattr(section_value, f.name)
            help_text = f.metadata["help"]
            choices = f.metadata.get("choices")
            if isinstance(choices, str):
                choices = _registry_choices(choices)
            if choices:
                help_text += f" One of: {', '.join(choices)}."
            hint = typing.get_type_hints(type(section_value))[f.name]
            if typing.get_origin(hint) is Literal:
                help_text += f" One of: {', '.join(typing.get_args(hint))}."
            low, high = f.metadata.get("min"), f.metadata.get("max")
            if low is not None or high is not None:
                help_text += (f" Range: {low if low is not None else '-inf'}.."
                              f"{high if high is not None else 'inf'}.")
            if f.metadata.get("unique"):
                help_text += " Each at most once."
            if isinstance(value, dict) and value:
                for sub, sub_value in flatten(value, f"{key}.").items():
                    rows.append((sub, _show(sub_value), help_text))
            else:
                rows.append((key, _show(value), help_text))
    return rows


def mapping_keys() -> set[str]:
    """Dotted names of the config's open mappings (`optim.layer_scales`, `optim.head_lr`,
    `loss.weights`): keys under them are the user's, e.g. optim.layer_scales.8-11."""
    keys = set()
    defaults = RunConfig()
    for section in dataclasses.fields(RunConfig):
        for name, hint in typing.get_type_hints(type(getattr(defaults, section.name))).items():
            if typing.get_origin(hint) is dict and typing.get_args(hint)[1] in (int, float, str):
                keys.add(f"{section.name}.{name}")
    return keys


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested mapping as dotted keys: {"train": {"lr": 1}} -> {"train.lr": 1}."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def unflatten(mapping: dict[str, Any]) -> dict[str, Any]:
    """Run config keys given dotted (`train.lr: 1e-4`) or nested, as one nested mapping."""
    nested: dict[str, Any] = {}
    for key, value in mapping.items():
        check_key_depth(str(key), f"key {shown(str(key))}")
        nested = set_key(nested, str(key), value) if "." in str(key) else \
            deep_merge(nested, {key: value})
    return nested


def set_key(data: dict[str, Any], key: str, value: Any) -> dict[str, Any]:
    """A copy of `data` with dotted `key` set to `value`."""
    out = deep_merge(data, {})
    node = out
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        node[part] = dict(child) if isinstance(child, dict) else {}
        node = node[part]
    node[parts[-1]] = value
    return out


def _show(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, list):
        return ",".join(map(str, value)) if value else "[]"
    if isinstance(value, dict) and not value:
        return "{}"
    return str(value)


def _directory(value: str | None, env: str, default: str) -> Path:
    """A directory setting: the config value, else $env, else ~/.cache/mtbert/<default>."""
    chosen = value or os.environ.get(env)
    return Path(chosen).expanduser() if chosen else Path.home() / ".cache" / "mtbert" / default


def data_dir(config: RunConfig) -> Path:
    """data.dir, else $MTBERT_DATA_DIR, else ~/.cache/mtbert/data."""
    return _directory(config.data.dir, "MTBERT_DATA_DIR", "data")


def cache_dir(config: RunConfig) -> Path:
    """data.cache_dir, else $MTBERT_CACHE_DIR, else ~/.cache/mtbert/tokens."""
    return _directory(config.data.cache_dir, "MTBERT_CACHE_DIR", "tokens")
