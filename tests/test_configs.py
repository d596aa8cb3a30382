"""Every shipped recipe loads, and the embedded-default recipes differ only where their algorithm does."""

from pathlib import Path

import pytest

from mixgrpo.config import ConfigError, load_config, to_dict, without_keys
from mixgrpo.plan import ALGORITHMS, build_plan
from mixgrpo.prompt_sets import manifest

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_recipe_loads(path):
    cfg = load_config(path)
    assert cfg.algorithm in ALGORITHMS
    build_plan(cfg.sampler, iteration=0, seed=cfg.run.seed)


GRPO_RECIPES = ["mixgrpo", "mixgrpo_flash", "mixgrpo_flash_star", "flow_grpo", "dance_grpo"]
FORWARD_RECIPES = ["diffusion_nft", "awm"]
# what a forward-process objective changes besides the algorithm: the objective and its settings, the
# rollout's noise (an ODE rollout needs per-image noise) and the update layout (passes over all samples)
FORWARD_KEYS = ("objective", "matching", "rollout.shared_noise", "update.steps_per_epoch", "update.epochs",
                "loss.clip_range")


def test_embedded_recipes_share_everything_but_the_algorithm():
    """A side-by-side comparison is only fair if model, rewards, batch and optimizer are the same."""
    root = CONFIGS[0].parent
    ignore = ("algorithm", "sampler", "run.out_dir")
    reference = to_dict(load_config(root / "mixgrpo.yaml"))
    assert {p.stem for p in CONFIGS} >= set(GRPO_RECIPES + FORWARD_RECIPES)
    for name in GRPO_RECIPES + FORWARD_RECIPES:
        skip = ignore + (FORWARD_KEYS if name in FORWARD_RECIPES else ())
        other = to_dict(load_config(root / f"{name}.yaml"))
        assert without_keys(other, skip) == without_keys(reference, skip), name


def test_exponent_without_a_dot_is_a_number():
    """PyYAML (YAML 1.1) reads `1e-4` as a string; a float field takes it as the number users mean."""
    cfg = load_config(CONFIGS[0], ["optim.lr=1e-4", "loss.clip_range=2E-3", "loss.kl_beta=+5e-2"])
    assert (cfg.optim.lr, cfg.loss.clip_range, cfg.loss.kl_beta) == (1e-4, 2e-3, 5e-2)
    with pytest.raises(ConfigError, match="optim.lr must be a number, got 'fast'"):
        load_config(CONFIGS[0], ["optim.lr=fast"])
    with pytest.raises(ConfigError, match="run.iterations must be an integer, got '1e3'"):
        load_config(CONFIGS[0], ["run.iterations=1e3"])


def test_cli_takes_overrides_on_both_sides_of_options(monkeypatch, tmp_path):
    """`train --config C a=1 --out D b=2`: argparse alone would reject b=2 as an unrecognized argument."""
    import mixgrpo.train
    from mixgrpo import cli

    seen = []
    monkeypatch.setattr(mixgrpo.train, "train", lambda cfg, **kw: seen.append(cfg))
    assert cli.main(["train", "--config", str(CONFIGS[0]), "run.iterations=3", "--out", str(tmp_path), "optim.lr=1e-4"]) == 0
    assert (seen[0].run.iterations, seen[0].optim.lr, seen[0].run.out_dir) == (3, 1e-4, str(tmp_path))
    with pytest.raises(SystemExit):  # a stray option is still an error
        cli.main(["train", "--config", str(CONFIGS[0]), "--out", str(tmp_path), "--bogus"])


def test_config_reference_is_current():
    """docs/config.md is generated from the dataclasses and registries: a field added, removed, re-defaulted or
    re-commented without regenerating it fails here."""
    from mixgrpo.configdoc import field_comments, render

    docs = CONFIGS[0].parent.parent / "docs" / "config.md"
    assert docs.read_text(encoding="utf-8") == render(), "regenerate it: mixgrpo config-doc --out docs/config.md"
    from mixgrpo.config import OptimConfig, RunConfig

    # a comment continued on the next lines is read whole
    assert field_comments(RunConfig)["time_limit_minutes"].endswith("0 = no limit")
    assert field_comments(OptimConfig)["lr"] == "AdamW learning rate"


def test_removed_image_size_is_dropped_from_old_runs_and_refused_otherwise():
    """Older versions wrote `image_size: 0` into every run's config.yaml: such runs still load; a real value (which
    never did anything) is refused with the keys that set the resolution."""
    cfg = load_config(CONFIGS[0], ["image_size=0"])
    assert not hasattr(cfg, "image_size")
    with pytest.raises(ConfigError, match="image_size.*removed.*model.args.height and width"):
        load_config(CONFIGS[0], ["image_size=512"])


def test_old_flat_keys_are_refused_with_their_new_place_and_migrated_from_a_saved_run(tmp_path):
    """A recipe or override with a key from before the sections is one line naming the new key; a run directory's
    saved config.yaml of that layout loads as it was (`saved=True`), with today's overrides on top."""
    import yaml

    from mixgrpo.config import MOVED_KEYS, migrate

    with pytest.raises(ConfigError, match=r"^config key 'lr' moved to 'optim.lr': write it as optim.lr"):
        load_config(CONFIGS[0], ["lr=1e-3"])
    (tmp_path / "old.yaml").write_text("clip_range: 0.2\n")
    with pytest.raises(ConfigError, match="'clip_range' moved to 'loss.clip_range'"):
        load_config(tmp_path / "old.yaml")
    with pytest.raises(ConfigError, match="section 'reward_policy' moved: .*reward_policy.retries -> scoring.retries"):
        load_config(CONFIGS[0], ["reward_policy.retries=1"])
    new = to_dict(load_config(CONFIGS[0], ["optim.lr=1e-3"]))
    sections = {key.split(".")[0] for key in MOVED_KEYS.values()}
    old = {k: v for k, v in new.items() if k not in sections}
    for was, key in MOVED_KEYS.items():  # the same config as an older mixgrpo wrote it
        section, leaf = key.split(".")
        old_section, _, old_leaf = was.rpartition(".")
        (old.setdefault(old_section, {}) if old_section else old)[old_leaf] = new[section][leaf]
    assert old["lr"] == 1e-3 and "optim" not in old and migrate(old) == new
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(old), encoding="utf-8")
    assert load_config(tmp_path / "config.yaml", ["run.iterations=5"], saved=True) == load_config(
        CONFIGS[0], ["optim.lr=1e-3", "run.iterations=5"])


def test_a_recipe_starts_from_its_base(tmp_path):
    """`base:` merges the base recipe (a shipped name or a path beside the file) under the recipe's own keys,
    section by section; a recipe that changes the algorithm keeps its preset's sampler; cycles and unknown bases
    are one-line errors."""
    (tmp_path / "a.yaml").write_text("base: mixgrpo\noptim: {lr: 0.5}\nrun: {out_dir: runs/a}\n")
    a = load_config(tmp_path / "a.yaml")
    assert a == load_config(CONFIGS[0].parent / "mixgrpo.yaml", ["optim.lr=0.5", "run.out_dir=runs/a"])
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.yaml").write_text("base: ../a.yaml\nalgorithm: flow_grpo\n")
    b = load_config(tmp_path / "sub" / "b.yaml")
    assert (b.optim.lr, b.run.out_dir, b.rollout.group_size) == (0.5, "runs/a", 8)
    assert b.sampler == load_config(None, ["algorithm=flow_grpo"]).sampler  # not mixgrpo.yaml's window
    (tmp_path / "c.yaml").write_text("base: d.yaml\n")
    (tmp_path / "d.yaml").write_text("base: c.yaml\n")
    with pytest.raises(ConfigError, match=r"bases make a cycle \(c.yaml -> d.yaml -> c.yaml\)"):
        load_config(tmp_path / "c.yaml")
    (tmp_path / "e.yaml").write_text("base: mixgrp\n")
    with pytest.raises(ConfigError, match="base 'mixgrp' is not a shipped recipe: did you mean 'mixgrpo'"):
        load_config(tmp_path / "e.yaml")
    (tmp_path / "f.yaml").write_text("base: nowhere/g.yaml\n")
    with pytest.raises(ConfigError, match="base 'nowhere/g.yaml' does not exist"):
        load_config(tmp_path / "f.yaml")


def test_field_facts_give_the_resumable_and_reference_lists():
    """Which settings a resume may change and which a reference comparison ignores are facts on the fields."""
    import dataclasses

    from mixgrpo.config import REFERENCE_IGNORED, RESUMABLE_CHANGES, TrainConfig

    assert {"run.iterations", "run.out_dir", "parallel", "scoring.retries"} <= set(RESUMABLE_CHANGES)
    assert not {"optim.lr", "run.seed", "rollout.prompts_per_iteration"} & set(RESUMABLE_CHANGES)
    assert set(RESUMABLE_CHANGES) <= set(REFERENCE_IGNORED) and "run.seed" in REFERENCE_IGNORED
    assert len(dataclasses.fields(TrainConfig)) <= 20


def test_help_lists_only_commands_that_exist(capsys):
    from mixgrpo import cli

    with pytest.raises(SystemExit):
        cli.main(["--help"])
    text = capsys.readouterr().out
    assert "bench" not in text
    for command in ("train", "sample", "eval", "export", "preprocess", "pretrain", "config-doc"):
        assert command in text


def test_a_recipe_is_found_by_name_and_a_wrong_name_is_named(monkeypatch, tmp_path):
    from mixgrpo.config import recipe_path

    monkeypatch.chdir(tmp_path)  # not the checkout: the name alone finds the recipe
    assert load_config(recipe_path("flow_grpo")) == load_config(CONFIGS[0].parent / "flow_grpo.yaml")
    assert recipe_path("my/own.yaml") == Path("my/own.yaml")  # a path stays a path (read_yaml names it if missing)
    with pytest.raises(ConfigError, match=r"'mixgrp' is neither a file nor a shipped recipe: did you mean 'mixgrpo'"):
        recipe_path("mixgrp")
    import mixgrpo.train
    from mixgrpo import cli

    seen = []
    monkeypatch.setattr(mixgrpo.train, "train", lambda cfg, **kw: seen.append(cfg))
    assert cli.main(["train", "--config", "mixgrpo_flash", "--out", str(tmp_path / "run")]) == 0
    assert seen == [load_config(CONFIGS[0].parent / "mixgrpo_flash.yaml", [f"run.out_dir={tmp_path / 'run'}"])]


def test_an_installed_package_ships_every_package_and_the_recipes(tmp_path):
    """A wheel built from the checkout, installed outside it: every recipe of configs/ resolves by name (no
    configs/ directory around), and the explicit package list of pyproject.toml misses no package."""
    import shutil
    import subprocess
    import sys
    import zipfile

    root, src = CONFIGS[0].parent.parent, tmp_path / "src"  # a copy: the build leaves nothing in the checkout
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(root / name, src / name)
    for name in ("configs", "mixgrpo"):
        shutil.copytree(root / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path / "dist"), str(src)], check=True, capture_output=True)
    wheel = next((tmp_path / "dist").glob("mixgrpo-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    packages = {str(p.parent.relative_to(root)) for p in (root / "mixgrpo").rglob("__init__.py")}
    assert {p for p in packages if f"{p}/__init__.py" not in names} == set()
    assert {f"mixgrpo/configs/{c.name}" for c in CONFIGS} <= set(names)
    shipped = [e["file"] for s in manifest().values() for e in s["splits"].values() if e["shipped"]]
    assert {f"mixgrpo/assets/prompts/{f}" for f in [*shipped, "manifest.json", "LICENSE.flow_grpo"]} <= set(names)
    assert {"mixgrpo/world/edit_examples/train.jsonl", "mixgrpo/world/edit_examples/heldout/0000.png"} <= set(names)
    zipfile.ZipFile(wheel).extractall(tmp_path / "site")
    code = "from mixgrpo.config import recipes; print(sorted(str(p) for p in recipes().values()))"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(tmp_path / "site"), "PATH": ""}).stdout
    assert out.strip() == str(sorted(str(tmp_path / "site" / "mixgrpo" / "configs" / c.name) for c in CONFIGS))


PIPELINE_RECIPES = [p for p in CONFIGS if load_config(p).model.name not in ("tiny", "tiny_edit", "gaussian")]
# what the pre-flight may still find in a shipped recipe of a real model: its placeholder paths, GPUs, and prompt
# sets that are fetched, not shipped (`mixgrpo prompts fetch`)
PLACEHOLDER = ("does not exist", "is not a local diffusers pipeline directory", "has no CUDA device",
               "is not on PATH",  # tesseract, for the OCR recipe on a machine without it
               "not fetched yet")


@pytest.mark.parametrize("path", PIPELINE_RECIPES, ids=lambda p: p.name)
def test_a_real_model_recipe_fits_its_model_and_rewards(path):
    """The pre-flight of a recipe for a real model finds nothing but the files to fill in: model and reward names
    registered, their arguments those of the factories (a misspelt key fails here, not after the model load);
    its LoRA adapts the layers its adapter names; its header says where its numbers come from."""
    import importlib

    from mixgrpo.preflight import problems_of

    cfg = load_config(path)
    problems = problems_of(cfg)
    assert problems and all(any(p in line for p in PLACEHOLDER) for line in problems), problems
    module = importlib.import_module(f"mixgrpo.models.{cfg.model.name}")
    if cfg.lora.rank and hasattr(module, "LORA_TARGETS"):
        assert tuple(cfg.lora.target_modules) == module.LORA_TARGETS
    assert "arXiv" in path.read_text().split("\nalgorithm:")[0]  # the sources, in the header comment


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_a_recipe_names_the_extra_that_holds_everything_it_needs(path):
    """Every package the recipe's pre-flight asks for (model, LoRA, rewards, tensorboard) is in the extra its
    install line names, so that one install line is enough; a program it runs (tesseract) is named with its apt
    command."""
    import re
    import tomllib

    from mixgrpo.packages import distribution
    from mixgrpo.preflight import package_needs

    install = [line for line in path.read_text().splitlines() if line.startswith("#") and "pip install" in line]
    assert len(install) == 1, "one install line per recipe"
    named = re.search(r"pip install -e '\.\[([a-z,]+)\]'", install[0]).group(1).split(",")
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    provided = {re.split(r"[<>=!~\[;]", spec, maxsplit=1)[0].strip().lower() for e in named for spec in extras[e]}
    cfg = load_config(path)
    needed = {distribution(module).lower() for module, _ in package_needs(cfg)}
    assert needed and needed <= provided, f"{path.name} needs {sorted(needed - provided)} beyond {named}"
    if any(r.name == "ocr" for r in cfg.rewards):
        assert "apt-get install -y tesseract-ocr" in install[0]


def test_the_video_recipe_scores_frames_and_time():
    """The Wan recipe: a valid frame count, an image reward aggregated over frames and the temporal reward."""
    from mixgrpo.rewards import build_reward

    cfg = load_config(CONFIGS[0].parent / "wan21_mixgrpo.yaml")
    assert cfg.model.name == "wan" and (cfg.model.args["num_frames"] - 1) % 4 == 0
    rewards = {r.name: r for r in cfg.rewards}
    assert rewards["pickscore"].frames == "mean" and rewards["temporal_consistency"].weight > 0
    assert getattr(build_reward("temporal_consistency", rewards["temporal_consistency"].args), "scores_videos", False)


def test_the_readme_commands_parse():
    """Every `mixgrpo train / sample / eval / export` line of the README's code blocks is accepted by the CLI's
    parser as written (continuation lines joined, the quick start's "$@" expanded): no renamed or missing flag; under
    `mixgrpo launch`, its torchrun options by torchrun's parser."""
    import re
    import shlex

    from torch.distributed.run import parse_args

    from mixgrpo.cli import build_parser, command_names
    from mixgrpo.launch import split

    readme = (CONFIGS[0].parent.parent / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```bash\n(.*?)```", readme, flags=re.S)
    lines = [line for block in blocks for line in block.replace("\\\n", " ").splitlines()]
    quick = next(shlex.split(line, comments=True)[1:] for line in lines if line.startswith("set -- "))
    checked = 0
    for line in lines:
        words = shlex.split(line.replace('"$@"', shlex.join(quick)), comments=True)
        argv = words[words.index("mixgrpo") + 1:] if "mixgrpo" in words and "..." not in line else []
        if argv[:1] == ["launch"]:
            options, argv = split(argv[1:], [c for c in command_names() if c != "launch"])
            parse_args([*options, "-m", "mixgrpo"])
        if argv[:1] and argv[0] in ("train", "sample", "eval", "export"):
            _, extra = build_parser().parse_known_args(argv)
            assert all("=" in e and not e.startswith("-") for e in extra), (line, extra)
            checked += 1
    assert checked >= 10
