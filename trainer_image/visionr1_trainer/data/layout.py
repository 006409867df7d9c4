"""Which files of a directory hold a split (and subset), as the hub reads a data set's repo.

A mirror of a hub data set (a local folder, a PVC path or an S3 prefix holding the
repo's files) must read the same rows as the hub name. The hub decides in this order,
and so does ``select_files``:

1. the ``configs`` of the repo's ``README.md`` front matter (``config_name`` is the
   subset, ``data_files`` lists ``split``/``path`` globs): DynaMath's
   ``sample_variant1`` is ``data/sample1-*``, MathVerse's ``testmini_text_only`` is
   ``testmini_text_only.parquet``;
2. else file and folder names: a subset or split ``x`` is a file whose stem is ``x``
   (``testmini.parquet``), a shard ``x-00000-of-00001.parquet``, or a folder ``x/``.
   ``testmini_text_only.parquet`` is *not* ``testmini``;
3. else, for ``train`` only, the data files of an unsplit repo (no file named after any
   split), such as Vision-R1-cold's two JSON files: those at the top of the folder when
   there are any, else all of them.

A split or subset that names nothing is a ``DataSourceError`` naming it and the files
found, never a silent read of everything. The same rows stored twice (``x.parquet``
beside ``x.json``, as MathVerse ships them) are read once, from the parquet file.
"""

from __future__ import annotations

import fnmatch
import logging
import re
from pathlib import Path

log = logging.getLogger(__name__)

# The hub's split names (datasets' keyword list): a file named after one belongs to it.
SPLIT_KEYWORDS = ("train", "training", "test", "testing", "eval", "evaluation", "validation", "valid", "val",
                  "dev", "testmini")
_SHARD = re.compile(r"-\d{5}-of-\d{5}.*$")
# Preferred form when the same stem is stored several ways.
_FORM_ORDER = {".parquet": 0, ".jsonl": 1, ".json": 2}
_LISTED = 12  # files named in an error message


class LayoutError(Exception):
    """A split or subset that matches no file (``sources`` re-raises it as DataSourceError)."""


def readme_configs(directory: Path) -> list[dict] | None:
    """The ``configs`` list of ``directory/README.md``'s YAML front matter, or None."""
    readme = directory / "README.md"
    if not readme.is_file():
        return None
    text = readme.read_text(encoding="utf-8", errors="replace")
    if not text.startswith("---"):
        return None
    end = text.find("\n---", 3)
    if end < 0:
        return None
    import yaml

    try:
        meta = yaml.safe_load(text[3:end])
    except yaml.YAMLError:
        return None
    configs = meta.get("configs") if isinstance(meta, dict) else None
    if not isinstance(configs, list) or not all(isinstance(c, dict) for c in configs):
        return None
    return configs or None


def _config_splits(config: dict) -> dict[str, list[str]]:
    """``{split: [glob, ...]}`` of one config's ``data_files`` (a string, a list, or split entries)."""
    files = config.get("data_files")
    if isinstance(files, str):
        return {"train": [files]}
    splits: dict[str, list[str]] = {}
    if isinstance(files, list):
        for entry in files:
            if isinstance(entry, str):
                splits.setdefault("train", []).append(entry)
            elif isinstance(entry, dict) and entry.get("split"):
                paths = entry.get("path")
                splits.setdefault(str(entry["split"]), []).extend([paths] if isinstance(paths, str) else list(paths or []))
    elif isinstance(files, dict):
        for split, paths in files.items():
            splits[str(split)] = [paths] if isinstance(paths, str) else list(paths or [])
    return splits


def _listing(directory: Path, files: list[Path]) -> str:
    names = [str(p.relative_to(directory)) for p in files[:_LISTED]]
    more = f" and {len(files) - _LISTED} more" if len(files) > _LISTED else ""
    return ", ".join(names) + more if names else "none"


def _stem(path: Path) -> str:
    name = path.name
    for suffix in _FORM_ORDER:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return name


def names(path: Path, directory: Path, key: str) -> bool:
    """Whether ``path`` (under ``directory``) is named after split or subset ``key``."""
    relative = path.relative_to(directory)
    if key in relative.parts[:-1]:
        return True
    stem = _stem(path)
    return stem == key or _SHARD.sub("", stem) == key


def dedupe_forms(files: list[Path]) -> list[Path]:
    """One file per (folder, stem): ``x.parquet`` wins over ``x.jsonl`` and ``x.json``."""
    best: dict[tuple[Path, str], Path] = {}
    for path in files:
        key = (path.parent, _stem(path))
        if key not in best or _FORM_ORDER.get(path.suffix, 9) < _FORM_ORDER.get(best[key].suffix, 9):
            best[key] = path
    chosen = set(best.values())
    return [p for p in files if p in chosen]


def select_files(directory: Path, found: list[Path], split: str, subset: str | None = None,
                 split_aliases: tuple[str, ...] = ()) -> list[Path]:
    """The data files of ``split`` (and ``subset``) among ``found`` (see the module docstring)."""
    configs = readme_configs(directory)
    if configs is not None:
        chosen = _from_configs(directory, found, configs, split, subset)
        if chosen:
            return chosen
        # The config's files hold no rows we read (an image folder's pictures or zips, as
        # MM-Math's card describes its repo): choose by names instead.
        log.info("%s: README.md's files for split %r are not parquet/json rows; choosing by file names",
                 directory, split)
    candidates = found
    if subset:
        candidates = [p for p in found if names(p, directory, subset)]
        if not candidates:
            raise LayoutError(f"subset {subset!r} matches no file under {directory} "
                              f"(files: {_listing(directory, found)})")
    keys = (split, *split_aliases)
    named = [p for p in candidates if any(names(p, directory, key) for key in keys)]
    if named:
        return dedupe_forms(named)
    if split == "train" and not any(names(p, directory, k) for p in candidates for k in SPLIT_KEYWORDS):
        # An unsplit repo: its files are the train split. Those at the top when there are
        # any (Vision-R1-cold's two JSON files), so a stray JSON file inside an image
        # folder kept beside them (llava_cot_images/...) is not read as rows.
        top = [p for p in candidates if p.parent == directory]
        return dedupe_forms(top or candidates)
    raise LayoutError(f"split {split!r} matches no file under {directory}"
                      f"{f' (subset {subset!r})' if subset else ''} (files: {_listing(directory, candidates)})")


def _from_configs(directory: Path, found: list[Path], configs: list[dict], split: str,
                  subset: str | None) -> list[Path]:
    by_name = {str(c.get("config_name", "default")): c for c in configs}
    if subset:
        if subset not in by_name:
            raise LayoutError(f"subset {subset!r} is not a config of {directory / 'README.md'} "
                              f"(configs: {', '.join(by_name)})")
        config = by_name[subset]
    else:
        defaults = [c for c in configs if c.get("default")] or [by_name[n] for n in ("default",) if n in by_name]
        config = defaults[0] if defaults else configs[0]
    name = str(config.get("config_name", "default"))
    splits = _config_splits(config)
    if split not in splits:
        raise LayoutError(f"split {split!r} is not in config {name!r} of {directory / 'README.md'} "
                          f"(splits: {', '.join(splits) or 'none'})")
    relative = {p: str(p.relative_to(directory)) for p in found}
    files = [p for p in found if any(fnmatch.fnmatchcase(relative[p], glob) for glob in splits[split])]
    if not files:
        if all(_names_other_files(glob) for glob in splits[split]):
            return []  # the config lists images or archives, not rows: the caller chooses by names
        raise LayoutError(f"split {split!r} of config {name!r} ({', '.join(splits[split])}) matches no file "
                          f"under {directory} (files: {_listing(directory, found)})")
    return dedupe_forms(files)


def _names_other_files(glob: str) -> bool:
    """Whether ``glob`` names files of another kind than rows (``*.png``, ``images.zip``)."""
    tail = glob.rsplit("/", 1)[-1]
    return "." in tail and not tail.endswith(tuple(_FORM_ORDER)) and not tail.endswith("*")
