"""Reward servers: `mixgrpo serve-rewards` in a real child process on 127.0.0.1 (a free port, started and stopped by
each test), the wire format, training scored through servers (bit for bit the in-process run), the failure policy
against dead, lying and refusing servers, and pre-flight.

The runs are the analytic Gaussian run of tests/gaussian_run.py (about a second per iteration); the served rewards
are tests/toy_rewards.py's, imported by the server from tests/ (PYTHONPATH).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from gaussian_run import gaussian_run, gaussian_run_yaml
from mixgrpo.checkpoint import latest_checkpoint
from mixgrpo.config import build_config
from mixgrpo.images import to_pil
from mixgrpo.preflight import PreflightError, check_run
from mixgrpo.rewards.remote import ServerScorer, ServerSetupError
from mixgrpo.rewards.scoring import Retrying
from mixgrpo.rewards.wire import WireError, decode_images, encode_images, read_request, score_request
from mixgrpo.rundir import read_metrics
from mixgrpo.train import TrainingError, train

ROOT = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python -m mixgrpo serve-rewards ARGS` on a free port of 127.0.0.1, its output kept line by line."""

    def __init__(self, *args: str, port: int | None = None, **env: str):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        path = [str(ROOT), str(TESTS), *filter(None, [os.environ.get("PYTHONPATH")])]
        environ = {**os.environ, "PYTHONPATH": os.pathsep.join(path), "OMP_NUM_THREADS": "1", **env}
        self.proc = subprocess.Popen([sys.executable, "-m", "mixgrpo", "serve-rewards", "--port", str(self.port),
                                      *args], env=environ, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.output: list[str] = []
        threading.Thread(target=lambda: self.output.extend(self.proc.stdout), daemon=True).start()
        deadline = time.monotonic() + 90
        while True:
            try:
                get(self.url + "/health", token=env.get("TEST_REWARD_TOKEN"))
                return
            except (urllib.error.URLError, ConnectionError):
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.kill9()
                    raise RuntimeError(f"the reward server did not start: {''.join(self.output)}") from None
                time.sleep(0.2)

    def stop(self) -> int:
        """SIGTERM, then its exit status."""
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=30)

    def kill9(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=30)


def get(url: str, token: str | None = None):
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=30) as r:
        return json.loads(r.read())


def post(url: str, body, token: str | None = None) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=data, headers=headers), timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.fixture
def served():
    servers = []

    def start(*args, **kwargs) -> Server:
        servers.append(Server(*args, **kwargs))
        return servers[-1]

    yield start
    for server in servers:
        if server.proc.poll() is None:
            server.kill9()


IMAGES = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
PROMPTS = ["a", "b", "c", "d"]


def brightness(images, target=1.0):
    return -(images.mean(dim=(1, 2, 3)) - target).abs()


def _end_state(run: Path) -> dict:
    drop = lambda m: {k: v for k, v in m.items() if not k.startswith(("time/", "memory/")) and k != "reward_servers"}  # noqa: E731
    return {"weights": load_file(run / "final" / "model.safetensors"), "metrics": [drop(m) for m in read_metrics(run)]}


def _assert_same_run(run: Path, reference: Path) -> None:
    got, want = _end_state(run), _end_state(reference)
    assert got["weights"].keys() == want["weights"].keys()
    assert all(torch.equal(got["weights"][k], want["weights"][k]) for k in want["weights"])
    assert got["metrics"] == want["metrics"]


# --------------------------------------------------------------------------------------------------
# the wire format


def test_images_travel_exactly_as_float32_and_as_a_png_would_as_uint8_or_png():
    exact = decode_images(json.loads(json.dumps(encode_images(IMAGES, "float32"))))
    assert torch.equal(exact, IMAGES)
    as_png = torch.stack([torch.from_numpy(np.asarray(to_pil(x))).permute(2, 0, 1) for x in IMAGES]).float() / 255
    assert torch.equal(decode_images(encode_images(IMAGES, "uint8")), as_png)
    assert torch.equal(decode_images(encode_images(IMAGES, "png")), as_png)
    videos = torch.rand(2, 3, 3, 4, 4)
    assert torch.equal(decode_images(encode_images(videos, "float32")), videos)


def test_input_images_travel_beside_the_images_exactly_as_float32():
    inputs = torch.rand(4, 3, 6, 6, generator=torch.Generator().manual_seed(1))
    body = json.loads(json.dumps(score_request(["keep"], IMAGES, PROMPTS, None, "float32", inputs)))
    request = read_request(body, ["keep"], takes_inputs=["keep"])
    assert torch.equal(request.images, IMAGES) and torch.equal(request.inputs, inputs) and request.seeds is None
    assert read_request(json.loads(json.dumps(score_request(["keep"], IMAGES, PROMPTS, None, "float32"))),
                        ["keep"]).inputs is None  # a reward that does not take inputs needs none
    with pytest.raises(WireError, match="'keep' compares each image with its input image") as e:
        read_request(json.loads(json.dumps(score_request(["keep"], IMAGES, PROMPTS, None, "float32"))), ["keep"],
                     takes_inputs=["keep"])
    assert e.value.field == "inputs"


@pytest.mark.parametrize("change, field", [
    (lambda b: b.update(inputs=encode_images(IMAGES[:3])), "inputs"),
    (lambda b: b.update(inputs={"format": "raw"}), "inputs.dtype"),
    (lambda b: b.update(rewards=["nope"]), "rewards"),
    (lambda b: b.update(prompts=["a"]), "prompts"),
    (lambda b: b.update(seeds=[1, 2]), "seeds"),
    (lambda b: b.update(extra=1), "extra"),
    (lambda b: b["images"].update(shape=[4, 3, 8, 9]), "images.data"),
    (lambda b: b["images"].update(shape=[4, 1, 8, 8]), "images.shape"),
    (lambda b: b["images"].update(dtype="float64"), "images.dtype"),
    (lambda b: b["images"].update(data="not base64!"), "images.data"),
    (lambda b: b["images"].update(format="jpeg"), "images.format"),
])
def test_a_bad_request_is_refused_naming_its_field(change, field):
    body = json.loads(json.dumps(score_request(["brightness"], IMAGES, PROMPTS, [1, 2, 3, 4], "float32")))
    change(body)
    with pytest.raises(WireError) as e:
        read_request(body, ["brightness"])
    assert e.value.field == field


# --------------------------------------------------------------------------------------------------
# the server


def test_the_server_scores_reports_batches_refuses_bad_input_and_stops_on_sigterm(served):
    server = served("--reward", "toy_rewards:brightness", "--reward", "toy_rewards:brightness:target=0.5",
                    "--reward", "toy_rewards:flaky", "--reward", "toy_rewards:broken", "--max-request-mb", "0.05")
    health = get(server.url + "/health")
    assert [(r["label"], r["args"], r["device"]) for r in health["rewards"]] == [
        ("brightness", {}, "cpu"), ("brightness_2", {"target": 0.5}, "cpu"), ("flaky", {}, "cpu"),
        ("broken", {}, "cpu")]
    assert health["protocol"] == 1 and health["queue"] == {"requests": 0, "images": 0}
    assert {"mixgrpo", "torch", "python"} <= set(health["versions"])

    status, answer = post(server.url + "/score", score_request(["brightness", "brightness_2", "flaky", "broken"],
                                                               IMAGES, PROMPTS, None, "float32"))
    assert status == 200
    assert torch.equal(torch.tensor(answer["scores"]["brightness"]), brightness(IMAGES))
    assert torch.equal(torch.tensor(answer["scores"]["brightness_2"]), brightness(IMAGES, 0.5))
    assert answer["errors"]["brightness"] == [None] * 4
    # per-image errors: NaN becomes null with a reason; a reward that raises fails its images, not the request
    assert [s is None for s in answer["scores"]["flaky"]] == [True, False, True, False]
    assert answer["errors"]["flaky"][0] and answer["errors"]["flaky"][1] is None
    assert answer["scores"]["broken"] == [None] * 4 and "the reward server is down" in answer["errors"]["broken"][0]

    status, answer = post(server.url + "/score", {**score_request(["brightness"], IMAGES, PROMPTS, None, "float32"),
                                                  "prompts": ["a"]})
    assert status == 400 and answer["field"] == "prompts"
    status, answer = post(server.url + "/score", b"{not json")
    assert status == 400 and answer["field"] == "body"
    big = torch.rand(64, 3, 16, 16)  # 196 kB of float32, over the 50 kB limit
    status, answer = post(server.url + "/score", score_request(["brightness"], big, ["p"] * 64, None, "float32"))
    assert status == 413 and "limit" in answer["error"]

    assert server.stop() == -signal.SIGTERM  # after a clean stop, as signalled
    log = "".join(server.output)
    assert "batch 1: 1 request(s), 4 images" in log and "reward server stopped after 1 batches" in log


def test_concurrent_requests_are_scored_in_one_batch_and_a_token_is_required(served, slow_reward):
    server = served("--reward", "tests_slow_reward:slow", "--token-env", "TEST_REWARD_TOKEN", "--batch-size", "64",
                    TEST_REWARD_TOKEN="s3cret")
    status, answer = post(server.url + "/score", score_request(["slow"], IMAGES, PROMPTS, None, "float32"))
    assert status == 401 and answer["field"] == "Authorization"
    status, _ = post(server.url + "/score", score_request(["slow"], IMAGES, PROMPTS, None, "float32"), token="wrong")
    assert status == 401
    results = []
    first = threading.Thread(target=lambda: results.append(post(
        server.url + "/score", score_request(["slow"], IMAGES, PROMPTS, None, "float32"), token="s3cret")))
    first.start()
    time.sleep(0.5)  # the first request holds the worker for 2 s: the next three queue up behind it
    rest = [threading.Thread(target=lambda i=i: results.append(post(
        server.url + "/score", score_request(["slow"], IMAGES[:i + 1], PROMPTS[:i + 1], None, "float32"),
        token="s3cret"))) for i in range(3)]
    for t in rest:
        t.start()
    for t in [first, *rest]:
        t.join()
    assert sorted(len(a["scores"]["slow"]) for _, a in results) == [1, 2, 3, 4]
    assert get(server.url + "/health", token="s3cret")["batches_scored"] == 2
    server.stop()
    assert "batch 2: 3 request(s), 6 images" in "".join(server.output)


def test_rewards_that_take_inputs_score_through_a_server_bit_for_bit_as_in_process(served):
    """An editing run's rewards on a server: the input images travel beside the images (float32: exact), the server
    says which rewards take them, and the scores equal the in-process ones bit for bit, for images and for videos
    scored frame by frame against their conditioning frame. With a tolerance of 1e-6, input_consistency keeps only
    the cells equal to the input's to 1e-6, so inputs that changed on the way would show."""
    from mixgrpo.rewards.base import build_reward, call_reward

    server = served("--reward", "input_consistency:grid=4,tolerance=0.000001", "--reward", "toy_rewards:brightness")
    health = get(server.url + "/health")
    assert [(r["label"], r["takes_inputs"]) for r in health["rewards"]] == [("input_consistency", True),
                                                                           ("brightness", False)]
    specs = {"input_consistency": ("input_consistency", {"grid": 4, "tolerance": 1e-6}, "mean"),
             "brightness": ("toy_rewards:brightness", {}, "mean")}
    scorer = ServerScorer([server.url, server.url], specs, timeout=30, token=None, encoding="float32")  # 2 shares
    reward = build_reward("input_consistency", {"grid": 4, "tolerance": 1e-6})
    gen = torch.Generator().manual_seed(3)
    inputs = torch.rand(4, 3, 8, 8, generator=gen)
    images = inputs.clone()
    images[:, :, :4] = torch.rand(4, 3, 4, 8, generator=gen)       # the top half edited, the bottom half kept
    videos = torch.stack([inputs, images, torch.rand(4, 3, 8, 8, generator=gen)], 1)  # [B, F, 3, H, W]
    for x in (images, videos):
        local = call_reward(reward, x, PROMPTS, inputs=inputs)
        scores, notes = scorer(x, PROMPTS, inputs=inputs)
        assert notes == {"input_consistency": None, "brightness": None}
        assert torch.equal(scores["input_consistency"], local)
        assert torch.equal(scores["brightness"], build_reward("toy_rewards:brightness")(x, PROMPTS))
        assert local.tolist() == [0.5] * 4  # the videos: frames that kept 1, 1/2 and 0 of the input
    assert call_reward(reward, images, PROMPTS, inputs=inputs + 1e-5).tolist() == [0.0] * 4  # it would show
    assert scorer(images, PROMPTS, only=["brightness"])[0]["brightness"].shape == (4,)  # no inputs needed for it
    with pytest.raises(ServerSetupError, match="'input_consistency' compares each image with its input image"):
        scorer(images, PROMPTS)  # a run without input images


@pytest.fixture
def slow_reward(tmp_path, monkeypatch):
    """tests_slow_reward:slow: brightness after 2 s (a reward that keeps the worker busy)."""
    (tmp_path / "tests_slow_reward.py").write_text(
        "import time\n\ndef slow(images, prompts):\n    time.sleep(2)\n    return images.mean(dim=(1, 2, 3))\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), str(TESTS), str(tmp_path)]))


# --------------------------------------------------------------------------------------------------
# training against servers


def test_a_run_scored_by_two_servers_and_in_process_equals_the_in_process_run(served, tmp_path):
    """Server A hosts brightness and brightness(0.5), server B brightness: brightness is scored by A and B as
    replicas, brightness(0.5) by A, brightness(0.25) in-process; the run ends bit for bit as the all-in-process one
    (weights and metrics), and its metrics say which server scored how many images."""
    a = served("--reward", "toy_rewards:brightness", "--reward", "toy_rewards:brightness:target=0.5")
    b = served("--reward", "toy_rewards:brightness")
    local = [{"name": "toy_rewards:brightness"}, {"name": "toy_rewards:brightness", "args": {"target": 0.5}},
             {"name": "toy_rewards:brightness", "args": {"target": 0.25}, "weight": 0.5}]
    remote = [{**local[0], "server": [a.url, b.url]}, {**local[1], "server": a.url}, local[2]]
    runs = {}
    for name, rewards in (("local", local), ("remote", remote)):
        cfg = build_config(gaussian_run(rewards=rewards, run={"iterations": 2, "out_dir": str(tmp_path / name)}, eval={"num_prompts": 2}))
        runs[name] = train(cfg, progress=False)
    _assert_same_run(runs["remote"], runs["local"])
    metrics = read_metrics(runs["remote"])
    # 8 images per iteration: brightness's split 4 + 4 over the replicas, brightness(0.5)'s 8 on A
    assert all(m["reward_servers"] == {a.url: 12, b.url: 4} for m in metrics)
    summary = (runs["remote"] / "summary.md").read_text()
    assert f"reward server {a.url} scored brightness, brightness_2: 24 training images" in summary
    assert f"reward server {b.url} scored brightness: 8 training images" in summary


def test_an_editing_run_scored_by_a_server_equals_the_in_process_run(served, tmp_path):
    """An editing run (the tiny editing model, examples with input images): input_consistency and a user reward that
    compares with the inputs, served, end bit for bit as in-process (weights and metrics): the input images reach
    the server exactly. The same served reward in a run without input images stops in the pre-flight."""
    pytest.importorskip("diffusers")
    from PIL import Image

    from mixgrpo.models.tiny import TinyConfig, build_tiny, save_tiny

    torch.manual_seed(0)
    save_tiny(build_tiny(TinyConfig(image_size=16, num_layers=1, num_single_layers=1, image_inputs=1)),
              tmp_path / "model")
    lines = []
    for i, (colour, prompt) in enumerate(zip([(255, 0, 0), (0, 200, 0)], ["make it blue", "add a circle"])):
        (tmp_path / "inputs").mkdir(exist_ok=True)
        Image.new("RGB", (16, 16), colour).save(tmp_path / "inputs" / f"{i}.png")
        lines.append(json.dumps({"prompt": prompt, "images": [f"inputs/{i}.png"]}))
    (tmp_path / "examples.jsonl").write_text("\n".join(lines) + "\n")
    server = served("--reward", "input_consistency:grid=4", "--reward", "toy_rewards:keep_input")
    local = [{"name": "input_consistency", "args": {"grid": 4}}, {"name": "toy_rewards:keep_input"}]
    runs = {}
    for name, rewards in (("local", local), ("remote", [{**r, "server": server.url} for r in local])):
        cfg = build_config(gaussian_run(
            model={"name": "tiny_edit", "args": {"path": str(tmp_path / "model")}},
            sampler={"num_steps": 4, "window": {"size": 1}}, rewards=rewards, optim={"lr": 1e-3},
            rollout={"prompts": str(tmp_path / "examples.jsonl"), "group_size": 2},
            eval={"prompts": str(tmp_path / "examples.jsonl"), "num_prompts": 2},
            run={"iterations": 2, "out_dir": str(tmp_path / name)}))
        runs[name] = train(cfg, progress=False)
    _assert_same_run(runs["remote"], runs["local"])
    assert all(m["reward_servers"] == {server.url: 4} for m in read_metrics(runs["remote"]))
    with pytest.raises(PreflightError, match=r"rewards\[0\] \(input_consistency\) compares each result with"):
        check_run(build_config(gaussian_run(rewards=[{**local[0], "server": server.url}])))


def test_preflight_names_an_unreachable_server_a_missing_reward_other_args_and_a_missing_token(served, monkeypatch):
    server = served("--reward", "toy_rewards:brightness:target=0.5", "--token-env", "TEST_REWARD_TOKEN",
                    TEST_REWARD_TOKEN="s3cret")
    dead = f"http://127.0.0.1:{free_port()}"
    rewards = [{"name": "toy_rewards:brightness", "args": {"target": 0.5}, "server": server.url},
               {"name": "toy_rewards:brightness", "args": {"target": 0.7}, "server": server.url},
               {"name": "verifier", "server": server.url},
               {"name": "verifier", "server": dead}]
    monkeypatch.setenv("RUN_TOKEN", "s3cret")
    with pytest.raises(PreflightError) as e:
        check_run(build_config(gaussian_run(rewards=rewards, scoring={"server_token_env": "RUN_TOKEN"})))
    lines = str(e.value).splitlines()
    assert len(lines) == 3, lines
    assert f"cannot reach reward server {dead}" in lines[0]
    assert "rewards[1]" in lines[1] and "other settings" in lines[1] and "'target': 0.5" in lines[1]
    assert "rewards[2]" in lines[2] and "does not host reward 'verifier'" in lines[2]

    with pytest.raises(PreflightError, match="HTTP 401"):
        check_run(build_config(gaussian_run(rewards=rewards[:1])))
    check_run(build_config(gaussian_run(rewards=rewards[:1], scoring={"server_token_env": "RUN_TOKEN"})))


@pytest.mark.slow
def test_a_server_killed_mid_run_stops_the_run_naming_it_and_resume_after_a_restart_ends_equal(served, tmp_path):
    """kill -9 of the reward server after iteration 2: the next scoring retries, then the run stops with one line
    naming the server, its checkpoint intact; --resume once the server is back ends equal to the run never
    interrupted."""
    from test_reliability import Child

    reference = train(build_config(gaussian_run(run={"iterations": 5, "checkpoint_every": 1, "out_dir": str(tmp_path / "reference")}, eval={"num_prompts": 2})), progress=False)
    server = served("--reward", "toy_rewards:brightness")
    (tmp_path / "faults.py").write_text("import sys\nfrom mixgrpo.cli import main\n\nsys.exit(main(sys.argv[1:]))\n")
    (tmp_path / "config.yaml").write_text(gaussian_run_yaml(
        rewards=[{"name": "toy_rewards:brightness", "server": server.url}], run={"iterations": 5, "checkpoint_every": 1}, eval={"num_prompts": 2}))
    run = tmp_path / "run"
    child = Child(tmp_path, ["--config", "config.yaml", "--out", str(run)])
    assert child.wait_for("it    2/5")
    server.kill9()
    assert child.finish() == 2
    errors = [line for line in child.output if line.startswith("error:")]
    assert len(errors) == 1 and server.url in errors[0] and "groups failed to get rewards" in errors[0], child.output
    assert any("warning: reward 'brightness' at " + server.url in line for line in child.output)
    checkpoint = latest_checkpoint(run)
    assert checkpoint is not None and int(checkpoint.name.split("_")[1]) >= 2

    served("--reward", "toy_rewards:brightness", port=server.port)
    child = Child(tmp_path, ["--config", "config.yaml", "--out", str(run), "--resume"])
    assert child.finish() == 0, "".join(child.output)
    _assert_same_run(run, reference)


# --------------------------------------------------------------------------------------------------
# servers that lie


@pytest.fixture
def liar():
    """A fake reward server hosting 'brightness' whose /score answer is the test's `answer(body) -> (status,
    payload bytes)`."""
    state = type("State", (), {"answer": None, "calls": 0})()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            self._send(200, json.dumps({"protocol": 1, "rewards": [{"label": "brightness", "name": "toy_rewards:"
                                        "brightness", "args": {}, "frames": "mean", "device": "cpu"}]}).encode())

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            state.calls += 1
            self._send(*state.answer(body))

        def _send(self, status, data):
            self.send_response(status)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
    state.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield state
    httpd.shutdown()
    httpd.server_close()


def _scorer(url: str) -> Retrying:
    return Retrying(ServerScorer([url], {"brightness": ("toy_rewards:brightness", {}, "mean")}, timeout=10,
                                 token=None, encoding="float32"), retries=2)


def _scores(values, errors=None):
    return 200, json.dumps({"scores": {"brightness": values},
                            "errors": {"brightness": errors or [None] * len(values)}}).encode()


@pytest.mark.parametrize("answer, retried, reason", [
    (lambda body: (200, b"<html>garbage</html>"), True, "other than JSON"),
    (lambda body: _scores([0.5] * 3), True, "has 3 scores for 4 images"),
    (lambda body: _scores(["x"] * 4), True, "other than numbers"),
    (lambda body: (500, b'{"error": "out of memory"}'), True, "HTTP 500"),
])
def test_a_lying_or_failing_server_is_retried_then_its_images_are_nan_never_zero(liar, answer, retried, reason,
                                                                                 capsys):
    liar.answer = answer
    scores, errors = _scorer(liar.url)(IMAGES, PROMPTS)
    assert torch.isnan(scores["brightness"]).all()
    assert liar.calls == 3 and reason in errors["brightness"] and liar.url in errors["brightness"]
    assert f"at {liar.url} failed after 3 attempts" in capsys.readouterr().out


def test_nan_scores_from_a_server_are_its_verdict_not_retried(liar):
    liar.answer = lambda body: _scores([0.5, None, 0.25, None], [None, "blurred", None, "blurred"])
    scores, errors = _scorer(liar.url)(IMAGES, PROMPTS)
    assert liar.calls == 1
    assert scores["brightness"][[0, 2]].tolist() == [0.5, 0.25] and torch.isnan(scores["brightness"][[1, 3]]).all()
    assert "2 of 4 images unscored; first: blurred" in errors["brightness"]


def test_a_refusing_server_stops_at_once(liar):
    liar.answer = lambda body: (401, b'{"error": "missing or wrong bearer token"}')
    with pytest.raises(ServerSetupError, match="HTTP 401.*bearer token"):
        _scorer(liar.url)(IMAGES, PROMPTS)
    assert liar.calls == 1


def test_a_run_whose_server_answers_garbage_stops_naming_it(liar, tmp_path):
    liar.answer = lambda body: (200, b"garbage")
    cfg = build_config(gaussian_run(rewards=[{"name": "toy_rewards:brightness", "server": liar.url}], run={"iterations": 2, "out_dir": str(tmp_path / "run")}, eval={"num_prompts": 0}))
    with pytest.raises(TrainingError, match=f"groups failed to get rewards at iteration 1.*{liar.url}"):
        train(cfg, progress=False)


def test_images_as_png_reach_the_server_quantised(liar):
    seen = []

    def answer(body):
        seen.append(decode_images(body["images"]))
        return _scores([0.0] * 4)

    liar.answer = answer
    Retrying(ServerScorer([liar.url], {"brightness": ("toy_rewards:brightness", {}, "mean")}, 10, None, "png"),
             0)(IMAGES, PROMPTS)
    assert torch.equal(seen[0], decode_images(encode_images(IMAGES, "uint8")))


def test_a_reward_whose_files_are_missing_stops_the_server_at_start(tmp_path):
    """The server runs each reward's own check (files, checkpoint keys) before it listens: one line, exit 2."""
    done = subprocess.run([sys.executable, "-m", "mixgrpo", "serve-rewards", "--port", str(free_port()), "--reward",
                           f"pickscore:path={tmp_path / 'missing'}"], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 2
    assert done.stderr.strip().startswith("error: reward pickscore: ") and "does not exist" in done.stderr


def test_mixgrpo_eval_scores_through_a_server_as_in_process(served, tmp_path):
    """`mixgrpo eval --reward NAME:server=URL`: the per-image scores equal the in-process ones."""
    from mixgrpo.cli import main

    server = served("--reward", "toy_rewards:brightness")
    common = ["eval", "base=base", "--model", "gaussian", "--prompt", "a", "--prompt", "b", "--num-images", "2",
              "--steps", "4"]
    assert main([*common, "--reward", "toy_rewards:brightness", "--out", str(tmp_path / "local")]) == 0
    assert main([*common, "--reward", f"toy_rewards:brightness:server={server.url}",
                 "--out", str(tmp_path / "remote")]) == 0
    read = lambda d: [json.loads(line) for line in (d / "scores.jsonl").read_text().splitlines()]  # noqa: E731
    assert read(tmp_path / "remote") == read(tmp_path / "local")
    assert "batch 1: 1 request(s), 4 images" in "".join(server.output)
