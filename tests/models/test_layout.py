"""The packed layout's pieces: the 2x2 latent patches the transformer reads."""

import pytest
import torch

from cosmos3.models.layout import patchify, unpatchify


@pytest.mark.parametrize("shape", [(8, 3, 4, 6), (8, 2, 3, 5), (4, 1, 1, 1)])
def test_patchify_round_trip(shape):
    latent = torch.randn(shape)
    patches = patchify(latent)
    assert patches.shape == (shape[1] * -(-shape[2] // 2) * -(-shape[3] // 2), 4 * shape[0])
    assert torch.equal(unpatchify(patches, shape), latent)
