"""docs/config.md, generated from the config dataclasses and the registries, so the reference cannot drift.

    mixgrpo config-doc --out docs/config.md     # rewrite it
    mixgrpo config-doc --check docs/config.md   # exit 1 when it is stale (tests/test_configs.py does the same)

Each key's meaning is the comment on its field's line (and on the comment lines right below it) in
mixgrpo/config.py, mixgrpo/plan.py; the defaults and types are the dataclasses' own. The registered models
and rewards are listed with their factories' keyword arguments: those are the names configs must use.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import io
import re
import tokenize
import typing
from pathlib import Path

import yaml

FIELD_LINE = re.compile(r"^(\s+)(\w+)\s*:")
PYTHON_ONLY = {"text_encoder"}  # factory arguments that take Python objects (sharing a loaded encoder), not YAML


def field_comments(cls: type) -> dict[str, str]:
    """{field: the comment after it on its line, plus comment-only lines right below it} of a dataclass."""
    source = inspect.getsource(cls)
    lines = source.splitlines()
    comments = {t.start[0] - 1: t.string.lstrip("#").strip()
                for t in tokenize.generate_tokens(io.StringIO(source).readline) if t.type == tokenize.COMMENT}
    names = {f.name for f in dataclasses.fields(cls)}
    out: dict[str, str] = {}
    current = None
    for i, line in enumerate(lines):
        m = FIELD_LINE.match(line)
        if m and m.group(2) in names and not line.lstrip().startswith("#"):
            current = m.group(2)
            out[current] = comments.get(i, "")
        elif current is not None and line.strip().startswith("#") and i in comments:
            out[current] = f"{out[current]} {comments[i]}".strip()
        else:
            current = None
    return out


def _default(f: dataclasses.Field):
    from mixgrpo.config import to_dict

    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return "(required)"
    if dataclasses.is_dataclass(value):
        return "(section)"
    value = to_dict(value)
    text = value if isinstance(value, str) else yaml.safe_dump(value, default_flow_style=True).strip()
    text = text.removesuffix("\n...").strip()
    return f"`{text}`" if text != "" else '`""`'


def _section(cls: type, key: str, out: list[str]) -> None:
    hints = typing.get_type_hints(cls)
    comments = field_comments(cls)
    doc = (inspect.getdoc(cls) or "").split("\n\n")[0].replace("\n", " ")
    if doc and not doc.startswith(f"{cls.__name__}("):
        out += [doc, ""]
    out += ["| key | type | default | meaning |", "|---|---|---|---|"]
    nested = []
    for f in dataclasses.fields(cls):
        full = f"{key}.{f.name}" if key else f.name
        tp = hints[f.name]
        sub = _dataclass_of(tp)
        if sub is not None:
            nested.append((full + ("[]" if typing.get_origin(tp) is list else ""), sub))
            meaning = f"see [`{full}`](#{_anchor(full)})"
        else:
            meaning = comments.get(f.name, "").replace("|", "\\|")
        out.append(f"| `{full}` | {_type_name(tp)} | {_default(f)} | {meaning} |")
    out.append("")
    for full, sub in nested:
        out += [f"## `{full}`", ""]
        _section(sub, full, out)


def _dataclass_of(tp) -> type | None:
    if dataclasses.is_dataclass(tp):
        return tp
    args = typing.get_args(tp)
    if typing.get_origin(tp) is list and args and dataclasses.is_dataclass(args[0]):
        return args[0]
    return None


def _type_name(tp) -> str:
    if dataclasses.is_dataclass(tp):
        return "section"
    if typing.get_origin(tp) is list and dataclasses.is_dataclass(typing.get_args(tp)[0]):
        return "list of sections"
    # "str or list[str]": a "|" would split the markdown table's cell
    return getattr(tp, "__name__", None) if typing.get_origin(tp) is None else str(tp).replace("typing.", "").replace(
        " | ", " or ")


def _anchor(key: str) -> str:
    return re.sub(r"[^a-z0-9_\- ]", "", key.lower()).replace(" ", "-")


def _presets(out: list[str]) -> None:
    from mixgrpo.config import to_dict
    from mixgrpo.plan import ALGORITHMS, SamplerConfig

    base = _flatten(to_dict(SamplerConfig()))
    out += ["## `algorithm` presets", "",
            "`algorithm: NAME` starts `sampler` from a preset; `sampler.*` keys then override single fields. What "
            "each preset sets differently from the `sampler` defaults above:", "",
            "| algorithm | sampler fields |", "|---|---|"]
    for name, preset in ALGORITHMS.items():
        diff = {k: v for k, v in _flatten(to_dict(preset)).items() if base.get(k) != v}
        fields = ", ".join(f"`{k}: {yaml.safe_dump(v).removesuffix(chr(10) + '...' + chr(10)).strip()}`"
                           for k, v in diff.items())
        out.append(f"| `{name}` | {fields or '(the defaults)'} |")
    out.append("")


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _registry(title: str, key: str, registry, out: list[str]) -> None:
    out += [f"## Registered `{key}` names", "", title, "", f"| `{key}` | arguments (`args`) | what |", "|---|---|---|"]
    for name in registry.names():
        factory = registry.get(name)
        params = []
        for p in inspect.signature(factory).parameters.values():
            if p.name in PYTHON_ONLY:
                continue
            if p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
                params.append(f"**{p.name}" if p.kind is p.VAR_KEYWORD else f"*{p.name}")
            elif p.default is inspect.Parameter.empty:
                params.append(f"{p.name} (required)")
            else:
                params.append(f"{p.name}={p.default!r}")
        what = (inspect.getdoc(factory) or "").split("\n")[0].replace("|", "\\|")
        out.append(f"| `{name}` | {', '.join(params) or '-'} | {what} |")
    out.append("")


def render() -> str:
    """The text of docs/config.md."""
    import mixgrpo.rewards  # noqa: F401  (registers the rewards)
    from mixgrpo.config import TrainConfig
    from mixgrpo.models import MODELS
    from mixgrpo.rewards import REWARDS

    out = ["# Configuration reference", "",
           "<!-- generated by `mixgrpo config-doc --out docs/config.md` from mixgrpo/config.py, mixgrpo/plan.py and "
           "the registries; do not edit by hand -->", "",
           "Every key below can be set in a YAML recipe (`configs/*.yaml`) or on the command line as "
           "`key.sub=value` (`mixgrpo train --config C run.iterations=10 sampler.window.size=2`). Unknown keys and "
           "values of the wrong type are refused with a message naming the field. `model.args` and each reward's "
           "`args` are the keyword arguments of the registered factory (listed at the end; docs/models.md and "
           "docs/rewards.md explain them).", "",
           "Values are YAML, so a list or a mapping is written inline and replaces the whole field (quote it for the "
           "shell): `'rewards=[{name: jpeg_compressibility}, {name: verifier, weight: 0}]'`, "
           "`'lora.target_modules=[to_q, to_k, to_v]'`, `optim.betas=[0.9,0.99]`, `'model.args={path: /ckpt/FLUX.1-dev, "
           "dtype: bfloat16}'` (a mapping replaces `model.args` whole; `model.args.height=512` sets one key). A list "
           "has no per-element override (`rewards.0.weight=...` is refused): give the whole list. Numbers in exponent "
           "form (`optim.lr=1e-5`) are numbers; `key=` is the empty string.", "",
           "## Top level", ""]
    _section(TrainConfig, "", out)
    _presets(out)
    _registry("`model.name` selects a base-model factory; `model.args` are its keyword arguments. A Python "
              "callable `package.module:function` works too.", "model.name", MODELS, out)
    _registry("`rewards[].name` selects a reward factory; `args` are its keyword arguments. A Python callable "
              "`package.module:function` is called as `function(images, prompts, **args)`.", "rewards[].name",
              REWARDS, out)
    return "\n".join(out).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mixgrpo config-doc", description=__doc__.split("\n")[0], allow_abbrev=False)
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--out", help="write the reference to this file (default: print it)")
    group.add_argument("--check", metavar="FILE", help="exit 1 if FILE differs from the generated reference")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        if Path(args.check).read_text(encoding="utf-8") != text:
            print(f"{args.check} is stale: regenerate it with `mixgrpo config-doc --out {args.check}`")
            return 1
        return 0
    if args.out:
        Path(args.out).write_text(text, encoding="utf-8")
    else:
        print(text, end="")
    return 0
