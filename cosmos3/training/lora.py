"""LoRA on the generation tower through peft, applied from outside the model and merged back for export.

`add_lora` injects adapters in place (`peft.inject_adapter_in_model`), so the model keeps its class and methods
(`build_layout`, `encode_text`, ...) and the trainer treats it like any other model; only the adapter matrices
train. `merged_state_dict` folds the adapters into the base weights and returns a state dict with the original
parameter names, which every loader of the reference layout accepts.
"""

from __future__ import annotations

from torch import Tensor, nn

# The generation tower's linear layers (the text tower stays frozen and adapter-free, as in full fine-tuning).
GENERATION_LINEARS = r".*layers\.\d+\.(self_attn\.(add_q_proj|add_k_proj|add_v_proj|to_add_out)|mlp_moe_gen\.(gate_proj|up_proj|down_proj))"  # noqa: E501

ADAPTER = "default"


def add_lora(model: nn.Module, rank: int, alpha: float | None = None, dropout: float = 0.0,
             target_modules: str = GENERATION_LINEARS) -> nn.Module:
    """Inject rank-`rank` LoRA adapters into `target_modules` (a regex over module names) of `model`, in place."""
    from peft import LoraConfig, inject_adapter_in_model

    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise ValueError(f"`lora_rank` must be an int >= 1, got {rank!r}.")
    config = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank, lora_dropout=dropout,
                        target_modules=target_modules, bias="none")
    model = inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    if not has_lora(model):
        raise ValueError(f"`lora_target_modules`={target_modules!r} matched no linear layer of the model.")
    return model


def has_lora(model: nn.Module) -> bool:
    from peft.tuners.lora import LoraLayer

    return any(isinstance(m, LoraLayer) for m in model.modules())


def is_lora_parameter(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def merged_state_dict(model: nn.Module, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """`state` (a full state dict of `model`, adapters included) with every adapter folded into its base weight
    (`W + scale * B @ A`) and the adapter keys removed; `base_layer.` disappears from the names."""
    from peft.tuners.lora import LoraLayer

    out = dict(state)
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer) or ADAPTER not in module.lora_A:
            continue
        a = out.pop(f"{name}.lora_A.{ADAPTER}.weight")
        b = out.pop(f"{name}.lora_B.{ADAPTER}.weight")
        base = out.pop(f"{name}.base_layer.weight")
        scale = module.scaling[ADAPTER]
        out[f"{name}.weight"] = (base.float() + scale * (b.float() @ a.float())).to(base.dtype)
        if f"{name}.base_layer.bias" in out:
            out[f"{name}.bias"] = out.pop(f"{name}.base_layer.bias")
    return out
