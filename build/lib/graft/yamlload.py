"""The strict YAML reader behind ``load_params``: bounded, UTF-8, no duplicate or non-string keys."""

from __future__ import annotations

from pathlib import Path

import yaml

from graft import GraftError

# A params file is a few KiB: anything this big is the wrong file (or an attack on the parser).
MAX_PARAMS_BYTES = 1 << 20
_TAG = "tag:yaml.org,2002:"
_KINDS = {
    "bool": "a boolean",
    "int": "a number",
    "float": "a number",
    "null": "null",
    "timestamp": "a date",
    "binary": "binary data",
    "str": "a string",
}


def _kind(node: yaml.Node) -> str:
    """What YAML made of ``node``, in words."""
    if isinstance(node, yaml.SequenceNode):
        return "a sequence"
    if isinstance(node, yaml.MappingNode):
        return "a mapping"
    return _KINDS.get(node.tag.removeprefix(_TAG), node.tag)


class _ParamsLoader(yaml.SafeLoader):
    """A SafeLoader that refuses duplicate and non-string mapping keys (plain PyYAML keeps the last duplicate)."""

    source = "params"

    def check_keys(self, root: yaml.Node) -> None:
        """Walk the composed node tree (iteratively: aliases visited once) and fail on the first bad key."""
        stack, seen = [(root, "")], set()
        while stack:
            node, path = stack.pop()
            if id(node) in seen:
                continue
            seen.add(id(node))
            if isinstance(node, yaml.SequenceNode):
                stack.extend((item, f"{path}[{i}]") for i, item in enumerate(node.value))
            elif isinstance(node, yaml.MappingNode):
                first: dict[str, int] = {}
                for key, value in node.value:
                    line = key.start_mark.line + 1
                    if key.tag == _TAG + "merge":  # `<<: *anchor` merges its keys into this mapping
                        stack.append((value, path))
                        continue
                    if not isinstance(key, yaml.ScalarNode) or key.tag == _TAG + "null":
                        raise GraftError(
                            f"{self.source}: line {line}: a key under {path or 'the top level'} is "
                            f"{_kind(key)}, not a string: give it a plain name"
                        )
                    text = key.value.replace("\n", "\\n")  # the message stays one line
                    name = f"{path}.{text}" if path else text
                    if key.tag != _TAG + "str":  # e.g. `on:` or `yes:` read as true, `1:` as a number
                        raise GraftError(
                            f"{self.source}: line {line}: key {name} is {_kind(key)}, not a string: "
                            f"quote it ('{text}') or rename it"
                        )
                    if key.value in first:
                        raise GraftError(
                            f"{self.source}: line {line}: duplicate key {name} (first at line "
                            f"{first[key.value]}): keep one"
                        )
                    first[key.value] = line
                    stack.append((value, name))


def _read_text(p: Path) -> str:
    """The params file as text: at most MAX_PARAMS_BYTES, UTF-8."""
    too_big = f"{p}: params file is {{}} bytes, over the {MAX_PARAMS_BYTES} (1 MiB) limit: is this the right file?"
    try:
        size = p.stat().st_size
        if size > MAX_PARAMS_BYTES:  # refused before reading or parsing
            raise GraftError(too_big.format(size))
        with p.open("rb") as fh:
            data = fh.read(MAX_PARAMS_BYTES + 1)  # bounded even if the file grows meanwhile
    except OSError as exc:
        raise GraftError(f"{p}: cannot read params file ({exc.strerror or exc})") from None
    if len(data) > MAX_PARAMS_BYTES:
        raise GraftError(too_big.format(f"more than {MAX_PARAMS_BYTES}"))
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise GraftError(f"{p}: byte {exc.start}: not UTF-8 text ({exc.reason}): save it as UTF-8") from None


def load_yaml(p: Path) -> object:
    """The document of the params file ``p`` (None when empty), read strictly.

    Beyond PyYAML's safe loader: the file is bounded in size and must be UTF-8, the top level must
    be a mapping, and a duplicate or non-string key anywhere is refused (plain PyYAML keeps the last
    duplicate silently). Every failure is a one-line GraftError naming the file and line.
    """
    if not p.is_file():
        raise GraftError(f"{p}: params file not found (run from the project root or pass --params)")
    loader = _ParamsLoader(_read_text(p))
    loader.source = str(p)
    try:
        node = loader.get_single_node()
        if node is not None and not isinstance(node, yaml.MappingNode) and node.tag != _TAG + "null":
            raise GraftError(
                f"{p}: line {node.start_mark.line + 1}: top level must be a mapping of sections "
                f"(seed:, data:, train: ...), got {_kind(node)}"
            )
        if node is not None:
            loader.check_keys(node)
        raw = None if node is None else loader.construct_document(node)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise GraftError(f"{p}:{where}: not valid YAML ({getattr(exc, 'problem', exc)})".replace("\n", " ")) from None
    except RecursionError:
        raise GraftError(f"{p}: not valid YAML (nested too deeply)") from None
    finally:
        loader.dispose()
    return raw
