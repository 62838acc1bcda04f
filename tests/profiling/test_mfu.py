"""The MFU formula (engine/metrics.py) against a hand computation on the tiny preset.

Every count below is derived by hand from TINY_SHAPES (engine/model.py) and the default LoRA
config (rank 8 on q/k/v/o/gate/up/down), then the step FLOPs and MFU of a known batch are
computed from those counts with the formula written in engine/metrics.py's docstring.
"""
import json

import pytest
import torch

from engine.config import LoRAConfig, LossConfig, ModelConfig
from engine.metrics import batch_flops_inputs, device_peak_flops, flops_model_of
from engine.model import build_model
from engine.tokenizer import build_tiny_tokenizer

# --- the tiny preset by hand -------------------------------------------------------------
H, I, LAYERS, HEADS, KV_HEADS = 128, 352, 4, 4, 2
HEAD_DIM = H // HEADS  # 32
KV = KV_HEADS * HEAD_DIM  # 64
R = 8
# LLM linear weights per layer (biases are 1-D and not counted):
#   q 128x128 = 16384, k 128x64 = 8192, v 128x64 = 8192, o 128x128 = 16384,
#   gate/up 128x352 = 45056 each, down 352x128 = 45056          -> 184320 per layer
N_LLM = LAYERS * (H * H + H * KV + H * KV + H * H + 3 * H * I)
assert N_LLM == 4 * 184320 == 737280
# LoRA A [r, in] + B [out, r] per projection: q 8*(128+128) = 2048, k/v 8*(128+64) = 1536,
# o 2048, gate/up 8*(128+352) = 3840, down 8*(352+128) = 3840       -> 18688 per layer
N_LORA = LAYERS * R * ((H + H) + 2 * (H + KV) + (H + H) + 2 * (H + I) + (I + H))
assert N_LORA == 4 * 18688 == 74752
# The last layer's o_proj and MLP (useful on target rows only: engine/target_rows.py):
#   o 16384 + gate/up/down 3 * 45056 = 151552; their adapters o 2048 + 3 * 3840 = 13568
N_LLM_LAST = H * H + 3 * H * I
N_LORA_LAST = R * (H + H) + 2 * R * (H + I) + R * (I + H)
assert (N_LLM_LAST, N_LORA_LAST) == (151552, 13568)
# Audio encoder (d_model 64, 2 layers, ffn 256, 128 mel bins, output 128):
#   conv1 128->64 k3: 24576 + 64; conv2 64->64 k3: 12288 + 64            = 36992
#   per layer: q/k/v/o 4*4096 + biases of q, v, o 3*64; two layer norms 2*(64+64);
#              fc1 64*256 + 256; fc2 256*64 + 64                          = 49920, x2 = 99840
#   ln_post 64+64 = 128; proj 64->128: 8192 + 128 = 8320; audio bos/eos embedding 2*128 = 256
N_ENCODER = (128 * 64 * 3 + 64 + 64 * 64 * 3 + 64) + 2 * (4 * 64 * 64 + 3 * 64 + 2 * 128 + 64 * 256 + 256 + 256 * 64 + 64) \
    + 128 + (64 * 128 + 128) + 2 * 128
assert N_ENCODER == 145536
VOCAB = 384  # 360 tokens rounded up to a multiple of 64 (engine/tokenizer.py)


@pytest.fixture(scope="module")
def tiny_flops():
    model = build_model(ModelConfig(preset="tiny"), LoRAConfig(), LossConfig(), build_tiny_tokenizer(), torch.device("meta"))
    return flops_model_of(model)


def test_parameter_counts_of_the_flops_model_match_the_hand_counts(tiny_flops):
    assert tiny_flops.n_llm == N_LLM
    assert tiny_flops.n_lora == N_LORA
    assert tiny_flops.n_encoder == N_ENCODER
    assert (tiny_flops.n_llm_last, tiny_flops.n_lora_last) == (N_LLM_LAST, N_LORA_LAST)
    assert (tiny_flops.n_layers, tiny_flops.attn_dim, tiny_flops.hidden, tiny_flops.vocab) == (LAYERS, HEADS * HEAD_DIM, H, VOCAB)


def known_batch() -> dict:
    """Two rows: 10 and 6 real tokens (4 padding), targets 3 + 2, mel frames 40 and 21."""
    attention = torch.tensor([[1] * 10, [1] * 6 + [0] * 4])
    labels = torch.full((2, 10), -100)
    labels[0, 7:10] = 5  # positions 7, 8, 9 -> after the shift 3 targets
    labels[1, 4:6] = 6   # positions 4, 5 -> 2 targets
    features_mask = torch.zeros(2, 40, dtype=torch.long)
    features_mask[0, :40] = 1
    features_mask[1, :21] = 1
    return {"attention_mask": attention, "labels": labels, "feature_attention_mask": features_mask}


def test_step_flops_and_mfu_of_a_known_batch_match_the_hand_computation(tiny_flops):
    inputs = batch_flops_inputs(known_batch())
    # T = 10 + 6 = 16 real tokens; sum s^2 = 100 + 36 = 136; targets 3 + 2 = 5;
    # encoder positions after the stride-2 conv: (40-1)//2+1 = 20 and (21-1)//2+1 = 11 -> 31
    assert inputs == {"tokens": 16, "sum_sq_lengths": 136, "target_tokens": 5, "encoder_positions": 31}
    # frozen LLM weights, forward + input gradient: the last layer's o_proj and MLP on the 5 target
    # rows only, the rest on all 16: 4 * 585728 * 16 + 4 * 151552 * 5
    linear = 37_486_592 + 3_031_040   # 40,517,632
    lora = 5_873_664 + 407_040        # 6,280,704    adapters: 6 * 61184 * 16 + 6 * 13568 * 5
    attention = 6 * 4 * 128 * 136     # 417,792      causal QK^T and AV, forward and backward
    head = 4 * 128 * 384 * 5          # 983,040      lm_head on the 5 target rows only
    encoder = 2 * 145536 * 31         # 9,023,232    frozen audio encoder, forward only
    by_hand = linear + lora + attention + head + encoder
    assert by_hand == 57_222_400
    assert tiny_flops.step_flops(**inputs) == by_hand
    # MFU as the trainer logs it: FLOPs / seconds / world size / peak. 57,222,400 FLOPs in 0.5 s on
    # 2 ranks of a 1e-4 TFLOP/s (1e8 FLOP/s) device: 57,222,400 / 0.5 / 2 / 1e8 = 0.572224
    peak = device_peak_flops(torch.device("cpu"), override_tflops=1e-4)
    assert peak == pytest.approx(1e8)
    assert by_hand / 0.5 / 2 / peak == pytest.approx(0.572224)


def test_no_mfu_without_a_known_peak():
    assert device_peak_flops(torch.device("cpu")) is None


def test_bench_train_mfu_uses_the_same_formula(tmp_path):
    """bench_train's MFU: FLOPs of the timed steps / timed seconds / processes / peak."""
    from profiling.bench_train import summarize_variant

    memory = {"peak_gib": 1.0}
    for rank, (times, tokens) in enumerate([([9.0, 0.5, 0.25], [100, 40, 60]), ([9.0, 0.25, 0.5], [90, 30, 50])]):
        result = {"variant": "ours", "rank": rank, "world_size": 2, "device": "test", "peak_flops": 1e9,
                  "step_s": times, "step_tokens": tokens, "first_loss": 1.0, "memory": memory}
        (tmp_path / f"ours-rank{rank}.json").write_text(json.dumps(result))
    flops = [5e9, 2e9, 1e9]  # per step, all ranks
    out = summarize_variant("ours", tmp_path, nproc=2, warmup=1, flops=flops)
    # timed: steps 2-3; slowest rank 0.75 s; tokens 40+60+30+50 = 180; FLOPs 3e9
    assert out["timed_s"] == pytest.approx(0.75)
    assert out["tokens_timed"] == 180 and out["tokens_total"] == 370
    assert out["tokens_per_s"] == pytest.approx(180 / 0.75)
    assert out["mfu"] == pytest.approx(3e9 / 0.75 / 2 / 1e9)
