"""Text from the understanding tower: autoregressive decoding with a KV cache (the reference has no text output).

Greedy (`temperature=0`) or sampled (temperature, nucleus `top_p`) with a per-prompt `torch.Generator`. The chat
template frames the user's message; decoding stops at the tokenizer's eos (`<|im_end|>`) or `max_new_tokens`.
`upsample_prompt` asks the model to expand a short prompt into the detailed caption the generator was trained on.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from diffusers import DiffusionPipeline
from diffusers.utils import BaseOutput

from ..models.transformer_cosmos3 import Cosmos3Transformer
from ..tokenizers.text import load_text_tokenizer
from .common import CallLimits, _adopt_reference_transformer, check_prompt_ids, component_dtype

UPSAMPLE_INSTRUCTION = (
    "Rewrite the following prompt as one detailed paragraph describing the scene, the subjects, their motion, the "
    "camera, the lighting and the style, for a video generation model. Prompt: "
)


@dataclass
class Cosmos3TextOutput(BaseOutput):
    """`text`: the decoded completion of each prompt; `token_ids`: its new token ids (eos excluded)."""

    text: list[str]
    token_ids: list[list[int]]


class Cosmos3TextGenerationPipeline(DiffusionPipeline):
    r"""Generate text with the Cosmos 3 understanding tower and `lm_head`."""

    limits = CallLimits()

    def __init__(self, transformer: Cosmos3Transformer, text_tokenizer):
        super().__init__()
        self.register_modules(transformer=transformer, text_tokenizer=text_tokenizer)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, torch_dtype=None, dtype=None, variant=None):
        """Read the transformer and text tokenizer of a checkpoint folder (the other components are not needed);
        `dtype` / `torch_dtype` as diffusers reads them (a dict: its "transformer" or "default" entry), `variant`
        the transformer's weight files (`diffusion_pytorch_model.<variant>.safetensors`)."""
        folder = str(pretrained_model_name_or_path)
        dtype = component_dtype(dtype, torch_dtype, "transformer")
        transformer = Cosmos3Transformer.from_pretrained(os.path.join(folder, "transformer"), dtype=dtype,
                                                         variant=variant)
        return cls(transformer=transformer, text_tokenizer=load_text_tokenizer(folder))

    @classmethod
    def from_pipe(cls, pipeline, **kwargs):
        """diffusers' `from_pipe`, from any Cosmos 3 pipeline of ours or the reference's (whose transformer becomes
        ours on the same weight tensors; see `Cosmos3PipelineBase.from_pipe`)."""
        return super().from_pipe(pipeline, **_adopt_reference_transformer(pipeline, kwargs))

    def _sample(self, logits: torch.Tensor, temperature: float, top_p: float, generator) -> int:
        if temperature == 0:
            return int(logits.argmax())
        probs = torch.softmax(logits.float() / temperature, dim=-1)
        if top_p < 1.0:
            # keep the smallest set of tokens whose probability reaches top_p (always at least the top one)
            sorted_probs, order = probs.sort(descending=True)
            outside = sorted_probs.cumsum(-1) - sorted_probs >= top_p
            sorted_probs = sorted_probs.masked_fill(outside, 0.0)
            probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
        return int(torch.multinomial(probs.cpu(), 1, generator=generator))

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        system_prompt: str | None = None,
        return_dict: bool = True,
    ):
        """Complete each prompt (one chat turn); returns `Cosmos3TextOutput`."""
        prompts = [prompt] if isinstance(prompt, str) else prompt
        if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise TypeError(f"`prompt` must be a str or a non-empty list of str, got {prompt!r}.")
        if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
            raise ValueError(f"`max_new_tokens` must be an int >= 1, got {max_new_tokens!r}.")
        if max_new_tokens > self.limits.max_new_tokens:
            raise ValueError(f"`max_new_tokens`={max_new_tokens} is over the limit of {self.limits.max_new_tokens} "
                             "(`pipe.limits = CallLimits(max_new_tokens=...)` raises it).")
        def real(value) -> bool:
            return isinstance(value, (int, float)) and not isinstance(value, bool)

        if not real(temperature) or not temperature >= 0 or temperature == float("inf"):
            raise ValueError(f"`temperature` must be a finite number >= 0 (0: greedy), got {temperature!r}.")
        if not real(top_p) or not 0 < top_p <= 1:
            raise ValueError(f"`top_p` must be in (0, 1] (a number), got {top_p!r}.")
        if system_prompt is not None and not isinstance(system_prompt, str):
            raise TypeError(f"`system_prompt` must be a str or None, got {type(system_prompt).__name__}.")
        generators = generator if isinstance(generator, list) else [generator] * len(prompts)
        if len(generators) != len(prompts):
            raise ValueError(f"`generator` is a list of {len(generators)} for {len(prompts)} prompts.")
        if temperature > 0 and any(g is None for g in generators):
            raise ValueError("Sampling (`temperature` > 0) needs a `generator`: the library never uses global RNG.")
        eos = self.text_tokenizer.eos_token_id
        device = self.transformer.device
        texts, all_ids = [], []
        for text, g in zip(prompts, generators):
            messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
                {"role": "user", "content": text}
            ]
            ids = self.text_tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True,
                                                          return_dict=True)["input_ids"]
            check_prompt_ids([list(ids)], self.limits)
            logits, past = self.transformer.text_logits(torch.tensor(ids, device=device))  # prefill once
            new: list[int] = []
            for _ in self.progress_bar(range(max_new_tokens)):
                token = self._sample(logits[-1], temperature, top_p, g)
                if token == eos:
                    break
                new.append(token)
                logits, past = self.transformer.text_logits(torch.tensor([token], device=device), past)
            all_ids.append(new)
            texts.append(self.text_tokenizer.decode(new, skip_special_tokens=True))
        if not return_dict:
            return texts, all_ids
        return Cosmos3TextOutput(text=texts, token_ids=all_ids)

    def upsample_prompt(self, prompt: str | list[str], **kwargs) -> list[str]:
        """Expand short prompts into detailed captions (the style the generation tower was trained on)."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        return self([UPSAMPLE_INSTRUCTION + p for p in prompts], **kwargs).text
