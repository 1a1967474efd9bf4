"""GrugV3 entry point: config -> data -> model -> training -> generation.

    python3 main.py                        # the run configured in config.py
    python3 main.py --batch_size=32 ...    # override keys for this run
    python3 main.py --help                 # every key, its default and meaning
    python3 main.py --interactive          # prompt loop after training/loading
    torchrun --nproc_per_node=N main.py    # data-parallel training (README: Scaling out)
"""

import contextlib
import os
import sys

import torch

import config as config_module
from checkpoint import (KEYS_TO_GENERATE, CheckpointFolderLock, load_checkpoint,
                        path_to_generate_from, resolve_resume_path)
from dataset import ByteSequenceDataset, DataProcessor
from model import (ARCHITECTURE_KEYS, LEGACY_ARCHITECTURE, ByteLLM_GrugV3, count_parameters,
                   parameters_of, structure_problems)
from predictor import Predictor, interactive_loop
from trainer import Trainer, schedule_problems
from utils import (ConfigError, UserError, agree_across_ranks, apply_overrides,
                   available_memory_bytes,
                   config_comments, config_problems, remove_stale_temporaries,
                   resolve_amp_dtype, resolve_device, seed_everything, setup_distributed,
                   suggestion)

CROSS_KEY_RULES = (structure_problems, schedule_problems)
# The program's own options (not config keys): None = a bare switch.
SWITCHES = {"help": None, "interactive": None}


# ---------------------------------------------------------------------------
# Configuration

def check_config(config):
    """Every problem in a full config: unknown keys, then each key's rule (config.RULES),
    then the rules that tie keys together. Raises ConfigError, or returns `config`."""
    problems = [f"unknown key `{key}`{suggestion(key, config_module.RULES)}"
                for key in config if key not in config_module.RULES]
    problems += config_problems(config, config_module.RULES, cross_checks=CROSS_KEY_RULES)
    if problems:
        raise ConfigError(problems)
    return config


def help_text():
    """--help: every key with its default, what it accepts and its comment in config.py."""
    defaults, flags = config_module.CONFIG_V3, stage_flags()
    comments = config_comments(config_module.__file__, list(defaults) + list(flags))
    lines = ["usage: python3 main.py [--KEY=VALUE ...] [--interactive] [--help]", "",
             "Every key of CONFIG_V3 in config.py can be overridden for one run.",
             "  --interactive  after training (if any), open a prompt loop for generation", ""]
    for name, value in list(flags.items()) + list(defaults.items()):
        rule = config_module.RULES[name].describe() if name in config_module.RULES else "bool"
        lines.append(f"  --{name}={value!r}   ({rule})")
        if comments.get(name):
            lines.append(f"        {comments[name]}")
    return "\n".join(lines)


def stage_flags():
    return {"DO_TRAINING": config_module.DO_TRAINING,
            "DO_PREDICTION": config_module.DO_PREDICTION}


def load_run_config(argv):
    """CONFIG_V3 and the stage flags with command-line overrides applied and checked."""
    if "--help" in argv or "-h" in argv:
        print(help_text())
        sys.exit(0)
    config, flags, switches, problems = apply_overrides(
        argv, config_module.CONFIG_V3, stage_flags(), config_module.RULES, SWITCHES)
    try:
        check_config(config)
    except ConfigError as error:
        problems += error.problems
    if problems:
        raise ConfigError(problems)
    return config, flags, switches


TRAINING_BYTES_PER_PARAMETER = 16  # fp32 weights, gradients and two Adam moments


def check_model_fits(config, device):
    """A ConfigError, before any data is processed, for a model too big to train here."""
    parameters = parameters_of(config)
    needed, free = parameters * TRAINING_BYTES_PER_PARAMETER, available_memory_bytes(device)
    if free is not None and needed > free:
        raise ConfigError([f"the model would have {parameters:,} parameters, about "
                           f"{needed / 1e9:.1f} GB for its weights, gradients and optimizer "
                           f"state, but {device} has {free / 1e9:.1f} GB free: lower "
                           f"embedding_dim, attention_d_model or the number of layers"])


# ---------------------------------------------------------------------------
# Building and training

def make_sampler(model, device, config):
    """A function prompt -> text for the interim samples during training."""
    predictor = Predictor(model, device, config)

    def sample(prompt):
        return predictor.generate(prompt, max_new_bytes=config["interim_test_max_new_bytes"],
                                  temperature=config["interim_test_temperature"],
                                  top_k=config["interim_test_top_k"])
    return sample


def build_training(config, data, device, with_samples=False):
    """The Trainer of a freshly seeded model over the train/validation windows of `data`
    (1-D uint8): what main.py and bench.py both train."""
    split = dict(sequence_length=config["sequence_length"], stride=config["data_stride"],
                 val_split_ratio=config["val_split_ratio"])
    train_set = ByteSequenceDataset(data, split="train", **split)
    val_set = ByteSequenceDataset(data, split="val", **split)
    seed_everything(config["seed"])
    model = ByteLLM_GrugV3(config).to(device)
    sample_fn = make_sampler(model, device, config) if with_samples else None
    return Trainer(model, train_set, val_set, config, device, architecture_keys=ARCHITECTURE_KEYS,
                   sample_fn=sample_fn, legacy_architecture=LEGACY_ARCHITECTURE)


def print_header(config, device, data, trainer, context):
    amp = resolve_amp_dtype(config, device)
    kind = "parallel-stream" if config["use_parallel_stream_model"] else "single-stream"
    ranks = f", {context.world_size} ranks" if context.world_size > 1 else ""
    precision = "fp32" if amp is None else f"{str(amp).removeprefix('torch.')} autocast"
    train_set, val_set = trainer.train_dataset, trainer.val_dataset
    print(f"device: {device}{ranks} | precision: {precision} | threads: "
          f"{torch.get_num_threads()}")
    print(f"corpus: {len(data):,} bytes | train: {train_set.num_bytes:,} bytes "
          f"({len(train_set):,} windows) | validation: {val_set.num_bytes:,} bytes "
          f"({len(val_set):,} windows)")
    print(f"model: {kind}, {count_parameters(trainer.raw_model):,} parameters, window "
          f"{config['sequence_length']} bytes")


def together(context, work):
    """work() on this rank; if it raised a UserError here or on any other rank, every rank
    raises (a rank that stopped alone would leave the others waiting at a collective)."""
    error, result = None, None
    try:
        result = work()
    except UserError as raised:
        error = raised
    if agree_across_ranks([error is not None], "max", context.device)[0]:
        raise error or UserError(f"rank {context.rank} stops: another rank could not start "
                                 f"(its message says why)")
    return result


def start_on_rank0(config, locks):
    """Lock checkpoint_dir for the run, clear an interrupted run's temporaries, and build
    (or reuse) the processed data: rank 0's part, before the other ranks open the data."""
    folder = config["checkpoint_dir"]
    locks.enter_context(CheckpointFolderLock(folder))
    freed = remove_stale_temporaries(folder)
    if freed:
        print(f"removed {freed / 1e6:.1f} MB of temporary files left in {folder} by an "
              f"interrupted checkpoint write")
    first_run = config["data_dir"] == config_module.CONFIG_V3["data_dir"]
    return DataProcessor(config, create_missing_data_dir=first_run).prepare()


def run_training(config, device, context):
    """Train under a lock on checkpoint_dir (rank 0 holds it for the whole job)."""
    check_model_fits(config, device)
    with contextlib.ExitStack() as locks:
        built = together(context, lambda: start_on_rank0(config, locks) if context.is_main
                         else None)
        # Rank 0 has built the cache: the other ranks open it, never rebuild it.
        data = together(context, lambda: built if context.is_main else DataProcessor(
            {**config, "force_reprocess_data": False}).prepare())
        trainer = build_training(config, data, device, with_samples=context.is_main)
        if context.is_main:
            print_header(config, device, data, trainer, context)
        resume_path = resolve_resume_path(config)
        if resume_path:
            trainer.resume(resume_path)
        summary = trainer.train()
        # Every rank leaves training together: a rank that tears its process group
        # down while rank 0 is still writing the last checkpoint makes gloo abort.
        context.barrier()
    return summary


# ---------------------------------------------------------------------------
# Generation

def load_model_for_prediction(config, device):
    """The best checkpoint (else latest), rebuilt with its own architecture."""
    path = path_to_generate_from(config)
    state = load_checkpoint(path, required=KEYS_TO_GENERATE)
    saved = {**LEGACY_ARCHITECTURE, **state["config"]}  # old checkpoints keep their meaning
    architecture = {k: saved[k] for k in ARCHITECTURE_KEYS if k in saved}
    model = ByteLLM_GrugV3({**config, **architecture}).to(device)
    try:
        model.load_state_dict(state["model_state"])
    except RuntimeError as error:
        raise UserError(f"checkpoint {path} does not match its own recorded architecture: "
                        f"{error}") from None
    print(f"generating with {path} (step {state['step']})")
    return model.eval()


def run_prediction(config, device, interactive):
    model = load_model_for_prediction(config, device)
    predictor = Predictor(model, device, config)
    if interactive:
        interactive_loop(predictor, config)
        return
    output_path = os.path.join(config["checkpoint_dir"], config["generation_output_file"])
    os.makedirs(config["checkpoint_dir"], exist_ok=True)
    for prompt in config["generation_prompts"]:
        print(f"\n--- prompt: {prompt!r} ---")
        print(prompt, end="", flush=True)
        text = predictor.generate(prompt, on_text=lambda piece: print(piece, end="", flush=True))
        print()
        with open(output_path, "a", encoding="utf-8") as file:
            file.write(f"=== prompt: {prompt!r} | temperature {config['generation_temperature']}"
                       f" | top_k {config['generation_top_k']} | top_p "
                       f"{config['generation_top_p']} | seed {config['generation_seed']} ===\n"
                       f"{prompt}{text}\n\n")
    print(f"\nsamples appended to {output_path}")


# ---------------------------------------------------------------------------

def main(argv):
    config, flags, switches = load_run_config(argv)
    context = setup_distributed(config)
    try:
        seed_everything(config["seed"])
        device = context.device or resolve_device(config["device"])
        if flags["DO_TRAINING"]:
            summary = run_training(config, device, context)
            if summary["interrupted"]:
                return 130
        interactive = "interactive" in switches
        if (flags["DO_PREDICTION"] or interactive) and context.is_main:
            run_prediction(config, device, interactive)
        if not (flags["DO_TRAINING"] or flags["DO_PREDICTION"] or interactive):
            print("DO_TRAINING and DO_PREDICTION are both False: nothing to do.")
        return 0
    finally:
        context.close()


def cli():
    try:
        return main(sys.argv[1:])
    except ConfigError as error:
        print(f"error: {error}\nRun `python3 main.py --help` for every key.", file=sys.stderr)
        return 2
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(cli())
