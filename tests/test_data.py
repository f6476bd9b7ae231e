"""Dev sets: formats, language codes, directions, subsampling, and the one-line errors."""

from __future__ import annotations

import gzip
import json

import pandas as pd
import pytest

from cullmt_ray.data import DataError, load_devset, parse_directions
from cullmt_ray.languages import to_nllb

from .conftest import SHARED_DATA

ROWS = {"eng_Latn": ["A dog runs.", "Two cats sleep.", "A girl sings."],
        "deu_Latn": ["Ein Hund rennt.", "Zwei Katzen schlafen.", "Ein Mädchen singt."]}


def test_demo_devset_is_four_way_and_original():
    ds = load_devset("builtin:demo")
    assert sorted(ds.languages) == ["ces_Latn", "deu_Latn", "eng_Latn", "fra_Latn"]
    assert len(ds) >= 200 and all(all(s for s in v) for v in ds.lines.values())


@pytest.mark.parametrize("fmt", ["dir_nllb", "dir_short_gz", "tsv", "jsonl", "parquet"])
def test_formats_load_the_same(tmp_path, fmt):
    if fmt == "dir_nllb":
        for c, v in ROWS.items():
            (tmp_path / f"{c}.txt").write_text("\n".join(v) + "\n", encoding="utf-8")
        spec = tmp_path
    elif fmt == "dir_short_gz":
        for c, v in ROWS.items():
            with gzip.open(tmp_path / f"dev.{c[:2]}.gz", "wt", encoding="utf-8") as f:
                f.write("\n".join(v) + "\n")
        spec = tmp_path
    elif fmt == "tsv":
        spec = tmp_path / "dev.tsv"
        pd.DataFrame(ROWS).to_csv(spec, sep="\t", index=False)
    elif fmt == "jsonl":
        spec = tmp_path / "dev.jsonl"
        spec.write_text("\n".join(json.dumps({"en": e, "de": d}) for e, d in zip(*ROWS.values())), encoding="utf-8")
    else:
        spec = tmp_path / "dev.parquet"
        pd.DataFrame(ROWS).to_parquet(spec)
    ds = load_devset(str(spec), split="dev" if fmt == "dir_short_gz" else None)
    assert {c: list(v) for c, v in ds.lines.items()} == ROWS


@pytest.mark.skipif(not (SHARED_DATA / "multi30k").exists(), reason="../shared/data not present")
def test_multi30k_split_and_ntrex():
    m = load_devset(str(SHARED_DATA / "multi30k"), ["en", "de"], split="test_2016_flickr")
    assert len(m) == 1000 and m.languages == ["eng_Latn", "deu_Latn"]
    n = load_devset(str(SHARED_DATA / "ntrex"), ["eng", "ces"])
    assert len(n) == 1997


def test_mismatched_line_counts(tmp_path):
    (tmp_path / "eng_Latn.txt").write_text("a\nb\nc\n")
    (tmp_path / "deu_Latn.txt").write_text("a\nb\n")
    with pytest.raises(DataError, match=r"line counts differ \(deu_Latn=2, eng_Latn=3\)"):
        load_devset(str(tmp_path))


def test_empty_file_and_empty_line(tmp_path):
    (tmp_path / "eng_Latn.txt").write_text("")
    with pytest.raises(DataError, match="eng_Latn is empty"):
        load_devset(str(tmp_path))
    (tmp_path / "eng_Latn.txt").write_text("a\n\nc\n")
    with pytest.raises(DataError, match="eng_Latn line 2 is empty"):
        load_devset(str(tmp_path))


def test_unknown_codes():
    with pytest.raises(ValueError, match="unknown language code 'xx'"):
        to_nllb("xx")
    with pytest.raises(DataError, match="'spa_Latn' is not in the dev set"):
        load_devset("builtin:demo", ["spa_Latn"])
    with pytest.raises(DataError, match="does not exist"):
        load_devset("/no/such/dir")


def test_directions():
    langs = ["eng_Latn", "deu_Latn", "fra_Latn"]
    assert len(parse_directions("all", langs)) == 6
    assert parse_directions("english-centric", langs) == [("eng_Latn", "deu_Latn"), ("deu_Latn", "eng_Latn"),
                                                          ("eng_Latn", "fra_Latn"), ("fra_Latn", "eng_Latn")]
    assert parse_directions("en-de,fr-de", langs) == [("eng_Latn", "deu_Latn"), ("fra_Latn", "deu_Latn")]
    with pytest.raises(DataError, match="'en-cs': ces_Latn is not among"):
        parse_directions("en-cs", langs)
    with pytest.raises(DataError, match="expected 'src-tgt'"):
        parse_directions(["en_de"], langs)


def test_subsample_is_fixed_by_seed_and_aligned():
    ds = load_devset("builtin:demo")
    a, b, c = ds.subsample(20, 1), ds.subsample(20, 1), ds.subsample(20, 2)
    assert a.lines == b.lines and a.lines != c.lines
    i = list(ds.lines["eng_Latn"]).index(a.lines["eng_Latn"][0])
    assert ds.lines["deu_Latn"][i] == a.lines["deu_Latn"][0]
    assert a.fingerprint() != ds.fingerprint()
