"""The `mixgrpo` command: train, sample, eval, export, serve-rewards, preprocess, pretrain, config-doc, launch.

    mixgrpo train --config configs/mixgrpo.yaml [key.sub=value ...] [--resume]   (or --config mixgrpo)
    mixgrpo launch --nproc_per_node 8 train --config configs/flux_mixgrpo.yaml   (torchrun, mixgrpo's exit statuses)

Errors in the user's input print one line naming the problem and the fix, and exit with status 2
(`--debug` shows the traceback instead). A run stopped by SIGTERM/SIGINT exits 128 + the signal number after
writing its checkpoint (see docs/reliability.md).

One module per group of commands: `train`; `sample` (sample, eval) over the options they share (`sampling`); `runs`
(export, compare, reference); `rewards` (serve-rewards, and the --reward option eval takes too). The commands with
parsers of their own (pretrain, preprocess, prompts, config-doc, launch) get their arguments as they are.
"""

from __future__ import annotations

import argparse
import os
import sys

from mixgrpo.cli import rewards, runs, sample, train
from mixgrpo.errors import UserError

# Nothing is ever fetched from a model hub: models and rewards load from local paths.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _pretrain(args: argparse.Namespace) -> None:
    from mixgrpo import pretrain

    pretrain.main(args.rest)


def _preprocess(args: argparse.Namespace) -> None:
    from mixgrpo import preprocess

    preprocess.main(args.rest)


def _prompts(args: argparse.Namespace) -> None:
    from mixgrpo import prompt_sets

    prompt_sets.main(args.rest)


def _launch(args: argparse.Namespace) -> int:
    from mixgrpo import launch

    return launch.main(args.rest, [c for c in command_names() if c != "launch"])


def _config_doc(args: argparse.Namespace) -> None:
    from mixgrpo import configdoc

    code = configdoc.main(args.rest)
    if code:
        sys.exit(code)


PASSTHROUGH = {"pretrain": (_pretrain, "pre-train the tiny base model on the shapes world"),
               "preprocess": (_preprocess, "encode prompt files into an embedding cache"),
               "prompts": (_prompts, "list the prompt sets the recipes name (NAME:SPLIT), or fetch one"),
               "config-doc": (_config_doc, "print (or --out, --check) the configuration reference"),
               "launch": (_launch, "torchrun with mixgrpo's exit statuses: mixgrpo launch [torchrun options] train "
                                   "... (docs/distributed.md)")}
"""The subcommands with parsers of their own: name -> (function of the rest of the command line, help)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mixgrpo", description=__doc__.split("\n")[0], allow_abbrev=False)
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)
    train.add_parser(sub)
    sample.add_parsers(sub)
    runs.add_parsers(sub)
    rewards.add_parser(sub)
    for name, (fn, text) in PASSTHROUGH.items():
        p = sub.add_parser(name, help=text, add_help=False, allow_abbrev=False)
        p.add_argument("rest", nargs=argparse.REMAINDER)
        p.set_defaults(func=fn)
    return parser


def command_names() -> list[str]:
    """The subcommands of `mixgrpo`."""
    actions = build_parser()._subparsers._group_actions  # noqa: SLF001  (argparse keeps them nowhere public)
    return list(actions[0].choices)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # argparse.REMAINDER does not capture "--option" arguments of a subcommand: hand them over explicitly.
    command = next((i for i, a in enumerate(argv) if not a.startswith("-")), None)
    rest: list[str] = []
    if command is not None and argv[command] in PASSTHROUGH:
        argv, rest = argv[:command + 1], argv[command + 1:]
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse stops collecting positionals at the first option: take key=value overrides placed after
    # options too ("train --config C --out D optim.lr=1e-4"); anything else is still an error.
    if extra and hasattr(args, "overrides") and all("=" in a and not a.startswith("-") for a in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command in PASSTHROUGH:
        args.rest = rest
    try:
        code = args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001  (user-facing boundary: one line, no traceback)
        from mixgrpo.train import TrainingStopped

        if isinstance(e, TrainingStopped):  # preempted: checkpointed and resumable, but not finished
            if _reports(e):
                print(f"stopped by {e}", file=sys.stderr)
            return 128 + e.signum
        if args.debug or not _is_user_error(e):
            raise
        if _reports(e):
            for line in _error_line(e).splitlines() or [type(e).__name__]:  # pre-flight: one line each
                print(f"error: {line}", file=sys.stderr)
        return 2
    return code or 0


def _reports(e: Exception) -> bool:
    """Whether this process prints `e`: every rank stops on the same pre-flight problems (rank 0 found and broadcast
    them) and the same signal (agreed at the same iteration), so rank 0 alone says so; anything else may be one
    rank's own, and each rank prints it."""
    from mixgrpo.preflight import PreflightError
    from mixgrpo.train import TrainingStopped

    return not isinstance(e, (PreflightError, TrainingStopped)) or os.environ.get("RANK", "0") == "0"


def _error_line(e: Exception) -> str:
    """The one line printed for a user error (an OSError: what failed, on which path, and the usual fix)."""
    if not isinstance(e, OSError):
        return str(e)
    from mixgrpo.fileio import os_error_message

    return os_error_message(e)


def _is_user_error(e: BaseException) -> bool:
    """Errors of the user's input (`mixgrpo.errors.UserError`) and of the machine (OSError: a full disk, a missing
    file): shown as one line. Anything else is a bug, in mixgrpo or a library: traceback."""
    return isinstance(e, (UserError, OSError))


if __name__ == "__main__":
    sys.exit(main())
