"""profiling/bench_lora.py on CPU at a few tokens: every candidate of every layer is timed
(PEFT, the GEMM bound, the reference and the engine's CPU path lora.impl=torch), the JSON and
the CSV rows agree, and the ratios are computed against the named baselines."""
import csv
import json

from profiling import bench_lora


def test_bench_lora_times_every_candidate_and_writes_json_and_csv(tmp_path):
    out, table = tmp_path / "bench_lora.json", tmp_path / "bench_lora.csv"
    rows = bench_lora.main(["--tokens", "37", "--dropout", "0.1", "--json", str(out), "--csv", str(table)])
    layers = ["q_proj", "k_proj", "gate_proj", "down_proj", "qkv", "mlp"]
    impls = {layer: {r["impl"] for r in rows if r["layer"] == layer} for layer in layers}
    for layer in layers:
        assert {"peft", "gemm_bound", "torch"} <= impls[layer], (layer, impls[layer])
    assert "reference" in impls["q_proj"] and "reference" in impls["mlp"]
    for r in rows:
        assert r["ms"] > 0 and r["tokens"] == 37 and r["dropout"] == 0.1
        bound = next(b["ms"] for b in rows if b["layer"] == r["layer"] and b["impl"] == "gemm_bound")
        assert abs(r["x_gemm_bound"] - r["ms"] / bound) < 0.01 * r["x_gemm_bound"] + 1e-3
    saved = json.loads(out.read_text())
    assert len(saved["rows"]) == len(rows)
    with table.open() as f:
        assert len(list(csv.DictReader(f))) == len(rows)
