"""Training loop for any model with `model(x, targets) -> mean loss in nats` and
`model(x) -> logits (B, T, 256)` (the second for validation).

The Trainer owns the optimizer, the learning-rate schedule, mixed precision, validation,
metrics, checkpoints with exact resume, signals and the profiler. Its loop reads like
nanoGPT's: set the rate and step, then decide what else this step calls for.
"""

import contextlib
import csv
import hashlib
import io
import math
import os
import signal
import sys
import time
import weakref

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from checkpoint import (FORMAT_VERSION, DiskFull, capture_rng_states, checkpoint_path,
                        load_for_resume, prune_epoch_snapshots, restore_rng_states,
                        save_checkpoint, setting_differences, unwrap_model)
from config import keys_with
from dataset import BatchOrder, corpus_fingerprint
from evaluate import bounded_plan, evenly_spread, score_text, score_windows
from utils import (PRECISION_DTYPES, UserError, agree_across_ranks, atomic_output,
                   autocast_context, bits_per_byte, cpu_has_bf16_units, error_summary,
                   move_aside, precision_name, profiled, read_log_rows, run_precision)

METRICS_COLUMNS = ("step", "epoch", "train_loss", "val_loss", "val_bits_per_byte",
                   "learning_rate", "bytes_per_second", "elapsed_seconds", "event",
                   "scored_bytes", "split_bytes")  # the last two: final validation only

# The config keys, besides the architecture (which a resume must share), that decide what
# training does from a checkpoint on. A resume where one differs is a continuation with
# changes, not an exact resume, and says which (tests/test_trainer.py classifies every
# key of CONFIG_V3, so a new key cannot be left out unnoticed).
TRAINING_KEYS = keys_with("training")


class TrainingDiverged(UserError):
    """The loss became NaN or infinite."""


def schedule_problems(c):
    """Cross-key rules of the schedule (only keys whose own values are valid are in `c`)."""
    if "lr_scheduler_eta_min" in c and "learning_rate" in c \
            and c["lr_scheduler_eta_min"] > c["learning_rate"]:
        return [f"`lr_scheduler_eta_min` ({c['lr_scheduler_eta_min']}) is above "
                f"`learning_rate` ({c['learning_rate']})"]
    return []


def optimizer_problems(c):
    """Cross-key rules of RowSparseAdamW's closed forms (sparse_table_updates)."""
    if not c.get("sparse_table_updates"):
        return []
    problems = []
    # It sums log(1 - lr * weight_decay); no rate exceeds the peak.
    if "learning_rate" in c and "weight_decay" in c \
            and c["learning_rate"] * c["weight_decay"] >= 1:
        problems.append(f"`learning_rate` x `weight_decay` ({c['learning_rate']} x "
                        f"{c['weight_decay']}) is 1 or more: each step's decay, by (1 - their "
                        f"product), would zero or flip the weights; sparse_table_updates "
                        f"needs it below 1")
    # A skipped row's moves by momentum are a geometric series of this ratio (coasting).
    if "adam_beta1" in c and "adam_beta2" in c \
            and c["adam_beta1"] >= math.sqrt(c["adam_beta2"]):
        problems.append(f"`adam_beta1` ({c['adam_beta1']}) is not below the square root of "
                        f"`adam_beta2` ({c['adam_beta2']}): the momentum fades slower than "
                        f"the root of the second moment, and sparse_table_updates cannot "
                        f"sum a skipped row's moves; raise adam_beta2 or lower adam_beta1")
    return problems


def schedule_warnings(schedule):
    """What the schedule, as configured, cannot do within the run's step limit."""
    steps, warmup = schedule.step_limit, schedule.warmup_steps
    if warmup >= steps:
        reach = "never reaches" if warmup > steps else "reaches only at the last step"
        return [f"lr_warmup_steps ({warmup}) is not shorter than this run ({steps} steps): "
                f"the learning rate {reach} its peak and never decays; lower lr_warmup_steps"]
    if schedule.kind == "wsd":
        decay = max(1, round(schedule.decay_fraction * steps))
        if steps - decay < warmup:
            return [f"the wsd decay (the last {decay} of {steps} steps, lr_decay_fraction "
                    f"{schedule.decay_fraction}) begins inside the {warmup}-step warmup: the "
                    f"rate never holds its peak; lower lr_decay_fraction or lr_warmup_steps"]
    return []


# ---------------------------------------------------------------------------
# Learning-rate schedule

class LearningRateSchedule:
    """The learning rate as a pure function of the step and of recorded decisions (the
    horizon estimates below; for ReduceLROnPlateau, the validations so far), so a resumed
    run follows exactly the curve of an uninterrupted one: warmup, then cosine, wsd
    (warmup-stable-decay), plateau or constant.

    The curve ends at the horizon, the step at which the run will end. With a time budget
    that step is not known in advance: it is estimated from the measured time per step,
    first at this run's step PROBE_STEPS[1], then again each time 1/STEPS_LEFT_SHARE of the
    steps left have run (MIN_GAP steps at least), so it follows a machine whose speed
    changes, more closely as the end nears. Each estimate is recorded (state_dict): a
    resumed run replays them and makes new ones only after its resume step, and between
    estimates the clock is never read for the rate. The decay goes on from where it stands
    at each new estimate (`decay_done`), so the rate does not jump. Until the first
    estimate the step limit stands in for the horizon."""

    PROBE_STEPS = (3, 23)  # this run's clock is read from its step 3 (after warm-up) on
    STEPS_LEFT_SHARE = 8  # estimates per run's rest: a few dozen in a run of any length
    MIN_GAP = 20  # steps between two estimates at least

    def __init__(self, config, step_limit, time_budget_seconds=None):
        self.peak = config["learning_rate"]
        self.kind = config["scheduler_type"]
        self.warmup_steps = config["lr_warmup_steps"] if config["use_lr_warmup"] else 0
        self.init_factor = config["lr_warmup_init_factor"]
        self.eta_min = config["lr_scheduler_eta_min"]
        self.cosine_length = config["lr_scheduler_T_max"]
        self.decay_fraction = config["lr_decay_fraction"]
        self.step_limit, self.time_budget = step_limit, time_budget_seconds
        self.estimates = []  # {"at_step", "elapsed", "seconds_per_step"}, in step order
        self._timed_from = None  # (step, elapsed) where this run's current timing began
        self._estimated_at = 0  # this run's last estimate, recorded or not
        # ReduceLROnPlateau state: a multiplier cut after `patience` bad validations.
        self.factor = config["lr_scheduler_factor"]
        self.patience = config["lr_scheduler_patience"]
        self.plateau_scale = 1.0
        self.plateau_best = math.inf
        self.plateau_bad_checks = 0

    @property
    def estimated(self):
        """Whether the horizon is an estimate from the clock (not the step limit)."""
        return bool(self.time_budget and self.estimates)

    def horizon(self):
        """The step the run is expected to end at: the step limit, or sooner where the
        time budget, at the last estimated speed, ends the run first."""
        return self._horizon_of(self.estimates[-1]) if self.estimated else self.step_limit

    def _horizon_of(self, estimate):
        at = estimate["at_step"]
        by_time = at + int((self.time_budget - estimate["elapsed"]) / estimate["seconds_per_step"])
        return max(at + 1, min(self.step_limit, by_time))

    def _next_estimate(self):
        if not self.estimates:
            return 0
        at = max(self.estimates[-1]["at_step"], self._estimated_at)
        return at + max(self.MIN_GAP, (self.horizon() - at) // self.STEPS_LEFT_SHARE)

    def observe(self, steps_run, step, elapsed_seconds, device=None):
        """Called after each step of this run; estimates the horizon when one is due, from
        the time per step since this run's last estimate (or its step 3). Every rank takes
        rank 0's measurement. An estimate that moves the horizon is recorded; one that
        does not changes nothing, so a resumed run at the same speed is the same run."""
        if not self.time_budget:
            return
        if steps_run == self.PROBE_STEPS[0]:
            self._timed_from = (step, elapsed_seconds)
        if steps_run < self.PROBE_STEPS[1] or step < self._next_estimate():
            return
        since_step, since = self._timed_from
        seconds_per_step = (elapsed_seconds - since) / (step - since_step)
        seconds_per_step, elapsed = agree_across_ranks([seconds_per_step, elapsed_seconds],
                                                       "first", device)
        estimate = {"at_step": step, "elapsed": elapsed,
                    "seconds_per_step": max(seconds_per_step, 1e-9)}
        if not self.estimates or self._horizon_of(estimate) != self.horizon():
            self.estimates.append(estimate)
        self._timed_from, self._estimated_at = (step, elapsed_seconds), step

    def decay_done(self, step):
        """(the fraction of the decay after warmup done by `step`, the horizon in effect
        at `step`). The fraction is linear in the step from the warmup's end to 1 at the
        horizon's last step, and from each estimate on (in effect once warmup is over),
        linear from where it stood to 1 at that estimate's last step."""
        def along(anchor, done, horizon, at):
            return done + (1 - done) * (at - anchor) / max(horizon - 1 - anchor, 1)
        anchor, done, horizon = self.warmup_steps, 0.0, self.step_limit
        for estimate in self.estimates if self.time_budget else ():
            at = max(estimate["at_step"], self.warmup_steps)
            if step < at:
                break
            anchor, done, horizon = at, along(anchor, done, horizon, at), self._horizon_of(estimate)
        return along(anchor, done, horizon, step), horizon

    def learning_rate(self, step):
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
        if self.kind == "wsd":  # warmup, stable, then a linear decay over the last part
            done, horizon = self.decay_done(step)
            decay_steps = max(1, round(self.decay_fraction * horizon))
            steps_left = (1 - done) * (horizon - 1 - self.warmup_steps)
            progress = min(max(1 - steps_left / decay_steps, 0.0), 1.0)
            return self.peak + (self.eta_min - self.peak) * progress
        if self.cosine_length:
            progress = min((step - self.warmup_steps) / max(self.cosine_length - 1, 1), 1.0)
        else:
            progress = min(self.decay_done(step)[0], 1.0)
        return self.eta_min + (self.peak - self.eta_min) * 0.5 * (1 + math.cos(math.pi * progress))

    def forget_validations(self):
        """ReduceLROnPlateau forgets its best loss (measured on other validation text)."""
        self.plateau_best, self.plateau_bad_checks = math.inf, 0

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
                "plateau_bad_checks": self.plateau_bad_checks,
                "horizon_estimates": [dict(estimate) for estimate in self.estimates]}

    def load_state_dict(self, state):
        self.plateau_scale = state["plateau_scale"]
        self.plateau_best = state["plateau_best"]
        self.plateau_bad_checks = state["plateau_bad_checks"]
        # Older checkpoints hold one estimate ("horizon_probe"), or none.
        probe = state.get("horizon_probe")
        self.estimates = [dict(e) for e in state.get("horizon_estimates", [probe] if probe else [])]


# ---------------------------------------------------------------------------
# Building blocks of the Trainer

def build_optimizers(model, config, amp_dtype=None):
    """[AdamW (or Adam)] with weight decay on matrices only; with "Muon", [AdamW, Muon]:
    Muon takes the transformer layers' matrices (model.hidden_matrices()) and AdamW the
    rest. With sparse_table_updates the embedding tables of model.sparse_tables() leave
    AdamW for a RowSparseAdamW, appended last, that updates only the rows a step used. Each
    parameter group carries `lr_ratio`, its peak rate over learning_rate, so one schedule
    drives them all. Muon orthogonalizes in bf16 when the run trains under bf16 autocast
    (`amp_dtype`), else in fp32: one precision decision per run."""
    muon = config["optimizer_type"] == "Muon"
    hidden = list(model.hidden_matrices()) if muon else []
    # Adam's decay is in the gradient, not decoupled as RowSparseAdamW's: its tables stay dense.
    sparse = config["sparse_table_updates"] and config["optimizer_type"] != "Adam"
    tables = [table for table in model.sparse_tables() if table.weight.requires_grad] \
        if sparse and hasattr(model, "sparse_tables") else []
    taken = {id(p) for p in hidden + [table.weight for table in tables]}
    decay, no_decay = [], []
    for parameter in model.parameters():
        if parameter.requires_grad and id(parameter) not in taken:
            # Matrices (linear, embedding, conv kernels) decay; biases and norms don't.
            (decay if parameter.dim() >= 2 else no_decay).append(parameter)
    groups = [{"params": decay, "weight_decay": config["weight_decay"], "lr_ratio": 1.0},
              {"params": no_decay, "weight_decay": 0.0, "lr_ratio": 1.0}]
    adam_class = torch.optim.Adam if config["optimizer_type"] == "Adam" else torch.optim.AdamW
    options = dict(lr=config["learning_rate"], betas=(config["adam_beta1"], config["adam_beta2"]),
                   eps=config["adam_eps"])
    try:
        optimizers = [adam_class(groups, fused=True, **options)]
    except (RuntimeError, TypeError):  # fused kernels missing for this device
        optimizers = [adam_class(groups, foreach=True, **options)]
    if muon:
        ratio = config["muon_learning_rate"] / config["learning_rate"]
        optimizers.append(Muon([{"params": hidden, "lr_ratio": ratio}],
                               orthogonalize_in_bf16=amp_dtype == torch.bfloat16,
                               lr=config["muon_learning_rate"],
                               momentum=config["muon_momentum"], weight_decay=0.0))
    if tables:
        optimizers.append(RowSparseAdamW(tables, weight_decay=config["weight_decay"], **options))
    return optimizers


def coasting(exp_avg, exp_avg_sq, last_step, skipped, betas, eps, keep=1.0):
    """(R, width): the sum of AdamW's update directions m^_j / (sqrt(v^_j) + eps) over the
    `skipped` steps j = 1..k after a row's update at `last_step` (both (R, 1)), in which
    its gradient was zero, each times keep^(k-j), the decay of the steps after it. As
    m_j = beta1^j m and v_j = beta2^j v, the terms are m^ / sqrt(v^) times a geometric
    series of ratio beta1 / sqrt(beta2), summed here per row in closed form, with the
    bias corrections of step last_step + 1 throughout. eps is kept as in the step after
    the update: exact while sqrt(v^_j) stays far above eps (for any gradient not tiny,
    for longer than the series lasts); for tiny gradients the series is the upper bound."""
    beta1, beta2 = betas
    after, k = (last_step + 1).double(), skipped.double()
    fading = beta1 / math.sqrt(beta2)  # below 1: optimizer_problems
    ratio = fading / keep
    # keep^k (ratio + ... + ratio^k), written so that no power exceeds 1
    series = k * keep ** k if ratio == 1 else ratio * (keep ** k - fading ** k) / (1 - ratio)
    scale = (series / (1 - beta1 ** after)).to(exp_avg.dtype)  # (R, 1)
    # sqrt(v) as 1 / rsqrt(v): the CPU's sqrt takes a slow path at 0, the v of every row
    # a step uses for the first time
    root_v = exp_avg_sq.rsqrt().reciprocal_() / (1 - beta2 ** after).sqrt().to(exp_avg.dtype)
    return exp_avg / root_v.add_(eps) * scale


class RowSparseAdamW(torch.optim.Optimizer):
    """AdamW for embedding tables (nn.Embedding modules) that reads and writes only the
    rows a step looked up. A step of B x T bytes uses at most B x T rows of each n-gram
    table, a small part of its buckets, where dense AdamW reads and writes every row's
    weights, gradient and two moments.

    A forward pre-hook on each module records the indices it looks up while gradients are
    on (training forwards: not validation or sampling); zero_grad forgets them. Under
    torchrun the ranks' rows are united (a max all-reduce of a row mask), as the all-
    reduced gradients are. The gradients stay dense, so gradient accumulation, DDP,
    GradScaler and clipping by the global norm see what they see without it. A table must
    be used through its module's forward only: a row reached through `.weight` directly
    (weight tying) would never be recorded, so never updated. Where no index was recorded
    but a gradient is there (a model under torch.compile runs no module hooks), the rows
    are found from the gradient instead: slower, the same rows.

    A row that skipped k steps is caught up when it is next updated, to what dense AdamW
    would have made of it with a zero gradient: its weights are multiplied by the product
    of (1 - lr * weight_decay) over those steps (a running sum of logs, as the rate
    changes each step), moved as its momentum alone would have moved them (coasting: in
    closed form, at this step's rate), and its moments multiplied by beta^k
    (docs/design.md, Sparse updates of the embedding tables)."""

    # Per-row state that load_state_dict must not cast to the parameter's dtype (it casts
    # every state tensor but "step"): step counts and float64 sums of logs.
    EXACT_STATE = ("last_step", "decay_mark")

    def __init__(self, embeddings, lr, betas, eps, weight_decay, lr_ratio=1.0):
        super().__init__([module.weight for module in embeddings],
                         dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                              lr_ratio=lr_ratio))
        self.looked_up = {}  # weight -> [index tensors] since the last zero_grad
        record = weakref.WeakMethod(self._record)  # a table may outlive its optimizer

        def hook(module, args):
            if record() is not None:
                record()(module, args)
        for module in embeddings:
            module.register_forward_pre_hook(hook)

    def _record(self, module, args):
        if torch.is_grad_enabled():
            self.looked_up.setdefault(module.weight, []).append(args[0].detach().flatten())

    def zero_grad(self, set_to_none=True):
        super().zero_grad(set_to_none)
        self.looked_up.clear()

    def used_rows(self, params):
        """(R,) sorted indices of the rows of each param this step used, on any rank."""
        masks = []
        for param in params:
            mask = param.new_zeros(param.size(0), dtype=torch.int32)
            if param in self.looked_up:
                mask.index_fill_(0, torch.cat(self.looked_up[param]), 1)
            else:
                mask.copy_(param.grad.abs().amax(dim=1) > 0)
            masks.append(mask)
        if dist.is_initialized() and dist.get_world_size() > 1:
            united = torch.cat(masks)
            dist.all_reduce(united, op=dist.ReduceOp.MAX)
            masks = united.split([param.size(0) for param in params])
        return [mask.nonzero().squeeze(1) for mask in masks]

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            params = [param for param in group["params"] if param.grad is not None]
            for param, rows in zip(params, self.used_rows(params)):
                self._update_rows(param, rows, group)
        return None

    def _update_rows(self, param, rows, group):
        state, (beta1, beta2) = self.state[param], group["betas"]
        lr, weight_decay = group["lr"], group["weight_decay"]
        if not state:
            state.update(step=0, decay_logs=0.0,  # sum of log(1 - lr * wd) over steps so far
                         exp_avg=torch.zeros_like(param), exp_avg_sq=torch.zeros_like(param),
                         # per row: the step of its last update (0: none), decay_logs then
                         last_step=param.new_zeros(param.size(0), dtype=torch.int64),
                         decay_mark=param.new_zeros(param.size(0), dtype=torch.float64))
        state["step"] += 1
        step = state["step"]
        grad = param.grad.index_select(0, rows)  # (R, width)
        exp_avg = state["exp_avg"].index_select(0, rows)
        exp_avg_sq = state["exp_avg_sq"].index_select(0, rows)
        weights = param.index_select(0, rows)
        last = state["last_step"].index_select(0, rows)[:, None]  # (R, 1)
        skipped = (step - 1 - last).to(param.dtype)  # 0 for a row used last step
        # The steps a row skipped, as dense AdamW took them with a zero gradient: its
        # decay, its move by momentum alone, its moments' decay.
        if weight_decay:
            owed = state["decay_logs"] - state["decay_mark"].index_select(0, rows)[:, None]
            weights.mul_(owed.exp().to(param.dtype))
        if beta1:
            weights.sub_(coasting(exp_avg, exp_avg_sq, last, skipped, group["betas"],
                                  group["eps"], keep=1 - lr * weight_decay), alpha=lr)
        exp_avg.mul_(beta1 ** skipped)
        exp_avg_sq.mul_(beta2 ** skipped)
        if weight_decay:
            weights.mul_(1 - lr * weight_decay)
            state["decay_logs"] += math.log1p(-lr * weight_decay)
            state["decay_mark"].index_fill_(0, rows, state["decay_logs"])
        # As torch.optim.AdamW's single-tensor step, on the rows alone.
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        step_size = lr / (1 - beta1 ** step)
        denom = (exp_avg_sq.sqrt() / (1 - beta2 ** step) ** 0.5).add_(group["eps"])
        weights.addcdiv_(exp_avg, denom, value=-step_size)
        param.index_copy_(0, rows, weights)
        state["exp_avg"].index_copy_(0, rows, exp_avg)
        state["exp_avg_sq"].index_copy_(0, rows, exp_avg_sq)
        state["last_step"].index_fill_(0, rows, step)

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        params = [param for group in self.param_groups for param in group["params"]]
        for index, saved in state_dict["state"].items():
            for key in self.EXACT_STATE:
                self.state[params[index]][key] = saved[key].to(params[index].device)


class Muon(torch.optim.Muon):
    """torch.optim.Muon, which orthogonalizes every update in bf16, or, for runs in fp32,
    the same algorithm (Nesterov momentum, Newton-Schulz with torch's coefficients, the
    "original" rate adjustment, decoupled decay) in the parameters' dtype. fp32 runs need
    it twice over: on CPUs without bf16 units bf16 products cost many times the rest of a
    training step, and an fp32 run should not depend on how bf16 rounds."""

    def __init__(self, params, orthogonalize_in_bf16, **options):
        super().__init__(params, adjust_lr_fn="original", **options)
        self.orthogonalize_in_bf16 = orthogonalize_in_bf16

    @torch.no_grad()
    def step(self, closure=None):
        if self.orthogonalize_in_bf16:
            return super().step(closure)
        for group in self.param_groups:
            momentum = group["momentum"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self.state[param]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(param.grad)
                buffer = state["momentum_buffer"]
                buffer.lerp_(param.grad, 1 - momentum)
                update = param.grad.lerp(buffer, momentum) if group["nesterov"] else buffer
                update = orthogonalize(update, group["ns_coefficients"], group["ns_steps"],
                                       group["eps"])
                rows, columns = param.shape
                param.mul_(1 - group["lr"] * group["weight_decay"])
                param.add_(update, alpha=-group["lr"] * math.sqrt(max(1.0, rows / columns)))
        return None


def orthogonalize(matrix, coefficients, steps, eps):
    """Newton-Schulz iteration towards the nearest semi-orthogonal matrix (U V^T of the
    SVD), in the matrix's own dtype; as torch.optim.Muon's, which runs in bf16.

    For a wide x (m x n, m <= n) each step is x <- M x with M = a I + b G + c G^2, a
    polynomial of the Gram matrix G = x x^T, so x_k = Q_k x_0 and every step can run on
    m x m matrices: Q <- M Q, and G <- M G M^T = M^2 G (M commutes with G). Counting
    multiply-adds for s steps, the direct form costs s (2 m^2 n + m^3) and the Gram form
    2 m^2 n + (4 s - 3) m^3 (G at the start, Q x_0 at the end): less whenever n > 1.5 m,
    34 % and 44 % less at s = 5 for the 1:3 and 1:4 matrices of attention and feed-forward
    layers. Square matrices take the direct iteration."""
    a, b, c = coefficients
    tall = matrix.size(0) > matrix.size(1)
    x = matrix.T if tall else matrix
    x = x / x.norm().clamp(min=eps)  # spectral norm at most 1
    if steps > 1 and 2 * x.size(1) > 3 * x.size(0):  # n > 1.5 m: the Gram form does less
        x = gram_newton_schulz(x, a, b, c, steps)
    else:
        for _ in range(steps):
            gram = x @ x.T
            x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


def gram_newton_schulz(x, a, b, c, steps):
    """`steps` (at least 1) Newton-Schulz steps of orthogonalize() on the Gram matrix of a
    wide x (m x n, m < n)."""
    gram = x @ x.T
    identity = torch.eye(x.size(0), dtype=x.dtype, device=x.device)
    q = None
    for step in range(steps):
        m = torch.addmm(identity, gram, gram, beta=a, alpha=c).add_(gram, alpha=b)
        q = m if q is None else m @ q
        if step < steps - 1:  # the last step's Gram matrix is never read
            gram = m @ (m @ gram)
    return q @ x


def compile_or_fall_back(model, probe, log):
    """torch.compile(model), or `model` with a warning where compiling fails. Compiling
    happens at the first call, so `probe(compiled)` runs one forward/backward now: a
    platform without a working compiler falls back here instead of crashing at step 1."""
    try:
        compiled = torch.compile(model)
        probe(compiled)
        return compiled
    except Exception as error:  # no compiler, unsupported platform or Python
        log(f"warning: torch.compile failed ({error_summary(error)}); training uncompiled")
        return model
    finally:
        model.zero_grad(set_to_none=True)  # the probe's gradients are not a step's


class StopRequests:
    """SIGINT and SIGTERM. The first asks training to stop after the current step (latest
    is then saved). Schedulers send SIGTERM to every process, often more than once: more
    SIGTERMs change nothing. A second SIGINT, typed by a person, aborts at once, except
    during a checkpoint write, which it lets finish first."""

    def __init__(self, log):
        self.log, self.reason = log, None
        self.interrupts, self.writing, self.abort_pending = 0, False, False

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if signum == signal.SIGINT:
            self.interrupts += 1
            if self.interrupts >= 2:
                if not self.writing:
                    raise KeyboardInterrupt
                self.abort_pending = True
                self.log(f"\n{name} received again: aborting once the checkpoint is written")
                return
        if self.reason is None:
            self.reason = name
            self.log(f"\n{name} received: finishing the current step, then saving the "
                     f"latest checkpoint" + (" (press Ctrl-C again to abort at once)"
                                              if signum == signal.SIGINT else ""))

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
    steps and at each validation. Training losses are averaged since the last row.

    metrics.csv is the run's history: a resumed run drops the rows past the step it
    resumed from (a killed run may have logged steps its checkpoint does not hold) and
    marks the resume with an event row; a fresh run moves an earlier file aside."""

    def __init__(self, config, bytes_per_step, first_step, resumed, enabled):
        self.config, self.bytes_per_step, self.enabled = config, bytes_per_step, enabled
        self.path = os.path.join(config["checkpoint_dir"], "metrics.csv")
        self.write_failed = False
        if enabled:
            self._start_file(first_step if resumed else None)
        self.bar = tqdm(initial=first_step, dynamic_ncols=True, leave=False,
                        # A bar redrawn into a log file is noise: the log lines suffice.
                        disable=not (enabled and sys.stderr.isatty()))
        self._reset()

    def _start_file(self, resumed_at):
        rows, unreadable = [], 0
        if os.path.exists(self.path):
            rows, unreadable = read_log_rows(self.path)
            if resumed_at is None and (rows or unreadable):
                aside = move_aside(self.path)
                self.message(f"note: a fresh run; the earlier {self.path} is now {aside}")
                rows, unreadable = [], 0
        if unreadable:
            self.message(f"note: {self.path}: {unreadable} unreadable row(s) (garbled, or "
                         f"half-written by a killed run) left out")
        kept = [row for row in rows if resumed_at is not None and int(row["step"]) <= resumed_at]
        with atomic_output(self.path) as file:
            text = io.TextIOWrapper(file, encoding="utf-8", newline="")
            writer = csv.DictWriter(text, METRICS_COLUMNS, extrasaction="ignore", restval="")
            writer.writeheader()
            writer.writerows(kept)
            text.flush()
            text.detach()
        if resumed_at is not None:
            self._append(resumed_at, event="resume")

    def _reset(self):
        self.loss_sum, self.steps, self.started = 0.0, 0, time.perf_counter()

    def _append(self, step, **values):
        row = [values.get(column) for column in METRICS_COLUMNS]
        row[0] = step
        try:
            with open(self.path, "a", newline="") as file:
                csv.writer(file).writerow(["" if v is None else
                                           (f"{v:.6g}" if isinstance(v, float) else v)
                                           for v in row])
        except OSError as error:  # a full disk: the checkpoints matter more than the log
            if not self.write_failed:
                self.message(f"warning: cannot append to {self.path} ({error.strerror}); "
                             f"training goes on")
            self.write_failed = True

    def message(self, text):
        if self.enabled:
            tqdm.write(text)

    def step(self, step, epoch, loss, learning_rate, elapsed, horizon, estimated=False):
        """`horizon`: the step limit, or with `estimated` the time budget's estimate of the
        last step, which a run may pass before the next estimate moves it on."""
        c = self.config
        self.loss_sum, self.steps = self.loss_sum + loss, self.steps + 1
        horizon = max(horizon, step)
        self.bar.total = horizon
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
            self._append(step, epoch=epoch, train_loss=mean, learning_rate=learning_rate,
                         bytes_per_second=rate, elapsed_seconds=elapsed)
        if step % c["print_every"] == 0:
            where = (f"step {step} (~{horizon:,} expected)" if estimated
                     else f"step {step}/{horizon}")
            self.message(f"{where} | loss {mean:.4f} ({bits_per_byte(mean):.3f} bpb) | lr "
                         f"{learning_rate:.2e} | {rate:,.0f} bytes/s")

    def validation(self, step, epoch, val_loss, learning_rate, elapsed, improved):
        self.message(f"step {step}: validation loss {val_loss:.4f} nats = "
                     f"{bits_per_byte(val_loss):.3f} bits/byte"
                     + (" (best so far, saved)" if improved else ""))
        if self.enabled:
            self._append(step, epoch=epoch, val_loss=val_loss,
                         val_bits_per_byte=bits_per_byte(val_loss),
                         learning_rate=learning_rate, elapsed_seconds=elapsed)

    def final_validation(self, step, totals, elapsed, scope, split_bytes):
        """The final model on `scope` (what was scored, in words) of the validation split:
        shown, and an event row with the bytes scored and the split's size."""
        self.message(f"final model on {scope}; {totals.count:,} bytes scored: "
                     f"{totals.bits_per_byte:.4f} bits/byte ({totals.nats_per_byte:.4f} nats)")
        if self.enabled:
            self._append(step, val_loss=totals.nats_per_byte,
                         val_bits_per_byte=totals.bits_per_byte, elapsed_seconds=elapsed,
                         event="final_validation", scored_bytes=totals.count,
                         split_bytes=split_bytes)

    def sample(self, step, prompt, text):
        """Show an interim sample and append it to interim_samples.txt."""
        if not self.enabled:
            return
        self.message(f"--- sample at step {step} ---\n{prompt}{text}\n---")
        path = os.path.join(self.config["checkpoint_dir"], "interim_samples.txt")
        with open(path, "a", encoding="utf-8") as file:
            file.write(f"=== step {step} ===\n{prompt}{text}\n\n")

    def finish(self, summary, profiler):
        self.bar.close()
        c = self.config
        if profiler is not None:
            self.message(profiler.key_averages().table(sort_by="self_cpu_time_total",
                                                       row_limit=15))
            self.message(f"profiler trace written to {c['profiler_log_dir']}")
        if summary["interrupted"]:
            self.message(f"stopped by {summary['reason']} after step {summary['steps']}; "
                         f"saved {checkpoint_path(c, 'latest')}.\nResume with: python3 "
                         f"main.py --resume_from_checkpoint=latest")
        else:
            best = summary["best_val_loss"]
            self.message(f"training finished ({summary['reason']}) after {summary['steps']} "
                         f"steps, {summary['elapsed_seconds']:.0f} s; best validation loss "
                         f"{best:.4f} nats = {bits_per_byte(best):.3f} bits/byte")


def validate_final_model(trainer):
    """Bits per byte of the trained model over the validation split, after train(): all
    of it, or final_validation_max_bytes of it in evenly spread pieces (bounded_plan), so
    that its cost does not grow with the corpus; the validations during training score
    an eval_max_batches sample. Every rank scores its share of the same plan; rank 0
    prints and records the total and what it covers."""
    val, c = trainer.val_dataset, trainer.config
    plan, scope = bounded_plan(val.span_start, val.span_end, val.sequence_length,
                               c["evaluation_stride"] or val.sequence_length,
                               c.get("final_validation_max_bytes"), "validation split")
    share, elapsed = plan.share(trainer.rank, trainer.world_size), trainer.elapsed_seconds()
    totals, _ = score_text(trainer.raw_model, val.data, plan, trainer.device, trainer.amp_dtype,
                           windows=share, progress=trainer.is_main)
    totals = totals.summed_over_ranks(trainer.device)
    trainer.log.final_validation(trainer.step, totals, elapsed, scope, val.num_bytes)
    return totals


def gradient_norm(model, clip=None):
    """The global norm of the gradients, clipped to `clip` first when given."""
    parameters = [p for p in model.parameters() if p.grad is not None]
    if clip:
        return torch.nn.utils.clip_grad_norm_(parameters, clip)
    return torch.nn.utils.get_total_norm([p.grad for p in parameters])


def check_weights_are_finite(model, step):
    if not all(torch.isfinite(p).all() for p in model.parameters()):
        raise TrainingDiverged(f"the weights became NaN or infinite by step {step}; nothing "
                               f"was saved. Lower learning_rate or enable clip_grad_norm_value.")


def step_seed(seed, rank, step):
    """The torch seed of one rank's optimizer step. Dropout masks are a function of
    (seed, rank, step) alone: they differ between ranks, and a resumed run draws exactly
    what an uninterrupted one did."""
    return int(np.random.SeedSequence([seed, rank, step]).generate_state(1, np.uint64)[0] >> 1)


# ---------------------------------------------------------------------------

class Trainer:
    def __init__(self, model, train_dataset, val_dataset, config, device,
                 architecture_keys=(), sample_fn=None, legacy_architecture=None, corpus=None):
        """`architecture_keys` are the config keys a checkpoint must share to be resumed
        (`legacy_architecture`: the values meant by checkpoints saved before a key existed).
        `sample_fn(prompt)` returns text for the interim samples (None = no samples).
        `corpus`: corpus_fingerprint(train_dataset.data) when known already (DataProcessor's
        manifest holds it); None: computed here, which reads every byte of the corpus."""
        self.config, self.device = config, device
        self.train_dataset, self.val_dataset = train_dataset, val_dataset
        self.architecture_keys, self.sample_fn = tuple(architecture_keys), sample_fn
        self.legacy_architecture = legacy_architecture
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world_size = dist.get_world_size() if dist.is_initialized() else 1
        self.is_main = self.rank == 0

        self.raw_model = unwrap_model(model)
        self.amp_dtype = run_precision(config, device)
        self.model = model
        if config["use_torch_compile"]:
            self.model = compile_or_fall_back(model, self._probe_step, self._log)
        if self.world_size > 1:
            self.model = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[device.index] if device.type == "cuda" else None)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp_dtype == torch.float16)
        self.optimizers = build_optimizers(self.raw_model, config, self.amp_dtype)

        self.order = BatchOrder(len(train_dataset), config["batch_size"],
                                config["gradient_accumulation_steps"], config["seed"],
                                self.rank, self.world_size)
        if self.order.steps_per_epoch == 0:
            raise UserError(f"the training split has {len(train_dataset)} windows but one "
                            f"optimizer step needs {self.windows_per_step()} (batch_size x "
                            f"ranks x gradient_accumulation_steps): add data or lower "
                            f"batch_size")
        total = self.order.steps_per_epoch * config["num_epochs"]
        minutes = config["max_train_minutes"]
        self.time_budget = minutes * 60 if minutes else None
        self.schedule = LearningRateSchedule(config, min(total, config["max_steps"] or total),
                                             self.time_budget)

        # What the validations measure on: a resume on other text or another validation
        # sample must not compare its losses with the checkpoint's best.
        self.corpus = corpus or corpus_fingerprint(train_dataset.data)
        self.validation_sample = hashlib.blake2b(np.asarray(val_dataset.window_starts(
            self.validation_indices()), dtype=np.int64).tobytes() + str(
            val_dataset.sequence_length).encode(), digest_size=16).hexdigest()

        # Progress, restored on resume (the data position lives in self.order).
        self.step, self.best_val_loss, self.resumed = 0, math.inf, False
        self.elapsed_before = 0.0  # seconds of training in earlier (resumed-from) runs
        self._start_time = time.perf_counter()  # train() restarts it
        self.stop = StopRequests(self._log)

    def windows_per_step(self):
        c = self.config
        return c["batch_size"] * self.world_size * c["gradient_accumulation_steps"]

    def _probe_step(self, compiled):
        x, y = self.train_dataset.__getitems__([0])
        with self._autocast():
            compiled(x.to(self.device), y.to(self.device)).backward()

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
            "optimizer_state": [optimizer.state_dict() for optimizer in self.optimizers],
            "scheduler_state": self.schedule.state_dict(),
            "scaler_state": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "step": self.step, **self.order.state_dict(),
            "best_val_loss": self.best_val_loss,
            "elapsed_seconds": self.elapsed_seconds(),
            "rng_states": capture_rng_states(),
            "config": dict(self.config),
            "precision": precision_name(self.amp_dtype),
            "corpus": self.corpus, "validation_sample": self.validation_sample,
        }

    def save(self, kind, final=False):
        """Write a checkpoint on the main rank; None when it could not be written. Every
        rank calls this at the same steps, so it must hold no collective operation."""
        check_weights_are_finite(self.raw_model, self.step)
        if not self.is_main:
            return None
        path = checkpoint_path(self.config, kind)
        try:
            with self.stop.protecting_a_write():
                save_checkpoint(self.state_dict(), path)
        except DiskFull as error:
            if final:
                raise
            self._log(f"warning: {error} Training goes on; the next save tries again.")
            return None
        return path

    def resume(self, path):
        state = load_for_resume(path, self.config, self.architecture_keys,
                                self.legacy_architecture)
        saved = state["optimizer_state"]
        saved = saved if isinstance(saved, list) else [saved]  # format 1: one optimizer
        try:
            self.raw_model.load_state_dict(state["model_state"])
            if len(saved) != len(self.optimizers):
                raise ValueError(f"it holds {len(saved)} optimizer state(s) and this run "
                                 f"has {len(self.optimizers)} (optimizer_type or "
                                 f"sparse_table_updates changed?)")
            for optimizer, optimizer_state in zip(self.optimizers, saved):
                optimizer.load_state_dict(optimizer_state)
        except (RuntimeError, ValueError, KeyError) as error:
            raise UserError(f"checkpoint {path} does not fit this model: {error}") from None
        self.schedule.load_state_dict(state["scheduler_state"])
        self._keep_recorded_precision(state.get("precision"), path)
        if state["scaler_state"] and self.scaler.is_enabled():
            self.scaler.load_state_dict(state["scaler_state"])
        self.step, self.resumed = state["step"], True
        self.order.load_state_dict(state, self._log)
        self.best_val_loss = state["best_val_loss"]
        self.elapsed_before = state["elapsed_seconds"]
        restore_rng_states(state["rng_states"])
        self._log(f"resumed from {path}: step {self.step}, epoch {self.order.epoch + 1}, "
                  f"best validation loss {self.best_val_loss:.4f}")
        self._say_what_changed(state)

    def _say_what_changed(self, state):
        """After a resume: every training setting that differs from the checkpoint's, and
        whether the corpus or the validation sample did (then the checkpoint's best
        validation loss, measured on other text, is forgotten)."""
        changes = setting_differences(state["config"], self.config, TRAINING_KEYS)
        if changes:
            self._log(f"note: a continuation with changes, not an exact resume: "
                      f"{len(changes)} training setting(s) differ from the checkpoint's:\n  "
                      + "\n  ".join(changes))
        saved, now = state.get("corpus"), self.corpus
        if saved is None:
            self._log("note: the checkpoint records no corpus fingerprint (an older "
                      "version saved it): whether the corpus changed cannot be told")
        elif saved != now:
            self._log(f"note: the corpus differs from the one the checkpoint was trained on "
                      f"({saved['bytes']:,} bytes, fingerprint {saved['blake2b'][:12]}; now "
                      f"{now['bytes']:,} bytes, {now['blake2b'][:12]}): training continues "
                      f"on this text")
        sample = state.get("validation_sample")
        measured_on = ("other text" if saved not in (None, now) else
                       "another validation sample (val_split_ratio, data_stride, "
                       "eval_max_batches, batch_size or the number of ranks changed)"
                       if sample not in (None, self.validation_sample) else None)
        if measured_on:
            if math.isfinite(self.best_val_loss):
                self._log(f"note: the checkpoint's best validation loss "
                          f"{self.best_val_loss:.4f} was measured on {measured_on}: it is "
                          f"forgotten, and this run's first validation is the best so far")
            self.best_val_loss = math.inf
            self.schedule.forget_validations()
        elif self.config["reset_best_val_loss_on_resume"]:
            self.best_val_loss = math.inf

    def _keep_recorded_precision(self, recorded, path):
        """amp_dtype="auto" decides once per run: a resumed run keeps the precision its
        checkpoint records, whatever this machine would pick, so it continues exactly.
        A precision set explicitly wins, and is then said to break exactness."""
        if recorded is None or recorded == precision_name(self.amp_dtype):
            return  # a checkpoint from before precision was recorded: nothing to keep
        c = self.config
        if c["use_amp"] and c["amp_dtype"] == "auto":
            self._set_precision(PRECISION_DTYPES[recorded])
            slow = (self.device.type == "cpu" and recorded == "bfloat16"
                    and not cpu_has_bf16_units())
            self._log(f"precision: {recorded}, as recorded in {path} (amp_dtype=\"auto\" "
                      f"is decided once per run)" + (
                          "; this CPU has no bf16 units, so steps will be much slower: "
                          "--use_amp=False continues in fp32, but not exactly" if slow else ""))
        else:
            self._log(f"warning: {path} was trained in {recorded}; this run continues in "
                      f"{precision_name(self.amp_dtype)} (use_amp/amp_dtype), so it is not "
                      f"an exact resume")

    def _set_precision(self, amp_dtype):
        self.amp_dtype = amp_dtype
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=amp_dtype == torch.float16)
        for optimizer in self.optimizers:
            if isinstance(optimizer, Muon):
                optimizer.orthogonalize_in_bf16 = amp_dtype == torch.bfloat16

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
        return self.optimizers[0].param_groups[0]["lr"]

    def batch_loader(self):
        """An iterator over this rank's training micro-batches from the current position
        on: what train() and bench.py's profile take steps' batches from."""
        return self.order.loader(self.train_dataset, self.config["num_workers"],
                                 pin_memory=self.device.type == "cuda")

    def next_micro_batches(self, batches):
        """One optimizer step's micro-batches (x, y) from `batches` (batch_loader)."""
        with profiled("data"):
            return [next(batches) for _ in range(self.order.accumulation)]

    def train_step(self, micro_batches):
        """One optimizer step over `gradient_accumulation_steps` micro-batches. Returns
        the mean loss; a step whose gradients are not finite is not taken."""
        rate = self.schedule.learning_rate(self.step)
        for optimizer in self.optimizers:
            for group in optimizer.param_groups:
                group["lr"] = rate * group["lr_ratio"]
        torch.manual_seed(step_seed(self.config["seed"], self.rank, self.step))
        total_loss = 0.0
        for index, (x, y) in enumerate(micro_batches):
            # DDP: synchronise gradients on the last micro-step only.
            no_sync = self.world_size > 1 and index < len(micro_batches) - 1
            with self.model.no_sync() if no_sync else contextlib.nullcontext():
                with self._autocast(), profiled("forward"):
                    loss = self.model(x.to(self.device, non_blocking=True),
                                      y.to(self.device, non_blocking=True))
                with profiled("backward"):
                    self.scaler.scale(loss / len(micro_batches)).backward()
            total_loss += loss.item()
        with profiled("optimizer"):
            for optimizer in self.optimizers:
                self.scaler.unscale_(optimizer)
            norm = gradient_norm(self.raw_model, self.config["clip_grad_norm_value"])
            # With fp16 the scaler skips a step whose gradients overflowed; otherwise such
            # a step would write NaN into the weights, so it is not taken.
            if self.scaler.is_enabled() or torch.isfinite(norm):
                for optimizer in self.optimizers:
                    self.scaler.step(optimizer)
            self.scaler.update()
            for optimizer in self.optimizers:
                optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return total_loss / len(micro_batches)

    def _stop_reason(self, loss=0.0):
        """Why training ends after this step, or None, agreed by every rank (one rank
        stopping or raising alone would leave the others waiting for it). Sets
        self.interrupted when a signal is the reason."""
        limit = self._limit_reached()
        signaled, limited, diverged = agree_across_ranks(
            [self.stop.reason is not None, limit is not None, not math.isfinite(loss)],
            device=self.device)
        if diverged:
            raise TrainingDiverged(
                f"the training loss became {loss} at step {self.step} (on this or another "
                f"rank). Nothing was saved from it. Lower learning_rate, enable "
                f"clip_grad_norm_value, or try use_amp=False.")
        self.interrupted = bool(signaled)
        if signaled:
            return self.stop.reason or "a signal to another rank"
        return (limit or "another rank's limit") if limited else None

    def _limit_reached(self):
        c = self.config
        if self.order.epoch >= c["num_epochs"]:
            return "num_epochs"
        if c["max_steps"] and self.step >= c["max_steps"]:
            return "max_steps"
        if self.time_budget and self.elapsed_seconds() >= self.time_budget:
            return "max_train_minutes"
        return None

    def train(self):
        """Train until the epochs, max_steps or the time budget run out, or a signal.
        Returns a summary dict."""
        c = self.config
        os.makedirs(c["checkpoint_dir"], exist_ok=True)
        windows = self.windows_per_step()
        self.log = TrainingLog(c, windows * self.train_dataset.sequence_length,
                               self.step, self.resumed, self.is_main)
        self.log.message(f"training {self.schedule.step_limit:,} steps at most "
                         f"({self.order.steps_per_epoch:,} per epoch, {windows} "
                         f"window{'s' if windows > 1 else ''} per step)"
                         + (f", {c['max_train_minutes']:g} minutes at most"
                            if self.time_budget else ""))
        for warning in schedule_warnings(self.schedule):
            self.log.message(f"warning: {warning}")
        self._start_time = time.perf_counter()
        self.model.train()
        batches = self.batch_loader()
        with self.stop.installed(), profiler_context(c, self.device) as profiler:
            reason, steps_run = self._stop_reason(), 0
            while reason is None:
                loss = self.train_step(self.next_micro_batches(batches))
                epoch_ended = self.order.advance()
                if profiler is not None:  # None when enable_profiler is off
                    profiler.step()
                steps_run += 1
                self.schedule.observe(steps_run, self.step, self.elapsed_seconds(), self.device)
                reason = self._stop_reason(loss)
                self._after_step(loss, epoch_ended, reason)
            if steps_run == 0:  # a resumed run with nothing left to train
                self._after_step(None, False, reason)
        summary = {"steps": self.step, "reason": reason, "best_val_loss": self.best_val_loss,
                   "elapsed_seconds": self.elapsed_seconds(), "interrupted": self.interrupted}
        self.log.finish(summary, profiler)
        return summary

    def _after_step(self, loss, epoch_ended, reason):
        """Everything a finished step calls for, in one place: log, validate (and save
        best), sample, save latest and epoch snapshots. `reason` is set on the last step.
        Every decision here is the same on every rank."""
        c, step, epoch = self.config, self.step, self.order.epoch_of_last_step
        if loss is not None:
            self.log.step(step, epoch, loss, self.current_lr(), self.elapsed_seconds(),
                          self.schedule.horizon(), self.schedule.estimated)
        if step % c["validate_and_checkpoint_best_every_batches"] == 0 or epoch_ended or \
                (reason and not self.interrupted):
            self._validate(step, epoch)
        if c["test_every_batches"] and step % c["test_every_batches"] == 0 and self.sample_fn:
            prompt = c["interim_test_prompt"]
            self.log.sample(step, prompt, self.sample_fn(prompt))
        if epoch_ended and c["save_epoch_snapshots"]:
            if self.save(f"epoch{self.order.epoch}") and self.is_main:
                prune_epoch_snapshots(c)
        if step % c["checkpoint_every_batches"] == 0 or reason:
            self.save("latest", final=reason is not None)

    def _validate(self, step, epoch):
        val_loss = self.evaluate()
        if not math.isfinite(val_loss):
            raise TrainingDiverged(f"the validation loss became {val_loss} at step {step}; "
                                   f"nothing was saved from it. Lower learning_rate.")
        self.schedule.on_validation(val_loss)
        improved = val_loss < self.best_val_loss
        if improved:
            previous, self.best_val_loss = self.best_val_loss, val_loss
            if self.is_main and self.save("best") is None:
                self.best_val_loss = previous  # not written: the next improvement tries again
        self.log.validation(step, epoch, val_loss, self.current_lr(), self.elapsed_seconds(),
                            improved)
