"""`vibecast bench --context-minutes`: a long take in `context` mode keeps flat memory (its
window slides; each turn's frame embeddings leave with the turn) and reports its rebuilds."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from vibevoice_helpers import TINY


def test_a_long_take_in_context_mode_keeps_flat_memory(tmp_path: Path) -> None:
    out = tmp_path / "context.json"
    cmd = [
        sys.executable,
        "-c",
        "from vibecast.cli import main; main()",
        "bench",
        "--model",
        str(TINY),
        "--device",
        "cpu",
        "--dtype",
        "float32",
        "--context-minutes",
        "10",
        "--frames-per-turn",
        "100",
        "--steps",
        "1",
        "--json",
        str(out),
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr
    assert "ms per turn" in r.stdout
    result = json.loads(out.read_text())
    assert result["minutes"] == 10 and result["turns"] == 45
    assert [s["minute"] for s in result["samples"]] == list(range(1, 11))
    # The window (2048 positions on CPU) holds about 15 turns of 100 frames: it slid.
    assert result["rebuilds"] >= 3
    assert result["rebuild_prefill_s"] > 0 and result["rebuild_ms_per_turn"] > 0
    assert result["rss_growth_from_minute_5"] < 0.10
