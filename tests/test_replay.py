"""bench/replay.py on a synthetic table written here (tables of real runs live in
bench/tables/; this one is a fixture): what a replay must hold whatever the numbers."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import replay  # noqa: E402

from mtbert.studies.job import RACED_OUT  # noqa: E402
from mtbert.studies.configurations import config_of  # noqa: E402

SEED_EFFECT = {0: 0.0, 1: 0.03, 2: -0.02}  # shared by every configuration, as real seeds are


def write_table(path: Path, lead: float = 0.05) -> Path:
    """8 configurations x 3 seeds x 3 epochs. Configuration (w=2, h=0) leads every
    other one by at least `lead` on every seed; the others differ by a little noise."""
    rng = random.Random(0)
    lines = [{"kind": "header", "table": "synthetic"}]
    for w in (1.0, 2.0):
        for h in (0, 64):
            for d in (1.0, 0.8):
                params = {"loss.weights.qqp": w, "model.head_hidden": h, "optim.layer_decay": d}
                base = 0.5 + 0.01 * rng.random() + (lead if (w, h, d) == (2.0, 0, 1.0) else 0)
                for seed, effect in SEED_EFFECT.items():
                    for epoch in (1, 2, 3):
                        value = base + effect - 0.04 * (3 - epoch) + 0.002 * rng.random()
                        lines.append({
                            "kind": "multitask", "config": json.dumps(params, sort_keys=True),
                            "params": params, "seed": seed, "epoch": epoch,
                            "metrics": {"overall/geometric": value},
                            "train_s": 10.0 + h / 64, "eval_s": 2.0})
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


@pytest.fixture
def table(tmp_path) -> replay.Table:
    return replay.Table.read(write_table(tmp_path / "t.jsonl"))


def test_the_fixed_protocol_costs_the_whole_table_and_names_the_best_mean(table):
    total = sum((10.0 + h / 64 + 2.0) * 3 * 3 * 4 for h in (0, 64))  # 4 configs per h
    assert table.fixed_cost() == pytest.approx(total)
    fixed = replay.policies(3)[0]
    result = replay.replay(table, fixed, 0, table.fixed_cost())
    best = json.dumps({"loss.weights.qqp": 2.0, "model.head_hidden": 0,
                       "optim.layer_decay": 1.0}, sort_keys=True)
    assert result.path == [(pytest.approx(total), best)]
    assert table.answers() == {best}
    assert result.settled(table.answers()) == pytest.approx(total)


@pytest.mark.parametrize("name", ["tpe+median+race0.1", "tpe, 1 seed, reseed top 3",
                                  "qmc+median+race0.1", "tpe+hyperband+race0.1",
                                  "grid+hyperband+race0.1"])
def test_a_replay_is_reproducible_from_its_seed(table, name):
    policy = next(p for p in replay.policies(3) if p.name == name)
    first = replay.replay(table, policy, 7, table.fixed_cost())
    again = replay.replay(table, policy, 7, table.fixed_cost())
    assert first.path == again.path and len(first.path) > 3
    other = replay.replay(table, policy, 8, table.fixed_cost())
    assert other.path != first.path  # another seed: another path


@pytest.mark.parametrize("alpha", [0.05, 0.1, 0.2])
def test_a_race_never_races_out_a_configuration_ahead_on_every_seed(table, alpha):
    """The race's threshold: a configuration ahead of every other on every shared seed
    has a negative t statistic against any incumbent, so p > 0.5 and it is never raced
    out at a level below 0.5."""
    policy = replay.Policy(f"race{alpha}", "tpe", {"name": "none"}, 3, alpha)
    best = table.key({"loss.weights.qqp": 2.0, "model.head_hidden": 0,
                      "optim.layer_decay": 1.0})
    raced_out_any = False
    for number in range(6):
        result = replay.replay(table, policy, number, table.fixed_cost())
        for t in result.study.trials:
            raced = bool(t.user_attrs.get(RACED_OUT))
            raced_out_any |= raced
            if table.key(t.params) == best:
                assert not raced, (number, t.number)
        if any(table.key(t.params) == best for t in result.study.trials):
            assert result.path[-1][1] == best  # and the race ends on it once it ran
    assert raced_out_any  # the others, 0.05 or more behind on every seed, were raced out


def test_a_raced_replays_seed_runs_follow_their_configuration(table):
    policy = replay.Policy("race", "tpe", {"name": "none"}, 3, 0.1)
    result = replay.replay(table, policy, 0, table.fixed_cost())
    by_config: dict[int, list[int]] = {}
    for t in result.study.trials:
        if t.state.name == "COMPLETE":
            by_config.setdefault(config_of(t), []).append(t.user_attrs["seed"])
    assert by_config and all(seeds == list(range(len(seeds))) for seeds in by_config.values())


def test_the_command_prints_every_policy_and_draws_the_figure(tmp_path, capsys):
    path = write_table(tmp_path / "t.jsonl")
    summaries = replay.main([str(path), "--replays", "2", "--figure", str(tmp_path / "r.png"),
                             "--policy", "fixed protocol", "--policy", "tpe+median+race0.1"])
    assert set(summaries) == {"fixed protocol", "tpe+median+race0.1"}
    assert summaries["fixed protocol"]["median_cost"] == 1.0
    assert summaries["fixed protocol"]["found"] == 1.0
    assert (tmp_path / "r.png").stat().st_size > 10_000
    assert "8 configurations x 3 seeds" in capsys.readouterr().out
    replay.main([str(path), "--replays", "2", "--markdown", "--policy", "fixed protocol"])
    rows = [x for x in capsys.readouterr().out.splitlines() if x.startswith("| fixed")]
    assert rows == ["| fixed protocol | 2 | 1.000 | 1.000 | 100% | 0% | 0% | 0.0000 |"]


def test_a_table_without_every_point_is_refused_or_replayed_as_one_choice(tmp_path, capsys):
    path = write_table(tmp_path / "t.jsonl")
    lines = path.read_text().splitlines()
    dropped = json.dumps({"loss.weights.qqp": 1.0, "model.head_hidden": 64,
                          "optim.layer_decay": 0.8}, sort_keys=True)
    path.write_text("\n".join(x for x in lines if json.loads(x).get("config") != dropped) + "\n")
    with pytest.raises(SystemExit, match="holds 7 of the 8 configurations of its grid"):
        replay.main([str(path), "--replays", "1"])
    summaries = replay.main([str(path), "--replays", "2", "--partial",
                             "--policy", "tpe+median+race0.1"])
    assert summaries["tpe+median+race0.1"]["replays"] == 2
    assert "7 configurations x 3 seeds" in capsys.readouterr().out


COMMITTED = Path(__file__).resolve().parent.parent / "bench" / "tables" / "mission.jsonl"


def test_the_committed_table_replays_its_fixed_protocol_and_repeats_its_replays():
    """The table of real runs in bench/tables/ (it grows over sittings: replayed over its
    configurations as one choice while its grid has points left)."""
    table = replay.Table.read(COMMITTED)
    lines = [json.loads(x) for x in COMMITTED.read_text().splitlines()[1:]]
    total = sum(r["train_s"] + r["eval_s"] for r in lines
                if r["kind"] == "multitask" and r["config"] in table.runs)
    if len(table.runs) < table.points():
        table = table.as_one_choice()
    assert table.fixed_cost() == pytest.approx(total)
    fixed = replay.replay(table, replay.policies(3)[0], 0, total)
    assert [cost for cost, _ in fixed.path] == [pytest.approx(total)]
    longest = max(sum(r.costs) for runs in table.runs.values() for r in runs.values())
    for policy in replay.policies(3)[1:5]:
        first = replay.replay(table, policy, 3, total)
        assert first.path == replay.replay(table, policy, 3, total).path
        assert 0 < first.path[-1][0] < total + longest  # no run starts past the cap


@pytest.mark.parametrize("alpha", [0.05, 0.1, 0.2])
def test_on_the_committed_table_no_race_drops_a_configuration_ahead_on_every_seed(alpha):
    """The race's threshold, on real numbers: a configuration ahead of its incumbent on
    every seed of the table is never raced out by it (on any seeds they share, its gap is
    negative, so t < 0 and p > 0.5 > alpha). So the fixed protocol's best is raced out only
    by an incumbent that beats it on some seed."""
    table = replay.Table.read(COMMITTED)
    median = {"name": "median", "n_startup_trials": 2}
    policy = replay.Policy(f"tpe+median+race{alpha:g}", "tpe", median, 3, alpha)
    raced = 0
    for number in range(4):
        result = replay.replay(table, policy, number, table.fixed_cost())
        for t in result.study.trials:
            if t.user_attrs.get(RACED_OUT):
                raced += 1
                mine = table.runs[table.key(t.params)]
                leader = table.runs[t.user_attrs[replay.RACED_BY]]
                assert not all(mine[s].value > leader[s].value for s in table.seeds), t.number
    assert raced  # the race did drop configurations on the real table
