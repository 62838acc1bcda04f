"""Aligner embeddings of every sample of some shards, computed once and stored beside them.

    python -m loaders.embed_shards data/x/train-{000000..000007}.tar [--model-path DIR | --preset tiny]
                                   [--batch 16] [--device cpu|cuda] [--max-audio-seconds 60]

For each shard ``<stem>.tar`` it writes ``<stem>.emb.npz`` (loaders.embeddings sidecar format):
per sample key, the mean over time of the audio-text aligner's output, i.e. the output of the
thinker's audio tower including its final ``proj`` (what the LLM receives as audio tokens).
With the audio encoder frozen (model.train_audio_encoder=false, the default) these vectors
never change during training, so ADS reads them with the samples instead of running the
encoder. Audio is decoded and featurized exactly as the training loader does (loaders.audio,
loaders.features). A sample that cannot be embedded (no JSON or audio, undecodable, empty,
longer than --max-audio-seconds) is skipped, named and counted; ADS falls back to its
log-mel projection for it. This is the one loaders module that imports the engine (the model).
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field

import numpy as np
import torch

from loaders.audio import TARGET_SAMPLE_RATE, AudioError, decode_audio
from loaders.embeddings import sidecar_path, write_embedding_sidecar
from loaders.features import log_mel, num_frames
from loaders.shards import check_shards_exist, expand_urls, is_local, iter_tar_samples, local_path

DEFAULT_BATCH = 16
# Same default as data.max_audio_seconds: longer recordings are never trained on either.
DEFAULT_MAX_AUDIO_SECONDS = 60.0


@dataclass
class ShardReport:
    shard: str
    sidecar: str = ""
    embedded: int = 0
    skipped: dict[str, int] = field(default_factory=dict)

    def skip(self, reason: str, message: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        print(f"[embed_shards] skipped ({reason}): {message}", file=sys.stderr)


def load_audio_tower(model_path: str, preset: str, device: torch.device):
    """The frozen audio tower (encoder + aligner projection) of a checkpoint or preset, in eval mode."""
    from engine.config import ModelConfig
    from engine.model import build_thinker, locate_parts, resolve_dtype
    from engine.tokenizer import build_tiny_tokenizer, load_checkpoint_tokenizer

    tokenizer = load_checkpoint_tokenizer(model_path) if model_path else build_tiny_tokenizer()
    thinker = build_thinker(ModelConfig(preset=preset, path=model_path), tokenizer, device=device,
                            dtype=resolve_dtype("auto", device))
    tower = locate_parts(thinker).audio_tower
    tower.requires_grad_(False)
    return tower.eval()


@torch.no_grad()
def aligner_embeddings(tower, features: list[np.ndarray]) -> np.ndarray:
    """Mean-pooled aligner output of each clip ([128, F_i] log-mel) -> float32 [len(features), H].

    The clips are padded into one batch and unpadded into the tower's packed input, exactly as
    the training forward does (engine.model.OmniLoRAModel._run_tower)."""
    device, dtype = tower.conv1.weight.device, tower.conv1.weight.dtype
    frames = torch.tensor([f.shape[1] for f in features], device=device)
    padded = torch.zeros(len(features), features[0].shape[0], int(frames.max()), device=device, dtype=dtype)
    mask = torch.zeros(len(features), int(frames.max()), dtype=torch.long, device=device)
    for row, clip in enumerate(features):
        padded[row, :, : clip.shape[1]] = torch.from_numpy(clip).to(device=device, dtype=dtype)
        mask[row, : clip.shape[1]] = 1
    flat = padded.permute(0, 2, 1)[mask.bool()].permute(1, 0)
    after_cnn, output_lengths = tower._get_feat_extract_output_lengths(frames)
    hidden = tower(flat, feature_lens=frames, aftercnn_lens=after_cnn).last_hidden_state
    pooled = [chunk.float().mean(dim=0) for chunk in torch.split(hidden, output_lengths.tolist())]
    return torch.stack(pooled).cpu().numpy()


def _clips(url: str, report: ShardReport, max_audio_seconds: float):
    """(key, log-mel) of each sample that can be embedded, in shard order; the rest reported."""
    seen = set()
    for sample in iter_tar_samples(url):
        if sample.error is not None:
            report.skip(*sample.error)
            continue
        if sample.key in seen:
            report.skip("duplicate_key", f"{sample.where}: the key appears twice in the shard; the first is kept")
            continue
        try:
            waveform = decode_audio(sample.audio, shard=sample.shard, key=sample.key)
        except AudioError as exc:
            report.skip(exc.reason, str(exc))
            continue
        if num_frames(waveform.size) == 0:
            report.skip("empty_audio", f"{sample.where}: audio is shorter than one 10 ms feature frame")
            continue
        if waveform.size > max_audio_seconds * TARGET_SAMPLE_RATE:
            report.skip("audio_too_long", f"{sample.where}: audio lasts {waveform.size / TARGET_SAMPLE_RATE:.1f} s, "
                        f"more than --max-audio-seconds={max_audio_seconds}")
            continue
        seen.add(sample.key)
        yield sample.key, log_mel(waveform)


def embed_shard(url: str, tower, *, batch: int, max_audio_seconds: float, source: str) -> ShardReport:
    report = ShardReport(url, sidecar_path(local_path(url)))
    keys, vectors, pending = [], [], []
    for key, features in _clips(url, report, max_audio_seconds):
        pending.append((key, features))
        if len(pending) == batch:
            keys += [k for k, _ in pending]
            vectors.append(aligner_embeddings(tower, [f for _, f in pending]))
            pending = []
    if pending:
        keys += [k for k, _ in pending]
        vectors.append(aligner_embeddings(tower, [f for _, f in pending]))
    if keys:
        write_embedding_sidecar(report.sidecar, keys, np.concatenate(vectors), source=source)
    report.embedded = len(keys)
    return report


def embed_shards(urls: list[str], *, model_path: str = "", preset: str = "tiny", batch: int = DEFAULT_BATCH,
                 device: str | None = None, max_audio_seconds: float = DEFAULT_MAX_AUDIO_SECONDS) -> list[ShardReport]:
    remote = [u for u in urls if not (is_local(u) or u.startswith("file://"))]
    if remote:
        raise ValueError(f"embed_shards writes sidecars beside the shards, so they must be local files; "
                         f"{remote[0]} is not (copy the shards locally first)")
    check_shards_exist(urls, "SHARD_URLS")
    if batch < 1:
        raise ValueError(f"--batch must be at least 1, got {batch}")
    torch_device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tower = load_audio_tower(model_path, preset, torch_device)
    source = f"model.path={model_path}" if model_path else f"model.preset={preset}"
    return [embed_shard(url, tower, batch=batch, max_audio_seconds=max_audio_seconds, source=source) for url in urls]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loaders.embed_shards", description=__doc__.split("\n\n")[0])
    parser.add_argument("shards", nargs="+", help="shard paths; brace notation allowed (a-{000000..000007}.tar)")
    model = parser.add_mutually_exclusive_group()
    model.add_argument("--model-path", default="", help="local Qwen2.5-Omni checkpoint folder")
    model.add_argument("--preset", default="tiny", choices=["tiny", "7b"], help="random-init preset (default tiny)")
    parser.add_argument("--batch", type=int, default=DEFAULT_BATCH, help="clips per encoder call")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--max-audio-seconds", type=float, default=DEFAULT_MAX_AUDIO_SECONDS)
    args = parser.parse_args(argv)
    reports = embed_shards(expand_urls(args.shards), model_path=args.model_path, preset=args.preset,
                           batch=args.batch, device=args.device, max_audio_seconds=args.max_audio_seconds)
    print(f"{'shard':<40} {'embedded':>9} {'skipped':>8}  sidecar")
    for r in reports:
        print(f"{r.shard[-40:]:<40} {r.embedded:>9} {sum(r.skipped.values()):>8}  {r.sidecar if r.embedded else '-'}")
    skipped = sum(sum(r.skipped.values()) for r in reports)
    print(f"{sum(r.embedded for r in reports)} samples embedded in {len(reports)} shard(s), {skipped} skipped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
