"""bench/gpu_check.py, the first command on a GPU, runs its CPU parts on CPU with a tiny
model, lists the CUDA-only parts as skipped by name, and fails when a check fails."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GPU_CHECK = ROOT / "bench" / "gpu_check.py"
METHODS = ("sum", "weighted", "uncertainty", "liebel", "dwa", "gradnorm", "pcgrad")


def _load():
    spec = importlib.util.spec_from_file_location("bench_gpu_check", GPU_CHECK)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


# The GPU machine has neither optuna nor wandb: the check runs with both made unimportable.
WITHOUT_OPTUNA_AND_WANDB = """
import runpy, sys
class Missing:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("optuna", "wandb"):
            raise ImportError(f"{name} is not installed on the GPU machine")
sys.meta_path.insert(0, Missing())
sys.argv = ["bench/gpu_check.py", *sys.argv[1:]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="the GPU machine is Linux")
def test_gpu_check_on_cpu_passes_its_cpu_parts_and_lists_the_cuda_parts_skipped(
        tiny_encoder, task_dir, tmp_path):
    import transformers  # noqa: F401 - the peer; a dev dependency, never skipped
    out = tmp_path / "check"
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "HOME": str(tmp_path),
           "MTBERT_CACHE_DIR": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, "-c", WITHOUT_OPTUNA_AND_WANDB, "--out", str(out),
                           "--device", "cpu", "--encoder", str(tiny_encoder), "--data-dir",
                           str(task_dir)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1].startswith("gpu_check: PASS (0 failed)")
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.json", "gpu_check.md"]
    report = json.loads((out / "gpu_check.json").read_text())
    status = {c["name"]: c["status"] for c in report["checks"]}
    assert (report["verdict"], report["mode"], report["device"]) == ("PASS", "cpu-tiny", "cpu")
    # The CPU parts ran and passed, within the stated fp32 tolerances.
    for kernel in ("padded", "grid", "nested"):
        check = next(c for c in report["checks"]
                     if c["name"] == f"correctness/tiny/{kernel}/fp32")
        assert check["status"] == "PASS"
        assert check["tolerance"] == report["tolerances"]["fp32"]
        assert all(check["errors"][k] <= check["tolerance"][k] for k in check["tolerance"]
                   if k in check["errors"])
        assert status[f"kernels/tiny/{kernel}"] == "INFO"
        assert report["figures"]["kernels"]["tiny"][kernel]["backends"]  # the profiler named it
        assert report["figures"]["throughput"]["tiny"]["batch 8"][f"ours-{kernel}"][
            "examples_per_s"] > 0
    assert "attention" in next(c for c in report["checks"]
                               if c["name"] == "correctness/tiny/grid/fp32")["errors"]
    # The CUDA-only parts, skipped by name.
    skipped = {line.split(":")[0] for line in report["skipped"]}
    want = {"correctness/tiny/varlen/bf16", "kernels/tiny/varlen",
            "kernels/tiny/cuda-kernel-names", "oom/mtbert-train", "concurrency/k1-vs-k4",
            "throughput/bert-base", "throughput/minilm-l6", "mfu/bert-base/8192-real-tokens",
            "syncs/step/tiny/ours-grid", "syncs/step/tiny/peer",
            *(f"syncs/loss-method/{m}" for m in METHODS)}
    assert want <= skipped
    assert not [c for c in report["checks"] if c["status"] in ("FAIL", "WARN")]
    assert report["recommended_packed_attention"] is None  # no GPU figure, no advice
    text = (out / "gpu_check.md").read_text()
    assert "**Verdict: PASS**" in text and report["torch"] in text
    skipped_part = text[text.index("## Skipped"):text.index("## Throughput")]
    assert all(f"- {name}: " in skipped_part for name in want)
    assert "| correctness/tiny/nested/fp32 | PASS |" in text


def test_gpu_check_help_names_the_kernels(capsys):
    gpu_check = _load()
    with pytest.raises(SystemExit) as done:
        gpu_check.main(["--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    assert all(kernel in text for kernel in ("padded", "grid", "nested", "varlen"))


def test_gpu_check_refuses_an_unknown_kernel(capsys, tmp_path):
    gpu_check = _load()
    with pytest.raises(SystemExit) as done:
        gpu_check.main(["--out", str(tmp_path), "--kernels", "grid,flash"])
    assert done.value.code == 2
    assert "--kernels: unknown flash; valid: padded, grid, nested, varlen" in \
        capsys.readouterr().err


def test_a_failed_correctness_check_fails_the_run(tiny_encoder, task_dir, tmp_path,
                                                  monkeypatch):
    """A tolerance no path can meet (0 for the fp32 outputs) must end as FAIL, exit 1."""
    monkeypatch.setenv("MTBERT_CACHE_DIR", str(tmp_path / "cache"))
    gpu_check = _load()
    monkeypatch.setitem(gpu_check.TOLERANCES["fp32"], "hidden", 0.0)
    out = tmp_path / "check"
    code = gpu_check.main(["--out", str(out), "--device", "cpu", "--encoder",
                           str(tiny_encoder), "--data-dir", str(task_dir),
                           "--sections", "correctness", "--kernels", "padded,grid"])
    assert code == 1
    report = json.loads((out / "gpu_check.json").read_text())
    failed = {c["name"] for c in report["checks"] if c["status"] == "FAIL"}
    assert failed == {"correctness/tiny/padded/fp32", "correctness/tiny/grid/fp32"}
    assert report["verdict"] == "FAIL"
    assert "hidden" in next(c for c in report["checks"]
                            if c["name"] == "correctness/tiny/grid/fp32")["reason"]
    assert "| correctness/tiny/grid/fp32 | FAIL |" in (out / "gpu_check.md").read_text()


def test_run_trainings_keeps_k_at_once_and_reports_each_exit(tmp_path):
    gpu_check = _load()
    # Each command counts the commands running beside it, then exits with its own code.
    script = ("import os, sys, time, pathlib\n"
              "me = pathlib.Path(f'running-{os.getpid()}'); me.touch()\n"
              "time.sleep(0.3)\n"
              "print(len(list(pathlib.Path('.').glob('running-*'))), file=sys.stderr)\n"
              "me.unlink(); sys.exit(int(sys.argv[1]))\n")
    commands = [[sys.executable, "-c", script, str(code)] for code in (0, 3, 0, 0)]
    wall, results = gpu_check.run_trainings(commands, 2, env={"PATH": "/usr/bin:/bin"},
                                            cwd=tmp_path)
    assert [r["exit_code"] for r in results] == [0, 3, 0, 0]
    assert all(1 <= int(r["stderr_tail"]) <= 2 for r in results)
    assert wall > 0
