"""N-way parallel dev sets: loading, language codes, directions, calibration subsets."""

from __future__ import annotations

import gzip
import hashlib
import json
import random
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from .languages import to_nllb

BUILTIN_DEMO = "builtin:demo"
HUB_SETS = {"hub:flores_plus": ("openlanguagedata/flores_plus", "dev"),
            "hub:ntrex": ("mteb/NTREX", "test")}


class DataError(ValueError):
    """Bad dev-set input; the message is one line naming the bad value."""


def read_lines(path: str | Path) -> list[str]:
    """Lines of a plain or gzipped UTF-8 text file, stripped of their newline and outer spaces."""
    p = Path(path)
    opener = gzip.open if p.suffix == ".gz" else open
    try:
        with opener(p, "rt", encoding="utf-8") as f:
            return [line.rstrip("\n").strip() for line in f]
    except UnicodeDecodeError as e:
        raise DataError(f"dev set file {p}: not UTF-8 text (byte {e.object[e.start:e.start + 1]!r}: "
                        f"{e.reason}); expected UTF-8, one sentence per line") from None
    except (OSError, EOFError) as e:
        raise DataError(f"dev set file {p}: unreadable ({e})") from None


@dataclass(frozen=True)
class DevSet:
    """Line-aligned sentences per NLLB language code; ``source`` says where they came from."""

    lines: dict[str, tuple[str, ...]]
    source: str

    @property
    def languages(self) -> list[str]:
        return list(self.lines)

    def __len__(self) -> int:
        return len(next(iter(self.lines.values())))

    def fingerprint(self) -> str:
        """Content hash: two dev sets with the same sentences share evaluations."""
        h = hashlib.sha256()
        for code in sorted(self.lines):
            h.update(code.encode())
            for s in self.lines[code]:
                h.update(b"\x00" + s.encode())
        return h.hexdigest()[:16]

    def subsample(self, n: int | None, seed: int = 0) -> DevSet:
        """``n`` aligned lines chosen with a fixed seed (all lines when ``n`` is None or too big)."""
        if n is None or n >= len(self):
            return self
        if n <= 0:
            raise DataError(f"max_sentences={n}: expected a positive number")
        idx = sorted(random.Random(seed).sample(range(len(self)), n))
        return DevSet({c: tuple(v[i] for i in idx) for c, v in self.lines.items()}, self.source)

    def select(self, languages: list[str]) -> DevSet:
        missing = [c for c in languages if c not in self.lines]
        if missing:
            raise DataError(
                f"language {missing[0]!r} is not in the dev set {self.source} "
                f"(it has {', '.join(self.lines)})")
        return DevSet({c: self.lines[c] for c in languages}, self.source)


def _checked(lines: dict[str, list[str]], source: str) -> DevSet:
    if not lines:
        raise DataError(f"dev set {source}: no language files found (expected e.g. eng_Latn.txt, en.txt, val.en.gz)")
    counts = {c: len(v) for c, v in lines.items()}
    if len(set(counts.values())) != 1:
        detail = ", ".join(f"{c}={n}" for c, n in counts.items())
        raise DataError(f"dev set {source}: line counts differ ({detail}); files must be line-aligned")
    for code, v in lines.items():
        if not v:
            raise DataError(f"dev set {source}: {code} is empty")
        empty = [i + 1 for i, s in enumerate(v) if not s]
        if empty:
            raise DataError(f"dev set {source}: {code} line {empty[0]} is empty; every line must hold a sentence")
    return DevSet({c: tuple(v) for c, v in lines.items()}, source)


def _code_of(stem: str, split: str | None) -> str | None:
    """Language code of a file stem like ``eng_Latn``, ``deu``, ``de`` or ``val.de``."""
    if split is not None:
        if not stem.startswith(split + "."):
            return None
        stem = stem[len(split) + 1 :]
    elif "." in stem:
        return None
    try:
        return to_nllb(stem)
    except ValueError:
        return None


def _load_dir(path: Path, split: str | None) -> DevSet:
    lines: dict[str, list[str]] = {}
    for f in sorted(path.iterdir()):
        if not f.is_file() or f.name.startswith((".", "README", "LICENSE")):
            continue
        stem = f.name.removesuffix(".gz").removesuffix(".txt")
        code = _code_of(stem, split)
        if code is not None:
            lines[code] = read_lines(f)
    return _checked(lines, str(path) + (f" (split {split})" if split else ""))


def _load_table(path: Path) -> DevSet:
    import pandas as pd

    suffix = path.name.removesuffix(".gz").rsplit(".", 1)[-1]
    if suffix == "tsv":
        df = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False, quoting=3)
    elif suffix == "jsonl":
        df = pd.read_json(path, lines=True, dtype=str)
    elif suffix == "parquet":
        df = pd.read_parquet(path)
    else:
        raise DataError(f"dev set {path}: unknown format {suffix!r}; expected a directory, .tsv, .jsonl or .parquet")
    lines = {}
    for col in df.columns:
        try:
            code = to_nllb(str(col))
        except ValueError as e:
            raise DataError(f"dev set {path}: column {col!r} is not a language code ({e})") from None
        lines[code] = ["" if v is None else str(v).strip() for v in df[col].tolist()]
    return _checked(lines, str(path))


def _load_hub(name: str, languages: list[str]) -> DevSet:
    """FLORES+ / NTREX through ``datasets`` (needs the Hugging Face hub)."""
    try:
        import datasets
    except ImportError:
        raise DataError(f"dev set {name} needs the 'datasets' package: pip install datasets") from None
    repo, split = HUB_SETS[name]
    lines = {}
    for code in languages:
        try:
            ds = datasets.load_dataset(repo, code, split=split)
        except Exception as e:  # noqa: BLE001 - the hub raises many kinds
            raise DataError(f"dev set {name}: could not load {repo} config {code} ({type(e).__name__}); "
                            "is the Hugging Face hub reachable?") from None
        col = "text" if "text" in ds.column_names else ds.column_names[-1]
        lines[code] = [str(s).strip() for s in ds[col]]
    return _checked(lines, name)


def load_devset(spec: str, languages: list[str] | None = None, split: str | None = None) -> DevSet:
    """Load a dev set from ``builtin:demo``, ``hub:flores_plus``, ``hub:ntrex``, a directory, or a table.

    A directory holds one file per language (``eng_Latn.txt``, ``deu.txt``, ``de.gz``, or with
    ``split``, ``val.de.gz``). Tables (TSV/JSONL/Parquet) have one column per language code.
    """
    langs = [to_nllb(c) for c in languages] if languages else None
    if spec == BUILTIN_DEMO:
        path = Path(str(resources.files("cullmt_ray") / "reference" / "demo_dev"))
        ds = _load_dir(path, None)
        ds = DevSet(ds.lines, BUILTIN_DEMO)
    elif spec in HUB_SETS:
        if not langs:
            raise DataError(f"dev set {spec}: list the languages to load")
        ds = _load_hub(spec, langs)
    else:
        path = Path(spec).expanduser()
        if not path.exists():
            raise DataError(f"dev set {spec!r} does not exist; expected {BUILTIN_DEMO}, "
                            f"{', '.join(HUB_SETS)}, a directory of per-language files, or a .tsv/.jsonl/.parquet file")
        ds = _load_dir(path, split) if path.is_dir() else _load_table(path)
    return ds.select(langs) if langs else ds


# ----------------------------------------------------------------------------- directions
Direction = tuple[str, str]


def direction_name(d: Direction) -> str:
    return f"{d[0]}-{d[1]}"


def parse_directions(spec: str | list[str], languages: list[str], pivot: str = "eng_Latn") -> list[Direction]:
    """Directions from ``all`` (N(N-1)), ``english-centric`` (pivot<->each) or a list of ``src-tgt``."""
    if isinstance(spec, str) and spec in ("all", "english-centric", "pivot"):
        if spec == "all":
            return [(s, t) for s in languages for t in languages if s != t]
        if pivot not in languages:
            raise DataError(f"directions={spec!r} needs {pivot} among the languages {languages}")
        return [d for o in languages if o != pivot for d in ((pivot, o), (o, pivot))]
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out: list[Direction] = []
    for item in items:
        parts = str(item).strip().split("-")
        if len(parts) != 2:
            raise DataError(f"direction {item!r}: expected 'src-tgt' like 'eng_Latn-deu_Latn', "
                            "or one of all, english-centric")
        try:
            s, t = to_nllb(parts[0]), to_nllb(parts[1])
        except ValueError as e:
            raise DataError(f"direction {item!r}: {e}") from None
        for c in (s, t):
            if c not in languages:
                raise DataError(f"direction {item!r}: {c} is not among the languages {languages}")
        if s == t:
            raise DataError(f"direction {item!r}: source and target are the same language")
        out.append((s, t))
    if not out:
        raise DataError("directions: the list is empty")
    return out


CALIBRATION_PRESETS = ("all", "from-english", "to-english", "into:LANG", "from:LANG", "src-tgt,...")


def select_directions(spec: str, configured: list[Direction], languages: list[str],
                      pivot: str = "eng_Latn") -> list[Direction]:
    """A calibration subset of the ``configured`` directions.

    ``all`` (every configured direction), ``from-english``/``to-english`` (out of / into the
    pivot), ``into:LANG``/``from:LANG`` (into / out of one language), or an explicit list.
    """
    spec = spec.strip()
    if spec == "all":
        out = list(configured)
    elif spec in ("from-english", "to-english"):
        out = [d for d in configured if (d[0] if spec == "from-english" else d[1]) == pivot]
    elif spec.startswith(("into:", "from:")):
        kind, _, lang = spec.partition(":")
        try:
            code = to_nllb(lang.strip())
        except ValueError as e:
            raise DataError(f"calibration {spec!r}: {e}") from None
        out = [d for d in configured if (d[1] if kind == "into" else d[0]) == code]
    else:
        try:
            out = parse_directions(spec, languages, pivot)
        except DataError as e:
            raise DataError(f"calibration {spec!r}: {e}; or one of {', '.join(CALIBRATION_PRESETS)}") from None
        extra = [d for d in out if d not in configured]
        if extra:
            raise DataError(f"calibration {spec!r}: {extra[0][0]}-{extra[0][1]} is not among the configured "
                            "directions")
    if not out:
        raise DataError(f"calibration {spec!r}: selects no configured direction; expected one of "
                        f"{', '.join(CALIBRATION_PRESETS)}")
    return out


def describe(devset: DevSet, directions: list[Direction]) -> dict:
    """The JSON-able identity of an evaluation set, used in store context keys."""
    return {"devset": devset.fingerprint(), "source": devset.source, "sentences": len(devset),
            "directions": [direction_name(d) for d in directions]}


def dumps_canonical(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
