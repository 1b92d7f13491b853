"""Parameter groups (layer-wise learning rates, weight decay) and the LR schedule.

Layer-wise LR decay (Howard & Ruder 2018; Sun et al. 2019 for BERT): with
L layers numbered 1..L from the bottom, layer l trains at lr * xi^(L-l), the
embeddings at lr * xi^L (lowest), the pooler and the task heads at lr.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from mtbert.config import OptimConfig


def param_groups(model: nn.Module, *, lr: float, config: OptimConfig) -> list[dict]:
    """AdamW groups: one per (depth, decay) pair, each with its own `lr`.

    Biases and LayerNorm weights (every parameter with fewer than 2 dims) get
    no weight decay, as in BERT's own optimiser.
    """
    encoder = model.encoder
    L = encoder.config.num_hidden_layers
    groups: dict[tuple[int, bool], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        depth = encoder.layer_of(name.removeprefix("encoder.")) \
            if name.startswith("encoder.") else L + 1
        decay = param.ndim >= 2
        key = (min(depth, L), decay)
        if key not in groups:
            scale = config.layer_decay ** (L - min(depth, L))
            groups[key] = {"params": [], "names": [], "lr": lr * scale,
                           "weight_decay": config.weight_decay if decay else 0.0}
        groups[key]["params"].append(param)
        groups[key]["names"].append(name)
    return [groups[k] for k in sorted(groups)]


def make_optimizer(model: nn.Module, *, lr: float, config: OptimConfig,
                   device: torch.device) -> torch.optim.AdamW:
    groups = param_groups(model, lr=lr, config=config)
    # The fused kernel exists on CPU and CUDA; on 2 CPU cores it made a minilm-l6
    # optimizer step 5x faster than the foreach one (0.13 s -> 0.023 s).
    return torch.optim.AdamW(groups, lr=lr, fused=device.type in ("cpu", "cuda"))


def linear_schedule(optimizer: torch.optim.Optimizer, *, warmup: float,
                    total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over `warmup` x total steps, then linear decay to 0."""
    warmup_steps = round(warmup * total_steps)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
