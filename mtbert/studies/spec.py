"""Sweep specs: a base run config, a search space, objectives, sampler and pruner.

A spec is YAML (docs/reference/spec.md). Every key is checked against the run
config schema before any trial runs; a bad spec is one `ConfigError` naming
the spec, the key and what would be valid.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mtbert.config import (RunConfig, build_config, deep_merge, flatten, overrides_to_dict,
                           read_yaml, set_key, unflatten)
from mtbert.errors import ConfigError
from mtbert.safeyaml import file_problem
from mtbert.studies.conditions import when_holds
from mtbert.studies.constraints import parse_constraints
from mtbert.studies.enqueue import check_enqueue
from mtbert.studies.grid import check_grid_space, grid_values
from mtbert.studies.job import STUDY_SIZE, STUDY_SPEC, STUDY_SPEC_NAME
from mtbert.studies.params import Param, check_conditions, check_param
from mtbert.studies.racing import RACE_ALPHA, check_racing
from mtbert.studies.samplers import PRUNERS, SAMPLERS, make_pruner, make_sampler
from mtbert.studies.sizes import CPU, check_sizes
from mtbert.tasks import METRIC_KEYS

SPEC_KEYS = ("name", "description", "base", "space", "objective", "direction", "directions",
             "sampler", "pruner", "enqueue", "seeds", "race_alpha", "constraints", "sizes")
log = logging.getLogger("mtbert")


@dataclass
class SweepSpec:
    name: str
    description: str
    base: dict[str, Any]
    space: dict[str, Param]
    objectives: list[str]
    directions: list[str]
    sampler: dict[str, Any]
    pruner: dict[str, Any]
    enqueue: list[dict[str, Any]]
    source: str
    base_values: dict[str, Any]  # every run config key under the base, dotted
    seeds: int = 1  # seed runs per configuration, raced (mtbert.studies.racing)
    race_alpha: float = RACE_ALPHA
    constraints: list[str] = field(default_factory=list)  # "KEY >= VALUE" / "KEY <= VALUE"
    size: str | None = None  # the size folded into the base (None: the base as written)
    sizes: list[str] = field(default_factory=list)  # the names under the spec's `sizes:`

    @property
    def multi_objective(self) -> bool:
        return len(self.objectives) > 1

    def to_dict(self) -> dict[str, Any]:
        space = {}
        for key, p in self.space.items():
            entry: dict[str, Any] = {"type": p.type}
            if p.type == "categorical":
                entry["choices"] = p.choices
            else:
                entry.update(low=p.low, high=p.high)
                if p.log:
                    entry["log"] = True
                if p.step is not None:
                    entry["step"] = p.step
                if p.grid is not None:
                    entry["grid"] = p.grid
            if p.when:
                entry["when"] = p.when
            space[key] = entry
        objective = self.objectives[0] if len(self.objectives) == 1 else self.objectives
        directions = ({"direction": self.directions[0]} if len(self.directions) == 1
                      else {"directions": self.directions})
        return {"name": self.name, "description": self.description, "base": self.base,
                "space": space, "objective": objective, **directions, "sampler": self.sampler,
                "pruner": self.pruner, **({"enqueue": self.enqueue} if self.enqueue else {}),
                **({"seeds": self.seeds, "race_alpha": self.race_alpha}
                   if self.seeds > 1 or self.race_alpha != RACE_ALPHA else {}),
                **({"constraints": self.constraints} if self.constraints else {})}


def shipped_specs() -> dict[str, Path]:
    """The specs shipped in the package's `sweeps/` folder, by name."""
    folder = importlib.resources.files("mtbert.sweeps")
    return {Path(p.name).stem: Path(str(p)) for p in folder.iterdir()
            if p.name.endswith(".yaml")}


def spec_list() -> list[str]:
    """`mtbert sweep --list`: each shipped spec's name and description."""
    specs = sorted(shipped_specs().items())
    width = max(len(name) for name, _ in specs)
    return [f"{name:<{width}}  {load_spec(str(path)).description}" for name, path in specs]


def find_spec(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        problem = file_problem(path)
        if problem:
            raise ConfigError(f"sweep spec {path} {problem}")
        return path
    specs = shipped_specs()
    if name_or_path not in specs:
        raise ConfigError(f"unknown sweep '{name_or_path}'; shipped: {', '.join(sorted(specs))}, "
                          "or a path to a YAML file")
    return specs[name_or_path]


def read_spec(name_or_path: str) -> tuple[dict[str, Any], Path, str]:
    """A spec file's content, its path and how errors name it."""
    path = find_spec(name_or_path)
    return read_yaml(path, "sweep spec"), path, \
        f"sweep spec {path.name if path.parent.name == 'sweeps' else path}"


def load_spec(name_or_path: str, overrides: list[str] | None = None,
              size: str | None = None) -> SweepSpec:
    """Read and check a spec at `size` (None: its base as written); `overrides` (`--set`)
    change its base after the size."""
    raw, path, where = read_spec(name_or_path)
    return spec_from_dict(raw, overrides, where=where, source=str(path), stem=path.stem,
                          size=size)


def spec_from_dict(raw: dict[str, Any], overrides: list[str] | None = None, *,
                   where: str, source: str, stem: str = "sweep",
                   size: str | None = None) -> SweepSpec:
    """Check a spec given as a mapping (a file's content, or the copy a study stores)."""

    def fail(message: str) -> ConfigError:
        return ConfigError(f"{where}: {message}")

    for key in raw:
        if key not in SPEC_KEYS:
            raise fail(f"unknown key '{key}'; valid: {', '.join(SPEC_KEYS)}")
    base_raw = raw.get("base") or {}
    if not isinstance(base_raw, dict):
        raise fail("base must be a mapping of run config keys")
    sizes = check_sizes(raw.get("sizes"), fail)
    for name, size_raw in sizes.items():  # every size checked, not only the one chosen
        try:
            build_config(deep_merge(unflatten(base_raw), unflatten(size_raw)))
        except ConfigError as err:
            raise fail(f"sizes.{name}: {err}") from None
    if size is not None and size not in sizes:
        raise fail(f"no size '{size}'; its sizes: {', '.join(sizes) or 'none'}")
    base = deep_merge(deep_merge(unflatten(base_raw), unflatten(sizes.get(size) or {})),
                      overrides_to_dict(overrides or []))
    try:
        base_config = build_config(base)
    except ConfigError as err:
        raise fail(f"base: {err}") from None
    base_values = flatten(base_config.to_dict())
    leaves = set(base_values)

    space_raw = raw.get("space") or {}
    if not isinstance(space_raw, dict) or not space_raw:
        raise fail("space must map run config keys to distributions")
    space = {}
    for key, entry in space_raw.items():
        space[key] = check_param(key, entry, base, leaves, fail)
    check_conditions(space, base, leaves, fail)

    objective = raw.get("objective", "overall/geometric")
    objectives = objective if isinstance(objective, list) else [objective]
    for name in objectives:
        if name not in METRIC_KEYS:
            raise fail(f"objective '{name}' is not a metric; valid: {', '.join(METRIC_KEYS)}")
    if "directions" in raw:
        directions = raw["directions"]
        if not isinstance(directions, list):
            raise fail("directions must be a list, one per objective")
    else:
        directions = [raw.get("direction", "maximize")] * len(objectives)
    if len(directions) != len(objectives):
        raise fail(f"{len(directions)} directions for {len(objectives)} objectives")
    for direction in directions:
        if direction not in ("maximize", "minimize"):
            raise fail(f"direction '{direction}'; valid: maximize, minimize")

    for section in ("sampler", "pruner"):
        if raw.get(section) is not None and not isinstance(raw[section], dict):
            raise fail(f"{section} must be a mapping such as {{name: "
                       f"{'tpe, seed: 0' if section == 'sampler' else 'median'}}}")
    sampler = dict(raw.get("sampler") or {"name": "tpe", "seed": 0})
    if sampler.get("name", "tpe") not in SAMPLERS:
        raise fail(f"sampler '{sampler.get('name')}'; valid: {', '.join(SAMPLERS)}")
    sampler.setdefault("name", "tpe")
    check_grid_space(space, sampler, fail)
    pruner = dict(raw.get("pruner") or {"name": "median"})
    if pruner.get("name", "median") not in PRUNERS:
        raise fail(f"pruner '{pruner.get('name')}'; valid: {', '.join(PRUNERS)}")
    pruner.setdefault("name", "median")
    if len(objectives) > 1 and pruner["name"] != "none":
        pruner = {"name": "none"}  # Optuna prunes single-objective studies only
    enqueue = check_enqueue(raw.get("enqueue") or [], space, base_values, fail)
    seeds, race_alpha = check_racing(raw.get("seeds", 1), raw.get("race_alpha", RACE_ALPHA),
                                     fail)
    if seeds > 1 and len(objectives) > 1:
        raise fail("seeds: racing compares one objective; a multi-objective spec has several")
    constraints = raw.get("constraints") or []
    if not isinstance(constraints, list) or not all(isinstance(c, str) for c in constraints):
        raise fail('constraints must be a list of strings such as "sst/acc >= 0.5"')
    try:  # thresholds relative to a baseline are resolved when the sweep starts
        parse_constraints(constraints)
    except ConfigError as err:
        raise fail(f"constraints: {err}") from None
    spec = SweepSpec(name=str(raw.get("name") or stem), base_values=base_values,
                     description=str(raw.get("description") or ""), base=base, space=space,
                     objectives=objectives, directions=directions, sampler=sampler,
                     pruner=pruner, enqueue=enqueue, source=source, seeds=seeds,
                     race_alpha=race_alpha, constraints=list(constraints), size=size,
                     sizes=list(sizes))
    try:  # constructor arguments checked before any trial
        make_sampler(sampler, grid=grid_values(space))
        make_pruner(pruner)
    except ConfigError as err:
        raise fail(str(err)) from None
    return spec


def with_racing(spec: SweepSpec, seeds: int | None, alpha: float | None) -> SweepSpec:
    """`spec` with `--seeds` / `--race-alpha` in place of its own `seeds:` / `race_alpha:`."""
    seeds, alpha = check_racing(spec.seeds if seeds is None else seeds,
                                spec.race_alpha if alpha is None else alpha, ConfigError,
                                names=("--seeds", "--race-alpha"))
    if seeds > 1 and spec.multi_objective:
        raise ConfigError("--seeds: racing compares one objective; this spec has "
                          f"{len(spec.objectives)}")
    return dataclasses.replace(spec, seeds=seeds, race_alpha=alpha)


def suggest(trial, spec: SweepSpec) -> dict[str, Any]:
    """Sample the spec's space for `trial`; conditional parameters only when their `when` holds."""
    params: dict[str, Any] = {}
    for key, p in spec.space.items():
        if not when_holds(p.when, lambda k: params.get(k, spec.base_values.get(k))):
            continue
        if p.type == "categorical":
            params[key] = trial.suggest_categorical(key, p.choices)
        elif p.type == "int":
            params[key] = trial.suggest_int(key, int(p.low), int(p.high), step=p.step or 1,
                                            log=p.log)
        else:
            params[key] = trial.suggest_float(key, p.low, p.high, step=p.step, log=p.log)
    return params


def trial_config(spec: SweepSpec, params: dict[str, Any]) -> RunConfig:
    data = spec.base
    for key, value in params.items():
        data = set_key(data, key, value)
    # The kept checkpoint, the trial's values and its metric attributes all come from
    # the evaluation that is best by the (first) objective.
    data = set_key(data, "train.select_metric", spec.objectives[0])
    return build_config(data)


class _PlainDumper(yaml.SafeDumper):
    """Writes a value shared by several keys (a YAML anchor in the source) in full at
    each, as a person writes a spec."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def spec_yaml(spec: SweepSpec) -> str:
    """`mtbert sweep --print`: the resolved spec as a file `mtbert sweep FILE.yaml` runs
    unchanged anywhere (its size and the --set overrides folded into its base, no sizes)."""
    return yaml.dump(spec.to_dict(), Dumper=_PlainDumper, sort_keys=False, allow_unicode=True)


def stored_spec(study, overrides: list[str] | None = None) -> SweepSpec:
    """The spec a study was swept with (stored by `mtbert sweep`, its size folded in),
    `overrides` on its base.

    Studies from before the spec was stored fall back to the shipped spec of the same
    name at size cpu (the shipped bases then), whose base may differ from the sweep's
    --set: pass them again."""
    stored = study.user_attrs.get(STUDY_SPEC)
    if stored is not None:
        spec = spec_from_dict(stored, overrides, where=f"the spec of study {study.study_name}",
                              source=f"study {study.study_name}")
        return dataclasses.replace(spec, size=study.user_attrs.get(STUDY_SIZE))
    name = study.user_attrs.get(STUDY_SPEC_NAME)
    if name is None:
        raise ConfigError(f"study {study.study_name} was not made by `mtbert sweep` (no spec "
                          "stored); reseeding needs its spec")
    log.warning("study %s stores only its spec's name; using the shipped spec '%s' at size "
                "cpu with this command's --set (pass the sweep's --set again)",
                study.study_name, name)
    return load_spec(name, overrides, size=CPU)
