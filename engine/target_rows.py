"""The last LLM layer's position-wise parts run on the rows the loss reads, not on every row.

Only the last layer's output at target rows (the positions whose next token is a label) reaches
the loss: nothing comes after that layer but the final norm and lm_head, and those already see
the target rows only (engine/model.py). Within the last layer, attention still needs keys and
values of every row, but o_proj and the MLP are position-wise: at any other row their output is
never read. So they run on the target rows alone and their output is scattered back into zeros
(the other rows of the layer's output then hold the residual stream plus attention, which no
loss, prediction or metric reads).

What it saves: the MLP is ~87% of a 7B layer's matmul FLOPs (3 x 3584 x 18944 against
3584 x (2 x 3584 + 2 x 512) for the attention projections) and the last layer is 1 of 28; the
targets of the demo batches are 7% of their tokens, so ~3% of the LLM's matmul work and the last
MLP's activations (three [T, 18944] tensors) go. The tiny preset has 4 layers: ~17% of its LLM
matmuls.

Hooks, not a wrapper module: parameter names (checkpoints, FSDP, adapters) stay as they are.
The rows are kept on the model until the next forward sets them, so that activation
checkpointing's recomputation in backward takes the same rows as the forward did.
"""
from __future__ import annotations

import torch
from torch import nn



def target_rows(valid: torch.Tensor) -> torch.Tensor:
    """Flat indices into the [B * T] rows of the hidden states that the loss reads, from its
    mask `valid` = labels[:, 1:] != ignore_index ([B, T - 1]: row t predicts token t + 1)."""
    batch, length = valid.shape[0], valid.shape[1] + 1
    reads = torch.zeros(batch, length, dtype=torch.bool, device=valid.device)
    reads[:, :-1] = valid
    return reads.reshape(batch * length).nonzero().squeeze(1)


class TargetRowsOnly:
    """Runs `modules` (position-wise: input [..., H_in] -> output [..., H_out]) on the selected
    rows only while `rows` is set; on every row while it is None."""

    def __init__(self, modules: list[nn.Module]):
        self.modules = modules
        self.rows: torch.Tensor | None = None
        for module in modules:
            module.register_forward_pre_hook(self._gather)
            module.register_forward_hook(self._scatter)

    def _gather(self, module, args):
        if self.rows is None:
            return None
        (x,) = args
        module._target_rows_shape = x.shape  # read by _scatter of the same call
        rows = self.rows.to(x.device)
        return (x.reshape(-1, x.shape[-1]).index_select(0, rows).unsqueeze(0),)

    def _scatter(self, module, args, out):
        if self.rows is None:
            return None
        shape = module._target_rows_shape
        rows = self.rows.to(out.device)
        full = out.new_zeros(shape[:-1].numel(), out.shape[-1]).index_copy_(0, rows, out.reshape(-1, out.shape[-1]))
        return full.view(*shape[:-1], out.shape[-1])


def last_layer_position_wise(llm: nn.Module) -> list[nn.Module]:
    """o_proj and the MLP of the LLM's last decoder layer."""
    last = llm.layers[-1]
    return [last.self_attn.o_proj, last.mlp]
