"""Prompt sets for evaluation: local files, the HPSv2 benchmark, Pick-a-Pic `test_unique`, and the toy world.

A `PromptSet` is an ordered list of `PromptItem(text, group, index)`. `group` is the HPSv2 style (`anime`, ...) or
`""`; `index` is the position inside the group, which names the image file (`<group>/<index:05d>.png`) as in the
HPSv2 benchmark layout.

`load_prompts(spec)` understands:
- `toy:heldout`, `toy:train` — the toy world's built-in splits;
- a folder holding `anime.json`, `concept-art.json`, `paintings.json`, `photo.json` — the HPSv2 benchmark;
- `pickapic:PATH` — Pick-a-Pic `test_unique` (a parquet file or a folder of parquet shards, `caption` column);
- a `.txt` (one prompt per line), `.json` (a list of strings or of objects with `caption`/`prompt`), `.jsonl`
  (one string or object per line) or `.parquet` file (a `caption` column).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

HPSV2_STYLES = ("anime", "concept-art", "paintings", "photo")
TEXT_KEYS = ("caption", "prompt", "text")


@dataclass(frozen=True)
class PromptItem:
    text: str
    group: str = ""
    index: int = 0

    def image_name(self, ext: str = "png") -> str:
        """Relative image path: `<group>/<index:05d>.<ext>` (HPSv2 layout) or `<index:05d>.<ext>`."""
        name = f"{self.index:05d}.{ext}"
        return f"{self.group}/{name}" if self.group else name


@dataclass(frozen=True)
class PromptSet:
    name: str
    items: tuple[PromptItem, ...]

    def __len__(self) -> int:
        return len(self.items)

    @property
    def texts(self) -> list[str]:
        return [item.text for item in self.items]

    @property
    def groups(self) -> list[str]:
        """Distinct groups in order of appearance (`[""]` for a flat set)."""
        return list(dict.fromkeys(item.group for item in self.items))

    def head(self, n: int | None) -> PromptSet:
        """The first `n` prompts of every group (all when `n` is `None`)."""
        if n is None:
            return self
        return PromptSet(self.name, tuple(item for item in self.items if item.index < n))


def flat(name: str, texts: list[str]) -> PromptSet:
    return PromptSet(name, tuple(PromptItem(text, "", i) for i, text in enumerate(texts)))


def read_prompt_file(path: str | Path) -> list[str]:
    """Prompts from a `.txt`, `.json`, `.jsonl` or `.parquet` file (see module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"`prompts` file {str(path)!r} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".txt":
        texts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
        texts = [t for t in texts if t]
    elif suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, list):
            raise ValueError(f"`prompts` JSON {str(path)!r} must be a list, got {type(data).__name__}")
        texts = [_text_of(entry, f"{path}[{i}]") for i, entry in enumerate(data)]
    elif suffix == ".jsonl":
        lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        texts = [_text_of(json.loads(line), f"{path}:{i + 1}") for i, line in enumerate(lines)]
    elif suffix == ".parquet":
        texts = _read_parquet_captions([path])
    else:
        raise ValueError(f"`prompts` file must be .txt, .json, .jsonl or .parquet, got {str(path)!r}")
    if not texts:
        raise ValueError(f"`prompts` file {str(path)!r} holds no prompts")
    return texts


def _text_of(entry: object, where: str) -> str:
    if isinstance(entry, str):
        return entry
    if isinstance(entry, dict):
        for key in TEXT_KEYS:
            if key in entry:
                return str(entry[key])
    raise ValueError(f"{where}: expected a string or an object with one of {list(TEXT_KEYS)}, got {entry!r}")


def _read_parquet_captions(files: list[Path]) -> list[str]:
    import pyarrow.parquet as pq

    texts: list[str] = []
    for file in files:
        schema = pq.read_schema(file)
        if "caption" not in schema.names:
            raise ValueError(f"parquet file {str(file)!r} has no `caption` column (columns: {schema.names})")
        texts.extend(str(t) for t in pq.read_table(file, columns=["caption"]).column("caption").to_pylist())
    return texts


def hpsv2_benchmark(folder: str | Path, styles: tuple[str, ...] = HPSV2_STYLES) -> PromptSet:
    """The HPSv2 benchmark (Wu et al. 2023): `<style>.json` per style, each a list of 800 prompts; images go to
    `<style>/<index:05d>.png`."""
    folder = Path(folder)
    missing = [s for s in styles if not (folder / f"{s}.json").is_file()]
    if missing:
        raise FileNotFoundError(
            f"HPSv2 benchmark folder {str(folder)!r} lacks {', '.join(s + '.json' for s in missing)}; it must hold "
            f"{', '.join(s + '.json' for s in styles)}"
        )
    items = []
    for style in styles:
        for i, text in enumerate(read_prompt_file(folder / f"{style}.json")):
            items.append(PromptItem(text, style, i))
    return PromptSet("hpsv2", tuple(items))


def pickapic_test_unique(path: str | Path) -> PromptSet:
    """Pick-a-Pic `test_unique` captions (~500) from a parquet file or a folder of parquet shards; duplicates are
    dropped, first occurrence kept."""
    path = Path(path)
    files = sorted(path.glob("*.parquet")) if path.is_dir() else [path]
    if not files or not files[0].is_file():
        raise FileNotFoundError(f"Pick-a-Pic `test_unique` parquet not found at {str(path)!r}")
    return flat("pickapic_test_unique", list(dict.fromkeys(_read_parquet_captions(files))))


def plugin_prompts(name: str, arg: str) -> PromptSet | None:
    """`NAME:ARG` from a `diffalign.prompts` plug-in (the toy world's `toy:train` / `toy:heldout`), else None."""
    from diffalign import plugins

    source = plugins.load("prompts", name)
    return None if source is None else flat(f"{name}_{arg}", list(source(arg)))


def load_prompts(spec: str | Path) -> PromptSet:
    """Resolve a `prompts` config value (see module docstring) into a `PromptSet`."""
    spec = str(spec)
    name, sep, arg = spec.partition(":")
    if sep and name != "pickapic" and not Path(spec).expanduser().exists():
        found = plugin_prompts(name, arg)
        if found is not None:
            return found
    if spec.startswith("pickapic:"):
        return pickapic_test_unique(spec.split(":", 1)[1])
    path = Path(spec).expanduser()
    if path.is_dir():
        if any((path / f"{s}.json").is_file() for s in HPSV2_STYLES):
            return hpsv2_benchmark(path)
        if any(path.glob("*.parquet")):
            return pickapic_test_unique(path)
        raise ValueError(
            f"`prompts` folder {spec!r} is neither the HPSv2 benchmark (anime.json, ...) nor parquet shards"
        )
    return flat(path.stem, read_prompt_file(path))
