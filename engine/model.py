"""The Qwen2.5-Omni thinker as we train it: audio encoder -> aligner -> LLM -> fused loss.

We build transformers' own `Qwen2_5OmniThinkerForConditionalGeneration` (so a checkpoint loads
as it is and an exported adapter loads onto the same class with PEFT), then:
- remove the vision encoder (`visual`, ~0.67B parameters at 7B) that the class always builds;
- freeze everything, put our LoRA layers into the LLM's attention and MLP projections;
- run our own forward: the LLM returns hidden states and the loss is the fused
  linear + cross-entropy of kernels/linear_cross_entropy.py on the target rows only, so the
  [tokens, 152k] logits are never materialized.
The talker and token2wav are never constructed.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.profiler import record_function
from transformers import Qwen2_5OmniThinkerConfig, Qwen2_5OmniThinkerForConditionalGeneration

from engine.attention import (apply_liger, llm_attention_mask, packed_hidden_states, resolve_attn_backend, resolve_liger,
                              set_attn_backend)
from engine.config import LoRAConfig, LossConfig, ModelConfig, ModelPathError
from engine.lora import apply_lora, apply_lora_grouping, lora_target_regex, resolve_lora_grouped
from engine.target_rows import TargetRowsOnly, last_layer_position_wise, target_rows
from engine.tokenizer import AUDIO_BOS, AUDIO_EOS, AUDIO_TOKEN, tiny_vocab_rows
from kernels.linear_cross_entropy import linear_cross_entropy
from loaders.tasks import TASKS

log = logging.getLogger("omnitrain")

IGNORE_INDEX = -100
# The thinker's rope-index code reads vision_start_token_id, which the thinker config alone
# does not define; Qwen2.5-Omni's value (DESIGN.md, known traps).
VISION_START_TOKEN_ID = 151652
MISSING_KEYS_SHOWN = 5  # weight names quoted in the error for a checkpoint that lacks some
# Mel bins of Qwen2.5-Omni's audio front end (WhisperFeatureExtractor(feature_size=128)).
NUM_MEL_BINS = 128

# The `tiny` preset: a few million parameters, every part of the real architecture
# (GQA, M-RoPE, windowed audio attention, the aligner projection), 2 audio + 4 LLM layers.
TINY_SHAPES = dict(
    text=dict(hidden_size=128, intermediate_size=352, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [4, 6, 6]},
              max_position_embeddings=4096),
    audio=dict(d_model=64, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=256, output_dim=128),
)
# Gain on top of PyTorch's default init of a random-init preset's audio input convolutions (see
# reinit_for_frozen_training). Measured on the demo set (train split, per-clip mean of the
# encoder's output tokens, token rms ~0.165): the between-dialect rms is 0.0076 at gain 1,
# 0.020 at 3, 0.029 at 4, 0.036 at 6, 0.038 at 10 (saturating: the clip content then outweighs
# the position signal); between-emotion 0.0086, 0.022, 0.030, 0.036. With LoRA on the LLM
# (lr 3e-3) DID and SER were learned from gain 3 up and not at all at gain 1; at 6 a short
# packed run (tests/engine/test_attention.py) no longer lowered its loss at every step.
RANDOM_INIT_AUDIO_CONV_GAIN = 4.0
# The real 7B thinker (Qwen2.5-Omni-7B's config.json), random init, for GPU benchmarks.
SEVEN_B_SHAPES = dict(
    text=dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
              num_key_value_heads=4, vocab_size=152064, rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
              max_position_embeddings=32768),
    audio=dict(d_model=1280, encoder_layers=32, encoder_attention_heads=20, encoder_ffn_dim=5120, output_dim=3584),
)
# The vision encoder is deleted right after construction: build the smallest one possible.
MINIMAL_VISION = dict(depth=1, hidden_size=32, intermediate_size=32, num_heads=2, out_hidden_size=32, fullatt_block_indexes=[0])


@dataclass
class ThinkerParts:
    """Where the parts live inside transformers' thinker (the layout moved across 5.x releases)."""

    audio_tower: nn.Module
    llm: nn.Module  # the text model: embed_tokens, layers, norm, rotary_emb
    lm_head: nn.Linear
    audio_path: str  # dotted names inside the thinker, used for LoRA patterns and adapter keys
    llm_path: str
    visual_owner: nn.Module | None


def locate_parts(thinker: nn.Module) -> ThinkerParts:
    inner = getattr(thinker, "model", None)
    if inner is not None and hasattr(inner, "language_model"):  # transformers >= 5.x layout
        return ThinkerParts(inner.audio_tower, inner.language_model, thinker.lm_head,
                            "model.audio_tower", "model.language_model", inner)
    if hasattr(thinker, "audio_tower"):  # flat layout: thinker.audio_tower, thinker.model = text model
        return ThinkerParts(thinker.audio_tower, thinker.model, thinker.lm_head, "audio_tower", "model", thinker)
    raise RuntimeError(f"unrecognised Qwen2.5-Omni thinker layout ({type(thinker).__name__}); "
                       "is this transformers' Qwen2_5OmniThinkerForConditionalGeneration?")


def remove_vision_encoder(thinker: nn.Module) -> None:
    parts = locate_parts(thinker)
    if parts.visual_owner is not None and hasattr(parts.visual_owner, "visual"):
        del parts.visual_owner.visual


def thinker_config(preset: str, tokenizer, attn_impl: str) -> Qwen2_5OmniThinkerConfig:
    shapes = {"tiny": TINY_SHAPES, "7b": SEVEN_B_SHAPES}.get(preset)
    if shapes is None:
        raise ValueError(f"model.preset={preset!r} is not a preset; use tiny or 7b, or set model.path to a checkpoint")
    text = dict(shapes["text"])
    text.setdefault("vocab_size", tiny_vocab_rows(tokenizer))
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in (AUDIO_TOKEN, AUDIO_BOS, AUDIO_EOS)}
    cfg = Qwen2_5OmniThinkerConfig(
        audio_config=dict(num_mel_bins=NUM_MEL_BINS, **shapes["audio"]),
        vision_config=dict(MINIMAL_VISION),
        text_config=dict(tie_word_embeddings=False, **text),
        audio_token_index=ids[AUDIO_TOKEN], audio_start_token_id=ids[AUDIO_BOS], audio_end_token_id=ids[AUDIO_EOS],
        # image/video ids outside the tiny vocabulary: no text token can be taken for one.
        image_token_index=151655, video_token_index=151656,
    )
    cfg.vision_start_token_id = VISION_START_TOKEN_ID
    cfg._attn_implementation = attn_impl
    return cfg


def build_thinker(cfg: ModelConfig, tokenizer, *, device: torch.device, dtype: torch.dtype, attn_impl: str = "sdpa"):
    """transformers' thinker from a preset (seeded random init) or a local checkpoint, vision removed."""
    if cfg.path:
        thinker = load_checkpoint_thinker(cfg.path, dtype=dtype, attn_impl=attn_impl)
        thinker.to(device)
    else:
        config = thinker_config(cfg.preset, tokenizer, attn_impl)
        torch.manual_seed(cfg.seed)
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            with torch.device(device):
                thinker = Qwen2_5OmniThinkerForConditionalGeneration._from_config(config, attn_implementation=attn_impl)
        finally:
            torch.set_default_dtype(previous)
        reinit_for_frozen_training(thinker)
    remove_vision_encoder(thinker)
    thinker.config.vision_start_token_id = VISION_START_TOKEN_ID
    return thinker


def reinit_for_frozen_training(thinker: nn.Module) -> None:
    """Random-init presets only: two parts that a LoRA run keeps frozen get an init under which
    a frozen random model can still learn.

    - The audio encoder's input convolutions get PyTorch's default init (std ~ 1/sqrt(fan_in))
      times RANDOM_INIT_AUDIO_CONV_GAIN, instead of transformers' N(0, 0.02). With N(0, 0.02)
      the clip content was ~1.6% of the encoder's output on the demo clips (the rest its fixed
      sinusoidal position signal): the frozen encoder hid the audio from the LLM. With the
      default init it was ~15%, still too little: a clip's dialect or emotion moved its mean
      audio token by under 5% of a token's rms, and LoRA on the LLM learned the majority label
      only (DID and SER val accuracy pinned at the majority rate with lr 1e-3 to 3e-2, rank 8
      or 32, label-balanced ADS batches, 300 DID-only steps), although a linear probe on the
      answer position separated the dialects. With the gain the content outweighs the
      position signal and both are learned (tests/loaders/test_learnable.py).
    - lm_head gets N(0, 1/hidden): after the final RMSNorm (|h| ~ sqrt(hidden)) a row of norm
      ~1 allows logits up to ~sqrt(hidden) (11 for the tiny model). With N(0, 0.02) the largest
      reachable logit was ~2.6, which caps the probability of any token at a few percent over
      the tiny vocabulary: the loss could not fall below ~3.4 whatever LoRA learned.
    """
    parts = locate_parts(thinker)
    tower = parts.audio_tower
    hidden = parts.lm_head.weight.shape[1]
    with torch.no_grad():
        for conv in (tower.conv1, tower.conv2):
            conv.reset_parameters()
            conv.weight.mul_(RANDOM_INIT_AUDIO_CONV_GAIN)
        parts.lm_head.weight.normal_(0.0, hidden ** -0.5)


def load_checkpoint_thinker(path: str, *, dtype: torch.dtype, attn_impl: str):
    """Load the thinker of a local Qwen2.5-Omni checkpoint without the vision tower's weights.

    Either layout loads: a full Qwen2.5-Omni checkpoint as published (keys under "thinker.",
    the talker's and token2wav's weights beside them, which are skipped) or a thinker saved
    alone. Every weight the thinker trains with must come from the checkpoint: transformers
    would initialise a missing one at random and only log it, and a LoRA run on a partly random
    base model trains without an error and learns nothing useful."""
    from transformers import AutoConfig

    folder = Path(path)
    if not folder.is_dir():
        raise ModelPathError(f"model.path={path} is not a folder; point it at a local Qwen2.5-Omni checkpoint")
    if not (folder / "config.json").exists():
        raise ModelPathError(f"model.path={path} has no config.json: not a Hugging Face checkpoint folder; point it at a "
                             "local Qwen2.5-Omni checkpoint (the folder downloaded from the hub)")
    if not any(folder.glob("*.safetensors")):
        raise ModelPathError(f"model.path={path} has no *.safetensors weight files (partial download?)")
    config = AutoConfig.from_pretrained(path)
    thinker_cfg = getattr(config, "thinker_config", config)
    # A one-block vision tower: the checkpoint's vision weights beyond it are skipped at load
    # instead of materializing 0.67B parameters we delete right after.
    thinker_cfg.vision_config.depth = 1
    thinker_cfg.vision_config.fullatt_block_indexes = [0]
    thinker_cfg.vision_start_token_id = VISION_START_TOKEN_ID
    try:
        thinker, info = Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(
            path, config=thinker_cfg, dtype=dtype, attn_implementation=attn_impl, output_loading_info=True)
    except (OSError, ValueError, RuntimeError) as e:
        raise ModelPathError(f"could not load the thinker from model.path={path}: {e}. Check that the folder holds a "
                             "complete Qwen2.5-Omni checkpoint (all shards listed in model.safetensors.index.json).") from e
    check_loaded_weights(path, thinker, info)
    return thinker


def check_loaded_weights(path: str, thinker: nn.Module, info: dict) -> None:
    """Refuse a load that left weights of the LLM, the audio encoder or lm_head at their random
    init (the vision tower is removed after loading: its weights do not matter)."""
    vision = "visual." if locate_parts(thinker).visual_owner is thinker else "model.visual."
    missing = [key for key in info.get("missing_keys", []) if not key.startswith(vision)]
    if missing:
        shown = ", ".join(sorted(missing)[:MISSING_KEYS_SHOWN])
        more = f" and {len(missing) - MISSING_KEYS_SHOWN} more" if len(missing) > MISSING_KEYS_SHOWN else ""
        raise ModelPathError(
            f"model.path={path}: {len(missing)} weight(s) of the thinker are not in the checkpoint ({shown}{more}); "
            "they would start from random values. Is the download complete (every shard of "
            "model.safetensors.index.json present), and is this a Qwen2.5-Omni checkpoint?")


class OmniLoRAModel(nn.Module):
    """The training module: forward(batch) -> summed loss over target tokens, per-task sums.

    It returns sums, not means: the trainer divides by the number of target tokens across
    all ranks and micro-batches, so every token weighs the same whatever the batch split.
    """

    def __init__(self, thinker: nn.Module, *, train_audio_encoder: bool, loss_cfg: LossConfig,
                 last_layer_on_targets: bool = True):
        super().__init__()
        self.thinker = thinker
        parts = locate_parts(thinker)
        self.parts = parts
        self.last_layer_rows = TargetRowsOnly(last_layer_position_wise(parts.llm)) if last_layer_on_targets else None
        self.train_audio_encoder = train_audio_encoder
        self.loss_cfg = loss_cfg
        self.audio_token_id = thinker.config.audio_token_id
        self.num_tasks = len(TASKS)

    # --- pieces -------------------------------------------------------------------------
    @property
    def audio_tower(self) -> nn.Module:
        return self.parts.audio_tower

    @property
    def llm(self) -> nn.Module:
        return self.parts.llm

    @property
    def lm_head(self) -> nn.Linear:
        return self.parts.lm_head

    def encode_audio(self, input_features: torch.Tensor | None, feature_attention_mask: torch.Tensor | None) -> torch.Tensor:
        """Audio tokens (aligner output) of every clip in the batch, concatenated: [sum n_i, H].

        With no audio in the batch a short silent clip is encoded and its output dropped: under
        FSDP every rank must run the encoder's collectives every step (DESIGN.md, known traps).
        """
        tower = self.audio_tower
        if input_features is None or input_features.shape[0] == 0:
            dummy = torch.zeros(1, NUM_MEL_BINS, 16, device=self.lm_head.weight.device, dtype=tower.conv1.weight.dtype)
            return self._run_tower(dummy, torch.ones(1, 16, dtype=torch.long, device=dummy.device))[:0]
        return self._run_tower(input_features, feature_attention_mask)

    def _run_tower(self, features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        tower = self.audio_tower
        lengths = mask.sum(dim=1)
        flat = features.permute(0, 2, 1)[mask.bool()].permute(1, 0).to(tower.conv1.weight.dtype)
        after_cnn, _ = tower._get_feat_extract_output_lengths(lengths)
        with torch.set_grad_enabled(self.train_audio_encoder and torch.is_grad_enabled()):
            return tower(flat, feature_lens=lengths, aftercnn_lens=after_cnn).last_hidden_state

    def embed(self, input_ids: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
        embeds = self.llm.embed_tokens(input_ids)
        slots = input_ids == self.audio_token_id
        n_slots = int(slots.sum())
        if n_slots != audio.shape[0]:
            raise ValueError(f"batch has {n_slots} {AUDIO_TOKEN} placeholders but the audio encoder produced "
                             f"{audio.shape[0]} audio tokens: the loader's audio-token count disagrees with the model's")
        return embeds.masked_scatter(slots.unsqueeze(-1), audio.to(embeds.dtype))

    def hidden_states(self, batch: dict, loss_rows: torch.Tensor | None = None) -> torch.Tensor:
        """The LLM's last hidden states [B, T, H]. With `loss_rows` (the loss's mask [B, T - 1],
        labels[:, 1:] != -100) they are right only at those rows: the last layer's o_proj and MLP
        skip the others (engine/target_rows.py). The rows stay set until the next call, for
        activation checkpointing's recomputation in backward."""
        if self.last_layer_rows is not None:
            self.last_layer_rows.rows = None if loss_rows is None else target_rows(loss_rows)
        if "cu_seqlens" in batch:  # packed row (loaders/packing.py): no 2-D mask, 4-row positions
            with record_function("forward.packed"):
                return packed_hidden_states(self, batch)
        with record_function("forward.audio_encoder"):
            audio = self.encode_audio(batch.get("input_features"), batch.get("feature_attention_mask"))
        with record_function("forward.llm"):
            embeds = self.embed(batch["input_ids"], audio)
            positions = text_position_ids(batch["attention_mask"])
            mask = llm_attention_mask(batch["attention_mask"], self.llm.config._attn_implementation)
            out = self.llm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions,
                           use_cache=False)
        return out.last_hidden_state

    # --- forward ------------------------------------------------------------------------
    # Everything runs through forward() so that FSDP's root hooks gather the root's weights
    # (lm_head) on every path: training, validation and decoding.
    def forward(self, batch: dict, mode: str = "train") -> dict | torch.Tensor:
        """mode "train": loss sums; "eval": the same plus first-target-token predictions;
        "next_token_logits": [B, V] fp32 logits at each row's last real position (decoding)."""
        if "cu_seqlens" in batch and mode != "train":
            raise ValueError(f"forward mode {mode!r} reads one sample per row; evaluate and decode on padded "
                             "batches (data.packing applies to training batches only)")
        if mode == "next_token_logits":
            hidden = self.hidden_states(batch)
            last = batch["attention_mask"].sum(dim=1) - 1
            rows = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
            return self.lm_head(rows).float()
        labels = batch["labels"][:, 1:]
        valid = labels != IGNORE_INDEX
        hidden = self.hidden_states(batch, loss_rows=valid)
        rows = hidden[:, :-1][valid]  # only target rows reach the 152k-wide lm_head
        targets = labels[valid]
        if "token_task_ids" in batch:  # packed: one task per token
            task_ids = batch["token_task_ids"][:, 1:][valid]
        else:
            task_ids = batch["task_ids"][:, None].expand_as(labels)[valid]
        with record_function("forward.loss"):
            loss_sum, n_valid, per_task = linear_cross_entropy(
                rows, self.lm_head.weight, targets, task_ids=task_ids, num_tasks=self.num_tasks,
                z_loss=self.loss_cfg.z_loss, label_smoothing=self.loss_cfg.label_smoothing, impl=self.loss_cfg.impl)
        per_task_count = torch.bincount(task_ids, minlength=self.num_tasks)
        out = {"loss_sum": loss_sum, "n_valid": n_valid, "per_task_loss_sum": per_task, "per_task_count": per_task_count}
        if mode == "eval":
            out.update(self._first_target_predictions(hidden, labels, valid))
        elif mode != "train":
            raise ValueError(f"unknown forward mode {mode!r}; use train, eval or next_token_logits")
        return out

    def _first_target_predictions(self, hidden: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor) -> dict:
        """Teacher-forced prediction of each row's first target token (the label's first token
        for DID/SER): [B] predicted ids, [B] target ids (-100 for rows without a target)."""
        has_target = valid.any(dim=1)
        first = valid.float().argmax(dim=1)
        b = torch.arange(hidden.shape[0], device=hidden.device)
        logits = self.lm_head(hidden[:, :-1][b, first])
        predicted = logits.argmax(dim=-1)
        target = torch.where(has_target, labels[b, first], torch.full_like(first, IGNORE_INDEX))
        return {"first_pred": predicted, "first_target": target}

    @torch.no_grad()
    def logits(self, batch: dict) -> torch.Tensor:
        """Full logits [B, T, V] for inspection and tests of an unsharded model (never in training)."""
        return self.lm_head(self.hidden_states(batch)).float()


def text_position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """M-RoPE positions [3, B, T] of audio + text input (no images or video).

    For audio and text the thinker's rope index is one running position per real token on
    all three axes (audio tokens advance by one like text), padding at 0; tested against
    transformers' `get_rope_index`.
    """
    pos = attention_mask.long().cumsum(-1) - 1
    pos = pos.masked_fill(attention_mask == 0, 0)
    return pos.unsqueeze(0).expand(3, -1, -1)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    table = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}
    if name not in table:
        raise ValueError(f"model.dtype={name!r}; use auto, bf16, fp16 or fp32")
    return table[name]


def build_model(mcfg: ModelConfig, lcfg: LoRAConfig, loss_cfg: LossConfig, tokenizer, device: torch.device) -> OmniLoRAModel:
    """Thinker (vision removed), frozen, with our LoRA layers in the LLM; nothing sharded yet."""
    dtype = resolve_dtype(mcfg.dtype, device)
    backend = resolve_attn_backend(mcfg.attn_backend, device)
    # Built with sdpa, then switched: transformers' own check of flash-attn at construction
    # does not know our torch varlen implementation.
    thinker = build_thinker(mcfg, tokenizer, device=device, dtype=dtype, attn_impl="sdpa")
    set_attn_backend(thinker, backend)
    thinker.requires_grad_(False)
    parts = locate_parts(thinker)
    if mcfg.train_audio_encoder:
        parts.audio_tower.requires_grad_(True)
        # Defined by transformers' encoder but never used in its forward: a trainable parameter
        # without a gradient has no optimizer state, and resuming the optimizer would fail on it.
        parts.audio_tower.audio_bos_eos_token.requires_grad_(False)
        parts.audio_tower.float()
    pattern = lora_target_regex(parts.llm_path + ".layers", lcfg.targets)
    torch.manual_seed(mcfg.seed + 1)
    replaced = apply_lora(thinker, pattern, lcfg.rank, lcfg.alpha, lcfg.dropout, lcfg.impl)
    if resolve_liger(mcfg.liger, device):
        apply_liger(parts.llm)  # after LoRA: its SwiGLU calls the LoRA-wrapped projections
    grouping = group_lora(parts.llm, lcfg)  # after Liger: the grouped MLP replaces its SwiGLU
    model = OmniLoRAModel(thinker, train_audio_encoder=mcfg.train_audio_encoder, loss_cfg=loss_cfg,
                          last_layer_on_targets=mcfg.last_layer_on_targets)
    if mcfg.last_layer_on_targets:
        log.info("model: the last LLM layer's o_proj and MLP run on target rows only (model.last_layer_on_targets)")
    model.lora_pattern = pattern
    model.lora_modules = replaced
    model.lora_grouping = grouping
    return model


def group_lora(llm: nn.Module, lcfg: LoRAConfig) -> dict[str, int]:
    """`lora.grouped`: q/k/v and gate/up/down as grouped kernel calls where the targets allow it."""
    layers = len(llm.layers)
    if not resolve_lora_grouped(lcfg.grouped):
        log.info("LoRA: impl=%s, per-projection (lora.grouped=false)", lcfg.impl)
        return {"qkv": 0, "mlp": 0}
    made = apply_lora_grouping(llm.layers, llm.config.hidden_act)
    if lcfg.grouped in (True, "true") and not any(made.values()):
        raise ValueError(f"lora.grouped=true but no layer can be grouped with lora.targets={lcfg.targets}: grouping "
                         "needs all of q_proj, k_proj, v_proj or all of gate_proj, up_proj, down_proj; add them, or "
                         "set lora.grouped=auto or false")
    log.info("LoRA: impl=%s, grouped q/k/v in %d/%d layers, grouped gate/up/down in %d/%d layers",
             lcfg.impl, made["qkv"], layers, made["mlp"], layers)
    return made


def count_parameters(model: nn.Module) -> dict:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"total": total, "trainable": trainable}
