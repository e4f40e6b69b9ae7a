"""Text from the understanding tower: logits equal a Qwen3 language model with the same weights; KV cache."""

import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from cosmos3 import Cosmos3TextGenerationPipeline, Cosmos3Transformer
from cosmos3.testing import randomize_

from .conftest import gen

_QWEN_NAMES = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "o_proj", "norm_q": "q_norm",
               "norm_k": "k_norm"}


def as_qwen3(model: Cosmos3Transformer) -> Qwen3ForCausalLM:
    """The text tower is a Qwen3 decoder (interleaved mRoPE with equal text positions on all axes is 1-D RoPE)."""
    c = model.config
    qwen = Qwen3ForCausalLM(Qwen3Config(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, head_dim=c.head_dim, rms_norm_eps=c.rms_norm_eps,
        rope_theta=c.rope_theta, tie_word_embeddings=False,
    ))
    state = {}
    for key, value in model.state_dict().items():
        parts = key.split(".")
        if key in ("embed_tokens.weight", "norm.weight"):
            state[f"model.{key}"] = value
        elif key == "lm_head.weight":
            state[key] = value
        elif parts[0] == "layers" and parts[2] == "self_attn" and parts[3] in _QWEN_NAMES:
            state["model." + ".".join([*parts[:3], _QWEN_NAMES[parts[3]], *parts[4:]])] = value
        elif parts[0] == "layers" and parts[2] in ("mlp", "input_layernorm", "post_attention_layernorm"):
            state[f"model.{key}"] = value
    qwen.load_state_dict(state, strict=True)
    return qwen.eval()


def test_text_logits_equal_qwen3(tiny_model):
    ids = torch.randint(0, tiny_model.config.vocab_size, (13,), generator=gen(0))
    with torch.no_grad():
        expected = as_qwen3(tiny_model)(ids[None]).logits[0]
        ours, _ = tiny_model.text_logits(ids)
    assert (ours - expected).abs().max() <= 1e-5


def test_kv_cache_equals_recompute(tiny_model):
    ids = torch.randint(0, tiny_model.config.vocab_size, (12,), generator=gen(1))
    with torch.no_grad():
        full, _ = tiny_model.text_logits(ids)
        first, past = tiny_model.text_logits(ids[:5])
        middle, past = tiny_model.text_logits(ids[5:9], past)
        pieces = [first, middle]
        for token in ids[9:]:
            step, past = tiny_model.text_logits(token[None], past)
            pieces.append(step)
    assert (torch.cat(pieces) - full).abs().max() <= 1e-5
    assert past[0][0].shape[0] == 12


@pytest.fixture
def text_pipe(tiny_tokenizer):
    model = randomize_(Cosmos3Transformer.from_preset("tiny", vocab_size=len(tiny_tokenizer)), seed=2).eval()
    pipe = Cosmos3TextGenerationPipeline(transformer=model, text_tokenizer=tiny_tokenizer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_greedy_decoding_follows_the_argmax(text_pipe):
    out = text_pipe("a cat on a sofa", max_new_tokens=6)
    ids = list(text_pipe.text_tokenizer.apply_chat_template(
        [{"role": "user", "content": "a cat on a sofa"}], tokenize=True, add_generation_prompt=True, return_dict=True
    )["input_ids"])
    for token in out.token_ids[0]:  # recomputing without a cache picks the same token at every step
        logits, _ = text_pipe.transformer.text_logits(torch.tensor(ids))
        assert int(logits[-1].argmax()) == token
        ids.append(token)
    assert out.text[0] == text_pipe.text_tokenizer.decode(out.token_ids[0], skip_special_tokens=True)


def test_sampling_is_seeded(text_pipe):
    a = text_pipe(["a dog", "rain"], max_new_tokens=8, temperature=1.0, generator=[gen(0), gen(1)])
    b = text_pipe(["a dog", "rain"], max_new_tokens=8, temperature=1.0, generator=[gen(0), gen(1)])
    assert a.token_ids == b.token_ids
    single = text_pipe("rain", max_new_tokens=8, temperature=1.0, generator=gen(1))
    assert single.token_ids[0] == a.token_ids[1]
    tiny_nucleus = text_pipe("a dog", max_new_tokens=8, temperature=1.0, top_p=1e-6, generator=gen(5))
    assert tiny_nucleus.token_ids == text_pipe("a dog", max_new_tokens=8).token_ids  # top_p -> 0 is greedy


def test_upsample_and_errors(text_pipe):
    assert len(text_pipe.upsample_prompt(["a cat", "a car"], max_new_tokens=4)) == 2
    with pytest.raises(ValueError, match="needs a `generator`"):
        text_pipe("a", temperature=0.7)
    with pytest.raises(ValueError, match="`top_p` must be in"):
        text_pipe("a", top_p=0.0)
    with pytest.raises(ValueError, match="`max_new_tokens`"):
        text_pipe("a", max_new_tokens=0)
    with pytest.raises(ValueError, match=r"`max_new_tokens`=1000000 is over the limit of 8192"):
        text_pipe("a", max_new_tokens=10**6)
    with pytest.raises(ValueError, match="tokens after templating, over the limit of 4096"):
        text_pipe("a cat " * 10_000, max_new_tokens=1)
    with pytest.raises(ValueError, match="`input_ids` must lie in"):
        text_pipe.transformer.text_logits(torch.tensor([10_000]))
