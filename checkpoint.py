"""Checkpoint files: where they live, how they are written (atomically) and read (safely),
the random state they carry, and which file a resume or a prediction should use.

A checkpoint is a dict saved with torch.save; it holds only tensors, numbers, strings,
lists and dicts, so torch.load(weights_only=True) can read it without running code.
"""

import contextlib
import datetime
import errno
import os
import random
import re
import shutil
import socket
import sys

import numpy as np
import torch

from utils import UserError, atomic_output, error_summary, move_aside, process_is_running

try:
    import fcntl  # POSIX: the lock dies with its process, whatever kills it
except ImportError:  # Windows: fall back to checking the recorded process id
    fcntl = None

FORMAT_VERSION = 2  # 2: optimizer_state is a list (AdamW, and Muon when used)
# What a checkpoint must hold to be generated from, and to be resumed.
KEYS_TO_GENERATE = ("format_version", "model_state", "config", "step")
KEYS_TO_RESUME = KEYS_TO_GENERATE + (
    "optimizer_state", "scheduler_state", "scaler_state", "epoch", "windows_in_epoch",
    "best_val_loss", "elapsed_seconds", "rng_states")


def checkpoint_path(config, kind):
    """Path of the "best" or "latest" checkpoint (or an epoch snapshot name)."""
    return os.path.join(config["checkpoint_dir"], f"{config['model_name']}_{kind}.pth")


class DiskFull(UserError):
    """A checkpoint could not be written for lack of space; the previous file is intact."""


def save_checkpoint(state, path):
    """Write atomically: a crash mid-write leaves the previous file intact. A full disk
    raises DiskFull saying which file, how much was needed and how much is free."""
    try:
        with atomic_output(path) as file:
            torch.save(state, file)
    except (OSError, RuntimeError) as error:
        # torch reports a failed write as "RuntimeError: unexpected pos"; the OSError
        # that caused it is in the exception's context.
        cause = error
        while cause is not None and not isinstance(cause, OSError):
            cause = cause.__cause__ or cause.__context__
        if cause is None or cause.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        folder = os.path.dirname(os.path.abspath(path))
        raise DiskFull(f"cannot save {path}: the disk is full (about {_megabytes(state)} MB "
                       f"needed, {shutil.disk_usage(folder).free / 1e6:.0f} MB free). The "
                       f"previous file, if any, is intact. Free some space.") from None


def _megabytes(state):
    """Size of the tensors in a (nested) checkpoint dict, in MB."""
    def size(value):
        if isinstance(value, torch.Tensor):
            return value.numel() * value.element_size()
        if isinstance(value, dict):
            return sum(size(v) for v in value.values())
        if isinstance(value, (list, tuple)):
            return sum(size(v) for v in value)
        return 0
    return f"{size(state) / 1e6:.1f}"


def load_checkpoint(path, required=("format_version", "model_state")):
    """Load a checkpoint safely (weights_only) or raise a UserError naming the file and,
    for a checkpoint that lacks some of `required`, the missing keys."""
    if not os.path.isfile(path):
        raise UserError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for truncated/corrupt files
        raise UserError(f"cannot read checkpoint {path}: the file is truncated, corrupt or "
                        f"not a PyTorch file ({error_summary(error)})") from None
    if not isinstance(state, dict) or "format_version" not in state or "model_state" not in state:
        raise UserError(f"{path} is a PyTorch file but not a GrugV3 checkpoint")
    if state["format_version"] > FORMAT_VERSION:
        raise UserError(f"{path} was written by a newer GrugV3 (checkpoint format "
                        f"{state['format_version']}, this version reads up to "
                        f"{FORMAT_VERSION}); update the code")
    missing = [key for key in required if key not in state]
    if missing:
        raise UserError(f"{path} is an incomplete GrugV3 checkpoint: it lacks "
                        f"{', '.join(missing)}")
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


def load_for_resume(path, config, architecture_keys, legacy_architecture=None):
    """The checkpoint at `path`, complete enough to resume and with the architecture of
    `config`, or a UserError that says what to do instead. `legacy_architecture`: what a
    checkpoint from before a key existed meant by it."""
    try:
        state = load_checkpoint(path, required=KEYS_TO_RESUME)
    except UserError as error:
        best = checkpoint_path(config, "best")
        if os.path.abspath(path) != os.path.abspath(best) and os.path.isfile(best):
            raise UserError(f"{error}\nThe best checkpoint may still be good: resume "
                            f"from it with --resume_from_checkpoint=best") from None
        raise
    saved = {**(legacy_architecture or {}), **state["config"]}
    differences = setting_differences(saved, config, architecture_keys)
    if differences:
        raise UserError(f"cannot resume from {path}: its architecture differs from the "
                        "config:\n  " + "\n  ".join(differences) +
                        "\nUse the checkpoint's values or start fresh "
                        "(resume_from_checkpoint=None).")
    return state


def model_files(config):
    """This model's checkpoint files in checkpoint_dir: best, latest, epoch snapshots."""
    folder = config["checkpoint_dir"]
    if not os.path.isdir(folder):
        return []
    pattern = re.compile(re.escape(config["model_name"]) + r"_(best|latest|epoch\d+)\.pth")
    return [os.path.join(folder, name) for name in sorted(os.listdir(folder))
            if pattern.fullmatch(name)]


def keep_trained_model(config, resume_path, log=print):
    """Before a run that does not resume from one of this model's files in checkpoint_dir:
    refuse to train over them (the run would overwrite best and latest), or, with
    start_over=True, move them aside (renamed `..._before_{time}.pth`), never delete them."""
    existing = model_files(config)
    resuming_from = resume_path and os.path.abspath(resume_path)
    if not existing or resuming_from in map(os.path.abspath, existing):
        return
    if not config["start_over"]:
        doing = (f"resumes from {resume_path}" if resume_path else "starts fresh (resume_from_"
                 f"checkpoint=None)")
        names = ", ".join(map(os.path.basename, existing))
        resume = next((kind for kind in ("latest", "best")
                       if os.path.isfile(checkpoint_path(config, kind))), existing[-1])
        raise UserError(
            f"{config['checkpoint_dir']} holds a trained model ({names}) and this run "
            f"{doing}: training would overwrite it. Choose one:\n"
            f"  {'--resume_from_checkpoint=' + resume:<34}continue that model\n"
            f"  --checkpoint_dir=OTHER_FOLDER     train a new model beside it\n"
            f"  --start_over=True                 train a new one here; the old files are "
            f"renamed *_before_<time>.pth, not deleted")
    stamp = datetime.datetime.now().strftime("%Y%m%d_%H%M%S")
    for path in existing:
        log(f"note: start_over: {path} is now {move_aside(path, stamp)}")


def prune_epoch_snapshots(config):
    """Delete all but the newest `keep_last_checkpoints` epoch snapshots (only files named
    exactly like one: a copy such as "grug_v3_epoch2 (copy).pth" is left alone)."""
    folder = config["checkpoint_dir"]
    pattern = re.compile(re.escape(config["model_name"]) + r"_epoch(\d+)\.pth")
    numbered = sorted((int(match.group(1)), name) for name in os.listdir(folder)
                      if (match := pattern.fullmatch(name)))
    for _, old in numbered[:-config["keep_last_checkpoints"]]:
        os.remove(os.path.join(folder, old))


def path_to_generate_from(config, log=print):
    """The best checkpoint, else latest (saying so), else a UserError."""
    best, latest = checkpoint_path(config, "best"), checkpoint_path(config, "latest")
    if os.path.isfile(best):
        return best
    if os.path.isfile(latest):
        log(f"no best checkpoint at {best}; using {latest}")
        return latest
    raise UserError(f"no checkpoint to generate from: neither {best} nor {latest} exists. "
                    f"Train first (DO_TRAINING=True) or point checkpoint_dir/model_name "
                    f"at a trained model.")


def setting_differences(saved_config, config, keys):
    """`key: checkpoint saved vs config current` for every one of `keys` that differs."""
    def saved(key):
        return repr(saved_config[key]) if key in saved_config else "(not recorded)"
    return [f"{k}: checkpoint {saved(k)} vs config {config.get(k)!r}"
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
# One training run per checkpoint folder

class CheckpointFolderLock:
    """Held by a training run for its whole life, so that a second run started in the
    same checkpoint_dir stops with an error naming the first, instead of overwriting its
    checkpoints and metrics. The lock is an flock on FILENAME, which the operating system
    releases when its process dies however it dies; the file names its holder, so a file
    left by a killed run is taken over, with a message. Taking the lock also proves the
    folder writable before any work starts."""

    FILENAME = ".grug_v3.lock"

    def __init__(self, folder, log=print):
        self.folder, self.log = folder, log
        self.path = os.path.join(folder, self.FILENAME)
        self.handle = None

    def __enter__(self):
        while True:
            try:
                os.makedirs(self.folder, exist_ok=True)
                self.handle = open(self.path, "a+", encoding="utf-8")
            except OSError as error:
                raise UserError(f"checkpoint_dir {self.folder} is not writable "
                                f"({error.strerror}): choose another --checkpoint_dir or fix "
                                f"its permissions") from None
            self.handle.seek(0)
            holder = self.handle.read().strip()
            if not self._lock(holder):
                self.handle.close()
                raise UserError(f"another training run is using checkpoint_dir {self.folder}: "
                                f"{holder or 'a process that has not yet said who it is'}. "
                                f"Wait for it to finish, stop it, or choose another "
                                f"--checkpoint_dir.")
            if self._still_the_file():
                break
            self.handle.close()  # a run that was ending deleted it meanwhile: lock anew
        if holder:
            self.log(f"note: taking over the lock of an earlier run that ended without "
                     f"releasing it ({holder})")
        self.handle.seek(0)
        self.handle.truncate()
        started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        self.handle.write(f"pid {os.getpid()} on {socket.gethostname()}, started {started}: "
                          f"{' '.join([os.path.basename(sys.executable)] + sys.argv)}\n")
        self.handle.flush()
        return self

    def _lock(self, holder):
        """Take the lock; False when another live process holds it."""
        if fcntl is not None:
            try:
                fcntl.flock(self.handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                return False
        match = re.match(r"pid (\d+) on (\S+),", holder)
        return not (match and match.group(2) == socket.gethostname()
                    and process_is_running(int(match.group(1))))

    def _still_the_file(self):
        try:
            return os.stat(self.path).st_ino == os.fstat(self.handle.fileno()).st_ino
        except FileNotFoundError:
            return False

    def __exit__(self, *exc_info):
        # Removed while still locked: a run that opened the old file sees it is gone.
        with contextlib.suppress(OSError):
            os.remove(self.path)
        self.handle.close()
