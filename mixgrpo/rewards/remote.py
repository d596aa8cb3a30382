"""The trainer's side of a reward server (`mixgrpo serve-rewards`): rewards with `server: URL` in a run's config.

One `ServerScorer` per server (a URL, or a list of replicas' URLs) scores every reward of the run that server hosts
with one POST /score per replica and scoring call: the images travel once for all of them (with each image's input
image when one of them takes inputs: an editing or image-to-video run), and replicas get equal contiguous shares of
the images. A share whose replica fails is sent to the next replica; when every replica fails,
the call raises `RewardError` naming the server, which the failure policy (`mixgrpo.rewards.scoring`) retries with
backoff and then scores NaN, never 0. An answer with another number of scores, or not of the wire format
(`mixgrpo.rewards.wire`), is such a failure too; a 4xx answer (a missing token, a request the server refuses) is an
error of the setup and stops the run at once.

A reward of the config is matched to a hosted reward by name, frame aggregation and arguments (`device` aside: it
says where the server runs it); `hosted_match` does it for pre-flight and for the scorer. HTTP uses the standard
library: training against a server needs no web framework.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import urllib.error
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Sequence

import torch

from mixgrpo.errors import ConfigError
from mixgrpo.rewards.base import RewardError
from mixgrpo.rewards.wire import PROTOCOL, WireError, read_answer, score_request

PLACEMENT_ARGS = ("device",)
"""Arguments that say where a reward runs, not what it computes: not compared between a run and its server."""


class ServerSetupError(ConfigError):
    """A server refused a request (4xx: a wrong token, a reward it does not host): retrying cannot help."""


def _canonical(args: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps({k: v for k, v in args.items() if k not in PLACEMENT_ARGS}, sort_keys=True))


def hosted_match(name: str, args: dict[str, Any], frames: str, hosted: list[dict[str, Any]]) -> tuple[str | None, str]:
    """(the label of the hosted reward that is `name` with `args` and `frames`, '') or (None, why not)."""
    same_name = [h for h in hosted if h.get("name") == name]
    for h in same_name:
        if _canonical(h.get("args") or {}) == _canonical(args) and h.get("frames", "mean") == frames:
            return h["label"], ""
    if not same_name:
        return None, f"it does not host reward {name!r} (it hosts {sorted({h.get('name') for h in hosted})})"
    served = "; ".join(f"args {_canonical(h.get('args') or {})}, frames {h.get('frames', 'mean')!r}" for h in same_name)
    return None, (f"it serves {name!r} with other settings ({served}) than the config's (args {_canonical(args)}, "
                  f"frames {frames!r})")


class ServerClient:
    """JSON over HTTP to one URL, with an optional bearer token."""

    def __init__(self, url: str, timeout: float, token: str | None):
        self.url, self.timeout, self.token = url.rstrip("/"), timeout, token

    def call(self, path: str, body: dict[str, Any] | None = None, timeout: float | None = None) -> Any:
        """GET (no body) or POST `path`; the decoded JSON answer. Raises ServerSetupError on 4xx, RewardError
        (or TimeoutError / ConnectionError) on what a retry may cure."""
        url = self.url + path
        headers = {"Content-Type": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(url, data=data, headers=headers, method="GET" if body is None else "POST")
        timeout = self.timeout if timeout is None else timeout
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                payload = response.read()
        except urllib.error.HTTPError as e:
            detail = e.read()[:300].decode(errors="replace")
            try:
                detail = json.loads(detail).get("error", detail)
            except (ValueError, AttributeError):
                pass
            if 400 <= e.code < 500 and e.code not in (408, 429):
                raise ServerSetupError(f"reward server {self.url} refused {path} (HTTP {e.code}): {detail}") from None
            raise RewardError(f"reward server {self.url} answered HTTP {e.code}: {detail}") from None
        except (TimeoutError, socket.timeout):
            raise TimeoutError(f"reward server {self.url} gave no answer within {timeout} s") from None
        except urllib.error.URLError as e:
            if isinstance(e.reason, (TimeoutError, socket.timeout)):
                raise TimeoutError(f"reward server {self.url} gave no answer within {timeout} s") from None
            raise ConnectionError(f"cannot reach reward server {self.url}: {e.reason}") from None
        except OSError as e:  # reset mid-answer (a killed server), ...
            raise ConnectionError(f"connection to reward server {self.url} failed: {e}") from None
        try:
            return json.loads(payload)
        except ValueError:
            raise RewardError(f"reward server {self.url} answered something other than JSON: {payload[:100]!r}") from None

    def health(self, timeout: float = 10.0) -> dict[str, Any]:
        """GET /health, checked to be a mixgrpo reward server of this protocol."""
        answer = self.call("/health", timeout=timeout)
        if not isinstance(answer, dict) or not isinstance(answer.get("rewards"), list):
            raise RewardError(f"{self.url}/health is not a mixgrpo reward server's (no rewards list)")
        if answer.get("protocol") != PROTOCOL:
            raise RewardError(f"reward server {self.url} speaks protocol {answer.get('protocol')!r}, this mixgrpo "
                              f"{PROTOCOL}: run the same mixgrpo version on both sides")
        return answer


def token_from(env: str) -> str | None:
    """The bearer token in environment variable `env` ('' = none). Raises ValueError when it is named but unset."""
    if not env:
        return None
    token = os.environ.get(env)
    if not token:
        raise ConfigError(f"scoring.server_token_env = {env!r}, but that environment variable is not set: export the "
                          f"token the servers were started with, or set scoring.server_token_env to ''")
    return token


class ServerScorer:
    """Scores the rewards `specs` ({run label: (name, args, frames)}) on one server: its replicas `urls` share the
    images (equal contiguous shares, one request each, concurrently).

    __call__(images [B, ...] in [0, 1], prompts, seeds, inputs [B, 3, H, W] or None)
        -> ({label: [B] float32, NaN where unscored}, {label: why some images are NaN, or None})
    The inputs travel (in the images' encoding) when a reward asked for takes them (GET /health says which).
    `served` counts the images each URL scored (the run's metrics record it)."""

    takes_inputs = True  # passes the inputs on to the hosted rewards that take them (`mixgrpo.rewards.base.call_reward`)

    def __init__(self, urls: Sequence[str], specs: dict[str, tuple[str, dict[str, Any], str]], timeout: float,
                 token: str | None, encoding: str):
        self.clients = [ServerClient(u, timeout, token) for u in urls]
        self.specs, self.encoding = specs, encoding
        self.labels = list(specs)
        self.where = ", ".join(c.url for c in self.clients)
        self._hosted: dict[str, str] | None = None  # run label -> the server's label
        self._needs_inputs: set[str] = set()  # the server's labels of the rewards that take inputs
        self.served: Counter = Counter()
        self._lock = threading.Lock()

    def _server_labels(self) -> dict[str, str]:
        if self._hosted is None:
            errors = []
            for client in self.clients:
                try:
                    hosted = client.health()["rewards"]
                    break
                except (RewardError, TimeoutError, ConnectionError) as e:
                    errors.append(str(e))
            else:
                raise RewardError("; ".join(errors))
            labels = {}
            for label, (name, args, frames) in self.specs.items():
                match, why = hosted_match(name, args, frames, hosted)
                if match is None:
                    raise ServerSetupError(f"reward server {self.where} cannot score {label!r}: {why}")
                labels[label] = match
            self._needs_inputs = {h["label"] for h in hosted if h.get("takes_inputs")}
            self._hosted = labels
        return self._hosted

    def _share(self, i: int, labels: list[str], images: torch.Tensor, prompts: list[str], seeds: list[int] | None,
               inputs: torch.Tensor | None) -> tuple[dict[str, torch.Tensor], dict[str, str | None]]:
        """Share i of the images on its replica, else on the next ones in turn."""
        errors = []
        for k in range(len(self.clients)):
            client = self.clients[(i + k) % len(self.clients)]
            try:
                answer = client.call("/score", score_request(labels, images, prompts, seeds, self.encoding, inputs))
                scores, notes = read_answer(answer, labels, len(prompts))
            except WireError as e:
                errors.append(f"{client.url} answered malformed scores: {e}")
                continue
            except (RewardError, TimeoutError, ConnectionError) as e:
                errors.append(str(e))
                continue
            with self._lock:
                self.served[client.url] += len(prompts)
            return scores, notes
        raise RewardError("; ".join(errors))

    def __call__(self, images: torch.Tensor, prompts: Sequence[str], seeds: Sequence[int] | None = None,
                 inputs: torch.Tensor | None = None, only: Sequence[str] | None = None,
                 ) -> tuple[dict[str, torch.Tensor], dict[str, str | None]]:
        """Every reward of the scorer, or those of `only` (run labels)."""
        hosted = self._server_labels()
        wanted = list(only or self.labels)
        labels = [hosted[label] for label in wanted]
        if not self._needs_inputs.intersection(labels):
            inputs = None  # no reward asked for compares with them: they need not travel
        bounds = torch.linspace(0, len(prompts), len(self.clients) + 1).round().long().tolist()
        parts = [(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]

        def share(i: int, a: int, b: int) -> tuple[dict[str, torch.Tensor], dict[str, str | None]]:
            return self._share(i, labels, images[a:b], list(prompts[a:b]), None if seeds is None else list(seeds[a:b]),
                               None if inputs is None else inputs[a:b])

        with ThreadPoolExecutor(max_workers=len(parts)) as pool:
            results = list(pool.map(lambda ip: share(ip[0], *ip[1]), enumerate(parts)))
        scores = {run: torch.cat([r[0][srv] for r in results]) for run, srv in zip(wanted, labels)}
        notes = {run: "; ".join(n for r in results if (n := r[1][srv])) or None for run, srv in zip(wanted, labels)}
        return scores, notes
