"""`mtbert sweep SPEC --check`: the searched settings a spec's trials cannot feel.

The check walks every reachable combination of the spec's discrete choices
(categoricals and small int ranges, `when:` applied, the base everywhere else)
and asks, in each, what the code would do with it: the schedule and loss-method
registries declare the config keys they read (`reads`), the schedule itself
says whether a step holds one task or several, and a few rules name where the
training loop makes a setting inert (a frozen encoder's layer rates, a weight
on one-task steps under gradient clipping, DWA in a run too short for it).
Each combination then reduces to the model it trains; two combinations that
reduce to one model are two names of it.

A finding is one line: the parameter, what happens to it, and the combination
(`where`) in which it does.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Callable, Iterator

from mtbert.config import RunConfig, flatten
from mtbert.schedules import SCHEDULES, make_schedule, step_size
from mtbert.studies.conditions import when_holds
from mtbert.studies.spec import SweepSpec, trial_config

MAX_COMBINATIONS = 20_000  # beyond this the check looks at the first ones and says so
ENUMERATED_INTS = 16  # an int range of at most this many values is checked value by value
SEARCHED = "<searched>"  # a continuous parameter's value in a combination
DEFAULTS = flatten(RunConfig().to_dict())


@dataclass(frozen=True)
class Finding:
    parameter: str
    kind: str  # ignored | threshold | duplicate | scale
    message: str
    where: tuple[tuple[str, Any], ...] = ()

    def line(self) -> str:
        where = ", ".join(f"{key}={_shown(value)}" for key, value in self.where)
        return f"{self.parameter}: {self.message}" + (f" (where {where})" if where else "")

    def to_dict(self) -> dict[str, Any]:
        return {"parameter": self.parameter, "kind": self.kind, "message": self.message,
                "where": dict(self.where)}


@dataclass
class Combination:
    """One reachable combination of a spec's discrete choices, reduced rule by rule to
    the settings that act (`values`, dotted keys)."""

    spec: SweepSpec
    chosen: dict[str, Any]  # the discrete parameters and their values
    active: set[str]  # every parameter sampled here, continuous ones included
    values: dict[str, Any] = field(default_factory=dict)
    findings: list[Finding] = field(default_factory=list)
    # (key, why, where) of each rule that found this combination trains another's model
    renames: list[tuple[str, str, tuple[tuple[str, Any], ...]]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.values = {**self.spec.base_values, **self.chosen,
                       **{k: SEARCHED for k in self.active if k not in self.chosen}}

    def get(self, key: str) -> Any:
        return self.values.get(key, DEFAULTS.get(key))

    def where(self, *keys: str) -> tuple[tuple[str, Any], ...]:
        return tuple((k, _hashable(self.get(k))) for k in keys)

    @cached_property
    def config(self) -> RunConfig:
        """The trial's config, continuous parameters at their low end."""
        params = {k: self.chosen.get(k, self.spec.space[k].low) for k in self.active}
        return trial_config(self.spec, params)

    def keys_under(self, key: str) -> list[str]:
        """`key`, or the entries of the mapping `key` names (loss.weights.sst, ...)."""
        return [k for k in self.values if k == key or k.startswith(key + ".")]

    def inert(self, key: str, message: str, where: tuple[str, ...],
              kind: str = "ignored") -> None:
        """`key` (or each entry under it) changes nothing here: reported where searched,
        reset to its default so that the combination reduces to the model it trains."""
        for k in self.keys_under(key):
            if k in self.active:
                self.findings.append(Finding(k, kind, message, self.where(*where)))
            if k in DEFAULTS:
                self.values[k] = DEFAULTS[k]
            else:
                del self.values[k]

    def rename(self, key: str, value: Any, why: str, where: tuple[str, ...]) -> None:
        """This combination trains the model that `key`=`value` trains, for `why`."""
        self.renames.append((key, why, self.where(*where)))
        self.values[key] = value

    def report(self, key: str, kind: str, message: str, where: tuple[str, ...]) -> None:
        if key in self.active:
            self.findings.append(Finding(key, kind, message, self.where(*where)))

    def model_key(self) -> str:
        return json.dumps(sorted(self.values.items()), default=str)


def check_spec(spec: SweepSpec) -> tuple[list[Finding], int]:
    """Every finding of `spec` (each once), and the number of combinations looked at."""
    findings: list[Finding] = []
    models: dict[str, list[Combination]] = {}
    count = 0
    for count, combination in enumerate(combinations(spec), 1):
        for rule in RULES:
            rule(combination)
        findings.extend(combination.findings)
        models.setdefault(combination.model_key(), []).append(combination)
        if count >= MAX_COMBINATIONS:
            break
    findings.extend(_two_names(models))
    return list(dict.fromkeys(findings)), count


def combinations(spec: SweepSpec) -> Iterator[Combination]:
    """The reachable combinations of the spec's discrete choices, in the space's order."""
    params = list(spec.space.items())

    def walk(i: int, chosen: dict[str, Any], active: set[str]) -> Iterator[Combination]:
        if i == len(params):
            yield Combination(spec, dict(chosen), set(active))
            return
        key, p = params[i]
        if not when_holds(p.when, lambda k: chosen.get(k, spec.base_values.get(k))):
            yield from walk(i + 1, chosen, active)
            return
        for value in _discrete_values(p):
            yield from walk(i + 1, {**chosen, key: value} if value is not SEARCHED else chosen,
                            active | {key})

    yield from walk(0, {}, set())


def _discrete_values(p) -> list[Any]:
    if p.grid is not None:  # the values the grid sampler runs
        return list(p.grid)
    if p.type == "categorical":
        return list(p.choices)
    if p.type == "int" and not p.log:
        values = list(range(int(p.low), int(p.high) + 1, int(p.step or 1)))
        if len(values) <= ENUMERATED_INTS:
            return values
    return [SEARCHED]


def _loss_method(name: str):
    # The loss methods are torch modules: loaded only for a spec whose trials combine
    # losses in some other way than the plain sum.
    from mtbert.balancing import LOSS_METHODS
    return LOSS_METHODS[name]


def _uses_loss_methods(c: Combination) -> bool:
    return c.get("loss.method") != "sum" or any(k.startswith("loss.") for k in c.active)


def several_tasks_per_step(c: Combination, method_per_step: bool) -> bool:
    """Whether an optimizer step of this combination's schedule can hold batches of more
    than one task, read from the plans the schedule itself draws."""
    t = c.config.train
    tasks = c.config.data.tasks
    schedule = make_schedule(t, {task: 20 for task in tasks}, {task: 1000 for task in tasks},
                             every_task_per_step=method_per_step)
    per_step = step_size(schedule, t.grad_accum)
    for epoch in range(min(t.epochs, 3)):
        plan = schedule.plan(epoch, (t.steps_per_epoch or 20) * per_step)
        if any(len(set(plan[i:i + per_step])) > 1 for i in range(0, len(plan), per_step)):
            return True
    return False


def _one_task_steps(c: Combination) -> None:
    """Gradient methods and task weights on steps that hold one task."""
    if not _uses_loss_methods(c):
        return
    method = c.get("loss.method")
    cls = _loss_method(method)
    if several_tasks_per_step(c, cls.per_step):
        if cls.per_step and c.get("train.schedule") == "round_robin_batch" \
                and c.get("train.steps_per_epoch") > 0:
            c.rename("train.schedule", "triple_batch",
                     f"round_robin_batch under {method} takes one batch of every task a "
                     "step, as triple_batch does", ("loss.method",))
        return
    if cls.per_step:
        c.report("loss.method", "ignored", f"{method} has no two tasks to balance on one-task "
                 "steps: it trains the model of sum", ("train.schedule", "loss.method"))
        c.rename("loss.method", "sum", f"with one task a step {method} trains the plain sum",
                 ("train.schedule",))
        return
    clip = c.get("optim.max_grad_norm")
    if not cls.scales_task_losses or not clip:
        return
    why = (f"acts only on steps whose gradient norm stays under optim.max_grad_norm {clip}: "
           "with one task a step the clip rescales the rest, weight and all "
           "(train/clipped/<task> shows how often)")
    if method == "weighted":
        for key in c.keys_under("loss.weights"):
            c.report(key, "threshold", why, ("train.schedule", "loss.method"))
    else:
        c.report("loss.method", "threshold", f"{method}'s task weight {why}",
                 ("train.schedule", "loss.method"))


def _dwa_reach(c: Combination) -> None:
    """DWA sets its weights after two windows (epochs, or loss.dwa_window steps)."""
    if c.get("loss.method") != "dwa":
        return
    epochs, steps, window = (c.get("train.epochs"), c.get("train.steps_per_epoch"),
                             c.get("loss.dwa_window") or 0)
    if window == 0 and epochs >= 3 or window and (steps == 0 or epochs * steps > 2 * window):
        return
    span = "two epochs" if window == 0 else f"two windows of {window} steps"
    why = (f"dwa sets its weights after {span}; a run of {epochs} epochs"
           f"{f' x {steps} steps' if steps else ''} ends first, so it trains the plain sum")
    c.report("loss.method", "ignored", why, ("train.epochs", "loss.dwa_window"))
    c.rename("loss.method", "sum", why, ("train.epochs", "loss.dwa_window"))


def _temperature(c: Combination) -> None:
    """Temperature T samples as proportional with alpha 1/T: one model, two names."""
    if c.get("train.schedule") != "temperature":
        return
    t = c.get("train.temperature")
    c.rename("train.schedule", "proportional", "train.schedule temperature with "
             "train.temperature T samples tasks as proportional with train.alpha 1/T", ())
    c.values["train.alpha"] = SEARCHED if t == SEARCHED else 1 / t
    c.values["train.temperature"] = DEFAULTS["train.temperature"]


def _equal_weights(c: Combination) -> None:
    if c.get("loss.method") != "weighted" or any(k.startswith("loss.weights.") for k in c.active):
        return
    weights = {c.get(f"loss.weights.{t}") for t in c.get("data.tasks")}
    if len(weights) == 1:
        c.rename("loss.method", "sum", "weighted with equal weights is the plain sum up to a "
                 "common scale, which Adam and the clip remove", ())


def _unread_keys(c: Combination, config_key: str, registry: dict[str, type]) -> None:
    """Keys only some entries of a registry read (`reads`) are inert under the others."""
    readers: dict[str, list[str]] = {}
    for name, cls in registry.items():
        for key in cls.reads:
            readers.setdefault(key, []).append(name)
    chosen = c.get(config_key)
    for key, names in readers.items():
        if chosen not in names:
            c.inert(key, f"read only by {config_key} {', '.join(names)}", (config_key,))


def _schedule_reads(c: Combination) -> None:
    _unread_keys(c, "train.schedule", SCHEDULES)


def _loss_method_reads(c: Combination) -> None:
    if _uses_loss_methods(c):
        from mtbert.balancing import LOSS_METHODS
        _unread_keys(c, "loss.method", LOSS_METHODS)


def _annealing(c: Combination) -> None:
    if c.get("train.schedule") != "annealed":
        return
    epochs = c.get("train.epochs")
    if epochs <= 2:
        c.inert("train.alpha_shape", f"at {epochs} epoch(s) alpha takes only alpha_start and "
                "alpha_end: the shape between them never shows", ("train.epochs",))
    if epochs == 1:
        c.inert("train.alpha_end", "one epoch trains at alpha_start only", ("train.epochs",))


def _freezing(c: Combination) -> None:
    freeze, after, epochs = (c.get("optim.freeze"), c.get("optim.unfreeze_after"),
                             c.get("train.epochs"))
    if after != SEARCHED and after >= epochs:
        c.inert("optim.unfreeze_after", f"unfreezing after epoch {after} of {epochs} is "
                "never", ("train.epochs",))
    elif freeze == "none" and not c.get("optim.train_layers"):
        c.inert("optim.unfreeze_after", "nothing is frozen", ("optim.freeze",))
    if freeze == "encoder" and c.get("optim.unfreeze_after") == 0:
        for key in ("optim.layer_decay", "optim.layer_scales"):
            c.inert(key, "the encoder is frozen for the whole run", ("optim.freeze",
                                                                    "optim.unfreeze_after"))


def _heads_and_auxiliary(c: Combination) -> None:
    if c.get("model.sts_head") != "regression":
        c.inert("model.sts_output", "read by the regression STS head only", ("model.sts_head",))
    if c.get("model.pair_encoding") == "concat":
        c.inert("model.siamese_cosine", "read by siamese pair encoding only",
                ("model.pair_encoding",))
    contrastive = c.get("loss.contrastive")
    if contrastive == "none":
        for key in ("loss.contrastive_weight", "loss.contrastive_tasks"):
            c.inert(key, "no auxiliary loss", ("loss.contrastive",))
    if contrastive != "mnrl":
        for key in [k for k in DEFAULTS if k.startswith("loss.mnrl_")]:
            c.inert(key, "read by loss.contrastive mnrl only", ("loss.contrastive",))
    if c.get("train.schedule") == "triple_batch" and c.get("train.steps_per_epoch"):
        c.inert("train.triple_batch_truncate", "an epoch of train.steps_per_epoch steps has "
                "no pass to truncate", ("train.steps_per_epoch",))


def _tasks_trained(c: Combination) -> None:
    tasks = c.get("data.tasks")
    for mapping in ("loss.weights", "optim.head_lr"):
        for key in c.keys_under(mapping):
            if key.rpartition(".")[2] not in tasks:
                c.inert(key, "a task this run does not train", ("data.tasks",))
    if len(tasks) == 1:
        c.inert("loss.weights", "one task: its weight only scales the loss", ("data.tasks",))


def _common_scale(c: Combination) -> None:
    """All task weights searched: one dimension of the search is their common scale."""
    tasks = c.get("data.tasks")
    keys = [f"loss.weights.{t}" for t in tasks]
    if c.get("loss.method") == "weighted" and len(tasks) > 1 and all(k in c.active for k in keys):
        c.findings.append(Finding(
            "loss.weights", "scale", f"all {len(keys)} task weights are searched; their "
            "common scale changes nothing (Adam normalises the step, the clip rescales it): fix "
            "one in the base and search the others as ratios to it", c.where("loss.method")))


RULES: list[Callable[[Combination], None]] = [
    _one_task_steps, _dwa_reach, _equal_weights, _schedule_reads, _temperature,
    _loss_method_reads, _annealing, _freezing, _heads_and_auxiliary, _tasks_trained,
    _common_scale]


def _two_names(models: dict[str, list[Combination]]) -> list[Finding]:
    """Combinations that reduce to one model, named by the parameters they differ in
    (leaving out those already reported as ignored)."""
    findings = []
    for first, *others in (group for group in models.values() if len(group) > 1):
        for other in others:
            ignored = {f.parameter for c in (first, other) for f in c.findings
                       if f.kind == "ignored"}
            differing = [k for k in sorted(set(first.chosen) | set(other.chosen))
                         if k not in ignored
                         and _shown(first.chosen.get(k)) != _shown(other.chosen.get(k))]
            if not differing:
                continue
            renames = [r for c in (first, other) for r in c.renames if r[0] in differing]
            names = " and ".join(", ".join(_shown(c.chosen.get(k)) if len(differing) == 1
                                           else f"{k}={_shown(c.chosen.get(k))}"
                                           for k in differing) for c in (first, other))
            why = "; ".join(dict.fromkeys(why for _, why, _ in renames))
            where = tuple(dict.fromkeys(w for _, _, ws in renames for w in ws
                                        if w[0] not in differing))
            findings.append(Finding(", ".join(differing), "duplicate",
                                    f"{names} train one model" + (f": {why}" if why else ""),
                                    where))
    return findings


def _hashable(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def _shown(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(map(str, value)) + "]"
    return str(value)
