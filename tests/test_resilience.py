"""Reliability of `python3 main.py` in subprocesses: one run per checkpoint folder,
preemption under torchrun, SIGKILL at random moments with exact resume, configuration
and path errors found before any data is processed, and hostile generation settings.

Starting Python and importing torch costs 2-3 s per process, so the short, independent
runs are started together, two at a time, by the `quick` fixture (each in its own
folder); the tests below then check one run each. The tests that depend on timing
(a lock held by a live run, signals, kills) run their own processes. All of these are
in the slow tier (--full); the last section holds in-process twins of the lock and
checkpoint tests for the fast tier (config, data and signal handling have theirs in
test_config, test_dataset and test_trainer)."""

import csv
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from tests.conftest import REPO_ROOT, make_tiny_config, write_text_corpus
from tests.test_main import TINY_MODEL, paths, run_main
from checkpoint import KEYS_TO_RESUME, CheckpointFolderLock, load_checkpoint
from utils import UserError

MAIN = os.path.join(REPO_ROOT, "main.py")
CORPUS = "abcdefghij klmnop, qrstuvwxyz.\n" * 3000
LOCK = CheckpointFolderLock.FILENAME
# A run that only stops when told to: no step limit, no save or validation due.
ENDLESS = ["--max_steps=100000", "--num_epochs=1000", "--checkpoint_every_batches=100000",
           "--validate_and_checkpoint_best_every_batches=100000", "--test_every_batches=0",
           "--metrics_every=1", "--DO_PREDICTION=False", "--use_amp=False"]


def command(root, *args):
    return [sys.executable, MAIN, *paths(root), *TINY_MODEL, *args]


def environment():
    # One thread per process: the 2-core machine runs two of them side by side, and
    # the arithmetic of a run does not depend on how busy the machine is.
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def start(argv, cwd, log_path, **options):
    """A background process whose stdout and stderr go to `log_path`."""
    with open(log_path, "w") as log:
        return subprocess.Popen(argv, cwd=cwd, env=environment(), stdout=log,
                                stderr=subprocess.STDOUT, **options)


def read(path):
    with open(path, encoding="utf-8", errors="replace") as file:
        return file.read()


def wait_until(condition, timeout, what, process=None, poll=0.05):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return
        if process is not None and process.poll() is not None:
            raise AssertionError(f"the process ended (exit {process.returncode}) before {what}")
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def metrics_rows(checkpoint_dir):
    path = os.path.join(checkpoint_dir, "metrics.csv")
    if not os.path.exists(path):
        return []
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


def training_steps(rows):
    """The steps of the training-loss rows (a row still being written is skipped)."""
    return [int(row["step"]) for row in rows if row.get("train_loss")]


def temporaries(folder):
    return [name for name in os.listdir(folder) if name.startswith(".tmp_")]


def output(result):
    return (result.stdout + result.stderr)[-3000:]


# ---------------------------------------------------------------------------
# The short, independent runs, started together

def _quick_runs(base):
    """{name: (root, argv)}; each root holds CORPUS in data/, so a run that gets as far
    as the data prints "data: ..."."""
    runs = {}

    def add(name, *args):
        root = os.path.join(base, name)
        write_text_corpus(f"{root}/data", CORPUS)
        runs[name] = (root, command(root, *args))
        return root

    for name, arg in (("device_tpu", "--device=tpu"),
                      ("device_cuda_abc", "--device=cuda:abc"),
                      ("seed_too_big", "--seed=99999999999999999999"),
                      ("checkpoint_dir_is_a_file", "--checkpoint_dir={root}/a_file"),
                      ("model_too_big", "--embedding_dim=100000000")):
        root = add(name, arg.format(root=os.path.join(base, name)), "--max_steps=2")
        with open(f"{root}/a_file", "w") as file:  # used by checkpoint_dir_is_a_file
            file.write("a regular file")

    add("quarter_minute_timeout", "--max_steps=2", "--DO_PREDICTION=False",
        "--distributed_timeout_minutes=0.25")
    add("data_dir_missing", f"--data_dir={base}/data_dir_missing/no_such_folder",
        "--max_steps=2")
    single = f"{base}/data_dir_single_file/one/only.txt"
    add("data_dir_single_file", f"--data_dir={single}", "--max_steps=2",
        "--DO_PREDICTION=False")
    write_text_corpus(os.path.dirname(single), CORPUS, name="only.txt")
    root = add("checkpoint_dir_uncreatable",
               f"--checkpoint_dir={base}/checkpoint_dir_uncreatable/afile/ckpt", "--max_steps=2")
    with open(f"{root}/afile", "w") as file:
        file.write("a file, so afile/ckpt cannot be a folder")

    root = add("stale_lock", "--max_steps=2", "--DO_PREDICTION=False")
    os.makedirs(f"{root}/ckpt")
    with open(f"{root}/ckpt/{LOCK}", "w") as file:  # no process holds its flock
        file.write(f"pid 999999 on {socket.gethostname()}, started "
                   f"2024-01-01T00:00:00+00:00: python3 main.py\n")

    add("interim_temperature_tiny", "--max_steps=4", "--test_every_batches=2",
        "--interim_test_temperature=1e-300", "--DO_PREDICTION=False")
    add("two_steps_for_interactive", "--max_steps=2", "--DO_PREDICTION=False")

    root = add("checkpoint_without_config", "--DO_TRAINING=False")
    os.makedirs(f"{root}/ckpt")
    torch.save({"format_version": 1, "model_state": {}},
               f"{root}/ckpt/grug_v3_best.pth")
    return runs


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """{name: (root, CompletedProcess with text output)} of every run of _quick_runs."""
    runs = _quick_runs(str(tmp_path_factory.mktemp("quick")))
    pending, running, results = list(runs.items()), [], {}
    while pending or running:
        while pending and len(running) < 2:
            name, (root, argv) = pending.pop(0)
            out, err = open(f"{root}/stdout.txt", "w"), open(f"{root}/stderr.txt", "w")
            running.append((name, subprocess.Popen(argv, cwd=root, env=environment(),
                                                   stdout=out, stderr=err), out, err,
                            time.time()))
        time.sleep(0.05)
        for entry in list(running):
            name, process, out, err, began = entry
            if process.poll() is None and time.time() - began < 180:
                continue
            if process.poll() is None:
                process.kill()
                process.wait()
            out.close()
            err.close()
            running.remove(entry)
            root = runs[name][0]
            results[name] = (root, subprocess.CompletedProcess(
                process.args, process.returncode, read(f"{root}/stdout.txt"),
                read(f"{root}/stderr.txt")))
    return results


# ---------------------------------------------------------------------------
# 1. One training run per checkpoint folder

@pytest.mark.slow
def test_second_run_on_a_busy_checkpoint_dir_stops_naming_the_first_and_leaves_it_alone(
        tmp_path):
    root = str(tmp_path)
    ckpt = f"{root}/ckpt"
    write_text_corpus(f"{root}/data", CORPUS)
    first = start(command(root, *ENDLESS), root, f"{root}/first.log")
    try:
        wait_until(lambda: len(training_steps(metrics_rows(ckpt))) >= 2, 120,
                   "the first run's training steps", first)
        assert f"pid {first.pid} on " in read(f"{ckpt}/{LOCK}")

        began = time.time()
        second = run_main(root, "--max_steps=2", timeout=120)
        took = time.time() - began
        assert second.returncode == 1, output(second)
        assert "another training run is using checkpoint_dir" in second.stderr
        assert ckpt in second.stderr and f"pid {first.pid}" in second.stderr
        assert "Traceback" not in second.stderr
        assert "data:" not in second.stdout  # stopped before any data processing
        assert took < 60, f"the refused run took {took:.0f} s"

        # The first run carries on undisturbed: its lock, its metrics from step 1 on.
        assert first.poll() is None, read(f"{root}/first.log")[-3000:]
        assert f"pid {first.pid} on " in read(f"{ckpt}/{LOCK}")
        steps = training_steps(metrics_rows(ckpt))
        assert steps == list(range(1, len(steps) + 1))
        assert not [name for name in os.listdir(ckpt) if name.startswith("metrics_before")]
        assert not os.path.exists(f"{ckpt}/grug_v3_latest.pth")

        first.send_signal(signal.SIGINT)
        first.wait(timeout=120)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    log = read(f"{root}/first.log")
    assert first.returncode == 130, log[-3000:]
    assert load_checkpoint(f"{ckpt}/grug_v3_latest.pth")["step"] >= len(steps)
    assert not os.path.exists(f"{ckpt}/{LOCK}")  # released and removed on the way out


@pytest.mark.slow
def test_a_torchrun_job_on_a_busy_checkpoint_dir_stops_on_every_rank_without_traceback(
        tmp_path):
    """Rank 0 takes the lock; the other ranks must stop as cleanly as it does, not crash
    (or hang) at the next collective while rank 0 is gone."""
    root = str(tmp_path)
    write_text_corpus(f"{root}/data", CORPUS)
    with CheckpointFolderLock(f"{root}/ckpt", log=lambda message: None):  # held by us
        began = time.time()
        result = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone",
             "--nproc_per_node=2", *command(root, "--max_steps=2", "--DO_PREDICTION=False",
                                            "--distributed_timeout_minutes=1")[1:]],
            cwd=root, env=environment(), capture_output=True, text=True, timeout=240)
        took = time.time() - began
        assert os.listdir(f"{root}/ckpt") == [LOCK]  # nothing of ours was touched
    assert result.returncode != 0, output(result)
    assert "another training run is using checkpoint_dir" in result.stderr
    assert f"pid {os.getpid()}" in result.stderr
    assert "data:" not in result.stdout
    # torchrun prefixes each worker's own output with [rankN]; its own summary of a
    # failed child is torch's, not the program's.
    worker_lines = [line for line in (result.stdout + result.stderr).splitlines()
                    if line.startswith("[rank")]
    assert not [line for line in worker_lines if "Traceback" in line or "Error" in line], \
        "\n".join(worker_lines)[-3000:]
    assert took < 90, f"the refused job took {took:.0f} s"


@pytest.mark.slow
def test_a_stale_lock_file_is_taken_over_and_removed_after_the_run(quick):
    root, result = quick["stale_lock"]
    assert result.returncode == 0, output(result)
    text = result.stdout + result.stderr
    assert "taking over the lock" in text and "pid 999999" in text
    assert load_checkpoint(f"{root}/ckpt/grug_v3_latest.pth")["step"] == 2
    assert not os.path.exists(f"{root}/ckpt/{LOCK}")


# ---------------------------------------------------------------------------
# 2. Preemption under torchrun (SLURM's scancel: SIGTERM to every process, repeated)

@pytest.mark.slow
def test_torchrun_job_preempted_by_repeated_sigterm_saves_a_complete_latest(tmp_path):
    root = str(tmp_path)
    ckpt = f"{root}/ckpt"
    write_text_corpus(f"{root}/data", CORPUS)
    # Steps of about half a second, so that the second SIGTERM comes mid-step, before
    # the save; a short collective timeout, so that a rank left waiting fails fast.
    slow_steps = ["--batch_size=96", "--sequence_length=64", "--data_stride=64",
                  "--embedding_dim=128", "--attention_d_model=128", "--num_attention_layers=2",
                  "--distributed_timeout_minutes=0.5"]
    launcher = start([sys.executable, "-m", "torch.distributed.run", "--standalone",
                      "--nproc_per_node=2", *command(root, *ENDLESS, *slow_steps)[1:]],
                     root, f"{root}/job.log", start_new_session=True)
    group = launcher.pid  # a session leader's pid is its process group's id

    def group_alive():
        try:
            os.killpg(group, 0)
            return True
        except ProcessLookupError:
            return False

    try:
        wait_until(lambda: len(training_steps(metrics_rows(ckpt))) >= 2, 150,
                   "the job's training steps", launcher)
        logged = len(training_steps(metrics_rows(ckpt)))
        wait_until(lambda: len(training_steps(metrics_rows(ckpt))) > logged, 60,
                   "the start of a step", launcher, poll=0.01)
        os.killpg(group, signal.SIGTERM)
        time.sleep(0.2)
        os.killpg(group, signal.SIGTERM)
        launcher.wait(timeout=60)
        # Workers the agent leaves behind still get to finish their save.
        wait_until(lambda: not group_alive(), 60, "every process of the job to end")
    finally:
        if group_alive():
            os.killpg(group, signal.SIGKILL)
        launcher.wait()
    log = read(f"{root}/job.log")
    assert "SIGTERM received" in log, log[-4000:]
    state = load_checkpoint(f"{ckpt}/grug_v3_latest.pth", required=KEYS_TO_RESUME)
    assert 0 < state["step"] < 100000
    assert state["step"] >= max(training_steps(metrics_rows(ckpt)))
    assert temporaries(ckpt) == []
    assert not os.path.exists(f"{ckpt}/{LOCK}")


# ---------------------------------------------------------------------------
# 3. Fault injection: SIGKILL at random moments, resume, same weights as no kill at all

@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_gives_bitwise_the_uninterrupted_weights(
        tmp_path):
    steps = 40
    args = [f"--max_steps={steps}", "--checkpoint_every_batches=1", "--metrics_every=1",
            "--use_amp=False", "--DO_PREDICTION=False", "--transformer_dropout=0.1"]
    for name in ("killed", "reference"):
        write_text_corpus(f"{tmp_path}/{name}/data", CORPUS)
    root, reference_root = f"{tmp_path}/killed", f"{tmp_path}/reference"
    ckpt, latest = f"{root}/ckpt", f"{root}/ckpt/grug_v3_latest.pth"
    # The uninterrupted run, on the other core, while the first killed run goes.
    reference = start(command(reference_root, *args), reference_root,
                      f"{tmp_path}/reference.log")

    def resume_args():
        return ["--resume_from_checkpoint=latest"] if os.path.exists(latest) else []

    # Each kill comes once the metrics show a randomly drawn step, after a random part
    # of a step: in the forward/backward pass, a validation, or a checkpoint write.
    rng = random.Random(20240614)
    targets = [rng.randrange(first, first + 9) for first in (2, 12, 22)]  # spread out
    history, resumes_since_fresh = [], 0
    for attempt, target in enumerate(targets):
        resume, stale = bool(resume_args()), os.path.exists(f"{ckpt}/{LOCK}")
        log_path = f"{tmp_path}/attempt{attempt}.log"
        process = start(command(root, *args, *resume_args()), root, log_path)
        try:
            wait_until(lambda: "steps at most" in read(log_path) and
                       max(training_steps(metrics_rows(ckpt)), default=0) >= target,
                       120, f"attempt {attempt} to reach step {target}", process, poll=0.01)
            time.sleep(rng.uniform(0.0, 0.03))
        finally:
            process.kill()
            process.wait()
        log = read(log_path)
        assert process.returncode == -signal.SIGKILL, log[-3000:]
        assert "Traceback" not in log, log[-3000:]
        assert ("resumed from" in log) == resume, log[-3000:]  # latest was always loadable
        assert ("taking over the lock" in log) == stale, log[-3000:]
        resumes_since_fresh = resumes_since_fresh + 1 if resume else 0
        history.append((target, load_checkpoint(latest)["step"]
                        if os.path.exists(latest) else None))

    final = subprocess.run(command(root, *args, *resume_args()), cwd=root, env=environment(),
                           capture_output=True, text=True, timeout=120)
    assert final.returncode == 0, output(final)
    assert "resumed from" in final.stdout, (history, output(final))
    resumes_since_fresh += 1
    assert reference.wait(timeout=120) == 0, read(f"{tmp_path}/reference.log")[-3000:]

    assert temporaries(ckpt) == [] and not os.path.exists(f"{ckpt}/{LOCK}")
    killed_state = load_checkpoint(latest)
    reference_state = load_checkpoint(f"{reference_root}/ckpt/grug_v3_latest.pth")
    assert killed_state["step"] == reference_state["step"] == steps
    assert killed_state["model_state"].keys() == reference_state["model_state"].keys()
    for key, value in reference_state["model_state"].items():
        assert torch.equal(killed_state["model_state"][key], value), (key, history)
    assert killed_state["best_val_loss"] == reference_state["best_val_loss"]

    rows = metrics_rows(ckpt)
    logged = training_steps(rows)
    assert sorted(logged) == list(range(1, steps + 1)), (logged, history)  # each once
    assert len([row for row in rows if row["event"] == "resume"]) == resumes_since_fresh, history


# ---------------------------------------------------------------------------
# 4. Configuration errors, found before any data is processed

@pytest.mark.slow
@pytest.mark.parametrize("name, expected", [
    ("device_tpu", "'tpu'"),
    ("device_cuda_abc", "'cuda:abc'"),
    ("seed_too_big", "`seed` = 99999999999999999999 is out of range"),
    ("checkpoint_dir_is_a_file", "is a file, not a folder"),
    ("model_too_big", " GB"),
])
def test_impossible_setting_exits_2_before_any_data_processing(quick, name, expected):
    root, result = quick[name]
    assert result.returncode == 2, output(result)
    assert expected in result.stderr
    assert "Traceback" not in result.stderr
    assert "data:" not in result.stdout
    assert not os.path.exists(f"{root}/processed")


@pytest.mark.slow
def test_a_model_too_big_for_memory_is_refused_saying_how_many_gb_it_needs(quick):
    _, result = quick["model_too_big"]
    needed = re.search(r"about ([\d,.]+) GB", result.stderr)
    assert needed, result.stderr
    assert float(needed.group(1).replace(",", "")) > 100  # 100M-wide embeddings


@pytest.mark.slow
def test_a_fraction_of_a_minute_as_distributed_timeout_is_accepted(quick):
    _, result = quick["quarter_minute_timeout"]
    assert result.returncode == 0, output(result)


# ---------------------------------------------------------------------------
# 5 and 6. Data and checkpoint paths

@pytest.mark.slow
def test_a_data_dir_that_does_not_exist_is_an_error_and_is_not_created(quick):
    root, result = quick["data_dir_missing"]
    missing = f"{root}/no_such_folder"
    assert result.returncode == 1, output(result)
    assert missing in result.stderr and "Traceback" not in result.stderr
    assert not os.path.exists(missing)  # a mistyped path is not created


@pytest.mark.slow
def test_a_single_txt_file_as_data_dir_is_a_corpus(quick):
    root, result = quick["data_dir_single_file"]
    assert result.returncode == 0, output(result)
    assert "corpus: 93,000 bytes" in result.stdout  # the one file, nothing else
    assert load_checkpoint(f"{root}/ckpt/grug_v3_latest.pth")["step"] == 2


@pytest.mark.slow
def test_a_checkpoint_dir_that_cannot_be_created_is_reported_before_data_processing(quick):
    root, result = quick["checkpoint_dir_uncreatable"]
    assert result.returncode == 1, output(result)
    assert "not writable" in result.stderr and f"{root}/afile/ckpt" in result.stderr
    assert "Traceback" not in result.stderr
    assert "data:" not in result.stdout and not os.path.exists(f"{root}/processed")


# ---------------------------------------------------------------------------
# 7, 8 and 9. Generation settings, and a checkpoint that cannot be generated from

@pytest.mark.slow
def test_interactive_mode_survives_invalid_utf8_and_rejects_nan_and_inf(quick):
    root, trained = quick["two_steps_for_interactive"]
    assert trained.returncode == 0, output(trained)
    lines = [b"ab\xff\xfe\xc3 cd", b"/temp nan", b"/temp inf", b"/rep nan",
             b"/temp 1e-300", b"abc", b"/topp 1e-300", b"abc",
             b"/temp 1", b"abc",  # top_p 1e-300 alone keeps only the likeliest byte
             b"/temp 0", b"/topp 1", b"abc"]  # plain greedy, for comparison
    result = subprocess.run(command(root, "--DO_TRAINING=False", "--interactive",
                                    "--generation_max_new_bytes=12"),
                            cwd=root, env=environment(), input=b"\n".join(lines) + b"\n",
                            capture_output=True, timeout=120)
    stdout, stderr = (result.stdout.decode("utf-8", "replace"),
                      result.stderr.decode("utf-8", "replace"))
    assert result.returncode == 0, stderr[-3000:]
    assert "Traceback" not in stderr
    replies = stdout.split("> ")[1:]  # one reply per input line, after each "> " prompt
    assert len(replies) == len(lines) + 1, stdout  # + the one to the end of input
    for index, value in ((1, "nan"), (2, "inf"), (3, "nan")):
        reply = replies[index]
        assert value in reply and "finite" in reply, reply  # rejected, with the reason
        assert not re.match(r"(temperature|repetition_penalty) = ", reply), reply
    assert replies[4] == "temperature = 1e-300\n"
    assert replies[6] == "top_p = 1e-300\n"
    greedy = replies[12]
    assert greedy.strip()  # something was generated
    assert replies[5] == replies[7] == replies[9] == greedy


@pytest.mark.slow
def test_a_vanishing_interim_sample_temperature_trains_and_samples(quick):
    root, result = quick["interim_temperature_tiny"]
    assert result.returncode == 0, output(result)
    samples = read(f"{root}/ckpt/interim_samples.txt")
    assert "=== step 2 ===" in samples and "=== step 4 ===" in samples


@pytest.mark.slow
def test_prediction_from_a_checkpoint_without_config_names_the_missing_key(quick):
    root, result = quick["checkpoint_without_config"]
    assert result.returncode == 1, output(result)
    assert "grug_v3_best.pth" in result.stderr
    assert re.search(r"lacks config, step\b", result.stderr), result.stderr
    assert "Traceback" not in result.stderr


# ---------------------------------------------------------------------------
# In-process twins of the lock and checkpoint tests above, for the fast tier

def test_a_held_lock_refuses_a_second_holder_naming_the_first(tmp_path):
    folder = str(tmp_path / "ckpt")
    with CheckpointFolderLock(folder, log=lambda message: None):
        with pytest.raises(UserError) as caught:
            CheckpointFolderLock(folder, log=lambda message: None).__enter__()
        message = str(caught.value)
        assert "another training run is using checkpoint_dir" in message
        assert folder in message and f"pid {os.getpid()} on " in message
        assert f"pid {os.getpid()} on " in read(f"{folder}/{LOCK}")  # still ours
    assert not os.path.exists(f"{folder}/{LOCK}")  # released and removed on the way out


def test_a_stale_lock_file_is_taken_over_in_process(tmp_path):
    folder = str(tmp_path / "ckpt")
    os.makedirs(folder)
    with open(f"{folder}/{LOCK}", "w") as file:  # no process holds its flock
        file.write(f"pid 999999 on {socket.gethostname()}, started "
                   f"2024-01-01T00:00:00+00:00: python3 main.py\n")
    messages = []
    with CheckpointFolderLock(folder, log=messages.append):
        assert f"pid {os.getpid()} on " in read(f"{folder}/{LOCK}")
    assert len(messages) == 1
    assert "taking over the lock" in messages[0] and "pid 999999" in messages[0]
    assert not os.path.exists(f"{folder}/{LOCK}")


def test_a_lock_in_a_folder_that_cannot_be_created_says_not_writable(tmp_path):
    (tmp_path / "afile").write_text("a file, so afile/ckpt cannot be a folder")
    folder = str(tmp_path / "afile" / "ckpt")
    with pytest.raises(UserError, match="not writable") as caught:
        CheckpointFolderLock(folder, log=lambda message: None).__enter__()
    assert folder in str(caught.value)


def test_generating_from_a_checkpoint_without_config_names_the_missing_key(tmp_path):
    from main import load_model_for_prediction
    config = make_tiny_config(str(tmp_path))
    os.makedirs(config["checkpoint_dir"])
    torch.save({"format_version": 1, "model_state": {}},
               os.path.join(config["checkpoint_dir"], "grug_v3_best.pth"))
    with pytest.raises(UserError) as caught:
        load_model_for_prediction(config, torch.device("cpu"))
    assert "grug_v3_best.pth" in str(caught.value)
    assert re.search(r"lacks config, step\b", str(caught.value)), str(caught.value)
