"""ADS embeddings that follow a trainable audio encoder (``model.train_audio_encoder=true``).

ADS compares samples by the mean-pooled output of the audio-text aligner (the audio tower with
its final projection). With the encoder frozen those vectors are fixed and stored beside the
shards (``python -m loaders.embed_shards``). With the encoder training they drift, so the
training forward itself supplies fresh ones: a forward hook on the audio tower mean-pools each
clip's aligner output of every training micro-batch (no extra encoder pass), and the stream
pulls them after the step (``TrainStream.refresh_embeddings_from``), keeps them in a bounded
cache saved with the loader state, and hands them to ADS every
``schedule.embedding_refresh_every`` steps (loaders/embedding_refresh.py).

The pooling is the one ``loaders.embed_shards.aligner_embeddings`` uses, done on the device
without a host sync; the vectors are copied to the host once per step.
"""
from __future__ import annotations

import numpy as np
import torch


class AlignerCapture:
    """Mean-pooled aligner output of each clip the audio tower encodes in a training forward."""

    def __init__(self, audio_tower: torch.nn.Module):
        self._pooled: list[torch.Tensor] = []
        self._handle = audio_tower.register_forward_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs, output) -> None:
        if not module.training:      # validation and decoding run the model in eval mode
            return
        feature_lens = kwargs.get("feature_lens")
        if feature_lens is None:
            raise RuntimeError("embedding refresh: the audio tower was called without feature_lens; the model's "
                               "forward (engine/model.py _run_tower) must pass them")
        _, token_lens = module._get_feat_extract_output_lengths(feature_lens)
        hidden = output.last_hidden_state.detach().float()
        clip_of_token = torch.repeat_interleave(torch.arange(len(token_lens), device=hidden.device), token_lens,
                                                output_size=hidden.shape[0])
        sums = hidden.new_zeros(len(token_lens), hidden.shape[1]).index_add_(0, clip_of_token, hidden)
        self._pooled.append(sums / token_lens.clamp(min=1).to(sums.dtype)[:, None])

    def pop(self) -> np.ndarray:
        """float32 [n, H]: the clips captured since the last call, in forward order."""
        if not self._pooled:
            return np.zeros((0, 0), np.float32)
        pooled = torch.cat(self._pooled).cpu().numpy()
        self._pooled = []
        return pooled

    def close(self) -> None:
        self._handle.remove()


def attach_aligner_refresh(model, stream) -> AlignerCapture | None:
    """Feed the stream's ADS embeddings from the training forward; None when the stream cannot
    take them (a custom stream without ``refresh_embeddings_from``)."""
    if not hasattr(stream, "refresh_embeddings_from"):
        return None
    capture = AlignerCapture(model.audio_tower)
    stream.refresh_embeddings_from(capture.pop)
    return capture
