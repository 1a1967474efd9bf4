"""Trainer behaviour: schedule, exact resume, crash-safe checkpoints, guards, metrics.

Most tests use a stand-in model to show the Trainer is model-agnostic and to stay fast;
the precision test uses the real ByteLLM_GrugV3."""

import csv
import errno
import math
import os
import re
import shutil
import signal

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import checkpoint as checkpoint_module
import trainer as trainer_module
from checkpoint import checkpoint_path, load_checkpoint, save_checkpoint
from dataset import ByteSequenceDataset
from tests.conftest import DEVICES, GPU_DEVICES, RECIPE_OPTIONS, make_tiny_config
from trainer import LearningRateSchedule, Trainer, TrainingDiverged
from utils import UserError, seed_everything

ARCH_KEYS = ("width",)


class StandInModel(torch.nn.Module):
    """Embedding -> dropout -> linear: enough to exercise every trainer path, and the
    dropout makes the RNG state matter for exact resume."""

    def __init__(self, width=16):
        super().__init__()
        self.embedding = torch.nn.Embedding(256, width)
        self.dropout = torch.nn.Dropout(0.2)
        self.norm = torch.nn.LayerNorm(width)
        self.out = torch.nn.Linear(width, 256)
        self.poison_at_call = None  # return NaN from this training call on (NaN guard test)
        self.calls = 0

    def forward(self, x, targets=None):
        logits = self.out(self.norm(self.dropout(self.embedding(x))))
        if targets is None:
            return logits
        self.calls += 1
        loss = F.cross_entropy(logits.reshape(-1, 256), targets.reshape(-1))
        if self.poison_at_call is not None and self.calls >= self.poison_at_call:
            loss = loss * float("nan")
        return loss


def byte_data(n=6000, seed=0):
    rng = np.random.default_rng(seed)
    pattern = np.frombuffer(b"the quick brown fox jumps over the lazy dog. ", dtype=np.uint8)
    data = np.resize(pattern, n).copy()
    noise = rng.random(n) < 0.05
    data[noise] = rng.integers(97, 123, noise.sum())
    return data


def datasets(config, data=None):
    data = byte_data() if data is None else data
    split = dict(sequence_length=config["sequence_length"], stride=config["data_stride"],
                 val_split_ratio=config["val_split_ratio"])
    return (ByteSequenceDataset(data, split="train", **split),
            ByteSequenceDataset(data, split="val", **split))


def make_trainer(config, model=None, device="cpu", **kwargs):
    seed_everything(config["seed"])
    model = (model or StandInModel()).to(device)
    train_set, val_set = datasets(config)
    return Trainer(model, train_set, val_set, config, torch.device(device),
                   architecture_keys=kwargs.pop("architecture_keys", ARCH_KEYS), **kwargs)


def tiny(tmp_path, **overrides):
    # AdamW: the stand-in model has no transformer matrices for Muon (the Muon tests pass
    # a real model and optimizer_type="Muon").
    config = make_tiny_config(str(tmp_path), **{"optimizer_type": "AdamW", **overrides})
    config["width"] = 16  # an "architecture key" of the stand-in model
    return config


# -- learning-rate schedule ---------------------------------------------------------

def schedule_config(**overrides):
    config = make_tiny_config("/unused", learning_rate=1e-3, lr_scheduler_eta_min=1e-5,
                              lr_warmup_steps=10, lr_warmup_init_factor=0.1)
    config.update(overrides)
    return config


def test_warmup_starts_at_init_factor_and_reaches_the_peak_at_its_last_step():
    schedule = LearningRateSchedule(schedule_config(), step_limit=100)
    assert schedule.learning_rate(0) == pytest.approx(1e-4)
    assert schedule.learning_rate(9) == pytest.approx(1e-3, abs=1e-15)
    rates = [schedule.learning_rate(s) for s in range(10)]
    assert rates == sorted(rates)


def test_cosine_reaches_the_floor_at_the_last_step():
    schedule = LearningRateSchedule(schedule_config(), step_limit=100)
    assert schedule.learning_rate(10) == pytest.approx(1e-3)
    assert schedule.learning_rate(99) == pytest.approx(1e-5, abs=1e-15)
    assert schedule.learning_rate(55) < schedule.learning_rate(30)


def test_a_time_budget_estimates_the_horizon_at_recorded_steps_and_follows_the_speed():
    schedule = LearningRateSchedule(schedule_config(), step_limit=10_000,
                                    time_budget_seconds=60)
    assert schedule.horizon() == 10_000  # until measured, the step limit stands in
    first, last = schedule.PROBE_STEPS
    clock = {}  # step -> elapsed: 0.1 s per step after 0.5 s of start-up, 0.2 s after step 50

    def observe(steps_run, step):
        clock[step] = clock.get(step - 1, 0.5) + (0.1 if step <= 50 else 0.2)
        schedule.observe(steps_run, step, clock[step])
    for step in range(1, last + 1):
        observe(step, step)
    assert schedule.horizon() == last + int((60 - clock[last]) / 0.1)  # timed from step 3
    horizon = schedule.horizon()
    schedule.observe(last + 1, last + 1, 1e6)  # not due: the clock is not read
    assert schedule.horizon() == horizon
    due = last + max(schedule.MIN_GAP, (horizon - last) // schedule.STEPS_LEFT_SHARE)
    for step in range(last + 1, due + 1):
        observe(step, step)
    # Re-estimated at `due` from the time per step since the last estimate.
    per_step = (clock[due] - clock[last]) / (due - last)
    assert schedule.horizon() == due + int((60 - clock[due]) / per_step) < horizon
    while schedule.horizon() > max(clock):
        observe(max(clock) + 1, max(clock) + 1)
    # The slower steps end the run early, and the decay has kept up with them.
    end = max(clock)
    assert clock[end] == pytest.approx(60, abs=0.2) and schedule.horizon() == end
    assert [e["at_step"] for e in schedule.estimates][:2] == [last, due]
    rates = [schedule.learning_rate(s) for s in range(10, end)]
    assert rates == sorted(rates, reverse=True)  # never up: no jump at an estimate
    assert rates[-1] == pytest.approx(1e-5)

    resumed = LearningRateSchedule(schedule_config(), 10_000, 60)
    resumed.load_state_dict(schedule.state_dict())
    assert [resumed.learning_rate(s) for s in range(end)] == \
        [schedule.learning_rate(s) for s in range(end)]
    for steps_run in range(1, last):  # a resumed run times its own steps first
        resumed.observe(steps_run, end + steps_run, 1e6 + steps_run)
    assert resumed.estimates == schedule.estimates
    older = {**schedule.state_dict(), "horizon_probe": schedule.estimates[0]}
    del older["horizon_estimates"]  # a checkpoint from when one estimate was all there was
    resumed.load_state_dict(older)
    assert resumed.estimates == schedule.estimates[:1]
    # A budget that allows more steps than the limit: the limit is the horizon.
    generous = LearningRateSchedule(schedule_config(), 100, 60)
    for steps_run in range(1, last + 1):
        generous.observe(steps_run, steps_run, 0.1 * steps_run)
    assert generous.horizon() == 100


def test_plateau_cuts_the_rate_after_patience_bad_validations():
    schedule = LearningRateSchedule(schedule_config(scheduler_type="ReduceLROnPlateau",
                                                    lr_scheduler_patience=1,
                                                    lr_scheduler_factor=0.5), 100)
    for loss in (2.0, 2.1, 2.2):
        schedule.on_validation(loss)
    assert schedule.learning_rate(50) == pytest.approx(5e-4)


def test_the_trainer_applies_the_schedule(tmp_path):
    config = tiny(tmp_path, max_steps=12, lr_warmup_steps=4, lr_warmup_init_factor=0.25)
    trainer = make_trainer(config)
    seen = []
    original = trainer.train_step

    def recording_step(micro):
        loss = original(micro)
        seen.append(trainer.current_lr())
        return loss
    trainer.train_step = recording_step
    trainer.train()
    assert seen[0] == pytest.approx(config["learning_rate"] * 0.25)
    assert seen[3] == pytest.approx(config["learning_rate"])
    assert seen[-1] == pytest.approx(config["lr_scheduler_eta_min"])


# -- checkpoints and resume ---------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
def test_exact_resume_matches_an_uninterrupted_run_bitwise(tmp_path, device):
    common = dict(lr_scheduler_T_max=20, gradient_accumulation_steps=2,
                  validate_and_checkpoint_best_every_batches=4, device=device)
    straight = tiny(tmp_path / "a", max_steps=14, **common)
    uninterrupted = make_trainer(straight, device=device)
    uninterrupted.train()

    first = tiny(tmp_path / "b", max_steps=9, **common)
    make_trainer(first, device=device).train()
    second = dict(first, max_steps=14, resume_from_checkpoint="latest")
    resumed = make_trainer(second, device=device)
    resumed.resume(checkpoint_path(second, "latest"))
    assert resumed.step == 9
    resumed.train()

    a, b = uninterrupted.raw_model.state_dict(), resumed.raw_model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # The test can fail: one step fewer gives different weights.
    short = make_trainer(tiny(tmp_path / "c", max_steps=13, **common), device=device)
    short.train()
    assert not torch.equal(short.raw_model.out.weight, resumed.raw_model.out.weight)


def test_checkpoint_holds_everything_needed_to_resume(tmp_path):
    config = tiny(tmp_path)
    make_trainer(config).train()
    state = load_checkpoint(checkpoint_path(config, "latest"))
    for key in ("model_state", "optimizer_state", "scheduler_state", "scaler_state", "step",
                "epoch", "batch_in_epoch", "best_val_loss", "rng_states", "config",
                "format_version"):
        assert key in state
    assert state["step"] == 6 and state["config"]["max_steps"] == 6
    assert set(state["rng_states"]) == {"python", "numpy", "torch", "cuda"}


def test_a_crash_mid_write_leaves_the_previous_checkpoint_loadable(tmp_path, monkeypatch):
    path = str(tmp_path / "model_latest.pth")
    save_checkpoint({"format_version": 1, "model_state": {"w": torch.ones(3)}}, path)

    def crashing_save(obj, file):
        file.write(b"PK\x03\x04 half a checkpoint")
        raise OSError("disk full")
    monkeypatch.setattr(checkpoint_module.torch, "save", crashing_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint({"format_version": 1, "model_state": {"w": torch.zeros(3)}}, path)
    monkeypatch.undo()
    assert torch.equal(load_checkpoint(path)["model_state"]["w"], torch.ones(3))
    assert os.listdir(tmp_path) == ["model_latest.pth"]  # no temporary file left behind


def test_truncated_and_foreign_files_give_clear_errors(tmp_path):
    good = str(tmp_path / "good.pth")
    save_checkpoint({"format_version": 1, "model_state": {"w": torch.ones(1000)}}, good)
    truncated = str(tmp_path / "truncated.pth")
    with open(good, "rb") as src, open(truncated, "wb") as dst:
        dst.write(src.read()[:300])
    with pytest.raises(UserError, match="cannot read checkpoint .*truncated.pth"):
        load_checkpoint(truncated)

    text_file = tmp_path / "notes.pth"
    text_file.write_text("not a checkpoint")
    with pytest.raises(UserError, match="notes.pth"):
        load_checkpoint(str(text_file))

    foreign = str(tmp_path / "foreign.pth")
    torch.save({"weights": torch.ones(2)}, foreign)
    with pytest.raises(UserError, match="not a GrugV3 checkpoint"):
        load_checkpoint(foreign)
    with pytest.raises(UserError, match="checkpoint not found"):
        load_checkpoint(str(tmp_path / "missing.pth"))


def test_resume_refuses_a_different_architecture(tmp_path):
    config = tiny(tmp_path)
    make_trainer(config).train()
    other = dict(config, width=32, sequence_length=32)
    trainer = make_trainer(other, model=StandInModel(32),
                           architecture_keys=("width", "sequence_length"))
    with pytest.raises(UserError) as caught:
        trainer.resume(checkpoint_path(config, "latest"))
    assert "width: checkpoint 16 vs config 32" in str(caught.value)
    assert "sequence_length: checkpoint 16 vs config 32" in str(caught.value)


def test_missing_latest_points_at_best(tmp_path):
    config = tiny(tmp_path)
    make_trainer(config).train()
    os.remove(checkpoint_path(config, "latest"))
    with pytest.raises(UserError, match="--resume_from_checkpoint=best"):
        checkpoint_module.resolve_resume_path(dict(config, resume_from_checkpoint="latest"))


def test_reset_best_val_loss_on_resume(tmp_path):
    config = tiny(tmp_path)
    make_trainer(config).train()
    kept = make_trainer(config)
    kept.resume(checkpoint_path(config, "latest"))
    reset = make_trainer(dict(config, reset_best_val_loss_on_resume=True))
    reset.resume(checkpoint_path(config, "latest"))
    assert math.isfinite(kept.best_val_loss) and reset.best_val_loss == math.inf


def test_epoch_snapshots_keep_only_the_last_ones(tmp_path):
    config = tiny(tmp_path, max_steps=None, num_epochs=3, save_epoch_snapshots=True,
                  keep_last_checkpoints=2, data_stride=64)
    make_trainer(config).train()
    names = sorted(f for f in os.listdir(config["checkpoint_dir"]) if "_epoch" in f)
    assert names == [f"{config['model_name']}_epoch2.pth", f"{config['model_name']}_epoch3.pth"]


# -- guards ------------------------------------------------------------------------

def test_nan_loss_stops_training_and_keeps_the_best_checkpoint(tmp_path):
    config = tiny(tmp_path, max_steps=10)
    model = StandInModel()
    trainer = make_trainer(config, model=model)
    model.poison_at_call = 5  # step 5: after the step-3 validation saved a best checkpoint
    best = checkpoint_path(config, "best")
    with pytest.raises(TrainingDiverged, match="loss became nan"):
        trainer.train()
    saved = load_checkpoint(best)
    assert saved["step"] == 3 and math.isfinite(saved["best_val_loss"])


def test_too_few_windows_for_one_step_is_a_clear_error(tmp_path):
    config = tiny(tmp_path, batch_size=4000)
    with pytest.raises(UserError, match="needs 4000"):
        make_trainer(config)


# -- outputs -----------------------------------------------------------------------

def test_metrics_file_records_the_run(tmp_path):
    config = tiny(tmp_path, max_steps=6, metrics_every=2)
    make_trainer(config).train()
    with open(os.path.join(config["checkpoint_dir"], "metrics.csv")) as file:
        rows = list(csv.DictReader(file))
    assert list(rows[0]) == list(trainer_module.METRICS_COLUMNS)
    train_rows = [r for r in rows if r["train_loss"]]
    val_rows = [r for r in rows if r["val_loss"]]
    assert [int(r["step"]) for r in train_rows] == [2, 4, 6]
    assert [int(r["step"]) for r in val_rows] == [3, 6]
    for row in val_rows:
        assert float(row["val_bits_per_byte"]) == pytest.approx(
            float(row["val_loss"]) / math.log(2), rel=1e-4)
    assert all(float(r["bytes_per_second"]) > 0 for r in train_rows)
    elapsed = [float(r["elapsed_seconds"]) for r in rows]
    assert elapsed == sorted(elapsed)


def test_the_final_validation_scores_at_most_its_bound_and_says_what(tmp_path, capsys):
    """byte_data's validation split is 600 bytes; a bound of 160 scores 10 pieces of 16."""
    figures = {}
    for name, bound in (("bounded", 160), ("whole", None), ("above", 10**6)):
        config = tiny(tmp_path / name, max_steps=2, final_validation_max_bytes=bound)
        trainer = make_trainer(config)
        trainer.train()
        capsys.readouterr()
        figures[name] = trainer_module.validate_final_model(trainer)
        shown = capsys.readouterr().out
        final = [r for r in metrics_rows(config) if r["event"] == "final_validation"]
        assert len(final) == 1 and final[0]["split_bytes"] == "600"
        assert final[0]["scored_bytes"] == str(figures[name].count)
        if name == "bounded":
            assert figures[name].count == 160 and "final model on 160 bytes of the 600-byte " \
                "validation split (10 evenly spread pieces of 16 bytes); 160 bytes scored" in shown
        else:
            assert figures[name].count == 599 and "final model on the whole validation split " \
                "of 600 bytes; 599 bytes scored" in shown
    assert figures["above"].nats == figures["whole"].nats  # the same model, the same bytes


def test_interim_samples_are_written(tmp_path):
    config = tiny(tmp_path, test_every_batches=3, interim_test_prompt="Th")
    prompts = []
    trainer = make_trainer(config, sample_fn=lambda p: prompts.append(p) or "é sample")
    trainer.train()
    with open(os.path.join(config["checkpoint_dir"], "interim_samples.txt"),
              encoding="utf-8") as file:
        text = file.read()
    assert prompts == ["Th", "Th"]
    assert "=== step 3 ===\nThé sample" in text and "=== step 6 ===" in text


def test_validation_uses_a_fixed_set_of_windows(tmp_path):
    config = tiny(tmp_path, eval_max_batches=2, batch_size=4)
    trainer = make_trainer(config)
    assert trainer.validation_indices() == trainer.validation_indices()
    assert len(trainer.validation_indices()) == 8
    assert trainer.evaluate() == trainer.evaluate()


def test_profiler_writes_a_trace(tmp_path):
    config = tiny(tmp_path, enable_profiler=True, profiler_schedule_wait=1,
                  profiler_schedule_warmup=1, profiler_schedule_active=2)
    make_trainer(config).train()
    traces = [f for _, _, files in os.walk(config["profiler_log_dir"]) for f in files]
    assert any(name.endswith(".json") or name.endswith(".json.gz") for name in traces)


# -- mixed precision (real model) ----------------------------------------------------

def losses_of_a_short_run(tmp_path, device="cpu", trainer_seen=None, **overrides):
    from model import ByteLLM_GrugV3
    config = make_tiny_config(str(tmp_path), max_steps=8, learning_rate=3e-3,
                              validate_and_checkpoint_best_every_batches=100, device=device,
                              **overrides)
    seed_everything(0)
    trainer = make_trainer(config, model=ByteLLM_GrugV3(config), device=device,
                           architecture_keys=())
    if trainer_seen is not None:
        trainer_seen.append(trainer)
    losses, original = [], trainer.train_step
    trainer.train_step = lambda micro: losses.append(original(micro)) or losses[-1]
    trainer.train()
    return np.array(losses)


MODERN_RECIPE = dict(optimizer_type="Muon", scheduler_type="wsd", positional_encoding_type="rotary",
                     norm_type="rmsnorm", qk_norm=True, ffn_activation="relu2",
                     zero_init_output_projections=True, logit_softcap=15.0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("recipe", [{}, MODERN_RECIPE,
                                    dict(MODERN_RECIPE, sparse_table_updates=True,
                                         **RECIPE_OPTIONS)],
                         ids=["seed-recipe", "modern-recipe", "sparse-tables-recipe-options"])
def test_bf16_autocast_tracks_fp32_from_the_same_start(tmp_path, recipe, device):
    fp32 = losses_of_a_short_run(tmp_path / "fp32", device, use_amp=False, **recipe)
    bf16 = losses_of_a_short_run(tmp_path / "bf16", device, use_amp=True, amp_dtype="bfloat16",
                                 **recipe)
    assert fp32[-1] < fp32[0] - 0.3 and bf16[-1] < bf16[0] - 0.3  # both learn
    difference = np.abs(fp32 - bf16)
    assert difference.max() < 0.01, difference  # bf16 rounding (~1e-4), not a different model
    assert difference.max() > 0  # and autocast really ran in bf16


@pytest.mark.parametrize("device", GPU_DEVICES)  # compiling would take minutes on a CPU
def test_a_compiled_model_trains_like_the_eager_one(tmp_path, device):
    """use_torch_compile on a GPU, in bf16 as "auto" picks there: the compiled model is
    the one that trains, and its losses are the eager model's up to kernel rounding."""
    trainers = []
    # no dropout: compiled code draws its masks from a random stream of its own
    settings = dict(use_amp=True, amp_dtype="bfloat16", transformer_dropout=0.0,
                    pe_dropout=0.0, output_dropout=0.0, **MODERN_RECIPE)
    eager = losses_of_a_short_run(tmp_path / "eager", device, **settings)
    compiled = losses_of_a_short_run(tmp_path / "compiled", device, trainers,
                                     use_torch_compile=True, **settings)
    assert trainers[0].model is not trainers[0].raw_model  # compiled, no fallback
    assert compiled[-1] < compiled[0] - 0.3  # it learns
    difference = np.abs(eager - compiled)
    assert difference.max() < 0.02, difference


def test_a_compiler_that_fails_falls_back_to_eager_with_a_warning(tmp_path, monkeypatch, capsys):
    class BrokenCompiled(torch.nn.Module):
        def forward(self, *args):
            raise RuntimeError("no working C++ compiler found")
    monkeypatch.setattr(trainer_module.torch, "compile", lambda model: BrokenCompiled())
    model = StandInModel()
    trainer = make_trainer(tiny(tmp_path, use_torch_compile=True), model=model)
    assert "torch.compile failed (RuntimeError: no working C++ compiler found)" in \
        capsys.readouterr().out
    assert trainer.model is model and trainer.train()["steps"] == 6


def test_compiling_leaves_no_gradients_behind(tmp_path, monkeypatch):
    monkeypatch.setattr(trainer_module.torch, "compile", lambda model: model)  # eager stand-in
    trainer = make_trainer(tiny(tmp_path, use_torch_compile=True))
    assert all(p.grad is None for p in trainer.raw_model.parameters())


# -- gradient accumulation --------------------------------------------------------

def test_accumulating_two_micro_batches_equals_one_batch_of_twice_the_size(tmp_path):
    """Same windows in the same steps, clipping on. A loss not divided by the number of
    micro-batches doubles every gradient; Adam would hide that in the weights, so the
    gradients handed to the optimizer are compared too."""
    runs = {}
    for name, batch, accumulation in (("one", 8, 1), ("two", 4, 2)):
        config = tiny(tmp_path / name, batch_size=batch, gradient_accumulation_steps=accumulation,
                      clip_grad_norm_value=1e3, max_steps=5,
                      validate_and_checkpoint_best_every_batches=100)
        seed_everything(0)
        model = StandInModel()
        model.dropout.p = 0.0  # masks of a (8, T) and two (4, T) batches would differ
        trainer = make_trainer(config, model=model)
        gradients, step = [], trainer.optimizers[0].step

        def recording_step(*args, trainer=trainer, gradients=gradients, step=step, **kwargs):
            gradients.append([p.grad.clone() for p in trainer.raw_model.parameters()])
            return step(*args, **kwargs)
        trainer.optimizers[0].step = recording_step
        trainer.train()
        runs[name] = gradients, trainer.raw_model.state_dict()
    (one_grads, one_weights), (two_grads, two_weights) = runs["one"], runs["two"]
    assert len(one_grads) == len(two_grads) == 5
    for a, b in zip(one_grads, two_grads):
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-7)
    for key in one_weights:
        torch.testing.assert_close(one_weights[key], two_weights[key], rtol=1e-4, atol=1e-6)


# -- time budgets: the horizon follows the clock, at steps recorded for a resume -----

def paced_trainer(config, pace, resume_from=None):
    """A Trainer whose clock advances exactly `pace` seconds per optimizer step, or
    pace(step) seconds for step number `step` (a clock that changes speed)."""
    trainer = make_trainer(config)
    if resume_from:
        trainer.resume(resume_from)
    first_step = trainer.step
    seconds = pace if callable(pace) else lambda step: pace
    trainer.elapsed_seconds = lambda: trainer.elapsed_before + sum(
        seconds(step) for step in range(first_step + 1, trainer.step + 1))
    return trainer


def record_every_step(trainer, stop_at=None):
    """{step: (learning rate, weights)} of every step; a SIGINT-like stop after `stop_at`."""
    record, step = {}, trainer.train_step

    def recording_step(micro):
        loss = step(micro)
        record[trainer.step] = (trainer.current_lr(),
                                {k: v.clone() for k, v in trainer.raw_model.state_dict().items()})
        if trainer.step == stop_at:
            trainer.stop.reason = "SIGINT"
        return loss
    trainer.train_step = recording_step
    return record


TIME_BUDGET = dict(max_steps=None, num_epochs=1000, max_train_minutes=1.0, lr_warmup_steps=2,
                   checkpoint_every_batches=1000, data_stride=1,
                   validate_and_checkpoint_best_every_batches=1000)


def test_a_time_limited_run_resumes_on_its_recorded_horizon(tmp_path):
    straight = paced_trainer(tiny(tmp_path / "a", **TIME_BUDGET), pace=0.5)
    uninterrupted = record_every_step(straight)
    summary = straight.train()
    assert summary["reason"] == "max_train_minutes" and summary["steps"] == 120
    assert straight.schedule.horizon() == 120  # 60 s at 0.5 s per step
    assert uninterrupted[120][0] == pytest.approx(straight.config["lr_scheduler_eta_min"])

    config = tiny(tmp_path / "b", **TIME_BUDGET)
    first = paced_trainer(config, pace=0.5)
    record_every_step(first, stop_at=50)
    assert first.train()["interrupted"]
    # At the same speed, the resumed run replays the estimates up to step 50 and its own
    # come to the same horizon: bitwise the uninterrupted run.
    replayed = [e for e in straight.schedule.estimates if e["at_step"] <= 50]
    at_50 = str(tmp_path / "at_50.pth")
    shutil.copy(checkpoint_path(config, "latest"), at_50)
    resumed = paced_trainer(config, 0.5, resume_from=at_50)
    continued = record_every_step(resumed)
    assert resumed.train()["reason"] == "max_train_minutes"
    assert resumed.schedule.estimates == replayed == straight.schedule.estimates
    assert sorted(continued)[0] == 51 and max(continued) == 120
    for step in range(51, 121):
        rate, weights = continued[step]
        assert rate == uninterrupted[step][0], step
        assert all(torch.equal(weights[k], uninterrupted[step][1][k]) for k in weights), step

    # Twice as fast after the resume: the recorded estimate holds until the resumed run's
    # own first one (after timing 20 of its steps: 73), which then sees the new speed.
    fast = paced_trainer(config, 0.25, resume_from=at_50)
    faster = record_every_step(fast)
    assert fast.train()["reason"] == "max_train_minutes"
    assert fast.schedule.estimates[:len(replayed)] == replayed
    assert fast.schedule.estimates[len(replayed)]["at_step"] == 73
    assert all(faster[step][0] == uninterrupted[step][0] for step in range(51, 74))
    assert max(faster) == fast.schedule.horizon() == 50 + int((60 - 25) / 0.25)


@pytest.mark.parametrize("before,after,end", [(0.25, 0.5, 150), (0.5, 0.25, 180)],
                         ids=["slows-down", "speeds-up"])
def test_a_time_budget_follows_a_clock_that_changes_speed_at_step_60(tmp_path, capsys, before,
                                                                       after, end):
    """With the horizon fixed from the first steps' speed, a run that slows down stops
    mid-decay and one that speeds up trains its last part at the floor rate."""
    trainer = paced_trainer(tiny(tmp_path, print_every=10, **TIME_BUDGET),
                            lambda step: before if step <= 60 else after)
    record = record_every_step(trainer)
    assert trainer.train()["steps"] == end  # 60 s of steps
    rates = [record[step][0] for step in range(3, end + 1)]  # after warmup
    assert rates == sorted(rates, reverse=True)
    peak, floor = trainer.config["learning_rate"], trainer.config["lr_scheduler_eta_min"]
    assert rates[-1] - floor < 0.02 * (peak - floor)  # the decay ends with the run
    assert sum(rate - floor < 1e-4 * (peak - floor) for rate in rates) <= 2  # not before it
    shown = re.findall(r"step (\d+) \(~(\d+) expected\)", capsys.readouterr().out)
    assert len(shown) == (end - 20) // 10  # from the first estimate (step 23) on
    assert all(int(step) <= int(last) for step, last in shown)


def test_a_run_that_max_steps_ends_is_reproducible_whatever_the_clock(tmp_path):
    """With a time budget that would allow more steps than max_steps, the horizon is
    max_steps, so runs at different speeds (or repeated runs) give the same weights."""
    common = dict(max_steps=30, max_train_minutes=10.0, validate_and_checkpoint_best_every_batches=100)
    results = []
    for name, pace in (("fast", 0.01), ("slow", 0.1), ("real", None)):
        config = tiny(tmp_path / name, **common)
        trainer = make_trainer(config) if pace is None else paced_trainer(config, pace)
        assert trainer.train()["reason"] == "max_steps"
        assert trainer.schedule.horizon() == 30
        results.append(trainer.raw_model.state_dict())
    for other in results[1:]:
        assert all(torch.equal(results[0][k], other[k]) for k in other)


# -- divergence ----------------------------------------------------------------------

def test_a_nan_loss_stops_every_rank_before_anything_is_saved(tmp_path):
    config = tiny(tmp_path, max_steps=12, checkpoint_every_batches=3)
    model = StandInModel()
    trainer = make_trainer(config, model=model)
    model.poison_at_call = 5
    with pytest.raises(TrainingDiverged, match="loss became nan at step 5"):
        trainer.train()
    latest = load_checkpoint(checkpoint_path(config, "latest"))
    assert latest["step"] == 3
    assert all(torch.isfinite(w).all() for w in latest["model_state"].values())
    assert all(torch.isfinite(p).all() for p in model.parameters())  # the NaN step was not taken


def test_non_finite_weights_are_never_saved(tmp_path):
    config = tiny(tmp_path, max_steps=12, checkpoint_every_batches=3,
                  validate_and_checkpoint_best_every_batches=100)
    trainer = make_trainer(config)
    step = trainer.train_step

    def poisoning_step(micro):
        loss = step(micro)
        if trainer.step == 6:  # right before the step-6 save
            with torch.no_grad():
                trainer.raw_model.out.weight[0, 0] = float("inf")
        return loss
    trainer.train_step = poisoning_step
    with pytest.raises(TrainingDiverged, match="weights became NaN or infinite"):
        trainer.train()
    latest = load_checkpoint(checkpoint_path(config, "latest"))
    assert latest["step"] == 3
    assert all(torch.isfinite(w).all() for w in latest["model_state"].values())


def test_a_non_finite_validation_loss_stops_training_unsaved(tmp_path, monkeypatch):
    config = tiny(tmp_path, max_steps=12, checkpoint_every_batches=100)
    trainer = make_trainer(config)
    monkeypatch.setattr(trainer, "evaluate", lambda: float("nan"))
    with pytest.raises(TrainingDiverged, match="validation loss became nan at step 3"):
        trainer.train()
    assert not os.path.exists(checkpoint_path(config, "latest"))
    assert not os.path.exists(checkpoint_path(config, "best"))


def test_a_huge_learning_rate_ends_in_an_error_and_a_finite_latest(tmp_path):
    from model import ByteLLM_GrugV3
    config = make_tiny_config(str(tmp_path), learning_rate=1e6, muon_learning_rate=1e6,
                              lr_warmup_steps=0,
                              clip_grad_norm_value=None, max_steps=60, checkpoint_every_batches=2,
                              validate_and_checkpoint_best_every_batches=2, weight_decay=0.0)
    trainer = make_trainer(config, model=ByteLLM_GrugV3(config), architecture_keys=())
    with pytest.raises(TrainingDiverged):
        trainer.train()
    for kind in ("latest", "best"):
        if os.path.exists(checkpoint_path(config, kind)):
            state = load_checkpoint(checkpoint_path(config, kind))
            assert all(torch.isfinite(w).all() for w in state["model_state"].values())


# -- full disks ----------------------------------------------------------------------

def test_a_full_disk_keeps_the_previous_checkpoint_and_training_goes_on(tmp_path, monkeypatch,
                                                                         capsys):
    config = tiny(tmp_path, max_steps=9, checkpoint_every_batches=3,
                  validate_and_checkpoint_best_every_batches=100)
    trainer = make_trainer(config)
    save, saves = checkpoint_module.torch.save, []

    def filling_save(obj, file):
        saves.append(obj["step"])
        if obj["step"] >= 6:
            file.write(b"PK\x03\x04 the start of a checkpoint")
            raise OSError(errno.ENOSPC, "No space left on device")
        return save(obj, file)
    monkeypatch.setattr(checkpoint_module.torch, "save", filling_save)
    with pytest.raises(checkpoint_module.DiskFull) as caught:
        trainer.train()  # the save at step 6 fails and training goes on; the final one ends it
    assert saves == [3, 6, 9, 9] and trainer.step == 9  # at 9: best, then the final latest
    message = str(caught.value)
    assert "grug_v3_latest.pth" in message and "disk is full" in message and "MB needed" in message
    assert "warning: cannot save" in capsys.readouterr().out  # the step-6 failure
    monkeypatch.undo()
    assert load_checkpoint(checkpoint_path(config, "latest"))["step"] == 3
    assert not [f for f in os.listdir(config["checkpoint_dir"]) if f.startswith(".tmp_")]


# -- fp16 with GradScaler (what amp_dtype "auto" picks on GPUs without bf16) ------------

def fp16_trainer(tmp_path, device="cpu", **overrides):
    from model import ByteLLM_GrugV3
    config = make_tiny_config(str(tmp_path), use_amp=True, amp_dtype="float16",
                              lr_scheduler_T_max=20,  # the same curve for runs of any length
                              validate_and_checkpoint_best_every_batches=100, device=device,
                              **overrides)
    seed_everything(0)
    return make_trainer(config, model=ByteLLM_GrugV3(config), device=device,
                        architecture_keys=())


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_fp16_with_a_grad_scaler_resumes_exactly(tmp_path, device):
    straight = fp16_trainer(tmp_path / "a", device, max_steps=8)
    assert straight.scaler.is_enabled()
    straight.train()
    first = fp16_trainer(tmp_path / "b", device, max_steps=5)
    first.train()
    saved = load_checkpoint(checkpoint_path(first.config, "latest"))
    assert saved["scaler_state"]["scale"] > 0
    resumed = fp16_trainer(tmp_path / "b", device, max_steps=8)
    resumed.resume(checkpoint_path(first.config, "latest"))
    assert resumed.scaler.get_scale() == first.scaler.get_scale()
    resumed.train()
    a, b = straight.raw_model.state_dict(), resumed.raw_model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.scaler.get_scale() == straight.scaler.get_scale()


@pytest.mark.parametrize("device", DEVICES)
def test_fp16_skips_a_step_whose_gradients_overflow(tmp_path, device):
    trainer = fp16_trainer(tmp_path, device, max_steps=1)
    trainer.scaler = torch.amp.GradScaler(device, init_scale=2.0**100)  # fp16 gradients overflow
    before = {k: v.clone() for k, v in trainer.raw_model.state_dict().items()}
    trainer.train()
    after = trainer.raw_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the step was skipped
    assert trainer.scaler.get_scale() == 2.0**99  # and the scale backed off
    assert trainer.step == 1


# -- metrics.csv ---------------------------------------------------------------------

def metrics_rows(config):
    with open(os.path.join(config["checkpoint_dir"], "metrics.csv")) as file:
        return list(csv.DictReader(file))


def test_a_resumed_run_drops_the_replayed_rows_and_marks_the_resume(tmp_path):
    config = tiny(tmp_path, max_steps=6, metrics_every=1, checkpoint_every_batches=3)
    make_trainer(config).train()
    with open(os.path.join(config["checkpoint_dir"], "metrics.csv"), "a") as file:
        file.write("7,1,5.0,,,0.001,100,1.0,\n8,1,5.0,,,0.001,100,1.0,\n")  # a killed run's rows
    resumed = make_trainer(dict(config, max_steps=9))
    resumed.resume(checkpoint_path(config, "latest"))
    resumed.train()
    rows = metrics_rows(config)
    train_steps = [int(r["step"]) for r in rows if r["train_loss"]]
    assert train_steps == list(range(1, 10))
    assert [(r["step"], r["event"]) for r in rows if r["event"]] == [("6", "resume")]


def test_a_fresh_run_moves_an_earlier_metrics_file_aside(tmp_path):
    config = tiny(tmp_path, max_steps=2, metrics_every=1)
    make_trainer(config).train()
    make_trainer(config).train()
    names = sorted(os.listdir(config["checkpoint_dir"]))
    assert [n for n in names if n.startswith("metrics_before_")]
    assert [int(r["step"]) for r in metrics_rows(config) if r["train_loss"]] == [1, 2]


def test_a_stray_file_among_epoch_snapshots_is_left_alone(tmp_path):
    config = tiny(tmp_path, max_steps=None, num_epochs=3, save_epoch_snapshots=True,
                  keep_last_checkpoints=1, data_stride=64)
    os.makedirs(config["checkpoint_dir"])
    stray = os.path.join(config["checkpoint_dir"], "grug_v3_epoch2 (copy).pth")
    open(stray, "wb").close()
    make_trainer(config).train()
    names = sorted(f for f in os.listdir(config["checkpoint_dir"]) if "_epoch" in f)
    assert names == ["grug_v3_epoch2 (copy).pth", "grug_v3_epoch3.pth"]
    assert load_checkpoint(checkpoint_path(config, "latest"))["epoch"] == 3


# -- signals -------------------------------------------------------------------------

def test_repeated_sigterms_ask_to_stop_once_and_never_abort():
    stop = trainer_module.StopRequests(log=lambda message: None)
    for _ in range(3):
        stop._handle(signal.SIGTERM, None)
    assert stop.reason == "SIGTERM"
    stop._handle(signal.SIGINT, None)  # a SIGINT after a SIGTERM: still a request to stop
    with pytest.raises(KeyboardInterrupt):
        stop._handle(signal.SIGINT, None)  # a second SIGINT typed by a person aborts


def test_a_second_sigint_waits_for_the_checkpoint_write(tmp_path):
    stop = trainer_module.StopRequests(log=lambda message: None)
    stop._handle(signal.SIGINT, None)
    path = str(tmp_path / "latest.pth")
    with pytest.raises(KeyboardInterrupt):
        with stop.protecting_a_write():
            stop._handle(signal.SIGINT, None)  # arrives mid-write: no exception here
            save_checkpoint({"format_version": 1, "model_state": {"w": torch.ones(2)}}, path)
    assert torch.equal(load_checkpoint(path)["model_state"]["w"], torch.ones(2))


def test_dropout_seeds_differ_between_ranks_and_repeat_for_a_step():
    seeds = {trainer_module.step_seed(42, rank, step) for rank in range(4) for step in range(50)}
    assert len(seeds) == 200
    assert trainer_module.step_seed(42, 1, 7) == trainer_module.step_seed(42, 1, 7)



# -- the modern recipe: Muon, wsd ---------------------------------------------------------

def real_trainer(tmp_path, **overrides):
    from model import ARCHITECTURE_KEYS, LEGACY_ARCHITECTURE, ByteLLM_GrugV3
    config = make_tiny_config(str(tmp_path), **overrides)
    seed_everything(config["seed"])
    return make_trainer(config, model=ByteLLM_GrugV3(config), architecture_keys=ARCHITECTURE_KEYS,
                        legacy_architecture=LEGACY_ARCHITECTURE)


def test_muon_takes_the_layer_matrices_and_adamw_the_rest(tmp_path):
    trainer = real_trainer(tmp_path, optimizer_type="Muon", learning_rate=2e-3,
                           muon_learning_rate=0.05)
    adamw, muon = trainer.optimizers
    assert isinstance(adamw, torch.optim.AdamW) and isinstance(muon, torch.optim.Muon)
    model = trainer.raw_model
    in_muon = {id(p) for group in muon.param_groups for p in group["params"]}
    assert in_muon == {id(p) for p in model.hidden_matrices()}
    layer = model.transformer_encoder[0]
    for inside in (layer.attn.qkv.weight, layer.ffn.linear2.weight):
        assert id(inside) in in_muon
    for outside in (model.embedding.weight, model.fc_out.weight, layer.attn.qkv.bias,
                    layer.norm1.weight, *model.ngram_embedding.parameters()):
        assert id(outside) not in in_muon
    in_adamw = {id(p) for group in adamw.param_groups for p in group["params"]}
    assert in_adamw | in_muon == {id(p) for p in model.parameters()}
    assert not in_adamw & in_muon
    trainer.train_step([trainer.train_dataset.__getitems__(range(4))])
    # One schedule drives both: at every step Muon's rate is the AdamW rate x 25.
    assert muon.param_groups[0]["lr"] == pytest.approx(adamw.param_groups[0]["lr"] * 25)


NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # torch.optim.Muon's


def direct_newton_schulz(update, steps):
    """The reference: the quintic iteration as torch's Muon writes it, in update's dtype."""
    a, b, c = NS_COEFFICIENTS
    tall = update.size(0) > update.size(1)
    x = update.T if tall else update
    x = x / x.norm()
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if tall else x


@pytest.mark.parametrize("shape, gram_form", [
    ((48, 16), True), ((16, 48), True), ((16, 64), True), ((16, 26), True),  # n > 1.5 m
    ((20, 30), False), ((24, 24), False), ((30, 20), False)])
def test_orthogonalize_is_the_newton_schulz_iteration_whichever_form_it_runs(
        shape, gram_form, monkeypatch):
    """Matrices more than 1.5 times as wide as tall (or the reverse) take the Gram-matrix
    form, the others the direct form: each must give what the direct quintic iteration
    (torch's Muon, in float64 here) gives."""
    calls = []
    real = trainer_module.gram_newton_schulz
    monkeypatch.setattr(trainer_module, "gram_newton_schulz",
                        lambda *args: calls.append(args[0].shape) or real(*args))
    update = torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape)))
    expected = direct_newton_schulz(update.double(), steps=5)
    result = trainer_module.orthogonalize(update, NS_COEFFICIENTS, 5, eps=1e-7)
    assert bool(calls) == gram_form
    assert result.dtype == update.dtype and result.shape == update.shape
    torch.testing.assert_close(result.double(), expected, atol=2e-5, rtol=1e-4)
    # and it does orthogonalize: the singular values end near 1 (the quintic leaves them
    # in about 0.7 .. 1.2 rather than exactly 1; five steps cannot lift the tiny last
    # singular value a random square matrix has, so one in ten may stay below)
    singular = torch.linalg.svdvals(result.double())
    assert (singular > 0.6).double().mean() >= 0.9 and singular.max() < 1.3


@pytest.mark.parametrize("steps", [0, 1, 2])
def test_orthogonalize_with_few_steps_matches_the_direct_form(steps):
    update = torch.randn(16, 64, generator=torch.Generator().manual_seed(steps))
    torch.testing.assert_close(trainer_module.orthogonalize(update, NS_COEFFICIENTS, steps, 1e-7),
                               direct_newton_schulz(update, steps), atol=2e-5, rtol=1e-4)


def test_wsd_warms_up_holds_then_decays_linearly_to_the_floor():
    schedule = LearningRateSchedule(schedule_config(scheduler_type="wsd", lr_decay_fraction=0.2),
                                    step_limit=100)
    rates = [schedule.learning_rate(s) for s in range(100)]
    assert rates[0] == pytest.approx(1e-4) and rates[9] == pytest.approx(1e-3)
    assert rates[10:80] == [pytest.approx(1e-3)] * 70  # stable until the last 20 steps
    assert rates[99] == pytest.approx(1e-5)  # the floor at the last step
    decay = np.diff(rates[79:])
    assert (decay < 0).all() and np.allclose(decay, decay[0])  # linear


# A parallel stream fed at spacelike patch ends, with local attention in the byte layers.
AT_ENDS_WINDOW = dict(use_parallel_stream_model=True, parallel_fusion="at_boundaries",
                      patch_boundaries="spacelike", agg_cnn_stride=5, attention_window=6)


@pytest.mark.parametrize("architecture", [{}, AT_ENDS_WINDOW, dict(AT_ENDS_WINDOW, **RECIPE_OPTIONS)],
                         ids=["single", "at-ends-window", "at-ends-window-recipe-options"])
def test_exact_resume_with_muon_and_wsd(tmp_path, architecture):
    recipe = dict(MODERN_RECIPE, transformer_dropout=0.1, gradient_accumulation_steps=2,
                  lr_scheduler_T_max=None, num_epochs=1, validate_and_checkpoint_best_every_batches=4,
                  **architecture)
    straight = real_trainer(tmp_path / "a", max_steps=12, **recipe)
    straight.train()
    first = real_trainer(tmp_path / "b", max_steps=12, **recipe)
    record_every_step(first, stop_at=7)  # interrupted, as by Ctrl-C: the same horizon
    assert first.train()["interrupted"]
    resumed = real_trainer(tmp_path / "b", max_steps=12, **recipe)
    resumed.resume(checkpoint_path(resumed.config, "latest"))
    resumed.train()
    a, b = straight.raw_model.state_dict(), resumed.raw_model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    muon_a, muon_b = straight.optimizers[1].state_dict(), resumed.optimizers[1].state_dict()
    assert all(torch.equal(muon_a["state"][k]["momentum_buffer"], muon_b["state"][k]["momentum_buffer"])
               for k in muon_a["state"])


def test_a_checkpoint_from_before_the_modern_keys_keeps_its_old_meaning(tmp_path):
    """A checkpoint saved without norm_type, qk_norm, ffn_activation, logit_softcap,
    parallel_fusion and the n-gram keys was a LayerNorm/GELU model without n-gram tables:
    rebuilt for generation it is one, and a resume under a config that says otherwise is
    refused naming the keys."""
    from main import load_model_for_prediction
    from model import LEGACY_ARCHITECTURE
    # Format 1 knew one optimizer: AdamW.
    old = real_trainer(tmp_path, max_steps=2, optimizer_type="AdamW", **LEGACY_ARCHITECTURE)
    old.train()
    path = checkpoint_path(old.config, "latest")
    state = torch.load(path, weights_only=True)
    for key in LEGACY_ARCHITECTURE:
        del state["config"][key]
    state["format_version"] = 1
    state["optimizer_state"] = state["optimizer_state"][0]  # format 1: one optimizer
    save_checkpoint(state, path)
    os.remove(checkpoint_path(old.config, "best"))
    modern = dict(old.config, norm_type="rmsnorm", ffn_activation="relu2", ngram_orders=[2, 3])
    model = load_model_for_prediction(modern, torch.device("cpu"))
    assert isinstance(model.final_norm, torch.nn.LayerNorm)
    assert model.ngram_embedding is None
    x = torch.randint(0, 256, (1, 8))
    assert torch.equal(model(x), old.raw_model.eval()(x))
    with pytest.raises(UserError, match="norm_type: checkpoint 'layernorm' vs config 'rmsnorm'"):
        real_trainer(tmp_path, **{k: v for k, v in modern.items()
                                  if k in ("norm_type", "ffn_activation")}).resume(path)
    same = real_trainer(tmp_path, max_steps=3, optimizer_type="AdamW", **LEGACY_ARCHITECTURE)
    same.resume(path)  # the old meaning, asked for explicitly: resumes
    assert same.train()["steps"] == 3


# -- what a resume keeps, changes and refuses -----------------------------------------

# The keys that deliberately do not shape training from a checkpoint on: where data and
# files live, what is logged, sampled or generated, and settings whose effect is over
# once the checkpoint's weights are loaded (initialisation).
NOT_TRAINING_KEYS = {
    "data_dir", "processed_data_dir", "checkpoint_dir", "model_name", "resume_from_checkpoint",
    "start_over", "generate_dummy_data_if_empty", "force_reprocess_data",
    "data_change_detection", "num_workers",
    # the text itself is the corpus fingerprint's business
    "file_separator", "utf8_error_policy",
    "zero_init_output_projections", "reset_best_val_loss_on_resume", "evaluation_stride",
    "final_validation_max_bytes",
    "print_every", "metrics_every", "test_every_batches", "interim_test_prompt",
    "interim_test_max_new_bytes", "interim_test_temperature", "interim_test_top_k",
    "checkpoint_every_batches", "save_epoch_snapshots", "keep_last_checkpoints",
    "generation_prompts", "generation_max_new_bytes", "generation_temperature",
    "generation_top_k", "generation_top_p", "generation_repetition_penalty",
    "generation_repetition_window", "generation_seed", "generation_valid_utf8_only",
    "use_kv_cache", "generation_compile", "generation_output_file",
    "enable_profiler", "profiler_log_dir", "profiler_schedule_wait", "profiler_schedule_warmup",
    "profiler_schedule_active", "profiler_schedule_repeat",
    # the same computation, run elsewhere or compiled
    "device", "use_torch_compile", "distributed_timeout_minutes",
}


def test_every_config_key_is_classified_as_architecture_training_or_neither():
    from config import CONFIG_V3
    from model import ARCHITECTURE_KEYS
    groups = [set(ARCHITECTURE_KEYS), set(trainer_module.TRAINING_KEYS), NOT_TRAINING_KEYS]
    assert sum(map(len, groups)) == len(set().union(*groups)), "a key in two groups"
    assert set().union(*groups) == set(CONFIG_V3), "classify the new key here"
    for key in ("batch_size", "gradient_accumulation_steps", "learning_rate", "seed",
                "lr_warmup_steps", "scheduler_type", "optimizer_type", "use_amp", "amp_dtype"):
        assert key in trainer_module.TRAINING_KEYS


def test_a_resume_with_other_training_settings_lists_every_difference(tmp_path, capsys):
    config = tiny(tmp_path, max_steps=6)
    make_trainer(config).train()
    exact = make_trainer(dict(config, max_steps=6))
    capsys.readouterr()
    exact.resume(checkpoint_path(config, "latest"))
    assert "continuation with changes" not in capsys.readouterr().out  # an exact resume

    changed = make_trainer(dict(config, batch_size=2, learning_rate=0.01, max_steps=9))
    changed.resume(checkpoint_path(config, "latest"))
    said = capsys.readouterr().out
    assert "a continuation with changes, not an exact resume: 3 training setting(s)" in said
    for line in ("batch_size: checkpoint 4 vs config 2",
                 f"learning_rate: checkpoint {config['learning_rate']!r} vs config 0.01",
                 "max_steps: checkpoint 6 vs config 9"):
        assert line in said
    # The checkpoint records every setting and the corpus it was trained on.
    state = load_checkpoint(checkpoint_path(config, "latest"))
    assert state["config"]["batch_size"] == 4 and state["corpus"]["bytes"] == len(byte_data())


def trainer_on(config, data):
    seed_everything(config["seed"])
    train_set, val_set = datasets(config, data)
    return Trainer(StandInModel(), train_set, val_set, config, torch.device("cpu"),
                   architecture_keys=ARCH_KEYS)


def test_a_resume_on_another_corpus_says_so_and_forgets_the_best_loss(tmp_path, capsys):
    config = tiny(tmp_path, max_steps=6)
    trainer_on(config, byte_data(seed=0)).train()
    same = trainer_on(config, byte_data(seed=0))
    same.resume(checkpoint_path(config, "latest"))
    assert math.isfinite(same.best_val_loss)
    capsys.readouterr()

    other = trainer_on(dict(config, max_steps=9), byte_data(seed=1))
    other.resume(checkpoint_path(config, "latest"))
    said = capsys.readouterr().out
    assert "the corpus differs from the one the checkpoint was trained on" in said
    assert "measured on other text: it is forgotten" in said
    assert other.best_val_loss == math.inf
    other.train()  # its first validation is the new best, measured on this text
    best = load_checkpoint(checkpoint_path(config, "best"))
    assert best["step"] > 6 and best["corpus"] == other.corpus


def test_another_validation_sample_forgets_the_best_loss(tmp_path, capsys):
    config = tiny(tmp_path, max_steps=6)
    make_trainer(config).train()
    resumed = make_trainer(dict(config, eval_max_batches=1))
    resumed.resume(checkpoint_path(config, "latest"))
    assert resumed.best_val_loss == math.inf
    assert "measured on another validation sample" in capsys.readouterr().out


def test_settings_the_schedule_cannot_follow_are_warned_about():
    def warnings(steps, **overrides):
        schedule = LearningRateSchedule(schedule_config(**overrides), steps)
        return " ".join(trainer_module.schedule_warnings(schedule))
    assert warnings(100) == ""
    assert "never reaches its peak and never decays" in warnings(5, lr_warmup_steps=10)
    assert "reaches only at the last step" in warnings(10, lr_warmup_steps=10)
    assert warnings(10, lr_warmup_steps=10, use_lr_warmup=False) == ""
    assert "begins inside the 10-step warmup" in warnings(
        20, scheduler_type="wsd", lr_decay_fraction=0.6)
    assert warnings(20, scheduler_type="wsd", lr_decay_fraction=0.4) == ""


def test_a_resume_reads_a_damaged_metrics_file(tmp_path, capsys):
    config = tiny(tmp_path, max_steps=6, metrics_every=1)
    make_trainer(config).train()
    with open(os.path.join(config["checkpoint_dir"], "metrics.csv"), "ab") as file:
        file.write(b"abc,x,\xff\xfe,,\n2,1,4.\xff5,,,0.001,100,1.0,\n5,1,3.0,,,0.0")
    resumed = make_trainer(dict(config, max_steps=8))
    resumed.resume(checkpoint_path(config, "latest"))
    resumed.train()
    assert "2 unreadable row(s)" in capsys.readouterr().out  # the garbled and the half row
    rows = metrics_rows(config)
    assert [int(r["step"]) for r in rows if r["train_loss"] and "\ufffd" not in r["train_loss"]] \
        == list(range(1, 9))


# -- a fresh run never overwrites a trained model -------------------------------------------

def test_a_fresh_run_refuses_a_folder_holding_a_trained_model_and_start_over_keeps_it(tmp_path):
    config = tiny(tmp_path, max_steps=3)
    make_trainer(config).train()
    folder = config["checkpoint_dir"]
    before = {name: open(os.path.join(folder, name), "rb").read()
              for name in os.listdir(folder) if name.endswith(".pth")}
    assert set(before) == {"grug_v3_best.pth", "grug_v3_latest.pth"}
    with pytest.raises(UserError) as caught:
        checkpoint_module.keep_trained_model(config, None)
    message = str(caught.value)
    for words in ("grug_v3_best.pth, grug_v3_latest.pth", "--resume_from_checkpoint=latest",
                  "--checkpoint_dir=", "--start_over=True", "not deleted"):
        assert words in message
    # A resume from this model's own files, or a folder without it, goes ahead.
    checkpoint_module.keep_trained_model(config, checkpoint_path(config, "best"))
    checkpoint_module.keep_trained_model(dict(config, model_name="other"), None)

    moved = []
    checkpoint_module.keep_trained_model(dict(config, start_over=True), None, moved.append)
    assert len(moved) == 2 and not checkpoint_module.model_files(config)
    for name, content in before.items():  # renamed, byte for byte, never deleted
        aside = [n for n in os.listdir(folder)
                 if n.startswith(name[:-4] + "_before_") and n.endswith(".pth")]
        assert len(aside) == 1
        assert open(os.path.join(folder, aside[0]), "rb").read() == content
