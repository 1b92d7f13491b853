"""In-domain further pretraining: masked-LM on the task sentences (Sun et al. 2019).

Sun et al. ("How to Fine-Tune BERT for Text Classification?", 2019) further
pretrain BERT with its masked-LM objective on the target task's own text
before fine-tuning (batch 32, length 128, lr 5e-5 in their setup). `mtbert
pretrain` does this on the sentences of the task files (each distinct
sentence once), and writes an encoder directory in Hugging Face BERT format
that `model.encoder=DIR` loads like any checkpoint.

Masking is BERT's (Devlin et al. 2019): `mask_prob` of the real tokens
(never [CLS], [SEP] or padding; at least one per sentence) are chosen; of
those 80% become [MASK], 10% a random token, 10% stay. The MLM head is
BERT's: dense -> GELU -> LayerNorm -> a decoder tied to the word embeddings
plus a bias, initialised from the checkpoint's `cls.predictions.*` weights
when it has them, else fresh; it is saved with the encoder, so pretraining
the output again continues with it.

The run directory holds a resume state every `save_every` steps; `--resume`
continues a killed run from it. It is removed once the encoder is written.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from mtbert.config import MAX_EPOCHS, MAX_STEPS, MAX_UNITS, SEED_MAX, RunConfig, data_dir
from mtbert.data import TaskSampler, pad_rows, read_examples
from mtbert.encoder import BertEncoder, _normalise_hf_key, load_pretrained, read_checkpoint
from mtbert.errors import ConfigError, DataError, MtbertError, TrainingError
from mtbert.modeldir import write_hf_encoder
from mtbert.optim import linear_schedule
from mtbert.rundir import atomic_write_text
from mtbert.runtime import atomic_torch_save, autocast, resolve_device
from mtbert.tasks import get_task
from mtbert.tokenize import Tokenizer

log = logging.getLogger("mtbert")

STATE_FILE = "pretrain_state.pt"
REPORT_FILE = "pretrain.json"
SPLITS = ("train", "dev", "test")
IGNORE = -100  # label of the tokens that are not predicted

# Our MLM head parameter -> its Hugging Face BertForMaskedLM / BertForPreTraining name.
MLM_KEYS = {
    "dense.weight": "cls.predictions.transform.dense.weight",
    "dense.bias": "cls.predictions.transform.dense.bias",
    "norm.weight": "cls.predictions.transform.LayerNorm.weight",
    "norm.bias": "cls.predictions.transform.LayerNorm.bias",
    "bias": "cls.predictions.bias",
}


@dataclass
class PretrainOptions:
    steps: int = 0  # optimizer steps; 0 = `epochs` passes over the sentences
    epochs: float = 1.0
    batch_size: int = 32
    lr: float = 5e-5
    mask_prob: float = 0.15
    max_length: int = 128
    splits: tuple[str, ...] = ("train",)
    warmup: float = 0.1
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0  # clip every step's gradient norm to this; 0: no clipping
    seed: int = 0
    save_every: int = 200
    log_every: int = 10

    def check(self) -> None:
        """Every option in its range: one ConfigError naming the option, the value received
        and what is valid. Floats must be finite (NaN passes every comparison)."""
        for name, low, high in (("steps", 0, MAX_STEPS), ("batch_size", 1, MAX_UNITS),
                                ("save_every", 1, MAX_STEPS), ("log_every", 1, MAX_STEPS),
                                ("max_length", 8, 512), ("seed", 0, SEED_MAX)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise ConfigError(f"bad --{name.replace('_', '-')} {value!r}; valid range: "
                                  f"{low}..{high}")
        for name, valid, ok in (
                ("epochs", f"a number > 0 and <= {MAX_EPOCHS}", lambda v: 0 < v <= MAX_EPOCHS),
                ("lr", "a finite number > 0", lambda v: v > 0),
                ("mask_prob", "between 0 and 1", lambda v: 0 < v < 1),
                ("warmup", "between 0 and 1, inclusive", lambda v: 0 <= v <= 1),
                ("weight_decay", "a finite number >= 0", lambda v: v >= 0),
                ("max_grad_norm", "a finite number >= 0 (0: no clipping)", lambda v: v >= 0)):
            value = getattr(self, name)
            if (isinstance(value, bool) or not isinstance(value, (int, float))
                    or not math.isfinite(value) or not ok(value)):
                raise ConfigError(f"bad --{name.replace('_', '-')} {value!r}; valid: {valid}")
        for split in self.splits:
            if split not in SPLITS:
                raise ConfigError(f"bad split '{split}' in --splits; valid: {', '.join(SPLITS)}")
        if not self.splits:
            raise ConfigError(f"--splits is empty; valid: {', '.join(SPLITS)}")


class MaskedLMHead(nn.Module):
    """BERT's MLM head: dense -> GELU -> LayerNorm -> tied decoder + bias."""

    def __init__(self, encoder: BertEncoder):
        super().__init__()
        config = encoder.config
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))
        nn.init.normal_(self.dense.weight, std=0.02)
        nn.init.zeros_(self.dense.bias)

    def forward(self, hidden: torch.Tensor, word_embeddings: torch.Tensor) -> torch.Tensor:
        """Vocabulary logits (M, V) of hidden states (M, d); the decoder is the (V, d)
        word embedding matrix, tied as in BERT."""
        h = self.norm(F.gelu(self.dense(hidden)))  # (M, d)
        return h @ word_embeddings.T + self.bias  # (M, V)

    def load_hf(self, state: dict[str, torch.Tensor]) -> bool:
        """Copy `cls.predictions.*` weights of a checkpoint; False (left fresh) without them."""
        hf = {_normalise_hf_key(k): v for k, v in state.items()}
        if not all(name in hf for name in MLM_KEYS.values()):
            return False
        own = self.state_dict()
        for ours, theirs in MLM_KEYS.items():
            if hf[theirs].shape != own[ours].shape:
                raise MtbertError(f"checkpoint key {theirs} has shape {tuple(hf[theirs].shape)}, "
                                  f"the MLM head expects {tuple(own[ours].shape)}")
        self.load_state_dict({ours: hf[theirs] for ours, theirs in MLM_KEYS.items()})
        return True

    def to_hf(self) -> dict[str, torch.Tensor]:
        return {theirs: self.state_dict()[ours] for ours, theirs in MLM_KEYS.items()}


def mask_tokens(ids: torch.Tensor, maskable: torch.Tensor, *, mask_id: int, vocab_size: int,
                prob: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's masking of token ids (B, T): (inputs, labels), labels -100 where not predicted.

    `maskable` (B, T) is True on real tokens other than [CLS] and [SEP]. Each
    maskable token is chosen with probability `prob`, and at least one per row;
    a chosen token becomes [MASK] (80%), a random token (10%) or stays (10%).
    """
    draw = lambda: torch.rand(ids.shape, generator=generator)  # noqa: E731
    chosen = (draw() < prob) & maskable  # (B, T)
    # A short sentence may draw no token at all; it then predicts one random position.
    empty = ~chosen.any(1) & maskable.any(1)  # (B,)
    pick = (draw() * maskable).argmax(1)  # (B,) a random maskable position
    chosen[empty, pick[empty]] = True
    labels = torch.where(chosen, ids, torch.full_like(ids, IGNORE))
    action = draw()
    inputs = ids.clone()
    inputs[chosen & (action < 0.8)] = mask_id
    swap = chosen & (action >= 0.8) & (action < 0.9)
    inputs[swap] = torch.randint(vocab_size, ids.shape, generator=generator)[swap]
    return inputs, labels


def task_sentences(config: RunConfig, splits: tuple[str, ...]) -> list[str]:
    """Every distinct sentence of the data.tasks files of `splits`, in file order."""
    root = data_dir(config)
    if not root.is_dir():
        raise DataError(f"data directory {root} does not exist; run `mtbert data download "
                        f"--data-dir {root}` or pass --data-dir")
    seen: dict[str, None] = {}
    for name in config.data.tasks:
        task = get_task(name)
        for split in splits:
            examples = read_examples(root / config.data.files[name][split], task, labelled=False)
            for text in examples.texts:
                seen.update(dict.fromkeys(text))
    return list(seen)


def pretrain(config: RunConfig, *, out: Path, options: PretrainOptions, device: str = "auto",
             resume: bool = False, progress: bool = True) -> dict:
    """Masked-LM pretraining of `model.encoder` on the task sentences; writes the encoder
    directory `out` and returns pretrain.json's content."""

    options.check()
    started = time.perf_counter()
    out = Path(out)
    state_path = out / STATE_FILE
    if resume and not state_path.exists():
        raise MtbertError(f"--resume: {out} holds no pretraining state ({STATE_FILE})")
    if not resume and out.exists() and any(out.iterdir()):
        hint = "; continue it with --resume" if state_path.exists() else ""
        raise MtbertError(f"{out} exists and is not empty; pass a new --out{hint}")
    dev = resolve_device(device)
    torch.manual_seed(options.seed)

    encoder, source_dir = load_pretrained(config.model.encoder)
    tokenizer = Tokenizer(source_dir)
    mask_id = tokenizer.special_id("[MASK]")
    head = MaskedLMHead(encoder)
    from_checkpoint = head.load_hf(read_checkpoint(source_dir))
    log.info("MLM head: %s", "from the checkpoint's cls.predictions weights" if from_checkpoint
             else "fresh (the checkpoint has no cls.predictions weights)")
    sentences = task_sentences(config, options.splits)
    if not sentences:
        raise DataError("the task files hold no sentences to pretrain on")
    rows = [tokenizer.build_inputs(ids, None, options.max_length)
            for ids in tokenizer.encode(sentences)]  # (token ids, type ids) per sentence
    sampler = TaskSampler(len(rows), options.batch_size, seed=options.seed, task="pretrain")
    total = options.steps or max(1, math.ceil(options.epochs * sampler.batches_per_pass))
    log.info("pretraining %s on %d sentences (%s of %s): %d steps of %d, mask %.2f",
             config.model.encoder, len(rows), "+".join(options.splits),
             ", ".join(config.data.tasks), total, options.batch_size, options.mask_prob)

    encoder.to(dev).train()
    head.to(dev).train()
    params = [p for module in (encoder, head) for p in module.parameters()]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": options.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=options.lr)
    scheduler = linear_schedule(optimizer, warmup=options.warmup, total_steps=total)
    generator = torch.Generator().manual_seed(options.seed)
    step, curve = 0, []
    window = torch.zeros(3)  # loss sum, correct, masked tokens of the log window
    if resume:
        saved = torch.load(state_path, map_location="cpu", weights_only=True)
        if saved["total"] != total or saved["sentences"] != len(rows):
            raise MtbertError(f"--resume: {out} was started with {saved['total']} steps over "
                              f"{saved['sentences']} sentences, this run has {total} over "
                              f"{len(rows)}; use the same options and data")
        encoder.load_state_dict(saved["encoder"])
        head.load_state_dict(saved["head"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        sampler.restore(saved["sampler"])
        generator.set_state(saved["generator"])
        torch.set_rng_state(saved["rng"])
        step, curve, window = saved["step"], saved["curve"], saved["window"]
        log.info("resuming %s at step %d of %d", out, step, total)
    out.mkdir(parents=True, exist_ok=True)

    special = torch.tensor([tokenizer.cls_id, tokenizer.sep_id, tokenizer.pad_id])
    window = window.to(dev)
    bar = tqdm(total=total, initial=step, desc="pretrain", disable=not progress,
               file=sys.stderr, dynamic_ncols=True, mininterval=1.0)
    while step < total:
        ids, mask, _ = pad_rows([rows[i] for i in sampler.next()], tokenizer.pad_id)
        inputs, labels = mask_tokens(ids, mask.bool() & ~torch.isin(ids, special),
                                     mask_id=mask_id, vocab_size=encoder.config.vocab_size,
                                     prob=options.mask_prob, generator=generator)
        inputs, labels, mask = inputs.to(dev), labels.to(dev), mask.to(dev)
        with autocast(dev):
            hidden = encoder(inputs, mask)  # (B, T, d)
            target = labels != IGNORE  # (B, T)
            logits = head(hidden[target], encoder.word_emb.weight)  # (M, V)
        loss = F.cross_entropy(logits.float(), labels[target])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if options.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, options.max_grad_norm)
        optimizer.step()
        scheduler.step()
        step += 1
        n = target.sum().float()
        correct = (logits.argmax(-1) == labels[target]).sum().float()
        window += torch.stack([loss.detach() * n, correct, n])
        bar.update(1)
        if step % options.log_every == 0 or step == total:
            loss_sum, correct, count = window.tolist()
            point = {"step": step, "loss": round(loss_sum / count, 4),
                     "masked_acc": round(correct / count, 4)}
            if not math.isfinite(point["loss"]):
                raise TrainingError(f"the MLM loss became {point['loss']} at step {step}; "
                                    "lower --lr")
            curve.append(point)
            bar.set_postfix(loss=f"{point['loss']:.3f}", acc=f"{point['masked_acc']:.3f}")
            window.zero_()
        if step % options.save_every == 0 and step < total:
            _save_state(state_path, encoder, head, optimizer, scheduler, sampler, generator,
                        step=step, total=total, sentences=len(rows), curve=curve,
                        window=window)
    bar.close()

    write_hf_encoder(encoder.cpu(), tokenizer, out, extra=head.cpu().to_hf())
    report = {
        "source_encoder": config.model.encoder,
        "tasks": list(config.data.tasks),
        "splits": list(options.splits),
        "sentences": len(rows),
        "tokens": int(sum(len(r) for r in rows)),
        "steps": total,
        "passes": round(total * options.batch_size / len(rows), 3),
        "mlm_head": "checkpoint" if from_checkpoint else "fresh",
        "options": {k: (list(v) if isinstance(v, tuple) else v)
                    for k, v in asdict(options).items()},
        "first": curve[0] if curve else None,
        "last": curve[-1] if curve else None,
        "curve": curve,
        "wall_time_s": round(time.perf_counter() - started, 2),
    }
    atomic_write_text(out / REPORT_FILE, json.dumps(report, indent=2))
    state_path.unlink(missing_ok=True)
    if curve:
        log.info("MLM loss %.4f -> %.4f, masked-token accuracy %.4f -> %.4f (first and last "
                 "%d steps)", curve[0]["loss"], curve[-1]["loss"], curve[0]["masked_acc"],
                 curve[-1]["masked_acc"], options.log_every)
    return report


def _save_state(path: Path, encoder, head, optimizer, scheduler, sampler, generator, *,
                step: int, total: int, sentences: int, curve: list[dict],
                window: torch.Tensor) -> None:
    payload = {"encoder": encoder.state_dict(), "head": head.state_dict(),
               "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
               "sampler": sampler.state(), "generator": generator.get_state(),
               "rng": torch.get_rng_state(), "step": step, "total": total,
               "sentences": sentences, "curve": curve, "window": window.cpu()}
    atomic_torch_save(payload, path)
