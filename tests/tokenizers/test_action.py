import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cosmos3 import flow
from cosmos3.tokenizers import action as A

FAST = settings(max_examples=60, deadline=None)


def _f64(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def _random_rotations(n: int, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return A.quaternion_to_matrix(torch.randn(n, 4, generator=g, dtype=dtype))


def _conventions(**overrides) -> A.ActionConventions:
    base = dict(
        gripper_open="max",
        gripper_range="[0,1]",
        image_flip="none",
        action_space="absolute",
        translation_frame="world",
        rotation="rotation6d",
    )
    return A.ActionConventions(**{**base, **overrides})


# ------------------------------------------------------------------------------------------------------- registry


def test_registry_equals_reference_tables():
    from diffusers.pipelines.cosmos.pipeline_cosmos3_omni import (
        _EMBODIMENT_TO_DOMAIN_ID,
        _EMBODIMENT_TO_RAW_ACTION_DIM,
    )

    assert A.EMBODIMENT_TO_DOMAIN_ID == _EMBODIMENT_TO_DOMAIN_ID
    assert A.EMBODIMENT_TO_RAW_ACTION_DIM == _EMBODIMENT_TO_RAW_ACTION_DIM
    for name, e in A.EMBODIMENTS.items():
        assert e.domain_id == _EMBODIMENT_TO_DOMAIN_ID[name]
        assert e.raw_dim == _EMBODIMENT_TO_RAW_ACTION_DIM.get(name)
        assert e.raw_dim is None or e.raw_dim <= A.ACTION_DIM


def test_layouts_tile_the_raw_width():
    for e in A.EMBODIMENTS.values():
        if e.layout is None:
            continue
        assert e.layout[0].start == 0 and e.layout[-1].stop == e.raw_dim
        assert all(a.stop == b.start for a, b in zip(e.layout, e.layout[1:]))
        assert all(s.stop - s.start == A.SEGMENT_WIDTHS[s.kind] for s in e.layout)
    bridge = A.get_embodiment("bridge_orig_lerobot")
    assert bridge.channels("gripper") == [9] and bridge.channels("rotation6d") == list(range(3, 9))
    assert A.get_embodiment("agibotworld").pose_starts() == [0, 9, 19]
    assert A.get_embodiment("hand_pose").channels("fingertips") == list(range(18, 33)) + list(range(42, 57))
    assert A.domain_id("droid_lerobot") == A.domain_id("robomind-franka") == 8
    assert A.raw_action_dim("hand_pose") == 57


def test_registry_errors():
    with pytest.raises(ValueError, match="domain_name.*'franka'.*bridge_orig_lerobot"):
        A.get_embodiment("franka")
    with pytest.raises(TypeError, match="domain_name"):
        A.get_embodiment(7)
    with pytest.raises(ValueError, match="'libero' has no fixed action width"):
        A.raw_action_dim("libero")
    with pytest.raises(ValueError, match="galbot.*no documented block layout"):
        A.get_embodiment("galbot").channels("gripper")
    with pytest.raises(ValueError, match="kinds"):
        A.get_embodiment("umi").channels("wrist")


# -------------------------------------------------------------------------------------------------- normalization


def _trajectory_data(n=500, d=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64) * torch.linspace(0.1, 5, d) + torch.arange(d)


@pytest.mark.parametrize("mode", A.NORMALIZATION_MODES)
def test_normalize_round_trip(mode):
    x = _trajectory_data()
    norm = A.ActionNormalizer(mode).fit(x)
    y = norm.normalize(x)
    if mode == "quantile":
        assert y.min() >= -1 and y.max() <= 1
        low, high = norm.stats["low"], norm.stats["high"]
        assert torch.allclose(norm.normalize(low[None]), -torch.ones(1, 10, dtype=x.dtype), atol=1e-12)
        assert torch.allclose(norm.normalize(high[None]), torch.ones(1, 10, dtype=x.dtype), atol=1e-12)
        inside = ((x >= low) & (x <= high)).all(1)
        assert inside.float().mean() > 0.8
        assert torch.allclose(norm.denormalize(y[inside]), x[inside], atol=1e-12)
        # clipped values come back at the bound
        assert torch.allclose(norm.denormalize(y), x.clamp(low, high), atol=1e-12)
    else:
        assert torch.allclose(norm.denormalize(y), x, atol=1e-12)
    if mode == "meanstd":
        assert torch.allclose(y.mean(0), torch.zeros(10, dtype=y.dtype), atol=1e-12)
        assert torch.allclose(y.std(0, unbiased=False), torch.ones(10, dtype=y.dtype), atol=1e-12)
    if mode == "minmax":
        assert torch.allclose(y.min(0).values, -torch.ones(10, dtype=y.dtype))
    # float32 input stays float32 and round-trips to float32 precision (relative to the data scale)
    x32 = x.float()[:20]
    out = norm.denormalize(norm.normalize(x32))
    assert out.dtype == torch.float32
    if mode != "quantile":
        assert torch.allclose(out, x32, atol=1e-5 * x.abs().max().item())


def test_quantile_statistics_match_torch_quantile():
    x = _trajectory_data(n=333)
    norm = A.ActionNormalizer("quantile").fit(x)
    assert torch.allclose(norm.stats["low"], torch.quantile(x, 0.01, dim=0))
    assert torch.allclose(norm.stats["high"], torch.quantile(x, 0.99, dim=0))
    # clip=False makes quantile a plain invertible affine map
    free = A.ActionNormalizer("quantile", clip=False).fit(x)
    assert free.normalize(x).abs().max() > 1
    assert torch.allclose(free.denormalize(free.normalize(x)), x, atol=1e-12)


@pytest.mark.parametrize("mode", A.NORMALIZATION_MODES)
def test_constant_dimensions_and_skip_dims(mode):
    x = _trajectory_data(n=64, d=4)
    x[:, 1] = 3.5  # constant
    x[:, 3] = (x[:, 3] > 3).double()  # binary gripper, left untouched
    norm = A.ActionNormalizer(mode, skip_dims=[3]).fit(x)
    y = norm.normalize(x)
    assert torch.isfinite(y).all()
    assert torch.equal(y[:, 1], torch.zeros(64, dtype=y.dtype))
    assert torch.equal(y[:, 3], x[:, 3])
    assert torch.allclose(norm.denormalize(y)[:, [1, 3]], x[:, [1, 3]])


@pytest.mark.parametrize("mode", A.NORMALIZATION_MODES)
def test_save_load_is_exact(tmp_path, mode):
    x = _trajectory_data() * math.pi
    norm = A.ActionNormalizer(mode, skip_dims=[9], domain_name="bridge_orig_lerobot").fit(x)
    path = tmp_path / "action_stats.json"
    norm.save(path)
    loaded = A.ActionNormalizer.load(path, expected_dim=10)
    assert [p.name for p in tmp_path.iterdir()] == ["action_stats.json"]  # no temp file left behind
    assert loaded.mode == mode and loaded.skip_dims == (9,) and loaded.clip == norm.clip
    for k, v in norm.stats.items():
        assert torch.equal(loaded.stats[k], v)
    assert torch.equal(loaded.normalize(x), norm.normalize(x))
    assert loaded.to_dict() == norm.to_dict()


def _bad(data: dict, **changes) -> dict:
    data = json.loads(json.dumps(data))
    for key, value in changes.items():
        if value is ...:
            del data[key]
        else:
            data[key] = value
    return data


def test_load_rejects_bad_files(tmp_path):
    good = A.ActionNormalizer("quantile").fit(_trajectory_data(d=3)).to_dict()
    cases = {
        "missing.*stats": _bad(good, stats=...),
        "unexpected.*extra": _bad(good, extra=1),
        "mode.*'robust'": _bad(good, mode="robust"),
        "`dim`": _bad(good, dim="3"),
        "stats.low.*3 numbers": _bad(good, stats={"low": [0.0, 1.0], "high": [1.0, 2.0, 3.0]}),
        "stats.*exactly.*'low', 'high'": _bad(good, stats={"mean": [0.0] * 3, "std": [1.0] * 3}),
        "finite": _bad(good, stats={"low": [0.0, None, 1.0], "high": [1.0] * 3}),
        "low.*<=.*high": _bad(good, stats={"low": [2.0] * 3, "high": [1.0] * 3}),
        "clip": _bad(good, clip="yes"),
        "skip_dims.*out of range": _bad(good, skip_dims=[5]),
        "format": _bad(good, format="lerobot"),
        "domain.*bridge_orig_lerobot.*raw width 10": _bad(good, domain_name="bridge_orig_lerobot"),
    }
    for pattern, data in cases.items():
        with pytest.raises(ValueError, match=pattern):
            A.ActionNormalizer.from_dict(data)
    with pytest.raises(ValueError, match="`dim` 3 does not match `expected_dim` 10"):
        A.ActionNormalizer.from_dict(good, expected_dim=10)
    path = tmp_path / "broken.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        A.ActionNormalizer.load(path)


def test_normalizer_errors():
    with pytest.raises(ValueError, match="mode.*'zscore'"):
        A.ActionNormalizer("zscore")
    with pytest.raises(RuntimeError, match="not fitted"):
        A.ActionNormalizer().normalize(torch.zeros(2, 3))
    norm = A.ActionNormalizer().fit(_trajectory_data(d=3))
    with pytest.raises(ValueError, match="width 64 does not match.*3"):
        norm.normalize(torch.zeros(2, 64))
    with pytest.raises(TypeError, match="floating"):
        norm.normalize(torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="NaN"):
        A.ActionNormalizer().fit(torch.tensor([[0.0], [math.nan]]))
    with pytest.raises(ValueError, match=">= 2 samples"):
        A.ActionNormalizer().fit(torch.zeros(1, 3))
    with pytest.raises(ValueError, match="width 9 does not match domain 'umi'"):
        A.ActionNormalizer(domain_name="umi").fit(torch.randn(5, 9))


@FAST
@given(
    mode=st.sampled_from(A.NORMALIZATION_MODES),
    n=st.integers(2, 40),
    d=st.integers(1, 6),
    seed=st.integers(0, 2**31 - 1),
    scale=st.floats(1e-3, 1e3),
    lead=st.booleans(),
)
def test_normalization_property(mode, n, d, seed, scale, lead):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64) * scale + torch.randn(d, generator=g, dtype=torch.float64)
    if lead:
        x = x.reshape(1, n, d).expand(2, n, d)
    norm = A.ActionNormalizer(mode).fit(x)
    y = norm.normalize(x)
    assert y.shape == x.shape and torch.isfinite(y).all()
    back = norm.denormalize(y)
    tol = 1e-9 * (1 + x.abs().max())
    if mode == "quantile":
        assert y.min() >= -1 and y.max() <= 1
        assert torch.allclose(back, x.clamp(norm.stats["low"], norm.stats["high"]), atol=tol)
    else:
        assert torch.allclose(back, x, atol=tol)


# --------------------------------------------------------------------------------------------------------- padding


def test_pad_unpad_and_loss_mask():
    actions = torch.randn(8, 10)
    padded, mask = A.pad_actions(actions, domain_name="umi")
    assert padded.shape == (8, 64) and torch.equal(padded[:, :10], actions) and not padded[:, 10:].any()
    assert mask.shape == (64,) and mask.sum() == 10 and mask[:10].all()
    assert torch.equal(A.unpad_actions(padded, 10), actions)
    batch = [torch.randn(8, 10), torch.randn(8, 29), torch.randn(8, 2)]
    padded, mask = A.pad_action_batch(batch)
    assert padded.shape == (3, 8, 64) and mask.shape == (3, 1, 64)
    assert mask.sum(-1).flatten().tolist() == [10, 29, 2]
    for a, b in zip(A.unpad_action_batch(padded, [10, 29, 2]), batch):
        assert torch.equal(a, b)
    # errors in the padded channels carry no loss
    pred = padded.clone()
    pred[..., 40:] = 100.0
    assert flow.masked_mse(pred, padded, mask) == 0


def test_pad_errors():
    with pytest.raises(ValueError, match="width 70 exceeds `action_dim` 64"):
        A.pad_actions(torch.zeros(3, 70))
    with pytest.raises(ValueError, match="width 9 != raw width 10 of 'fractal'"):
        A.pad_actions(torch.zeros(3, 9), domain_name="fractal")
    with pytest.raises(ValueError, match="`actions` must have 2 dims"):
        A.pad_actions(torch.zeros(10))
    with pytest.raises(ValueError, match="share their length"):
        A.pad_action_batch([torch.zeros(3, 2), torch.zeros(4, 2)])
    with pytest.raises(ValueError, match="`raw_dims` has 1 entries"):
        A.unpad_action_batch(torch.zeros(2, 3, 64), [10])
    with pytest.raises(ValueError, match="`raw_dim`"):
        A.unpad_actions(torch.zeros(2, 64), 65)


def test_fit_chunk_length_matches_pipeline():
    actions = torch.arange(6.0).reshape(3, 2)
    assert torch.equal(A.fit_chunk_length(actions, 5)[3:], actions[-1:].expand(2, 2))
    assert torch.equal(A.fit_chunk_length(actions, 2), actions[:2])


# ------------------------------------------------------------------------------------------------------- rotations


def test_known_rotation_about_z():
    c = math.sqrt(0.5)
    rz90 = torch.tensor([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    assert torch.allclose(A.quaternion_to_matrix(torch.tensor([c, 0, 0, c], dtype=torch.float64)), rz90)
    assert torch.allclose(A.quaternion_to_matrix(_f64([0, 0, c, c]), order="xyzw"), rz90)
    assert torch.allclose(A.matrix_to_quaternion(rz90, order="xyzw"), _f64([0, 0, c, c]))
    assert torch.allclose(A.euler_to_matrix(_f64([0, 0, math.pi / 2]), "xyz"), rz90)
    assert torch.allclose(A.axis_angle_to_matrix(_f64([0, 0, math.pi / 2])), rz90)
    # 6D is the first two columns, concatenated
    assert torch.equal(A.matrix_to_rotation6d(rz90), _f64([0.0, 1, 0, -1, 0, 0]))
    assert torch.equal(A.matrix_to_rotation6d(rz90, convention="rows"), _f64([0.0, -1, 0, 1, 0, 0]))


def test_euler_conventions_are_named():
    roll, pitch, yaw = 0.3, -0.4, 1.1
    angles = torch.tensor([roll, pitch, yaw], dtype=torch.float64)
    rx, ry, rz = (A.euler_to_matrix(_f64(v), c) for v, c in (
        ([roll, 0, 0], "xyz"), ([0, pitch, 0], "xyz"), ([0, 0, yaw], "xyz")))  # fmt: skip
    assert torch.allclose(A.euler_to_matrix(angles, "xyz"), rz @ ry @ rx)  # extrinsic roll-pitch-yaw
    assert torch.allclose(A.euler_to_matrix(angles, "XYZ"), rx @ ry @ rz)  # intrinsic
    for bad in ("xyx", "xYz", "xy", "abc"):
        with pytest.raises(ValueError, match="Euler `convention`"):
            A.euler_to_matrix(angles, bad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rotation_round_trips(dtype):
    r = _random_rotations(256, dtype=dtype)
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    eye = torch.eye(3, dtype=dtype).expand_as(r)
    assert torch.allclose(r @ r.transpose(-1, -2), eye, atol=tol)
    for convention in ("columns", "rows"):
        d6 = A.matrix_to_rotation6d(r, convention=convention)
        assert d6.dtype == dtype and torch.allclose(A.rotation6d_to_matrix(d6, convention=convention), r, atol=tol)
    for order in ("wxyz", "xyzw"):
        q = A.matrix_to_quaternion(r, order=order)
        assert torch.allclose(A.quaternion_to_matrix(q, order=order), r, atol=tol)
    for convention in ("xyz", "XYZ", "zyx", "ZYX", "yxz", "YZX", "zxy", "XZY"):
        e = A.matrix_to_euler(r, convention)
        assert torch.allclose(A.euler_to_matrix(e, convention), r, atol=10 * tol)
    assert torch.allclose(A.axis_angle_to_matrix(A.matrix_to_axis_angle(r)), r, atol=10 * tol)
    for source in A.ROTATION_REPRESENTATIONS:
        for target in A.ROTATION_REPRESENTATIONS:
            x = A.convert_rotation(r, "matrix", source)
            back = A.convert_rotation(A.convert_rotation(x, source, target), target, "matrix")
            assert torch.allclose(back, r, atol=10 * tol), (source, target)


def test_gram_schmidt_and_edge_cases():
    d6 = torch.tensor([[2.0, 0.1, 0.0, 0.5, 3.0, 0.2]], dtype=torch.float64)
    r = A.rotation6d_to_matrix(d6)
    assert torch.allclose(r @ r.mT, torch.eye(3, dtype=torch.float64)[None]) and torch.det(r).item() > 0
    assert torch.allclose(r[..., :, 0], d6[:, :3] / d6[:, :3].norm())
    # 180 degree rotations (w = 0) and the identity take different branches of the quaternion extraction
    for axis in torch.eye(3, dtype=torch.float64):
        flipped = A.axis_angle_to_matrix(axis * math.pi)
        assert torch.allclose(A.quaternion_to_matrix(A.matrix_to_quaternion(flipped)), flipped, atol=1e-12)
    assert torch.allclose(A.matrix_to_axis_angle(torch.eye(3)), torch.zeros(3))
    tiny = torch.tensor([1e-7, -2e-7, 3e-8], dtype=torch.float64)
    assert torch.allclose(A.matrix_to_axis_angle(A.axis_angle_to_matrix(tiny)), tiny, atol=1e-15)
    # gimbal lock: angles are not unique, the matrix is
    for convention in ("xyz", "XYZ", "zyx"):
        locked = A.euler_to_matrix(torch.tensor([0.7, math.pi / 2, -0.3], dtype=torch.float64), convention)
        assert torch.allclose(A.euler_to_matrix(A.matrix_to_euler(locked, convention), convention), locked, atol=1e-9)


def test_rotation_errors():
    with pytest.raises(ValueError, match=r"`d6` must have shape \[\.\.\., 6\]"):
        A.rotation6d_to_matrix(torch.zeros(3, 9))
    with pytest.raises(ValueError, match="`order` 'ijkw'"):
        A.quaternion_to_matrix(torch.zeros(4), order="ijkw")
    with pytest.raises(TypeError, match="`matrix` must be a floating-point tensor"):
        A.matrix_to_quaternion(torch.eye(3, dtype=torch.long))
    with pytest.raises(ValueError, match="`source` 'euler'"):
        A.convert_rotation(torch.zeros(3), "euler", "matrix")


unit_quaternions = st.lists(st.floats(-1, 1), min_size=4, max_size=4).filter(
    lambda v: sum(c * c for c in v) > 1e-2
)


@FAST
@given(q=unit_quaternions)
def test_quaternion_properties(q):
    q = torch.nn.functional.normalize(torch.tensor(q, dtype=torch.float64), dim=0)
    r = A.quaternion_to_matrix(q)
    assert torch.allclose(r @ r.T, torch.eye(3, dtype=torch.float64), atol=1e-12)
    assert abs(torch.det(r).item() - 1) < 1e-12
    assert torch.allclose(A.rotation6d_to_matrix(A.matrix_to_rotation6d(r)), r, atol=1e-12)
    q_back = A.matrix_to_quaternion(r)
    assert torch.allclose(q_back, q, atol=1e-9) or torch.allclose(q_back, -q, atol=1e-9)  # q and -q: same rotation
    assert torch.allclose(A.matrix_to_quaternion(r, order="xyzw"), q_back.roll(-1), atol=0)


@FAST
@given(
    a=st.floats(-math.pi + 1e-3, math.pi - 1e-3),
    b=st.floats(-math.pi / 2 + 1e-2, math.pi / 2 - 1e-2),
    c=st.floats(-math.pi + 1e-3, math.pi - 1e-3),
    convention=st.sampled_from(["xyz", "XYZ", "zyx", "ZYX", "xzy", "YXZ"]),
)
def test_euler_round_trip_away_from_gimbal_lock(a, b, c, convention):
    angles = torch.tensor([a, b, c], dtype=torch.float64)
    back = A.matrix_to_euler(A.euler_to_matrix(angles, convention), convention)
    assert torch.allclose(back, angles, atol=1e-8)


# ----------------------------------------------------------------------------------------- absolute <-> delta


def _random_poses(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    positions = torch.randn(n, 3, generator=g, dtype=torch.float64)
    return torch.cat((positions, A.matrix_to_rotation6d(_random_rotations(n, seed))), -1)


@pytest.mark.parametrize("frame", A.TRANSLATION_FRAMES)
def test_pose_delta_round_trip(frame):
    poses = _random_poses(12)
    deltas = A.poses_to_deltas(poses, translation_frame=frame)
    assert deltas.shape == (11, 9)
    assert torch.allclose(A.deltas_to_poses(poses[0], deltas, translation_frame=frame), poses, atol=1e-10)
    r = A.rotation6d_to_matrix(poses[:, 3:])
    assert torch.allclose(A.rotation6d_to_matrix(deltas[:, 3:]), r[:-1].mT @ r[1:], atol=1e-12)
    world = poses[1:, :3] - poses[:-1, :3]
    expected = world if frame == "world" else (r[:-1].mT @ world[..., None])[..., 0]
    assert torch.allclose(deltas[:, :3], expected)
    # batched leading dims
    batch = torch.stack([poses, _random_poses(12, seed=1)])
    batch_deltas = A.poses_to_deltas(batch, translation_frame=frame)
    assert torch.allclose(A.deltas_to_poses(batch[:, 0], batch_deltas, translation_frame=frame), batch, atol=1e-10)


def test_embodiment_absolute_delta_and_conventions():
    g = torch.Generator().manual_seed(0)
    poses = [_random_poses(7, seed=s) for s in range(3)]
    grip = [torch.rand(7, 1, generator=g, dtype=torch.float64) for _ in range(2)]
    states = torch.cat((poses[0], poses[1], grip[0], poses[2], grip[1]), -1)  # agibot: ego + 2 x (arm + gripper)
    actions = A.absolute_to_delta(states, "agibotworld", translation_frame="body")
    assert actions.shape == (6, 29)
    assert torch.equal(actions[:, 18], states[1:, 18]) and torch.equal(actions[:, 28], states[1:, 28])
    back = A.delta_to_absolute(states[0], actions, "agibotworld", translation_frame="body")
    assert torch.allclose(back, states, atol=1e-10)
    absolute, delta_world = _conventions(), _conventions(action_space="delta")
    delta_body = _conventions(action_space="delta", translation_frame="body")
    assert torch.equal(A.convert_action_space(states, absolute, delta_body, domain_name="agibotworld"), actions)
    kwargs = dict(domain_name="agibotworld", initial_state=states[0])
    assert torch.allclose(A.convert_action_space(actions, delta_body, absolute, **kwargs), states, atol=1e-10)
    world = A.convert_action_space(actions, delta_body, delta_world, **kwargs)
    assert torch.allclose(world, A.absolute_to_delta(states, "agibotworld", translation_frame="world"), atol=1e-10)
    with pytest.raises(ValueError, match="initial_state"):
        A.convert_action_space(actions, delta_body, absolute, domain_name="agibotworld")
    with pytest.raises(ValueError, match="no 9D pose block"):
        A.absolute_to_delta(torch.zeros(4, 2), "pusht", translation_frame="world")
    with pytest.raises(ValueError, match=r"`states` must be \[\.\.\., T, 10\]"):
        A.absolute_to_delta(torch.zeros(4, 9), "umi", translation_frame="world")
    with pytest.raises(ValueError, match="`translation_frame` 'camera'"):
        A.poses_to_deltas(poses[0], translation_frame="camera")


# -------------------------------------------------------------------------------------------------------- chunking


@pytest.mark.parametrize("as_numpy", [False, True])
def test_chunking_reassembles_the_trajectory(as_numpy):
    frames = torch.arange(17 * 2 * 3 * 4, dtype=torch.uint8).reshape(17, 2, 3, 4)  # any per-frame shape
    frames = frames.numpy() if as_numpy else frames
    actions = torch.randn(16, 10)
    chunks = A.chunk_trajectory(frames, actions, 4)
    assert [c.start for c in chunks] == [0, 4, 8, 12]
    for c in chunks:
        A.check_chunk(c.frames, c.actions, chunk_size=4)
        assert (c.frames[0] == frames[c.start]).all()
    assert (chunks[0].frames[-1] == chunks[1].frames[0]).all()  # shared boundary frame
    merged_frames, merged_actions = A.merge_chunks(chunks)
    assert (merged_frames == frames).all() and torch.equal(merged_actions, actions)
    # overlapping windows and an end-aligned last chunk
    chunks = A.chunk_trajectory(frames, actions, 5, stride=3, drop_last=False)
    assert [c.start for c in chunks] == [0, 3, 6, 9, 11]
    merged_frames, merged_actions = A.merge_chunks(chunks)
    assert (merged_frames == frames).all() and torch.equal(merged_actions, actions)
    assert [c.start for c in A.chunk_trajectory(frames, actions, 5)] == [0, 5, 10]  # remainder dropped


def test_chunking_errors():
    frames, actions = torch.zeros(9, 3), torch.zeros(8, 2)
    with pytest.raises(ValueError, match="`frames` has 8 entries and `actions` 8"):
        A.chunk_trajectory(frames[:8], actions, 4)
    with pytest.raises(ValueError, match="`actions` has 8 entries, expected `chunk_size` 4"):
        A.check_chunk(frames, actions, chunk_size=4)
    with pytest.raises(ValueError, match="fewer than `chunk_size` 10"):
        A.chunk_trajectory(frames, actions, 10)
    with pytest.raises(ValueError, match="`stride`"):
        A.chunk_trajectory(frames, actions, 4, stride=0)
    chunks = A.chunk_trajectory(frames, actions, 2)
    with pytest.raises(ValueError, match=r"uncovered"):
        A.merge_chunks([chunks[0], chunks[2]])


# ----------------------------------------------------------------------------------------------------- conventions


def test_conventions_are_validated():
    with pytest.raises(ValueError, match=r"ActionConventions\.image_flip='upside_down'.*rotate180"):
        _conventions(image_flip="upside_down")
    with pytest.raises(ValueError, match=r"ActionConventions\.gripper_range='0-1'"):
        _conventions(gripper_range="0-1")
    with pytest.raises(TypeError):
        A.ActionConventions(gripper_open="max")  # every field is required
    libero = _conventions(gripper_open="min", gripper_range="[-1,1]", image_flip="rotate180")
    with pytest.raises(ValueError, match="gripper_open: expected 'max', got 'min'.*image_flip"):
        A.assert_conventions_match(_conventions(), libero, context="libero dataset")
    A.assert_conventions_match(libero, libero)


def test_convert_gripper():
    libero = _conventions(gripper_open="min", gripper_range="[-1,1]")
    unit = _conventions()
    g = torch.tensor([-1.0, 1.0, 0.0])  # open, closed, half
    assert torch.equal(A.convert_gripper(g, libero, unit), torch.tensor([1.0, 0.0, 0.5]))
    assert torch.equal(A.convert_gripper(A.convert_gripper(g, libero, unit), unit, libero), g)
    closed_is_one = _conventions(gripper_open="min")
    assert torch.equal(A.convert_gripper(torch.tensor([0.0, 1.0]), unit, closed_is_one), torch.tensor([1.0, 0.0]))
    with pytest.raises(ValueError, match="outside the source gripper_range"):
        A.convert_gripper(g, unit, libero)  # -1 cannot be a [0, 1] gripper


def test_image_flips():
    video = np.arange(2 * 4 * 5 * 3, dtype=np.uint8).reshape(2, 4, 5, 3)
    rotated = A.flip_images(video, "rotate180")
    assert np.array_equal(rotated, np.rot90(video, 2, axes=(1, 2)))
    assert np.array_equal(A.flip_images(video, "vertical"), video[:, ::-1])
    frames = torch.rand(2, 3, 4, 5)
    assert torch.equal(A.flip_images(frames, "horizontal"), frames.flip(-1))
    assert torch.equal(A.flip_images(frames, "rotate180"), torch.rot90(frames, 2, dims=(-2, -1)))
    libero, upright = _conventions(image_flip="rotate180"), _conventions()
    assert np.array_equal(A.convert_image_flip(A.convert_image_flip(video, libero, upright), upright, libero), video)
    assert torch.equal(A.convert_image_flip(frames, libero, _conventions(image_flip="vertical")), frames.flip(-1))
    with pytest.raises(ValueError, match=r"\[\.\.\., 3, H, W\]"):
        A.flip_images(torch.rand(2, 4, 5, 3), "vertical")
    with pytest.raises(ValueError, match="`flip` 'rot90'"):
        A.flip_images(frames, "rot90")


def test_degenerate_and_non_finite_inputs_are_refused():
    with pytest.raises(ValueError, match="degenerate 6D rotation"):
        A.rotation6d_to_matrix(torch.zeros(6))
    with pytest.raises(ValueError, match="degenerate 6D rotation"):
        A.rotation6d_to_matrix(torch.tensor([1.0, 0, 0, 2.0, 0, 0]))
    with pytest.raises(ValueError, match="zero quaternion"):
        A.quaternion_to_matrix(torch.zeros(4))
    with pytest.raises(ValueError, match="NaN or infinite"):
        A.matrix_to_quaternion(torch.full((3, 3), float("nan")))
    normalizer = A.ActionNormalizer("quantile").fit(torch.randn(100, 4, generator=torch.Generator().manual_seed(0)))
    with pytest.raises(ValueError, match="`actions` contains NaN or infinite"):
        normalizer.normalize(torch.tensor([[0.0, float("inf"), 0.0, 0.0]]))
    with pytest.raises(ValueError, match="`normalized` contains NaN"):
        normalizer.denormalize(torch.tensor([[0.0, float("nan"), 0.0, 0.0]]))
