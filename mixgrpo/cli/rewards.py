"""`mixgrpo serve-rewards` (rewards hosted for training runs over HTTP) and the `--reward NAME:key=value,...` option
it shares with `mixgrpo eval`."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from mixgrpo.errors import UsageError


def add_parser(sub) -> None:
    p = sub.add_parser("serve-rewards", help="host rewards on their own devices for training runs (HTTP; "
                                             "docs/rewards.md)", allow_abbrev=False)
    p.add_argument("--reward", action="append",
                   help="reward NAME or NAME:key=value,... (repeatable), e.g. hps:device=cuda:1,path=... or "
                        "mypkg.rewards:score; device= says where it runs")
    p.add_argument("--rewards", help="a YAML file: a list of rewards in the form of a run's rewards: (name, args, "
                                     "frames), or a run's config (its rewards are served)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only; "
                                                       "0.0.0.0 for every interface)")
    p.add_argument("--port", type=int, default=8601, help="default 8601")
    p.add_argument("--batch-size", type=int, default=64,
                   help="most images scored together: concurrent requests are batched up to it (default 64)")
    p.add_argument("--token-env", help="environment variable holding a bearer token that every request must carry")
    p.add_argument("--max-request-mb", type=float, default=256.0, help="largest request body in MiB (default 256)")
    p.set_defaults(func=run_serve_rewards)


def reward_spec(text: str):
    """'NAME' or 'NAME:key=value,key=value' -> RewardConfig (values parsed as YAML, `mixgrpo.keyvalue`)."""
    from mixgrpo.config import RewardConfig, from_dict
    from mixgrpo.keyvalue import parse_pair
    from mixgrpo.rewards import REWARDS

    name, rest = text, ""
    head, sep, tail = text.rpartition(":")
    # the arguments start at the first ':' followed by key= (a value may hold ':' too: device=cuda:1, server=URL)
    split = re.match(r"(.+?):([A-Za-z_]\w*=.*)", text, flags=re.S)
    if split is not None:
        name, rest = split.groups()
    elif sep and head in REWARDS.names():
        name, rest = head, tail  # NAME:something that is not key=value: refused just below
    kwargs = dict(parse_pair(item, f"--reward {text!r}:", example="verifier:score=strict")
                  for item in filter(None, rest.split(",")))
    # frames= (videos: how frame scores aggregate) and server= (the reward server that scores it) are the reward's
    # own config fields, not factory arguments
    fields = {key: kwargs.pop(key) for key in ("frames", "server") if key in kwargs}
    return from_dict(RewardConfig, {"name": name, "args": kwargs, **fields}, "reward")


def run_serve_rewards(args: argparse.Namespace) -> None:
    from math import inf

    from mixgrpo.errors import check_values
    from mixgrpo.rewards.remote import token_from
    from mixgrpo.rewards.server import require_serving_packages, serve

    require_serving_packages()
    specs = _rewards_file(args.rewards) if args.rewards else []
    specs += [reward_spec(r) for r in args.reward or []]
    check_values([(args.batch_size >= 1, "--batch-size", args.batch_size, "an integer >= 1"),
                  (0 <= args.port < 65536, "--port", args.port, "a port number in 0..65535"),
                  (0 < args.max_request_mb < inf, "--max-request-mb", args.max_request_mb, "a positive finite number")])
    serve(specs, args.host, args.port, args.batch_size, token_from(args.token_env or ""),
          int(args.max_request_mb * 2**20))


def _rewards_file(text: str) -> list:
    """--rewards: a YAML list of rewards, or a run's config (its rewards:); weight and server do not apply."""
    import yaml

    from mixgrpo.config import RewardConfig, from_dict, read_yaml

    path = Path(text)
    if not path.is_file():
        raise UsageError(f"--rewards {text!r} does not exist: give a YAML file with a list of rewards (or a run's "
                         f"config)")
    data = yaml.safe_load(path.read_text(encoding="utf-8")) if path.suffix in (".yaml", ".yml") else None
    entries = data if isinstance(data, list) else read_yaml(path).get("rewards")
    if not isinstance(entries, list):
        raise UsageError(f"--rewards {text!r} holds no list of rewards: give a list of {{name, args}} or a run's "
                         f"config with rewards:")
    specs = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise UsageError(f"--rewards {text!r}: entry {i} is {entry!r}, not a mapping {{name, args}}")
        entry = {k: v for k, v in entry.items() if k not in ("weight", "server")}
        specs.append(from_dict(RewardConfig, entry, f"rewards[{i}]"))
    return specs
