"""Convert CLIP's BPE merges file into Hugging Face ``CLIPTokenizer`` files.

The source is OpenAI CLIP's ``bpe_simple_vocab_16e6.txt.gz`` (MIT licensed), which
is shipped inside the ``open_clip_torch`` wheel. Usage::

    pip download --no-deps open_clip_torch==3.3.0 -d /tmp/oc
    python scripts/convert_clip_bpe.py /tmp/oc/open_clip_torch-3.3.0-py3-none-any.whl \
        coerasing/assets/clip_tokenizer

The source may also be the bare ``.txt.gz`` file (then no license file is copied).
The vocabulary is built exactly as CLIP's reference ``SimpleTokenizer`` builds it:
256 byte symbols, the same with ``</w>``, one token per merge, then the two
special tokens, for 49408 entries in total.
"""

from __future__ import annotations

import argparse
import gzip
import json
import zipfile
from pathlib import Path

BPE_MEMBER = "open_clip/bpe_simple_vocab_16e6.txt.gz"
LICENSE_SUFFIX = ".dist-info/licenses/LICENSE"
VOCAB_SIZE = 49408
NUM_MERGES = VOCAB_SIZE - 2 * 256 - 2  # 48894
BOS = "<|startoftext|>"
EOS = "<|endoftext|>"


def bytes_to_unicode() -> dict[int, str]:
    """Map each byte to a printable unicode symbol, as GPT-2/CLIP byte-level BPE does."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    byte_values = printable[:]
    code_points = printable[:]
    extra = 0
    for b in range(256):
        if b not in byte_values:
            byte_values.append(b)
            code_points.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(byte_values, code_points, strict=True)}


def read_merges(bpe_gz: bytes) -> list[tuple[str, str]]:
    """Return the first ``NUM_MERGES`` merges (the header line is skipped)."""
    lines = gzip.decompress(bpe_gz).decode("utf-8").split("\n")
    selected = lines[1 : NUM_MERGES + 1]
    if len(selected) != NUM_MERGES:
        raise ValueError(f"expected {NUM_MERGES} merges, found {len(selected)}")
    merges: list[tuple[str, str]] = []
    for line in selected:
        parts = line.split()
        if len(parts) != 2:
            raise ValueError(f"malformed merge line: {line!r}")
        merges.append((parts[0], parts[1]))
    return merges


def build_vocab(merges: list[tuple[str, str]]) -> dict[str, int]:
    """Build the token -> id mapping in CLIP's order."""
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols]
    tokens += ["".join(m) for m in merges]
    tokens += [BOS, EOS]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE:
        raise ValueError(f"vocab has {len(vocab)} unique entries, expected {VOCAB_SIZE}")
    return vocab


def _special(content: str) -> dict[str, object]:
    return {
        "content": content,
        "lstrip": False,
        "normalized": True,
        "rstrip": False,
        "single_word": False,
    }


def tokenizer_config() -> dict[str, object]:
    """``tokenizer_config.json`` mirroring Stable Diffusion v1.4's tokenizer."""
    return {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": 77,
        "bos_token": BOS,
        "eos_token": EOS,
        "unk_token": EOS,
        "pad_token": EOS,
        "add_prefix_space": False,
        "do_lower_case": True,
        "errors": "replace",
        "clean_up_tokenization_spaces": True,
        "added_tokens_decoder": {
            str(VOCAB_SIZE - 2): {**_special(BOS), "special": True},
            str(VOCAB_SIZE - 1): {**_special(EOS), "special": True},
        },
    }


def special_tokens_map() -> dict[str, object]:
    """``special_tokens_map.json`` mirroring Stable Diffusion v1.4's tokenizer."""
    return {
        "bos_token": _special(BOS),
        "eos_token": _special(EOS),
        "unk_token": _special(EOS),
        "pad_token": EOS,
    }


def _write_json(path: Path, obj: object) -> None:
    path.write_text(json.dumps(obj, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")


def convert(source: Path, out_dir: Path) -> None:
    """Read merges (and license, for a wheel) from ``source`` and write tokenizer files."""
    license_text: str | None = None
    if source.suffix == ".whl":
        with zipfile.ZipFile(source) as whl:
            bpe_gz = whl.read(BPE_MEMBER)
            for name in whl.namelist():
                if name.endswith(LICENSE_SUFFIX):
                    license_text = whl.read(name).decode("utf-8")
                    break
    else:
        bpe_gz = source.read_bytes()

    merges = read_merges(bpe_gz)
    vocab = build_vocab(merges)

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.json").write_text(
        json.dumps(vocab, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    merges_text = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)
    (out_dir / "merges.txt").write_text(merges_text, encoding="utf-8")
    _write_json(out_dir / "tokenizer_config.json", tokenizer_config())
    _write_json(out_dir / "special_tokens_map.json", special_tokens_map())
    if license_text is not None:
        (out_dir / "LICENSE-open_clip.txt").write_text(license_text, encoding="utf-8")


def main() -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="open_clip_torch wheel or bpe .txt.gz")
    parser.add_argument("out_dir", type=Path, help="output tokenizer folder")
    args = parser.parse_args()
    convert(args.source, args.out_dir)
    print(f"wrote tokenizer files to {args.out_dir}")


if __name__ == "__main__":
    main()
