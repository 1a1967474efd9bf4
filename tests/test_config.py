"""Config checking (config.RULES, main.check_config) and command-line overrides."""

import os
import subprocess
import sys

import pytest
import torch

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


def test_the_long_context_preset_in_config_docstring_is_the_measured_run():
    # The preset is bench's long-section run that won, with the long runs' 10 minutes.
    import ast
    import re
    import bench
    text = config_module.__doc__.split("Long context, for runs")[1].split('"""')[0]
    preset = {key: ast.literal_eval(value.strip()) for key, value in
              re.findall(r"(\w+)=([^,\n]+)", text)}
    measured = dict(bench.long_variants()["single-stream, window 256"])
    assert measured.pop("use_parallel_stream_model") == \
        config_module.CONFIG_V3["use_parallel_stream_model"]
    assert preset == {**measured, "max_train_minutes": 10}
    checked = check_config({**config_module.CONFIG_V3, **preset})
    assert all(checked[key] == value for key, value in preset.items())


# ---------------------------------------------------------------------------
# Key roles (config.KEY_ROLES): the lists derived from them hold exactly the keys that
# the code reading them reads

class ReadRecorder(dict):
    """A config that records which keys are read from it."""

    def __init__(self, config):
        super().__init__(config)
        self.read = set()

    def __getitem__(self, key):
        self.read.add(key)
        return super().__getitem__(key)

    def get(self, key, default=None):
        self.read.add(key)
        return super().get(key, default)


def test_every_role_is_declared_and_every_key_is_a_config_key():
    assert set(config_module.KEY_ROLES) <= set(DEFAULTS)
    for key, roles in config_module.KEY_ROLES.items():
        assert set(roles) <= set(config_module.ROLES), key
        assert len(set(roles)) == len(roles), key
    with pytest.raises(ValueError, match="no role 'modle'"):
        config_module.keys_with("modle")


def test_the_model_reads_exactly_its_model_keys(tmp_path, monkeypatch):
    import model as model_module
    from tests.conftest import make_tiny_config
    # The config check reads every key of the list it is given: leave it out of the record.
    monkeypatch.setattr(model_module, "model_config_problems", lambda config: [])
    read = set()
    for overrides in ({}, dict(use_cnn_frontend=True),
                      dict(use_parallel_stream_model=True, parallel_fusion="add_middle")):
        config = ReadRecorder(make_tiny_config(str(tmp_path), **overrides))
        model = model_module.ByteLLM_GrugV3(config)
        x = torch.randint(0, 256, (1, 8))
        model.train()(x, x)
        model.eval().forward_incremental(x, model.new_cache(1))
        read |= config.read
    assert read == set(model_module.MODEL_KEYS)


def test_the_data_processor_reads_exactly_its_data_keys(tmp_path, monkeypatch):
    import dataset
    from tests.conftest import make_tiny_config, write_text_corpus
    from utils import UserError
    monkeypatch.setattr(dataset, "config_problems", lambda *args: [])
    config = ReadRecorder(make_tiny_config(str(tmp_path), generate_dummy_data_if_empty=False))
    write_text_corpus(config["data_dir"], "some training text. " * 50)
    dataset.DataProcessor(config).prepare()
    write_text_corpus(config["data_dir"], "too short")
    with pytest.raises(UserError, match="not enough data"):
        dataset.DataProcessor(config).prepare()
    os.remove(os.path.join(config["data_dir"], "corpus.txt"))
    with pytest.raises(UserError, match="no .txt files"):
        dataset.DataProcessor(config).prepare()
    assert config.read == set(dataset.DATA_KEYS)


def test_architecture_keys_are_the_model_keys_that_shape_the_parameters_or_the_logits():
    """A model key left out of the architecture keys must change neither (a checkpoint
    loads whatever its value), and every architecture key added after the first
    checkpoints declares what those checkpoints meant by it (LEGACY_ARCHITECTURE)."""
    from model import ARCHITECTURE_KEYS, LEGACY_ARCHITECTURE, MODEL_KEYS, ByteLLM_GrugV3
    from tests.conftest import make_tiny_config
    assert set(ARCHITECTURE_KEYS) <= set(MODEL_KEYS)
    others = {"cnn_dropout": 0.5, "pe_dropout": 0.5, "transformer_dropout": 0.5,
              "output_dropout": 0.5, "training_objective": "last_byte",
              "zero_init_output_projections": True}
    assert set(MODEL_KEYS) - set(ARCHITECTURE_KEYS) == set(others)
    config = make_tiny_config(".", use_cnn_frontend=True)
    x = torch.randint(0, 256, (2, 8))
    torch.manual_seed(0)
    base = ByteLLM_GrugV3(config).eval()
    for key, value in others.items():
        changed = ByteLLM_GrugV3({**config, key: value}).eval()
        changed.load_state_dict(base.state_dict())  # the same shapes, or this raises
        assert torch.equal(changed(x), base(x)), key
    first = {"vocab_size", "sequence_length", "embedding_dim", "use_cnn_frontend",
             "cnn_out_channels_list", "cnn_kernel_sizes", "cnn_activation",
             "cnn_use_layernorm", "positional_encoding_type", "max_positional_encoding_len",
             "attention_d_model", "attention_num_heads", "ffn_dim_multiply",
             "transformer_norm_first", "num_attention_layers", "use_parallel_stream_model",
             "num_byte_stream_layers", "num_agg_stream_layers", "agg_cnn_kernel_size",
             "agg_cnn_stride", "agg_cnn_out_dim"}
    assert set(ARCHITECTURE_KEYS) - set(LEGACY_ARCHITECTURE) == first
    assert set(LEGACY_ARCHITECTURE) <= set(ARCHITECTURE_KEYS)


def test_generation_setting_keys_are_the_defaults_of_generate_arguments():
    import inspect

    from predictor import SETTING_KEYS, Predictor
    parameters = inspect.signature(Predictor.generate).parameters
    for name, key in SETTING_KEYS.items():
        assert key == f"generation_{name}" and key in DEFAULTS
        assert parameters[name].default is None, name
    assert set(parameters) - set(SETTING_KEYS) == {"self", "prompt", "on_text"}


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
