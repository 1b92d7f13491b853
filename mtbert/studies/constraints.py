"""Constraints of a sweep: bounds on metric keys that a result must meet to count.

The research this project grew from asks one question no sweep tool encodes: does the
multitask model lose on any task against its single-task baseline (negative transfer)?
Every seed report found SST lost to individual training. A spec's `constraints:` says
it: a list of `"KEY >= VALUE"` / `"KEY <= VALUE"` over the metric keys, VALUE a number
or `baseline`, `baseline + DELTA`, `baseline - DELTA`, where `baseline` is the mean over
seeds of the baseline config of a `mtbert compare` JSON (`mtbert sweep --baseline
FILE`) on that metric: `"sst/acc >= baseline - 0.01"` against `mtbert compare
individual multitask`.

A constraint is parsed when its spec loads (a bad one is a ConfigError naming it, the
valid form and keys), resolved to a number once when the sweep creates its study, and
the thresholds are stored in the study (`STUDY_CONSTRAINTS`): every worker and every
later command judges by the same numbers, whatever happens to the baseline file. A
finished trial records whether its metric attributes meet them all (`FEASIBLE`), before
it completes. The samplers that model constraints (TPE, NSGA-II, GP) learn them the way
the installed Optuna wants: from Optuna 5 on, each trial records its constraint values
itself (`Trial.set_constraint`, read by every constraint-aware sampler; the samplers'
`constraints_func` is deprecated there); before it, the sampler gets a
`constraints_func` over the trial's metric attributes. Either way a missing metric is
infeasible. Whatever the sampler, the ranking (`mtbert.studies.results`) ranks
feasible results only.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from mtbert.errors import ConfigError, MtbertError
from mtbert.studies.job import FEASIBLE, STUDY_CONSTRAINTS
from mtbert.studies.samplers import trials_record_constraints
from mtbert.tasks import METRIC_KEYS

log = logging.getLogger("mtbert")

OPERATORS = (">=", "<=")
FORM = ('"KEY >= VALUE" or "KEY <= VALUE", VALUE a number or baseline, baseline + DELTA, '
        "baseline - DELTA (with --baseline FILE, the JSON of `mtbert compare`)")
_CONSTRAINT = re.compile(r"\s*(?P<key>[^\s<>=]+)\s*(?P<op>>=|<=)\s*(?P<value>\S.*?)\s*")
_BASELINE = re.compile(r"baseline(?:\s*(?P<sign>[+-])\s*(?P<delta>\S+))?")
# What a baseline must share with the sweep for its numbers to be a fair bar: the data
# each run sees and how long it trains.
COMPARABLE_KEYS = ("data.max_train_examples", "data.max_eval_examples", "train.epochs",
                   "train.steps_per_epoch")


class NoFeasibleResult(MtbertError):
    """Results exist, but none meets the study's constraints (`mtbert best`: exit 1)."""

    exit_code = 1


@dataclass(frozen=True)
class Constraint:
    """One bound: `key op threshold`; `threshold` is None while it is relative to a
    baseline not read yet (`baseline + delta`)."""

    text: str  # as the spec writes it
    key: str
    op: str
    threshold: float | None = None
    delta: float = 0.0

    def gap(self, metrics: Mapping[str, Any]) -> float:
        """How far `metrics` misses the bound, in Optuna's convention: <= 0 is met. A
        metric that is missing or not a number misses it by 1 (every metric spans at
        most 2)."""
        value = metrics.get(self.key)
        if self.threshold is None:
            raise ValueError(f"constraint {self.text!r} is not resolved")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
            return 1.0
        return self.threshold - value if self.op == ">=" else value - self.threshold

    def describe(self) -> str:
        """`sst/acc >= 0.4710`, and the spec's own words when they differ."""
        if self.threshold is None:
            return self.text
        bound = f"{self.key} {self.op} {self.threshold:.4f}"
        return f"{bound} ({self.text.strip()})" if "baseline" in self.text else bound

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Constraint:
        return cls(text=str(data["text"]), key=str(data["key"]), op=str(data["op"]),
                   threshold=None if data.get("threshold") is None
                   else float(data["threshold"]), delta=float(data.get("delta") or 0.0))


def _bad(text: Any, why: str) -> ConfigError:
    return ConfigError(f"bad constraint {text!r}: {why}; valid: {FORM}; keys: "
                       f"{', '.join(METRIC_KEYS)}")


def _number(text: str, raw: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise _bad(raw, f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise _bad(raw, f"{text!r} is not a finite number")
    return value


def parse_constraint(text: Any) -> Constraint:
    """A spec's constraint string as a `Constraint` (relative ones not resolved yet)."""
    if not isinstance(text, str):
        raise _bad(text, "a constraint is a string")
    match = _CONSTRAINT.fullmatch(text)
    if match is None:
        raise _bad(text, "no KEY, >= or <=, and VALUE")
    key, op, value = match["key"], match["op"], match["value"]
    if key not in METRIC_KEYS:
        raise _bad(text, f"'{key}' is not a metric key")
    relative = _BASELINE.fullmatch(value)
    if value.startswith("baseline"):
        if relative is None:
            raise _bad(text, f"{value!r} is not baseline, baseline + DELTA or baseline - DELTA")
        delta = _number(relative["delta"], text) if relative["delta"] else 0.0
        return Constraint(text, key, op, delta=-delta if relative["sign"] == "-" else delta)
    return Constraint(text, key, op, threshold=_number(value, text))


def parse_constraints(texts: Any) -> list[Constraint]:
    """Every constraint of a spec, checked (a bad one: ConfigError naming it)."""
    if not isinstance(texts, list):
        raise _bad(texts, "constraints must be a list of strings")
    return [parse_constraint(text) for text in texts]


@dataclass
class Baseline:
    """The baseline config of a `mtbert compare` JSON: its mean per metric over seeds and
    the run config of one of its runs (None when no run directory is reachable)."""

    path: Path
    name: str
    means: dict[str, float]
    config: dict[str, Any] | None


def read_baseline(path: Path) -> Baseline:
    """`--baseline FILE`: the compare.json `mtbert compare` wrote."""
    from mtbert.config import flatten

    path = Path(path)
    where = f"--baseline {path}"
    if not path.is_file():
        raise ConfigError(f"{where} does not exist; pass the compare.json that "
                          "`mtbert compare` writes into its --out")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{where} is not JSON ({err})") from None
    if not isinstance(data, dict) or not isinstance(data.get("summary"), dict) \
            or not isinstance(data.get("baseline"), str) \
            or not isinstance(data["summary"].get(data["baseline"]), dict):
        raise ConfigError(f"{where} is not a `mtbert compare` JSON (it needs 'baseline' and "
                          "its 'summary')")
    name = data["baseline"]
    summary = data["summary"][name]
    means = {}
    for key in METRIC_KEYS:
        mean = summary[key].get("mean") if isinstance(summary.get(key), dict) else None
        if mean is None:
            continue
        try:  # a metric's mean lies in [-1, 1]: a NaN, 1e999 or a word is no bar
            means[key] = float(mean)
        except (TypeError, ValueError):
            means[key] = math.nan
        if not (math.isfinite(means[key]) and -1.0 <= means[key] <= 1.0):
            raise ConfigError(f"{where}: the mean {key} of its baseline config '{name}' is "
                              f"{str(mean)[:40]!r}, not a number between -1 and 1")
    config = None
    for run in (data.get("runs") or {}).get(name, {}).values():
        run_dir = Path(str(run.get("run_dir") or ""))
        # A preset `individual` keeps one run per task below its seed's directory.
        found = [run_dir / "config.yaml", *sorted(run_dir.glob("*/config.yaml"))]
        found = [f for f in found if f.is_file()]
        if run.get("status") == "done" and found:
            from mtbert.safeyaml import load_yaml

            config = flatten(load_yaml(found[0].read_text(encoding="utf-8"), str(found[0])) or {})
            break
    return Baseline(path, name, means, config)


def resolve_constraints(texts: list[str], baseline: Path | None,
                        base_values: Mapping[str, Any]) -> list[Constraint]:
    """A spec's constraints with every threshold a number: `baseline` forms from the
    baseline config's means in `baseline` (which they need). Warns when the baseline
    ran on other data caps, epochs or steps than the spec's base (`base_values`)."""
    constraints = parse_constraints(texts)
    relative = [c for c in constraints if c.threshold is None]
    if baseline is None:
        if relative:
            raise ConfigError(f"constraint {relative[0].text!r} compares with the baseline: "
                              "pass --baseline FILE, the compare.json of `mtbert compare`")
        return constraints
    if not constraints:
        log.warning("--baseline %s is not used: the spec has no constraints", baseline)
        return constraints
    found = read_baseline(baseline)
    resolved = []
    for c in constraints:
        if c.threshold is None:
            if c.key not in found.means:
                raise ConfigError(f"constraint {c.text!r}: the baseline config "
                                  f"'{found.name}' of {baseline} has no {c.key} (no seed "
                                  f"finished); it has: {', '.join(found.means) or 'none'}")
            c = Constraint(c.text, c.key, c.op, threshold=found.means[c.key] + c.delta,
                           delta=c.delta)
        resolved.append(c)
    _check_comparable(found, base_values)
    return resolved


def _check_comparable(found: Baseline, base_values: Mapping[str, Any]) -> None:
    if found.config is None:
        log.warning("--baseline %s: no run directory of its '%s' runs is reachable here; "
                    "cannot check that it ran with the sweep's data caps and steps",
                    found.path, found.name)
        return
    differ = [f"{k} {found.config[k]} vs {base_values[k]}" for k in COMPARABLE_KEYS
              if k in found.config and k in base_values and found.config[k] != base_values[k]]
    if differ:
        log.warning("--baseline %s: its '%s' runs differ from the spec's base in %s "
                    "(baseline vs sweep); its numbers may not be a fair bar", found.path,
                    found.name, ", ".join(differ))


def gaps(constraints: list[Constraint], metrics: Mapping[str, Any]) -> list[float]:
    """Each constraint's gap for `metrics` (<= 0: met), Optuna's constraint values."""
    return [c.gap(metrics) for c in constraints]


def meets(constraints: list[Constraint], metrics: Mapping[str, Any]) -> bool:
    """Whether `metrics` meets every constraint (no constraints: always)."""
    return all(g <= 0 for g in gaps(constraints, metrics))


def violated(constraints: list[Constraint], metrics: Mapping[str, Any]) -> list[Constraint]:
    return [c for c in constraints if c.gap(metrics) > 0]


def record_feasibility(trial, constraints: list[Constraint],
                       metrics: Mapping[str, Any]) -> bool:
    """Set a running trial's `FEASIBLE` attribute (and, with Optuna 5, its constraint
    values for the sampler) from its metrics; returns whether it is feasible."""
    values = gaps(constraints, metrics)
    if trials_record_constraints():
        for c, gap in zip(constraints, values):
            trial.set_constraint(c.text, gap)
    feasible = all(g <= 0 for g in values)
    trial.set_user_attr(FEASIBLE, feasible)
    return feasible


def constraints_func(constraints: list[Constraint]) -> Callable[[Any], list[float]]:
    """Optuna's `constraints_func` over a finished trial's metric user attributes (for
    an Optuna before 5, whose samplers compute the trial's constraint values)."""

    def values(trial) -> list[float]:
        return gaps(constraints, trial.user_attrs)

    return values


def study_constraints(study) -> list[Constraint]:
    """The resolved constraints a study stores (none: a study without constraints)."""
    return [Constraint.from_dict(d) for d in study.user_attrs.get(STUDY_CONSTRAINTS) or []]


def store_constraints(study, constraints: list[Constraint]) -> None:
    """Store a sweep's resolved constraints in its study. A study that holds trials keeps
    the constraints they were judged by: other ones are a ConfigError."""
    stored = study.user_attrs.get(STUDY_CONSTRAINTS) or []
    wanted = [c.to_dict() for c in constraints]
    if stored == wanted:
        return
    if study.get_trials(deepcopy=False):
        old = "; ".join(Constraint.from_dict(d).describe() for d in stored) or "none"
        new = "; ".join(c.describe() for c in constraints) or "none"
        raise ConfigError(f"study '{study.study_name}' was swept with other constraints "
                          f"({old}) than these ({new}); its trials were judged by those: use "
                          "--study NEW_NAME")
    study.set_user_attr(STUDY_CONSTRAINTS, wanted)


def describe_all(constraints: list[Constraint]) -> str:
    return "; ".join(c.describe() for c in constraints)
