"""`python3 main.py` end to end, on tiny configs in temporary folders: in subprocesses
(the slow tier, --full) and, for the fast tier, once in-process through main.main."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from tests.conftest import REPO_ROOT, write_text_corpus
from checkpoint import load_checkpoint

TINY_MODEL = ["--sequence_length=16", "--data_stride=16", "--batch_size=4",
              "--embedding_dim=32", "--attention_d_model=32", "--attention_num_heads=2",
              "--num_attention_layers=1", "--num_byte_stream_layers=1",
              "--num_agg_stream_layers=1", "--agg_cnn_out_dim=32", "--eval_max_batches=2",
              "--print_every=2", "--validate_and_checkpoint_best_every_batches=3",
              "--checkpoint_every_batches=3", "--test_every_batches=4",
              "--interim_test_max_new_bytes=8", "--max_train_minutes=None", "--device=cpu",
              "--generation_max_new_bytes=24", "--lr_warmup_steps=2"]


def paths(root):
    return [f"--data_dir={root}/data", f"--processed_data_dir={root}/processed",
            f"--checkpoint_dir={root}/ckpt", f"--profiler_log_dir={root}/prof"]


def run_main(root, *args, timeout=240):
    return subprocess.run([sys.executable, os.path.join(REPO_ROOT, "main.py"), *paths(root),
                           *TINY_MODEL, *args], cwd=root, capture_output=True, text=True,
                          timeout=timeout)


def interrupt_after_rows(process, metrics, rows):
    """Ctrl-C `process` once `metrics` has more than `rows` lines; its output."""
    deadline = time.time() + 120
    while time.time() < deadline:
        if os.path.exists(metrics) and len(open(metrics).readlines()) > rows:
            break
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    return process.communicate(timeout=120)[0]


@pytest.mark.slow
def test_fresh_run_on_dummy_data_trains_generates_and_resumes(tmp_path):
    root = str(tmp_path)
    os.makedirs(f"{root}/data")  # an existing, empty data folder gets the demo corpus
    first = run_main(root, "--max_steps=6", "--generation_prompts=['Hé']")
    assert first.returncode == 0, first.stderr[-3000:]
    assert "dummy" in first.stdout.lower()
    assert "parameters" in first.stdout and "device: cpu" in first.stdout
    checkpoints = os.listdir(f"{root}/ckpt")
    for name in ("grug_v3_best.pth", "grug_v3_latest.pth", "metrics.csv",
                 "interim_samples.txt", "generated_samples.txt"):
        assert name in checkpoints
    with open(f"{root}/ckpt/generated_samples.txt", encoding="utf-8") as file:
        sample = file.read()
    assert "=== prompt: 'Hé'" in sample and len(sample.splitlines()[1]) > 2

    resumed = run_main(root, "--max_steps=9", "--resume_from_checkpoint=latest",
                       "--DO_PREDICTION=False")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout + resumed.stderr
    assert "reusing cache" in resumed.stdout  # the processed data was not rebuilt
    assert load_checkpoint(f"{root}/ckpt/grug_v3_latest.pth")["step"] == 9


@pytest.mark.slow
def test_sigint_saves_latest_and_says_how_to_resume(tmp_path):
    root = str(tmp_path)
    write_text_corpus(f"{root}/data", "abcdefghij klmnop, qrstuvwxyz.\n" * 3000)
    process = subprocess.Popen(
        [sys.executable, os.path.join(REPO_ROOT, "main.py"), *paths(root), *TINY_MODEL,
         "--max_steps=100000", "--checkpoint_every_batches=100000", "--test_every_batches=0",
         "--validate_and_checkpoint_best_every_batches=100000"],
        cwd=root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    # Interrupt once training steps are being logged.
    output = interrupt_after_rows(process, f"{root}/ckpt/metrics.csv", 2)
    assert process.returncode == 130, output[-3000:]
    assert "--resume_from_checkpoint=latest" in output
    state = load_checkpoint(f"{root}/ckpt/grug_v3_latest.pth")
    assert 0 < state["step"] < 100000
    assert not os.path.exists(f"{root}/ckpt/grug_v3_best.pth")  # no validation was due


@pytest.mark.slow
def test_prediction_stage_alone_uses_the_trained_checkpoint(tmp_path):
    root = str(tmp_path)
    write_text_corpus(f"{root}/data", "to be or not to be, that is the question. " * 400)
    trained = run_main(root, "--max_steps=3", "--DO_PREDICTION=False")
    assert trained.returncode == 0, trained.stderr[-3000:]
    os.remove(f"{root}/ckpt/grug_v3_best.pth")  # falls back to latest, with a message

    # A different architecture in the current config: the checkpoint's own wins.
    predicted = run_main(root, "--DO_TRAINING=False", "--embedding_dim=64",
                         "--generation_prompts=['to be', '']", "--generation_seed=7")
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    assert "no best checkpoint" in predicted.stdout
    with open(f"{root}/ckpt/generated_samples.txt", encoding="utf-8") as file:
        text = file.read()
    assert text.count("=== prompt:") == 2 and "seed 7" in text


@pytest.mark.slow
def test_prediction_without_checkpoint_is_a_clear_error(tmp_path):
    result = run_main(str(tmp_path), "--DO_TRAINING=False")
    assert result.returncode == 1
    assert "no checkpoint to generate from" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_data_errors_exit_cleanly(tmp_path):
    root = str(tmp_path)
    os.makedirs(f"{root}/data")
    with open(f"{root}/data/bad.txt", "wb") as file:
        file.write(b"fine text " * 500 + b"\xff\xfe broken")
    result = run_main(root, "--utf8_error_policy=error")
    assert result.returncode == 1
    assert "bad.txt" in result.stderr and "Traceback" not in result.stderr

    os.makedirs(tmp_path / "other")
    empty = run_main(str(tmp_path / "other"), "--generate_dummy_data_if_empty=False")
    assert empty.returncode == 1 and "Traceback" not in empty.stderr
    assert "data" in empty.stderr


@pytest.mark.slow
def test_corrupt_resume_checkpoint_is_reported(tmp_path):
    root = str(tmp_path)
    write_text_corpus(f"{root}/data", "hello world, hello bytes. " * 400)
    os.makedirs(f"{root}/ckpt")
    with open(f"{root}/ckpt/grug_v3_latest.pth", "wb") as file:
        file.write(b"\x00garbage")
    torch.save({"format_version": 1, "model_state": {}}, f"{root}/ckpt/grug_v3_best.pth")
    result = run_main(root, "--resume_from_checkpoint=latest")
    assert result.returncode == 1
    assert "grug_v3_latest.pth" in result.stderr and "Traceback" not in result.stderr
    assert "--resume_from_checkpoint=best" in result.stderr


@pytest.mark.slow
def test_interactive_mode_reads_prompts_until_end_of_input(tmp_path):
    root = str(tmp_path)
    write_text_corpus(f"{root}/data", "abc abd abe. " * 400)
    assert run_main(root, "--max_steps=2", "--DO_PREDICTION=False").returncode == 0
    result = subprocess.run(
        [sys.executable, os.path.join(REPO_ROOT, "main.py"), *paths(root), *TINY_MODEL,
         "--DO_TRAINING=False", "--interactive"],
        cwd=root, input="/temp 0\nab\n/len 5\n", capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "temperature = 0" in result.stdout and "max_new_bytes = 5" in result.stdout
    assert not os.path.exists(f"{root}/ckpt/generated_samples.txt")  # prompts, not a batch


@pytest.mark.slow
def test_an_interactive_session_after_a_compiled_one_is_compiled_from_its_first_byte(tmp_path):
    """The first session compiles the decode step (generation_compile=always) and keeps it
    in <checkpoint_dir>/compiled; the next, with the default "auto", loads it for its
    first prompt (a short one, which "auto" would otherwise decode eagerly), compiling
    nothing and without importing torch._inductor (seconds), and says the same as an
    eager session."""
    root = str(tmp_path)
    write_text_corpus(f"{root}/data", "abc abd abe. " * 400)
    assert run_main(root, "--max_steps=2", "--DO_PREDICTION=False").returncode == 0
    # main.py run with predictor.py's compile_ahead_of_time and load_program announced,
    # and torch._inductor at exit if it was imported
    code = (f"import atexit, runpy, sys\nsys.path.insert(0, {REPO_ROOT!r})\nimport predictor\n"
            "atexit.register(lambda: 'torch._inductor' in sys.modules\n"
            "                and print('torch._inductor', file=sys.stderr))\n"
            "for name in ('compile_ahead_of_time', 'load_program'):\n"
            "    def announced(*args, real=getattr(predictor, name), name=name):\n"
            "        print(name, file=sys.stderr)\n"
            "        return real(*args)\n"
            "    setattr(predictor, name, announced)\n"
            "sys.argv = ['main.py', *sys.argv[1:]]\n"
            f"runpy.run_path({os.path.join(REPO_ROOT, 'main.py')!r}, run_name='__main__')\n")

    def session(*args):
        result = subprocess.run(
            [sys.executable, "-c", code, *paths(root), *TINY_MODEL, "--DO_TRAINING=False",
             "--interactive", "--generation_seed=3", *args],
            cwd=root, input="/len 12\nab\n", capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        return result
    first = session("--generation_compile=always")
    assert "compile_ahead_of_time" in first.stderr and "decode step" not in first.stderr
    kept = sorted(os.listdir(f"{root}/ckpt/compiled"))
    assert len(kept) == 2  # a package and its record
    later = session()
    assert "load_program" in later.stderr and "compile_ahead_of_time" not in later.stderr
    assert "torch._inductor" in first.stderr and "torch._inductor" not in later.stderr
    assert sorted(os.listdir(f"{root}/ckpt/compiled")) == kept
    assert later.stdout == first.stdout == session("--generation_compile=never").stdout


@pytest.mark.slow
def test_an_interrupted_and_resumed_run_reports_the_whole_run(tmp_path):
    import csv
    from tests.test_report import check_plots_match_metrics, marks, plotted
    root = str(tmp_path)
    write_text_corpus(f"{root}/data", "abcdefghij klmnop, qrstuvwxyz.\n" * 3000)
    process = subprocess.Popen(
        [sys.executable, os.path.join(REPO_ROOT, "main.py"), *paths(root), *TINY_MODEL,
         "--max_steps=100000", "--metrics_every=1", "--test_every_batches=0"],
        cwd=root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    # Interrupt after a validation (step 3) and a few steps more.
    metrics = f"{root}/ckpt/metrics.csv"
    output = interrupt_after_rows(process, metrics, 6)
    assert process.returncode == 130, output[-3000:]
    assert f"report: {root}/ckpt/report.html" in output  # an interrupted run has one too
    stopped = load_checkpoint(f"{root}/ckpt/grug_v3_latest.pth")["step"]

    resumed = run_main(root, f"--max_steps={stopped + 4}", "--metrics_every=1",
                       "--resume_from_checkpoint=latest", "--DO_PREDICTION=False")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "final model on the whole validation split" in resumed.stdout
    assert resumed.stdout.strip().splitlines()[-1].startswith(f"report: {root}/ckpt/report.html")
    with open(metrics, newline="") as file:
        rows = list(csv.DictReader(file))
    final = [row for row in rows if row["event"] == "final_validation"]
    assert [row["step"] for row in final] == [str(stopped + 4)] and final[0]["val_bits_per_byte"]

    os.remove(f"{root}/ckpt/report.html")  # --report writes it again from metrics.csv alone
    again = run_main(root, "--report")
    assert again.returncode == 0, again.stderr[-3000:]
    with open(f"{root}/ckpt/report.html", encoding="utf-8") as file:
        plots = check_plots_match_metrics(file.read(), metrics)
    by_step = plots["Bits per byte by step (log scale)"]
    assert marks(by_step) == [stopped]  # the resume, marked
    steps = [x for x, _ in plotted(by_step, "training (mean since last row)")]
    assert (round(steps[0]), round(steps[-1])) == (1, stopped + 4)  # both parts of the run


def test_main_in_process_trains_generates_resumes_and_reports(tmp_path, capsys, monkeypatch):
    """The program's whole flow without a subprocess: training, generation from the
    checkpoint's own architecture, an interrupted and a finished resume, and --report
    (the demo corpus is test_dataset's)."""
    import main
    import trainer as trainer_module
    from utils import UserError
    root = str(tmp_path)
    write_text_corpus(f"{root}/data", "to be or not to be, that is the question. " * 400)
    common = [*paths(root), *TINY_MODEL]
    with pytest.raises(UserError, match="no checkpoint to generate from"):
        main.main([*common, "--DO_TRAINING=False"])
    assert main.main([*common, "--max_steps=6", "--generation_prompts=['Hé']"]) == 0
    out = capsys.readouterr().out
    assert "parameters" in out and "device: cpu" in out
    for name in ("grug_v3_best.pth", "grug_v3_latest.pth", "metrics.csv",
                 "interim_samples.txt", "generated_samples.txt", "report.html"):
        assert name in os.listdir(f"{root}/ckpt")
    with open(f"{root}/ckpt/generated_samples.txt", encoding="utf-8") as file:
        assert "=== prompt: 'Hé'" in file.read()

    # Stopped as by Ctrl-C after step 7: exit code 130, and how to resume.
    real_step = trainer_module.Trainer.train_step

    def stopping_step(trainer, micro):
        loss = real_step(trainer, micro)
        if trainer.step == 7:
            trainer.stop.reason = "SIGINT"
        return loss
    monkeypatch.setattr(trainer_module.Trainer, "train_step", stopping_step)
    resume = [*common, "--max_steps=9", "--resume_from_checkpoint=latest", "--DO_PREDICTION=False"]
    assert main.main(resume) == 130
    captured = capsys.readouterr()
    assert "--resume_from_checkpoint=latest" in captured.out + captured.err
    assert load_checkpoint(f"{root}/ckpt/grug_v3_latest.pth")["step"] == 7
    monkeypatch.undo()

    assert main.main(resume) == 0
    out = capsys.readouterr().out
    assert "reusing cache" in out  # the processed data was not rebuilt
    assert load_checkpoint(f"{root}/ckpt/grug_v3_latest.pth")["step"] == 9

    # A different architecture in the current config: the checkpoint's own wins.
    assert main.main([*common, "--DO_TRAINING=False", "--embedding_dim=64",
                      "--generation_prompts=['to be', '']", "--generation_seed=7"]) == 0
    with open(f"{root}/ckpt/generated_samples.txt", encoding="utf-8") as file:
        text = file.read()
    assert text.count("=== prompt:") == 1 + 2 and "seed 7" in text

    os.remove(f"{root}/ckpt/report.html")
    assert main.main([*common, "--report"]) == 0
    assert os.path.exists(f"{root}/ckpt/report.html")


# ---------------------------------------------------------------------------
# In process: what a run does with the files of an earlier one

def in_process(root, *args):
    import main as main_module
    return main_module.main([*paths(root), *TINY_MODEL, "--test_every_batches=0", *args])


def test_a_second_fresh_run_never_overwrites_the_trained_model(tmp_path, capsys):
    import hashlib
    from utils import UserError
    root = str(tmp_path)
    write_text_corpus(f"{root}/data", "the cat sat on the mat. " * 300)
    assert in_process(root, "--max_steps=3", "--DO_PREDICTION=False") == 0

    def checksums():
        return {name: hashlib.sha256(open(f"{root}/ckpt/{name}", "rb").read()).hexdigest()
                for name in ("grug_v3_best.pth", "grug_v3_latest.pth")}
    trained = checksums()
    capsys.readouterr()
    try:
        in_process(root, "--max_steps=2", "--DO_PREDICTION=False")
        raise AssertionError("a fresh run trained over the model")
    except UserError as error:
        assert "holds a trained model (grug_v3_best.pth, grug_v3_latest.pth)" in str(error)
    assert "data:" not in capsys.readouterr().out  # refused before any data work
    assert checksums() == trained

    assert in_process(root, "--max_steps=2", "--DO_PREDICTION=False", "--start_over=True") == 0
    assert "is now" in capsys.readouterr().out
    aside = sorted(name for name in os.listdir(f"{root}/ckpt") if "_before_" in name)
    assert [name.split("_before_")[0] for name in aside] == [
        "grug_v3_best", "grug_v3_latest", "metrics"]
    moved = {name.split("_before_")[0] + ".pth": hashlib.sha256(
        open(f"{root}/ckpt/{name}", "rb").read()).hexdigest() for name in aside[:2]}
    assert moved == trained  # the first model, intact beside the new one
    assert load_checkpoint(f"{root}/ckpt/grug_v3_latest.pth")["step"] == 2


def test_ctrl_c_during_the_final_validation_still_writes_the_report(tmp_path, monkeypatch):
    import main as main_module
    root = str(tmp_path)
    write_text_corpus(f"{root}/data", "the cat sat on the mat. " * 300)

    def interrupted(trainer):
        raise KeyboardInterrupt
    monkeypatch.setattr(main_module, "validate_final_model", interrupted)
    try:
        assert in_process(root, "--max_steps=3") == 130  # and no generation stage
    except KeyboardInterrupt:  # caught here: escaping, it would stop the whole test session
        pytest.fail("Ctrl-C during the final validation ended the run without its report")
    assert os.path.isfile(f"{root}/ckpt/report.html")
    assert not os.path.exists(f"{root}/ckpt/generated_samples.txt")


def test_settings_that_cannot_do_what_is_meant_are_warned_about_at_start(tmp_path, capsys):
    root = str(tmp_path)
    write_text_corpus(f"{root}/data", "the cat sat on the mat. " * 300)
    assert in_process(root, "--max_steps=3", "--DO_PREDICTION=False", "--lr_warmup_steps=5",
                      "--ngram_orders=[2, 20]", "--ngram_buckets=1") == 0
    said = capsys.readouterr().out
    for warning in ("warning: lr_warmup_steps (5) is not shorter than this run (3 steps)",
                    "warning: `ngram_orders` [20] are longer than the window",
                    "warning: `ngram_buckets` = 1 puts every n-gram in the same row"):
        assert warning in said
