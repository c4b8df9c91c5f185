"""scripts/bench_fsdp.py end to end on a tiny GPT-2 (one block, vocabulary 64, width 8) at 1 and
2 ranks: a row for every implementation, AdamW as the baseline, VeLO's eager step with its 6
all-reduces, and the fused row either measured or "not available: <reason>"."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT, checkpoint_dir

pytestmark = [pytest.mark.fsdp, pytest.mark.slow]


def test_every_implementation_reported_at_each_rank_count(tmp_path):
    out = tmp_path / "rows.json"
    command = [sys.executable, os.path.join(ROOT, "scripts", "bench_fsdp.py"),
               "--ranks", "1", "2", "--layers", "1", "--vocab", "64", "--context", "16",
               "--width", "8", "--impls", "fused", "eager", "adamw", "--repeats", "2",
               "--weights", f"velo={checkpoint_dir('velo_small')}", "--json", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {(r["ranks"], r["impl"]): r for r in json.loads(out.read_text())}
    assert set(rows) == {(w, i) for w in (1, 2) for i in ("fused", "eager", "adamw")}
    for world in (1, 2):
        adamw, eager, fused = rows[world, "adamw"], rows[world, "eager"], rows[world, "fused"]
        # torch 2.13's fused AdamW steps FSDP2's CPU DTensors (aten._fused_adamw_ per shard).
        assert adamw["label"] == "AdamW(fused=True)"
        assert adamw["all_reduce_calls"] == 0 and len(adamw["step_ms"]) == 2
        assert eager["all_reduce_calls"] == 6 and eager["all_reduce_bytes"] > 0
        assert eager["other_collectives"] == {} and len(eager["step_ms"]) == 2
        assert eager["state_mib"] > 0 and eager["mem_mib"] >= eager["state_mib"]
        assert fused["available"] or fused["reason"].startswith("not available: ")
    assert "/ AdamW" in done.stdout
