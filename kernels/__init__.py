"""omnitrain's Triton kernels, each with the PyTorch reference it is tested against.

    kernels.lora                  fused LoRA linear
    kernels.lora_grouped          grouped LoRA: q/k/v in one call, gate/up/down with fused SwiGLU
    kernels.linear_cross_entropy  fused linear + cross-entropy, no [tokens, vocab] logits

Not Hugging Face's `kernels` hub package, which shares the top-level name: on CPUs with
AVX512-BF16, bitsandbytes (imported through peft or liger-kernel) looks for that package's
`get_kernel`, finds this one, and logs a warning that it could not load its optional
`gemm_4bit_forward`. Nothing in omnitrain uses 4-bit kernels; the warning is harmless.
"""
