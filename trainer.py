"""Training loop for any model with `model(x, targets) -> mean loss in nats` and
`model(x) -> logits (B, T, 256)` (the second for validation).

The Trainer owns the optimizer, the learning-rate schedule, mixed precision, validation,
metrics, checkpoints with exact resume, signals and the profiler. Its loop reads like
nanoGPT's: set the rate and step, then decide what else this step calls for.
"""

import contextlib
import csv
import math
import os
import signal
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader
from tqdm import tqdm

from checkpoint import (FORMAT_VERSION, capture_rng_states, checkpoint_path, load_for_resume,
                        prune_epoch_snapshots, restore_rng_states, save_checkpoint,
                        unwrap_model)
from evaluate import evenly_spread, score_windows
from utils import UserError, autocast_context, bits_per_byte, resolve_amp_dtype

METRICS_COLUMNS = ("step", "epoch", "train_loss", "val_loss", "val_bits_per_byte",
                   "learning_rate", "bytes_per_second", "elapsed_seconds")


class TrainingDiverged(UserError):
    """The loss became NaN or infinite."""


def schedule_problems(c):
    """Cross-key rules of the schedule (only keys whose own values are valid are in `c`)."""
    if "lr_scheduler_eta_min" in c and "learning_rate" in c \
            and c["lr_scheduler_eta_min"] > c["learning_rate"]:
        return [f"`lr_scheduler_eta_min` ({c['lr_scheduler_eta_min']}) is above "
                f"`learning_rate` ({c['learning_rate']})"]
    return []


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
# Data order

class SeededPermutation:
    """A pseudo-random bijection of 0 .. n-1, computed for any positions on demand (a
    4-round Feistel network over the next even power of two, cycle-walking back into
    range), so its memory does not grow with n: a 10 GB corpus costs what a 1 KB one does."""

    MULTIPLIERS = (np.uint64(0x9E3779B97F4A7C15), np.uint64(0xBF58476D1CE4E5B9))

    def __init__(self, n, seed):
        self.n = n
        bits = max(2, (n - 1).bit_length())
        self.half = (bits + 1) // 2
        self.mask = np.uint64((1 << self.half) - 1)
        self.keys = [np.uint64(k) for k in
                     np.random.SeedSequence(seed).generate_state(4, dtype=np.uint64)]

    def _round(self, right, key):
        z = (right + key) * self.MULTIPLIERS[0]  # uint64 arithmetic wraps around
        z ^= z >> np.uint64(29)
        z *= self.MULTIPLIERS[1]
        return (z ^ (z >> np.uint64(32))) & self.mask

    def _encrypt(self, x):
        half = np.uint64(self.half)
        left, right = x >> half, x & self.mask
        for key in self.keys:
            left, right = right, left ^ self._round(right, key)
        return (left << half) | right

    def __call__(self, positions):
        x = np.asarray(positions, dtype=np.uint64).copy()
        outside = np.ones(x.shape, dtype=bool)
        while outside.any():  # each pass lands at least 1/4 of the rest in range
            x[outside] = self._encrypt(x[outside])
            outside = x >= np.uint64(self.n)
        return x.astype(np.int64)


class BatchOrder:
    """Which windows every micro-batch holds, and where training stands in them.

    Each epoch is a fresh permutation of the training windows (from the seed), cut into
    global micro-batches of batch_size x world_size windows; rank r takes the r-th share
    of each, so 2 ranks of batch B see the same windows as 1 rank of batch 2B. A step
    takes `accumulation` micro-batches and the epoch ends when fewer are left. The
    position (epoch, micro_batch) is all a resume needs."""

    def __init__(self, num_windows, batch_size, accumulation, seed, rank=0, world_size=1):
        self.num_windows, self.batch_size, self.seed = num_windows, batch_size, seed
        self.accumulation, self.rank, self.world_size = accumulation, rank, world_size
        self.steps_per_epoch = num_windows // (batch_size * world_size) // accumulation
        self.micro_batches_per_epoch = self.steps_per_epoch * accumulation
        self.epoch, self.micro_batch = 0, 0  # the next micro-batch to train on
        self.epoch_of_last_step = 1  # 1-based, for the logs

    def micro_batches(self, epoch, first):
        """Window indices of this rank's micro-batches from (epoch, first) on, forever."""
        global_batch = self.batch_size * self.world_size
        while True:
            permutation = SeededPermutation(self.num_windows, self.seed * 1_000_003 + epoch)
            for k in range(first, self.micro_batches_per_epoch):
                start = k * global_batch + self.rank * self.batch_size
                yield permutation(np.arange(start, start + self.batch_size)).tolist()
            epoch, first = epoch + 1, 0

    def advance(self):
        """Count one optimizer step's micro-batches; True when that ended an epoch."""
        self.epoch_of_last_step = self.epoch + 1
        self.micro_batch += self.accumulation
        if self.micro_batch < self.micro_batches_per_epoch:
            return False
        self.epoch, self.micro_batch = self.epoch + 1, 0
        return True

    def state_dict(self):
        # In windows, so a run resumed with another rank count starts at the same data.
        return {"epoch": self.epoch, "batch_in_epoch": self.micro_batch,
                "windows_in_epoch": self.micro_batch * self.batch_size * self.world_size}

    def load_state_dict(self, state, log):
        windows_per_batch = self.batch_size * self.world_size
        self.epoch = state["epoch"]
        self.micro_batch = state["windows_in_epoch"] // windows_per_batch
        if state["windows_in_epoch"] % windows_per_batch:
            log(f"note: the checkpoint stopped {state['windows_in_epoch']} windows into the "
                f"epoch, not a multiple of this run's {windows_per_batch} per micro-batch; "
                f"continuing from micro-batch {self.micro_batch}")


def _identity(batch):
    return batch


# ---------------------------------------------------------------------------
# Building blocks of the Trainer

def build_optimizer(model, config):
    """AdamW (or Adam) with weight decay on matrices only, fused where the device has it."""
    decay, no_decay = [], []
    for parameter in model.parameters():
        if parameter.requires_grad:
            # Matrices (linear, embedding, conv kernels) decay; biases and norms don't.
            (decay if parameter.dim() >= 2 else no_decay).append(parameter)
    groups = [{"params": decay, "weight_decay": config["weight_decay"]},
              {"params": no_decay, "weight_decay": 0.0}]
    optimizer_class = torch.optim.AdamW if config["optimizer_type"] == "AdamW" else torch.optim.Adam
    options = dict(lr=config["learning_rate"], betas=(config["adam_beta1"], config["adam_beta2"]),
                   eps=config["adam_eps"])
    try:
        return optimizer_class(groups, fused=True, **options)
    except (RuntimeError, TypeError):  # fused kernels missing for this device
        return optimizer_class(groups, foreach=True, **options)


def compile_or_fall_back(model, probe, log):
    """torch.compile(model), or `model` with a warning where compiling fails. Compiling
    happens at the first call, so `probe(compiled)` runs one forward/backward now: a
    platform without a working compiler falls back here instead of crashing at step 1."""
    try:
        compiled = torch.compile(model)
        probe(compiled)
        return compiled
    except Exception as error:  # no compiler, unsupported platform or Python
        reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
        log(f"warning: torch.compile failed ({type(error).__name__}: {reason}); "
            f"training uncompiled")
        return model


class StopRequests:
    """SIGINT and SIGTERM. The first asks training to stop after the current step (latest
    is then saved). Schedulers send SIGTERM to every process, often more than once: more
    SIGTERMs change nothing. A second SIGINT, typed by a person, aborts at once, except
    during a checkpoint write, which it lets finish first."""

    def __init__(self, log):
        self.log, self.reason = log, None
        self.writing, self.abort_pending = False, False

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.reason is None:
            self.reason = name
            self.log(f"\n{name} received: finishing the current step, then saving the "
                     f"latest checkpoint" + (" (press Ctrl-C again to abort at once)"
                                              if signum == signal.SIGINT else ""))
        elif signum == signal.SIGINT:
            if not self.writing:
                raise KeyboardInterrupt
            self.abort_pending = True
            self.log("\nSIGINT received again: aborting once the checkpoint is written")

    @contextlib.contextmanager
    def installed(self):
        previous = {}
        with contextlib.suppress(ValueError):  # not in the main thread: leave signals alone
            for signum in (signal.SIGINT, signal.SIGTERM):
                previous[signum] = signal.signal(signum, self._handle)
        try:
            yield self
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    @contextlib.contextmanager
    def protecting_a_write(self):
        self.writing = True
        try:
            yield
        finally:
            self.writing = False
        if self.abort_pending:
            raise KeyboardInterrupt


def profiler_context(config, device):
    """torch.profiler over a window of steps, or a null context yielding None."""
    if not config["enable_profiler"]:
        return contextlib.nullcontext()
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    os.makedirs(config["profiler_log_dir"], exist_ok=True)
    return torch.profiler.profile(
        activities=activities,
        schedule=torch.profiler.schedule(
            wait=config["profiler_schedule_wait"], warmup=config["profiler_schedule_warmup"],
            active=config["profiler_schedule_active"], repeat=config["profiler_schedule_repeat"]),
        on_trace_ready=torch.profiler.tensorboard_trace_handler(config["profiler_log_dir"]),
        record_shapes=True)


class TrainingLog:
    """What a run shows and records, on the main rank only: a progress bar (on a
    terminal), a line every print_every steps, a metrics.csv row every metrics_every
    steps and at each validation. Training losses are averaged since the last row."""

    def __init__(self, config, bytes_per_step, total_steps, first_step, enabled):
        self.config, self.bytes_per_step, self.enabled = config, bytes_per_step, enabled
        self.path = os.path.join(config["checkpoint_dir"], "metrics.csv")
        if enabled and not os.path.exists(self.path):
            self._append(METRICS_COLUMNS)
        self.bar = tqdm(total=total_steps, initial=first_step, dynamic_ncols=True, leave=False,
                        # A bar redrawn into a log file is noise: the log lines suffice.
                        disable=not (enabled and sys.stderr.isatty()))
        self._reset()

    def _reset(self):
        self.loss_sum, self.steps, self.started = 0.0, 0, time.perf_counter()

    def _append(self, values):
        with open(self.path, "a", newline="") as file:
            csv.writer(file).writerow(["" if v is None else (f"{v:.6g}" if isinstance(v, float)
                                                              else v) for v in values])

    def message(self, text):
        if self.enabled:
            tqdm.write(text)

    def step(self, step, epoch, loss, learning_rate, elapsed):
        c = self.config
        self.loss_sum, self.steps = self.loss_sum + loss, self.steps + 1
        self.bar.update(1)
        self.bar.set_description(f"epoch {epoch}/{c['num_epochs']}")
        self.bar.set_postfix(loss=f"{loss:.3f}", bpb=f"{bits_per_byte(loss):.3f}",
                             lr=f"{learning_rate:.2e}")
        if step % c["metrics_every"] and step % c["print_every"]:
            return
        mean = self.loss_sum / self.steps
        rate = self.bytes_per_step * self.steps / (time.perf_counter() - self.started)
        self._reset()
        if self.enabled:
            self._append((step, epoch, mean, None, None, learning_rate, rate, elapsed))
        if step % c["print_every"] == 0:
            self.message(f"step {step}/{self.bar.total} | loss {mean:.4f} "
                         f"({bits_per_byte(mean):.3f} bpb) | lr {learning_rate:.2e} | "
                         f"{rate:,.0f} bytes/s")

    def validation(self, step, epoch, val_loss, learning_rate, elapsed, improved):
        self.message(f"step {step}: validation loss {val_loss:.4f} nats = "
                     f"{bits_per_byte(val_loss):.3f} bits/byte"
                     + (" (best so far, saved)" if improved else ""))
        if self.enabled:
            self._append((step, epoch, None, val_loss, bits_per_byte(val_loss), learning_rate,
                          None, elapsed))

    def close(self):
        self.bar.close()


# ---------------------------------------------------------------------------

class Trainer:
    def __init__(self, model, train_dataset, val_dataset, config, device,
                 architecture_keys=(), sample_fn=None):
        """`architecture_keys` are the config keys a checkpoint must share to be resumed.
        `sample_fn(prompt)` returns text for the interim samples (None = no samples)."""
        self.config, self.device = config, device
        self.train_dataset, self.val_dataset = train_dataset, val_dataset
        self.architecture_keys, self.sample_fn = tuple(architecture_keys), sample_fn
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world_size = dist.get_world_size() if dist.is_initialized() else 1
        self.is_main = self.rank == 0

        self.raw_model = unwrap_model(model)
        self.amp_dtype = resolve_amp_dtype(config, device)
        self.model = model
        if config["use_torch_compile"]:
            self.model = compile_or_fall_back(model, self._probe_step, self._log)
        if self.world_size > 1:
            self.model = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[device.index] if device.type == "cuda" else None)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp_dtype == torch.float16)
        self.optimizer = build_optimizer(self.raw_model, config)

        self.order = BatchOrder(len(train_dataset), config["batch_size"],
                                config["gradient_accumulation_steps"], config["seed"],
                                self.rank, self.world_size)
        if self.order.steps_per_epoch == 0:
            raise UserError(f"the training split has {len(train_dataset)} windows but one "
                            f"optimizer step needs {self.windows_per_step()} (batch_size x "
                            f"ranks x gradient_accumulation_steps): add data or lower "
                            f"batch_size")
        total = self.order.steps_per_epoch * config["num_epochs"]
        self.total_steps = min(total, config["max_steps"] or total)
        minutes = config["max_train_minutes"]
        self.time_budget = minutes * 60 if minutes else None
        self.schedule = LearningRateSchedule(config, self.total_steps, self.time_budget)

        # Progress, restored on resume (the data position lives in self.order).
        self.step, self.best_val_loss = 0, math.inf
        self.elapsed_before = 0.0  # seconds of training in earlier (resumed-from) runs
        self._start_time = time.perf_counter()  # train() restarts it
        self.stop = StopRequests(self._log)

    def windows_per_step(self):
        c = self.config
        return c["batch_size"] * self.world_size * c["gradient_accumulation_steps"]

    def _probe_step(self, compiled):
        x, y = self.train_dataset.__getitems__([0])
        try:
            with self._autocast():
                compiled(x.to(self.device), y.to(self.device)).backward()
        finally:
            self.raw_model.zero_grad(set_to_none=True)

    def _log(self, message):
        if self.is_main:
            tqdm.write(message)

    def _autocast(self):
        return autocast_context(self.device, self.amp_dtype)

    # -- checkpoints -----------------------------------------------------------

    def state_dict(self):
        return {
            "format_version": FORMAT_VERSION,
            "model_state": self.raw_model.state_dict(),
            "optimizer_state": self.optimizer.state_dict(),
            "scheduler_state": self.schedule.state_dict(),
            "scaler_state": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "step": self.step, **self.order.state_dict(),
            "best_val_loss": self.best_val_loss,
            "elapsed_seconds": self.elapsed_seconds(),
            "rng_states": capture_rng_states(),
            "config": dict(self.config),
        }

    def save(self, kind):
        if not self.is_main:
            return None
        path = checkpoint_path(self.config, kind)
        with self.stop.protecting_a_write():
            save_checkpoint(self.state_dict(), path)
        return path

    def resume(self, path):
        state = load_for_resume(path, self.config, self.architecture_keys)
        try:
            self.raw_model.load_state_dict(state["model_state"])
            self.optimizer.load_state_dict(state["optimizer_state"])
        except (RuntimeError, ValueError, KeyError) as error:
            raise UserError(f"checkpoint {path} does not fit this model: {error}") from None
        self.schedule.load_state_dict(state["scheduler_state"])
        if state["scaler_state"] and self.scaler.is_enabled():
            self.scaler.load_state_dict(state["scaler_state"])
        self.step = state["step"]
        self.order.load_state_dict(state, self._log)
        self.best_val_loss = state["best_val_loss"]
        if self.config["reset_best_val_loss_on_resume"]:
            self.best_val_loss = math.inf
        self.elapsed_before = state["elapsed_seconds"]
        restore_rng_states(state["rng_states"])
        self._log(f"resumed from {path}: step {self.step}, epoch {self.order.epoch + 1}, "
                  f"best validation loss {self.best_val_loss:.4f}")

    # -- evaluation ------------------------------------------------------------

    def validation_indices(self):
        """A fixed, evenly spread set of validation windows (same every time)."""
        cap = self.config["eval_max_batches"]
        per_eval = None if cap is None else cap * self.config["batch_size"] * self.world_size
        return evenly_spread(len(self.val_dataset), per_eval).tolist()

    def evaluate(self):
        """Validation loss of the training objective in nats per byte, over every rank's
        share of the validation windows."""
        indices = self.validation_indices()[self.rank::self.world_size]
        totals = score_windows(self.raw_model, self.val_dataset.data,
                               self.val_dataset.window_starts(indices),
                               self.val_dataset.sequence_length, self.device, self.amp_dtype,
                               self.config["batch_size"]).summed_over_ranks(self.device)
        last_byte = self.config.get("training_objective") == "last_byte"
        return totals.last_byte_nats if last_byte else totals.nats_per_byte

    # -- the loop --------------------------------------------------------------

    def elapsed_seconds(self):
        return self.elapsed_before + (time.perf_counter() - self._start_time)

    def current_lr(self):
        return self.optimizer.param_groups[0]["lr"]

    def train_step(self, micro_batches):
        """One optimizer step over `gradient_accumulation_steps` micro-batches."""
        rate = self.schedule.learning_rate(self.step, self.elapsed_seconds())
        for group in self.optimizer.param_groups:
            group["lr"] = rate
        total_loss = 0.0
        for index, (x, y) in enumerate(micro_batches):
            last = index == len(micro_batches) - 1
            # DDP: synchronise gradients on the last micro-step only.
            no_sync = self.world_size > 1 and not last
            with self.model.no_sync() if no_sync else contextlib.nullcontext():
                with self._autocast():
                    loss = self.model(x.to(self.device, non_blocking=True),
                                      y.to(self.device, non_blocking=True))
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

    def _batches(self):
        """This rank's micro-batches from the current position on, across epochs."""
        order = self.order.micro_batches(self.order.epoch, self.order.micro_batch)
        # A private generator: the loader must not draw from the global RNG, or a resumed
        # run would see different dropout masks than an uninterrupted one.
        return iter(DataLoader(self.train_dataset, batch_sampler=order, collate_fn=_identity,
                               num_workers=self.config["num_workers"],
                               generator=torch.Generator().manual_seed(self.config["seed"]),
                               pin_memory=self.device.type == "cuda"))

    def _stop_reason(self):
        """Why training ends now, agreed by every rank, or None."""
        c = self.config
        reason = self.stop.reason
        if reason is None and self.order.epoch >= c["num_epochs"]:
            reason = "num_epochs"
        if reason is None and c["max_steps"] and self.step >= c["max_steps"]:
            reason = "max_steps"
        if reason is None and self.time_budget and self.elapsed_seconds() >= self.time_budget:
            reason = "max_train_minutes"
        if self.world_size > 1:  # one rank stopping alone would hang the others
            flag = torch.tensor([0 if reason is None else 1], device=self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            if flag.item() and reason is None:
                reason = "another rank stopped"
        return reason

    def train(self):
        """Train until the epochs, max_steps or the time budget run out, or a signal.
        Returns a summary dict."""
        c = self.config
        os.makedirs(c["checkpoint_dir"], exist_ok=True)
        self.log = TrainingLog(c, self.windows_per_step() * self.train_dataset.sequence_length,
                               self.total_steps, self.step, self.is_main)
        self.log.message(f"training {self.total_steps} steps at most "
                         f"({self.order.steps_per_epoch} per epoch, {self.windows_per_step()} "
                         f"windows per step)" + (f", {c['max_train_minutes']} minutes at most"
                                                 if self.time_budget else ""))
        self._start_time = time.perf_counter()
        self.model.train()
        batches = self._batches()
        with self.stop.installed(), profiler_context(c, self.device) as profiler:
            reason, steps_run = self._stop_reason(), 0
            while reason is None:
                loss = self.train_step([next(batches) for _ in range(self.order.accumulation)])
                epoch_ended = self.order.advance()
                if profiler is not None:  # None when enable_profiler is off
                    profiler.step()
                reason, steps_run = self._stop_reason(), steps_run + 1
                self._after_step(loss, epoch_ended, reason)
            if steps_run == 0:  # a resumed run with nothing left to train
                self._after_step(None, False, reason)
        self.log.close()
        self._report_end(reason, profiler)
        return {"steps": self.step, "reason": reason, "best_val_loss": self.best_val_loss,
                "elapsed_seconds": self.elapsed_seconds(),
                "interrupted": bool(self.stop.reason)}

    def _after_step(self, loss, epoch_ended, reason):
        """Everything a finished step calls for, in one place: log, validate (and save
        best), sample, save latest and epoch snapshots. `reason` is set on the last step."""
        c, step, epoch = self.config, self.step, self.order.epoch_of_last_step
        if loss is not None:
            self.log.step(step, epoch, loss, self.current_lr(), self.elapsed_seconds())
        interrupted = self.stop.reason is not None
        if step % c["validate_and_checkpoint_best_every_batches"] == 0 or epoch_ended or \
                (reason and not interrupted):
            val_loss = self.evaluate()
            self.schedule.on_validation(val_loss)
            improved = val_loss < self.best_val_loss
            if improved:
                self.best_val_loss = val_loss
                self.save("best")
            self.log.validation(step, epoch, val_loss, self.current_lr(),
                                self.elapsed_seconds(), improved)
        if c["test_every_batches"] and step % c["test_every_batches"] == 0:
            self._interim_sample()
        if epoch_ended and c["save_epoch_snapshots"] and self.is_main:
            self.save(f"epoch{self.order.epoch}")
            prune_epoch_snapshots(c)
        if step % c["checkpoint_every_batches"] == 0 or reason:
            self.save("latest")

    def _interim_sample(self):
        if not (self.sample_fn and self.is_main):
            return
        prompt = self.config["interim_test_prompt"]
        text = self.sample_fn(prompt)
        self._log(f"--- sample at step {self.step} ---\n{prompt}{text}\n---")
        path = os.path.join(self.config["checkpoint_dir"], "interim_samples.txt")
        with open(path, "a", encoding="utf-8") as file:
            file.write(f"=== step {self.step} ===\n{prompt}{text}\n\n")

    def _report_end(self, reason, profiler):
        c = self.config
        if c["enable_profiler"] and self.is_main and profiler is not None:
            self._log(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
            self._log(f"profiler trace written to {c['profiler_log_dir']}")
        if self.stop.reason:
            self._log(f"stopped by {self.stop.reason} after step {self.step}; saved "
                      f"{checkpoint_path(c, 'latest')}.\nResume with: python3 main.py "
                      f"--resume_from_checkpoint=latest")
        else:
            self._log(f"training finished ({reason}) after {self.step} steps, "
                      f"{self.elapsed_seconds():.0f} s; best validation loss "
                      f"{self.best_val_loss:.4f} nats = {bits_per_byte(self.best_val_loss):.3f} "
                      f"bits/byte")
