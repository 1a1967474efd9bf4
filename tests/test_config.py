"""Config checking (config.RULES, main.check_config) and command-line overrides."""

import os
import subprocess
import sys

import pytest

import config as config_module
from main import SWITCHES, check_config, help_text
from utils import ConfigError, apply_overrides

DEFAULTS = config_module.CONFIG_V3
FLAGS = {"DO_TRAINING": True, "DO_PREDICTION": True}
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def problems_of(**changes):
    config = {**DEFAULTS, **changes}
    with pytest.raises(ConfigError) as caught:
        check_config(config)
    return caught.value.problems


def test_defaults_are_valid():
    assert check_config(dict(DEFAULTS)) == DEFAULTS


def test_every_key_has_a_comment_in_config_py():
    text = help_text()
    for key in DEFAULTS:
        line_after = text.split(f"--{key}=", 1)[1].splitlines()[1]
        assert not line_after.strip().startswith("--"), f"`{key}` has no comment"


def test_unknown_key_suggests_the_nearest_name():
    config = dict(DEFAULTS)
    config["batch_sise"] = config.pop("batch_size")
    with pytest.raises(ConfigError) as caught:
        check_config(config)
    text = str(caught.value)
    assert "unknown key `batch_sise`; did you mean `batch_size`?" in text
    assert "missing key `batch_size`" in text


def test_wrong_types_are_named():
    problems = problems_of(learning_rate="fast", use_amp=1, cnn_kernel_sizes=[3.5])
    assert any("`learning_rate` must be float, got str" in p for p in problems)
    assert any("`use_amp` must be bool, got int" in p for p in problems)
    assert any("`cnn_kernel_sizes` must be a list of int" in p for p in problems)


def test_int_is_accepted_where_a_float_is_expected():
    check_config({**DEFAULTS, "learning_rate": 1})


def test_ranges_and_choices():
    problems = problems_of(val_split_ratio=1.0, batch_size=0, transformer_dropout=1.5,
                           scheduler_type="cosine")
    assert any("`val_split_ratio` = 1.0 is out of range: must be in (0, 1)" in p for p in problems)
    assert any("`batch_size` = 0 is out of range" in p for p in problems)
    assert any("`transformer_dropout`" in p for p in problems)
    assert any("`scheduler_type` = 'cosine' is not one of" in p for p in problems)


def test_inconsistencies_are_all_reported_at_once():
    problems = problems_of(attention_num_heads=3, attention_d_model=128,
                           use_parallel_stream_model=True, agg_cnn_out_dim=100,
                           cnn_kernel_sizes=[3, 5],
                           sequence_length=2, agg_cnn_stride=4)
    text = "\n".join(problems)
    assert "`attention_num_heads` (3) must divide `attention_d_model` (128)" in text
    assert "`attention_num_heads` (3) must divide `agg_cnn_out_dim` (100)" in text
    assert "`cnn_kernel_sizes` has 2 entries but `cnn_out_channels_list` has 1" in text
    assert "`sequence_length` (2) must be at least `agg_cnn_stride` (4)" in text
    assert len(problems) == 4


def test_none_only_where_allowed():
    check_config({**DEFAULTS, "max_steps": None, "resume_from_checkpoint": None})
    assert any("`batch_size` must not be None" in p for p in problems_of(batch_size=None))


def test_overrides_are_parsed_with_the_default_type():
    config, flags, switches, problems = apply_overrides(
        ["--batch_size=32", "--use_parallel_stream_model=True", "--DO_PREDICTION=False",
         "--learning_rate", "3e-4", "--cnn_kernel_sizes=[3,4]", "--model_name=run 2",
         "--max_steps=None", "--resume_from_checkpoint=latest", "--interactive"],
        DEFAULTS, FLAGS, config_module.RULES, SWITCHES)
    assert config["batch_size"] == 32 and config["use_parallel_stream_model"] is True
    assert config["learning_rate"] == 3e-4 and config["cnn_kernel_sizes"] == [3, 4]
    assert config["model_name"] == "run 2" and config["max_steps"] is None
    assert config["resume_from_checkpoint"] == "latest"
    assert flags == {"DO_TRAINING": True, "DO_PREDICTION": False}
    assert set(switches) == {"interactive"} and problems == []
    assert DEFAULTS["batch_size"] != 32  # the defaults themselves are untouched


def test_bad_overrides_are_reported_together():
    _, _, _, problems = apply_overrides(
        ["--batch_sizee=3", "--use_amp=maybe", "--batch_size=abc", "stray"], DEFAULTS, FLAGS,
        config_module.RULES, SWITCHES)
    text = "\n".join(problems)
    assert "unknown option `--batch_sizee`; did you mean `batch_size`?" in text
    assert "`--use_amp` expects True or False, got 'maybe'" in text
    assert "`--batch_size` expects an int, got 'abc'" in text
    assert "unexpected argument 'stray'" in text


def test_override_of_wrong_type_is_caught_by_validation():
    config, _, _, _ = apply_overrides(["--batch_size=2.5"], DEFAULTS, FLAGS, config_module.RULES,
                                      SWITCHES)
    with pytest.raises(ConfigError, match="`batch_size` must be int, got float"):
        check_config(config)


def run_main(*args):
    return subprocess.run([sys.executable, "main.py", *args], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120)


def test_main_help_lists_every_key():
    result = run_main("--help")
    assert result.returncode == 0
    for key in list(DEFAULTS) + list(FLAGS):
        assert f"--{key}=" in result.stdout


def test_main_reports_config_errors_without_traceback():
    result = run_main("--batch_sise=3", "--attention_num_heads=7")
    assert result.returncode == 2
    assert "did you mean `batch_size`?" in result.stderr
    assert "`attention_num_heads` (7) must divide `attention_d_model`" in result.stderr
    assert "Traceback" not in result.stderr


# ---------------------------------------------------------------------------
# One declaration per key

def test_every_key_has_exactly_one_rule():
    assert list(config_module.RULES) == list(DEFAULTS)


def test_help_shows_what_each_key_accepts():
    text = help_text()
    assert "--batch_size=16   (int in [1, inf])" in text
    assert "--cnn_activation='gelu'   (one of 'gelu', 'relu')" in text
    assert "--max_steps=" in text and "(None or int in [1, inf])" in text


def test_utils_imports_nothing_from_the_project():
    import ast
    project = {os.path.splitext(name)[0] for name in os.listdir(REPO_ROOT)
               if name.endswith(".py")}
    tree = ast.parse(open(os.path.join(REPO_ROOT, "utils.py")).read())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree)
                if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) and node.module}
    assert not imported & project


def test_values_that_used_to_reach_a_traceback_are_config_errors(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    problems = "\n".join(problems_of(device="tpu", seed=99999999999999999999,
                                     checkpoint_dir=str(a_file)))
    assert "`device` = 'tpu' is not one of" in problems
    assert "`seed` = 99999999999999999999 is out of range" in problems
    assert "is a file, not a folder" in problems
    assert "`device` = 'cuda:abc'" in "\n".join(problems_of(device="cuda:abc"))
    check_config({**DEFAULTS, "device": "cuda:1", "distributed_timeout_minutes": 0.25,
                  "amp_dtype": "float16"})  # well-formed; float16 autocast works on CPUs too


def test_a_model_too_big_for_memory_is_a_config_error():
    import main
    import torch
    with pytest.raises(ConfigError, match=r"would have [\d,]+ parameters, about [\d.]+ GB"):
        main.check_model_fits({**DEFAULTS, "embedding_dim": 100_000_000}, torch.device("cpu"))
    main.check_model_fits(dict(DEFAULTS), torch.device("cpu"))


def test_the_gpu_preset_in_config_docstring_is_a_valid_config():
    # The preset a user copies from config.py's docstring must pass the config check.
    import ast
    import re
    text = config_module.__doc__.split("Scaling up for a GPU")[1].split("Several GPUs")[0]
    preset = {key: ast.literal_eval(value.strip()) for key, value in
              re.findall(r"(\w+)=([^,\n]+)", text)}
    assert len(preset) >= 10 and "muon_learning_rate" in preset
    checked = check_config({**config_module.CONFIG_V3, **preset})
    assert all(checked[key] == value for key, value in preset.items())


def test_messages_name_the_real_rule_and_the_real_cause(monkeypatch):
    import main
    import torch
    assert problems_of(ngram_orders=[1]) == [
        "every item of `ngram_orders` must be >= 2, got [1]"]
    monkeypatch.setattr(main, "available_memory_bytes", lambda device: 8e9)
    with pytest.raises(ConfigError, match="lower ngram_buckets") as caught:
        main.check_model_fits({**DEFAULTS, "ngram_buckets": 2**31}, torch.device("cpu"))
    assert "embedding_dim" not in str(caught.value)
    with pytest.raises(ConfigError, match="lower embedding_dim"):
        main.check_model_fits({**DEFAULTS, "num_attention_layers": 3000}, torch.device("cpu"))


def test_model_settings_that_cannot_do_their_job_are_warned_about():
    from model import structure_warnings
    assert structure_warnings(dict(DEFAULTS)) == []
    said = " ".join(structure_warnings({**DEFAULTS, "sequence_length": 4}))
    assert "`ngram_orders` [5, 6] are longer than the window" in said
    assert "every n-gram in the same row" in " ".join(
        structure_warnings({**DEFAULTS, "ngram_buckets": 1}))
    assert structure_warnings({**DEFAULTS, "ngram_buckets": 1, "ngram_orders": []}) == []


def test_start_over_is_a_flag_that_refuses_by_default():
    assert DEFAULTS["start_over"] is False
    assert problems_of(start_over="yes") == ["`start_over` must be bool, got str ('yes')"]
