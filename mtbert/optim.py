"""Parameter groups (layer-wise learning rates, weight decay), freezing, the LR schedule.

Layer-wise LR decay (Howard & Ruder 2018; Sun et al. 2019 for BERT): with
L layers numbered 1..L from the bottom, layer l trains at lr * xi^(L-l), the
embeddings at lr * xi^L (lowest), the pooler and the task heads at lr.
Layer scales multiply the LR of listed layer sets on top of that (a higher
LR for the top layers, as the research's alpha/beta split did); each head
may have its own LR. Frozen parameters stay in the optimizer with
requires_grad off, so that `optim.unfreeze_after` can switch them on.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from mtbert.config import OptimConfig, parse_layer_set
from mtbert.errors import ConfigError


def layer_scale_of(config: OptimConfig, num_layers: int) -> dict[int, float]:
    """LR multiplier per encoder depth (0 embeddings, 1..L layers) from optim.layer_scales."""
    scales = {depth: 1.0 for depth in range(num_layers + 1)}
    for spec, scale in config.layer_scales.items():
        bounds = parse_layer_set(spec)
        if bounds is None:
            scales[0] = scale
            continue
        if bounds[1] >= num_layers:
            raise ConfigError(f"optim.layer_scales key '{spec}' names layer {bounds[1]}, but "
                              f"the encoder has layers 0..{num_layers - 1}")
        for layer in range(bounds[0], bounds[1] + 1):
            scales[layer + 1] = scale
    return scales


def param_groups(model: nn.Module, *, lr: float, config: OptimConfig) -> list[dict]:
    """AdamW groups: one per (depth, decay, head) triple, each with its own `lr`.

    Biases and LayerNorm weights (every parameter with fewer than 2 dims) get
    no weight decay, as in BERT's own optimiser. Frozen parameters are
    included (they get no gradient, so AdamW leaves them as they are).
    """
    encoder = model.encoder
    L = encoder.config.num_hidden_layers
    scales = layer_scale_of(config, L)
    groups: dict[tuple[int, bool, str], dict] = {}
    for name, param in model.named_parameters():
        decay = param.ndim >= 2
        if name.startswith("encoder."):
            depth, task = encoder.layer_of(name.removeprefix("encoder.")), ""
            group_lr = lr if depth > L else \
                lr * config.layer_decay ** (L - depth) * scales[depth]
        else:  # heads.<task>.*, poolers.<task>.*
            depth, task = L + 1, name.split(".")[1]
            group_lr = config.head_lr.get(task, lr)
        key = (depth, decay, task)
        if key not in groups:
            groups[key] = {"params": [], "names": [], "lr": group_lr,
                           "weight_decay": config.weight_decay if decay else 0.0}
        groups[key]["params"].append(param)
        groups[key]["names"].append(name)
    return [groups[k] for k in sorted(groups)]


def apply_freezing(model: nn.Module, config: OptimConfig, epoch: int) -> int:
    """Sets requires_grad for `epoch` (0-based) by optim.freeze, optim.train_layers and
    optim.unfreeze_after; returns the number of trainable parameters."""
    encoder = model.encoder
    L = encoder.config.num_hidden_layers
    for layer in config.train_layers:
        if layer >= L:
            raise ConfigError(f"optim.train_layers names layer {layer}, but the encoder has "
                              f"layers 0..{L - 1}")
    thawed = config.unfreeze_after > 0 and epoch >= config.unfreeze_after
    trainable = {layer + 1 for layer in config.train_layers}
    for name, param in encoder.named_parameters():
        depth = encoder.layer_of(name)
        frozen = not thawed and (
            config.freeze == "encoder"
            or (config.freeze == "embeddings" and depth == 0)
            or (bool(trainable) and depth not in trainable))
        param.requires_grad_(not frozen)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


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
