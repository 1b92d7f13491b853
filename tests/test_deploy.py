"""deploy/: the cluster launchers, checked without a cluster (no Slurm, no Kubernetes here).

Every manifest parses and has the fields a sweep worker needs; every `mtbert` command in
deploy/ and the clusters guide (docs/guides/clusters.md) parses with the real CLI; the Slurm script runs
in bash with a stand-in `mtbert` and `scontrol`, so that its signal forwarding and requeue
are exercised; no file holds a secret."""

import os
import re
import shlex
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from conftest import parse_cli

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
SBATCH = DEPLOY / "slurm" / "sweep-array.sbatch"
KUBE = DEPLOY / "kubernetes"
TRYING = KUBE / "postgres-for-trying.yaml"
SHELL_SCRIPTS = sorted([*DEPLOY.rglob("*.sh"), *DEPLOY.rglob("*.sbatch")])
YAML_FILES = sorted([*DEPLOY.rglob("*.yaml"), *DEPLOY.rglob("*.yml"),
                     ROOT / "docker" / "compose.yaml"])
# Stand-in passwords that nobody would take for real ones.
PLACEHOLDERS = re.compile(r"^(CHANGE-ME|PASSWORD|\.\.\.|\$\{?\w+(:-[^}]*)?\}?)$")
URL_PASSWORD = re.compile(r"\b[a-z][\w+.-]*://[^:/@\s'\"]+:([^@\s'\"]*)@")
# key: value or KEY=value; not a shell default (${POSTGRES_PASSWORD:-...}).
KEY_VALUE = re.compile(r"(?i)\b[\w-]*(password|passwd|api[-_]?key|secret|token)[ \t]*[:=][ \t]*"
                       r"([^\s-]\S*)")


def _manifests():
    return [(path, doc) for path in sorted(KUBE.glob("*.yaml"))
            for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def _objects(kind: str) -> dict[str, dict]:
    return {doc["metadata"]["name"]: doc for _, doc in _manifests() if doc["kind"] == kind}


def _pod_spec(doc: dict) -> dict:
    return doc["spec"] if doc["kind"] == "Pod" else doc["spec"]["template"]["spec"]


def _pod_specs():
    return [(doc["metadata"]["name"], doc, _pod_spec(doc)) for _, doc in _manifests()
            if doc["kind"] in ("Pod", "Job", "StatefulSet", "Deployment")]


@pytest.fixture(scope="module")
def job():
    (doc,) = _objects("Job").values()
    return doc


def _worker(job) -> dict:
    (container,) = _pod_spec(job)["containers"]
    return container


def _mounts(container: dict, pod: dict) -> dict[str, tuple]:
    """mountPath -> (claim, subPath, read-only) of the container's volume mounts."""
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    return {m["mountPath"]: (volumes[m["name"]]["persistentVolumeClaim"]["claimName"],
                             m.get("subPath", ""), m.get("readOnly", False))
            for m in container.get("volumeMounts", [])
            if "persistentVolumeClaim" in volumes.get(m["name"], {})}


# ---------------------------------------------------------------- every file parses


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_yaml_file_parses(path):
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs and all(isinstance(d, dict) for d in docs)
    if path.parent == KUBE:
        for doc in docs:
            assert doc["apiVersion"] and doc["kind"] and doc["metadata"]["name"]


def test_the_launchers_are_there():
    assert SBATCH in SHELL_SCRIPTS
    kinds = sorted(doc["kind"] for _, doc in _manifests())
    assert kinds == ["Job", "PersistentVolumeClaim", "Pod", "Secret", "Secret", "Service",
                     "StatefulSet"]


@pytest.mark.parametrize("path", SHELL_SCRIPTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_shell_scripts_parse_in_bash(path):
    result = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("path", SHELL_SCRIPTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_shell_scripts_pass_shellcheck(path):
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (apt-get install shellcheck)")
    result = subprocess.run(["shellcheck", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


# ---------------------------------------------------------------- Kubernetes


def test_the_sweep_job_is_an_indexed_job_of_one_gpu_workers(job):
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"] >= 2
    pod = _pod_spec(job)
    assert pod["restartPolicy"] == "Never"  # what a podFailurePolicy requires
    worker = _worker(job)
    assert int(worker["resources"]["limits"]["nvidia.com/gpu"]) == 1
    # mtbert waits up to 15 s for its trial process, then writes to the database.
    assert pod["terminationGracePeriodSeconds"] >= 60


def _action(policy: dict, container: str, exit_code: int, conditions=()) -> str:
    """What the Job controller does with a failed pod: the first matching rule, else
    Count (towards backoffLimit)."""
    for rule in policy["rules"]:
        codes = rule.get("onExitCodes")
        if codes and codes.get("containerName", container) == container:
            inside = exit_code in codes["values"]
            if inside == (codes["operator"] == "In"):
                return rule["action"]
        for pattern in rule.get("onPodConditions", []):
            if pattern["type"] in conditions and pattern.get("status", "True") == "True":
                return rule["action"]
    return "Count"


def test_a_stopped_or_preempted_worker_is_rerun_and_bad_input_fails_the_job(job):
    policy, name = job["spec"]["podFailurePolicy"], _worker(job)["name"]
    assert _action(policy, name, 130) == "Ignore"  # SIGTERM: trial queued again
    assert _action(policy, name, 137, {"DisruptionTarget"}) == "Ignore"  # preempted, evicted
    assert _action(policy, name, 2) == "FailJob"  # a bad spec or option
    assert _action(policy, name, 1) == "Count"  # no trial could finish, database down
    assert _action(policy, name, 137) == "Count"  # out of memory
    assert job["spec"]["backoffLimit"] >= 1


def test_the_kubernetes_worker_runs_a_sweep_the_cli_accepts(job):
    worker = _worker(job)
    assert worker["command"][0] == "mtbert"
    ctx = parse_cli(worker["command"][1:])
    assert ctx.command.name == "sweep" and ctx.params["device"].value == "cuda"
    assert ctx.params["storage"] is None and "--storage" not in worker["command"]
    mounts = _mounts(worker, _pod_spec(job))
    claims = _objects("PersistentVolumeClaim")
    # The runs on the shared volume, writable: a retry on another node resumes from there.
    claim, _, read_only = mounts[str(ctx.params["out"])]
    assert "ReadWriteMany" in claims[claim]["spec"]["accessModes"] and not read_only
    assert str(ctx.params["data_dir"]) in mounts
    # The image's environment puts the token cache in /cache and the W&B runs in /runs.
    assert "/cache" in mounts


@pytest.mark.parametrize("name", [name for name, _, _ in _pod_specs()])
def test_volume_mounts_name_volumes_and_claims_that_exist(name):
    (doc, pod), = [(d, p) for n, d, p in _pod_specs() if n == name]
    claims = set(_objects("PersistentVolumeClaim"))
    templates = {t["metadata"]["name"] for t in doc["spec"].get("volumeClaimTemplates", [])}
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    assert len(volumes) == len(pod.get("volumes", [])), "a volume name twice"
    for container in pod["containers"]:
        paths = [m["mountPath"] for m in container.get("volumeMounts", [])]
        assert len(set(paths)) == len(paths), f"{container['name']} mounts a path twice"
        for mount in container.get("volumeMounts", []):
            assert mount["name"] in volumes or mount["name"] in templates, mount
    for volume in volumes.values():
        if "persistentVolumeClaim" in volume:
            assert volume["persistentVolumeClaim"]["claimName"] in claims


def test_the_toolbox_sees_what_the_workers_wrote(job):
    (toolbox,) = _objects("Pod").values()
    (container,) = toolbox["spec"]["containers"]
    assert container["image"] == _worker(job)["image"]
    workers, tools = _mounts(_worker(job), _pod_spec(job)), _mounts(container, toolbox["spec"])
    for path, (claim, sub_path, _) in workers.items():
        assert tools[path][:2] == (claim, sub_path), path
    assert not tools["/data"][2], "the toolbox fills /data"
    assert "nvidia.com/gpu" not in container.get("resources", {}).get("limits", {})


def test_the_storage_url_comes_from_a_secret(job):
    secrets = _objects("Secret")
    for name, _, pod in _pod_specs():
        for container in pod["containers"]:
            env = {e["name"]: e for e in container.get("env", [])}
            if container.get("command", [""])[0] != "mtbert" and "MTBERT_STORAGE" not in env:
                continue
            ref = env["MTBERT_STORAGE"]["valueFrom"]["secretKeyRef"]
            assert "value" not in env["MTBERT_STORAGE"]
            # The trial manifest's Secret has that key; an existing database's is made by hand.
            assert ref["key"] in secrets[ref["name"]]["stringData"], name
            assert secrets[ref["name"]]["stringData"][ref["key"]].startswith("postgresql://")
    assert "WANDB_API_KEY" in {e["name"] for e in _worker(job)["env"]}


def test_the_trial_postgresql_serves_the_url_of_the_storage_secret():
    (postgres,) = _objects("StatefulSet").values()
    (service,) = _objects("Service").values()
    secrets = _objects("Secret")
    url = secrets["mtbert-storage"]["stringData"]["url"]
    (container,) = _pod_spec(postgres)["containers"]
    env = {e["name"]: e for e in container["env"]}
    ref = env["POSTGRES_PASSWORD"]["valueFrom"]["secretKeyRef"]
    password = secrets[ref["name"]]["stringData"][ref["key"]]
    port = service["spec"]["ports"][0]["port"]
    assert url == (f"postgresql://{env['POSTGRES_USER']['value']}:{password}@"
                   f"{service['metadata']['name']}:{port}/{env['POSTGRES_DB']['value']}")
    labels = postgres["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert postgres["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert "pg_isready" in container["readinessProbe"]["exec"]["command"]
    # initdb refuses a volume root with lost+found in it.
    assert env["PGDATA"]["value"].startswith(container["volumeMounts"][0]["mountPath"] + "/")


# ---------------------------------------------------------------- Slurm


def _directives() -> list[str]:
    return [ln.split(None, 1)[1].strip() for ln in SBATCH.read_text().splitlines()
            if ln.startswith("#SBATCH ")]


def test_the_batch_script_asks_for_a_requeueable_array_of_one_gpu_tasks():
    directives = _directives()
    assert "--requeue" in directives and "--gres=gpu:1" in directives
    assert "--open-mode=append" in directives  # a requeued task's log goes on
    assert any(re.fullmatch(r"--array=\d+-\d+(%\d+)?", d) for d in directives)
    (signal_,) = [d for d in directives if d.startswith("--signal=")]
    # B: the batch shell, which forwards it; early enough for mtbert to end its trial.
    assert int(re.fullmatch(r"--signal=B:TERM@(\d+)", signal_).group(1)) >= 60
    lines = [ln for ln in SBATCH.read_text().splitlines()
             if ln.strip() and not ln.lstrip().startswith("#")]
    assert lines[0] == "set -euo pipefail"
    # The settings come first, each overridable (sbatch --export=ALL,SWEEP_SPEC=...).
    settings = [re.match(r"(\w+)=\"\$\{\1:-", ln) for ln in lines[1:8]]
    assert [m.group(1) for m in settings] == ["SWEEP_SPEC", "SWEEP_TRIALS", "SWEEP_OUT",
                                              "SWEEP_DATA", "SWEEP_MAX_RETRIES",
                                              "SWEEP_DEVICE", "SWEEP_ARGS"]
    # What a site edits: one #SBATCH line per resource.
    for resource in ("--gres=", "--cpus-per-task=", "--mem=", "--time="):
        assert len([d for d in directives if d.startswith(resource)]) == 1, resource
    assert not [ln for ln in lines if re.match(r"\s*(export\s+)?MTBERT_STORAGE=", ln)], \
        "the URL comes from outside"


def _stubs(tmp_path: Path, mtbert_body: str) -> tuple[dict, Path]:
    """PATH with stand-ins for `mtbert` and `scontrol` that log what they were asked."""
    bin_dir, log = tmp_path / "bin", tmp_path / "log"
    bin_dir.mkdir()
    log.mkdir()
    (bin_dir / "mtbert").write_text(
        "#!/bin/bash\nprintf '%s\\0' \"$@\" > \"$STUB_LOG/argv\"\n" + mtbert_body)
    # `scontrol -o show job ID` answers with the state a test sets (RUNNING by default).
    (bin_dir / "scontrol").write_text(
        "#!/bin/bash\necho \"$*\" >> \"$STUB_LOG/scontrol\"\n"
        "if [[ $2 == show ]]; then echo \"JobId=$4 JobState=${STUB_JOB_STATE:-RUNNING}"
        " Restarts=${STUB_RESTARTS:-0} ExitCode=0:0\"; fi\n")
    for stub in bin_dir.iterdir():
        stub.chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path / "home"),
           "STUB_LOG": str(log), "SLURM_ARRAY_JOB_ID": "4242", "SLURM_ARRAY_TASK_ID": "3",
           "SLURM_JOB_ID": "4245", "CUDA_VISIBLE_DEVICES": "0",
           "MTBERT_STORAGE": "postgresql://mtbert:CHANGE-ME@dbhost:5432/mtbert"}
    return env, log


def _argv(log: Path) -> list[str]:
    return (log / "argv").read_text().split("\0")[:-1]


def test_the_batch_script_runs_a_sweep_the_cli_accepts(tmp_path):
    env, log = _stubs(tmp_path, "exit 0\n")
    done = subprocess.run(["bash", str(SBATCH)], env=env, capture_output=True, text=True,
                          timeout=30)
    assert done.returncode == 0, done.stderr
    assert "task 4242_3" in done.stderr and "CHANGE-ME" not in done.stderr
    ctx = parse_cli(_argv(log))
    assert ctx.command.name == "sweep" and ctx.params["spec"] == "loss-weights"
    assert ctx.params["trials"] == 10 and ctx.params["max_retries"] == 2
    assert ctx.params["out"] == tmp_path / "home" / "mtbert-runs"
    assert ctx.params["data_dir"] == tmp_path / "home" / "mtbert-data"
    assert ctx.params["device"].value == "cuda" and ctx.params["storage"] is None
    assert not (log / "scontrol").exists(), "a finished worker is not requeued"
    first, last = done.stderr.splitlines()[0], done.stderr.splitlines()[-1]
    assert first.startswith("sweep-array: task 4242_3 on ") and ", start 1, device cuda" in first
    assert last == "sweep-array: mtbert exited 0: done"
    # The settings reach the command; SWEEP_ARGS is split as a shell splits, quotes kept.
    env.update(SWEEP_SPEC="strategies", SWEEP_TRIALS="3", SWEEP_OUT="/shared/my runs",
               SWEEP_MAX_RETRIES="5", SWEEP_DEVICE="cpu",
               SWEEP_ARGS="--study lw1 --set 'model.encoder=/shared/my models/tiny' "
                          "--set \"train.epochs=2\"  --wandb-mode offline --set data.cache_dir=$HOME/c")
    subprocess.run(["bash", str(SBATCH)], env=env, capture_output=True, check=True, timeout=30)
    ctx = parse_cli(_argv(log))
    assert (ctx.params["spec"], ctx.params["trials"], ctx.params["max_retries"]) == \
        ("strategies", 3, 5)
    assert ctx.params["out"] == Path("/shared/my runs") and ctx.params["device"].value == "cpu"
    assert ctx.params["study"] == "lw1" and ctx.params["wandb_mode"].value == "offline"
    # Nothing in SWEEP_ARGS is expanded.
    assert ctx.params["set_"] == ["model.encoder=/shared/my models/tiny", "train.epochs=2",
                                  "data.cache_dir=$HOME/c"]


def test_a_sweep_args_quote_left_open_stops_the_script_before_mtbert(tmp_path):
    env, log = _stubs(tmp_path, "exit 0\n")
    env["SWEEP_ARGS"] = "--set 'model.encoder=/shared/my models"
    done = subprocess.run(["bash", str(SBATCH)], env=env, capture_output=True, text=True,
                          timeout=30)
    assert done.returncode == 2
    assert done.stderr.strip() == ("sweep-array: SWEEP_ARGS has a quote that is not closed: "
                                   "--set 'model.encoder=/shared/my models")
    assert not (log / "argv").exists()


@pytest.mark.parametrize("code, words", [
    (1, "no trial could finish"), (2, "bad input: spec, option or device"),
    (137, "killed by signal 9"), (3, "an error (see above)"),
    (130, "stopped; its running trial is queued again (sacct shows 130 as 2:0)")])
def test_the_batch_script_logs_mtberts_exit_code_in_words(tmp_path, code, words):
    env, log = _stubs(tmp_path, f"exit {code}\n")
    done = subprocess.run(["bash", str(SBATCH)], env=env, capture_output=True, text=True,
                          timeout=30)
    assert done.returncode == code
    assert done.stderr.splitlines()[-1].startswith(f"sweep-array: mtbert exited {code}: {words}")
    assert not (log / "scontrol").exists(), "no signal: nothing to requeue"


def test_the_batch_script_needs_the_storage_url_from_the_environment(tmp_path):
    env, log = _stubs(tmp_path, "exit 0\n")
    del env["MTBERT_STORAGE"]
    done = subprocess.run(["bash", str(SBATCH)], env=env, capture_output=True, text=True,
                          timeout=30)
    assert done.returncode != 0 and "MTBERT_STORAGE" in done.stderr
    assert not (log / "argv").exists()


# mtbert's own answer to SIGTERM, in short: end the trial (a moment), exit 130.
STOPPABLE = """trap 'echo TERM >> "$STUB_LOG/signals"; sleep 0.5; kill "$sleeper"; exit 130' TERM
sleep 30 &
sleeper=$!
echo started > "$STUB_LOG/started"
wait
exit 0
"""


def _stop_before_the_time_limit(tmp_path: Path, signals: int, *, every_process=False,
                                unset=(), **job):
    """Run the script under the stand-ins and SIGTERM it `signals` times once mtbert runs:
    the batch shell alone, as the time limit's --signal=B: does, or `every_process` of the
    job, as Slurm does when it requeues, preempts or cancels it (`job`: the job's state
    scontrol then shows, STUB_JOB_STATE and STUB_RESTARTS; `unset`: variables of Slurm's
    left out)."""
    env, log = _stubs(tmp_path, STOPPABLE)
    env.update(job)
    for name in unset:
        del env[name]
    # Its own session: the test's signal goes to the batch shell only, as with --signal=B:.
    shell = subprocess.Popen(["bash", str(SBATCH)], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 20
        while not (log / "started").exists():
            assert time.monotonic() < deadline and shell.poll() is None, shell.stderr.read()
            time.sleep(0.05)
        for _ in range(signals):
            if every_process:
                os.killpg(shell.pid, signal.SIGTERM)
            else:
                shell.send_signal(signal.SIGTERM)
            time.sleep(0.1)
        _, stderr = shell.communicate(timeout=20)
    finally:
        if shell.poll() is None:
            os.killpg(shell.pid, signal.SIGKILL)
            shell.wait()
    return shell.returncode, stderr, log


@pytest.mark.slow
@pytest.mark.parametrize("signals", [1, 2])
def test_the_time_limit_signal_reaches_mtbert_and_the_task_is_requeued(tmp_path, signals):
    code, stderr, log = _stop_before_the_time_limit(tmp_path, signals)
    # Once: a second SIGTERM while mtbert ends its trial would cut that short.
    assert (log / "signals").read_text() == "TERM\n"
    assert code == 130, stderr  # mtbert's exit code, passed on
    # Slurm still runs the job: this shell's own signal, the time limit's.
    assert (log / "scontrol").read_text() == "-o show job 4245\nrequeue 4242_3\n"
    assert stderr.splitlines()[-3:] == [
        "sweep-array: mtbert exited 130: stopped; its running trial is queued again (sacct "
        "shows 130 as 2:0)",
        "sweep-array: stopped by the signal to the batch shell (the time limit's); "
        "requeueing 4242_3",
        "sweep-array: requeued 4242_3"]


@pytest.mark.slow
def test_stopped_outside_slurm_the_script_requeues_nothing(tmp_path):
    code, stderr, log = _stop_before_the_time_limit(
        tmp_path, 1, unset=("SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_JOB_ID"))
    assert (log / "signals").read_text() == "TERM\n" and code == 130, stderr
    assert stderr.splitlines()[-1] == "sweep-array: stopped outside Slurm; nothing to requeue"
    assert "requeue " not in (log / "scontrol").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("state, restarts, said", [
    ("COMPLETING", "1", "sweep-array: stopped by Slurm (job COMPLETING, restart 1): requeued "
                        "or preempted from outside; Slurm starts 4242_3 again itself"),
    ("CANCELLED", "0", "sweep-array: stopped by Slurm (job CANCELLED): cancelled or "
                       "preempted from outside; not requeued by this script")])
def test_an_outside_requeue_or_cancel_is_told_as_such_and_not_requeued_again(
        tmp_path, state, restarts, said):
    code, stderr, log = _stop_before_the_time_limit(
        tmp_path, 1, every_process=True, STUB_JOB_STATE=state, STUB_RESTARTS=restarts)
    # Slurm signalled mtbert itself: the shell does not send it a second SIGTERM.
    assert (log / "signals").read_text() == "TERM\n"
    assert code == 130, stderr
    assert (log / "scontrol").read_text() == "-o show job 4245\n"  # asked, never requeued
    assert stderr.splitlines()[-1] == said
    assert "requeueing" not in stderr and "could not" not in stderr


# ---------------------------------------------------------------- the guide and secrets


def _clusters_section() -> str:
    """The clusters guide's section on schedulers (the README points to the guide)."""
    guide = (ROOT / "docs" / "guides" / "clusters.md").read_text()
    return guide.split("\n## Clusters\n", 1)[1].split("\n## ", 1)[0]


def _mtbert_commands(lines: list[str]) -> list[list[str]]:
    """Every `mtbert ...` command in these lines (comments after two spaces and # dropped)."""
    commands = []
    for line in lines:
        line = line.lstrip("# ").split("  #", 1)[0]
        for start in re.finditer(r"(?:^|-- )mtbert (?=[a-z])", line):
            commands.append(shlex.split(line[start.end():]))
    return commands


def test_every_mtbert_command_in_deploy_and_the_readme_parses(job):
    # The examples in deploy/'s comments (the scripts' own commands run in their tests) and
    # in the clusters guide's code blocks.
    comments = [ln for path in sorted(DEPLOY.rglob("*")) if path.is_file()
                for ln in path.read_text().splitlines() if ln.lstrip().startswith("#")]
    blocks = re.findall(r"```bash\n(.*?)```", _clusters_section(), re.S)
    commands = _mtbert_commands(comments) + _mtbert_commands("".join(blocks).splitlines())
    assert len(commands) >= 5
    for argv in commands:
        assert parse_cli(argv).command.name, argv
    # The guide shows the Kubernetes worker's command.
    assert shlex.join(_worker(job)["command"]) in _clusters_section()


def test_the_clusters_guide_shows_how_to_submit_and_what_a_restart_costs():
    section = _clusters_section()
    for path in re.findall(r"(?:sbatch|kubectl apply)[^\n]*?\b(deploy/\S+)", section):
        assert (ROOT / path).is_file(), path
    assert f"sbatch {SBATCH.relative_to(ROOT)}" in section
    assert f"kubectl apply -f {(KUBE / 'sweep-job.yaml').relative_to(ROOT)}" in section
    for words in ("MTBERT_STORAGE", "--max-retries", "shared", "SIGTERM", "130",
                  "scontrol requeue", "podFailurePolicy", "ReadWriteMany"):
        assert words in section, words


def _secrets_in(text: str) -> list[str]:
    """Passwords in URLs anywhere; in `key: value` and `KEY=value` outside comments (prose
    such as "a Secret: never..." is no key)."""
    found = [m.group(1) for m in URL_PASSWORD.finditer(text)]
    code = "\n".join(re.sub(r"(^|\s)#.*", "", line) for line in text.splitlines())
    found += [m.group(2) for m in KEY_VALUE.finditer(code)]
    return [value for value in found if not PLACEHOLDERS.match(value.strip("\"',"))]


def test_no_file_in_deploy_holds_a_secret():
    for path in sorted(DEPLOY.rglob("*")):
        if path.is_file():
            assert _secrets_in(path.read_text()) == [], path
    for path, doc in _manifests():
        if doc["kind"] == "Secret":
            # Only the trial database's, with placeholders, in the open (never base64 data:).
            assert path == TRYING and "data" not in doc
            assert all("CHANGE-ME" in v for v in doc["stringData"].values())
    for _, _, pod in _pod_specs():
        for container in pod["containers"]:
            for env in container.get("env", []):
                if re.search(r"PASSWORD|KEY|TOKEN|SECRET|STORAGE", env["name"]):
                    assert "valueFrom" in env, env["name"]
    assert TRYING.read_text().startswith("# FOR TRYING ONLY")


def test_the_secret_check_finds_real_looking_passwords():
    assert _secrets_in("postgresql://mtbert:hunter2@db:5432/mtbert") == ["hunter2"]
    assert _secrets_in("  password: s3cret\n") == ["s3cret"]
    assert _secrets_in("WANDB_API_KEY=0123abcd") == ["0123abcd"]
    assert _secrets_in("# export MTBERT_STORAGE=postgresql://u:hunter2@db/x") == ["hunter2"]
    assert _secrets_in("postgresql://USER:PASSWORD@HOST:5432/DB password: CHANGE-ME "
                       "postgresql://mtbert:${POSTGRES_PASSWORD:-x}@postgres") == []


def test_the_static_check_rejects_what_the_cli_would():
    from mtbert.cli import _click_exceptions

    errors = _click_exceptions()
    with pytest.raises(errors.NoSuchOption):
        parse_cli(["sweep", "loss-weights", "--max-retry", "2"])
    with pytest.raises(errors.NoSuchOption):
        parse_cli(["data", "download", "--data", "/data"])
    with pytest.raises(errors.BadParameter):
        parse_cli(["sweep", "loss-weights", "--device", "gpu"])
