#!/usr/bin/env python
"""Train a small MoE byte-level language model, or sample from a trained one.

Usage:
  python train.py                              # the tiny config on CPU (a few minutes)
  python train.py config=small steps=2000      # a named config (configs/NAME.json) + overrides
  python train.py config=tiny_dense            # the dense baseline matched to tiny's active FLOPs
  python train.py sample out_dir=runs/tiny prompt="def main(" sample_len=300
  python train.py help                         # (or --help) every key, its default and allowed values

Any config key can be overridden as key=value. The run directory (out_dir,
default runs/<config>) gets metrics.jsonl, loss.png, expert_load.png (per MoE
layer: load share and dropped fraction over steps; numbers in expert_load.npz) and
checkpoints/; rerunning the same command resumes from the latest checkpoint
(a corrupt one is reported and set aside as checkpoints/<step>.corrupt). One run
at a time per out_dir: a second one exits with an error (out_dir/.lock).
Multi-host: the same command on every host, with JAX_COORDINATOR_ADDRESS (or
SLURM / Open MPI / TPU environment), or coordinator_address= num_processes=
process_id=.
"""

from __future__ import annotations

import os
import sys


def parse_args(argv: list[str]) -> tuple[str, str, list[str]]:
    """argv -> (mode, config name, ["key=value", ...])."""
    mode = "train"
    if any(a in ("-h", "--help") for a in argv):
        return "help", "tiny", []
    if argv and argv[0] in ("train", "sample", "help"):
        mode, argv = argv[0], argv[1:]
    name, rest = "tiny", []
    for arg in argv:
        if arg.startswith("config="):
            name = arg.split("=", 1)[1]
        else:
            rest.append(arg)
    return mode, name, rest


def out_dir_problem(out_dir: str) -> str | None:
    """Why ``out_dir`` cannot be created or written (a file in its path, a read-only parent), else None; checked
    before JAX starts, so the error comes at once."""
    try:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, ".lock"), "a"):  # the run's lock file (see jmoe/training/lock.py)
            pass
    except OSError as e:
        return f"out_dir {out_dir!r} cannot be created or written: {e.strerror or e} ({e.filename or out_dir})"
    return None


def main(argv: list[str]) -> int:
    from jmoe.training import config as config_lib

    mode, name, rest = parse_args(argv)
    if mode == "help":
        print(__doc__ + "\nKeys:\n" + config_lib.describe())
        return 0
    try:
        overrides = config_lib.parse_overrides(rest)
        cfg = config_lib.load_config(name, overrides)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out_dir = cfg.out_dir or os.path.join("runs", os.path.basename(name).removesuffix(".json"))
    if mode == "train" and (problem := out_dir_problem(out_dir)):
        print(f"error: {problem}", file=sys.stderr)
        return 2

    from jmoe import training

    training.maybe_initialize_distributed(cfg.distributed, cfg.coordinator_address, cfg.num_processes,
                                          cfg.process_id)
    try:
        if mode == "sample":
            s, params, step = training.load_for_inference(out_dir, num_devices=1)
            print(f"# {out_dir} step {step}", file=sys.stderr)
            print(training.sample(s, params, cfg.prompt, cfg.sample_len, cfg.temperature, cfg.top_k, cfg.seed))
            return 0
        training.train(cfg, out_dir, print_fn=training.main_print)
    except training.NonFiniteLossError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except training.OutDirInUseError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # train() has finished the save in flight and said which checkpoint is kept
        print("error: interrupted (Ctrl-C)", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def run(argv: list[str]) -> int:
    try:
        return main(argv)
    except KeyboardInterrupt:  # before training started (imports, compilation): nothing to save
        print("error: interrupted (Ctrl-C)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    code = run(sys.argv[1:])
    if code == 130:  # interrupted: the checkpoint manager is closed; threads that libraries (orbax, tensorstore)
        sys.stdout.flush()  # left behind must not hold the exit
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
