"""Pre-flight: what a run needs is checked before any model loads, one line per problem naming the fix."""

import pytest
import torch

from mixgrpo.config import build_config
from mixgrpo.preflight import PreflightError, check_run, problems_of


def _cfg(**over):
    data = {"model": {"name": "gaussian", "args": {"size": 4}}, "rewards": [{"name": "jpeg_compressibility"}],
            "eval_num_prompts": 2, **over}
    return build_config(data)


def test_a_clean_config_has_no_problems():
    assert problems_of(_cfg()) == []
    assert problems_of(build_config({})) == []  # the main job: the tiny model, the world's prompts, the verifier


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a CPU-only torch")
def test_cuda_on_a_cpu_only_torch_names_the_fix():
    problems = problems_of(_cfg(model={"name": "gaussian", "args": {"size": 4, "device": "cuda"}},
                                rewards=[{"name": "hps", "args": {"path": "x", "tokenizer": "y", "device": "cuda:0"}}]))
    assert any("model.args.device = 'cuda'" in p and "model.args.device=cpu" in p for p in problems)
    assert any("rewards[0].args.device = 'cuda:0'" in p for p in problems)


def test_every_problem_is_reported_at_once_one_line_each(tmp_path):
    cfg = _cfg(rewards=[{"name": "jpeg"}, {"name": "hps", "args": {"path": str(tmp_path / "no.pt"),
                                                                    "tokenizer": str(tmp_path)}}],
               model={"name": "gaussian", "args": {"size": 4, "colour": "red"}},
               eval_prompts=str(tmp_path / "missing.txt"))
    with pytest.raises(PreflightError) as e:
        check_run(cfg)
    lines = str(e.value).splitlines()
    assert len(lines) == 4
    assert "did you mean 'jpeg_compressibility'" in lines[0].lower()  # the registry's name, as the docs now use
    assert "no.pt" in lines[1] and "does not exist" in lines[1]
    assert lines[2].startswith("eval_prompts:") and "does not exist" in lines[2]
    assert "model.args do not fit model 'gaussian'" in lines[3] and "colour" in lines[3]


def test_tiny_prompts_longer_than_its_text_encoder_are_refused(tmp_path):
    long = "a red circle left of a blue square above a green triangle below two yellow squares"
    (tmp_path / "p.txt").write_text(f"a red circle\n{long}\n")
    problems = problems_of(build_config({"train_prompts": str(tmp_path / "p.txt"), "eval_num_prompts": 0}))
    assert len(problems) == 1 and "1 of the 2 train prompts" in problems[0] and "16 text tokens" in problems[0]


def test_the_cli_prints_each_problem_as_an_error_line(tmp_path, capsys):
    from mixgrpo import cli

    code = cli.main(["train", "--out", str(tmp_path / "run"), "--quiet", "rewards=[{name: jpeg}, {name: verifer}]"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 2 and all(line.startswith("error: rewards[") for line in err)
    assert not (tmp_path / "run").exists()
