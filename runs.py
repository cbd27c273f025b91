"""runs.py: what keeps a long run safe; used by unlearn.py and sample.py, not part of the method.

- A user's mistake is one line on stderr and exit code 2, never a traceback (`UserError`, `run_cli`).
- A file is written whole or not at all, readable as any new file (`write_atomic`, `write_json`).
- A run is what it says: --overwrite moves the earlier run aside first (`move_aside`), and --resume
  trains on the run's own saved prompts (`run_prompts`, `save_prompts`).
- A training loop with a bar of its losses, that stops at once on a non-finite loss (`run_steps`).
- A run saves its erasers, optimizer, step and random state, and resumes from them exactly
  (`save_checkpoint`, `restore_checkpoint`); Ctrl-C ends the step under way, then the run
  checkpoints and says how to resume (`deferred_interrupt`, `Interrupted`).
"""

import contextlib
import json
import math
import os
import signal
import sys
import textwrap

import torch
from tqdm.auto import tqdm


class UserError(Exception):
    """A mistake in what the user asked for: reported as one line, exit code 2."""


class Interrupted(Exception):
    """Ctrl-C: the run stopped after saving a checkpoint."""


def why(e, width=200):
    """An exception's first line, shortened at a word to fit in a one-line error."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return textwrap.shorten(text, width, placeholder=" ...")


def run_cli(main):
    """A command line's main: a user's mistake is one line and exit code 2; Ctrl-C says how to resume."""
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except Interrupted as e:
        print(e, file=sys.stderr)
        sys.exit(130)


def write_atomic(path, write):
    """`write(tmp_path)`, then rename: a reader sees the old file or the new one, never half of one. The file
    gets the mode a new file gets (0644 under the usual umask), whatever the writer gave it."""
    tmp = f"{path}.tmp"
    write(tmp)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, path)


RUN_FILES = ("eraser.safetensors", "eraser.json", "checkpoint.pt", "prompts.json")  # what a run writes


def move_aside(folder):
    """--overwrite: the run already in `folder` goes into folder/replaced/ (the one there before it is dropped)
    before the new run starts, so that no stale eraser or checkpoint passes for the new run's."""
    moved = [name for name in RUN_FILES if os.path.exists(os.path.join(folder, name))]
    if moved:
        aside = os.path.join(folder, "replaced")
        os.makedirs(aside, exist_ok=True)
        for name in moved:
            os.replace(os.path.join(folder, name), os.path.join(aside, name))
        print(f"--overwrite: moved the earlier run's {', '.join(moved)} to {aside}/")


def run_prompts(folder, resume, make):
    """The run's prompts: made by `make()`, or with --resume read back from folder/prompts.json (`save_prompts`),
    so that a resumed run trains on its own prompts (a refiner would write others)."""
    path = os.path.join(folder, "prompts.json")
    if resume and os.path.isfile(path):
        with open(path) as f:
            saved = json.load(f)
        print(f"# 2. --resume: the run's own {len(saved['prompts'])} prompts, from {path}")
        return saved["prompts"], saved["anchors"], saved["preserved"]
    return make()


def save_prompts(folder, prompts, anchors, preserved):
    """folder/prompts.json, written with the run's first checkpoint (nothing is written before the run starts)."""
    os.makedirs(folder, exist_ok=True)
    write_json(os.path.join(folder, "prompts.json"), dict(prompts=prompts, anchors=anchors, preserved=preserved))


def write_json(path, obj, indent=2):
    """`obj` as JSON in `path`, atomically (values JSON lacks written as their str)."""
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=indent, default=str)
    write_atomic(path, write)


@contextlib.contextmanager
def deferred_interrupt():
    """Inside, Ctrl-C is noted in the yielded list instead of raised, so the step under way ends whole."""
    interrupted = []
    previous = signal.signal(signal.SIGINT, lambda *_: interrupted.append(1))
    try:
        yield interrupted
    finally:
        signal.signal(signal.SIGINT, previous)


def save_checkpoint(folder, step, history, settings, erasers, opt, gen):
    """folder/checkpoint.pt: all it takes to resume from exactly here (weights, optimizer, every random state)."""
    state = dict(erasers=erasers.state_dict(), optimizer=opt.state_dict(), step=step, history=history,
                 generator=gen.get_state(), torch_rng=torch.get_rng_state(), settings=settings)
    os.makedirs(folder, exist_ok=True)
    write_atomic(os.path.join(folder, "checkpoint.pt"), lambda p: torch.save(state, p))


def restore_checkpoint(folder, settings, erasers, opt, gen):
    """Load folder/checkpoint.pt into erasers, optimizer and random state; returns (step, history).

    Refused if any of `settings` (those that change the result) differs from the checkpoint's.
    """
    path = os.path.join(folder, "checkpoint.pt")
    if not os.path.isfile(path):
        raise UserError(f"--resume: there is no checkpoint in {folder}")
    try:
        state = torch.load(path, weights_only=True, map_location=gen.device)  # never unpickle code
    except Exception as e:
        raise UserError(f"--resume: cannot read {path} ({why(e, 160)})")
    changed = [f"{k} ({state['settings'].get(k)!r} -> {v!r})" for k, v in settings.items()
               if state["settings"].get(k) != v]
    if changed:
        raise UserError(f"--resume: settings differ from the checkpoint's: {', '.join(changed)}; "
                        "use the same settings, or start anew with --overwrite")
    erasers.load_state_dict(state["erasers"])
    opt.load_state_dict(state["optimizer"])
    gen.set_state(state["generator"].cpu())
    torch.set_rng_state(state["torch_rng"].cpu())
    return state["step"], state["history"]


@contextlib.contextmanager
def no_timer(name):
    """A step's parts are timed by bench.py; elsewhere they are not."""
    yield


def run_steps(step, start, steps, history, every, checkpoint, folder):
    """Run `step()` (a dict of losses) for steps start+1 .. `steps`, appending to `history`, with a tqdm bar.

    `checkpoint(steps_done, history)` (if given) runs every `every` steps and on Ctrl-C, which ends the step
    under way first and then raises Interrupted. A non-finite loss stops the run at once: a UserError.
    """
    with deferred_interrupt() as interrupted:
        bar = tqdm(desc="unlearning", initial=start, total=steps)
        for done in range(start + 1, steps + 1):
            for name, value in step().items():
                if not math.isfinite(value):
                    raise UserError(f"step {done}: the {name} loss is {value}; stopped, nothing saved as final, "
                                    f"the last checkpoint stays in {folder} (try a lower --lr)")
                history[name].append(value)
            bar.set_postfix({k: f"{v[-1]:.2e}" for k, v in history.items()}, refresh=False)
            bar.update()
            if checkpoint and (interrupted or done % every == 0 and done < steps):
                checkpoint(done, history)
            if interrupted:
                raise Interrupted(f"interrupted after step {done} of {steps}; checkpoint saved in {folder}; "
                                  "continue with the same command and --resume")
        bar.close()
    return history
