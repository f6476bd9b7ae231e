"""Train the reference SentencePiece tokenizer and wrap it as an NLLB-style HF tokenizer.

Usage:
    python recipes/train_tokenizer.py --config recipes/configs/tokenizer.yaml

Reads the Multi30k training text of every configured language, trains a SentencePiece
model and saves it as an ``NllbTokenizer`` (``src_lang``/``tgt_lang``
with ``eng_Latn``-style language tokens) that plain ``AutoTokenizer`` loads.
"""

from __future__ import annotations

import argparse
import gzip
import random
import tempfile
from pathlib import Path

import sentencepiece as spm
import yaml
from transformers import NllbTokenizer


def read_lines(path: Path) -> list[str]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]


def train(cfg: dict) -> Path:
    data_dir = Path(cfg["data_dir"])
    out_dir = Path(cfg["output_dir"])
    out_dir.mkdir(parents=True, exist_ok=True)
    lines: list[str] = []
    for short in cfg["languages"].values():
        lines += read_lines(data_dir / f"train.{short}.gz")
    random.Random(cfg.get("seed", 0)).shuffle(lines)
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.txt"
        corpus.write_text("\n".join(lines), encoding="utf-8")
        prefix = Path(tmp) / "spm"
        spm.SentencePieceTrainer.train(
            input=str(corpus),
            model_prefix=str(prefix),
            model_type=cfg.get("model_type", "bpe"),
            vocab_size=cfg["vocab_size"],
            character_coverage=cfg.get("character_coverage", 1.0),
            # NLLB's SPM layout (<unk>, <s>, </s> first); the HF converter maps it to
            # <s>=0 <pad>=1 </s>=2 <unk>=3 and appends the language codes.
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=-1,
            seed_sentencepiece_size=200000,
            num_threads=2,
            minloglevel=2,
        )
        spm_path = out_dir / "sentencepiece.bpe.model"
        spm_path.write_bytes(prefix.with_suffix(".model").read_bytes())
    codes = list(cfg["languages"].keys())
    tok = NllbTokenizer.from_pretrained(
        str(out_dir), additional_special_tokens=codes, src_lang=codes[0], tgt_lang=codes[1]
    )
    tok.save_pretrained(str(out_dir))
    check_round_trip(tok, lines[:2000])
    # Keep the raw SPM: it is the local SentencePiece model for spBLEU on the demo (the
    # flores200 SPM cannot be downloaded everywhere); metrics record its hash in the signature.
    spm_keep = Path(cfg["spm_output"])
    spm_keep.parent.mkdir(parents=True, exist_ok=True)
    (out_dir / "sentencepiece.bpe.model").replace(spm_keep)
    return out_dir


def check_round_trip(tok: NllbTokenizer, lines: list[str]) -> None:
    """Fail loudly if the converted HF tokenizer does not reproduce its training text."""
    bad = [s for s in lines if tok.decode(tok(s)["input_ids"], skip_special_tokens=True) != s]
    if len(bad) > len(lines) // 100:
        raise SystemExit(f"tokenizer round-trip failed on {len(bad)}/{len(lines)} lines, e.g. {bad[0]!r}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="YAML with data_dir, output_dir, languages, vocab_size")
    args = ap.parse_args()
    cfg = yaml.safe_load(Path(args.config).read_text())
    out = train(cfg)
    print(f"tokenizer saved to {out}")


if __name__ == "__main__":
    main()
