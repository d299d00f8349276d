"""Data-parallel training under torchrun, on two CPU processes with gloo.

Each test run is a real `torchrun --standalone --nproc_per_node 2 -m lstmlm train` subprocess:
the same command a user types.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lstmlm.distributed import World
from lstmlm.evaluation import loss_sum
from lstmlm.model import CharLM
from lstmlm.runs import RunStore

EPOCHS = 4
TRAIN = ["--hidden", "24", "--batch-size", "8", "--num-steps", "10", "--checkpoint-every", "1", "--seed", "3"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "text.txt"
    path.write_text("the time traveller held in his hand a glittering metallic framework\n" * 40)
    return path


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "LSTMLM_DEBUG": "0"}


def start_train(corpus: Path, runs: Path, name: str, nproc: int, *extra: str) -> subprocess.Popen[str]:
    """One training command, under torchrun when nproc > 1, started."""
    train = ["-m", "lstmlm", "train", "--corpus", str(corpus), "--runs-dir", str(runs), "--name", name, "--json", *TRAIN, *extra]
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)] if nproc > 1 else []
    return subprocess.Popen([sys.executable, *launcher, *train], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())


def events_of(started: subprocess.Popen[str]) -> list[dict]:
    """The JSON events of a training command, once it has ended well."""
    try:
        stdout, stderr = started.communicate(timeout=300)
    finally:
        started.kill()  # one that hung leaves nothing behind (a no-op for one that ended)
    assert started.returncode == 0, stderr[-2000:]
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


def run_train(corpus: Path, runs: Path, name: str, nproc: int, *extra: str) -> list[dict]:
    """The JSON events of one training command, under torchrun when nproc > 1."""
    return events_of(start_train(corpus, runs, name, nproc, *extra))


def perplexities(events: list[dict]) -> list[float]:
    return [e["train_perplexity"] for e in events if e["event"] == "epoch"]


@pytest.fixture(scope="module")
def runs(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """One process, two processes straight, and two processes stopped halfway then resumed."""
    root = tmp_path_factory.mktemp("runs")
    # Three trainings side by side (each process has one thread), then the resumed one's second half
    alone = start_train(corpus, root, "single", 1, "--epochs", str(EPOCHS))
    halfway = start_train(corpus, root, "resumed", 2, "--epochs", str(EPOCHS // 2))
    double = run_train(corpus, root, "double", 2, "--epochs", str(EPOCHS))
    single, first = events_of(alone), events_of(halfway)
    rest = run_train(corpus, root, "resumed", 2, "--epochs", str(EPOCHS), "--resume")
    return {"root": root, "single": single, "double": double, "first": first, "rest": rest}


def test_two_processes_follow_one_process(runs: dict) -> None:
    # The two processes' gradients are averaged by DDP: the mean of two half-batch means equals
    # the whole batch's mean up to float rounding in the summation order (~1e-7 relative per
    # step in fp32), so a few epochs agree to well within 1e-4.
    one, two = perplexities(runs["single"]), perplexities(runs["double"])
    assert len(one) == len(two) == EPOCHS
    assert two == pytest.approx(one, rel=1e-4)
    assert two[-1] < two[0]  # and it learns


def test_resume_under_torchrun_is_exact(runs: dict) -> None:
    straight = perplexities(runs["double"])
    resumed = perplexities(runs["first"]) + perplexities(runs["rest"])
    assert resumed == straight
    done = next(e for e in runs["rest"] if e["event"] == "done")
    assert done["epochs"] == EPOCHS


def test_validation_shared_by_two_processes_is_what_one_process_measures(runs: dict) -> None:
    """Each process validated its half of the streams and the sums were added: the last figure
    the two reported is the one `lstmlm evaluate` gets in one process from the same weights."""
    last = [e for e in runs["double"] if e["event"] == "eval"][-1]
    result = subprocess.run(
        [sys.executable, "-m", "lstmlm", "evaluate", "--runs-dir", str(runs["root"]), "--run", "double", "--part", "val", "--json"],
        capture_output=True, text=True, env=_env(), timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["perplexity"] == pytest.approx(last["val_perplexity"], rel=1e-6)


@pytest.mark.parametrize("size", [2, 3, 5])
def test_the_processes_shares_of_the_streams_add_up_to_the_whole(size: int) -> None:
    """Every stream in exactly one share (5 processes for 4 streams: one reads none)."""
    torch.manual_seed(0)
    model = CharLM(20, 12, num_layers=2)
    ids = torch.randint(0, 20, (403,), generator=torch.Generator().manual_seed(1))
    starts = torch.arange(4) * 100
    whole = loss_sum(model, ids, starts, 100, 7, torch.device("cpu"), "fp32")
    shares = [loss_sum(model, ids, starts[World(rank, size).rows(4)], 100, 7, torch.device("cpu"), "fp32") for rank in range(size)]
    assert sum(len(range(4)[World(rank, size).rows(4)]) for rank in range(size)) == 4
    assert sum(s.item() for s in shares) == pytest.approx(whole.item(), rel=1e-12)  # fp32 losses, summed in fp64


def test_only_rank_zero_writes(runs: dict) -> None:
    root: Path = runs["root"]
    assert sorted(p.name for p in root.iterdir()) == ["double", "resumed", "single"]  # no "double-2"
    store = RunStore.open(root / "double")
    assert [r["epoch"] for r in store.read_metrics()] == list(range(1, EPOCHS + 1))  # each epoch once
    assert sorted(p.name for p in (root / "double").iterdir() if not p.name.startswith(".")) == [
        "baselines.json",
        "best.pt",
        "config.json",
        "counts.npz",
        "latest.pt",
        "metrics.jsonl",
        "run.json",
        "vocab.json",
    ]  # a corpus given by path is read raw, its last 10% validating: best.pt; rank 0's baselines, once
    assert len([e for e in runs["double"] if e["event"] == "done"]) == 1  # one process reports


def test_distributed_run_generates_on_one_cpu(runs: dict) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "lstmlm", "generate", "--runs-dir", str(runs["root"]), "--run", "double", "--length", "20"],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("time traveller") and len(result.stdout.rstrip("\n")) == len("time traveller") + 20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_agents(corpus: Path, tmp_path: Path, *extra: str, env: dict[str, str] | None = None) -> list[subprocess.Popen[str]]:
    """Two torchrun agents, as on two machines (each its own runs directory and cache), meeting at
    a c10d rendezvous on 127.0.0.1: the multi-node command of docs/gpus.md."""
    port = free_port()
    agents = []
    for node in ("a", "b"):
        launcher = ["-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
                    "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", "lstmlm-test"]  # fmt: skip
        train = ["-m", "lstmlm", "train", "--corpus", str(corpus), "--runs-dir", str(tmp_path / node / "runs"), "--name", "nodes", "--json",
                 *TRAIN, *extra]  # fmt: skip
        node_env = {**_env(), **(env or {}), "LSTMLM_HOME": str(tmp_path / node / "cache")}
        agents.append(subprocess.Popen([sys.executable, *launcher, *train], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=node_env))
    return agents


def finish(agents: list[subprocess.Popen[str]], timeout: float) -> list[tuple[int, str, str]]:
    """Each agent's (exit code, stdout, stderr), all within `timeout` seconds; past it both are
    killed and the failure shows both agents' stderr."""
    deadline = time.monotonic() + timeout
    results = []
    try:
        for agent in agents:
            stdout, stderr = agent.communicate(timeout=max(1.0, deadline - time.monotonic()))
            results.append((agent.returncode, stdout, stderr))
    except subprocess.TimeoutExpired:
        for agent in agents:
            agent.kill()
        both = [agent.communicate()[1][-3000:] for agent in agents]
        pytest.fail(f"the agents did not end within {timeout:.0f} s:\n--- agent a ---\n{both[0]}\n--- agent b ---\n{both[1]}")
    return results


def test_two_machines_by_c10d_rendezvous_follow_one_process(corpus: Path, runs: dict, tmp_path: Path) -> None:
    """Two agents train one model, each process reading its rows from its own memory-mapped
    store: the one-process trajectory. Both end when the work ends (an agent whose worker
    succeeds waits for the other's at torchrun's exit barrier, 300 s, if that one never comes)."""
    results = finish(start_agents(corpus, tmp_path, "--epochs", str(EPOCHS)), timeout=240)
    outputs = []
    for code, stdout, stderr in results:
        assert code == 0, stderr[-2000:]
        outputs.append([json.loads(line) for line in stdout.splitlines() if line.startswith("{")])
    (events,) = [o for o in outputs if o]  # rank 0's machine reports; the other prints nothing
    assert perplexities(events) == pytest.approx(perplexities(runs["single"]), rel=1e-4)
    written = [node for node in ("a", "b") if (tmp_path / node / "runs" / "nodes" / "latest.pt").is_file()]
    assert len(written) == 1 and not (tmp_path / ({"a", "b"} - set(written)).pop() / "runs").exists()  # only rank 0's machine writes the run
    assert all(any((tmp_path / node / "cache" / "encoded").glob("*.tokens")) for node in ("a", "b"))  # each machine its own store


def test_when_the_other_machine_fails_this_one_says_so_at_once(corpus: Path, tmp_path: Path) -> None:
    """Node b's worker is killed mid-training (SIGKILL, as an out-of-memory kill does): node a's
    next collective fails, and it ends at once, with one line saying why, not a hang."""
    agents = start_agents(corpus, tmp_path, "--epochs", "200")
    deadline = time.monotonic() + 120
    while not any((tmp_path / node / "runs" / "nodes" / "metrics.jsonl").exists() for node in "ab"):  # rank 0's machine logs an epoch
        assert time.monotonic() < deadline and all(agent.poll() is None for agent in agents), "training never got going"
        time.sleep(0.2)
    reporting = 0 if (tmp_path / "a" / "runs" / "nodes" / "metrics.jsonl").exists() else 1
    other = agents[1 - reporting]
    workers = subprocess.run(["pgrep", "-P", str(other.pid), "-f", "lstmlm train"], capture_output=True, text=True).stdout.split()
    assert workers, "the other machine's worker"
    os.kill(int(workers[0]), signal.SIGKILL)
    code, _, stderr = finish(agents, timeout=120)[reporting]
    assert code != 0
    assert "error: another process of this training stopped" in stderr, stderr[-2000:]


# Loaded by every Python process the test starts (PYTHONPATH): a torchrun worker (LOCAL_RANK set)
# says it started, and says so again if the interpreter's teardown begins (threading._shutdown,
# its first step, which joins the threads).
TEARDOWN_HOOK = """
import os, threading
if "LOCAL_RANK" in os.environ:
    marks = os.environ["LSTMLM_TEST_MARKS"]
    open(os.path.join(marks, f"started-{os.getpid()}"), "w").close()
    shutdown = threading._shutdown

    def reported():
        open(os.path.join(marks, f"teardown-{os.getpid()}"), "w").close()
        shutdown()

    threading._shutdown = reported
"""


def test_a_worker_ends_without_the_interpreters_teardown(corpus: Path, tmp_path: Path) -> None:
    """The end of a two-process run used to abort one process in some 20 to 40 runs: DDP keeps
    the gloo group's threads alive past its destruction, and tearing them down in the
    interpreter's shutdown raced with the other process closing its sockets
    (lstmlm/distributed.py, `stop`). A worker now ends without that teardown, as every command
    does (`cli.app.end_now`). Rather than run the command until a rare abort shows, each worker
    reports whether the teardown began: neither does, and both end well. (A plain Python
    process with the same hook does report it: the hook sees a teardown where there is one.)"""
    hook, marks = tmp_path / "hook", tmp_path / "marks"
    hook.mkdir()
    marks.mkdir()
    (hook / "sitecustomize.py").write_text(TEARDOWN_HOOK)
    env = {**_env(), "PYTHONPATH": os.pathsep.join(filter(None, [str(hook), os.environ.get("PYTHONPATH")])), "LSTMLM_TEST_MARKS": str(marks)}

    plain = subprocess.run([sys.executable, "-c", "pass"], env={**env, "LOCAL_RANK": "0"}, timeout=60)
    assert plain.returncode == 0 and len(list(marks.glob("teardown-*"))) == 1  # the hook works
    for mark in marks.iterdir():
        mark.unlink()

    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    train = ["-m", "lstmlm", "train", "--corpus", str(corpus), "--runs-dir", str(tmp_path / "runs"), "--json",
             "--hidden", "8", "--batch-size", "8", "--num-steps", "10", "--epochs", "1", "--seed", "3"]  # fmt: skip
    result = subprocess.run([sys.executable, *launcher, *train], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout.splitlines()[-1])["event"] == "done"
    assert len(list(marks.glob("started-*"))) == 2  # both workers ran the hook
    assert not list(marks.glob("teardown-*"))


@pytest.mark.parametrize(("local", "where"), [("2", ["--standalone"]), ("1", ["--nnodes=2", "--rdzv-backend=c10d", "--rdzv-endpoint=HOST:PORT"])])
def test_the_command_that_continues_a_torchrun_is_a_torchrun(monkeypatch: pytest.MonkeyPatch, local: str, where: list[str]) -> None:
    """An interrupted torchrun training said `continue with: lstmlm train --resume --run NAME`:
    one process, and `--run`, which torchrun takes for its own `--run-path`."""
    from torch.distributed.run import get_args_parser

    from lstmlm.distributed import from_environment, launcher
    from lstmlm.runs import resume_command

    for key, value in {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": local}.items():
        monkeypatch.setenv(key, value)
    words = shlex.split(resume_command("r", Path("elsewhere"), {"epochs": 4}, launcher(from_environment())))
    resume = ["train", "--resume", "--name", "r", "--runs-dir", "elsewhere", "--epochs", "4"]
    assert words == ["torchrun", *where, f"--nproc-per-node={local}", "-m", "lstmlm", *resume]
    read = get_args_parser().parse_args(words[1:])  # torchrun takes it as written
    assert read.module and read.training_script == "lstmlm" and read.nproc_per_node == local and read.training_script_args == resume
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert resume_command("r", Path("runs"), None, launcher(from_environment())) == "lstmlm train --resume --run r"


def test_batch_not_divisible_by_processes_is_refused(corpus: Path, tmp_path: Path) -> None:
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    args = ["-m", "lstmlm", "train", "--corpus", str(corpus), "--runs-dir", str(tmp_path), "--batch-size", "7", "--epochs", "1"]
    result = subprocess.run([sys.executable, *launcher, *args], capture_output=True, text=True, env=_env(), timeout=120)
    assert result.returncode != 0
    assert "batch_size 7 must be divisible by the 2 processes" in result.stderr
    assert not any(tmp_path.iterdir())  # nothing written


def test_bench_reports_scaling_under_torchrun(tmp_path: Path) -> None:
    config = tmp_path / "tiny.toml"
    config.write_text("[data]\nbatch_size = 4\nnum_steps = 3\n[model]\nhidden = 8\n")
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    args = ["-m", "lstmlm", "bench", "--config", str(config), "--device", "cpu", "--steps", "1", "--json"]
    result = subprocess.run([sys.executable, *launcher, *args], capture_output=True, text=True, env=_env(), timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [r["event"] for r in rows].count("machine") == 1  # one report, rank 0's
    scaled = {r["what"]: r for r in rows if r["event"] == "bench" and "processes" in r["what"]}
    assert set(scaled) == {"train scratch ×2 processes", "train cudnn ×2 processes"}  # reported once, by rank 0
    assert all(r["processes"] == 2 and r["scaling"] > 0 for r in scaled.values())


# Run by torchrun as a script: two unlike machines. Each process's clock (time.perf_counter, the
# Trainer's) ticks by a second a call, rank 1's twice as fast; rank 1's CPU has native bf16, rank
# 0's not. Each trains a time-limited cosine run in --precision auto, and rank 0 says whether the
# two processes' weights are the same, and the precision each trained in.
UNLIKE_MACHINES = """
import itertools, json, os, sys, time
from pathlib import Path

ticks = itertools.count()
speed = 1 + int(os.environ["RANK"])
time.perf_counter = lambda: float(next(ticks) * speed)

import torch
from lstmlm import device, distributed, training

device.cpu_has_fast_bf16 = lambda: os.environ["RANK"] == "1"
corpus, runs = sys.argv[1:]
options = {"corpus": corpus, "hidden": 8, "batch_size": 8, "num_steps": 10, "epochs": 3, "precision": "auto",
           "optimizer": "adam", "lr": 0.01, "schedule": "cosine", "max_minutes": 2.0, "seed": 3}
plan = training.plan(Path(runs), "skewed", options, default_recipe=False)
with training.start(plan) as started:
    events = list(started.run())
    weights = torch.cat([p.detach().flatten() for p in started.trainer.model.parameters()])
    replicas = distributed.all_gather(weights, started.world)
    bf16 = distributed.all_gather(torch.tensor([float(started.trainer.precision == "bf16")]), started.world)
    if started.world.is_main:
        steps = started.trainer.progress.global_step
        precisions = ["bf16" if float(b) else "fp32" for b in bf16]
        print(json.dumps({"steps": steps, "same": all(torch.equal(replicas[0], r) for r in replicas), "precisions": precisions}))
"""


def test_unlike_clocks_and_unlike_cpus_keep_the_replicas_equal(corpus: Path, tmp_path: Path) -> None:
    """The learning rate of a time-limited cosine run anneals by the time used: each process
    read its own clock, so their learning rates, and then their weights, drifted apart (the
    gradients are averaged, the updates were not). The processes agree on the time used.
    --precision auto chose by each machine's CPU, bf16 on one and fp32 on the other: the run
    stored rank 0's choice, which one process had not trained in, and a resume (each process in
    the stored one) went on otherwise than the run would have. Every process trains in rank 0's."""
    script = tmp_path / "skewed.py"
    script.write_text(UNLIKE_MACHINES)
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command = [sys.executable, *launcher, str(script), str(corpus), str(tmp_path / "runs")]
    result = subprocess.run(command, capture_output=True, text=True, env=_env(), timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout.splitlines()[-1])
    assert report["steps"] > 3  # stopped by the time limit, some steps in
    assert report["same"]
    assert report["precisions"] == ["fp32", "fp32"]  # rank 0's CPU has no native bf16


def test_only_rank_zero_says_what_the_plan_chose_or_skipped(corpus: Path, tmp_path: Path) -> None:
    """What the command says before training (a file of the corpus skipped, --precision auto's
    choice) was said by every process: twice here, once a process on each machine."""
    texts = tmp_path / "texts"
    texts.mkdir()
    (texts / "a.txt").write_text(corpus.read_text())
    (texts / "b.bin").write_bytes(b"\x00\x01\x02binary" * 50)
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    args = ["-m", "lstmlm", "train", "--corpus", str(texts / "*"), "--runs-dir", str(tmp_path / "runs"),
            "--hidden", "8", "--batch-size", "8", "--num-steps", "10", "--epochs", "1", "--precision", "auto"]  # fmt: skip
    result = subprocess.run([sys.executable, *launcher, *args], capture_output=True, text=True, env=_env(), timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("precision fp32:") == 1, result.stdout
    assert result.stderr.count("looks binary") == 1, result.stderr[-2000:]
    assert result.stderr.count("file(s)") == 1


# Loaded by every Python process the test starts: rank 0 fails as it records how the training
# ended (run.json on a full disk), after the last collective of the training itself.
FAILS_AT_THE_END = """
import os
if os.environ.get("RANK") == "0":
    from lstmlm import runs

    def full(self, record):
        raise OSError(28, "No space left on device")

    runs.RunStore.record_done = full
"""


def test_a_process_that_finished_says_in_one_line_that_another_failed_after(corpus: Path, tmp_path: Path) -> None:
    """The other process had trained its part and waited for rank 0 to end (distributed.stop's
    barrier) when rank 0 failed: the barrier's gloo error reached the command as an internal
    error asking for a report, not as the one line any other collective's failure gives."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(FAILS_AT_THE_END)
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(hook), os.environ.get("PYTHONPATH")]))}
    results = finish(start_agents(corpus, tmp_path, "--epochs", "1", env=env), timeout=120)
    errors = sorted(stderr for _, _, stderr in results)
    assert all(code != 0 for code, _, _ in results)
    assert not any("internal error" in e for e in errors), errors
    assert any("error: No space left on device" in e for e in errors)
    assert any("error: another process of this training stopped" in e for e in errors)
