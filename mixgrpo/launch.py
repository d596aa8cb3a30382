"""`mixgrpo launch`: torchrun (torch.distributed.run) with mixgrpo's exit statuses and no launcher traceback.

    mixgrpo launch --nproc_per_node 8 train --config flux_mixgrpo [key=value ...]
    mixgrpo launch --nnodes 4 --nproc_per_node 8 --rdzv-backend c10d --rdzv-endpoint HOST:PORT train --config C

Everything before the mixgrpo command (train, sample, eval, ...) is torchrun's own options; the command runs as
`-m mixgrpo COMMAND ...` in every worker. Plain torchrun works too, but it turns any non-zero exit of a worker into
its own ChildFailedError (a ~35-line block and a traceback, exit 1), and a signal it receives into a
SignalException traceback (exit 1). The launcher here runs the same elastic agent in-process and ends as
the workers did (docs/distributed.md, "Launching"):

- a user error (status 2): the error lines printed once, by rank 0, and nothing after them; exit 2;
- a stop by SIGINT / SIGTERM (the launcher's, forwarded to every worker, or the workers' own), after the
  checkpoint: exit 128 + the signal (130 / 143), as a one-process run;
- a worker killed by signal N: 128 + N; a bug (status 1): the worker's traceback, then one line naming the rank.

The elastic agent waits `--shutdown-timeout` seconds for the workers after forwarding a signal before it kills
them: torchrun's default is 30 s, shorter than one iteration of a large model; here it is SHUTDOWN_TIMEOUT unless
the option or TORCH_ELASTIC_SHUTDOWN_TIMEOUT says otherwise.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Sequence

from mixgrpo.errors import ConfigError

SHUTDOWN_TIMEOUT = 900  # s: an iteration of FLUX.1 at 8 x 12 images and its checkpoint, with room to spare


def split(argv: Sequence[str], commands: Sequence[str]) -> tuple[list[str], list[str]]:
    """(torchrun's options, the mixgrpo command and its arguments), split at the first of `commands`."""
    for i, arg in enumerate(argv):
        if arg in commands:
            return list(argv[:i]), list(argv[i:])
    raise ConfigError(f"mixgrpo launch: no mixgrpo command (one of {', '.join(commands)}) after the torchrun "
                     f"options, e.g. mixgrpo launch --nproc_per_node 8 train --config mixgrpo")


def exit_status(exitcode: int) -> int:
    """A worker's exit code as this process's status: a signal death (-N) becomes 128 + N, as a shell reports it."""
    return 128 - exitcode if exitcode < 0 else exitcode


def main(argv: Sequence[str], commands: Sequence[str]) -> int:
    """Launch `argv` ([torchrun options] COMMAND [arguments], COMMAND one of `commands`); returns the exit status.
    -h / --help before the command: this module's usage, then torchrun's options."""
    if any(a in ("-h", "--help") for a in argv) and not any(a in commands for a in argv):
        from torch.distributed.run import get_args_parser

        print(__doc__.split("\n\n")[0] + "\n\n" + __doc__.split("\n\n")[1] + "\n\ntorchrun's options:")
        get_args_parser().print_help()
        return 0
    options, command = split(argv, commands)
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    args = torchrun.parse_args([*options, "-m", "mixgrpo", *command])
    if getattr(args, "shutdown_timeout", 0) is None and "TORCH_ELASTIC_SHUTDOWN_TIMEOUT" not in os.environ:
        args.shutdown_timeout = SHUTDOWN_TIMEOUT
    if "LOGLEVEL" not in os.environ:  # the agent's own log lines (closing signals, failures) repeat what ranks print
        for name in list(logging.root.manager.loggerDict):
            if name.startswith("torch.distributed"):
                logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        torchrun.run(args)
    except SignalException as e:  # the launcher was signalled: the agent forwarded it and waited for the workers
        return 128 + int(e.sigval)
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        status = exit_status(failure.exitcode)
        if status not in (2, 130, 143):  # not a user error or a clean stop: the worker's traceback is above
            print(f"mixgrpo launch: rank {rank} (pid {failure.pid}) exited with status {status}", file=sys.stderr)
        return status
    return 0
