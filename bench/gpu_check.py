"""The first command on a GPU: what works, what is slow, what to default to, and the figures.

    export PYTHONPATH=.
    python bench/gpu_check.py --out gpu-check --encoder .carry/minilm-l6 --data-dir .carry/data

(`.carry` as ../shared/GPU.md builds it.) About 6 minutes on an H100/H200 with
torch 2.11; needs neither optuna nor wandb. For each attention path of ours,

    padded  train.packing=padded: batches padded (to a multiple of 8), dense SDPA
    grid    train.packed_attention=grid: packed tokens, one dense SDPA over a padded grid
    nested  train.packed_attention=nested: nested jagged tensors through SDPA
    varlen  train.packed_attention=varlen: torch.nn.attention.varlen (CUDA, torch >= 2.10)

at bert-base size (random weights: hidden 768, 12 layers, 12 heads) and
minilm-l6 size (its weights), in bf16 autocast, on real batches, it checks
and measures:

1. correctness: attention alone against a per-sequence fp32 reference, and the
   whole model's head outputs, last hidden states and every gradient against
   the fp32 padded path (padded to the longest member), in fp32 and bf16, with
   the tolerances stated in `TOLERANCES`;
2. which attention kernels ran (profiler: ATen ops and CUDA kernel names; a
   math fallback is a WARN);
3. host syncs (`torch.cuda.set_sync_debug_mode`) in one forward + backward of
   each path, and in one full training step of each loss method;
4. out of GPU memory: `mtbert train` under a memory fraction too small for its
   batch must end with the one-line "out of GPU memory" error;
5. throughput, ours (each path) against the Hugging Face peer on the same
   batches (bench/train_step.py): examples/s, real tokens/s, ratio, MFU, peak
   memory, at batch 32 and 16, and at >= 8192 real tokens per step (MFU);
6. wall time of 4 short minilm-l6 `mtbert train` runs one at a time (K = 1)
   and all at once (K = 4).

It writes OUT/gpu_check.json and OUT/gpu_check.md after every section (a run
cut short keeps what it measured; run directories and caches go to a scratch
folder, removed at the end unless --keep-work) and exits 1 when a check fails (0 when
every check passes or is skipped, 2 for bad arguments). Without CUDA, or with
--tiny, it runs a tiny random model on CPU in seconds: the checks that run on
CPU pass or fail as on a GPU, the CUDA-only ones are listed as skipped, by
name.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import importlib.util
import json
import os
import platform
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout
sys.path.insert(0, str(ROOT / "bench"))

import train_step  # noqa: E402
from mtbert.balancing import LOSS_METHODS  # noqa: E402
from mtbert.config import build_config  # noqa: E402
from mtbert.data import PAD_MULTIPLE, Batch, PackedView  # noqa: E402
from mtbert.encoder import (TOKENIZER_FILES, BertConfig, BertEncoder, PackedAttention,  # noqa: E402
                            load_hf_state_dict, read_bert_config, read_checkpoint,
                            resolve_encoder, to_hf_state_dict, varlen_attention)
from mtbert.heads import MultitaskModel  # noqa: E402
from mtbert.runtime import autocast  # noqa: E402
from mtbert.tasks import get_task  # noqa: E402

KERNELS = ("padded", "grid", "nested", "varlen")
SECTIONS = ("correctness", "syncs", "oom", "throughput", "concurrency")
# Relative L2 errors, ||x - ref|| / ||ref||, against the fp32 reference. fp32: the
# paths compute the same function, so only summation order differs. bf16: autocast
# rounds every matmul input to 8 bits of mantissa (2^-9 relative each); a masking or
# layout bug (a token attending to another sequence, a padded key let in) gives errors
# of order 0.1-1. `grad_worst` is the worst single parameter whose reference gradient
# is not negligible (norm above 1e-6 of all gradients together).
TOLERANCES = {
    "fp32": {"attention": 1e-5, "outputs": 1e-4, "hidden": 1e-4, "grads": 1e-4,
             "grad_worst": 1e-3},
    "bf16": {"attention": 2e-2, "outputs": 5e-2, "hidden": 5e-2, "grads": 1e-1,
             "grad_worst": 3e-1},
}
ATTENTION_PATTERN = re.compile(r"attention|attn|fmha|flash|cudnn|sdpa|softmax|varlen", re.I)
# ATen ops that say which SDPA backend ran (profiler names), first match wins.
BACKENDS = (("_scaled_dot_product_cudnn_attention", "cudnn"), ("_cudnn_attention", "cudnn"),
            ("_scaled_dot_product_flash_attention_for_cpu", "cpu-flash"),
            ("_scaled_dot_product_flash_attention", "flash"),
            ("_flash_attention_forward", "flash"), ("varlen_attn", "flash-varlen"),
            ("_scaled_dot_product_efficient_attention", "efficient"),
            ("_efficient_attention_forward", "efficient"),
            ("_scaled_dot_product_attention_math", "math"),
            ("_scaled_dot_product_fused_attention_overrideable", "overrideable"))
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
            max_position_embeddings=512)
TASKS = train_step.TASKS


# ---------------------------------------------------------------- the report

class Report:
    """Every check (PASS, FAIL, WARN, INFO or SKIP, with its reason and details) and
    every figure, written as JSON and Markdown after each section."""

    def __init__(self, out: Path, meta: dict):
        self.out, self.meta = out, meta
        self.checks: list[dict] = []
        self.figures: dict = {}
        self.seconds: dict[str, float] = {}
        self.recommendation: str | None = None

    def add(self, name: str, status: str, reason: str = "", **details) -> None:
        self.checks.append({"name": name, "status": status, "reason": reason, **details})
        print(f"[{status}] {name}" + (f": {reason}" if reason else ""), flush=True)

    def skip(self, name: str, reason: str) -> None:
        self.add(name, "SKIP", reason)

    @property
    def failed(self) -> list[dict]:
        return [c for c in self.checks if c["status"] == "FAIL"]

    def to_json(self) -> dict:
        return {**self.meta, "verdict": "FAIL" if self.failed else "PASS",
                "tolerances": TOLERANCES, "checks": self.checks,
                "skipped": [f"{c['name']}: {c['reason']}" for c in self.checks
                            if c["status"] == "SKIP"],
                "figures": self.figures, "recommended_packed_attention": self.recommendation,
                "section_seconds": self.seconds}

    def write(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        data = self.to_json()
        (self.out / "gpu_check.json").write_text(json.dumps(data, indent=2, default=str))
        (self.out / "gpu_check.md").write_text(markdown(data))


def markdown(data: dict) -> str:
    lines = [f"# GPU check: {data['device_name']}", "",
             f"{data['date']}; torch {data['torch']}, CUDA {data['cuda']}, cuDNN "
             f"{data['cudnn']}, transformers {data['transformers']}, Python {data['python']}; "
             f"mode {data['mode']}.", "", f"Command: `{data['command']}`", "",
             f"**Verdict: {data['verdict']}** "
             f"({sum(c['status'] == 'FAIL' for c in data['checks'])} failed, "
             f"{sum(c['status'] == 'PASS' for c in data['checks'])} passed, "
             f"{sum(c['status'] == 'WARN' for c in data['checks'])} warnings, "
             f"{len(data['skipped'])} skipped)", ""]
    if data["recommended_packed_attention"]:
        lines += [f"Recommended `train.packed_attention` on this GPU: "
                  f"{data['recommended_packed_attention']}", ""]
    lines += ["## Checks", "", "| check | status | detail |", "|---|---|---|"]
    for check in data["checks"]:
        if check["status"] != "SKIP":
            lines.append(f"| {check['name']} | {check['status']} | "
                         f"{check['reason'].replace('|', '/')} |")
    lines += ["", "## Skipped", ""]
    lines += [f"- {item}" for item in data["skipped"]] or ["(none)"]
    lines += ["", "## Throughput", "",
              "| size | setting | side | examples/s | real tokens/s | ratio to peer | TFLOP/s "
              "| MFU | peak memory | warm-up steps |", "|---|---|---|---|---|---|---|---|---|---|"]
    for size, settings in data["figures"].get("throughput", {}).items():
        for setting, sides in settings.items():
            for side, f in sides.items():
                ratio = f"{f['ratio_to_peer']:.2f}" if f.get("ratio_to_peer") else "n/a"
                lines.append(f"| {size} | {setting} | {side} | {f['examples_per_s']:.1f} | "
                             f"{f['real_tokens_per_s']:.0f} | {ratio} | {f['tflops']:.2f} | "
                             f"{f['mfu']} | {f['peak_memory']} | {f['warmup_steps']} |")
    concurrency = data["figures"].get("concurrency")
    if concurrency:
        lines += ["", "## Concurrent trainings", "",
                  f"{concurrency['trainings']} short minilm-l6 `mtbert train` runs "
                  f"({concurrency['steps']} steps each): K=1 {concurrency['k1_s']:.1f} s, "
                  f"K={concurrency['k']} {concurrency['kk_s']:.1f} s, ratio K={concurrency['k']}"
                  f"/K=1 {concurrency['ratio']:.2f}"]
    lines += ["", "Tolerances (relative L2 error against the fp32 padded reference): " +
              "; ".join(f"{p}: " + ", ".join(f"{k} {v:g}" for k, v in t.items())
                        for p, t in data["tolerances"].items()),
              "", "Seconds per section: " + ", ".join(
                  f"{k} {v:.0f}" for k, v in data["section_seconds"].items()), ""]
    return "\n".join(lines)


def section(report: Report, name: str, run: Callable[[], None]) -> None:
    """Run one section; an exception there is a FAIL naming it, and the next section runs."""
    tic = time.perf_counter()
    print(f"--- {name}", flush=True)
    try:
        run()
    except Exception as err:  # noqa: BLE001 - first contact: record it, go on with the rest
        report.add(name, "FAIL", f"error: {type(err).__name__}: {str(err)[:300]}",
                   traceback=traceback.format_exc(limit=8))
    finally:
        report.seconds[name] = round(time.perf_counter() - tic, 1)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        report.write()


# ---------------------------------------------------------------- the models checked

@dataclass
class Size:
    """A model size: a fresh CPU encoder on each call, and the tokenizer directory."""

    name: str
    build: Callable[[], BertEncoder]
    tokenizer_dir: Path


def load_encoder(directory: Path) -> BertEncoder:
    encoder = BertEncoder(read_bert_config(directory))
    load_hf_state_dict(encoder, read_checkpoint(directory), str(directory))
    return encoder


def random_encoder(config: BertConfig) -> Callable[[], BertEncoder]:
    def build() -> BertEncoder:
        torch.manual_seed(0)
        return BertEncoder(config)
    return build


def write_tiny_checkpoint(directory: Path, tokenizer_dir: Path | None) -> Path:
    """A tiny random BERT (TINY) in Hugging Face format, with `tokenizer_dir`'s tokenizer
    or, without one, a vocabulary of the toy data's words."""
    directory.mkdir(parents=True, exist_ok=True)
    if tokenizer_dir is not None:
        for name in TOKENIZER_FILES:
            if (tokenizer_dir / name).exists():
                shutil.copy(tokenizer_dir / name, directory / name)
        vocab_size = read_bert_config(tokenizer_dir).vocab_size
    else:
        vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *TOY_WORDS]
        (directory / "vocab.txt").write_text("\n".join(vocab) + "\n")
        vocab_size = len(vocab)
    torch.manual_seed(0)
    model = BertEncoder(BertConfig(vocab_size=vocab_size, **TINY))
    (directory / "config.json").write_text(json.dumps(model.config.to_hf_dict()))
    from safetensors.torch import save_file
    save_file(to_hf_state_dict(model), str(directory / "model.safetensors"))
    return directory


TOY_WORDS = ("good great fine fun bad awful dull poor movie film plot actor scene story man "
             "woman dog cat plays runs eats sings guitar piano food fast slow big small what "
             "how why is are the a an do does can you i it").split()


def write_toy_data(directory: Path, n: int = 96) -> Path:
    """Tiny SST/QQP/STS train and dev files in the CS224N format (lengths 3-24 words)."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    words = lambda: " ".join(rng.choice(TOY_WORDS) for _ in range(rng.randint(3, 24)))  # noqa: E731
    for split in ("train", "dev"):
        sst = ["\tid\tsentence\tsentiment"]
        qqp = ["\tid\tsentence1\tsentence2\tis_duplicate"]
        sts = ["\tid\tsentence1\tsentence2\tsimilarity"]
        for i in range(n):
            sst.append(f"{i}\ts{split}{i}\t{words()}\t{i % 5}")
            qqp.append(f"{i}\tq{split}{i}\t{words()}\t{words()}\t{float(i % 2)}")
            sts.append(f"{i}\tt{split}{i}\t{words()}\t{words()}\t{i % 6:.1f}")
        (directory / f"ids-sst-{split}.csv").write_text("\n".join(sst) + "\n")
        (directory / f"quora-{split}.csv").write_text("\n".join(qqp) + "\n")
        (directory / f"sts-{split}.csv").write_text("\n".join(sts) + "\n")
    return directory


# ---------------------------------------------------------------- 1-2: correctness, kernels

def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


def grad_errors(grads: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> dict:
    """The global relative error of all gradients, and the worst parameter's."""
    if grads.keys() != ref.keys():
        missing = sorted(ref.keys() ^ grads.keys())
        return {"grads": float("inf"), "grad_worst": float("inf"),
                "grad_worst_name": f"parameters with and without gradient: {missing[:4]}"}
    diff = sum(float((grads[n] - ref[n]).pow(2).sum()) for n in ref) ** 0.5
    total = sum(float(ref[n].pow(2).sum()) for n in ref) ** 0.5
    worst, worst_name = 0.0, ""
    for name in ref:
        norm = float(ref[name].norm())
        if norm > 1e-6 * total:
            err = float((grads[name] - ref[name]).norm()) / norm
            if err > worst:
                worst, worst_name = err, name
    return {"grads": diff / max(total, 1e-30), "grad_worst": worst,
            "grad_worst_name": worst_name}


def model_pass(model: MultitaskModel, sets, batches, device: torch.device, *, kernel: str,
               pad_multiple: int, bf16: bool, probes: dict) -> tuple:
    """Head outputs, last hidden states of the real tokens (sequence after sequence) and
    every parameter's gradient of one pass over `batches` in eval mode (no dropout). The
    loss adds a fixed random projection of the hidden states to the task losses, so that
    every token's output reaches the gradients, not only [CLS]'s."""
    model.zero_grad(set_to_none=True)
    if kernel != "padded":
        model.encoder.packed_kernel = kernel
    captured: list[torch.Tensor] = []
    hook = model.encoder.layers[-1].register_forward_hook(lambda m, i, o: captured.append(o))
    outputs, hidden = [], []
    try:
        for task, indices in batches:
            dataset = sets[task]
            dataset.packed, dataset.pad_multiple = kernel != "padded", pad_multiple
            batch = dataset.batch(indices).to(device)
            with autocast(device) if bf16 else contextlib.nullcontext():
                out = model(batch)
            h = captured.pop()
            if not batch.packed:
                h = h[batch.views[0][1].bool()]  # (N, d) real tokens
            h = h.float()
            if task not in probes:
                generator = torch.Generator().manual_seed(len(probes))
                probes[task] = torch.randn(h.shape, generator=generator).to(device)
            loss = dataset.task.loss(out.float(), batch.labels) + \
                (h * probes[task]).sum() / h.shape[0]
            loss.backward()
            outputs.append(out.detach().float().flatten())
            hidden.append(h.detach().flatten())
    finally:
        hook.remove()
    grads = {n: p.grad.detach().float().clone() for n, p in model.named_parameters()
             if p.grad is not None}
    return torch.cat(outputs), torch.cat(hidden), grads


def reference_attention(qkv: torch.Tensor, cu_seqlens: list[int], n_head: int) -> torch.Tensor:
    """softmax(q k^T / sqrt(hs)) v of each sequence alone, in fp32: (N, C)."""
    C = qkv.shape[1] // 3
    hs = C // n_head
    out = []
    for start, end in zip(cu_seqlens[:-1], cu_seqlens[1:]):
        q, k, v = qkv[start:end].float().view(end - start, 3, n_head, hs).permute(1, 2, 0, 3)
        weights = torch.softmax(q @ k.transpose(-1, -2) / hs ** 0.5, dim=-1)  # (nh, L, L)
        out.append((weights @ v).transpose(0, 1).reshape(end - start, C))
    return torch.cat(out)


def precisions(device: torch.device, kernel: str) -> list[str]:
    if device.type != "cuda":
        return ["fp32"]
    return ["bf16"] if kernel == "varlen" else ["fp32", "bf16"]


def kernel_unavailable(kernel: str, device: torch.device) -> str | None:
    if kernel == "varlen" and device.type != "cuda":
        return "CUDA only (FlashAttention varlen)"
    if kernel == "varlen" and varlen_attention() is None:
        return f"torch {torch.__version__} has no torch.nn.attention.varlen (needs >= 2.10)"
    return None


def check_correctness(report: Report, size: Size, sets, config, device: torch.device,
                      kernels: list[str], batch_size: int) -> None:
    rng = np.random.default_rng(0)
    batches = [(t, rng.permutation(len(sets[t]))[:batch_size]) for t in TASKS]
    torch.manual_seed(0)
    model = MultitaskModel(size.build(), [get_task(t) for t in TASKS], config.model)
    model.to(device).eval()
    probes: dict = {}
    ref_out, ref_hidden, ref_grads = model_pass(model, sets, batches, device, kernel="padded",
                                                pad_multiple=1, bf16=False, probes=probes)
    n_head, C = model.encoder.config.num_attention_heads, model.encoder.config.hidden_size
    sets[TASKS[1]].packed, sets[TASKS[1]].pad_multiple = True, PAD_MULTIPLE
    view: PackedView = sets[TASKS[1]].batch(batches[1][1]).views[0]  # a real batch's layout
    generator = torch.Generator().manual_seed(0)
    qkv = torch.randn(view.ids.shape[0], 3 * C, generator=generator)
    ref_attention = reference_attention(qkv, view.cu_seqlens.tolist(), n_head).to(device)
    device_view = Batch("qqp", [view], None, np.arange(view.n_seqs)).to(device).views[0]
    for kernel in kernels:
        reason = kernel_unavailable(kernel, device)
        for precision in precisions(device, kernel) if reason is None else ["bf16"]:
            name = f"correctness/{size.name}/{kernel}/{precision}"
            if reason is not None:
                report.skip(name, reason)
                continue
            tol = TOLERANCES[precision]
            errors = {}
            if kernel != "padded":
                dtype = torch.bfloat16 if precision == "bf16" else torch.float32
                y = PackedAttention(device_view, kernel)(qkv.to(device, dtype), n_head, 0.0)
                errors["attention"] = rel_err(y, ref_attention)
            out, hidden, grads = model_pass(model, sets, batches, device, kernel=kernel,
                                            pad_multiple=PAD_MULTIPLE,
                                            bf16=precision == "bf16", probes=probes)
            errors.update(outputs=rel_err(out, ref_out), hidden=rel_err(hidden, ref_hidden),
                          **grad_errors(grads, ref_grads))
            over = [f"{k} {errors[k]:.2e} > {tol[k]:g}" for k in tol
                    if k in errors and not errors[k] <= tol[k]]
            shown = ", ".join(f"{k} {errors[k]:.1e}" for k in tol if k in errors)
            report.add(name, "FAIL" if over else "PASS",
                       ("; ".join(over) + f" (worst: {errors['grad_worst_name']})") if over
                       else f"rel. errors {shown}", errors=errors, tolerance=tol)
    del model


def attention_ops(kernel: str, size: Size, sets, config, device: torch.device,
                  batch_size: int) -> dict:
    """Profiler names of the attention ops and kernels of one forward + backward."""
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    model = MultitaskModel(size.build(), [get_task(t) for t in TASKS], config.model)
    model.to(device).train()
    if kernel != "padded":
        model.encoder.packed_kernel = kernel
    dataset = sets[TASKS[1]]
    dataset.packed, dataset.pad_multiple = kernel != "padded", PAD_MULTIPLE
    indices = np.arange(min(batch_size, len(dataset)))

    def step() -> None:
        batch = dataset.batch(indices).to(device)
        with autocast(device):
            loss = dataset.task.loss(model(batch), batch.labels)
        loss.backward()
        train_step.sync(device)

    step()  # first call: lazy initialisation stays out of the profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda"
                                           else [])
    with profile(activities=activities) as prof:
        step()
    ops: Counter[str] = Counter()
    kernels: Counter[str] = Counter()
    for event in prof.events():
        if not ATTENTION_PATTERN.search(event.name):
            continue
        on_device = str(getattr(event, "device_type", "")).endswith("CUDA")
        (kernels if on_device else ops)[event.name[:120]] += 1
    backends = sorted({label for op in ops for pattern, label in BACKENDS if pattern in op})
    return {"ops": dict(ops), "cuda_kernels": dict(kernels), "backends": backends,
            "layers": model.encoder.config.num_hidden_layers}


def check_kernels(report: Report, size: Size, sets, config, device: torch.device,
                  kernels: list[str], batch_size: int) -> None:
    for kernel in kernels:
        name = f"kernels/{size.name}/{kernel}"
        reason = kernel_unavailable(kernel, device)
        if reason is not None:
            report.skip(name, reason)
            continue
        found = attention_ops(kernel, size, sets, config, device, batch_size)
        math_calls = sum(n for op, n in found["ops"].items()
                         if "_scaled_dot_product_attention_math" in op)
        status, reason = "INFO", f"backends {', '.join(found['backends']) or 'none named'}"
        if device.type == "cuda":
            reason += f"; CUDA kernels: {', '.join(sorted(found['cuda_kernels'])[:4]) or 'none'}"
            if math_calls:
                # A fallback: slow, not wrong. Per-sequence splits show as more calls than layers.
                status = "WARN"
                reason += (f"; math fallback ({math_calls} calls for "
                           f"{found['layers']} layers)")
            else:
                status = "PASS"
        report.add(name, status, reason, **found)
        report.figures.setdefault("kernels", {}).setdefault(size.name, {})[kernel] = found
    if device.type != "cuda":
        report.skip(f"kernels/{size.name}/cuda-kernel-names",
                    "CUDA only (the profiler's CUDA activity)")


# ---------------------------------------------------------------- 3: host syncs

def count_syncs(run: Callable[[], None]) -> tuple[int, dict[str, int]]:
    """Host syncs of `run` on CUDA, by the Python line that caused each."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            run()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    return len(syncs), dict(Counter(f"{Path(w.filename).name}:{w.lineno}" for w in syncs))


def check_kernel_syncs(report: Report, sides: list, item: tuple, size: str,
                       device: torch.device) -> None:
    """Host syncs in one training step (batch copy, forward, backward, clipping, fused
    AdamW) of each side, after its warm-up."""
    for side in sides:
        name = f"syncs/step/{size}/{side.name}"
        if device.type != "cuda":
            report.skip(name, "CUDA only (torch.cuda.set_sync_debug_mode)")
            continue
        count, where = count_syncs(lambda: side.step(item[0], item[1]))
        peer = side.name == "peer"  # measured for comparison; not ours to fix
        status = "INFO" if peer else ("PASS" if count == 0 else "WARN")
        report.add(name, status, f"{count} host syncs per step" +
                   (f" at {', '.join(f'{k} x{v}' for k, v in where.items())}" if where else ""),
                   syncs=count, where=where)


def check_loss_method_syncs(report: Report, encoder_dir: Path, data_dir: str, work: Path,
                            device: torch.device, batch_size: int) -> None:
    """One full training step (`mtbert.train`'s own) of each loss method: no host sync.
    On CPU the steps run (the code is exercised) and the counting is skipped."""
    from mtbert.train import _EpochSums, _train_step, setup

    for method in LOSS_METHODS:
        name = f"syncs/loss-method/{method}"
        config = build_config({
            "model": {"encoder": str(encoder_dir), "max_length": 128},
            "data": {"dir": data_dir, "max_train_examples": 4 * batch_size,
                     "max_eval_examples": 8, "cache_dir": str(work / "cache")},
            # One batch of every task per step: what per-step methods need, and a step
            # that holds all three heads for the others.
            "train": {"batch_size": batch_size, "epochs": 1, "steps_per_epoch": 4,
                      "schedule": "round_robin_batch"},
            "loss": {"method": method}})
        s = setup(config, work / f"loss-{method}", device)
        s.model.train()
        plan = s.schedule.plan(0, 4 * s.per_step)
        groups = [plan[i * s.per_step:(i + 1) * s.per_step] for i in range(4)]
        sums = _EpochSums(list(s.data.train), list(s.auxiliary), s.device)
        if device.type != "cuda":
            _train_step(s, groups[0], sums)
            report.skip(name, "CUDA only (torch.cuda.set_sync_debug_mode); the step ran on CPU")
            continue
        for group in groups[:3]:  # first steps: optimizer state, GradNorm's first losses
            _train_step(s, group, sums)
        count, where = count_syncs(lambda: _train_step(s, groups[3], sums))
        report.add(name, "PASS" if count == 0 else "FAIL",
                   f"{count} host syncs in one step" +
                   (f" at {', '.join(f'{k} x{v}' for k, v in where.items())}" if where else ""),
                   syncs=count, where=where)


# ---------------------------------------------------------------- 4: out of memory

def train_command(config_file: Path, out: Path, device: str, *, prelude: str = "") -> list[str]:
    """`mtbert -q train CONFIG --out OUT --device DEVICE` in a fresh interpreter,
    `prelude` (Python) run first."""
    argv = ["mtbert", "-q", "train", str(config_file), "--out", str(out), "--device", device]
    code = (f"import sys\n{prelude}\nsys.argv = {argv!r}\n"
            "from mtbert.cli import run\nrun()\n")
    return [sys.executable, "-c", code]


def child_env() -> dict[str, str]:
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": str(ROOT) + (os.pathsep + path if path else "")}


def write_config(path: Path, encoder_dir: Path, data_dir: str, cache: Path, **train) -> Path:
    import yaml
    path.write_text(yaml.safe_dump({
        "model": {"encoder": str(Path(encoder_dir).resolve()), "max_length": 128},
        "data": {"dir": str(Path(data_dir).resolve()), "cache_dir": str(cache),
                 "max_train_examples": train.pop("examples"),
                 "max_eval_examples": train.pop("eval_examples")},
        "train": train}))
    return path


def check_oom(report: Report, encoder_dir: Path, data_dir: str, work: Path,
              device: torch.device) -> None:
    name = "oom/mtbert-train"
    if device.type != "cuda":
        report.skip(name, "CUDA only (torch.cuda.set_per_process_memory_fraction)")
        return
    total = torch.cuda.get_device_properties(device).total_memory
    # 0.75 GiB holds minilm-l6's weights, gradients and AdamW state (~0.4 GB), not the
    # activations of 2,048 sequences (~5 GB in bf16).
    fraction = 0.75 * 2**30 / total
    config = write_config(work / "oom.yaml", encoder_dir, data_dir, work / "cache",
                          examples=4096, eval_examples=64, epochs=1, steps_per_epoch=2,
                          batch_size=2048)
    command = train_command(config, work / "oom-run", "cuda", prelude=(
        f"import torch\ntorch.cuda.set_per_process_memory_fraction({fraction!r})"))
    done = subprocess.run(command, capture_output=True, text=True, env=child_env(),
                          cwd=work, timeout=300)
    last = (done.stderr.strip().splitlines() or [""])[-1]
    ok = done.returncode != 0 and "out of GPU memory" in last and \
        "Traceback" not in done.stderr
    report.add(name, "PASS" if ok else "FAIL",
               f"exit {done.returncode}: {last[:200]}" if ok else
               f"expected the one-line 'out of GPU memory' error, got exit {done.returncode}: "
               f"{done.stderr.strip()[-300:]}",
               fraction=fraction, exit_code=done.returncode, stderr_tail=done.stderr[-2000:])


# ---------------------------------------------------------------- 5: throughput

def check_throughput(report: Report, size: Size, sets, config, device: torch.device,
                     kernels: list[str], settings: list[tuple[str, int, int]],
                     steps: int, blocks: int, warmup: int) -> None:
    peer = importlib.util.find_spec("transformers") is not None
    if not peer:
        report.skip(f"throughput/{size.name}/peer", "transformers is not installed")
    runnable = [k for k in kernels if kernel_unavailable(k, device) is None]
    base = size.build()
    for k, (setting, batch_size, tokens) in enumerate(settings):
        name = f"throughput/{size.name}/{setting}"
        batches = train_step.step_batches(sets, base.config, batch_size=batch_size,
                                          tokens=tokens, n=warmup + steps * blocks)
        sides = train_step.make_sides(copy.deepcopy(base), sets, config, device,
                                      kernels=runnable, peer=peer)
        warm, timed = batches[:warmup], batches[warmup:]
        working = []
        for side in sides:
            try:
                side.warm_up(warm, timed)
                working.append(side)
            except Exception as err:  # noqa: BLE001 - one path failing leaves the others
                report.add(f"{name}/{side.name}", "FAIL",
                           f"error: {type(err).__name__}: {str(err)[:300]}",
                           traceback=traceback.format_exc(limit=8))
        if not working:
            continue
        if k == 0:
            check_kernel_syncs(report, working, timed[0], size.name, device)
        train_step.time_blocks(working, timed, steps=steps, blocks=blocks, device=device)
        figures = {side.name: side.figures() for side in working}
        peer_rate = figures.get("peer", {}).get("examples_per_s")
        for f in figures.values():
            f["ratio_to_peer"] = f["examples_per_s"] / peer_rate if peer_rate else None
        report.figures.setdefault("throughput", {}).setdefault(size.name, {})[setting] = figures
        best = max((s for s in figures if s != "peer"), key=lambda s: figures[s]["examples_per_s"],
                   default=None)
        note = "" if device.type == "cuda" else "; CPU, tiny model: exercises the code, " \
            "not a figure"
        report.add(name, "INFO", f"fastest of ours: {best}" + (
            f", {figures[best]['ratio_to_peer']:.2f}x the peer" if best and peer_rate else "")
            + note)
        del sides, working
        if device.type == "cuda":
            torch.cuda.empty_cache()


def recommend(report: Report) -> None:
    """The fastest packed kernel at batch 32 of each size whose correctness checks passed."""
    failed = {c["name"].split("/")[2] if c["name"].count("/") == 3 else "every kernel"
              for c in report.failed if c["name"].startswith("correctness/")}
    if "every kernel" in failed:  # a correctness section broke off: nothing is vouched for
        return
    picks = {}
    for size, settings in report.figures.get("throughput", {}).items():
        figures = settings.get("batch 32", {})
        packed = {s.removeprefix("ours-"): f["examples_per_s"] for s, f in figures.items()
                  if s.startswith("ours-") and s != "ours-padded"
                  and s.removeprefix("ours-") not in failed}
        if packed:
            best = max(packed, key=packed.get)
            picks[size] = f"{best} ({packed[best] / packed.get('grid', packed[best]):.2f}x grid)"
    if picks:
        report.recommendation = "; ".join(f"{size}: {pick}" for size, pick in picks.items())


# ---------------------------------------------------------------- 6: concurrent trainings

def run_trainings(commands: list[list[str]], k: int, *, env: dict, cwd: Path,
                  timeout: float = 600) -> tuple[float, list[dict]]:
    """Run `commands` with at most `k` at once; the wall time and each one's exit code
    and last stderr line."""
    results: list[dict] = [{} for _ in commands]
    running: list[tuple[int, subprocess.Popen]] = []
    pending = list(enumerate(commands))
    tic = time.perf_counter()
    while pending or running:
        while pending and len(running) < k:
            i, command = pending.pop(0)
            running.append((i, subprocess.Popen(command, env=env, cwd=cwd, text=True,
                                                stdout=subprocess.PIPE,
                                                stderr=subprocess.PIPE)))
        i, process = running.pop(0)
        try:
            _, stderr = process.communicate(timeout=max(1.0, timeout - (time.perf_counter() - tic)))
        except subprocess.TimeoutExpired:
            process.kill()
            _, stderr = process.communicate()
        lines = stderr.strip().splitlines()
        results[i] = {"exit_code": process.returncode, "stderr_tail": lines[-1] if lines else ""}
    return time.perf_counter() - tic, results


def check_concurrency(report: Report, encoder_dir: Path, data_dir: str, work: Path,
                      device: torch.device, *, trainings: int, steps: int) -> None:
    name = f"concurrency/k1-vs-k{trainings}"
    if device.type != "cuda":
        report.skip(name, "CUDA only (several trainings on one GPU)")
        return
    from mtbert.tokenize import Tokenizer
    from mtbert.train import load_task_data
    config_file = write_config(work / "short.yaml", encoder_dir, data_dir, work / "cache",
                               examples=2000, eval_examples=300, epochs=1,
                               steps_per_epoch=steps, batch_size=32)
    from mtbert.config import load_config
    load_task_data(load_config(config_file), Tokenizer(encoder_dir))  # fills the token cache
    walls, runs = {}, {}
    for k in (1, trainings):
        commands = [train_command(config_file, work / f"k{k}-run{i}", "cuda")
                    for i in range(trainings)]
        walls[k], runs[k] = run_trainings(commands, k, env=child_env(), cwd=work)
        for i, result in enumerate(runs[k]):
            summary = work / f"k{k}-run{i}" / "summary.json"
            if summary.exists():
                data = json.loads(summary.read_text())
                result.update(train_time_s=data["train_time_s"],
                              examples_per_s=data["examples_per_s"])
    failures = [r for rs in runs.values() for r in rs if r["exit_code"] != 0]
    ratio = walls[trainings] / walls[1]
    report.figures["concurrency"] = {"trainings": trainings, "steps": steps, "k": trainings,
                                     "k1_s": walls[1], "kk_s": walls[trainings],
                                     "ratio": ratio, "runs": runs}
    report.add(name, "FAIL" if failures else "INFO",
               f"{len(failures)} of {2 * trainings} trainings failed: "
               f"{failures[0]['stderr_tail'][:200]}" if failures else
               f"{trainings} trainings: K=1 {walls[1]:.1f} s, K={trainings} "
               f"{walls[trainings]:.1f} s, ratio {ratio:.2f}")


# ---------------------------------------------------------------- main

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="The first command on a GPU: checks mtbert's CUDA path (attention "
        f"paths {', '.join(KERNELS)}), takes the figures, writes OUT/gpu_check.json and "
        "OUT/gpu_check.md. Without CUDA it runs a tiny model on CPU.",
        epilog="Kernels: padded = train.packing=padded (dense SDPA over padded batches); "
               "grid, nested, varlen = train.packed_attention on packed batches (varlen: "
               "CUDA and torch >= 2.10 only).")
    parser.add_argument("--out", type=Path, required=True, help="folder for the two reports")
    parser.add_argument("--encoder", default=None,
                        help="minilm-l6's Hugging Face directory (e.g. .carry/minilm-l6); its "
                             "tokenizer serves bert-base size too (default: the minilm-l6 "
                             "package; with --tiny: optional, a toy vocabulary without it)")
    parser.add_argument("--data-dir", default=os.environ.get("MTBERT_DATA_DIR"),
                        help="CS224N task files (e.g. .carry/data; with --tiny: optional, toy "
                             "files without it)")
    parser.add_argument("--device", choices=("cuda", "cpu"),
                        default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true",
                        help="a tiny random model instead of bert-base and minilm-l6 sizes "
                             "(always without CUDA)")
    parser.add_argument("--kernels", default=",".join(KERNELS),
                        help=f"attention paths to check, comma-separated (default "
                             f"{','.join(KERNELS)})")
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help=f"sections to run (default {','.join(SECTIONS)})")
    parser.add_argument("--steps", type=int, default=12, help="timed steps per block and side")
    parser.add_argument("--blocks", type=int, default=3, help="timed blocks per setting")
    parser.add_argument("--warmup", type=int, default=6,
                        help="untimed steps per side before one of every timed batch shape")
    parser.add_argument("--trainings", type=int, default=4,
                        help="short trainings run one at a time, then all at once (K)")
    parser.add_argument("--train-steps", type=int, default=200,
                        help="optimizer steps of each short training")
    parser.add_argument("--keep-work", action="store_true",
                        help="keep the scratch folder (run directories, token cache) and "
                             "print where it is")
    args = parser.parse_args(argv)
    args.kernels = [k for k in args.kernels.split(",") if k]
    args.sections = [s for s in args.sections.split(",") if s]
    for value, valid, option in ((args.kernels, KERNELS, "--kernels"),
                                 (args.sections, SECTIONS, "--sections")):
        bad = [v for v in value if v not in valid]
        if bad:
            parser.error(f"{option}: unknown {', '.join(bad)}; valid: {', '.join(valid)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: PyTorch sees no CUDA device")
    args.tiny = args.tiny or args.device == "cpu"
    if not args.tiny and not args.data_dir:
        parser.error("--data-dir is required (e.g. .carry/data) unless --tiny")
    return args


def environment(device: torch.device, mode: str, argv: list[str]) -> dict:
    try:
        import transformers
        hf = transformers.__version__
    except ImportError:
        hf = "not installed"
    cuda = device.type == "cuda"
    return {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "device": device.type, "mode": mode,
            "device_name": torch.cuda.get_device_name(device) if cuda else
            f"CPU ({platform.processor() or platform.machine()}, "
            f"{torch.get_num_threads()} threads)",
            "capability": ".".join(map(str, torch.cuda.get_device_capability(device)))
            if cuda else None,
            "torch": torch.__version__, "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if cuda else None,
            "transformers": hf, "python": platform.python_version(),
            "command": " ".join(["python", "bench/gpu_check.py", *argv])}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Run directories, token cache, toy files: in a scratch folder, not in --out, which
    # then holds the two reports only (and fits what a GPU machine sends back).
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    cache = os.environ.get("MTBERT_CACHE_DIR")
    os.environ.setdefault("MTBERT_CACHE_DIR", str(work / "cache"))
    try:
        return run_checks(args, work, sys.argv[1:] if argv is None else argv)
    finally:
        if cache is None:
            os.environ.pop("MTBERT_CACHE_DIR", None)
        if args.keep_work:
            print(f"gpu_check: scratch folder kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def run_checks(args: argparse.Namespace, work: Path, argv: list[str]) -> int:
    device = torch.device(args.device)
    started = time.perf_counter()
    out = args.out.resolve()  # children run in other folders
    report = Report(out, environment(device, "cpu-tiny" if args.tiny else "cuda", argv))

    data_dir = args.data_dir or str(write_toy_data(work / "data"))
    if args.tiny:
        tokenizer_dir = resolve_encoder(args.encoder) if args.encoder else None
        encoder_dir = write_tiny_checkpoint(work / "tiny-encoder", tokenizer_dir)
        sizes = [Size("tiny", lambda: load_encoder(encoder_dir), encoder_dir)]
        batch_size, settings = 8, [("batch 8", 8, 0)]
        steps, blocks, warmup = 2, 1, 1
        if device.type == "cpu":
            torch.set_num_threads(1)  # a tiny model gains nothing from threads
    else:
        encoder_dir = resolve_encoder(args.encoder or "minilm-l6")
        sizes = [Size("bert-base", random_encoder(BertConfig(**train_step.BERT_BASE)),
                      encoder_dir),
                 Size("minilm-l6", lambda: load_encoder(encoder_dir), encoder_dir)]
        batch_size = 32
        settings = [("batch 32", 32, 0), ("batch 16", 16, 0)]
        steps, blocks, warmup = args.steps, args.blocks, args.warmup
    config, sets = train_step.load_sets(encoder_dir, data_dir, 3000)

    for size in sizes:
        if "correctness" in args.sections:
            section(report, f"correctness/{size.name}", lambda: check_correctness(
                report, size, sets, config, device, args.kernels, batch_size))
            section(report, f"kernels/{size.name}", lambda: check_kernels(
                report, size, sets, config, device, args.kernels, batch_size))
    if "syncs" in args.sections:
        section(report, "syncs/loss-method", lambda: check_loss_method_syncs(
            report, encoder_dir, data_dir, work, device, batch_size))
    if "oom" in args.sections:
        section(report, "oom", lambda: check_oom(report, encoder_dir, data_dir, work, device))
    if "throughput" in args.sections:
        for size in sizes:
            extra = [("8192 real tokens", 0, 8192)] if size.name == "bert-base" else []
            section(report, f"throughput/{size.name}", lambda: check_throughput(
                report, size, sets, config, device, args.kernels, settings + extra,
                steps, blocks, warmup))
        if args.tiny:
            for size in ("bert-base", "minilm-l6"):
                report.skip(f"throughput/{size}", "GPU figures: CUDA only")
            report.skip("mfu/bert-base/8192-real-tokens", "CUDA only (bf16 dense peak)")
        recommend(report)
    if "concurrency" in args.sections:
        section(report, "concurrency", lambda: check_concurrency(
            report, encoder_dir, data_dir, work, device, trainings=args.trainings,
            steps=args.train_steps))
    report.seconds["total"] = round(time.perf_counter() - started, 1)
    report.write()
    failed = report.failed
    print(f"gpu_check: {'FAIL' if failed else 'PASS'} ({len(failed)} failed) in "
          f"{report.seconds['total']:.0f} s; {out / 'gpu_check.md'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
