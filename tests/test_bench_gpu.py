"""bench/gpu.py at toy size on CPU: every row (case x side) measured, with sane fields; the same losses on
every side of a case (the same weights and batches), the MFU formula its docstring states. The rows run in the
script's own process (`--in-process`: one import instead of nine; docs/results/gpu-toy.json is a run with a
process per row), torch.compile left out (tests/test_speed.py trains with it)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from tunelab.data.stream import BatchStream

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import gpu  # noqa: E402  (bench/gpu.py: a script, not a package)


def test_documents_pack_into_rows_of_exactly_t_tokens():
    seq, batch, steps = 128, 2, 5
    docs = gpu.documents(batch * steps, seq, vocab=512, seed=1)
    assert sum(len(d.input_ids) for d in docs) == batch * steps * seq
    assert {len(d.input_ids) for d in docs} <= {seq >> k for k in range(6)}
    stream = BatchStream(docs, batch_size=batch, packing=True, max_length=seq, seed=0, pad_id=0)
    for mb in stream.next_group(steps):
        assert mb.tensors["input_ids"].shape == (batch, seq) and mb.n_real == batch * seq  # full rows, no padding


@pytest.mark.slow
def test_toy_run_writes_every_row_with_sane_fields(tmp_path):
    out = tmp_path / "gpu-toy.json"
    args = ["--toy", "--steps", "1", "--warmup", "1", "--switches", "attention,liger,fused", "--peak-tflops", "1",
            "--in-process", "--json", str(out)]
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu.py"), *args], capture_output=True, text=True,
                          timeout=1800, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    rows = {(r["case"], r["side"]): r for r in result["rows"]}
    assert sorted(rows) == sorted((c, s) for c in gpu.CASES for s in gpu.SIDES)
    assert result["machine"]["packages"]["torch"] and result["settings"]["toy"] is True
    hf = {case: gpu.shape_config(gpu.CASES[case][0], toy=True, seq=128) for case in gpu.CASES}
    for (case, side), r in rows.items():
        assert r["status"] == "ok", (case, side, r["status"])
        assert r["tokens_per_s"] > 0 and r["step_seconds"] > 0 and r["peak_memory_bytes"] > 2**20
        assert len(r["losses"]) == 2 and all(math.isfinite(x) for x in r["losses"])
        c = hf[case]
        flops = 6 * r["params_matmul"] + 12 * c.num_hidden_layers * c.hidden_size * 128
        assert math.isclose(r["mfu"], flops * r["tokens_per_s"] / 1e12, rel_tol=1e-9) and 0 < r["mfu"] < 1
        if gpu.CASES[case][1] == "full":
            assert r["params_trained"] == r["params_matmul"] and r["mfu_needed"] == pytest.approx(r["mfu"])
        else:
            assert 0 < r["params_trained"] < r["params_matmul"] and r["mfu_needed"] < r["mfu"]
        # the same weights and batches on every side: the same first loss, and the same after a step (fp32 on CPU;
        # the full toy run agrees to 3e-5 over 4 steps, docs/results/gpu.md)
        plain = rows[(case, "plain")]["losses"]
        assert r["first_loss"] == pytest.approx(plain[0], abs=1e-4)
        assert r["losses"] == pytest.approx(plain, abs=1e-3)
    fast = rows[("lora-8b", "fast")]
    assert fast["switches"] == ["attention", "fused", "liger"]
    assert any("train.liger=true" in n for n in fast["notes"]) and fast["attention"] == "sdpa"
    assert "lora-8b" in done.stdout and "wrote" in done.stdout
