"""LOSO on a real SLURM cluster: a throw-away single-node cluster on localhost
(tests/slurm/slurm_up.sh: munged + slurmctld + slurmd, state in a temp dir, stopped by pid at the end).

* the sbatch path (experiments/slurm/submit.sh: preprocessing job, fold array, aggregation job)
  gives the same loso_summary.json as a local run_loso with the same args and threads per fold;
  submitting again submits nothing; the aggregation step names a missing fold and exits 1;
* an array task requeued mid-fold (``scontrol requeue``) resumes from its checkpoint and the
  summary is unchanged; submitting again while the run's jobs are queued is refused;
* the submitit path (``famnet-pl loso --launcher slurm --wait``) gives the same summary, also when
  a fold task is preempted (submitit's USR2 -> FoldJob.checkpoint -> requeue -> resume).

A requeue or preemption is aimed at the moment a fold has saved its first resume checkpoint: the
fold's process is stopped (SIGSTOP) right then, so it cannot finish the fold before the signal
lands, however fast the machine. Needs root and SLURM (``tests/slurm/install.sh``); about 2.5 min
on 2 cores. Every wait has a deadline and every job a --time.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from famnet_pl.loso.rundir import JOBS_FILE, fold_dir_name
from famnet_pl.loso.rundir import SUMMARY as SUMMARY_NAME
from famnet_pl.loso.slurm import array_log
from tests.conftest import REPO, tiny_args

SCRIPTS = REPO / "tests" / "slurm"
SUBMIT = REPO / "experiments" / "slurm" / "submit.sh"
EPOCHS = 4   # resume checkpoints after epochs 1-3: room to interrupt a fold between them
TIMEOUT = 240  # seconds for any one run to finish on the cluster

_have_slurm = all(shutil.which(exe) or Path("/usr/sbin", exe).exists()
                  for exe in ("slurmctld", "slurmd", "munged", "sbatch"))


# `make test-slurm` (and so CI) sets FAMNET_REQUIRE_SLURM=1: there a missing cluster fails the tier
# instead of skipping every test and passing with nothing run.
_required = os.environ.get("FAMNET_REQUIRE_SLURM") == "1"


def cluster(test):
    """A test that needs the local SLURM cluster: marked ``slurm``, skipped where it cannot start
    (failed instead under ``FAMNET_REQUIRE_SLURM=1``)."""
    if _required:
        assert _have_slurm and os.geteuid() == 0, ("FAMNET_REQUIRE_SLURM=1 but SLURM is not installed "
                                                   "or not root")
        return pytest.mark.slurm(test)
    test = pytest.mark.skipif(not _have_slurm, reason="SLURM not installed: run tests/slurm/install.sh "
                              "(apt install slurm-wlm munge) or make test-slurm")(test)
    test = pytest.mark.skipif(os.geteuid() != 0, reason="the throw-away SLURM cluster runs as root")(test)
    return pytest.mark.slurm(test)


def _free_port_pair() -> int:
    """A port P with P and P+1 free (slurmctld, slurmd): runs beside any other cluster."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port < 65000:
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port + 1))
                    return port
                except OSError:
                    continue
    raise RuntimeError("no two free consecutive ports")


@pytest.fixture(scope="session")
def slurm_env():
    """Start the cluster; yield the environment for every SLURM command and job of the tests.

    Its state dir is made here, world-executable (munged insists on that for its socket), not in
    pytest's 0700 tmp dirs. The daemons are stopped by pid even when a test fails, and by the
    watchdog in slurm_up.sh if pytest itself is killed."""
    state = tempfile.mkdtemp(prefix="famnet-slurm-", dir="/tmp")
    os.chmod(state, 0o755)
    # Nothing from an outer SLURM job leaks in; SLURM_CONF points at this cluster only (not os.environ:
    # the other tests must not see SLURM).
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM")}
    env.update(S=state, PORT=str(_free_port_pair()), WATCH_PID=str(os.getpid()),
               SLURM_CONF=f"{state}/slurm.conf", PYTHONUNBUFFERED="1", PYTHON=sys.executable,
               PATH=f"{Path(sys.executable).parent}:{env.get('PATH', '')}:/usr/sbin")
    pids = []
    try:
        up = subprocess.run(["bash", str(SCRIPTS / "slurm_up.sh")], env=env, capture_output=True, text=True,
                            timeout=60)
        pids = [int(p.read_text()) for p in Path(state).glob("*.bgpid")]
        if up.returncode:
            pytest.fail(f"slurm_up.sh failed ({up.returncode}): {up.stderr[-2000:]}")
        yield env
    finally:
        subprocess.run(["bash", str(SCRIPTS / "slurm_down.sh")], env=env, capture_output=True, timeout=120)
        alive = [p for p in pids if Path(f"/proc/{p}").exists()]
        shutil.rmtree(state, ignore_errors=True)
        assert not alive, f"slurm_down.sh left daemons running: {alive}"


@pytest.fixture(scope="module")
def args(tiny_synth, tmp_path_factory) -> list[str]:
    """One cache for every run here: the first SLURM run's preprocessing job fills it."""
    return tiny_args(tiny_synth, tmp_path_factory.mktemp("slurm-cache"), **{"trainer.max_epochs": EPOCHS})


@pytest.fixture(scope="module")
def reference(args, tmp_path_factory) -> dict:
    """The local run's summary: run_loso in this process, 1 thread per fold as in the SLURM tasks
    (the thread count changes float summation order, hence the predictions)."""
    import torch

    from famnet_pl.loso.runner import run_loso

    threads = torch.get_num_threads()
    runs = tmp_path_factory.mktemp("slurm-local")
    try:
        run_loso(args, exp="local", runs_dir=str(runs), wandb="off", progress=False, threads=1)
    finally:
        torch.set_num_threads(threads)
    return json.loads((runs / "local" / "synth" / SUMMARY_NAME).read_text())


def _run(cmd: list[str], env: dict, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    if check and done.returncode:
        pytest.fail(f"{cmd[:3]} exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return done


def _submit(env: dict, runs: Path, exp: str, args: list[str],
            check: bool = True) -> subprocess.CompletedProcess:
    """experiments/slurm/submit.sh as `make loso-slurm` runs it. SBATCH_ARGS: 1 CPU and a time limit
    for every job (the templates ask for more CPUs than this node has)."""
    return _run(["bash", str(SUBMIT), "--exp", exp, "--runs-dir", str(runs), "--wandb", "off", "--threads",
                 "1", "--slurm-time", "5", *args], {**env, "SBATCH_ARGS": "--cpus-per-task=1 --time=5"},
                check=check)


def _queued(env: dict) -> list[str]:
    return _run(["squeue", "-h", "-r", "-o", "%F %i %T %r"], env).stdout.splitlines()


def _wait_until_done(env: dict, jobs: list[str], run_dir: Path) -> None:
    """Until none of ``jobs`` (array or job ids) is pending or running."""
    deadline = time.time() + TIMEOUT
    while any(line.split()[0] in jobs for line in _queued(env)):
        if time.time() > deadline:
            logs = "\n".join(f"--- {p}\n{p.read_text()[-1500:]}" for p in sorted(run_dir.glob("logs/*.log")))
            pytest.fail(f"jobs {jobs} not done after {TIMEOUT} s:\n" + "\n".join(_queued(env)) + "\n" + logs)
        time.sleep(0.5)


def _job(env: dict, job: str) -> dict[str, str]:
    """``scontrol show job`` fields of one (finished) job."""
    out = _run(["scontrol", "-o", "show", "job", job], env).stdout
    return dict(field.split("=", 1) for field in out.split() if "=" in field)


def _task_pid(array: str, task: int, marker: str, timeout: float = TIMEOUT) -> int:
    """The Python process of array task ``<array>_<task>`` (its command line contains ``marker``)."""
    want = {f"SLURM_ARRAY_JOB_ID={array}".encode(), f"SLURM_ARRAY_TASK_ID={task}".encode()}
    deadline = time.time() + timeout
    while time.time() < deadline:
        for proc in Path("/proc").iterdir():
            try:
                cmd = (proc / "cmdline").read_bytes().split(b"\0")
                is_python = Path(cmd[0].decode()).name.startswith("python")  # not the batch shell or srun
                if not (is_python and marker.encode() in b" ".join(cmd)):
                    continue
                if want <= set((proc / "environ").read_bytes().split(b"\0")):
                    return int(proc.name)
            except (OSError, ValueError, UnicodeDecodeError):
                continue
        time.sleep(0.1)
    pytest.fail(f"no process of task {array}_{task} ({marker}) after {timeout} s")


def _stop_at_first_checkpoint(pid: int, fold_dir: Path) -> None:
    """Freeze the fold's process once its first resume checkpoint exists (and it is not done)."""
    deadline = time.time() + TIMEOUT
    while not list(fold_dir.glob("checkpoints/resume-*.ckpt")):
        assert not (fold_dir / "predictions.csv").exists(), "the fold finished before it could be interrupted"
        if time.time() > deadline or not Path(f"/proc/{pid}").exists():
            pytest.fail(f"{fold_dir}: no resume checkpoint while its process ran")
        time.sleep(0.02)
    os.kill(pid, signal.SIGSTOP)
    assert not (fold_dir / "predictions.csv").exists()


def _summary(run_dir: Path) -> dict:
    return json.loads((run_dir / SUMMARY_NAME).read_text())


@cluster
def test_sbatch_array_equals_local_run_and_resubmits_nothing(slurm_env, args, request, tmp_path):
    runs = tmp_path / "runs"
    _submit(slurm_env, runs, "sh", args)
    run_dir = runs / "sh" / "synth"
    prep, array, agg = (run_dir / JOBS_FILE).read_text().split()
    _wait_until_done(slurm_env, [prep, array, agg], run_dir)

    for k in range(3):
        assert array_log(run_dir / "logs", k, array).is_file()        # one log per fold task
    assert "12 built" in next(run_dir.glob("logs/preprocess-*.log")).read_text()  # the cache was filled once
    assert _job(slurm_env, agg)["JobState"] == "COMPLETED" and _job(slurm_env, agg)["ExitCode"] == "0:0"
    ours = _summary(run_dir)
    assert ours == request.getfixturevalue("reference")   # local run computed now: after the SLURM run
    assert ours["complete"] and ours["folds_missing"] == []

    again = _submit(slurm_env, runs, "sh", args)           # nothing pending: no job, same summary
    assert "no pending fold" in again.stdout and "submitted" not in again.stdout
    assert (run_dir / JOBS_FILE).read_text().split() == [prep, array, agg]
    assert _summary(run_dir) == ours

    # The aggregation step of a run with a fold missing names it (task, state, log) and exits 1.
    partial = tmp_path / "partial"
    shutil.copytree(run_dir, partial)
    shutil.rmtree(partial / fold_dir_name(1, "synth/sub02"))
    done = _run([sys.executable, "-m", "famnet_pl.cli", "slurm", "aggregate", str(partial),
                 "--array-job", array, "--folds", "0,1,2"], slurm_env, check=False)
    assert done.returncode == 1 and "INCOMPLETE" in done.stdout
    assert (f"fold 1 (synth/sub02) missing: task {array}_1: COMPLETED (exit 0:0, 0 restarts); "
            f"log: {array_log(partial / 'logs', 1, array)}") in done.stderr
    assert _summary(partial)["folds_missing"] == [1]


@cluster
def test_requeued_array_task_resumes_its_fold(slurm_env, args, reference, tmp_path):
    runs = tmp_path / "runs"
    _submit(slurm_env, runs, "rq", args)
    run_dir = runs / "rq" / "synth"
    prep, array, agg = (run_dir / JOBS_FILE).read_text().split()
    fold_dir = run_dir / fold_dir_name(1, "synth/sub02")

    pid = _task_pid(array, 1, "famnet_pl.cli")
    _stop_at_first_checkpoint(pid, fold_dir)
    _run(["scontrol", "requeue", f"{array}_1"], slurm_env)  # SLURM kills the stopped task, queues it again
    refused = _submit(slurm_env, runs, "rq", args, check=False)
    assert refused.returncode != 0 and "still queued or running" in refused.stderr
    _wait_until_done(slurm_env, [prep, array, agg], run_dir)

    log = array_log(run_dir / "logs", 1, array).read_text()   # both attempts, appended
    assert "restart 0" in log and "restart 1" in log
    assert "fold 1 (synth/sub02): resuming from" in log        # continued from its checkpoint, not restarted
    assert _job(slurm_env, f"{array}_1")["Restarts"] == "1"
    assert _job(slurm_env, agg)["ExitCode"] == "0:0"
    assert _summary(run_dir) == reference


@cluster
def test_submitit_launcher_with_a_preempted_fold(slurm_env, args, reference, tmp_path):
    runs = tmp_path / "runs"
    run_dir = runs / "sub" / "synth"
    cmd = [sys.executable, "-m", "famnet_pl.cli", "loso", "--launcher", "slurm", "--wait", "--exp", "sub",
           "--runs-dir", str(runs), "--wandb", "off", "--threads", "1", "--slurm-time", "5",
           "--slurm-cpus-per-task", "1", *args]
    launcher = subprocess.Popen(cmd, env=slurm_env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
    try:
        deadline = time.time() + TIMEOUT
        while not (run_dir / JOBS_FILE).exists():
            assert launcher.poll() is None and time.time() < deadline, launcher.communicate()
            time.sleep(0.1)
        array, agg = (run_dir / JOBS_FILE).read_text().split()
        # Preemption as submitit sees it: its signal (USR2) while the fold runs. The process is
        # frozen first, so the signal is handled at once when it continues.
        pid = _task_pid(array, 1, "submitit.core._submit")     # task 1 runs pending fold 1
        _stop_at_first_checkpoint(pid, run_dir / fold_dir_name(1, "synth/sub02"))
        os.kill(pid, signal.SIGUSR2)
        os.kill(pid, signal.SIGCONT)
        out, err = launcher.communicate(timeout=TIMEOUT)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode == 0, err[-3000:]
    assert "LOSO synth_4cls: 12 samples, 3 folds" in out and "INCOMPLETE" not in out
    fold_log = (run_dir / "logs" / "submitit" / f"{array}_1" / f"{array}_1_0_log.err").read_text()
    assert "Caught signal SIGUSR2" in fold_log and "resuming from" in fold_log
    assert _job(slurm_env, f"{array}_1")["Restarts"] == "1"
    assert _summary(run_dir) == reference


def test_submitit_jobs_leave_requeueing_to_submitit(monkeypatch, tiny_synth, tmp_path):
    """Under submitit, Lightning's SLURM auto-requeue is off (submitit requeues on its own signal);
    in plain sbatch jobs and outside SLURM the trainer is left as configured. No cluster needed."""
    from lightning.fabric.plugins.environments import SLURMEnvironment

    from famnet_pl.config import _submitit_plugins, build_cli

    monkeypatch.setenv("SLURM_NTASKS", "1")                      # what srun sets in a task
    monkeypatch.setenv("SLURM_JOB_NAME", "loso-x")
    assert _submitit_plugins(None) is None                       # sbatch: Lightning's auto-requeue stays
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")             # what submitit's sbatch script sets
    assert _submitit_plugins([SLURMEnvironment()]) is None       # a configured environment wins
    env = build_cli(tiny_args(tiny_synth, tmp_path)).trainer._accelerator_connector.cluster_environment
    assert isinstance(env, SLURMEnvironment) and env.auto_requeue is False
    monkeypatch.delenv("SLURM_NTASKS")
    assert _submitit_plugins(None) is None                       # not in a SLURM task
