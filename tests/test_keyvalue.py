"""The command line's one `key=value` grammar (`mixgrpo.keyvalue`): the same values and the same refusal wherever a
command takes `key=value` (train's overrides, --set, --reward NAME:key=value, preprocess's --arg)."""

import pytest

from mixgrpo.cli import main
from mixgrpo.config import ConfigError
from mixgrpo.keyvalue import parse_pair


def test_the_key_is_before_the_first_equals_sign_and_the_value_is_yaml():
    assert parse_pair("iterations=3", "override") == ("iterations", 3)
    assert parse_pair(" lora.alpha = 0.5", "override") == ("lora.alpha", 0.5)
    assert parse_pair("model.args.path=/a=b", "override") == ("model.args.path", "/a=b")
    assert parse_pair("targets=[to_q, to_k]", "override") == ("targets", ["to_q", "to_k"])
    assert parse_pair("name=", "override") == ("name", "")
    assert parse_pair("text=: not yaml [", "override") == ("text", ": not yaml [")


@pytest.mark.parametrize("text", ["iterations", "=3", " =3"])
def test_a_pair_without_key_or_equals_sign_names_the_form(text):
    with pytest.raises(ConfigError, match=r"^--arg '.*' is not of the form key=value \(e.g. --arg use_t5=false\)$"):
        parse_pair(text, "--arg", example="--arg use_t5=false")


@pytest.mark.parametrize("argv, where", [
    (["train", "--dry-run", "iterations"], "override 'iterations'"),
    (["eval", "base=base", "--model", "gaussian", "--prompt", "a", "--reward", "verifier:score", "--out", "{out}"],
     "--reward 'verifier:score': 'score'"),
    (["preprocess", "--model", "tiny", "--prompts", "world:train", "--out", "{out}", "--arg", "use_t5"],
     "--arg 'use_t5'"),
])
def test_every_command_refuses_a_pair_without_equals_sign_in_one_line(argv, where, tmp_path, capsys):
    assert main([a.replace("{out}", str(tmp_path / "out")) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith(f"error: {where} is not of the form "), err
    assert not (tmp_path / "out").exists()


def test_set_without_a_run_is_refused(tmp_path, capsys):
    """--set overrides a run's config.yaml: with no run among the models it would change nothing."""
    argv = ["sample", "--model", "gaussian", "--prompt", "a", "--set", "run.seed=3", "--out", str(tmp_path / "s")]
    assert main(argv) == 2
    assert "--set overrides the config.yaml of a run" in capsys.readouterr().err
