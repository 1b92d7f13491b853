"""Loss combination and gradient methods: how the task losses of a step become gradients.

Each method is one small `nn.Module` registered by name (a module, so that
learned weights are parameters and every method's state is saved with the
resume state). The training loop calls `backward` once per batch, or, for
methods with `per_step = True`, once per optimizer step with the losses of
every task in the step; `after_step` after each optimizer step and
`end_epoch` with the epoch's mean task losses. Each method declares the
config keys it reads (`reads`).

| method | what it does | paper |
|---|---|---|
| sum | plain sum | |
| weighted | fixed weights `loss.weights.<task>` | |
| uncertainty | sum of exp(-s_i)/2 L_i + s_i/2, s_i = log sigma_i^2 learned | Kendall et al. 2018 |
| liebel | sum of L_i/(2 w_i^2) + ln(1 + w_i^2), w_i learned | Liebel & Koerner 2018 |
| dwa | weights K softmax(r_i/T), r_i the ratio of the last two epochs' (or `loss.dwa_window` steps') losses | Liu et al. 2019 |
| gradnorm | learned weights that equalise the tasks' gradient norms, scaled by training rates | Chen et al. 2018 |
| pcgrad | projects away the conflicting part of each task's encoder gradient | Yu et al. 2020 |
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, ClassVar, Iterable

import torch
import torch.nn as nn

from mtbert.errors import ConfigError

if TYPE_CHECKING:  # the config names the registries' entries; these modules only read it
    from mtbert.config import LossConfig

LOSS_METHODS: dict[str, type[LossCombiner]] = {}


def register(cls: type[LossCombiner]) -> type[LossCombiner]:
    LOSS_METHODS[cls.name] = cls
    return cls


class LossCombiner(nn.Module):
    name: ClassVar[str]
    # The run-config keys the method reads beyond those every run reads (train.seed); a
    # mapping key such as loss.weights stands for all its entries. A method with
    # parameters reads loss.weight_lr: the loop trains them at that rate.
    reads: ClassVar[tuple[str, ...]] = ()
    # True: `backward` gets the losses of every task of an optimizer step at once.
    per_step: ClassVar[bool] = False
    # True: the method multiplies each task's loss by a weight (fixed or learned), which
    # shapes the step only when the step holds several tasks or is not clipped.
    scales_task_losses: ClassVar[bool] = False

    def __init__(self, config: LossConfig, tasks: list[str], *, seed: int = 0):
        super().__init__()
        self.config = config
        self.tasks = tasks
        self.seed = seed

    def forward(self, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        """The combined scalar loss of the task losses present."""
        raise NotImplementedError

    def backward(self, losses: dict[str, torch.Tensor], model: nn.Module,
                 scale: float) -> torch.Tensor:
        """Adds the gradients of `scale` x the combined loss to `.grad`; returns that loss."""
        loss = self(losses) * scale
        loss.backward()
        return loss.detach()

    def after_step(self) -> None:
        """Called after every optimizer step."""

    def end_epoch(self, task_losses: dict[str, float]) -> None:
        """Called with each task's mean training loss of the epoch just ended."""

    def task_weights(self) -> dict[str, float]:
        """The current weight of each task's loss, as logged (`loss_weight/<task>`)."""
        return {}

    def _index(self, task: str) -> int:
        return self.tasks.index(task)


@register
class Sum(LossCombiner):
    """Plain sum of the task losses."""

    name = "sum"

    def forward(self, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.stack(list(losses.values())).sum()


@register
class Weighted(LossCombiner):
    """Fixed weights: sum of `loss.weights.<task>` x task loss."""

    name = "weighted"
    reads = ("loss.weights",)
    scales_task_losses = True

    def forward(self, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.stack([self.config.weights.get(t, 1.0) * loss
                            for t, loss in losses.items()]).sum()

    def task_weights(self) -> dict[str, float]:
        return {t: self.config.weights.get(t, 1.0) for t in self.tasks}


@register
class Uncertainty(LossCombiner):
    """Homoscedastic uncertainty weighting (Kendall, Gal & Cipolla 2018).

    L = sum_i exp(-s_i)/2 * L_i + s_i/2 with s_i = log sigma_i^2 learned from 0
    (the regression form of the paper, used for every task as LibMTL does). A
    task with a large loss learns a large sigma and a small weight exp(-s_i)/2;
    the s_i/2 term keeps sigma from growing without bound.
    """

    name = "uncertainty"
    reads = ("loss.weight_lr",)
    scales_task_losses = True

    def __init__(self, config: LossConfig, tasks: list[str], **kwargs):
        super().__init__(config, tasks, **kwargs)
        self.log_vars = nn.Parameter(torch.zeros(len(tasks)))

    def forward(self, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        terms = [0.5 * torch.exp(-self.log_vars[self._index(t)]) * loss
                 + 0.5 * self.log_vars[self._index(t)] for t, loss in losses.items()]
        return torch.stack(terms).sum()

    def task_weights(self) -> dict[str, float]:
        weights = (0.5 * torch.exp(-self.log_vars.detach())).tolist()
        return dict(zip(self.tasks, weights))


@register
class Liebel(LossCombiner):
    """Auxiliary-task weighting of Liebel & Koerner 2018:
    L = sum_i L_i / (2 w_i^2) + ln(1 + w_i^2), w_i learned from 1.

    Unlike log(w^2), the regulariser ln(1 + w^2) stays positive, so the total
    loss cannot go negative by shrinking a task's weight.
    """

    name = "liebel"
    reads = ("loss.weight_lr",)
    scales_task_losses = True

    def __init__(self, config: LossConfig, tasks: list[str], **kwargs):
        super().__init__(config, tasks, **kwargs)
        self.w = nn.Parameter(torch.ones(len(tasks)))

    def forward(self, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        terms = []
        for task, loss in losses.items():
            w2 = self.w[self._index(task)] ** 2
            terms.append(loss / (2 * w2) + torch.log1p(w2))
        return torch.stack(terms).sum()

    def task_weights(self) -> dict[str, float]:
        return dict(zip(self.tasks, (1 / (2 * self.w.detach() ** 2)).tolist()))


@register
class DynamicWeightAverage(LossCombiner):
    """Dynamic weight average (Liu, Johns & Davison 2019).

    w_i = K exp(r_i / T) / sum_j exp(r_j / T) with r_i = L_i(e-1) / L_i(e-2)
    the ratio of task i's mean training loss in the last two epochs, K tasks
    and T = `loss.dwa_temperature`: a task whose loss falls slowly gets more
    weight. The first two epochs use w_i = 1, and the weights stay as they are
    while a task had no batch in one of the last two epochs (round_robin_epoch,
    sequential).

    With `loss.dwa_window` W > 0 the periods are windows of W optimizer steps,
    counted over the run, not per epoch: the weights change after every window
    from the second on (they act from step 2W + 1), so that a run of a few long
    epochs adapts them within an epoch. Each task's loss sum and batch count of
    the window stay on the device (no host-device sync per step), in buffers
    saved with the resume state.
    """

    name = "dwa"
    reads = ("loss.dwa_temperature", "loss.dwa_window")
    scales_task_losses = True

    def __init__(self, config: LossConfig, tasks: list[str], **kwargs):
        super().__init__(config, tasks, **kwargs)
        self.register_buffer("history", torch.full((2, len(tasks)), math.nan))  # e-2, e-1
        self.register_buffer("weights", torch.ones(len(tasks)))
        self.window = config.dwa_window
        if self.window:
            # Only with windows: a per-epoch run keeps the state it always had, so that
            # its resume states from before loss.dwa_window load.
            self.register_buffer("window_sum", torch.zeros(len(tasks)))
            self.register_buffer("window_batches", torch.zeros(len(tasks)))
            self.register_buffer("steps", torch.zeros((), dtype=torch.long))
            self._steps = 0  # the host's copy of `steps`: no step reads the device
            self.register_load_state_dict_post_hook(_read_dwa_steps)

    def forward(self, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.stack([self.weights[self._index(t)] * loss
                            for t, loss in losses.items()]).sum()

    def backward(self, losses: dict[str, torch.Tensor], model: nn.Module,
                 scale: float) -> torch.Tensor:
        if self.window:
            with torch.no_grad():
                for task, loss in losses.items():
                    self.window_sum[self._index(task)].add_(loss.detach())
                    self.window_batches[self._index(task)].add_(1)
        return super().backward(losses, model, scale)

    def after_step(self) -> None:
        if not self.window:
            return
        self.steps.add_(1)
        self._steps += 1
        if self._steps % self.window == 0:
            self._end_window()

    def _end_window(self) -> None:
        batches = self.window_batches
        self._push(torch.where(batches > 0, self.window_sum / batches.clamp(min=1), math.nan))
        self.window_sum.zero_()
        batches.zero_()

    def end_epoch(self, task_losses: dict[str, float]) -> None:
        if self.window:
            return  # the windows end in after_step
        latest = torch.tensor([task_losses.get(t, math.nan) for t in self.tasks])
        self._push(latest.to(self.history))

    def _push(self, latest: torch.Tensor) -> None:
        """Each task's mean loss of the period just ended (nan: no batch) into the history;
        the weights from the last two periods' ratios if every task has a positive loss
        in both, else unchanged (torch.where: no host-device sync)."""
        self.history.copy_(torch.stack([self.history[1], latest]))
        previous, last = self.history[0], self.history[1]
        weights = len(self.tasks) * torch.softmax(
            last / previous / self.config.dwa_temperature, dim=0)
        usable = torch.isfinite(previous).all() & torch.isfinite(last).all() \
            & (previous > 0).all()
        self.weights.copy_(torch.where(usable, weights, self.weights))

    def task_weights(self) -> dict[str, float]:
        return dict(zip(self.tasks, self.weights.tolist()))


def _read_dwa_steps(module: DynamicWeightAverage, incompatible_keys) -> None:
    module._steps = int(module.steps)  # once per load, not per step


@register
class GradNorm(LossCombiner):
    """GradNorm (Chen et al. 2018): learned weights w_i that balance gradient norms.

    Every step, with W the last shared layer (BERT's pooler when it is shared,
    else the top layer's feed-forward output), G_i = ||grad_W w_i L_i||. The
    weights follow the gradient of sum_i |G_i - mean(G) r_i^alpha|, r_i the
    task's loss ratio L_i / L_i(first step) over the mean ratio (its relative
    inverse training rate), the target held constant; the network itself
    trains on sum_i w_i L_i. After each step the weights are renormalised to
    sum to the number of tasks. Needs every task in each step: with
    round_robin_batch a step is one batch of each task.
    """

    name = "gradnorm"
    reads = ("loss.gradnorm_alpha", "loss.weight_lr")
    per_step = True

    def __init__(self, config: LossConfig, tasks: list[str], **kwargs):
        super().__init__(config, tasks, **kwargs)
        self.weights = nn.Parameter(torch.ones(len(tasks)))
        self.register_buffer("initial", torch.full((len(tasks),), math.nan))
        # The index tensor of each task order seen, built once on the device: building it
        # every step from a Python list is a blocking host-to-device copy.
        self._indices: dict[tuple[tuple[str, ...], torch.device], torch.Tensor] = {}

    def _index_tensor(self, tasks: tuple[str, ...]) -> torch.Tensor:
        key = (tasks, self.weights.device)
        if key not in self._indices:
            self._indices[key] = torch.tensor([self._index(t) for t in tasks],
                                              device=self.weights.device)
        return self._indices[key]

    def forward(self, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.stack([self.weights[self._index(t)].detach() * loss
                            for t, loss in losses.items()]).sum()

    def backward(self, losses: dict[str, torch.Tensor], model: nn.Module,
                 scale: float) -> torch.Tensor:
        index = self._index_tensor(tuple(losses))
        values = torch.stack(list(losses.values()))  # (K,)
        with torch.no_grad():
            unset = torch.isnan(self.initial[index])
            self.initial[index] = torch.where(unset, values.detach(), self.initial[index])
        shared = model.last_shared_weight()
        if shared is not None and shared.requires_grad and len(losses) > 1:
            norms = torch.stack([torch.autograd.grad(loss, shared, retain_graph=True)[0].norm()
                                 for loss in losses.values()])  # (K,) of ||grad_W L_i||
            w = self.weights[index]
            G = w * norms
            ratio = values.detach() / self.initial[index]
            target = (G.mean() * (ratio / ratio.mean()) ** self.config.gradnorm_alpha).detach()
            grad = torch.autograd.grad((G - target).abs().sum(), self.weights)[0]
            self.weights.grad = grad if self.weights.grad is None else self.weights.grad + grad
        return super().backward(losses, model, scale)

    def after_step(self) -> None:
        with torch.no_grad():
            self.weights.clamp_(min=1e-3)
            self.weights.mul_(len(self.tasks) / self.weights.sum())

    def task_weights(self) -> dict[str, float]:
        return dict(zip(self.tasks, self.weights.detach().tolist()))


@register
class PCGrad(LossCombiner):
    """Gradient surgery (Yu et al. 2020) on the shared encoder.

    Each task's gradient on the encoder's parameters is computed alone; where
    it conflicts with another task's (negative dot product) its component
    along that gradient is removed, the other tasks taken in a random order;
    the encoder trains on the sum of the projected gradients. Task heads and
    poolers keep their own task's gradient. Needs every task in each step
    (triple_batch, or round_robin_batch, whose steps then hold one batch of
    each task). Memory: one fp32 copy of the encoder gradient per task
    (3 x 4 bytes x 109M = 1.3 GB for bert-base, 0.27 GB for minilm-l6) and one
    backward pass per task.
    """

    name = "pcgrad"
    per_step = True

    def __init__(self, config: LossConfig, tasks: list[str], **kwargs):
        super().__init__(config, tasks, **kwargs)
        self.steps = 0  # a host counter (no device sync); saved through the extra state

    def forward(self, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.stack(list(losses.values())).sum()

    def get_extra_state(self) -> dict[str, int]:
        return {"steps": self.steps}

    def set_extra_state(self, state: dict[str, int]) -> None:
        self.steps = int(state["steps"])

    def backward(self, losses: dict[str, torch.Tensor], model: nn.Module,
                 scale: float) -> torch.Tensor:
        shared = [p for p in model.shared_parameters() if p.requires_grad]
        flat = []
        for k, (task, loss) in enumerate(losses.items()):
            own = [p for p in model.task_parameters(task) if p.requires_grad]
            grads = torch.autograd.grad(loss * scale, shared + own, allow_unused=True,
                                        retain_graph=k < len(losses) - 1)
            _accumulate(own, grads[len(shared):])
            flat.append(_flatten(grads[:len(shared)], shared))
        if shared:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.steps)
            projected = pcgrad_project(torch.stack(flat), generator).sum(0)
            _accumulate(shared, _unflatten(projected, shared))
        self.steps += 1
        return (self(losses) * scale).detach()


def pcgrad_project(grads: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """PCGrad's projection of task gradients (K, P): each row, with every other
    row in a random order, loses its component along that row where their dot
    product is negative. Returns the projected rows (K, P)."""
    K = grads.shape[0]
    out = grads.clone()
    norms = grads.pow(2).sum(1).clamp(min=1e-20)  # (K,)
    for i in range(K):
        for j in torch.randperm(K, generator=generator).tolist():
            if j == i:
                continue
            # min(dot, 0): only a conflict is projected away, with no host-device sync.
            out[i] -= (out[i] @ grads[j]).clamp(max=0) / norms[j] * grads[j]
    return out


def task_gradients(losses: dict[str, torch.Tensor],
                   params: list[torch.nn.Parameter]) -> torch.Tensor:
    """Each task loss's gradient on `params`, flattened: (K, P); .grad is untouched."""
    rows = []
    for k, loss in enumerate(losses.values()):
        grads = torch.autograd.grad(loss, params, allow_unused=True,
                                    retain_graph=k < len(losses) - 1)
        rows.append(_flatten(grads, params))
    return torch.stack(rows)


def _flatten(grads: Iterable[torch.Tensor | None], params: list[nn.Parameter]) -> torch.Tensor:
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1).float()
                      for g, p in zip(grads, params)]) if params else torch.zeros(0)


def _unflatten(flat: torch.Tensor, params: list[nn.Parameter]) -> list[torch.Tensor]:
    out, start = [], 0
    for p in params:
        out.append(flat[start:start + p.numel()].view_as(p).to(p.dtype))
        start += p.numel()
    return out


def _accumulate(params: list[nn.Parameter], grads: Iterable[torch.Tensor | None]) -> None:
    for p, g in zip(params, grads):
        if g is None:
            continue
        if p.grad is None:
            p.grad = g.detach().clone()
        else:
            p.grad += g


def make_loss_combiner(config: LossConfig, tasks: list[str], *, seed: int = 0) -> LossCombiner:
    if config.method not in LOSS_METHODS:
        raise ConfigError(f"unknown loss.method '{config.method}'; valid: "
                          f"{', '.join(LOSS_METHODS)}")
    return LOSS_METHODS[config.method](config, tasks, seed=seed)
