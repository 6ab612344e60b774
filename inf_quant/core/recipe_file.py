"""A recipe YAML file -> Recipe (config.py's dataclasses): a key given twice is refused, relative paths are read
against the file's directory, the name must match the file's."""

from __future__ import annotations

from pathlib import Path

from .config import Recipe, from_dict
from .errors import ConfigError


def _unique_key_loader(path: Path):
    """A yaml SafeLoader that refuses a key given twice in one mapping (yaml itself keeps the last silently)."""
    import yaml

    class Loader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            self.flatten_mapping(node)  # merge keys (<<) first, as SafeConstructor does
            seen: dict = {}
            for key_node, _ in node.value:
                key, line = self.construct_object(key_node, deep=True), key_node.start_mark.line + 1
                try:
                    if key in seen:
                        raise ConfigError(f"{path}:{line}: duplicate key {key!r} (first on line {seen[key]}); keep "
                                          "one of them")
                    seen[key] = line
                except TypeError:  # an unhashable key: yaml's own error says so below
                    continue
            return super().construct_mapping(node, deep)

    return Loader


# recipe fields that name files or directories: relative ones are relative to the recipe file's directory
PATH_FIELDS = {("model", "path"): ("bundled", ""), ("calibration", "source"): ("bundled", "bundled-chat", "bundled-mix"),
               ("output", "dir"): ("",), ("verify", "eval"): ("bundled-eval",), ("verify", "cache_dir"): ("",)}


def _anchor_paths(data: dict, base: Path) -> None:
    """Make the recipe's relative paths relative to `base` (the recipe's directory), not to the working directory
    of whoever runs it; keywords (bundled, ...) and empty values stay as they are."""
    for (section, key), keywords in PATH_FIELDS.items():
        sec = data.get(section)
        v = sec.get(key) if isinstance(sec, dict) else None
        if isinstance(v, str) and v not in keywords and not Path(v).expanduser().is_absolute():
            sec[key] = str(base / v)


def load_recipe(path) -> Recipe:
    """A recipe YAML file -> Recipe. `name` defaults to the file's stem and must match it when given. A key given
    twice is an error; relative paths in it are relative to the recipe file (PATH_FIELDS)."""
    import yaml

    path = Path(path)
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_unique_key_loader(path))
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: cannot read the recipe ({' '.join(str(e).split())})") from None
    where = path.name
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe is a mapping of sections (method:, model:, gptq:, ...), but this file's "
                          f"top level is a {type(data).__name__}; write it as 'key: value' lines")
    data = dict(data or {})
    data.setdefault("name", path.stem)
    if data["name"] != path.stem:
        raise ConfigError(f"{where}: name {data['name']!r} must match the file name {path.stem!r}")
    for key in ("quantized", "baseline", "report_dir"):
        if key in (data.get("verify") or {}):
            raise ConfigError(f"{where}.verify.{key}: set by `inf-quant release`, not by recipes")
    _anchor_paths(data, path.resolve().parent)
    return from_dict(Recipe, data, where)
