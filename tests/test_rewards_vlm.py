"""VLM judge against a local OpenAI-compatible server started by the test (http.server, 127.0.0.1, random port).

The server's answer to each request is decided by the test's `respond(prompt, n) -> (status, text, delay)`,
where n counts the requests received so far (1-based).
"""

from __future__ import annotations

import base64
import io
import json
import math
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from mixgrpo.rewards import REWARDS, RewardError
from mixgrpo.rewards.vlm import parse_score


@pytest.fixture
def server():
    state = SimpleNamespace(respond=lambda prompt, n: (200, "Final Score: 3", 0.0), requests=[],
                            lock=threading.Lock(), score_of_seed=None)

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with state.lock:
                state.requests.append(SimpleNamespace(path=self.path, headers=dict(self.headers), body=body))
                n = len(state.requests)
            text_parts = [p["text"] for p in body["messages"][0]["content"] if p["type"] == "text"]
            status, text, delay = state.respond("".join(text_parts), n)
            if state.score_of_seed is not None:  # a sampling judge: its verdict follows the request's seed
                text = f"Final Score: {state.score_of_seed(body.get('seed'))}"
            time.sleep(delay)
            payload = {"choices": [{"message": {"role": "assistant", "content": text}}]} if status == 200 \
                else {"error": {"message": text}}
            data = json.dumps(payload).encode()
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            except OSError:  # the client gave up (timeout test)
                pass

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
    state.base_url = f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    yield state
    httpd.shutdown()
    httpd.server_close()


def judge(server, **kwargs):
    return REWARDS.get("vlm")(base_url=server.base_url, model="judge-model", backoff=0.01, **kwargs)


IMAGES = torch.rand(3, 3, 16, 24, generator=torch.Generator().manual_seed(0))


def test_parse_score_takes_the_last_final_score_within_range():
    assert parse_score("Final Score: 4.5") == 4.5
    assert parse_score("**Final Score:** 3") == 3.0
    assert parse_score("format: 'Final Score: 1' ... my verdict. final score = 4") == 4.0
    assert parse_score("Final Score: 7") is None
    assert parse_score("looks great, 5/5") is None


def test_scores_follow_the_answers_and_requests_carry_image_prompt_model_and_key(server, monkeypatch):
    monkeypatch.setenv("TEST_JUDGE_KEY", "secret")
    server.respond = lambda prompt, n: (200, f"Looks fine.\nFinal Score: {prompt.count('x') + 1}.5", 0.0)
    prompts = ["a", "x", "xx"]
    scores = judge(server, api_key_env="TEST_JUDGE_KEY", template="Rate: {prompt}", concurrency=3)(IMAGES, prompts)
    assert scores.dtype == torch.float32 and scores.tolist() == [1.5, 2.5, 3.5]

    assert len(server.requests) == 3
    for request in server.requests:
        assert request.path == "/v1/chat/completions"
        assert request.headers["Authorization"] == "Bearer secret"
        assert request.body["model"] == "judge-model"
        image_part, text_part = request.body["messages"][0]["content"]
        i = prompts.index(text_part["text"].removeprefix("Rate: "))
        header, _, data = image_part["image_url"]["url"].partition(",")
        assert header == "data:image/png;base64"
        sent = np.array(Image.open(io.BytesIO(base64.b64decode(data))))
        expected = (IMAGES[i] * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        np.testing.assert_array_equal(sent, expected)


def test_an_unparseable_answer_is_retried_then_raises_with_the_answer(server):
    server.respond = lambda prompt, n: (200, "I quite like this picture.", 0.0)
    with pytest.raises(RewardError, match="3 of 3 judge calls failed.*I quite like this picture"):
        judge(server, retries=1)(IMAGES, ["p"] * 3)
    assert len(server.requests) == 3 * 2  # each image: 1 attempt + 1 retry


def test_nan_policy_marks_unscorable_images_but_raises_when_all_fail(server):
    server.respond = lambda prompt, n: (200, "Final Score: 4" if prompt == "good" else "Final Score: 9", 0.0)
    reward = judge(server, retries=0, on_failure="nan", template="{prompt}")
    scores = reward(IMAGES, ["good", "bad", "good"])
    assert scores[0] == 4.0 and math.isnan(scores[1]) and scores[2] == 4.0
    with pytest.raises(RewardError, match="no score in \\[1.0, 5.0\\]"):
        reward(IMAGES[:2], ["bad", "bad"])


def test_http_500_is_retried_until_success(server):
    server.respond = lambda prompt, n: (500, "overloaded", 0.0) if n <= 2 else (200, "Final Score: 5", 0.0)
    assert judge(server, retries=2)(IMAGES[:1], ["p"]).tolist() == [5.0]
    assert len(server.requests) == 3


def test_http_401_fails_at_once_with_the_servers_message(server):
    server.respond = lambda prompt, n: (401, "invalid api key", 0.0)
    with pytest.raises(RewardError, match="HTTP 401.*invalid api key"):
        judge(server, retries=3)(IMAGES[:1], ["p"])
    assert len(server.requests) == 1


def test_a_slow_server_times_out(server):
    server.respond = lambda prompt, n: (200, "Final Score: 5", 1.0)
    with pytest.raises(RewardError, match="timeout"):
        judge(server, timeout=0.2, retries=1)(IMAGES[:1], ["p"])
    assert len(server.requests) == 2


def test_an_unreachable_endpoint_says_so():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    reward = REWARDS.get("vlm")(base_url=f"http://127.0.0.1:{port}/v1", model="m", retries=1, backoff=0.01)
    with pytest.raises(RewardError, match=f"cannot reach http://127.0.0.1:{port}/v1/chat/completions.*base_url"):
        reward(IMAGES[:1], ["p"])


def test_a_missing_api_key_variable_is_a_config_error(monkeypatch):
    monkeypatch.delenv("TEST_JUDGE_KEY", raising=False)
    with pytest.raises(ValueError, match="TEST_JUDGE_KEY"):
        REWARDS.get("vlm")(base_url="http://127.0.0.1:1/v1", model="m", api_key_env="TEST_JUDGE_KEY")


def test_each_image_is_asked_with_its_seed_and_without_seeds_none_is_sent(server):
    server.respond = lambda prompt, n: (200, "Final Score: 2", 0.0)
    from mixgrpo.rewards.base import build_reward, call_reward

    reward = build_reward("vlm", {"base_url": server.base_url, "model": "judge-model", "concurrency": 3,
                                  "template": "{prompt}"})
    call_reward(reward, IMAGES, ["a", "b", "c"], seeds=[7, 2**40 + 5, 9])
    sent = {r.body["messages"][0]["content"][1]["text"]: r.body["seed"] for r in server.requests}
    assert sent == {"a": 7, "b": (2**40 + 5) % 2**31, "c": 9}
    server.requests.clear()
    call_reward(reward, IMAGES, ["a", "b", "c"])
    assert all("seed" not in r.body for r in server.requests)


def _sent_image(part) -> np.ndarray:
    header, _, data = part["image_url"]["url"].partition(",")
    assert header == "data:image/png;base64"
    return np.array(Image.open(io.BytesIO(base64.b64decode(data))))


def _as_png(image: torch.Tensor) -> np.ndarray:
    return (image * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()


def test_the_edit_template_shows_the_input_then_the_result_in_one_request(server):
    """`template: edit`: each request holds the sample's input image and its result, in that order, labelled in the
    text, with the instruction; the judge takes inputs and the plain judge does not."""
    from mixgrpo.rewards.base import build_reward, call_reward
    from mixgrpo.rewards.vlm import EDIT_TEMPLATE

    server.respond = lambda prompt, n: (200, "The cube is red now; nothing else moved.\nFinal Score: 4", 0.0)
    inputs = torch.rand(3, 3, 16, 24, generator=torch.Generator().manual_seed(1))
    reward = build_reward("vlm", {"base_url": server.base_url, "model": "judge-model", "template": "edit"})
    assert reward.takes_inputs and not build_reward("vlm", {"base_url": "http://h/v1", "model": "m"}).takes_inputs
    prompts = ["make the cube red", "remove the ball", "add a hat"]
    assert call_reward(reward, IMAGES, prompts, inputs=inputs).tolist() == [4.0] * 3
    assert len(server.requests) == 3
    for request in server.requests:
        parts = request.body["messages"][0]["content"]
        assert [p["type"] for p in parts] == ["text", "image_url", "text", "image_url", "text"]
        assert parts[0]["text"].endswith("Input image:\n") and parts[2]["text"] == "\nEdited image:\n"
        i = next(k for k, p in enumerate(prompts) if f"Instruction: {p}\n" in parts[4]["text"])
        np.testing.assert_array_equal(_sent_image(parts[1]), _as_png(inputs[i]))
        np.testing.assert_array_equal(_sent_image(parts[3]), _as_png(IMAGES[i]))
        assert "".join(p.get("text", "") for p in parts) == EDIT_TEMPLATE.replace("{prompt}", prompts[i]).replace(
            "{input_image}", "").replace("{image}", "")


def test_an_edit_judge_scores_video_frames_against_the_conditioning_frame(server):
    """I2V: a per-frame judge sees the conditioning frame beside every frame of the video."""
    from mixgrpo.rewards.base import build_reward

    server.respond = lambda prompt, n: (200, "Final Score: 2", 0.0)
    videos = torch.rand(2, 3, 3, 16, 24, generator=torch.Generator().manual_seed(2))  # [B, F, 3, H, W]
    frames0 = videos[:, 0]
    reward = build_reward("vlm", {"base_url": server.base_url, "model": "judge-model", "template": "edit"})
    assert reward(videos, ["walk", "run"], inputs=frames0).tolist() == [2.0, 2.0]
    assert len(server.requests) == 6
    for request in server.requests:
        parts = request.body["messages"][0]["content"]
        b = 0 if "Instruction: walk" in parts[4]["text"] else 1
        np.testing.assert_array_equal(_sent_image(parts[1]), _as_png(frames0[b]))
        assert any(np.array_equal(_sent_image(parts[3]), _as_png(frame)) for frame in videos[b])


def test_an_edit_template_without_an_input_or_the_image_is_refused():
    from mixgrpo.errors import ConfigError

    with pytest.raises(ConfigError, match="this run gives none"):
        REWARDS.get("vlm")(base_url="http://127.0.0.1:1/v1", model="m", template="edit")(IMAGES[:1], ["p"])
    with pytest.raises(ConfigError, match="add \\{image\\}"):
        REWARDS.get("vlm")(base_url="http://h/v1", model="m", template="{input_image} {prompt}")
    with pytest.raises(ConfigError, match="built-in template"):
        REWARDS.get("vlm")(base_url="http://h/v1", model="m", template="edits")
    # a template may place the judged image itself, with no input
    judge_ = REWARDS.get("vlm")(base_url="http://h/v1", model="m", template="Prompt: {prompt}\n{image}\nRate it.")
    assert not judge_.takes_inputs
    assert [p["type"] for p in judge_.content("data:x", "a cat")] == ["text", "image_url", "text"]


def test_a_run_asks_the_judge_the_same_questions_with_the_same_seeds_overlapped_or_not(server, tmp_path):
    """The judge's answer depends on the request's seed (as a sampling judge's would): a run scored in the background
    while the rollout goes on, and the same run scored after it, send the same seeds and end bit for bit equal; the
    seeds are those of (seed, iteration, image index)."""
    from safetensors.torch import load_file

    from gaussian_run import gaussian_run
    from mixgrpo.config import build_config
    from mixgrpo.rundir import read_metrics
    from mixgrpo.seeding import reward_seeds
    from mixgrpo.train import train

    server.score_of_seed = lambda seed: 1 + seed % 5
    runs, sent = {}, {}
    for overlap in (True, False):
        server.requests.clear()
        vlm = {"name": "vlm", "args": {"base_url": server.base_url, "model": "judge", "concurrency": 4}}
        cfg = build_config(gaussian_run(rewards=[vlm], run={"iterations": 2, "out_dir": str(tmp_path / f"overlap_{overlap}")}, eval={"num_prompts": 0}, rollout={"chunks": 2, "reward_overlap": overlap}))
        runs[overlap] = train(cfg, progress=False)
        sent[overlap] = sorted(r.body["seed"] for r in server.requests)
    assert sent[True] == sent[False]
    want = sorted(s % 2**31 for it in range(2) for s in reward_seeds(0, it, 0, 8))
    assert sent[True] == want
    drop = lambda m: {k: v for k, v in m.items() if not k.startswith(("time/", "memory/"))}  # noqa: E731
    assert [drop(m) for m in read_metrics(runs[True])] == [drop(m) for m in read_metrics(runs[False])]
    assert torch.equal(load_file(runs[True] / "final" / "model.safetensors")["mu"],
                       load_file(runs[False] / "final" / "model.safetensors")["mu"])
