"""`mixgrpo serve-rewards`: rewards on their own devices, behind HTTP (FastAPI + uvicorn: the `serve` extra).

    mixgrpo serve-rewards --reward verifier --reward verifier:score=strict --port 8601
    mixgrpo serve-rewards --rewards configs/my_run.yaml --reward hps:device=cuda:1,path=...   (a run's rewards: too)

It hosts registered rewards and user rewards ("package.module:function") with their arguments, each on the device
its `device` argument names, labelled as a run labels them (`mixgrpo.rewards.scoring.reward_labels`). Endpoints
(the wire format: `mixgrpo.rewards.wire`, docs/rewards.md):

- GET /health: the rewards (label, name, args, frames, device, takes_inputs), the package versions, the queue and the
  limits;
- POST /score: scores for the images of a request with the rewards it names (and each image's input image, for the
  rewards that take inputs); one score per image and reward, or null and the reason where the reward raised or gave
  NaN / inf for that image (never 0).

Concurrent requests are batched: whatever is queued while a batch is scored forms the next one, up to
`batch_size` images (a request is never split: a larger one is scored alone), and each reward runs once on all the images of the batch that
ask for it (requests of another image or input size, without seeds or without inputs run apart). If a reward raises on a batch of several
requests, each request is scored alone, so that one bad request does not fail the others. One worker thread runs
the rewards, in arrival order. One log line per batch. It binds 127.0.0.1 unless told otherwise, requires a bearer
token when started with one, refuses bodies over `max_request_bytes` (413) and stops on SIGTERM after answering
the requests it holds (exit status 128 + the signal, as a signalled process).
"""

# no `from __future__ import annotations`: FastAPI reads the handlers' annotations (Request) at run time
import asyncio
import hmac
import json
import platform
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

import mixgrpo
from mixgrpo.config import RewardConfig
from mixgrpo.errors import ConfigError
from mixgrpo.rewards.base import RewardError, build_reward, call_reward
from mixgrpo.rewards.scoring import reward_labels
from mixgrpo.rewards.wire import PROTOCOL, WireError, read_request, score_answer


def require_serving_packages() -> None:
    """Raise ValueError naming the extra to install when FastAPI or uvicorn is missing."""
    from mixgrpo.packages import install_command, missing

    absent = missing(["fastapi", "uvicorn"])
    if absent:
        raise ConfigError(f"mixgrpo serve-rewards needs {' and '.join(absent)} (the 'serve' extra): "
                          f"{install_command(absent)}")


@dataclass
class HostedReward:
    label: str
    spec: RewardConfig
    fn: Any

    @property
    def takes_inputs(self) -> bool:
        """Whether the reward compares each image with its input image (requests must carry `inputs`)."""
        return bool(getattr(self.fn, "takes_inputs", False))

    def describe(self) -> dict[str, Any]:
        module = self.spec.name.partition(":")[0] if ":" in self.spec.name else None
        return {"label": self.label, "name": self.spec.name, "args": self.spec.args, "frames": self.spec.frames,
                "device": str(self.spec.args.get("device", "cpu")), "takes_inputs": self.takes_inputs,
                **({"module": module} if module else {})}


@dataclass
class Job:
    """One /score request waiting for its batch; `done` gets ({label: [B] floats}, {label: [B] errors})."""

    labels: list[str]
    images: torch.Tensor
    prompts: list[str]
    seeds: list[int] | None
    inputs: torch.Tensor | None  # [B, 3, H, W]: each image's input image, or None
    done: asyncio.Future
    scores: dict[str, list[float]] = field(default_factory=dict)
    errors: dict[str, list[str | None]] = field(default_factory=dict)


class RewardHost:
    """The hosted rewards and their batching queue (the part of the server without HTTP)."""

    def __init__(self, specs: list[RewardConfig], batch_size: int, log=print):
        if not specs:
            raise ConfigError("no reward to serve: pass --reward NAME[:key=value,...] or --rewards FILE")
        self.rewards = {label: HostedReward(label, spec, build_reward(spec.name, spec.args, spec.frames))
                        for label, spec in zip(reward_labels(specs), specs)}
        for label, reward in self.rewards.items():  # its files, before the first request finds them missing
            check = getattr(reward.fn, "check", None)
            if callable(check):
                try:
                    check()
                except RewardError as e:
                    raise ConfigError(f"reward {label}: {e}") from None
        self.batch_size, self.log = batch_size, log
        self.queue: asyncio.Queue | None = None
        self.waiting_images = 0
        self.batches = 0
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rewards")

    def health(self) -> dict[str, Any]:
        import fastapi
        import uvicorn

        return {"status": "ok", "protocol": PROTOCOL,
                "rewards": [r.describe() for r in self.rewards.values()],
                "versions": {"mixgrpo": mixgrpo.__version__, "torch": torch.__version__,
                             "python": platform.python_version(), "fastapi": fastapi.__version__,
                             "uvicorn": uvicorn.__version__},
                "queue": {"requests": self.queue.qsize() if self.queue else 0, "images": self.waiting_images},
                "batch_size": self.batch_size, "batches_scored": self.batches}

    async def submit(self, job: Job) -> None:
        self.waiting_images += len(job.prompts)
        await self.queue.put(job)

    async def run(self) -> None:
        """The batching loop: take the first waiting job, then every job already queued that still fits."""
        loop = asyncio.get_running_loop()
        held: Job | None = None
        while True:
            batch = [held or await self.queue.get()]
            held, size = None, len(batch[0].prompts)
            while not self.queue.empty():
                job = self.queue.get_nowait()
                if size + len(job.prompts) > self.batch_size:
                    held = job
                    break
                batch.append(job)
                size += len(job.prompts)
            self.waiting_images -= size
            try:
                await loop.run_in_executor(self._worker, self.score_batch, batch)
            except Exception as e:  # noqa: BLE001  (a bug in the batching itself: answer, keep serving)
                for job in batch:
                    if not job.done.done():
                        job.done.set_exception(e)
                continue
            for job in batch:
                if not job.done.done():
                    job.done.set_result(None)

    def score_batch(self, batch: list[Job]) -> None:
        """Run every reward once over the jobs of `batch` that ask for it (per image size and seeding)."""
        start, timings = time.perf_counter(), []
        for label, reward in self.rewards.items():
            groups: dict[tuple, list[Job]] = defaultdict(list)
            for job in batch:
                if label in job.labels:
                    inputs = None if job.inputs is None else tuple(job.inputs.shape[1:])
                    groups[(tuple(job.images.shape[1:]), job.seeds is None, inputs)].append(job)
            t = time.perf_counter()
            for jobs in groups.values():
                self._score_jobs(label, reward, jobs)
            if groups:
                timings.append(f"{label} {time.perf_counter() - t:.3f}s")
        self.batches += 1
        self.log(f"batch {self.batches}: {len(batch)} request(s), {sum(len(j.prompts) for j in batch)} images; "
                 f"{', '.join(timings)}; {time.perf_counter() - start:.3f}s; queue {self.queue.qsize()}", flush=True)

    def _score_jobs(self, label: str, reward: HostedReward, jobs: list[Job]) -> None:
        images = torch.cat([j.images for j in jobs])
        prompts = [p for j in jobs for p in j.prompts]
        seeds = None if jobs[0].seeds is None else [s for j in jobs for s in j.seeds]
        inputs = None if jobs[0].inputs is None else torch.cat([j.inputs for j in jobs])
        try:
            scores = torch.as_tensor(call_reward(reward.fn, images, prompts, seeds, inputs),
                                     dtype=torch.float32).flatten()
            if scores.numel() != len(prompts):
                raise ValueError(f"returned {scores.numel()} scores for {len(prompts)} images")
        except Exception as e:  # noqa: BLE001  (the reward's failure is the answer, not the server's)
            if len(jobs) > 1:  # one request's bad input must not fail the others of its batch
                for job in jobs:
                    self._score_jobs(label, reward, [job])
                return
            why = f"{label}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            jobs[0].scores[label] = [float("nan")] * len(prompts)
            jobs[0].errors[label] = [why] * len(prompts)
            return
        at = 0
        for job in jobs:
            n = len(job.prompts)
            job.scores[label] = scores[at:at + n].tolist()
            job.errors[label] = [None] * n
            at += n


def build_app(host: RewardHost, token: str | None = None, max_request_bytes: int = 256 << 20):
    """The FastAPI application of `host`."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse

    @asynccontextmanager
    async def lifespan(app):
        host.queue = asyncio.Queue()
        task = asyncio.create_task(host.run())
        yield
        task.cancel()  # uvicorn has answered every request in flight by now
        host.log(f"reward server stopped after {host.batches} batches", flush=True)

    app = FastAPI(title="mixgrpo reward server", lifespan=lifespan)

    def error(status: int, message: str, where: str | None = None) -> JSONResponse:
        return JSONResponse({"error": message, **({"field": where} if where else {})}, status_code=status)

    def refused(request: Request) -> JSONResponse | None:
        if token is None:
            return None
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            return error(401, "missing or wrong bearer token: send the header 'Authorization: Bearer TOKEN' with the "
                              "token the server was started with", "Authorization")
        return None

    @app.get("/health")
    async def health(request: Request):
        return refused(request) or host.health()

    @app.post("/score")
    async def score(request: Request):
        if (answer := refused(request)) is not None:
            return answer
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_request_bytes:
            return error(413, f"the request has {int(declared)} bytes, over this server's limit of "
                              f"{max_request_bytes}: send fewer images per request", "body")
        body = bytearray()
        async for part in request.stream():
            body += part
            if len(body) > max_request_bytes:
                return error(413, f"the request is over this server's limit of {max_request_bytes} bytes: send "
                                  f"fewer images per request", "body")
        try:
            parsed = json.loads(body)
        except ValueError:
            return error(400, "the body is not JSON", "body")
        try:
            request = read_request(parsed, list(host.rewards),
                                   [label for label, r in host.rewards.items() if r.takes_inputs])
        except WireError as e:  # undecodable images or inputs: 422
            return error(422 if e.field.startswith(("images", "inputs.")) else 400, str(e), e.field)
        job = Job(*request, done=asyncio.get_running_loop().create_future())
        await host.submit(job)
        await job.done
        return score_answer(job.scores, job.errors)

    return app


def serve(specs: list[RewardConfig], host: str = "127.0.0.1", port: int = 8601, batch_size: int = 64,
          token: str | None = None, max_request_bytes: int = 256 << 20) -> None:
    """Serve `specs` until SIGTERM / SIGINT (uvicorn answers the requests in flight, then stops)."""
    require_serving_packages()
    import uvicorn

    rewards = RewardHost(specs, batch_size)
    app = build_app(rewards, token, max_request_bytes)
    listing = ", ".join(f"{r.label} ({r.spec.args.get('device', 'cpu')})" for r in rewards.rewards.values())
    print(f"serving rewards {listing} on http://{host}:{port} (batch size {batch_size}"
          f"{', bearer token required' if token else ''}); stop with SIGTERM or Ctrl-C", flush=True)
    # on SIGTERM / SIGINT uvicorn stops accepting, answers what it holds, then re-raises the signal: the process
    # ends as signalled (143 / 130 in a shell), like `mixgrpo train`
    uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False)).run()
