"""Helpers for tests and benchmarks: tiny random models and the reference (diffusers) oracle.

The reference transformer takes one sample as a packed sequence plus index tensors built by its pipeline. We build
those inputs here with the reference pipeline's own position-id functions, so a parity test checks our layout
(positions, noisy masks, ordering) as well as our layers.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .models.layout import Cosmos3Sample
from .models.transformer_cosmos3 import Cosmos3Transformer


def randomize_(model: torch.nn.Module, seed: int = 0, std: float = 0.2) -> torch.nn.Module:
    """Overwrite every parameter with seeded noise (norm weights around 1), so no layer is an identity.

    The noise is drawn on each parameter's device (a Nano-sized model on a GPU would take minutes through the host);
    the same seed gives the same weights on the same kind of device."""
    generators = {}
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.device not in generators:
                generators[param.device] = torch.Generator(device=param.device).manual_seed(seed)
            noise = torch.randn(param.shape, generator=generators[param.device], device=param.device) * std
            if "norm" in name.split(".")[-2:][0]:
                noise = 1.0 + noise
            param.copy_(noise.to(param.dtype))
    return model


def make_tiny_vae(seed: int = 0):
    """A Wan 2.2-layout VAE (patch_size 2, 16x spatial, 4x temporal, 8 latent channels), random, CPU-sized."""
    from diffusers import AutoencoderKLWan

    torch.manual_seed(seed)
    return AutoencoderKLWan(
        base_dim=8, z_dim=8, dim_mult=[1, 1, 1, 1], num_res_blocks=1, is_residual=True, patch_size=2, in_channels=12,
        out_channels=12, scale_factor_spatial=16, scale_factor_temporal=4,
        latents_mean=[0.1 * i - 0.3 for i in range(8)], latents_std=[1.0 + 0.2 * i for i in range(8)],
    ).eval()


def make_tiny_avae(seed: int = 0):
    """A Cosmos 3 AVAE at 800 Hz with hop 8 (100 latent frames per second), 8 latent channels, random."""
    from diffusers import Cosmos3AVAEAudioTokenizer

    torch.manual_seed(seed)
    return Cosmos3AVAEAudioTokenizer(
        vocoder_input_dim=8, dec_dim=8, dec_c_mults=(1, 2), dec_strides=(2, 4), enc_dim=8, enc_c_mults=(1,),
        enc_strides=(4,), enc_hop_length=2, enc_n_fft=8, enc_latent_dim=16, enc_num_blocks=1, sampling_rate=800,
    ).eval()


def tiny_scheduler():
    """The reference's scheduler (UniPC on flow sigmas, shift 3), as every tiny test pipeline uses it."""
    from diffusers import UniPCMultistepScheduler

    return UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)


def tiny_parts(text_tokenizer, *, seed: int = 1, std: float = 0.1, sound: bool = False, vae=None,
               **config) -> dict:
    """The components of a tiny random pipeline (the keyword arguments of any Cosmos 3 pipeline): a `tiny` preset
    transformer sized to `text_tokenizer` (`config` overrides the preset), the tiny VAE, the scheduler, and with
    `sound` the tiny AVAE."""
    model = randomize_(Cosmos3Transformer.from_preset("tiny", vocab_size=len(text_tokenizer), **config), seed=seed,
                       std=std).eval()
    parts = dict(transformer=model, text_tokenizer=text_tokenizer, vae=make_tiny_vae() if vae is None else vae,
                 scheduler=tiny_scheduler())
    if sound:
        parts["sound_tokenizer"] = make_tiny_avae()
    return parts


def save_tiny_pipeline(folder, text_tokenizer, *, pipeline_class=None, **options) -> str:
    """Save a tiny random pipeline folder in the reference layout (default: the world-action pipeline, whose
    folder every task loads); `options` as `tiny_parts`. Returns the folder."""
    if pipeline_class is None:
        from .pipelines import Cosmos3WorldActionPipeline as pipeline_class
    pipeline_class(**tiny_parts(text_tokenizer, **options)).save_pretrained(str(folder))
    return str(folder)


def reference_transformer(model: Cosmos3Transformer, share_weights: bool = False):
    """A `diffusers.Cosmos3OmniTransformer` with the same config and weights (loaded strictly).

    `share_weights=True` builds it without weights of its own: its parameters are `model`'s tensors (same device,
    no copy), so a Nano-sized pair fits on one GPU. Do not train or quantize either model then.
    """
    from diffusers import Cosmos3OmniTransformer

    init = {k: v for k, v in model.config.items() if not k.startswith("_")}
    if not share_weights:
        reference = Cosmos3OmniTransformer(**init)
        inv_freq = reference.rotary_emb.inv_freq
        reference = reference.to(model.dtype)
        # as `from_pretrained(torch_dtype=...)` leaves it: the cast would round this float32 buffer too
        reference.rotary_emb.inv_freq = inv_freq
        reference.load_state_dict(model.state_dict(), strict=True)
        return reference.eval()
    with torch.device("meta"):
        reference = Cosmos3OmniTransformer(**init)
    reference.load_state_dict(model.state_dict(), strict=True, assign=True)
    # its one buffer outside the state dict, from a one-layer twin
    twin = Cosmos3OmniTransformer(**dict(init, num_hidden_layers=1))
    reference.rotary_emb.inv_freq = twin.rotary_emb.inv_freq.to(model.proj_in.weight.device)
    leftover = [name for name, t in [*reference.named_parameters(), *reference.named_buffers()] if t.is_meta]
    if leftover:
        raise RuntimeError(f"reference_transformer(share_weights=True) left tensors unset: {leftover}")
    return reference.eval()


def reference_inputs(
    config,
    sample: Cosmos3Sample,
    vision: Tensor,
    timestep: float,
    *,
    sound: Tensor | None = None,
    action: Tensor | None = None,
    temporal_compression: int = 4,
) -> dict:
    """Keyword arguments for `Cosmos3OmniTransformer.forward`, built as `Cosmos3OmniPipeline` builds them."""
    from diffusers.pipelines.cosmos.pipeline_cosmos3_omni import (
        get_3d_mrope_ids_text_tokens,
        get_3d_mrope_ids_vae_tokens,
    )

    device = vision.device
    p = config.latent_patch_size
    ids = torch.as_tensor(sample.text_ids, dtype=torch.long, device=device)
    und_len = ids.numel()
    text_pos, next_offset = get_3d_mrope_ids_text_tokens(und_len, 0, use_float_positions=config.enable_fps_modulation)
    media_offset = next_offset + config.unified_3d_mrope_temporal_modality_margin
    fps = sample.fps if config.enable_fps_modulation else None

    T, H, W = sample.vision_shape
    ph, pw = -(-H // p), -(-W // p)
    n_vision = T * ph * pw
    noisy = [f for f in range(T) if f not in sample.vision_condition_frames]
    vision_pos, _ = get_3d_mrope_ids_vae_tokens(
        T, ph, pw, media_offset, reset_spatial_indices=config.unified_3d_mrope_reset_spatial_ids, fps=fps,
        base_fps=float(config.base_fps), temporal_compression_factor=temporal_compression,
    )
    mse = [und_len + f * ph * pw + i for f in noisy for i in range(ph * pw)]
    kwargs = dict(
        input_ids=ids,
        text_indexes=torch.arange(und_len, device=device),
        und_len=und_len,
        vision_tokens=[vision.unsqueeze(0)],
        vision_token_shapes=[(T, ph, pw)],
        vision_sequence_indexes=torch.arange(und_len, und_len + n_vision, device=device),
        vision_mse_loss_indexes=torch.tensor(mse, dtype=torch.long, device=device),
        vision_timesteps=torch.full((len(mse),), float(timestep), device=device),
        vision_noisy_frame_indexes=[torch.tensor(noisy, dtype=torch.long, device=device)],
    )
    positions = [text_pos, vision_pos]
    cursor = und_len + n_vision
    if sample.sound_length:
        S = sample.sound_length
        sound_fps = float(config.sound_latent_fps) if config.enable_fps_modulation else None
        sound_pos, _ = get_3d_mrope_ids_vae_tokens(
            S, 1, 1, media_offset, reset_spatial_indices=config.unified_3d_mrope_reset_spatial_ids, fps=sound_fps,
            base_fps=float(config.base_fps), temporal_compression_factor=1,
        )
        positions.append(sound_pos)
        index = torch.arange(cursor, cursor + S, device=device)
        kwargs.update(
            sound_tokens=[sound], sound_token_shapes=[(S, 1, 1)], sound_sequence_indexes=index,
            sound_mse_loss_indexes=index.clone(), sound_timesteps=torch.full((S,), float(timestep), device=device),
            sound_noisy_frame_indexes=[torch.arange(S, device=device)],
        )
        cursor += S
    if sample.action_length:
        A = sample.action_length
        action_noisy = [i for i in range(A) if i not in sample.action_condition_frames]
        action_pos, _ = get_3d_mrope_ids_vae_tokens(
            A, 1, 1, media_offset, reset_spatial_indices=config.unified_3d_mrope_reset_spatial_ids, fps=fps,
            base_fps=float(config.base_fps), temporal_compression_factor=1,
            base_temporal_compression_factor=temporal_compression, start_frame_offset=1,
        )
        positions.append(action_pos)
        index = torch.arange(cursor, cursor + A, device=device)
        kwargs.update(
            action_tokens=[action], action_token_shapes=[(A, 1, 1)], action_sequence_indexes=index,
            action_mse_loss_indexes=index[action_noisy],
            action_timesteps=torch.full((len(action_noisy),), float(timestep), device=device),
            action_noisy_frame_indexes=[torch.tensor(action_noisy, dtype=torch.long, device=device)],
            action_domain_ids=[torch.tensor([sample.action_domain_id], device=device)],
        )
        cursor += A
    kwargs["position_ids"] = torch.cat(positions, dim=1).to(device)
    kwargs["sequence_length"] = cursor
    return kwargs
