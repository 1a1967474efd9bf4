"""GrugV3 entry point: config -> data -> model -> training -> generation.

    python3 main.py                        # the run configured in config.py
    python3 main.py --batch_size=32 ...    # override keys for this run
    python3 main.py --help                 # every key, its default and meaning
    python3 main.py --interactive          # prompt loop after training/loading
    torchrun --nproc_per_node=N main.py    # data-parallel training (README: Scaling out)
"""

import os
import sys

import torch

import config as config_module
from dataset import ByteSequenceDataset, DataProcessor
from model import ARCHITECTURE_KEYS, ByteLLM_GrugV3, count_parameters
from predictor import Predictor, interactive_loop
from trainer import Trainer, checkpoint_path, load_checkpoint, resolve_resume_path
from utils import (ConfigError, UserError, apply_overrides, config_help, config_problems,
                   resolve_amp_dtype, resolve_device, seed_everything, setup_distributed)


def load_run_config(argv):
    """CONFIG_V3 and the stage flags with command-line overrides applied and checked."""
    flags = {"DO_TRAINING": config_module.DO_TRAINING,
             "DO_PREDICTION": config_module.DO_PREDICTION}
    defaults = config_module.CONFIG_V3
    if "--help" in argv or "-h" in argv:
        print(config_help(config_module.__file__, defaults, flags))
        sys.exit(0)
    config, flags, switches, problems = apply_overrides(argv, defaults, flags)
    problems += config_problems(config, defaults)
    if problems:
        raise ConfigError(problems)
    return config, flags, switches


def prepare_data(config, context):
    """Rank 0 builds (or reuses) the processed array while the other ranks wait."""
    if context.is_main:
        data = DataProcessor(config).prepare()
    context.barrier()
    if not context.is_main:
        # Rank 0 just built the cache: open it, never rebuild it a second time.
        data = DataProcessor({**config, "force_reprocess_data": False}).prepare()
    split = dict(sequence_length=config["sequence_length"], stride=config["data_stride"],
                 val_split_ratio=config["val_split_ratio"])
    return (data, ByteSequenceDataset(data, split="train", **split),
            ByteSequenceDataset(data, split="val", **split))


def print_header(config, device, data, train_set, val_set, model, context):
    amp = resolve_amp_dtype(config, device)
    kind = "parallel-stream" if config["use_parallel_stream_model"] else "single-stream"
    ranks = f", {context.world_size} ranks" if context.world_size > 1 else ""
    precision = "fp32" if amp is None else f"{str(amp).removeprefix('torch.')} autocast"
    print(f"device: {device}{ranks} | precision: {precision} | threads: "
          f"{torch.get_num_threads()}")
    print(f"corpus: {len(data):,} bytes | train: {train_set.num_bytes:,} bytes "
          f"({len(train_set):,} windows) | validation: {val_set.num_bytes:,} bytes "
          f"({len(val_set):,} windows)")
    print(f"model: {kind}, {count_parameters(model):,} parameters, window "
          f"{config['sequence_length']} bytes")


def make_sampler(model, device, config):
    """A function prompt -> text for the interim samples during training."""
    predictor = Predictor(model, device, config)

    def sample(prompt):
        return predictor.generate(prompt, max_new_bytes=config["interim_test_max_new_bytes"],
                                  temperature=config["interim_test_temperature"],
                                  top_k=config["interim_test_top_k"])
    return sample


def run_training(config, device, train_set, val_set, model, context):
    trainer = Trainer(model, train_set, val_set, config, device,
                      architecture_keys=ARCHITECTURE_KEYS,
                      sample_fn=make_sampler(model, device, config) if context.is_main else None)
    resume_path = resolve_resume_path(config)
    if resume_path:
        trainer.resume(resume_path)
    return trainer.train()


def load_model_for_prediction(config, device):
    """The best checkpoint (else latest), rebuilt with its own architecture."""
    best, latest = checkpoint_path(config, "best"), checkpoint_path(config, "latest")
    if os.path.isfile(best):
        path = best
    elif os.path.isfile(latest):
        print(f"no best checkpoint at {best}; using {latest}")
        path = latest
    else:
        raise UserError(f"no checkpoint to generate from: neither {best} nor {latest} exists. "
                        f"Train first (DO_TRAINING=True) or point checkpoint_dir/model_name "
                        f"at a trained model.")
    state = load_checkpoint(path)
    architecture = {k: state["config"][k] for k in ARCHITECTURE_KEYS if k in state["config"]}
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


def main(argv):
    config, flags, switches = load_run_config(argv)
    context = setup_distributed(config)
    try:
        seed_everything(config["seed"])
        device = context.device or resolve_device(config["device"])
        if flags["DO_TRAINING"]:
            data, train_set, val_set = prepare_data(config, context)
            model = ByteLLM_GrugV3(config).to(device)
            if context.is_main:
                print_header(config, device, data, train_set, val_set, model, context)
            summary = run_training(config, device, train_set, val_set, model, context)
            # Every rank leaves training together: a rank that tears its process group
            # down while rank 0 is still writing the last checkpoint makes gloo abort.
            context.barrier()
            if summary["interrupted"]:
                return 130
        if (flags["DO_PREDICTION"] or "interactive" in switches) and context.is_main:
            run_prediction(config, device, "interactive" in switches)
        if not (flags["DO_TRAINING"] or flags["DO_PREDICTION"] or "interactive" in switches):
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
