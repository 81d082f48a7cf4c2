"""The latency lookup table: measured latency per layer kind x width choice x phase x token count.

Written by ``flextron bench --lut PATH``; read by router training and by
``FlextronForCausalLM.cost`` once loaded. JSON layout::

    {"format": "flextron-latency-table/1", "environment": {...}, "model": {...},
     "entries": [{"kind": "mlp" | "attention", "choice": int, "phase": "prefill" | "decode",
                  "tokens": int, "ms": float}, ...]}

``choice`` is an MLP width (neurons) or a query-head count; ``tokens`` is the number of
tokens in the call (prefill) or the batch size (decode, one token per request).
"""

from __future__ import annotations

import bisect
import json
from collections import defaultdict
from pathlib import Path

FORMAT = "flextron-latency-table/1"
KINDS = ("mlp", "attention")
PHASES = ("prefill", "decode")


class LatencyTable:
    """Latencies in milliseconds, looked up by ``(kind, choice, phase, tokens)``; token
    counts between measured ones are interpolated linearly (and extrapolated
    proportionally beyond the largest)."""

    def __init__(self, entries: list, *, model: dict | None = None, environment: dict | None = None):
        self.model, self.environment = model or {}, environment or {}
        self._points = defaultdict(list)
        for e in entries:
            if e["kind"] not in KINDS or e["phase"] not in PHASES:
                raise ValueError(f"latency table entry: unknown kind/phase in {e}")
            self._points[(e["kind"], int(e["choice"]), e["phase"])].append((int(e["tokens"]), float(e["ms"])))
        for points in self._points.values():
            points.sort()
        self.entries = entries

    @classmethod
    def load(cls, path) -> "LatencyTable":
        data = json.loads(Path(path).read_text())
        if data.get("format") != FORMAT:
            raise ValueError(f"{path}: expected a latency table of format {FORMAT!r}, got {data.get('format')!r}")
        return cls(data["entries"], model=data.get("model"), environment=data.get("environment"))

    def save(self, path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {"format": FORMAT, "environment": self.environment, "model": self.model, "entries": self.entries}
        path.write_text(json.dumps(payload, indent=2) + "\n")
        return path

    def choices(self, kind: str, phase: str) -> list[int]:
        return sorted({c for (k, c, p) in self._points if k == kind and p == phase})

    def latency(self, kind: str, choice: int, phase: str, tokens: int) -> float:
        """Milliseconds for one layer's ``kind`` at ``choice`` over ``tokens`` tokens."""
        points = self._points.get((kind, int(choice), phase))
        if not points:
            raise KeyError(f"latency table: no entry for kind={kind!r}, choice={choice}, phase={phase!r} "
                           f"(measured choices: {self.choices(kind, phase)})")
        counts = [t for t, _ in points]
        i = bisect.bisect_left(counts, tokens)
        if i < len(points) and counts[i] == tokens:
            return points[i][1]
        if i == 0:
            return points[0][1]
        if i == len(points):
            t, ms = points[-1]
            return ms * tokens / t
        (t0, m0), (t1, m1) = points[i - 1], points[i]
        return m0 + (m1 - m0) * (tokens - t0) / (t1 - t0)
