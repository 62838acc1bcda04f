"""Checkpoints that survive a crash mid-save, PEFT adapters that reproduce our logits, and a
loss that falls when the same batch is trained on repeatedly. In-process, one rank."""
import pytest
import torch

from engine import checkpoint as ckpt
from engine.config import load_config
from engine.lora import load_adapter_into
from engine.model import build_model, build_thinker
from engine.parallel import apply_parallelism, init_distributed
from engine.tokenizer import build_tiny_tokenizer
from engine.trainer import Trainer
from synthetic_batches import FixedStream, make_batch
from torch.distributed.tensor import DTensor


def full(tensor):
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


@pytest.fixture(scope="module")
def env():
    return init_distributed()  # a one-rank gloo group, as a torchrun job of one process


def make_trainer(env, out, overrides=(), repeat_first=False):
    cfg = load_config("random", [f"output_dir={out}", "lora.impl=reference", "loss.impl=reference",
                                 "metrics.tensorboard=false", "metrics.progress_bar=false", "optim.warmup_steps=0",
                                 "lora.dropout=0", *overrides])
    tok = build_tiny_tokenizer()
    model = build_model(cfg.model, cfg.lora, cfg.loss, tok, env.device)
    apply_parallelism(model, gradient_checkpointing=False, compile=False, device=env.device, fsdp=cfg.model.fsdp)
    stream = FixedStream(tok, rank=0, world_size=1, global_micro=1, repeat_first=repeat_first)
    out.mkdir(parents=True, exist_ok=True)
    return Trainer(cfg, env, model, stream, None, out), tok


def test_loss_falls_on_a_repeated_batch(env, tmp_path):
    trainer, _ = make_trainer(env, tmp_path / "run", ["max_steps=12", "optim.lr=1e-2", "checkpoint.every=0"], repeat_first=True)
    losses = []
    trainer.hooks["after_step"] = lambda t: losses.append(t.last_stats.loss)
    trainer.train()
    trainer.close()
    assert losses[-1] < 0.8 * losses[0], losses


# One process on CPU: "auto" leaves the model unwrapped (nothing to shard), "true" is the FSDP2
# path of a multi-process job; checkpoints must save and resume on both.
@pytest.mark.parametrize("fsdp", ["auto", "true"])
def test_failed_save_leaves_the_previous_checkpoint_as_latest(env, tmp_path, monkeypatch, fsdp):
    settings = ["max_steps=4", "optim.lr=1e-2", "checkpoint.every=2", f"model.fsdp={fsdp}"]
    trainer, _ = make_trainer(env, tmp_path / "run", settings)
    sharded = [isinstance(p, DTensor) for p in trainer.model.parameters()]
    assert all(sharded) if fsdp == "true" else not any(sharded)
    calls = {"n": 0}
    real_commit = ckpt.commit_checkpoint

    def commit_then_crash(tmp, final):
        calls["n"] += 1
        if calls["n"] == 2:  # the second save dies after writing its shards, before the rename
            raise OSError("injected failure during checkpoint save")
        real_commit(tmp, final)

    monkeypatch.setattr(ckpt, "commit_checkpoint", commit_then_crash)
    with pytest.raises(OSError, match="injected"):
        trainer.train()
    root = tmp_path / "run" / "checkpoints"
    latest = ckpt.find_resume_point(root, "auto")
    assert latest is not None and latest.name == "step_00000002"
    assert any(p.name.startswith(".step_00000004") for p in root.iterdir())  # the broken one is left hidden
    # resume=auto really loads it: a fresh trainer continues at step 2
    monkeypatch.setattr(ckpt, "commit_checkpoint", real_commit)
    fresh, _ = make_trainer(env, tmp_path / "run", settings)
    assert fresh.resume() and fresh.state.step == 2
    # the resumed weights and optimizer state are the saved ones, not the fresh init
    saved = {n: p.detach().clone() for n, p in fresh.model.named_parameters() if p.requires_grad}
    assert any(float(full(t).abs().max()) > 0 for n, t in saved.items() if n.endswith("lora_B"))
    assert all(len(fresh.optimizer.state[p]) > 0 for p in fresh.params)
    trainer.close()
    fresh.close()


def test_exported_adapter_loads_in_peft_and_reproduces_our_logits(env, tmp_path):
    from peft import PeftModel

    trainer, tok = make_trainer(env, tmp_path / "run", ["max_steps=3", "optim.lr=1e-2", "checkpoint.every=0"])
    trainer.train()
    trainer.close()
    adapter = tmp_path / "adapter"
    ckpt.export_adapter(adapter, trainer.model, rank=0, lora_cfg=trainer.cfg.lora, base_model=None)
    cfg = trainer.cfg
    batch = make_batch(tok, seed=99)

    ours = build_model(cfg.model, cfg.lora, cfg.loss, tok, torch.device("cpu"))
    assert load_adapter_into(ours, adapter) == 2 * len(ours.lora_modules)
    ours.eval()
    our_logits = ours.logits(batch)

    base = build_thinker(cfg.model, tok, device=torch.device("cpu"), dtype=torch.float32)
    base.eval()
    hf_inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "input_features", "feature_attention_mask")}
    with torch.no_grad():
        base_logits = base(**hf_inputs).logits.float()
    peft_model = PeftModel.from_pretrained(base, str(adapter))
    state = peft_model.state_dict()
    lora_keys = [k for k in state if "lora_A" in k or "lora_B" in k]
    assert len(lora_keys) == 2 * len(ours.lora_modules)  # every projection got its adapter, nothing else
    assert not any("audio_tower" in k for k in lora_keys)
    peft_model.eval()
    with torch.no_grad():
        peft_logits = peft_model(**hf_inputs).logits.float()
    mask = batch["attention_mask"].bool()
    assert torch.allclose(peft_logits[mask], our_logits[mask], atol=1e-4, rtol=1e-4)
    assert (peft_logits[mask] - base_logits[mask]).abs().max() > 1e-3  # the adapter changes the model


def test_fsdp_setting_is_checked():
    from engine.parallel import fsdp_wanted

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert not fsdp_wanted("auto", 1, cpu) and fsdp_wanted("auto", 2, cpu) and fsdp_wanted("auto", 1, cuda)
    assert fsdp_wanted(True, 1, cpu) and not fsdp_wanted(False, 1, cuda)
    with pytest.raises(ValueError, match="each rank would train its own copy"):
        fsdp_wanted("false", 2, cpu)
    with pytest.raises(ValueError, match="model.fsdp='sometimes'"):
        fsdp_wanted("sometimes", 1, cpu)
