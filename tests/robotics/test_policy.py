"""Cosmos3Policy: LeRobot-style select_action / predict_action_chunk over a tiny world-action checkpoint."""

import contextlib
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict

import numpy as np
import pytest
import torch
from diffusers import UniPCMultistepScheduler

from cosmos3.robotics.policy import Cosmos3Policy, PolicyConfig, tile_frames


def observation(seed=0, task="push the T into the target"):
    rng = np.random.default_rng(seed)
    return {"observation.images.top": rng.integers(0, 255, (96, 96, 3), dtype=np.uint8),
            "observation.state": rng.uniform(0, 512, 2).astype(np.float32), "task": task}


@pytest.fixture(scope="module")
def policy(tiny_policy_folder):
    return Cosmos3Policy.from_pretrained(str(tiny_policy_folder), device="cpu")


def with_cameras(policy, cameras):
    """The same model and normalizer as `policy` under a config naming `cameras`."""
    return Cosmos3Policy(policy.pipeline, PolicyConfig(**{**asdict(policy.config), "cameras": cameras}),
                         policy.normalizer)


def lerobot_batch(observations):
    """What lerobot-eval hands a policy for these environments: `[B, 3, H, W]` float32 in [0, 1], `[B, D]` state,
    a list of B instructions."""
    images = torch.stack([torch.from_numpy(o["observation.images.top"]).permute(2, 0, 1) for o in observations])
    return {"observation.images.top": images.float() / 255.0,
            "observation.state": torch.stack([torch.from_numpy(o["observation.state"]) for o in observations]),
            "task": [o["task"] for o in observations]}


def test_chunks_are_in_environment_units_and_reproducible(policy):
    policy.reset(seed=5)
    chunk = policy.predict_action_chunk(observation())
    assert chunk.shape == (4, 2) and chunk.dtype == np.float32
    # the normalizer maps [-1, 1] back to [0, 512]; the tiny random model's outputs land around that range
    assert np.isfinite(chunk).all() and np.abs(chunk - 256).max() < 256 * 20
    policy.reset(seed=5)
    np.testing.assert_array_equal(policy.predict_action_chunk(observation()), chunk)
    assert not np.array_equal(policy.predict_action_chunk(observation()), chunk)  # fresh noise per chunk


def test_select_action_executes_n_action_steps_per_chunk(policy, monkeypatch):
    policy.reset(seed=0)
    calls = []
    original = policy.predict_action_chunk

    def counting(obs):
        calls.append(len(obs) if isinstance(obs, list) else 1)
        return original(obs)

    monkeypatch.setattr(policy, "predict_action_chunk", counting)
    actions = [policy.select_action(observation()) for _ in range(5)]
    assert len(calls) == 3  # n_action_steps = 2: a chunk at steps 0, 2, 4
    assert all(a.shape == (2,) for a in actions)


def test_a_list_of_observations_is_one_batched_call_equal_to_single_calls(policy):
    observations = [observation(0), observation(1, task="push it left")]
    policy.reset(seed=1)
    batch = policy.predict_action_chunk(observations)
    assert batch.shape == (2, 4, 2)
    # the batch draws one seed per sample from the policy's stream: single calls in order draw the same seeds
    policy.reset(seed=1)
    singles = np.stack([policy.predict_action_chunk(o) for o in observations])
    assert not np.array_equal(singles[0], singles[1])  # distinct inputs and noise: a swap would show
    # equal up to the rounding of batched float32 matmuls: 1e-5 in model units as the pipeline tests, the
    # normalizer's minmax over [0, 512] scales that by 256
    np.testing.assert_allclose(batch, singles, rtol=0, atol=256 * 1e-5)
    # queues per environment: resetting one environment only refills its own queue
    policy.reset(seed=2)
    first = policy.select_action([observation(0), observation(1)])
    assert first.shape == (2, 2)
    policy.reset(envs=[1])
    assert len(policy._queues[0]) == 1 and 1 not in policy._queues


def test_a_lerobot_eval_loop_gets_batched_tensors_equal_to_single_numpy_calls(policy):
    """lerobot-eval's loop: `reset()`, then `select_action(batch)` each step, with the batch in LeRobot's tensors,
    and a `[B, action_dim]` tensor back to step the vector env with."""
    observations = [observation(0), observation(1, task="push it left")]
    batch = lerobot_batch(observations)
    policy.reset(seed=3)
    got = [policy.select_action(batch) for _ in range(3)]  # n_action_steps = 2: a new chunk at step 2
    for action in got:
        assert isinstance(action, torch.Tensor) and action.shape == (2, 2) and action.dtype == torch.float32
        assert action.device == batch["observation.images.top"].device
    # the batch draws one seed per environment in order; single calls (env 0, then env 1) draw the same seeds
    policy.reset(seed=3)
    singles = [np.stack([policy.select_action(o, env_ids=[i]) for i, o in enumerate(observations)]) for _ in range(3)]
    assert isinstance(singles[0][0], np.ndarray) and singles[0].shape == (2, 2)  # numpy in, numpy out, as before
    assert not np.array_equal(singles[0][0], singles[0][1])
    # batched and single float32 model calls round differently: 1e-3 of the action scale (256, minmax over [0, 512])
    np.testing.assert_allclose(torch.stack(got).numpy(), np.stack(singles), rtol=0, atol=256 * 1e-3)

    policy.reset(seed=3)
    chunk = policy.predict_action_chunk(batch)
    assert isinstance(chunk, torch.Tensor) and chunk.shape == (2, 4, 2) and chunk.dtype == torch.float32
    np.testing.assert_allclose(chunk[:, :2].numpy(), torch.stack(got[:2], dim=1).numpy(), rtol=0, atol=256 * 1e-5)


def test_lerobot_batches_are_checked(policy):
    batch = lerobot_batch([observation(0), observation(1)])
    with pytest.raises(ValueError, match="`task` must be a list of 2 instructions"):
        policy.select_action({**batch, "task": ["only one"]})
    with pytest.raises(ValueError, match="`observation.state` has 3 rows, the batch 2"):
        policy.select_action({**batch, "observation.state": torch.zeros(3, 2)})
    with pytest.raises(ValueError, match="floats in \\[0, 1\\]"):
        policy.select_action({**batch, "observation.images.top": batch["observation.images.top"] * 255})


def test_openpi_standard_image_keys_map_onto_the_policys_cameras(policy):
    """openpi's examples send `observation/image` (and `observation/wrist_image`), whatever the policy calls its
    cameras: one camera takes `observation/image`; with several, the first two in `cameras` order take them."""
    image, wrist = observation(0)["observation.images.top"], observation(1)["observation.images.top"]
    one = with_cameras(policy, ["top"])
    one.reset(seed=4)
    expected = one.infer({"observation.images.top": image, "task": "push the T"})["actions"]
    one.reset(seed=4)
    got = one.infer({"observation/image": image, "observation/state": np.zeros(2, np.float32), "prompt": "push the T"})
    np.testing.assert_array_equal(got["actions"], expected)

    two = with_cameras(policy, ["front", "wrist"])
    two.reset(seed=4)
    expected = two.infer({"observation.images.front": image, "observation.images.wrist": wrist, "task": "push"})
    two.reset(seed=4)
    got = two.infer({"observation/image": image, "observation/wrist_image": wrist, "prompt": "push"})
    np.testing.assert_array_equal(got["actions"], expected["actions"])
    with pytest.raises(ValueError, match="both `observation/image` and `observation.images.front`"):
        two.infer({"observation/image": image, "observation.images.front": image, "prompt": "push"})


def test_concurrent_infer_calls_equal_the_same_calls_one_after_another(policy, monkeypatch):
    """`serve-policy --max-concurrency N` runs `infer` on N threads against one pipeline: one scheduler (whose
    `set_timesteps` / `step` keep per-request state), one VAE feature cache, one generator stream. Calls must not
    corrupt each other."""
    n, obs = 3, observation(4)
    policy.reset(seed=7)
    expected = [policy.infer(obs)["actions"] for _ in range(n)]

    # Make the denoising loops overlap for sure: each thread's first scheduler step waits for the others to reach
    # theirs. Calls that exclude each other never meet there; the wait then times out once and the rest go on.
    met, local, step = threading.Barrier(n), threading.local(), UniPCMultistepScheduler.step

    def rendezvous_step(self, *args, **kwargs):
        if not getattr(local, "met", False):
            local.met = True
            with contextlib.suppress(threading.BrokenBarrierError):
                met.wait(timeout=2.0)
        return step(self, *args, **kwargs)

    monkeypatch.setattr(UniPCMultistepScheduler, "step", rendezvous_step)
    policy.reset(seed=7)
    start = threading.Barrier(n)

    def call(_):
        start.wait(timeout=60)
        return policy.infer(obs)["actions"]

    with ThreadPoolExecutor(n) as pool:
        futures = [pool.submit(call, i) for i in range(n)]
    errors = [repr(f.exception()) for f in futures if f.exception() is not None]
    assert not errors, f"concurrent calls failed: {errors}"
    got = [f.result() for f in futures]
    # which call draws which seed of the stream depends on the order the threads take turns: compare as multisets
    assert sorted(a.tobytes() for a in got) == sorted(a.tobytes() for a in expected), (
        f"concurrent calls gave {[a[0].tolist() for a in got]}, one after another {[a[0].tolist() for a in expected]}")


def test_openpi_style_observations_and_infer(policy):
    obs = {"observation/image": np.zeros((3, 64, 64), np.uint8), "observation/state": np.zeros(2, np.float32),
           "prompt": "push the T"}
    out = policy.infer(obs)
    assert out["actions"].shape == (4, 2)
    assert policy.metadata["embodiment"] == "pusht" and policy.metadata["chunk_size"] == 4


def test_tiling_and_errors():
    a = np.zeros((32, 40, 3), np.uint8)
    b = np.full((64, 64, 3), 255, np.uint8)
    tiled = tile_frames({"observation.images.a": a, "observation.images.b": b}, ["a", "b"])
    assert tiled.shape == (32, 40 + 32, 3) and tiled[:, 40:].min() == 255
    with pytest.raises(ValueError, match="lacks cameras"):
        tile_frames({"observation.images.a": a}, ["a", "wrist"])
    with pytest.raises(ValueError, match="no camera frames"):
        tile_frames({"observation.state": np.zeros(2)}, None)
    with pytest.raises(ValueError, match="expected an \\[H, W, 3\\] image"):
        tile_frames({"observation.images.a": np.zeros((4, 4))}, None)
    with pytest.raises(ValueError, match="non-empty instruction"):
        from cosmos3.robotics.policy import _standardize

        _standardize({"observation.images.a": a})
    with pytest.raises(ValueError, match="`n_action_steps`=8 exceeds `chunk_size`=4"):
        PolicyConfig(embodiment="pusht", chunk_size=4, n_action_steps=8)
    with pytest.raises(ValueError, match="no fixed action width"):
        PolicyConfig(embodiment="libero")
    assert PolicyConfig(embodiment="libero", action_dim=7).action_dim == 7


def test_served_over_the_openpi_protocol(policy):
    """The real openpi-client drives a Cosmos3Policy through `cosmos3 serve-policy`'s server unchanged."""
    pytest.importorskip("websockets")
    client_module = pytest.importorskip("openpi_client.websocket_client_policy")
    from cosmos3.robotics.server import PolicyServer

    with PolicyServer(policy, port=0) as server:
        client = client_module.WebsocketClientPolicy(host="127.0.0.1", port=server.port)
        assert client.get_server_metadata()["embodiment"] == "pusht"
        out = client.infer({"observation/image": np.zeros((64, 64, 3), np.uint8), "prompt": "push the T"})
        assert out["actions"].shape == (4, 2) and out["actions"].dtype == np.float32
        # openpi-client's infer raises on openpi's error frames; a dict without "actions" would fail later instead
        with pytest.raises(RuntimeError, match="ValueError: .*instruction"):
            client.infer({"observation/image": np.zeros((64, 64, 3), np.uint8)})  # no instruction
        again = client.infer({"observation/image": np.zeros((64, 64, 3), np.uint8), "prompt": "push the T"})
        assert again["actions"].shape == (4, 2)


def test_openpi_image_key_reaches_a_named_camera_through_the_openpi_client(policy):
    client_module = pytest.importorskip("openpi_client.websocket_client_policy")
    from cosmos3.robotics.server import PolicyServer

    named = with_cameras(policy, ["top"])
    with PolicyServer(named, port=0) as server:
        client = client_module.WebsocketClientPolicy(host="127.0.0.1", port=server.port)
        out = client.infer({"observation/image": np.zeros((64, 64, 3), np.uint8),
                            "observation/state": np.zeros(2, np.float32), "prompt": "push the T"})
        assert out["actions"].shape == (4, 2)
