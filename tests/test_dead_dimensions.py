"""Every searched dimension of every shipped spec changes the model.

For each parameter: two values (a numeric range's ends, or every choice of a
categorical) at the spec's base, with the conditions of its `when:` met, a tiny
random encoder in place of the spec's, one seed; the trained weights must
differ, and no two choices of a categorical may train the identical model. Every spec
at its cpu size; at its gpu size (the research protocol) the one whose windows change
in kind there (see GPU_SIZED).
Real trainings in this process: the `slow` tier.
"""

import shutil
from pathlib import Path

import pytest
import torch

from mtbert.studies.conditions import when_alternatives, when_holds
from mtbert.studies.spec import SweepSpec, load_spec, shipped_specs, trial_config
from mtbert.train import read_resume_file, train
from conftest import write_task_files, write_tiny_encoder

pytestmark = pytest.mark.slow

TOLERANCE = 1e-6  # largest weight difference still counted as the same model
# At its gpu size strategies runs DWA over epochs (not windows of steps) in full passes.
# Its trainings are cut to 4 epochs (DWA acts in the last two) at the cpu size's lr 1e-4:
# at the protocol's 1e-5 a tiny random encoder moves less than TOLERANCE in 10 epochs of
# these parts, whatever the method (dwa against sum: 8e-7 apart; at 4 epochs of 1e-4: 8e-6).
GPU_SIZED = ("strategies",)
GPU_CUT = ["train.epochs=4", "train.lr=1e-4"]


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory) -> dict[str, str]:
    """Six encoder layers (probing and layer scales name layers 0..5) and tasks of three
    sizes (sampling by size differs from uniform)."""
    root = tmp_path_factory.mktemp("dead-dimensions")
    encoder = write_tiny_encoder(root / "encoder", num_hidden_layers=6)
    data = root / "data"
    data.mkdir()
    for name, n_train in (("ids-sst", 40), ("quora", 120), ("sts", 24)):
        source = write_task_files(root / f"{name}-{n_train}", n_train=n_train, n_dev=16)
        for path in source.glob(f"{name}-*.csv"):
            shutil.copy(path, data / path.name)
    return {"model.encoder": str(encoder), "data.dir": str(data),
            "data.cache_dir": str(root / "cache")}


def tiny(spec: SweepSpec, setup: dict[str, str]) -> SweepSpec:
    """The spec at its own schedule (epochs, steps, windows) of its size, on tiny parts."""
    overrides = [f"{k}={v}" for k, v in setup.items()] + [
        "train.batch_size=4", "train.eval_batch_size=16", "model.max_length=24",
        "data.max_eval_examples=0", "train.log_every=50"]
    if spec.size == "gpu":
        overrides += GPU_CUT
    return load_spec(spec.source, overrides, size=spec.size)


def conditions(spec: SweepSpec, key: str) -> dict:
    """Values that make `key` sampled: the first alternative of its `when:`, with the
    conditions of the keys it names met in turn."""
    alternatives = when_alternatives(spec.space[key].when)
    if not alternatives:
        return {}
    values: dict = {}
    for cond_key, allowed in alternatives[0].items():
        if cond_key in spec.space:
            values.update(conditions(spec, cond_key))
        values[cond_key] = allowed[0]
    return values


def completed(spec: SweepSpec, params: dict) -> dict:
    """`params` with every conditional parameter their values switch on at its low end (or
    first choice), as a trial samples one: a choice is judged with what comes with it."""
    out = dict(params)
    for key, p in spec.space.items():
        if key not in out and p.when and when_holds(
                p.when, lambda k: out.get(k, spec.base_values.get(k))):
            out[key] = p.choices[0] if p.type == "categorical" else p.low
    return out


def two_or_more_values(spec: SweepSpec, key: str) -> list:
    p = spec.space[key]
    return list(p.choices) if p.type == "categorical" else [p.low, p.high]


def trained_weights(spec: SweepSpec, params: dict, run_dir: Path) -> dict[str, torch.Tensor]:
    train(trial_config(spec, params), run_dir=run_dir, device="cpu", progress=False)
    return read_resume_file(run_dir / "resume.pt")["model"]


def same_model(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return all((a[k].float() - b[k].float()).abs().max() <= TOLERANCE for k in a)


def dead_dimensions(spec: SweepSpec, root: Path) -> list[str]:
    """Each searched value that trains the model of another value of its parameter."""
    dead = []
    for key in spec.space:
        fixed = conditions(spec, key)
        models = []
        for i, value in enumerate(two_or_more_values(spec, key)):
            params = completed(spec, {**fixed, key: value})
            weights = trained_weights(spec, params, root / f"{key}-{i}")
            same = [v for v, w in models if same_model(w, weights)]
            if same:
                dead.append(f"{key}: {value!r} trains the model of {same[0]!r}"
                            f"{f' (where {fixed})' if fixed else ''}")
            models.append((value, weights))
    return dead


@pytest.mark.parametrize("name, size", [(name, "cpu") for name in sorted(shipped_specs())]
                         + [(name, "gpu") for name in GPU_SIZED])
def test_every_searched_dimension_changes_the_model(name, size, tiny_setup, tmp_path):
    spec = tiny(load_spec(name, size=size), tiny_setup)
    assert dead_dimensions(spec, tmp_path) == []
