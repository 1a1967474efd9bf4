"""GrugV3 configuration: edit the values below, then run `python3 main.py`.

Any key can also be overridden for one run from the command line, e.g.
    python3 main.py --batch_size=32 --use_parallel_stream_model=True --DO_PREDICTION=False
`python3 main.py --help` lists every key with its default and comment.

The defaults train a small model (7.25M parameters, 6.55M of them in the hashed n-gram
tables, which cost lookups, not matrix work) on a 2-core laptop CPU in three minutes: they
are the best 100-second recipe bench.py found on tiny Shakespeare (docs/benchmarks.md):
Muon for the layer matrices, rotary positions, QK-norm, hashed 2-6-byte embeddings,
2 layers of width 160.

More learned per run, at a price (docs/benchmarks.md, Recipe candidates): three options
of small-model recipes gained about 0.01 bits per byte in 100 s on Shakespeare and on
Python sources, and make uncompiled generation about a tenth slower; larger n-gram
tables gained 0.007 on Shakespeare and 0.019 on Python sources, for checkpoints four
times the size (324 MB instead of 85). Together they gained 0.010 and 0.042:
    smear_previous_byte=True, embeddings_into_every_layer=True, value_embeddings=True,
    ngram_buckets=32768, sparse_table_updates=True

Scaling up for a GPU (one card with 8+ GB): a config edit, nothing else. The same recipe,
wider and deeper, with larger n-gram tables for the many more bytes a GPU reads. It
trained stably on an H200, but a model this size learns 1 MB of text by heart after one
epoch (docs/benchmarks.md, The GPU preset): give it more text than that:
    batch_size=64, sequence_length=256, embedding_dim=384, attention_d_model=384,
    attention_num_heads=6, num_attention_layers=6, agg_cnn_out_dim=384,
    transformer_dropout=0.1, ngram_buckets=32768,
    learning_rate=1e-3, muon_learning_rate=0.02, lr_warmup_steps=200,
    max_steps=5000, max_train_minutes=None, eval_max_batches=50,
    amp_dtype="auto", use_torch_compile=True, generation_compile="always"
Several GPUs or machines: see "Scaling out" in README.md (torchrun, no edit needed).

Long context, for runs of 10 minutes or more on a large corpus (100 MB and up): a window
of 256 bytes, 4 windows a step (the same 1,024 bytes a step as the defaults). On the Linux
sources it beat the defaults by far after 10 minutes on a 2-core CPU, and lost to them
after 90 s: a longer window needs more steps before its context pays (docs/benchmarks.md,
Long context):
    sequence_length=256, data_stride=256, batch_size=4, max_train_minutes=10

Below CONFIG_V3, RULES declares what each key accepts (type, range, choices, None or
not): the config check, the command-line parser and --help all read it.
"""

import os

from model_components import ACTIVATIONS, NORMS, POSITIONAL_ENCODINGS
from utils import device_problem, flag, integer, list_of, one_of, real, text

DO_TRAINING = True  # run the training stage
DO_PREDICTION = True  # run the generation stage after training (loads the best checkpoint)

CONFIG_V3 = {
    # --- paths and data ---
    "data_dir": "./dataset/USE",  # folder searched recursively for .txt training files
    "processed_data_dir": "./dataset/USE_processed",  # where the processed byte array is cached
    "checkpoint_dir": "./checkpoints_grug_v3",  # checkpoints, metrics.csv and samples go here
    "model_name": "grug_v3",  # prefix of checkpoint files: {model_name}_best.pth, _latest.pth
    "resume_from_checkpoint": None,  # None = fresh start; "latest", "best", or a .pth path
    "start_over": False,  # True: a fresh run moves this model's existing checkpoints aside (False: refuse)
    "generate_dummy_data_if_empty": True,  # write a generated demo corpus when data_dir has no .txt
    "force_reprocess_data": False,  # rebuild the processed array even if the cache is current
    "data_change_detection": "size_and_mtime",  # notice edits by "size_and_mtime" | "content" (hash)
    "file_separator": "\n\n",  # text inserted between consecutive files (UTF-8)
    "utf8_error_policy": "replace",  # invalid UTF-8 in a file: "replace" | "skip" | "error" | "keep"
    "sequence_length": 64,  # bytes per training window (the model's context), bytes
    "data_stride": 64,  # bytes between the starts of consecutive training windows
    "val_split_ratio": 0.1,  # fraction of the byte stream (the end) held out for validation
    "val_split_max_bytes": 100_000_000,  # ...but at most this many bytes (None = no cap)
    "batch_size": 16,  # windows per optimizer micro-step
    "num_workers": 0,  # DataLoader worker processes (0 = load in the main process)
    "vocab_size": 256,  # byte vocabulary; fixed at 256

    # --- model ---
    "embedding_dim": 160,  # width of the byte embedding
    "ngram_orders": [2, 3, 4, 5, 6],  # add hashed embeddings of the last n bytes, each n ([] = off)
    "ngram_buckets": 8192,  # rows of each n-gram's hash table (more: fewer collisions, more memory)
    "use_cnn_frontend": False,  # causal 1-D convolutions over the embeddings before attention
    "cnn_out_channels_list": [160],  # output channels of each frontend convolution
    "cnn_kernel_sizes": [3],  # kernel size of each frontend convolution, bytes
    "cnn_activation": "gelu",  # frontend activation: "gelu" | "relu"
    "cnn_dropout": 0.0,  # dropout after each frontend convolution, probability
    "cnn_use_layernorm": True,  # LayerNorm over channels after each frontend convolution
    "positional_encoding_type": "rotary",  # "rotary" (RoPE) | "sinusoidal" | "learnable" (added)
    "max_positional_encoding_len": 1024,  # positions in the encoding table (learnable: hard limit)
    "pe_dropout": 0.0,  # dropout after adding positional encodings, probability
    "attention_d_model": 160,  # width of the transformer layers
    "attention_num_heads": 4,  # attention heads per layer; must divide attention_d_model
    "ffn_dim_multiply": 4,  # feed-forward width = ffn_dim_multiply * attention_d_model
    "transformer_dropout": 0.0,  # dropout inside attention and feed-forward, probability
    "transformer_norm_first": True,  # pre-norm layers (True) or post-norm (False)
    "norm_type": "layernorm",  # norms of the transformer: "layernorm" | "rmsnorm"
    "qk_norm": True,  # normalise queries and keys per head before attention (with norm_type)
    "attention_window": None,  # byte layers attend to at most this many bytes back (None = all)
    "ffn_activation": "gelu",  # feed-forward: "gelu" | "relu2" (ReLU squared) | "swiglu"
    "zero_init_output_projections": False,  # start attention/FFN output projections at zero
    "logit_softcap": 0.0,  # cap logits smoothly at ±this (tanh); 0 = off
    "smear_previous_byte": False,  # add a learned, gated share of the previous byte's input
    "embeddings_into_every_layer": False,  # re-add the input embedding before each byte layer (learned scales)
    "value_embeddings": False,  # each byte layer adds a learned vector of the byte to its values
    "output_dropout": 0.0,  # dropout before the output projection, probability
    "num_attention_layers": 2,  # transformer layers of the single-stream model
    "training_objective": "all_positions",  # loss over "all_positions" or only the "last_byte"

    # --- parallel stream (a strided-CNN "aggregated" stream beside the byte stream) ---
    "use_parallel_stream_model": False,  # True = byte stream + aggregated stream
    "parallel_fusion": "concat_output",  # where patch states meet bytes: "concat_output" |
                                         # "add_input" | "add_middle" (of the byte stream) |
                                         # "at_boundaries" (SpaceByte: fed from and back
                                         # into the bytes that end patches, mid-stream)
    "patch_boundaries": "fixed",  # "at_boundaries" patches: "fixed" (every agg_cnn_stride
                                  # bytes) | "spacelike" (after words, at most agg_cnn_stride)
    "max_patches_per_window": None,  # "at_boundaries": patches a window takes, later ends
                                     # ignored (None: all; fewer = a cheaper patch stream)
    "num_byte_stream_layers": 2,  # transformer layers of the byte stream
    "num_agg_stream_layers": 1,  # transformer layers of the aggregated (patch) stream
    "agg_cnn_kernel_size": 8,  # aggregator convolution kernel, bytes
    "agg_cnn_stride": 4,  # bytes per patch of the aggregated stream (spacelike: at most)
    "agg_cnn_out_dim": 160,  # width of the aggregated stream; attention_num_heads must divide it

    # --- training ---
    "num_epochs": 3,  # passes over the training windows (max_steps/max_train_minutes may end sooner)
    "max_steps": 8000,  # optimizer steps at most (None = no limit)
    "max_train_minutes": 3.0,  # wall-clock training budget, minutes (None = no limit)
    "learning_rate": 3e-3,  # peak learning rate
    "optimizer_type": "Muon",  # "Muon" (layer matrices; AdamW for the rest) | "AdamW" | "Adam"
    "muon_learning_rate": 0.02,  # Muon: peak rate of the layer matrices (scheduled like the rest)
    "muon_momentum": 0.95,  # Muon: momentum (Nesterov)
    "adam_beta1": 0.9,  # Adam beta1
    "adam_beta2": 0.99,  # Adam beta2
    "adam_eps": 1e-8,  # Adam epsilon
    "weight_decay": 0.1,  # weight decay on weight matrices (not biases, norms or embeddings' bias)
    "gradient_accumulation_steps": 1,  # micro-batches summed per optimizer step
    "clip_grad_norm_value": 1.0,  # clip the global gradient norm to this (None = no clipping)
    "sparse_table_updates": False,  # update only the n-gram table rows a step used (pays with large ngram_buckets)
    "print_every": 100,  # print a log line every N optimizer steps
    "metrics_every": 10,  # append a row to metrics.csv every N optimizer steps
    "test_every_batches": 500,  # print an interim generated sample every N steps (0 = never)
    "interim_test_prompt": "The ",  # prompt of the interim samples
    "interim_test_max_new_bytes": 80,  # length of an interim sample, bytes
    "validate_and_checkpoint_best_every_batches": 250,  # validate (and save best) every N steps
    "eval_max_batches": 20,  # validation batches per evaluation (None = the whole split)
    "evaluation_stride": None,  # bytes between --evaluate windows (None = sequence_length)
                                # (final validation too); costs ~sequence_length/stride
    "final_validation_max_bytes": 200_000,  # final validation: bytes scored, evenly spread (None = all)
    "reset_best_val_loss_on_resume": False,  # forget the best validation loss when resuming

    # --- schedule and AMP ---
    "scheduler_type": "CosineAnnealingLR",  # "CosineAnnealingLR" | "wsd" | "ReduceLROnPlateau"
                                            # | "constant"
    "lr_decay_fraction": 0.3,  # wsd: decay linearly to eta_min over this last part of the run
    "lr_scheduler_T_max": None,  # cosine length in steps after warmup (None = rest of the run)
    "lr_scheduler_eta_min": 1e-4,  # cosine floor learning rate
    "lr_scheduler_patience": 3,  # ReduceLROnPlateau: validations without improvement before cutting
    "lr_scheduler_factor": 0.5,  # ReduceLROnPlateau: multiply the learning rate by this
    "use_lr_warmup": True,  # ramp the learning rate up linearly at the start
    "lr_warmup_steps": 50,  # warmup length, optimizer steps
    "lr_warmup_init_factor": 0.01,  # warmup starts at learning_rate * this
    "use_amp": True,  # mixed precision (autocast) for matrix work
    "amp_dtype": "auto",  # "auto" (bf16 where fast, fp32 on other CPUs, fp16 on older GPUs) | "bfloat16" | "float16"

    # --- checkpoints ---
    "checkpoint_every_batches": 500,  # save {model_name}_latest.pth every N steps
    "save_epoch_snapshots": False,  # also save {model_name}_epoch{N}.pth at each epoch end
    "keep_last_checkpoints": 2,  # epoch snapshots kept (older ones are deleted)

    # --- generation ---
    "generation_prompts": ["The ", "Once upon a time"],  # prompts of the prediction stage
    "generation_max_new_bytes": 300,  # bytes generated per prompt
    "generation_temperature": 0.8,  # sampling temperature (0 = greedy)
    "generation_top_k": 40,  # sample among the k most likely bytes (0 = off)
    "generation_top_p": 0.95,  # nucleus sampling: smallest set reaching this probability (1.0 = off)
    "generation_repetition_penalty": 1.0,  # divide logits of recently seen bytes (1.0 = off)
    "generation_repetition_window": 64,  # how many recent bytes the repetition penalty looks at
    "generation_seed": 1234,  # sampling seed (None = different every run)
    "generation_valid_utf8_only": True,  # forbid bytes that would make the text invalid UTF-8
    "use_kv_cache": True,  # incremental generation with cached keys/values (False = full recompute)
    "generation_compile": "auto",  # compile the decode step (CPU: AOTInductor): "auto" (long runs) | "always" | "never"
    "generation_output_file": "generated_samples.txt",  # appended in checkpoint_dir, UTF-8
    "interim_test_temperature": 0.8,  # temperature of the interim samples during training
    "interim_test_top_k": 40,  # top-k of the interim samples during training

    # --- profiler ---
    "enable_profiler": False,  # profile a window of training steps with torch.profiler
    "profiler_log_dir": "./checkpoints_grug_v3/profiler",  # trace output (TensorBoard / chrome://tracing)
    "profiler_schedule_wait": 5,  # steps skipped before profiling
    "profiler_schedule_warmup": 2,  # steps traced but discarded
    "profiler_schedule_active": 5,  # steps recorded
    "profiler_schedule_repeat": 1,  # profiling cycles

    # --- runtime ---
    "seed": 42,  # seed of Python, NumPy and torch
    "device": "auto",  # "auto" (cuda, then mps, then cpu) | "cpu" | "cuda" | "cuda:N" | "mps"
    "use_torch_compile": False,  # torch.compile the model (falls back with a warning if unavailable)
    "distributed_timeout_minutes": 10,  # torchrun: a rank waiting longer than this aborts the run
}


# ---------------------------------------------------------------------------
# What each key accepts. You do not need to edit this to change a setting.

def _folder_or_missing(key):
    def check(path):
        if os.path.exists(path) and not os.path.isdir(path):
            return f"`{key}` = {path!r} is a file, not a folder"
        return None
    return check


def _file_name(key):
    def check(name):
        if not name or "/" in name or "\\" in name:
            return f"`{key}` = {name!r} must be a file name, without / or \\"
        return None
    return check


POSITIVE = integer(1)
COUNT = integer(0)  # 0 allowed
FRACTION = real(0, 1, high_open=True)  # dropouts, betas: [0, 1)
SEED = integer(0, 2**63 - 1)

RULES = {
    # paths and data
    "data_dir": text(),
    "processed_data_dir": text(check=_folder_or_missing("processed_data_dir")),
    "checkpoint_dir": text(check=_folder_or_missing("checkpoint_dir")),
    "model_name": text(check=_file_name("model_name")),
    "resume_from_checkpoint": text(nullable=True),
    "start_over": flag(),
    "generate_dummy_data_if_empty": flag(),
    "force_reprocess_data": flag(),
    "data_change_detection": one_of("size_and_mtime", "content"),
    "file_separator": text(),
    "utf8_error_policy": one_of("replace", "skip", "error", "keep"),
    "sequence_length": POSITIVE,
    "data_stride": POSITIVE,
    "val_split_ratio": real(0, 1, low_open=True, high_open=True),
    "val_split_max_bytes": integer(1, nullable=True),  # >= one window: dataset.split_problems
    "batch_size": POSITIVE,
    "num_workers": COUNT,
    "vocab_size": POSITIVE,
    # model
    "embedding_dim": POSITIVE,
    "ngram_orders": list_of(int, low=2),  # distinct: structure_problems in model.py
    "ngram_buckets": POSITIVE,
    "use_cnn_frontend": flag(),
    "cnn_out_channels_list": list_of(int, low=1),
    "cnn_kernel_sizes": list_of(int, low=1),
    "cnn_activation": one_of(*ACTIVATIONS),
    "cnn_dropout": FRACTION,
    "cnn_use_layernorm": flag(),
    "positional_encoding_type": one_of(*POSITIONAL_ENCODINGS),
    "max_positional_encoding_len": POSITIVE,
    "pe_dropout": FRACTION,
    "attention_d_model": POSITIVE,
    "attention_num_heads": POSITIVE,
    "ffn_dim_multiply": POSITIVE,
    "transformer_dropout": FRACTION,
    "transformer_norm_first": flag(),
    "norm_type": one_of(*NORMS),
    "qk_norm": flag(),
    "attention_window": integer(1, nullable=True),
    "ffn_activation": one_of("gelu", "relu2", "swiglu"),
    "zero_init_output_projections": flag(),
    "logit_softcap": real(0),
    "smear_previous_byte": flag(),
    "embeddings_into_every_layer": flag(),
    "value_embeddings": flag(),
    "output_dropout": FRACTION,
    "num_attention_layers": POSITIVE,
    "training_objective": one_of("all_positions", "last_byte"),
    # parallel stream
    "use_parallel_stream_model": flag(),
    "parallel_fusion": one_of("concat_output", "add_input", "add_middle", "at_boundaries"),
    "patch_boundaries": one_of("fixed", "spacelike"),
    "max_patches_per_window": integer(1, nullable=True),
    "num_byte_stream_layers": POSITIVE,
    "num_agg_stream_layers": POSITIVE,
    "agg_cnn_kernel_size": POSITIVE,
    "agg_cnn_stride": POSITIVE,
    "agg_cnn_out_dim": POSITIVE,
    # training
    "num_epochs": POSITIVE,
    "max_steps": integer(1, nullable=True),
    "max_train_minutes": real(0, low_open=True, nullable=True),
    "learning_rate": real(0, low_open=True),
    "optimizer_type": one_of("AdamW", "Adam", "Muon"),
    "muon_learning_rate": real(0, low_open=True),
    "muon_momentum": real(0, 1, high_open=True),
    "adam_beta1": FRACTION,
    "adam_beta2": FRACTION,
    "adam_eps": real(0, low_open=True),
    "weight_decay": real(0),
    "gradient_accumulation_steps": POSITIVE,
    "clip_grad_norm_value": real(0, low_open=True, nullable=True),
    "sparse_table_updates": flag(),
    "print_every": POSITIVE,
    "metrics_every": POSITIVE,
    "test_every_batches": COUNT,
    "interim_test_prompt": text(),
    "interim_test_max_new_bytes": POSITIVE,
    "validate_and_checkpoint_best_every_batches": POSITIVE,
    "eval_max_batches": integer(1, nullable=True),
    "evaluation_stride": integer(1, nullable=True),  # <= sequence_length: evaluation_problems
    "final_validation_max_bytes": integer(1, nullable=True),
    "reset_best_val_loss_on_resume": flag(),
    # schedule and AMP
    "scheduler_type": one_of("CosineAnnealingLR", "wsd", "ReduceLROnPlateau", "constant"),
    "lr_decay_fraction": real(0, 1, low_open=True),
    "lr_scheduler_T_max": integer(1, nullable=True),
    "lr_scheduler_eta_min": real(0),
    "lr_scheduler_patience": COUNT,
    "lr_scheduler_factor": real(0, 1, low_open=True, high_open=True),
    "use_lr_warmup": flag(),
    "lr_warmup_steps": COUNT,
    "lr_warmup_init_factor": real(0, 1, low_open=True),
    "use_amp": flag(),
    "amp_dtype": one_of("auto", "bfloat16", "float16"),
    # checkpoints
    "checkpoint_every_batches": POSITIVE,
    "save_epoch_snapshots": flag(),
    "keep_last_checkpoints": POSITIVE,
    # generation
    "generation_prompts": list_of(str),
    "generation_max_new_bytes": COUNT,
    "generation_temperature": real(0),
    "generation_top_k": COUNT,
    "generation_top_p": real(0, 1, low_open=True),
    "generation_repetition_penalty": real(0, low_open=True),
    "generation_repetition_window": POSITIVE,
    "generation_seed": integer(0, 2**63 - 1, nullable=True),
    "generation_valid_utf8_only": flag(),
    "use_kv_cache": flag(),
    "generation_compile": one_of("auto", "always", "never"),
    "generation_output_file": text(check=_file_name("generation_output_file")),
    "interim_test_temperature": real(0),
    "interim_test_top_k": COUNT,
    # profiler
    "enable_profiler": flag(),
    "profiler_log_dir": text(),
    "profiler_schedule_wait": COUNT,
    "profiler_schedule_warmup": COUNT,
    "profiler_schedule_active": POSITIVE,
    "profiler_schedule_repeat": POSITIVE,
    # runtime
    "seed": SEED,
    "device": text(check=device_problem),
    "use_torch_compile": flag(),
    "distributed_timeout_minutes": real(0, low_open=True),
}


# ---------------------------------------------------------------------------
# Which parts of the program read each key beyond the config check: one declaration, from
# which dataset.py, model.py and predictor.py derive their key lists, so a key is never in
# one list and forgotten in another. A key not named in KEY_ROLES has none of these roles.
# A new role: one line in ROLES, and its name added to the line of each key that has it.

ROLES = {
    "data": "DataProcessor reads it (dataset.DATA_KEYS)",
    "model": "the model reads it (model.MODEL_KEYS)",
    "architecture": "it sets the parameters' shapes or the math of forward, so a checkpoint "
                    "fits only a model built with the same value (model.ARCHITECTURE_KEYS)",
    "generate": "the default of Predictor.generate's argument named like it without "
                "`generation_` (predictor.SETTING_KEYS)",
    "training": "it shapes training from a checkpoint on (which windows in which order, "
                "the run's length, the optimizer and schedule, validation, what a step "
                "computes), so a resume that changes it is no longer exact "
                "(trainer.TRAINING_KEYS)",
}

KEY_ROLES = {
    # paths and data
    "data_dir": ("data",),
    "processed_data_dir": ("data",),
    "generate_dummy_data_if_empty": ("data",),
    "force_reprocess_data": ("data",),
    "data_change_detection": ("data",),
    "file_separator": ("data",),
    "utf8_error_policy": ("data",),
    "sequence_length": ("data", "model", "architecture"),
    "data_stride": ("training",),
    "val_split_ratio": ("data", "training"),
    "val_split_max_bytes": ("data", "training"),
    "batch_size": ("training",),
    "vocab_size": ("model", "architecture"),
    # model
    "embedding_dim": ("model", "architecture"),
    "ngram_orders": ("model", "architecture"),
    "ngram_buckets": ("model", "architecture"),
    "use_cnn_frontend": ("model", "architecture"),
    "cnn_out_channels_list": ("model", "architecture"),
    "cnn_kernel_sizes": ("model", "architecture"),
    "cnn_activation": ("model", "architecture"),
    "cnn_dropout": ("model", "training"),
    "cnn_use_layernorm": ("model", "architecture"),
    "positional_encoding_type": ("model", "architecture"),
    "max_positional_encoding_len": ("model", "architecture"),
    "pe_dropout": ("model", "training"),
    "attention_d_model": ("model", "architecture"),
    "attention_num_heads": ("model", "architecture"),
    "ffn_dim_multiply": ("model", "architecture"),
    "transformer_dropout": ("model", "training"),
    "transformer_norm_first": ("model", "architecture"),
    "norm_type": ("model", "architecture"),
    "qk_norm": ("model", "architecture"),
    "attention_window": ("model", "architecture"),
    "ffn_activation": ("model", "architecture"),
    "zero_init_output_projections": ("model",),
    "logit_softcap": ("model", "architecture"),
    "smear_previous_byte": ("model", "architecture"),
    "embeddings_into_every_layer": ("model", "architecture"),
    "value_embeddings": ("model", "architecture"),
    "output_dropout": ("model", "training"),
    "num_attention_layers": ("model", "architecture"),
    "training_objective": ("model", "training"),
    # parallel stream (a strided-CNN "aggregated" stream beside the byte stream)
    "use_parallel_stream_model": ("model", "architecture"),
    "parallel_fusion": ("model", "architecture"),
    "patch_boundaries": ("model", "architecture"),
    "max_patches_per_window": ("model", "architecture"),
    "num_byte_stream_layers": ("model", "architecture"),
    "num_agg_stream_layers": ("model", "architecture"),
    "agg_cnn_kernel_size": ("model", "architecture"),
    "agg_cnn_stride": ("model", "architecture"),
    "agg_cnn_out_dim": ("model", "architecture"),
    # training
    "num_epochs": ("training",),
    "max_steps": ("training",),
    "max_train_minutes": ("training",),
    "learning_rate": ("training",),
    "optimizer_type": ("training",),
    "muon_learning_rate": ("training",),
    "muon_momentum": ("training",),
    "adam_beta1": ("training",),
    "adam_beta2": ("training",),
    "adam_eps": ("training",),
    "weight_decay": ("training",),
    "gradient_accumulation_steps": ("training",),
    "clip_grad_norm_value": ("training",),
    "sparse_table_updates": ("training",),
    "validate_and_checkpoint_best_every_batches": ("training",),
    "eval_max_batches": ("training",),
    # schedule and AMP
    "scheduler_type": ("training",),
    "lr_decay_fraction": ("training",),
    "lr_scheduler_T_max": ("training",),
    "lr_scheduler_eta_min": ("training",),
    "lr_scheduler_patience": ("training",),
    "lr_scheduler_factor": ("training",),
    "use_lr_warmup": ("training",),
    "lr_warmup_steps": ("training",),
    "lr_warmup_init_factor": ("training",),
    "use_amp": ("training",),
    "amp_dtype": ("training",),
    # generation
    "generation_max_new_bytes": ("generate",),
    "generation_temperature": ("generate",),
    "generation_top_k": ("generate",),
    "generation_top_p": ("generate",),
    "generation_repetition_penalty": ("generate",),
    "generation_seed": ("generate",),
    # runtime
    "seed": ("training",),
}

# What a checkpoint saved before an architecture key existed meant by it (the math of its
# day); the architecture keys not named here are as old as the checkpoints.
LEGACY_ARCHITECTURE = {"norm_type": "layernorm", "qk_norm": False, "attention_window": None,
                       "ffn_activation": "gelu",
                       "logit_softcap": 0.0, "parallel_fusion": "concat_output",
                       "patch_boundaries": "fixed", "max_patches_per_window": None,
                       "ngram_orders": [], "ngram_buckets": 8192, "smear_previous_byte": False,
                       "embeddings_into_every_layer": False, "value_embeddings": False}


def keys_with(role):
    """The config keys that have `role`, in config order."""
    if role not in ROLES:
        raise ValueError(f"no role {role!r}; the roles are {', '.join(ROLES)}")
    return tuple(key for key in CONFIG_V3 if role in KEY_ROLES.get(key, ()))
