"""Trainer behaviour: schedule, exact resume, crash-safe checkpoints, guards, metrics.

Most tests use a stand-in model to show the Trainer is model-agnostic and to stay fast;
the precision test uses the real ByteLLM_GrugV3."""

import csv
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import checkpoint as checkpoint_module
import trainer as trainer_module
from checkpoint import checkpoint_path, load_checkpoint, save_checkpoint
from dataset import ByteSequenceDataset
from tests.conftest import make_tiny_config
from trainer import BatchOrder, LearningRateSchedule, Trainer, TrainingDiverged
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


def make_trainer(config, model=None, **kwargs):
    seed_everything(config["seed"])
    model = model or StandInModel()
    train_set, val_set = datasets(config)
    return Trainer(model, train_set, val_set, config, torch.device("cpu"),
                   architecture_keys=kwargs.pop("architecture_keys", ARCH_KEYS), **kwargs)


def tiny(tmp_path, **overrides):
    config = make_tiny_config(str(tmp_path), **overrides)
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


def test_a_time_budget_fixes_the_horizon_once_from_the_measured_step_time():
    schedule = LearningRateSchedule(schedule_config(), step_limit=10_000,
                                    time_budget_seconds=60)
    assert schedule.horizon() == 10_000  # until measured, the step limit stands in
    first, last = schedule.PROBE_STEPS
    for steps_run in range(1, last + 1):  # 0.1 s per step, after 0.5 s of start-up
        schedule.observe(steps_run, steps_run, 0.5 + 0.1 * steps_run)
    assert schedule.horizon() == last + int((60 - 0.5 - 0.1 * last) / 0.1)
    horizon = schedule.horizon()
    assert schedule.learning_rate(horizon - 1) == pytest.approx(1e-5)
    assert schedule.learning_rate(horizon // 2) > 1e-4
    schedule.observe(last + 1, last + 1, 1e6)  # the clock is never read again
    assert schedule.horizon() == horizon

    resumed = LearningRateSchedule(schedule_config(), 10_000, 60)
    resumed.load_state_dict(schedule.state_dict())
    assert [resumed.learning_rate(s) for s in range(0, horizon, 7)] == \
        [schedule.learning_rate(s) for s in range(0, horizon, 7)]
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


# -- data order ---------------------------------------------------------------

def one_epoch(order, epoch, first=0):
    """The micro-batches of `epoch` from micro-batch `first` on."""
    batches = order.micro_batches(epoch, first)
    return [next(batches) for _ in range(order.micro_batches_per_epoch - first)]


def test_two_ranks_see_the_same_windows_as_one_rank_with_twice_the_batch():
    single = one_epoch(BatchOrder(103, 8, 1, seed=1), epoch=2)
    rank0 = one_epoch(BatchOrder(103, 4, 1, seed=1, rank=0, world_size=2), epoch=2)
    rank1 = one_epoch(BatchOrder(103, 4, 1, seed=1, rank=1, world_size=2), epoch=2)
    assert len(single) == len(rank0) == len(rank1) == 12
    for big, a, b in zip(single, rank0, rank1):
        assert big == a + b and not set(a) & set(b)
    assert one_epoch(BatchOrder(103, 8, 1, 1), epoch=3) != single  # reshuffled every epoch


def test_sampler_resumes_mid_epoch():
    full = one_epoch(BatchOrder(50, 5, 1, seed=0), epoch=0)
    assert one_epoch(BatchOrder(50, 5, 1, seed=0), epoch=0, first=4) == full[4:]


# -- checkpoints and resume ---------------------------------------------------------

def test_exact_resume_matches_an_uninterrupted_run_bitwise(tmp_path):
    common = dict(lr_scheduler_T_max=20, gradient_accumulation_steps=2,
                  validate_and_checkpoint_best_every_batches=4)
    straight = tiny(tmp_path / "a", max_steps=14, **common)
    uninterrupted = make_trainer(straight)
    uninterrupted.train()

    first = tiny(tmp_path / "b", max_steps=9, **common)
    make_trainer(first).train()
    second = dict(first, max_steps=14, resume_from_checkpoint="latest")
    resumed = make_trainer(second)
    resumed.resume(checkpoint_path(second, "latest"))
    assert resumed.step == 9
    resumed.train()

    a, b = uninterrupted.raw_model.state_dict(), resumed.raw_model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # The test can fail: one step fewer gives different weights.
    short = make_trainer(tiny(tmp_path / "c", max_steps=13, **common))
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

def losses_of_a_short_run(tmp_path, **overrides):
    from model import ByteLLM_GrugV3
    config = make_tiny_config(str(tmp_path), max_steps=8, learning_rate=3e-3,
                              validate_and_checkpoint_best_every_batches=100, **overrides)
    seed_everything(0)
    trainer = make_trainer(config, model=ByteLLM_GrugV3(config), architecture_keys=())
    losses, original = [], trainer.train_step
    trainer.train_step = lambda micro: losses.append(original(micro)) or losses[-1]
    trainer.train()
    return np.array(losses)


def test_bf16_autocast_tracks_fp32_from_the_same_start(tmp_path):
    fp32 = losses_of_a_short_run(tmp_path / "fp32", use_amp=False)
    bf16 = losses_of_a_short_run(tmp_path / "bf16", use_amp=True, amp_dtype="bfloat16")
    assert fp32[-1] < fp32[0] - 0.3 and bf16[-1] < bf16[0] - 0.3  # both learn
    difference = np.abs(fp32 - bf16)
    assert difference.max() < 0.01, difference  # bf16 rounding (~1e-4), not a different model
    assert difference.max() > 0  # and autocast really ran in bf16


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
