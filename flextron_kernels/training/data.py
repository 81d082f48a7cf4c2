"""Training data: text files, a byte-level tokenizer (or a Hugging Face one from a local
path), and packed fixed-length sequences."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Optional, Sequence

import torch


class ByteTokenizer:
    """UTF-8 bytes as tokens (0-255) and an end-of-document token (256)."""

    vocab_size = 257
    eos_token_id = 256

    def encode(self, text: str) -> list:
        return list(text.encode("utf-8"))

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


def load_tokenizer(name_or_path: Optional[str]):
    """``None`` or ``"byte"``: :class:`ByteTokenizer`; else a Hugging Face tokenizer from a local path."""
    if name_or_path in (None, "byte"):
        return ByteTokenizer()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(name_or_path), local_files_only=True)


def find_files(paths: Sequence, pattern: str = "*") -> list:
    """The files named, and those under the folders named that match ``pattern``, sorted."""
    if not paths:
        raise ValueError("data: expected at least one file or folder, got none")
    files = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(f for f in p.rglob(pattern) if f.is_file())
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"data: no such file or folder: {str(p)!r}")
    return files


def tokenize_files(files: Sequence, tokenizer, *, max_bytes: Optional[int] = None) -> torch.Tensor:
    """All documents as one stream of token ids (int64), each followed by the end token."""
    eos = getattr(tokenizer, "eos_token_id", None)
    ids, total = [], 0
    for f in files:
        text = Path(f).read_text(encoding="utf-8", errors="replace")
        if not text.strip():
            continue
        ids += tokenizer.encode(text) + ([eos] if eos is not None else [])
        total += len(text)
        if max_bytes is not None and total >= max_bytes:
            break
    if not ids:
        raise ValueError(f"data: the corpus is empty ({len(files)} file(s), no text)")
    return torch.tensor(ids, dtype=torch.int64)


class PackedSequences:
    """A token stream cut into ``[N, seq_len + 1]`` rows (inputs and next-token targets)."""

    def __init__(self, stream: torch.Tensor, seq_len: int):
        rows = (stream.numel() - 1) // seq_len
        if rows < 1:
            raise ValueError(f"data: {stream.numel()} tokens cannot fill one sequence of {seq_len + 1}")
        self.seq_len = seq_len
        starts = torch.arange(rows) * seq_len
        self.rows = torch.stack([stream[s : s + seq_len + 1] for s in starts.tolist()])

    def __len__(self) -> int:
        return self.rows.shape[0]

    def batch(self, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        """``[batch_size, seq_len + 1]`` rows drawn with ``generator``."""
        index = torch.randint(0, len(self), (batch_size,), generator=generator)
        return self.rows[index]

    def split(self, fraction: float) -> tuple:
        """(train, validation) with the last ``fraction`` of the rows held out."""
        held = max(1, int(round(len(self) * fraction)))
        if held >= len(self):
            raise ValueError(f"data: {len(self)} sequences are too few to hold out {fraction:.0%} for validation")
        train, val = object.__new__(PackedSequences), object.__new__(PackedSequences)
        train.seq_len = val.seq_len = self.seq_len
        train.rows, val.rows = self.rows[:-held], self.rows[-held:]
        return train, val


def stdlib_sources(limit_bytes: int = 4_000_000) -> list:
    """Python's standard library sources (a corpus every machine with Python has)."""
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    files, total = [], 0
    for f in sorted(root.glob("*.py")):
        files.append(f)
        total += f.stat().st_size
        if total >= limit_bytes:
            break
    return files
