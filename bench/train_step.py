"""Training-step throughput: mtbert's step against the Hugging Face peer, same batches.

    python bench/train_step.py --device cpu --encoder minilm-l6 --batch-size 32 \
        --data-dir DIR

Ours: minBERT on packed batches (train.packing; `--ours-packing padded` for the
plain path, `--packed-attention KERNEL` for the packed attention kernel),
padded and grid lengths rounded up to a multiple of 8, fused AdamW, bf16
autocast on CUDA, no host-device sync inside the step. The peer is what a user
writes today: `transformers.BertModel` (attn_implementation="sdpa") with the
same three heads, batches padded to their longest member, torch AdamW, bf16
autocast on CUDA (fp32 on CPU for both). Both start from the same weights and
train on the same examples; the timed blocks alternate between the two so
that a shared machine slows both alike. Both sides include building each
batch from pre-tokenized rows and copying it to the device; tokenization is
outside the timed loop for both. The warm-up runs, per side, one step of
every batch shape the timed steps hold (a dense kernel may prepare itself
once per shape: cuDNN attention builds a plan per shape), so that the timed
steps are steady state for both.

MFU counts real tokens only: 6·N·tokens + 12·L·d·sum(T_i^2) FLOPs per step
(N = the encoder's non-embedding matmul weights, T_i each sequence's real
length) over 989 TFLOP/s, the dense bf16 peak of an H100/H200. On CPU there
is no agreed peak: the achieved TFLOP/s is printed and MFU is n/a.

The last line on stdout is `ratio ours/peer examples/s: X.XX`.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from mtbert.config import build_config  # noqa: E402
from mtbert.data import PAD_MULTIPLE, Batch  # noqa: E402
from mtbert.encoder import (PACKED_KERNELS, BertConfig, BertEncoder,  # noqa: E402
                            load_hf_state_dict, read_bert_config, read_checkpoint,
                            resolve_encoder, to_hf_state_dict)
from mtbert.errors import MtbertError  # noqa: E402
from mtbert.runtime import autocast  # noqa: E402
from mtbert.heads import MultitaskModel  # noqa: E402
from mtbert.optim import make_optimizer  # noqa: E402
from mtbert.tasks import get_task  # noqa: E402
from mtbert.tokenize import Tokenizer  # noqa: E402
from mtbert.train import load_task_data  # noqa: E402

PEAK_BF16_FLOPS = 989e12  # H100 / H200 SXM dense bf16
TASKS = ("sst", "qqp", "sts")
# bert-base-uncased's architecture with random weights: speed does not depend on them.
BERT_BASE = dict(vocab_size=30522, hidden_size=768, num_hidden_layers=12,
                 num_attention_heads=12, intermediate_size=3072)


def build_encoder(name: str, tokenizer: str) -> tuple[BertEncoder, Path]:
    """Our encoder and the directory whose tokenizer it uses: a preset or a checkpoint."""
    if name == "bert-base":
        # Random weights with bert-base-uncased's vocabulary (minilm-l6 ships the same one).
        torch.manual_seed(0)
        return BertEncoder(BertConfig(**BERT_BASE)), resolve_encoder(tokenizer)
    directory = resolve_encoder(name)
    encoder = BertEncoder(read_bert_config(directory))
    load_hf_state_dict(encoder, read_checkpoint(directory), str(directory))
    return encoder, directory


class PeerModel(nn.Module):
    """transformers.BertModel + the same heads; [CLS] through BERT's pooler, as ours."""

    def __init__(self, encoder: BertEncoder, heads: nn.ModuleDict):
        super().__init__()
        from transformers import BertConfig as HFConfig
        from transformers import BertModel

        config = HFConfig(**encoder.config.to_hf_dict(), attn_implementation="sdpa")
        self.bert = BertModel(config)
        if self.bert.config._attn_implementation != "sdpa":
            raise RuntimeError("transformers did not take attn_implementation='sdpa'")
        state = to_hf_state_dict(encoder)
        missing, unexpected = self.bert.load_state_dict(state, strict=False)
        if [k for k in missing if "position_ids" not in k] or unexpected:
            raise RuntimeError(f"peer weights do not match: {missing} {unexpected}")
        self.heads = heads

    def forward(self, batch: Batch) -> torch.Tensor:
        ids, mask, types = batch.views[0]
        out = self.bert(input_ids=ids, attention_mask=mask, token_type_ids=types)
        return self.heads[batch.task](out.pooler_output)


def make_batches(sets, *, batch_size: int, tokens: int, n: int, seed: int) -> list[tuple]:
    """`n` (task, indices) batches, round-robin over tasks: `batch_size` examples each, or
    with `tokens` > 0, examples until the batch holds at least that many real tokens."""
    rng = np.random.default_rng(seed)
    orders = {t: rng.permutation(len(s)) for t, s in sets.items()}
    lengths = {t: s.lengths() for t, s in sets.items()}
    cursor = {t: 0 for t in sets}
    batches = []
    for i in range(n):
        task = list(sets)[i % len(sets)]
        order, start = orders[task], cursor[task]
        if tokens > 0:
            seen = np.cumsum(lengths[task][np.roll(order, -start)])
            size = int(np.searchsorted(seen, tokens)) + 1
        else:
            size = batch_size
        size = min(size, len(order))
        batches.append((task, np.roll(order, -start)[:size]))
        cursor[task] = (start + size) % len(order)
    return batches


def flops_per_step(config: BertConfig, sequence_lengths: np.ndarray) -> float:
    d, L, ff = config.hidden_size, config.num_hidden_layers, config.intermediate_size
    n_matmul = L * (4 * d * d + 2 * d * ff)  # qkv + proj + ffn up/down, non-embedding
    return 6 * n_matmul * sequence_lengths.sum() + 12 * L * d * (sequence_lengths ** 2).sum()


def batch_shape(batch: Batch) -> tuple:
    """What a dense attention kernel sees of a batch: (rows, padded length) of each view.
    A kernel that prepares itself per shape (cuDNN attention builds a plan per shape)
    pays once per distinct value, so the warm-up runs every one the timed blocks hold."""
    if batch.packed:
        view = batch.views[0]
        return ((view.n_seqs, view.grid_len),)
    return tuple(tuple(view[0].shape) for view in batch.views)


class Side:
    """One contender: model, optimizer, and its way of building a batch (packed or padded,
    padded lengths rounded up to `pad_multiple`)."""

    def __init__(self, name, model, optimizer, sets, *, packed: bool, pad_multiple: int,
                 device):
        self.name, self.model, self.optimizer = name, model, optimizer
        self.sets, self.packed, self.pad_multiple, self.device = sets, packed, pad_multiple, device
        self.time, self.examples, self.tokens, self.flops, self.peak = 0.0, 0, 0, 0.0, 0
        self.first_loss = None
        self.warmup_steps = 0

    def host_batch(self, task: str, indices: np.ndarray) -> Batch:
        dataset = self.sets[task]
        dataset.packed, dataset.pad_multiple = self.packed, self.pad_multiple
        return dataset.batch(indices)

    def step(self, task: str, indices: np.ndarray) -> torch.Tensor:
        batch = self.host_batch(task, indices).to(self.device)
        self.optimizer.zero_grad(set_to_none=True)
        with autocast(self.device):
            output = self.model(batch)
        loss = self.sets[task].task.loss(output, batch.labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        return loss.detach()

    def warm_up(self, warm, timed) -> None:
        """The warm-up steps, then one step of every batch shape of `timed` not seen yet."""
        seen = {batch_shape(self.host_batch(task, indices)) for task, indices, _ in warm}
        extra = []
        for item in timed:
            shape = batch_shape(self.host_batch(item[0], item[1]))
            if shape not in seen:
                seen.add(shape)
                extra.append(item)
        self.warmup_steps = len(warm) + len(extra)
        self.run(list(warm) + extra, timed=False)

    def run(self, batches, *, timed: bool) -> None:
        sync(self.device)
        tic = time.perf_counter()
        for task, indices, _ in batches:
            loss = self.step(task, indices)
            if self.first_loss is None:
                self.first_loss = loss.float().item()
        sync(self.device)
        if timed:
            self.time += time.perf_counter() - tic
            for _, _, (n_examples, n_tokens, flops) in batches:
                self.examples += n_examples
                self.tokens += n_tokens
                self.flops += flops

    def figures(self) -> dict:
        """examples/s, real tokens/s, TFLOP/s, MFU (CUDA) and peak memory of the timed steps."""
        cuda = self.device.type == "cuda"
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        return {"examples_per_s": self.examples / self.time,
                "real_tokens_per_s": self.tokens / self.time,
                "tflops": self.flops / self.time / 1e12,
                "mfu": f"{100 * self.flops / self.time / PEAK_BF16_FLOPS:.1f}%" if cuda else "n/a",
                "peak_memory": f"{self.peak / 2**30:.2f} GiB" if cuda else
                f"n/a (process max RSS {rss:.2f} GiB)",
                "seconds": self.time, "warmup_steps": self.warmup_steps}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def load_sets(tokenizer_dir: Path, data_dir: str, max_examples: int):
    """The run config and training sets the benchmark cuts its batches from."""
    tokenizer = Tokenizer(tokenizer_dir)
    config = build_config({
        "model": {"encoder": str(tokenizer_dir), "max_length": 128},
        "data": {"dir": data_dir, "max_train_examples": max_examples,
                 "max_eval_examples": 1,
                 "cache_dir": os.environ.get("MTBERT_CACHE_DIR") or
                 str(Path(tempfile.gettempdir()) / "mtbert-bench-tokens")},
        "train": {"seed": 0}})
    return config, load_task_data(config, tokenizer).train


def step_batches(sets, encoder_config: BertConfig, *, batch_size: int, tokens: int, n: int,
                 seed: int = 0) -> list[tuple]:
    """`n` (task, indices, (examples, real tokens, FLOPs)) batches (see make_batches)."""
    batches = make_batches(sets, batch_size=batch_size, tokens=tokens, n=n, seed=seed)
    for k, (task, indices) in enumerate(batches):
        lengths = np.concatenate([[len(view[i][0]) for i in indices]
                                  for view in sets[task].views])
        batches[k] = (task, indices, (len(indices), int(lengths.sum()),
                                      flops_per_step(encoder_config, lengths)))
    return batches


def make_sides(encoder: BertEncoder, sets, config, device: torch.device, *,
               kernels: list[str], peer: bool = True) -> list[Side]:
    """One side per kernel of ours ("padded" = train.packing=padded, else the packed
    attention kernel), then the peer; all start from the same weights and heads."""
    torch.manual_seed(0)
    first = MultitaskModel(encoder, [get_task(t) for t in TASKS], config.model)
    models = [first] + [copy.deepcopy(first) for _ in kernels[1:]]
    # Built before anything moves to the device: the peer copies our CPU weights.
    peer_model = PeerModel(encoder, copy.deepcopy(first.heads)) if peer else None
    sides = []
    for kernel, model in zip(kernels, models):
        if kernel != "padded":
            model.encoder.packed_kernel = kernel
        model.to(device).train()
        sides.append(Side(f"ours-{kernel}" if len(kernels) > 1 else "ours", model,
                          make_optimizer(model, lr=2e-5, config=config.optim, device=device),
                          sets, packed=kernel != "padded", pad_multiple=PAD_MULTIPLE,
                          device=device))
    if peer_model is not None:
        # What a user writes today: padded to the longest member, no rounding.
        peer_model.to(device).train()
        sides.append(Side("peer", peer_model, torch.optim.AdamW(
            peer_model.parameters(), lr=2e-5, weight_decay=0.01), sets, packed=False,
            pad_multiple=1, device=device))
    return sides


def warm_up(sides: list[Side], warm: list[tuple], timed: list[tuple]) -> None:
    """The warm-up steps of every side, its timed batch shapes included (`Side.warm_up`)."""
    for side in sides:
        side.warm_up(warm, timed)


def time_blocks(sides: list[Side], timed: list[tuple], *, steps: int, blocks: int,
                device: torch.device) -> None:
    """`blocks` blocks of `steps` timed steps per side, the order of the sides rotating
    block by block so that a shared machine slows all alike."""
    for b in range(blocks):
        block = timed[b * steps:(b + 1) * steps]
        for side in sides[b % len(sides):] + sides[:b % len(sides)]:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            side.run(block, timed=True)
            if device.type == "cuda":
                side.peak = max(side.peak, torch.cuda.max_memory_allocated(device))


def measure(sides: list[Side], batches: list[tuple], *, warmup: int, steps: int,
            blocks: int, device: torch.device) -> None:
    """Warm every side up, then time it (`warm_up`, `time_blocks`)."""
    warm_up(sides, batches[:warmup], batches[warmup:])
    time_blocks(sides, batches[warmup:], steps=steps, blocks=blocks, device=device)


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        choices=("cpu", "cuda"))
    parser.add_argument("--encoder", default="minilm-l6",
                        help="minilm-l6, bert-base (its architecture, random weights), or a "
                             "Hugging Face BERT directory")
    parser.add_argument("--tokenizer", default="minilm-l6",
                        help="bert-base only: a checkpoint directory with bert-base-uncased's "
                             "vocabulary (minilm-l6 has it)")
    parser.add_argument("--batch-size", type=int, default=32, help="examples per batch")
    parser.add_argument("--tokens-per-step", type=int, default=0,
                        help="instead of --batch-size: examples until a batch holds this many "
                             "real tokens (e.g. 8192)")
    parser.add_argument("--data-dir", default=os.environ.get("MTBERT_DATA_DIR"),
                        help="CS224N task files (default $MTBERT_DATA_DIR)")
    parser.add_argument("--max-examples", type=int, default=3000,
                        help="training examples read per task (a seeded sample)")
    parser.add_argument("--warmup", type=int, default=6,
                        help="untimed steps per side, then one of every batch shape the timed "
                             "steps hold")
    parser.add_argument("--steps", type=int, default=12, help="timed steps per block and side")
    parser.add_argument("--blocks", type=int, default=3,
                        help="timed blocks; ours and the peer alternate block by block")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0 = torch default)")
    parser.add_argument("--ours-packing", default="packed", choices=("packed", "padded"))
    parser.add_argument("--packed-attention", default="auto", choices=PACKED_KERNELS,
                        help="packed batches' attention kernel (train.packed_attention)")
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    if not args.data_dir:
        parser.error("--data-dir is required when MTBERT_DATA_DIR is not set")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: PyTorch sees no CUDA device")

    encoder, tok_dir = build_encoder(args.encoder, args.tokenizer)
    config, sets = load_sets(tok_dir, args.data_dir, args.max_examples)
    n = args.warmup + args.steps * args.blocks
    batches = step_batches(sets, encoder.config, batch_size=args.batch_size,
                           tokens=args.tokens_per_step, n=n)
    kernel = "padded" if args.ours_packing == "padded" else args.packed_attention
    sides = make_sides(encoder, sets, config, device, kernels=[kernel])
    measure(sides, batches, warmup=args.warmup, steps=args.steps, blocks=args.blocks,
            device=device)

    versions = {"torch": torch.__version__, "python": platform.python_version()}
    try:
        import transformers
        versions["transformers"] = transformers.__version__
    except ImportError:
        pass
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    c = encoder.config
    setting = (f"{args.tokens_per_step} real tokens per batch" if args.tokens_per_step
               else f"batch {args.batch_size}")
    ours_how = "padded" if kernel == "padded" else f"packed, attention kernel {kernel}"
    print(f"device {device.type} ({name}); " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    print(f"encoder {args.encoder} ({c.num_hidden_layers} layers, hidden {c.hidden_size}), "
          f"{setting}, tasks {'/'.join(TASKS)} round-robin, {args.blocks} x {args.steps} "
          f"timed steps per side after {args.warmup} warm-up and one of every timed batch "
          f"shape; ours {ours_how}")
    print(f"first-step loss: ours {sides[0].first_loss:.5f}, peer {sides[1].first_loss:.5f}")
    results = {"device": device.type, "device_name": name, "versions": versions,
               "encoder": args.encoder, "setting": setting, "argv": sys.argv[1:],
               "kernel": kernel}
    for side in sides:
        f = side.figures()
        print(f"{side.name}: {f['examples_per_s']:.1f} examples/s, "
              f"{f['real_tokens_per_s']:.0f} real tokens/s, {f['tflops']:.3f} TFLOP/s, "
              f"MFU {f['mfu']}, peak memory {f['peak_memory']}")
        results[side.name] = f
    ratio = sides[0].examples / sides[0].time / (sides[1].examples / sides[1].time)
    results["ratio"] = ratio
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    print(f"ratio ours/peer examples/s: {ratio:.2f}")
    return ratio


if __name__ == "__main__":
    try:
        main()
    except MtbertError as err:
        print(f"train_step: error: {err}", file=sys.stderr)
        sys.exit(2)
