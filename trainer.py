"""Training loop for any model whose forward(x, targets) returns the mean loss in nats.

The Trainer knows nothing about the model's insides: it needs `model(x, y) -> loss`,
the train/validation datasets (indexable windows with a batched `__getitems__`) and the
config. It owns the optimizer, the learning-rate schedule, mixed precision, validation,
metrics, checkpoints with exact resume, signals and the profiler.
"""

import contextlib
import csv
import math
import os
import random
import signal
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader
from tqdm import tqdm

from utils import (UserError, atomic_output, autocast_context, bits_per_byte,
                   resolve_amp_dtype)

CHECKPOINT_FORMAT_VERSION = 1
METRICS_COLUMNS = ("step", "epoch", "train_loss", "val_loss", "val_bits_per_byte",
                   "learning_rate", "bytes_per_second", "elapsed_seconds")


class TrainingDiverged(UserError):
    """The loss became NaN or infinite."""


# ---------------------------------------------------------------------------
# Checkpoint files

def checkpoint_path(config, kind):
    """Path of the "best" or "latest" checkpoint (or an epoch snapshot name)."""
    return os.path.join(config["checkpoint_dir"], f"{config['model_name']}_{kind}.pth")


def save_checkpoint(state, path):
    """Write atomically: a crash mid-write leaves the previous file intact."""
    with atomic_output(path) as file:
        torch.save(state, file)


def load_checkpoint(path):
    """Load a checkpoint safely (weights_only) or raise a UserError naming the file."""
    if not os.path.isfile(path):
        raise UserError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for truncated/corrupt files
        raise UserError(f"cannot read checkpoint {path}: the file is truncated, corrupt or "
                        f"not a PyTorch file ({type(error).__name__}: "
                        f"{str(error).splitlines()[0] if str(error) else ''})") from None
    if not isinstance(state, dict) or "format_version" not in state or "model_state" not in state:
        raise UserError(f"{path} is a PyTorch file but not a GrugV3 checkpoint")
    if state["format_version"] > CHECKPOINT_FORMAT_VERSION:
        raise UserError(f"{path} was written by a newer GrugV3 (checkpoint format "
                        f"{state['format_version']}, this version reads up to "
                        f"{CHECKPOINT_FORMAT_VERSION}); update the code")
    return state


def resolve_resume_path(config):
    """The checkpoint file `resume_from_checkpoint` asks for, or None for a fresh start."""
    choice = config["resume_from_checkpoint"]
    if not choice:
        return None
    if choice in ("latest", "best"):
        path = checkpoint_path(config, choice)
        if not os.path.isfile(path):
            other = "best" if choice == "latest" else "latest"
            hint = (f" A {other} checkpoint exists: --resume_from_checkpoint={other}"
                    if os.path.isfile(checkpoint_path(config, other)) else
                    " Set resume_from_checkpoint=None to start fresh.")
            raise UserError(f"resume_from_checkpoint={choice!r} but {path} does not exist."
                            + hint)
        return path
    return choice


def architecture_differences(saved_config, config, keys):
    """`key: saved -> current` for every architecture key that differs."""
    return [f"{k}: checkpoint {saved_config.get(k)!r} vs config {config.get(k)!r}"
            for k in keys if saved_config.get(k) != config.get(k)]


def unwrap_model(model):
    """The plain module under DDP and torch.compile wrappers (clean state_dict keys)."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def capture_rng_states():
    numpy_state = np.random.get_state()
    return {
        "python": random.getstate(),
        # weights_only loading refuses numpy arrays, so the key is stored as a tensor.
        "numpy": (numpy_state[0], torch.from_numpy(numpy_state[1].astype(np.int64)),
                  numpy_state[2], numpy_state[3], numpy_state[4]),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng_states(states):
    random.setstate(states["python"])
    name, key, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((name, key.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


# ---------------------------------------------------------------------------
# Learning-rate schedule: a pure function of progress, so a resumed run follows
# exactly the curve of an uninterrupted one.

class LearningRateSchedule:
    def __init__(self, config, total_steps, time_budget_seconds=None):
        self.peak = config["learning_rate"]
        self.kind = config["scheduler_type"]
        self.warmup_steps = config["lr_warmup_steps"] if config["use_lr_warmup"] else 0
        self.init_factor = config["lr_warmup_init_factor"]
        self.eta_min = config["lr_scheduler_eta_min"]
        self.total_steps = total_steps
        self.cosine_steps = config["lr_scheduler_T_max"] or max(total_steps - self.warmup_steps, 1)
        self.time_budget = time_budget_seconds
        # ReduceLROnPlateau state: a multiplier cut after `patience` bad validations.
        self.factor = config["lr_scheduler_factor"]
        self.patience = config["lr_scheduler_patience"]
        self.plateau_scale = 1.0
        self.plateau_best = math.inf
        self.plateau_bad_checks = 0

    def learning_rate(self, step, elapsed_seconds=0.0):
        """Rate for optimizer step `step` (0-based)."""
        if step < self.warmup_steps:
            if self.warmup_steps == 1:
                return self.peak
            ramp = step / (self.warmup_steps - 1)  # exactly 1.0 at the last warmup step
            return self.peak * (self.init_factor + (1.0 - self.init_factor) * ramp)
        if self.kind == "constant":
            return self.peak
        if self.kind == "ReduceLROnPlateau":
            return self.peak * self.plateau_scale
        # Cosine: progress by steps, or by the time budget when that ends the run first.
        progress = (step - self.warmup_steps) / max(self.cosine_steps - 1, 1)
        if self.time_budget:
            progress = max(progress, elapsed_seconds / self.time_budget)
        progress = min(progress, 1.0)
        return self.eta_min + (self.peak - self.eta_min) * 0.5 * (1 + math.cos(math.pi * progress))

    def on_validation(self, val_loss):
        if self.kind != "ReduceLROnPlateau":
            return
        if val_loss < self.plateau_best:
            self.plateau_best, self.plateau_bad_checks = val_loss, 0
            return
        self.plateau_bad_checks += 1
        if self.plateau_bad_checks > self.patience:
            self.plateau_scale *= self.factor
            self.plateau_bad_checks = 0

    def state_dict(self):
        return {"plateau_scale": self.plateau_scale, "plateau_best": self.plateau_best,
                "plateau_bad_checks": self.plateau_bad_checks}

    def load_state_dict(self, state):
        self.plateau_scale = state["plateau_scale"]
        self.plateau_best = state["plateau_best"]
        self.plateau_bad_checks = state["plateau_bad_checks"]


# ---------------------------------------------------------------------------
# Data order: a permutation per epoch from the seed, so the position within an epoch
# is enough to resume, and every rank agrees on it without talking.

class EpochBatchSampler:
    """Yields lists of window indices for one epoch, from micro-batch `start_batch` on.

    Global micro-batch k holds permutation[k*B*W : (k+1)*B*W]; rank r takes its r-th
    slice of B. With W ranks of batch B this is the same data as 1 rank of batch B*W."""

    def __init__(self, num_windows, batch_size, seed, epoch, rank=0, world_size=1,
                 start_batch=0):
        self.num_windows, self.batch_size = num_windows, batch_size
        self.seed, self.epoch = seed, epoch
        self.rank, self.world_size, self.start_batch = rank, world_size, start_batch

    def batches_per_epoch(self):
        return self.num_windows // (self.batch_size * self.world_size)

    def __len__(self):
        return max(self.batches_per_epoch() - self.start_batch, 0)

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.num_windows, generator=generator)
        global_batch = self.batch_size * self.world_size
        for k in range(self.start_batch, self.batches_per_epoch()):
            start = k * global_batch + self.rank * self.batch_size
            yield order[start:start + self.batch_size].tolist()


def _identity(batch):
    return batch


# ---------------------------------------------------------------------------

class Trainer:
    def __init__(self, model, train_dataset, val_dataset, config, device,
                 architecture_keys=(), sample_fn=None):
        """`model(x, y)` must return the mean loss in nats per byte. `architecture_keys`
        are the config keys a checkpoint must share to be resumed. `sample_fn(prompt)`
        returns text for the interim samples (None = no samples)."""
        self.config = config
        self.device = device
        self.train_dataset, self.val_dataset = train_dataset, val_dataset
        self.architecture_keys = tuple(architecture_keys)
        self.sample_fn = sample_fn
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world_size = dist.get_world_size() if dist.is_initialized() else 1
        self.is_main = self.rank == 0

        self.raw_model = unwrap_model(model)
        self.amp_dtype = resolve_amp_dtype(config, device)
        self.model = self._maybe_compile(model)
        if self.world_size > 1:
            self.model = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[device.index] if device.type == "cuda" else None)

        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp_dtype == torch.float16)
        self.optimizer = self._build_optimizer()

        self.accumulation = config["gradient_accumulation_steps"]
        self.batches_per_epoch = EpochBatchSampler(
            len(train_dataset), config["batch_size"], config["seed"], 0,
            world_size=self.world_size).batches_per_epoch()
        self.steps_per_epoch = self.batches_per_epoch // self.accumulation
        if self.steps_per_epoch == 0:
            needed = config["batch_size"] * self.world_size * self.accumulation
            raise UserError(f"the training split has {len(train_dataset)} windows but one "
                            f"optimizer step needs {needed} (batch_size x ranks x "
                            f"gradient_accumulation_steps): add data or lower batch_size")
        total = self.steps_per_epoch * config["num_epochs"]
        if config["max_steps"]:
            total = min(total, config["max_steps"])
        self.total_steps = total
        budget = config["max_train_minutes"] * 60 if config["max_train_minutes"] else None
        self.time_budget = budget
        self.schedule = LearningRateSchedule(config, total, budget)

        # Progress, restored on resume.
        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0  # micro-batches of the current epoch already consumed
        self.best_val_loss = math.inf
        self.elapsed_before = 0.0  # seconds of training in earlier (resumed-from) runs
        self._start_time = time.perf_counter()  # train() restarts it
        self.stop_requested = None

    # -- construction helpers ------------------------------------------------

    def _maybe_compile(self, model):
        """torch.compile(model), or `model` with a warning where compiling fails. It runs
        one forward/backward now (before any resume restores the RNG), because compiling
        happens on the first call: a platform without a working compiler falls back here
        instead of crashing at step 1."""
        if not self.config["use_torch_compile"]:
            return model
        try:
            compiled = torch.compile(model)
            x, y = self.train_dataset.__getitems__([0])
            with self._autocast():
                loss = compiled(x.to(self.device), y.to(self.device))
            loss.backward()
            return compiled
        except Exception as error:  # no compiler, unsupported platform or Python
            reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
            self._log(f"warning: torch.compile failed ({type(error).__name__}: {reason}); "
                      f"training uncompiled")
            return model
        finally:
            self.raw_model.zero_grad(set_to_none=True)

    def _build_optimizer(self):
        c = self.config
        decay, no_decay = [], []
        for parameter in self.raw_model.parameters():
            if parameter.requires_grad:
                # Matrices (linear, embedding, conv kernels) decay; biases and norms don't.
                (decay if parameter.dim() >= 2 else no_decay).append(parameter)
        groups = [{"params": decay, "weight_decay": c["weight_decay"]},
                  {"params": no_decay, "weight_decay": 0.0}]
        optimizer_class = torch.optim.AdamW if c["optimizer_type"] == "AdamW" else torch.optim.Adam
        options = dict(lr=c["learning_rate"], betas=(c["adam_beta1"], c["adam_beta2"]),
                       eps=c["adam_eps"])
        try:
            return optimizer_class(groups, fused=True, **options)
        except (RuntimeError, TypeError):  # fused kernels missing for this device
            return optimizer_class(groups, foreach=True, **options)

    def _log(self, message):
        if self.is_main:
            tqdm.write(message)

    # -- checkpoints -----------------------------------------------------------

    def state_dict(self):
        return {
            "format_version": CHECKPOINT_FORMAT_VERSION,
            "model_state": self.raw_model.state_dict(),
            "optimizer_state": self.optimizer.state_dict(),
            "scheduler_state": self.schedule.state_dict(),
            "scaler_state": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "step": self.step,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            # In windows, so a run resumed with another rank count starts at the same data.
            "windows_in_epoch": self.batch_in_epoch * self.config["batch_size"] * self.world_size,
            "best_val_loss": self.best_val_loss,
            "elapsed_seconds": self.elapsed_seconds(),
            "rng_states": capture_rng_states(),
            "config": dict(self.config),
        }

    def save(self, kind):
        if self.is_main:
            path = checkpoint_path(self.config, kind)
            save_checkpoint(self.state_dict(), path)
            return path
        return None

    def resume(self, path):
        try:
            state = load_checkpoint(path)
        except UserError as error:
            best = checkpoint_path(self.config, "best")
            if os.path.abspath(path) != os.path.abspath(best) and os.path.isfile(best):
                raise UserError(f"{error}\nThe best checkpoint may still be good: resume "
                                f"from it with --resume_from_checkpoint=best") from None
            raise
        differences = architecture_differences(state["config"], self.config,
                                               self.architecture_keys)
        if differences:
            raise UserError(f"cannot resume from {path}: its architecture differs from the "
                            "config:\n  " + "\n  ".join(differences) +
                            "\nUse the checkpoint's values or start fresh "
                            "(resume_from_checkpoint=None).")
        try:
            self.raw_model.load_state_dict(state["model_state"])
            self.optimizer.load_state_dict(state["optimizer_state"])
        except (RuntimeError, ValueError, KeyError) as error:
            raise UserError(f"checkpoint {path} does not fit this model: {error}") from None
        self.schedule.load_state_dict(state["scheduler_state"])
        if state["scaler_state"] and self.scaler.is_enabled():
            self.scaler.load_state_dict(state["scaler_state"])
        self.step, self.epoch = state["step"], state["epoch"]
        windows_per_batch = self.config["batch_size"] * self.world_size
        self.batch_in_epoch = state["windows_in_epoch"] // windows_per_batch
        if state["windows_in_epoch"] % windows_per_batch:
            self._log(f"note: the checkpoint stopped {state['windows_in_epoch']} windows into "
                      f"the epoch, not a multiple of this run's {windows_per_batch} per "
                      f"micro-batch; continuing from micro-batch {self.batch_in_epoch}")
        self.best_val_loss = state["best_val_loss"]
        if self.config["reset_best_val_loss_on_resume"]:
            self.best_val_loss = math.inf
        self.elapsed_before = state["elapsed_seconds"]
        restore_rng_states(state["rng_states"])
        self._log(f"resumed from {path}: step {self.step}, epoch {self.epoch + 1}, "
                  f"best validation loss {self.best_val_loss:.4f}")

    def _save_epoch_snapshot(self):
        if not (self.config["save_epoch_snapshots"] and self.is_main):
            return
        self.save(f"epoch{self.epoch + 1}")
        prefix = f"{self.config['model_name']}_epoch"
        folder = self.config["checkpoint_dir"]
        snapshots = sorted(
            (f for f in os.listdir(folder) if f.startswith(prefix) and f.endswith(".pth")),
            key=lambda name: int(name[len(prefix):-len(".pth")]))
        for old in snapshots[:-self.config["keep_last_checkpoints"]]:
            os.remove(os.path.join(folder, old))

    # -- evaluation ------------------------------------------------------------

    def _autocast(self):
        return autocast_context(self.device, self.amp_dtype)

    def validation_indices(self):
        """A fixed, evenly spread set of validation windows (same every time)."""
        count = len(self.val_dataset)
        cap = self.config["eval_max_batches"]
        per_batch = self.config["batch_size"] * self.world_size
        wanted = count if cap is None else min(count, cap * per_batch)
        return np.linspace(0, count - 1, num=wanted).round().astype(np.int64).tolist()

    @torch.no_grad()
    def evaluate(self):
        """Mean validation loss in nats per byte, averaged over every rank's share."""
        was_training = self.model.training
        self.model.eval()
        indices = self.validation_indices()[self.rank::self.world_size]
        batch_size = self.config["batch_size"]
        total = torch.zeros(2, dtype=torch.float64, device=self.device)  # loss sum, windows
        for start in range(0, len(indices), batch_size):
            x, y = self.val_dataset.__getitems__(indices[start:start + batch_size])
            x, y = x.to(self.device), y.to(self.device)
            with self._autocast():
                loss = self.raw_model(x, y)
            total[0] += loss.double() * len(x)
            total[1] += len(x)
        if self.world_size > 1:
            dist.all_reduce(total)
        self.model.train(was_training)
        return (total[0] / total[1].clamp(min=1)).item()

    def _validate_and_maybe_save_best(self, metrics):
        val_loss = self.evaluate()
        self.schedule.on_validation(val_loss)
        improved = val_loss < self.best_val_loss
        if improved:
            self.best_val_loss = val_loss
            self.save("best")
        self._log(f"step {self.step}: validation loss {val_loss:.4f} nats = "
                  f"{bits_per_byte(val_loss):.3f} bits/byte"
                  + (" (best so far, saved)" if improved else ""))
        metrics.write(self.step, self.epoch + 1, None, val_loss,
                      self.current_lr(), None, self.elapsed_seconds())
        return val_loss

    def _interim_sample(self):
        if not (self.sample_fn and self.is_main):
            return
        prompt = self.config["interim_test_prompt"]
        text = self.sample_fn(prompt)
        self._log(f"--- sample at step {self.step} ---\n{prompt}{text}\n---")
        path = os.path.join(self.config["checkpoint_dir"], "interim_samples.txt")
        with open(path, "a", encoding="utf-8") as file:
            file.write(f"=== step {self.step} ===\n{prompt}{text}\n\n")

    # -- the loop --------------------------------------------------------------

    def elapsed_seconds(self):
        return self.elapsed_before + (time.perf_counter() - self._start_time)

    def current_lr(self):
        return self.optimizer.param_groups[0]["lr"]

    def _set_lr(self):
        rate = self.schedule.learning_rate(self.step, self.elapsed_seconds())
        for group in self.optimizer.param_groups:
            group["lr"] = rate

    def _data_loader(self, epoch, start_batch):
        sampler = EpochBatchSampler(len(self.train_dataset), self.config["batch_size"],
                                    self.config["seed"], epoch, self.rank, self.world_size,
                                    start_batch)
        # A private generator: the loader must not draw from the global RNG, or a resumed
        # run would see different dropout masks than an uninterrupted one.
        return DataLoader(self.train_dataset, batch_sampler=sampler, collate_fn=_identity,
                          num_workers=self.config["num_workers"],
                          generator=torch.Generator().manual_seed(self.config["seed"]),
                          pin_memory=self.device.type == "cuda")

    def train_step(self, micro_batches):
        """One optimizer step over `gradient_accumulation_steps` micro-batches."""
        self._set_lr()
        total_loss = 0.0
        for index, (x, y) in enumerate(micro_batches):
            x = x.to(self.device, non_blocking=True)
            y = y.to(self.device, non_blocking=True)
            last = index == len(micro_batches) - 1
            # DDP: synchronise gradients on the last micro-step only.
            sync = contextlib.nullcontext() if last or self.world_size == 1 else self.model.no_sync()
            with sync:
                with self._autocast():
                    loss = self.model(x, y)
                self.scaler.scale(loss / len(micro_batches)).backward()
            total_loss += loss.item()
        mean_loss = total_loss / len(micro_batches)
        if not math.isfinite(mean_loss):
            self.optimizer.zero_grad(set_to_none=True)
            raise TrainingDiverged(
                f"the training loss became {mean_loss} at step {self.step + 1}. The best "
                f"checkpoint was not touched. Lower learning_rate, enable "
                f"clip_grad_norm_value, or try use_amp=False.")
        if self.config["clip_grad_norm_value"]:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.raw_model.parameters(),
                                           self.config["clip_grad_norm_value"])
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return mean_loss

    def _should_stop(self):
        """Reason to end training now, agreed by every rank, or None."""
        reason = self.stop_requested
        if reason is None and self.config["max_steps"] and self.step >= self.config["max_steps"]:
            reason = "max_steps"
        if reason is None and self.time_budget and self.elapsed_seconds() >= self.time_budget:
            reason = "max_train_minutes"
        if self.world_size > 1:  # one rank stopping alone would hang the others
            flag = torch.tensor([0 if reason is None else 1], device=self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            if flag.item() and reason is None:
                reason = "another rank stopped"
        return reason

    def _on_signal(self, signum, frame):
        if self.stop_requested is None:
            self.stop_requested = signal.Signals(signum).name
            self._log(f"\n{self.stop_requested} received: finishing the current step, "
                      f"then saving the latest checkpoint (press again to abort at once)")
        else:
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def _signal_handlers(self):
        previous = {}
        try:
            for signum in (signal.SIGINT, signal.SIGTERM):
                previous[signum] = signal.signal(signum, self._on_signal)
        except ValueError:  # not in the main thread: leave signals alone
            pass
        try:
            yield
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def _profiler(self):
        c = self.config
        if not c["enable_profiler"]:
            return contextlib.nullcontext()
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        os.makedirs(c["profiler_log_dir"], exist_ok=True)
        return torch.profiler.profile(
            activities=activities,
            schedule=torch.profiler.schedule(
                wait=c["profiler_schedule_wait"], warmup=c["profiler_schedule_warmup"],
                active=c["profiler_schedule_active"], repeat=c["profiler_schedule_repeat"]),
            on_trace_ready=torch.profiler.tensorboard_trace_handler(c["profiler_log_dir"]),
            record_shapes=True)

    def train(self):
        """Train until the epochs, max_steps or the time budget run out, or a signal.
        Returns a summary dict."""
        c = self.config
        os.makedirs(c["checkpoint_dir"], exist_ok=True)
        metrics = MetricsFile(os.path.join(c["checkpoint_dir"], "metrics.csv"), self.is_main)
        self._start_time = time.perf_counter()
        self.model.train()
        bytes_per_step = (c["batch_size"] * self.train_dataset.sequence_length
                          * self.accumulation * self.world_size)
        reason, last_validated_step = None, None
        window_loss, window_steps, window_start = 0.0, 0, time.perf_counter()
        self._log(f"training {self.total_steps} steps at most ({self.steps_per_epoch} per "
                  f"epoch, {bytes_per_step} bytes per step"
                  + (f", {c['max_train_minutes']} minutes at most" if self.time_budget else "")
                  + ")")

        with self._signal_handlers(), self._profiler() as profiler:
            reason = self._should_stop()
            while reason is None and self.epoch < c["num_epochs"]:
                loader = self._data_loader(self.epoch, self.batch_in_epoch)
                steps_left = (self.batches_per_epoch - self.batch_in_epoch) // self.accumulation
                done_in_epoch = self.steps_per_epoch - steps_left
                # The bar ends where this epoch's training will: its end or max_steps.
                bar_total = min(self.steps_per_epoch,
                                done_in_epoch + max(self.total_steps - self.step, 0))
                bar = tqdm(total=bar_total, initial=done_in_epoch,
                           desc=f"epoch {self.epoch + 1}/{c['num_epochs']}",
                           # A bar redrawn into a log file is noise: the log lines suffice.
                           disable=not (self.is_main and sys.stderr.isatty()),
                           dynamic_ncols=True, leave=False)
                batches = iter(loader)
                for _ in range(steps_left):
                    micro = [next(batches) for _ in range(self.accumulation)]
                    step_start = time.perf_counter()
                    loss = self.train_step(micro)
                    self.batch_in_epoch += self.accumulation
                    rate = bytes_per_step / (time.perf_counter() - step_start)
                    window_loss, window_steps = window_loss + loss, window_steps + 1
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss:.3f}", bpb=f"{bits_per_byte(loss):.3f}",
                                    lr=f"{self.current_lr():.2e}", bytes_s=f"{rate:,.0f}")
                    if profiler is not None:  # None when enable_profiler is off
                        profiler.step()
                    if self.step % c["metrics_every"] == 0 or self.step % c["print_every"] == 0:
                        seconds = time.perf_counter() - window_start
                        mean = window_loss / window_steps
                        metrics.write(self.step, self.epoch + 1, mean, None, self.current_lr(),
                                      bytes_per_step * window_steps / seconds,
                                      self.elapsed_seconds())
                        if self.step % c["print_every"] == 0:
                            self._log(f"step {self.step}/{self.total_steps} | loss {mean:.4f} "
                                      f"({bits_per_byte(mean):.3f} bpb) | lr "
                                      f"{self.current_lr():.2e} | "
                                      f"{bytes_per_step * window_steps / seconds:,.0f} bytes/s")
                        window_loss, window_steps, window_start = 0.0, 0, time.perf_counter()
                    if self.step % c["validate_and_checkpoint_best_every_batches"] == 0:
                        self._validate_and_maybe_save_best(metrics)
                        last_validated_step = self.step
                    if c["test_every_batches"] and self.step % c["test_every_batches"] == 0:
                        self._interim_sample()
                    if self.step % c["checkpoint_every_batches"] == 0:
                        self.save("latest")
                    reason = self._should_stop()
                    if reason:
                        break
                bar.close()
                if reason is None:  # the epoch ran to its end
                    if last_validated_step != self.step:
                        self._validate_and_maybe_save_best(metrics)
                        last_validated_step = self.step
                    self._save_epoch_snapshot()
                    self.epoch += 1
                    self.batch_in_epoch = 0
                    reason = self._should_stop()
            reason = reason or "num_epochs"
            if last_validated_step != self.step and not self.stop_requested:
                self._validate_and_maybe_save_best(metrics)
            self.save("latest")
        if c["enable_profiler"] and self.is_main and profiler is not None:
            self._log(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
            self._log(f"profiler trace written to {c['profiler_log_dir']}")
        if self.stop_requested:
            self._log(f"stopped by {self.stop_requested} after step {self.step}; saved "
                      f"{checkpoint_path(c, 'latest')}.\nResume with: python3 main.py "
                      f"--resume_from_checkpoint=latest")
        else:
            self._log(f"training finished ({reason}) after {self.step} steps, "
                      f"{self.elapsed_seconds():.0f} s; best validation loss "
                      f"{self.best_val_loss:.4f} nats = {bits_per_byte(self.best_val_loss):.3f} "
                      f"bits/byte")
        return {"steps": self.step, "reason": reason, "best_val_loss": self.best_val_loss,
                "elapsed_seconds": self.elapsed_seconds(), "interrupted": bool(self.stop_requested)}


class MetricsFile:
    """Appends rows to metrics.csv (header written once), only on the main rank."""

    def __init__(self, path, enabled):
        self.path, self.enabled = path, enabled
        if enabled and not os.path.exists(path):
            with open(path, "w", newline="") as file:
                csv.writer(file).writerow(METRICS_COLUMNS)

    def write(self, step, epoch, train_loss, val_loss, learning_rate, bytes_per_second, elapsed):
        if not self.enabled:
            return
        val_bpb = None if val_loss is None else bits_per_byte(val_loss)
        row = (step, epoch, train_loss, val_loss, val_bpb, learning_rate, bytes_per_second, elapsed)
        with open(self.path, "a", newline="") as file:
            csv.writer(file).writerow(["" if v is None else (f"{v:.6g}" if isinstance(v, float)
                                                              else v) for v in row])
