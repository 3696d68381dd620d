"""The ``fastdistill`` command (also ``python -m fastdistill``).

    fastdistill demo [--smoke] [--seeds N] [--out DIR]   ensemble distillation on the digits, table + PNG
    fastdistill train --config FILE.yaml [KEY=VALUE ...] the reference loop from a YAML config (torchrun works),
                                                         options overridden (kd.temperature=4 train.max_steps=10)
    fastdistill train --print-config                     every config option, documented, at its default
    fastdistill bench [benchmarks.run options]           the kd_loss kernel benchmark table (from a checkout)
    fastdistill --version                                the installed version
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import os
import subprocess
import sys
import warnings
from collections.abc import Sequence

from ._warnings import PACKAGE

COMMANDS = {
    "demo": "ensemble distillation on scikit-learn's digits: a table of test accuracies and a PNG (make demo)",
    "train": "train with the reference loop from a YAML config (--config FILE; --print-config lists every option)",
    "bench": "the kd_loss benchmark table (runs the checkout's benchmarks/run.py; its options pass through)",
}


def version() -> str:
    """The installed distribution's version; else (a source tree on the path) the package's ``__version__``."""
    try:
        return importlib.metadata.version("fastdistill")
    except importlib.metadata.PackageNotFoundError:
        return getattr(importlib.import_module("fastdistill"), "__version__", "unknown")


def _error(command: str, message: str) -> int:
    print(f"fastdistill {command}: error: {message}", file=sys.stderr)
    return 2


def _warning_line(message, category, filename, lineno, file=None, line=None) -> None:
    """A warning fastdistill's code raised (whatever line it is attributed to) as one line; others (torch,
    transformers, peft) as Python shows them, with their file and line."""
    frame = sys._getframe(1)
    while frame is not None and frame.f_globals.get("__name__") in ("warnings", "_py_warnings"):  # its own frames
        frame = frame.f_back
    if frame is not None and frame.f_code.co_filename.startswith(PACKAGE):
        print(f"fastdistill train: warning: {category.__name__}: {message}", file=sys.stderr)
    else:
        _SHOW_WARNING(message, category, filename, lineno, file, line)


_SHOW_WARNING = warnings.showwarning  # Python's, for the warnings that are not ours


def train_main(argv: Sequence[str]) -> int:
    """``fastdistill train``: a bad config (or override) is one line on stderr and exit status 2, never a traceback
    (a bug in training still shows its traceback); a warning (e.g. a damaged checkpoint skipped) is one line too.
    The run saves its resolved config as ``output_dir/config.yaml``."""
    from .training import config, launcher

    p = argparse.ArgumentParser(prog="fastdistill train", description=COMMANDS["train"])
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--config", help="YAML file (see --print-config)")
    g.add_argument("--print-config", action="store_true", help="print every option with its default and doc")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="set an option of the config, the value read as YAML: kd.temperature=4 train.max_steps=10 "
                        "student.kwargs.hidden=64 teachers.0.checkpoint=t.safetensors")  # fmt: skip
    args = p.parse_args(argv)
    if args.print_config:
        if args.overrides:
            p.error("KEY=VALUE overrides apply to a --config")
        print(config.default_yaml(), end="")
        return 0
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _warning_line
            summary = launcher.run(config.load_config(args.config, args.overrides))
    except config.ConfigError as e:
        return _error("train", str(e))
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, one summary
        print("done: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                   for k, v in summary.items()))  # fmt: skip
    return 0


def bench_main(argv: Sequence[str]) -> int:
    """``fastdistill bench``: ``python -m benchmarks.run`` of the fastdistill checkout in the current directory, its
    options passed on; returns its exit status."""
    if not os.path.isfile(os.path.join("benchmarks", "run.py")):
        return _error("bench", "the benchmarks live in the fastdistill repository, not in the installed package: "
                               "run `fastdistill bench` (or `make bench`) from the root of a checkout")  # fmt: skip
    # a child process, not an import: `python -m` puts the checkout (cwd) on the child's own sys.path, where an
    # installed package must not put it on its importer's
    return subprocess.run([sys.executable, "-m", "benchmarks.run", *argv], cwd=os.getcwd()).returncode


def demo_main(argv: Sequence[str]) -> int:
    from .apps import demo

    return demo.main(list(argv))


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fastdistill`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(
        prog="fastdistill", description="fastdistill: fused knowledge-distillation losses for PyTorch",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="commands:\n" + "\n".join(f"  {k:<6} {v}" for k, v in COMMANDS.items())
        + "\n\n`fastdistill COMMAND --help` for a command's options.",
    )  # fmt: skip
    p.add_argument("--version", action="version", version=f"fastdistill {version()}")
    p.add_argument("command", choices=list(COMMANDS), metavar="COMMAND", help=", ".join(COMMANDS))
    # the command's own options are parsed by the command (bench passes them on to benchmarks.run)
    args = p.parse_args(argv[:1] if argv and not argv[0].startswith("-") else argv)
    return {"demo": demo_main, "train": train_main, "bench": bench_main}[args.command](argv[1:])
