"""Model FLOPs of Cosmos 3 forwards and training steps (the formula of `performance.md`, MACs x 2).

Per layer: `2 * N * P` for the linear layers of each tower (P: the tower's token-applied weights; the timestep MLP
runs on one vector per sample and is left out), plus attention `4 * H * d_h * N_q * N_kv`: generated tokens read
[text | generated] of their sample, text tokens read the causal half of their prompt. GQA does not reduce them.
"""

from __future__ import annotations

from torch import nn

GEN_PIECES = ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "mlp_moe_gen")
TEXT_PIECES = ("self_attn.to_q", "self_attn.to_k", "self_attn.to_v", "self_attn.to_out", "mlp.")


def tower_weights(model: nn.Module) -> tuple[int, int]:
    """(text tower, generation tower) token-applied weights summed over layers (biases and norms excluded)."""
    text = gen = 0
    for name, p in model.named_parameters():
        if not name.startswith("layers.") or p.ndim != 2:
            continue
        if any(piece in name for piece in GEN_PIECES):
            gen += p.numel()
        elif any(piece in name for piece in TEXT_PIECES):
            text += p.numel()
    return text, gen


def forward_flops(model: nn.Module, text_tokens: int, gen_tokens: int) -> tuple[float, float]:
    """(text tower, generation tower) FLOPs of one sample's forward."""
    c = model.config
    text_w, gen_w = tower_weights(model)
    attn = 4 * c.num_attention_heads * c.head_dim * c.num_hidden_layers
    text = 2 * text_tokens * text_w + attn * text_tokens * text_tokens / 2
    gen = 2 * gen_tokens * gen_w + attn * gen_tokens * (text_tokens + gen_tokens)
    return text, gen


def training_step_flops(model: nn.Module, text_tokens: int, gen_tokens: int, samples: int) -> float:
    """One training step of the generation tower: the frozen text tower runs forward only (its keys/values under
    no_grad); the generation stream runs forward and backward (about twice the forward)."""
    text, gen = forward_flops(model, text_tokens, gen_tokens)
    return samples * (text + 3 * gen)
