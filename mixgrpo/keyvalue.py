"""The one `key=value` grammar of the command line.

Every command that takes settings as text takes them in this form, parsed here: train's overrides and --resume's new
places of a moved run's files (`key.sub=value`, into the config, `mixgrpo.config.apply_override`); the `--set
key.sub=value` of sample, eval and export (the same, into the run's config); a reward's arguments in `--reward
NAME:key=value,key=value` (eval, serve-rewards); preprocess's `--arg key=value` (the text-encoder loader's
arguments). The key is the text before the first `=`, the value the text after it, read as YAML: "3" is 3, "true" is
True, "[a, b]" a list, "" the empty string, and text that is not valid YAML stays text. A `key=value` without its
`=` is refused with one message form: `WHERE 'TEXT' is not of the form FORM (e.g. EXAMPLE)`.
"""

from __future__ import annotations

from typing import Any

import yaml

from mixgrpo.errors import ConfigError


def parse_value(text: str) -> Any:
    """A value as YAML ("3" -> 3, "[a, b]" -> ["a", "b"]); "" and blanks -> ""; text that is not YAML -> itself."""
    if not text.strip():
        return ""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def parse_pair(text: str, where: str, form: str = "key=value", example: str = "") -> tuple[str, Any]:
    """'key=value' -> (key, value parsed by `parse_value`); ConfigError naming `where` (the flag or the kind of
    setting), the expected `form` and an example when there is no `=` or no key."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"{where} {text!r} is not of the form {form}" + (f" (e.g. {example})" if example else ""))
    return key.strip(), parse_value(value)
