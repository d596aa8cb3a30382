"""`mixgrpo sample`, `eval` and a run's held-out evaluation sample a real model on its pipeline's own default grid
(`mixgrpo.pipeline_grid`): an untouched base, sampled as `mixgrpo sample` samples it, equals the stock
pipeline called with its defaults (its scheduler, number of steps, resolution-dependent shift) on the same noise,
for every model family on its tiny stand-in (the official layout and scheduler configs; float32, CPU). Wan's real
UniPC scheduler is not in the engine: its nearest, DPM-Solver++(2M) on the same sigmas, is used and measured."""

import numpy as np
import pytest
import torch
from PIL import Image

import tiny_pipelines
from mixgrpo.evaluate import generate
from mixgrpo.models import MODELS
from mixgrpo.models.flux import pack
from mixgrpo.pipeline_grid import grid_of
from mixgrpo.seeding import image_seeds

PROMPTS = ["a red cube on a table", "two blue spheres"]
# name -> (stand-in, pixels, max_sequence_length, the stock call's guidance: our --guidance, extra model.args)
FAMILIES = {"flux": (tiny_pipelines.save_tiny_flux, 32, 24, 1.0, {}),  # distilled guidance 3.5: a model arg
            "sd3": (tiny_pipelines.save_tiny_sd3, 32, 24, 7.0, {}),  # the pipeline's default CFG 7
            "qwen_image": (tiny_pipelines.save_tiny_qwen_image, 64, 200, 1.0, {}),  # no negative prompt: no CFG
            "flux2": (tiny_pipelines.save_tiny_flux2, 32, 160, 4.0, {}),  # klein: true CFG 4 (its default)
            "wan": (tiny_pipelines.save_tiny_wan, 64, 24, 5.0, {"num_frames": 5})}  # CFG 5 (its default)
STEPS = {"flux": 28, "sd3": 28, "qwen_image": 50, "flux2": 50, "wan": 50}  # the pipelines' default num_inference_steps


def _stock(path, name, size, msl, guidance, noise, **extra):
    """The stock pipeline at its defaults (no sigmas, no num_inference_steps), from `noise`: [N, (F,) 3, H, W];
    msl None: its default max_sequence_length too."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(path, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    kw = {"latents": pack(noise, 2) if name in ("flux", "qwen_image") else noise, "height": size, "width": size,
          "output_type": "pt", **({} if msl is None else {"max_sequence_length": msl}), **extra}
    if name in ("sd3", "flux2", "wan"):
        kw["guidance_scale"] = guidance
    with torch.no_grad():
        out = pipe(prompt=PROMPTS, **kw)
    return torch.as_tensor(out.frames if name == "wan" else out.images)


@pytest.mark.filterwarnings("ignore:prompt .* was truncated")
@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_an_untouched_base_on_its_pipeline_grid_is_the_stock_pipelines_default_output(name, tmp_path):
    save, size, msl, guidance, extra = FAMILIES[name]
    path = save(tmp_path / "pipe")
    model = MODELS.get(name)(path=str(path), dtype="float32", height=size, width=size, max_sequence_length=msl,
                             **extra)
    grid = grid_of(name, {"path": str(path), "height": size, "width": size})
    assert grid.exact and grid.num_steps == STEPS[name]
    ours = generate(model, PROMPTS, grid.plan(), 1, 0, guidance)[:, 0]  # what `mixgrpo sample` runs
    seeds = image_seeds(0, [(i, 0) for i in range(len(PROMPTS))])
    noise = torch.cat([torch.randn((1, *model.latent_shape), generator=torch.Generator().manual_seed(s))
                       for s in seeds])
    stock = _stock(path, name, size, msl, guidance, noise, **extra).reshape(ours.shape)
    torch.testing.assert_close(ours, stock, rtol=1e-5, atol=1e-5)
    # and not vacuously: the engine's static shift-3 grid at the same step count draws something else
    from mixgrpo.plan import ode_plan

    static = generate(model, PROMPTS, ode_plan(grid.num_steps, 3.0), 1, 0, guidance)[:, 0]
    assert (static - stock).abs().max() > 1e-3 or name in ("sd3", "wan")  # SD3.5 / Wan: static shift 3 too


def test_mixgrpo_sample_of_a_base_directory_uses_its_pipeline_grid(tmp_path, capsys):
    """Through the CLI: `mixgrpo sample --model flux --path DIR` writes the stock FluxPipeline's default images
    (8-bit PNGs, within rounding), and says which grid it used; --shift asks for the static grid instead."""
    from mixgrpo import cli

    save, size, _, guidance, _ = FAMILIES["flux"]
    path = save(tmp_path / "pipe")
    common = ["sample", "--model", "flux", "--path", str(path), "--resolution", str(size), "--dtype", "float32",
              "--device", "cpu", *sum((["--prompt", p] for p in PROMPTS), [])]
    assert cli.main([*common, "--out", str(tmp_path / "s")]) == 0
    assert "FluxPipeline's default grid: 28 steps, resolution-dependent shift" in capsys.readouterr().out
    ours = np.stack([np.asarray(Image.open(tmp_path / "s" / f"{i:04d}_00.png").convert("RGB"), dtype=int)
                     for i in range(len(PROMPTS))])
    model = MODELS.get("flux")(path=str(path), dtype="float32", height=size, width=size)
    seeds = image_seeds(0, [(i, 0) for i in range(len(PROMPTS))])
    noise = torch.cat([torch.randn((1, *model.latent_shape), generator=torch.Generator().manual_seed(s))
                       for s in seeds])
    stock = (_stock(path, "flux", size, None, guidance, noise).clamp(0, 1) * 255).round().permute(0, 2, 3, 1)
    assert np.abs(ours - stock.numpy().astype(int)).max() <= 1
    assert cli.main([*common, "--shift", "3", "--steps", "2", "--out", str(tmp_path / "static")]) == 0
    static = np.asarray(Image.open(tmp_path / "static" / "0000_00.png").convert("RGB"), dtype=int)
    assert np.abs(static - ours[0]).max() > 1


def test_wans_unipc_is_replaced_by_its_nearest_solver_and_said_so(tmp_path):
    """The real Wan 2.1 scheduler (UniPC, flow sigmas, flow_shift 3): the same sigmas, DPM-Solver++(2M) steps,
    `exact` false and named; the result is close to the stock UniPC's, not equal (the measured gap is printed)."""
    from diffusers import UniPCMultistepScheduler

    path = tiny_pipelines.save_tiny_wan(tmp_path / "pipe")
    UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0,
                            num_train_timesteps=1000).save_pretrained(path / "scheduler")
    index = path / "model_index.json"
    index.write_text(index.read_text().replace("FlowMatchEulerDiscreteScheduler", "UniPCMultistepScheduler"))
    grid = grid_of("wan", {"path": str(path), "height": 64, "width": 64})
    assert not grid.exact and {s.kind for s in grid.plan().steps} == {"dpm"} and grid.num_steps == 50
    assert "DPM-Solver++(2M)" in grid.describe() and "UniPCMultistepScheduler" in grid.describe()
    _, size, msl, guidance, extra = FAMILIES["wan"]
    model = MODELS.get("wan")(path=str(path), dtype="float32", height=size, width=size, max_sequence_length=msl,
                              **extra)
    ours = generate(model, PROMPTS, grid.plan(), 1, 0, guidance)[:, 0]
    seeds = image_seeds(0, [(i, 0) for i in range(len(PROMPTS))])
    noise = torch.cat([torch.randn((1, *model.latent_shape), generator=torch.Generator().manual_seed(s))
                       for s in seeds])
    stock = _stock(path, "wan", size, msl, guidance, noise, **extra).reshape(ours.shape)
    gap = (ours - stock).abs().max().item()
    print(f"Wan, UniPC (stock) vs DPM-Solver++(2M) (ours), 50 steps: max |pixel difference| {gap:.2e}")
    assert gap < 0.05
