"""GrugV3 entry point: config -> data -> model -> training -> generation.

    python3 main.py                        # the run configured in config.py
    python3 main.py --batch_size=32 ...    # override keys for this run
    python3 main.py --help                 # every key, its default and meaning
    python3 main.py --interactive          # prompt loop after training/loading
    python3 main.py --evaluate=PATH        # bits per byte of the trained model on a text
    python3 main.py --report               # report.html from checkpoint_dir/metrics.csv
    torchrun --nproc_per_node=N main.py    # data-parallel training (README: Scaling out)
"""

import contextlib
import hashlib
import json
import os
import sys

import torch

import utils

TORCH_PROBLEM = utils.torch_problem()  # checked before the modules that need it load
if TORCH_PROBLEM:
    sys.exit(f"error: {TORCH_PROBLEM}")

import config as config_module  # noqa: E402 (after the torch check)
from checkpoint import (KEYS_TO_GENERATE, CheckpointFolderLock, checkpoint_path,
                        keep_trained_model, load_checkpoint, path_to_generate_from,
                        resolve_resume_path)
from dataset import ByteSequenceDataset, DataProcessor, split_problems
from evaluate import SlidingPlan, breakdown_table, evaluation_problems, score_text
from model import (ARCHITECTURE_KEYS, LEGACY_ARCHITECTURE, ByteLLM_GrugV3, count_parameters,
                   parameters_of, structure_problems, structure_warnings)
from predictor import Predictor, interactive_loop
from report import write_report
from trainer import Trainer, optimizer_problems, schedule_problems, validate_final_model
from utils import (ConfigError, UserError, agree_across_ranks, apply_overrides, atomic_output,
                   available_memory_bytes,
                   config_comments, config_problems, remove_stale_temporaries,
                   resolve_amp_dtype, resolve_device, seed_everything, setup_distributed,
                   suggestion)

CROSS_KEY_RULES = (structure_problems, schedule_problems, optimizer_problems,
                   evaluation_problems, split_problems)
# The program's own options (not config keys): None = a bare switch.
SWITCHES = {"help": None, "interactive": None, "evaluate": "PATH", "json": "PATH",
            "report": None}


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
    lines = ["usage: python3 main.py [--KEY=VALUE ...] [--interactive] [--help]",
             "       python3 main.py --evaluate=PATH [--json=PATH] [--KEY=VALUE ...]",
             "       python3 main.py --report [--KEY=VALUE ...]", "",
             "Every key of CONFIG_V3 in config.py can be overridden for one run.",
             "  --interactive    after training (if any), open a prompt loop for generation",
             "  --evaluate=PATH  only evaluate the trained model (best, else latest) on PATH,",
             "                   a .txt file or a folder of them: bits per byte, per file",
             "  --json=PATH      with --evaluate: also write the figures to PATH as JSON",
             "  --report         only (re)write checkpoint_dir/report.html from metrics.csv",
             ""]
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
    if "json" in switches and "evaluate" not in switches:
        problems.append("`--json` writes the figures of --evaluate: add --evaluate=PATH")
    if problems:
        raise ConfigError(problems)
    return config, flags, switches


TRAINING_BYTES_PER_PARAMETER = 16  # fp32 weights, gradients and two Adam moments


def check_model_fits(config, device):
    """A ConfigError, before any data is processed, for a model too big to train here."""
    parameters = parameters_of(config)
    needed, free = parameters * TRAINING_BYTES_PER_PARAMETER, available_memory_bytes(device)
    if free is not None and needed > free:
        tables = len(config["ngram_orders"]) * config["ngram_buckets"] * config["embedding_dim"]
        lower = ("ngram_buckets (the n-gram tables hold most of them) or ngram_orders"
                 if 2 * tables > parameters else
                 "embedding_dim, attention_d_model or the number of layers")
        raise ConfigError([f"the model would have {parameters:,} parameters, about "
                           f"{needed / 1e9:.1f} GB for its weights, gradients and optimizer "
                           f"state, but {device} has {free / 1e9:.1f} GB free: lower {lower}"])


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


def build_training(config, data, device, with_samples=False, corpus=None):
    """The Trainer of a freshly seeded model over the train/validation windows of `data`
    (1-D uint8; `corpus`: its fingerprint, when known): what main.py and bench.py both
    train."""
    split = dict(sequence_length=config["sequence_length"], stride=config["data_stride"],
                 val_split_ratio=config["val_split_ratio"],
                 val_split_max_bytes=config["val_split_max_bytes"])
    train_set = ByteSequenceDataset(data, split="train", **split)
    val_set = ByteSequenceDataset(data, split="val", **split)
    seed_everything(config["seed"])
    model = ByteLLM_GrugV3(config).to(device)
    sample_fn = make_sampler(model, device, config) if with_samples else None
    return Trainer(model, train_set, val_set, config, device, architecture_keys=ARCHITECTURE_KEYS,
                   sample_fn=sample_fn, legacy_architecture=LEGACY_ARCHITECTURE, corpus=corpus)


def print_header(config, device, data, trainer, context):
    amp = trainer.amp_dtype  # decided once for the run, by rank 0
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


def clear_temporaries(folder):
    """Remove the temporary files an interrupted write left in `folder`, saying so."""
    freed = remove_stale_temporaries(folder)
    if freed:
        print(f"removed {freed / 1e6:.1f} MB of temporary files left in {folder} by an "
              f"interrupted write")


def start_on_rank0(config, locks):
    """Lock checkpoint_dir for the run, clear an interrupted run's temporaries, keep a
    trained model from being overwritten, and build (or reuse) the processed data: rank
    0's part, before the other ranks open the data. Returns open_corpus(config)."""
    folder = config["checkpoint_dir"]
    locks.enter_context(CheckpointFolderLock(folder))
    clear_temporaries(folder)
    keep_trained_model(config, resolve_resume_path(config))
    for warning in structure_warnings(config):
        print(f"warning: {warning}")
    first_run = config["data_dir"] == config_module.CONFIG_V3["data_dir"]
    return open_corpus(config, create_missing_data_dir=first_run)


def open_corpus(config, **options):
    """(the processed corpus as a 1-D uint8 memmap, its fingerprint): DataProcessor
    builds the cache if needed, and its manifest holds the fingerprint."""
    processor = DataProcessor(config, **options)
    return processor.prepare(), processor.manifest()["corpus"]


def run_training(config, device, context):
    """Train under a lock on checkpoint_dir (rank 0 holds it for the whole job)."""
    check_model_fits(config, device)
    with contextlib.ExitStack() as locks:
        built = together(context, lambda: start_on_rank0(config, locks) if context.is_main
                         else None)
        # Rank 0 has built the cache: the other ranks open it, never rebuild it.
        data, corpus = together(context, lambda: built if context.is_main else open_corpus(
            {**config, "force_reprocess_data": False}))
        trainer = build_training(config, data, device, with_samples=context.is_main,
                                 corpus=corpus)
        if context.is_main:
            print_header(config, device, data, trainer, context)
        resume_path = resolve_resume_path(config)
        if resume_path:
            trainer.resume(resume_path)
        summary = trainer.train()
        if not summary["interrupted"]:  # every rank agrees on this, and scores its share
            try:
                validate_final_model(trainer)
            except KeyboardInterrupt:  # the model is saved: stop here, as after training
                print("\nSIGINT received: the final validation is skipped; the checkpoints "
                      "are saved", file=sys.stderr)
                summary = {**summary, "interrupted": True}
        # Every rank leaves training together: a rank that tears its process group
        # down while rank 0 is still writing the last checkpoint makes gloo abort.
        context.barrier()
    return summary


def announce_report(run_config):
    """Write report.html and point to it; a report that cannot be written is a warning."""
    try:
        path = write_report(run_config)
    except (OSError, UserError) as error:
        print(f"warning: the training report could not be written ({error})")
        return
    print(f"report: {path} (open it in a browser; `python3 main.py --report` rewrites it)")


# ---------------------------------------------------------------------------
# Generation

def load_model_for_prediction(config, device, purpose="generating"):
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
    print(f"{purpose} with {path} (step {state['step']})")
    return model.eval()


def run_prediction(config, device, interactive):
    model = load_model_for_prediction(config, device)
    predictor = Predictor(model, device, config)
    if interactive:
        interactive_loop(predictor, config)
        return
    prompts, seed = config["generation_prompts"], config["generation_seed"]
    seeds = [None if seed is None else seed + i for i in range(len(prompts))]
    if sys.stdout.isatty():  # a person watches: stream each prompt's text as it comes
        texts = []
        for prompt, prompt_seed in zip(prompts, seeds):
            print(f"\n--- prompt: {prompt!r} ---\n{prompt}", end="", flush=True)
            texts.append(predictor.generate(prompt, seed=prompt_seed, on_text=lambda piece: print(
                piece, end="", flush=True)))
            print()
    else:  # a log file: decode every prompt at once (prompt i samples with seed + i)
        texts = predictor.generate_batch(prompts)
        for prompt, text in zip(prompts, texts):
            print(f"\n--- prompt: {prompt!r} ---\n{prompt}{text}")
    output_path = os.path.join(config["checkpoint_dir"], config["generation_output_file"])
    os.makedirs(config["checkpoint_dir"], exist_ok=True)
    with open(output_path, "a", encoding="utf-8") as file:
        for prompt, prompt_seed, text in zip(prompts, seeds, texts):
            file.write(f"=== prompt: {prompt!r} | temperature {config['generation_temperature']}"
                       f" | top_k {config['generation_top_k']} | top_p "
                       f"{config['generation_top_p']} | seed {prompt_seed} ===\n"
                       f"{prompt}{text}\n\n")
    print(f"\nsamples appended to {output_path}")


# ---------------------------------------------------------------------------
# Commands that run alone: --evaluate and --report

def evaluation_data(config, path):
    """The bytes of PATH (a .txt file or a folder of them) and their manifest, built as
    training data is (same separator, same UTF-8 policy) into a cache of their own under
    processed_data_dir, so the training cache is never touched."""
    if not os.path.exists(path):
        raise UserError(f"--evaluate={path}: no such file or folder")
    if not (os.path.isfile(path) or os.path.isdir(path)):
        raise UserError(f"--evaluate={path}: not a regular file (a pipe or a device?); give "
                        f"a .txt file or a folder of them")
    if os.path.isfile(path) and not path.lower().endswith(".txt"):
        raise UserError(f"--evaluate={path}: not a .txt file; give a .txt file or a folder")
    if os.path.isdir(path) and not any(name.lower().endswith(".txt")
                                       for _, _, names in os.walk(path) for name in names):
        raise UserError(f"--evaluate={path}: no .txt files in this folder")
    absolute = os.path.abspath(path)
    folder = (f"evaluate_{os.path.basename(absolute.rstrip(os.sep))}_"
              f"{hashlib.blake2b(absolute.encode(), digest_size=6).hexdigest()}")
    processor = DataProcessor({**config, "data_dir": path, "generate_dummy_data_if_empty": False,
                               "processed_data_dir": os.path.join(config["processed_data_dir"],
                                                                  folder)},
                              for_training=False)
    return processor.prepare(), processor.manifest()


def check_json_path(json_path):
    """--json=PATH: a UserError before any work when the figures could not be written
    there (they are written beside it first, then renamed: its folder must be writable)."""
    folder = os.path.dirname(os.path.abspath(json_path))
    if os.path.isdir(json_path):
        raise UserError(f"--json={json_path} is a folder: give a file path")
    if not os.path.isdir(folder):
        raise UserError(f"--json={json_path}: the folder {folder} does not exist; create it "
                        f"or choose another path")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UserError(f"--json={json_path}: the folder {folder} is not writable; choose "
                        f"another path")
    clear_temporaries(folder)


def evaluation_stride(config, model):
    """The stride of --evaluate, checked against the checkpoint's window (the config's
    sequence_length does not change a trained model)."""
    window = model.context_length
    stride = config["evaluation_stride"] or window
    if stride > window:
        raise UserError(f"evaluation_stride ({stride}) is longer than the checkpoint's window "
                        f"({window} bytes; the config's sequence_length does not change a "
                        f"trained model): bytes between windows would never be scored. Use "
                        f"--evaluation_stride={window} or less, or None (= the window)")
    return stride


def run_evaluation(config, device, path, json_path=None):
    """--evaluate=PATH: bits per byte of the trained model over every byte of PATH, per
    file (hardest first) and in total; --json=PATH writes the same figures."""
    if json_path:
        check_json_path(json_path)
    model = load_model_for_prediction(config, device, purpose="evaluating")
    stride = evaluation_stride(config, model)
    data, manifest = evaluation_data(config, path)
    plan = SlidingPlan(0, len(data), model.context_length, stride)
    if len(plan) == 0:
        raise UserError(f"--evaluate={path}: {len(data)} byte(s), nothing to predict")
    names, spans = zip(*sorted(manifest["spans"].items(), key=lambda item: item[1][0]))
    total, per_file = score_text(model, data, plan, device, resolve_amp_dtype(config, device),
                                 parts=spans, progress=True)
    files = sorted(zip(names, per_file), key=lambda item: (
        item[1].count == 0, -item[1].bits_per_byte if item[1].count else 0))
    window = (f"the checkpoint's window {plan.context_length}" if plan.context_length ==
              model.context_length else f"window {plan.context_length} (the text is shorter "
              f"than the checkpoint's window of {model.context_length})")
    source = ("evaluation_stride" if config["evaluation_stride"] else
              "= the window, as evaluation_stride is None")
    print(f"{path}: every byte but the first scored once, {len(names)} file(s), {window}, "
          f"stride {plan.stride} ({source}; {len(plan):,} windows)")
    print(breakdown_table(total, files))
    if json_path:
        figures = {"path": path, "checkpoint": path_to_generate_from(config, log=lambda _: None),
                   "context_length": plan.context_length, "stride": plan.stride,
                   "total": total.figures(),
                   "files": [{"file": name, **part.figures()} for name, part in files],
                   "utf8_error_policy": config["utf8_error_policy"],
                   "invalid_utf8": manifest.get("invalid_utf8", {}),
                   "skipped": manifest.get("skipped", [])}
        write_figures(figures, json_path)


def write_figures(figures, json_path):
    try:
        with atomic_output(json_path) as file:
            file.write(json.dumps(figures, indent=1, ensure_ascii=False).encode("utf-8"))
    except OSError as error:
        raise UserError(f"cannot write the figures to {json_path} ({error.strerror or error}); "
                        f"they are printed above") from None
    print(f"figures written to {json_path}")


def run_report(config):
    """--report: report.html from an existing metrics.csv, with the run's own config (its
    latest checkpoint's, else best's, else this one)."""
    clear_temporaries(config["checkpoint_dir"])
    run_config = config
    for kind in ("latest", "best"):
        if os.path.isfile(checkpoint_path(config, kind)):
            saved = load_checkpoint(checkpoint_path(config, kind), required=KEYS_TO_GENERATE)
            run_config = {**config, **saved["config"],
                          "checkpoint_dir": config["checkpoint_dir"]}  # where it is now
            break
    print(f"report: {write_report(run_config)}")


# ---------------------------------------------------------------------------

def main(argv):
    config, flags, switches = load_run_config(argv)
    context = setup_distributed(config)
    try:
        seed_everything(config["seed"])
        device = context.device or resolve_device(config["device"])
        if "evaluate" in switches or "report" in switches:  # commands: no training or generation
            if context.is_main:
                if "report" in switches:
                    run_report(config)
                if "evaluate" in switches:
                    run_evaluation(config, device, switches["evaluate"], switches.get("json"))
            return 0
        summary = run_training(config, device, context) if flags["DO_TRAINING"] else None
        interrupted = summary is not None and summary["interrupted"]
        interactive = "interactive" in switches
        try:
            if (flags["DO_PREDICTION"] or interactive) and context.is_main and not interrupted:
                run_prediction(config, device, interactive)
        finally:  # a stopped or failed generation stage leaves the run's report too
            if summary is not None and context.is_main:
                announce_report(config)  # after the generation stage: it shows the samples
        if not (flags["DO_TRAINING"] or flags["DO_PREDICTION"] or interactive):
            print("DO_TRAINING and DO_PREDICTION are both False: nothing to do.")
        return 130 if interrupted else 0
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
