"""What the code decides from the machine: the torch it runs on, and the precision of a run.

The precision of amp_dtype="auto" comes from the CPU's flags (utils.cpu_has_bf16_units),
decided on rank 0, recorded in the checkpoint and kept on resume. These tests force each
answer of that decision, so both branches run on every machine, whatever it has."""

import os
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing

import trainer as trainer_module
import utils
from checkpoint import checkpoint_path, load_checkpoint
from tests.conftest import REPO_ROOT
from tests.test_trainer import real_trainer, record_every_step


def pretend_bf16_units(monkeypatch, present):
    """This process sees a CPU with (or without) bf16 units, wherever it runs."""
    monkeypatch.setattr(utils, "cpu_has_bf16_units", lambda: present)


# -- the torch floor ----------------------------------------------------------------------

@pytest.mark.parametrize("version", ["2.4.1+cpu", "2.8.0", "1.13.1", "nonsense"])
def test_a_torch_older_than_the_floor_is_named_with_the_floor(version):
    problem = utils.torch_problem(version)
    assert f"this is torch {version}" in problem and "torch 2.9 or newer" in problem


@pytest.mark.parametrize("version", ["2.9.0", "2.10.0a0+git1234", "2.13.0+cpu", "3.0.0"])
def test_a_torch_at_or_above_the_floor_passes(version):
    assert utils.torch_problem(version) is None


def test_a_torch_that_lacks_an_api_names_it(monkeypatch):
    monkeypatch.delattr(torch.optim, "Muon")
    problem = utils.torch_problem()
    assert "torch.optim.Muon" in problem and "torch 2.9+" in problem


def test_main_says_which_torch_it_needs_instead_of_failing_at_import():
    """Without the check, trainer.py's `class Muon(torch.optim.Muon)` raised an
    AttributeError before main.py could say anything, even for --help."""
    code = ("import sys, runpy, torch; del torch.optim.Muon; sys.argv = ['main.py', '--help'];"
            f"runpy.run_path({os.path.join(REPO_ROOT, 'main.py')!r}, run_name='__main__')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120, cwd=REPO_ROOT)
    assert result.returncode == 1
    assert "error: this torch" in result.stderr and "torch.optim.Muon" in result.stderr
    assert "Traceback" not in result.stderr


# -- the precision of a run ---------------------------------------------------------------

def test_the_cpu_flags_decide_bf16(tmp_path):
    detect = utils.cpu_has_bf16_units.__wrapped__  # without the per-process cache
    cpuinfo = tmp_path / "cpuinfo"
    for flags, expected in (("fpu avx2 fma", False), ("fpu avx512f avx512_bf16", True),
                            ("fpu amx_bf16 amx_tile", True), ("fpu avx512_bf16x", False)):
        cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
        assert detect(str(cpuinfo)) is expected, flags
    assert detect(str(tmp_path / "missing")) is False  # not Linux: fp32


@pytest.mark.parametrize("units", [True, False])
def test_auto_on_a_cpu_follows_its_bf16_units(monkeypatch, units):
    pretend_bf16_units(monkeypatch, units)
    cpu = torch.device("cpu")
    assert utils.resolve_amp_dtype({"use_amp": True, "amp_dtype": "auto"}, cpu) == (
        torch.bfloat16 if units else None)
    # what the config forces wins on either machine
    assert utils.resolve_amp_dtype({"use_amp": False, "amp_dtype": "auto"}, cpu) is None
    assert utils.resolve_amp_dtype({"use_amp": True, "amp_dtype": "bfloat16"}, cpu) == \
        torch.bfloat16


@pytest.mark.parametrize("units, use_amp, in_bf16", [
    (True, True, True), (False, True, False), (True, False, False), (False, False, False)])
def test_muon_orthogonalizes_in_the_precision_of_the_run(tmp_path, monkeypatch, units, use_amp,
                                                         in_bf16):
    """Muon's precision is no decision of its own: bf16 exactly when the run trains under
    bf16 autocast. An fp32 run (use_amp=False) orthogonalizes in fp32 on every machine."""
    pretend_bf16_units(monkeypatch, units)
    trainer = real_trainer(tmp_path, optimizer_type="Muon", use_amp=use_amp, amp_dtype="auto")
    assert trainer.optimizers[1].orthogonalize_in_bf16 is in_bf16
    assert trainer.amp_dtype == (torch.bfloat16 if in_bf16 else None)


def test_the_checkpoint_records_the_precision_of_the_run(tmp_path, monkeypatch):
    pretend_bf16_units(monkeypatch, True)
    trainer = real_trainer(tmp_path, max_steps=1, use_amp=True, amp_dtype="auto")
    trainer.train()
    assert load_checkpoint(checkpoint_path(trainer.config, "latest"))["precision"] == "bfloat16"


@pytest.mark.parametrize("first_machine_has_units", [True, False])
def test_a_resume_keeps_the_recorded_precision_and_stays_exact(tmp_path, monkeypatch, capsys,
                                                               first_machine_has_units):
    """A run started where "auto" picks one precision and resumed where it would pick the
    other (another machine; before, a busy one) continues in the recorded precision, and
    ends with the uninterrupted run's weights, bit for bit."""
    recipe = dict(use_amp=True, amp_dtype="auto", optimizer_type="Muon", max_steps=6,
                  transformer_dropout=0.1, validate_and_checkpoint_best_every_batches=3)
    pretend_bf16_units(monkeypatch, first_machine_has_units)
    straight = real_trainer(tmp_path / "a", **recipe)
    straight.train()
    first = real_trainer(tmp_path / "b", **recipe)
    record_every_step(first, stop_at=3)
    assert first.train()["interrupted"]

    pretend_bf16_units(monkeypatch, not first_machine_has_units)
    resumed = real_trainer(tmp_path / "b", **recipe)
    assert resumed.amp_dtype != straight.amp_dtype  # this machine alone would differ
    resumed.resume(checkpoint_path(resumed.config, "latest"))
    recorded = "bfloat16" if first_machine_has_units else "float32"
    assert f"precision: {recorded}, as recorded in" in capsys.readouterr().out
    assert resumed.amp_dtype == straight.amp_dtype
    assert resumed.optimizers[1].orthogonalize_in_bf16 is first_machine_has_units
    resumed.train()
    a, b = straight.raw_model.state_dict(), resumed.raw_model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_precision_set_explicitly_on_resume_wins_and_is_said(tmp_path, monkeypatch, capsys):
    pretend_bf16_units(monkeypatch, True)
    first = real_trainer(tmp_path, max_steps=2, use_amp=True, amp_dtype="auto")
    first.train()
    resumed = real_trainer(tmp_path, max_steps=3, use_amp=False)
    resumed.resume(checkpoint_path(resumed.config, "latest"))
    assert resumed.amp_dtype is None and not resumed.optimizers[1].orthogonalize_in_bf16
    assert "was trained in bfloat16; this run continues in float32" in capsys.readouterr().out


# -- every rank takes rank 0's decision -----------------------------------------------------

def _decide_on_a_rank(rank, init_file, rank0_has_units, results):
    """One process of a 2-rank gloo job, whose CPU answers unlike the other rank's."""
    utils.cpu_has_bf16_units = lambda: rank0_has_units if rank == 0 else not rank0_has_units
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                                         world_size=2)
    try:
        dtype = utils.run_precision({"use_amp": True, "amp_dtype": "auto"}, torch.device("cpu"))
        results[rank] = utils.precision_name(dtype)
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.parametrize("rank0_has_units", [True, False])
def test_ranks_that_would_decide_differently_take_rank_0s_precision(tmp_path, rank0_has_units):
    results = torch.multiprocessing.Manager().dict()
    torch.multiprocessing.spawn(_decide_on_a_rank, nprocs=2, args=(
        str(tmp_path / "rendezvous"), rank0_has_units, results))
    expected = "bfloat16" if rank0_has_units else "float32"
    assert dict(results) == {0: expected, 1: expected}


def test_the_trainer_decides_through_run_precision(monkeypatch, tmp_path):
    """The Trainer's precision is run_precision's, so the rank test above covers it."""
    monkeypatch.setattr(trainer_module, "run_precision", lambda config, device: torch.float16)
    assert real_trainer(tmp_path).amp_dtype == torch.float16
