"""Bad input gets a ValueError/TypeError naming the argument, never a crash deep inside the model."""

import pytest
import torch

from cosmos3 import Cosmos3Sample


def sample(**overrides):
    fields = dict(text_ids=[1, 2, 3], vision_shape=(2, 4, 4), fps=24.0)
    fields.update(overrides)
    return Cosmos3Sample(**fields)


@pytest.mark.parametrize(
    "overrides,match",
    [
        (dict(text_ids=[]), r"samples\[0\].text_ids must be a non-empty"),
        (dict(text_ids=[1.5, 2.0]), r"samples\[0\].text_ids"),
        (dict(text_ids=[1, 600]), r"text_ids must lie in \[0, vocab_size=512\)"),
        (dict(vision_shape=(2, 4)), r"samples\[0\].vision_shape must be 3 positive ints"),
        (dict(vision_shape=(0, 4, 4)), r"vision_shape"),
        (dict(vision_condition_frames=(2,)), r"vision_condition_frames=\[2\] has indexes outside \[0, 2\)"),
        (dict(vision_condition_frames=(0, 0)), r"repeats an index"),
        (dict(fps=-3.0), r"samples\[0\].fps must be a positive number"),
        (dict(action_length=3, action_domain_id=40), r"action_domain_id=40 must be in \[0, num_embodiment_domains"),
        (dict(action_length=2, action_condition_frames=(5,)), r"action_condition_frames"),
        (dict(sound_length=-1), r"sound_length"),
    ],
)
def test_bad_samples(tiny_model, overrides, match):
    with pytest.raises(ValueError, match=match):
        tiny_model.build_layout([sample(**overrides)])


def test_layout_needs_samples(tiny_model):
    with pytest.raises(ValueError, match="non-empty list"):
        tiny_model.build_layout([])
    with pytest.raises(TypeError, match=r"samples\[0\] must be a Cosmos3Sample"):
        tiny_model.build_layout([{"text_ids": [1]}])


def test_modalities_the_model_lacks(tiny_model):
    from cosmos3 import Cosmos3Transformer

    plain = Cosmos3Transformer.from_preset("tiny", sound_gen=False, action_gen=False)
    with pytest.raises(ValueError, match="sound_gen=True"):
        plain.build_layout([sample(sound_length=4)])
    with pytest.raises(ValueError, match="action_gen=True"):
        plain.build_layout([sample(action_length=4)])


def test_bad_forward_inputs(tiny_model):
    s = sample(sound_length=3, action_length=2)
    layout = tiny_model.build_layout([s])
    good = dict(vision=[torch.randn(8, 2, 4, 4)], timestep=10.0, sound=[torch.randn(8, 3)],
                action=[torch.randn(2, 16)])

    def call(**changes):
        kwargs = {**good, **changes}
        return tiny_model(layout, kwargs.pop("vision"), kwargs.pop("timestep"), **kwargs)

    with pytest.raises(ValueError, match=r"vision\[0\] must be a floating tensor of shape \(8, 2, 4, 4\)"):
        call(vision=[torch.randn(8, 2, 4, 5)])
    with pytest.raises(ValueError, match=r"vision\[0\].*dtype torch.int64"):
        call(vision=[torch.zeros(8, 2, 4, 4, dtype=torch.long)])
    with pytest.raises(ValueError, match=r"`vision` has 2 samples but the layout has 1"):
        call(vision=[torch.randn(8, 2, 4, 4)] * 2)
    with pytest.raises(TypeError, match="`vision` must be a tensor"):
        call(vision="latents")
    with pytest.raises(ValueError, match=r"`timestep` must be a scalar or shape \(1,\)"):
        call(timestep=torch.ones(3))
    with pytest.raises(ValueError, match=r"sound\[0\] must be a floating tensor of shape \(8, 3\)"):
        call(sound=[torch.randn(8, 4)])
    with pytest.raises(ValueError, match=r"action\[0\] must be a floating tensor of shape \(2, 16\)"):
        call(action=[torch.randn(3, 16)])
    with pytest.raises(ValueError, match=r"sound\[0\] must be"):
        call(sound=[None])
    no_sound = tiny_model.build_layout([sample()])
    with pytest.raises(ValueError, match=r"sound\[0\] was given but samples\[0\].sound_length is 0"):
        tiny_model(no_sound, [torch.randn(8, 2, 4, 4)], 1.0, sound=[torch.randn(8, 3)])
