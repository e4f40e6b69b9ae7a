"""Environment adapters: the observation contract, reproducibility, action validation and each convention checked
against the simulator itself (image orientation from pixels and camera geometry, gripper sign from the fingers).

Simulators render on the CPU here, so environments are module fixtures with tiny images and `render_quality="fast"`.
"""

import gc
import warnings

import numpy as np
import pytest
import torch

from cosmos3.tokenizers.action import EMBODIMENTS, ActionConventions, convert_gripper, flip_images

pytest.importorskip("gymnasium")
from cosmos3.robotics.envs import (  # noqa: E402
    ALOHA_INSTRUCTIONS,
    IMAGE_PREFIX,
    METAWORLD_CAMERA_FLIPS,
    METAWORLD_INSTRUCTIONS,
    STATE_KEY,
    TASK_CHARSET,
    TASK_MAX_LENGTH,
    make_env,
    metaworld_instruction,
    metaworld_tasks,
)

CORNER2 = IMAGE_PREFIX + "corner2"


@pytest.fixture(scope="module")
def pusht():
    pytest.importorskip("gym_pusht")
    with make_env("pusht", render_size=96) as env:
        yield env


@pytest.fixture(scope="module")
def metaworld():
    pytest.importorskip("metaworld")
    with make_env("metaworld:reach-v3", image_size=32, render_quality="fast") as env:
        yield env


def check_obs(env, obs):
    assert set(obs) == {*(IMAGE_PREFIX + c for c in env.cameras), STATE_KEY, "task"}
    for camera in env.cameras:
        image = obs[IMAGE_PREFIX + camera]
        assert image.dtype == np.uint8 and image.shape == (*env.image_size, 3)
    assert obs[STATE_KEY].dtype == np.float32 and obs[STATE_KEY].shape == (env.state_dim,)
    assert isinstance(obs["task"], str) and obs["task"] == env.task
    features = env.features
    assert features[STATE_KEY]["shape"] == [env.state_dim] and len(features[STATE_KEY]["names"]) == env.state_dim
    assert features["action"]["shape"] == [env.action_dim] and len(features["action"]["names"]) == env.action_dim


def rollout(env, seed, actions):
    obs = [env.reset(seed=seed)[0]]
    for action in actions:
        obs.append(env.step(action)[0])
    return obs


def assert_same(a, b):
    assert a.keys() == b.keys()
    for key in a:
        if key == "task":
            assert a[key] == b[key]
        else:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_make_env_rejects_bad_specs():
    for spec in ("nope", "metaworld", "pusht:extra", "Meta-World/MT1"):
        with pytest.raises(ValueError, match="spec"):
            make_env(spec)
    pytest.importorskip("metaworld")
    with pytest.raises(ValueError, match="reach-v3"):  # suggests the close match
        make_env("metaworld:reach-v2")


def test_embodiments_are_registered():
    """pusht uses its own 2-d domain; metaworld and aloha use libero, the domain whose width is per dataset."""
    assert EMBODIMENTS["pusht"].raw_dim == 2
    assert EMBODIMENTS["libero"].raw_dim is None


# ---------------------------------------------------------------------------------------------------- gymnasium


def gym_warnings(caught):
    """The messages of gymnasium's `logger.warn` warnings (prefixed "WARN: ", colorized)."""
    return [str(w.message).split("WARN: ", 1)[-1] for w in caught if "WARN: " in str(w.message)]


@pytest.mark.parametrize("spec, options", [("pusht", {"render_size": 96}),
                                           ("metaworld:reach-v3", {"image_size": 32, "render_quality": "fast"})])
def test_check_env_passes(spec, options):
    """gymnasium's own checker, render check included (it also rebuilds the environment from `env.spec`). PushT's
    only remark is its pixel action box, [0, 512] as gym-pusht declares it, not the [-1, 1] RL libraries prefer."""
    pytest.importorskip("gym_pusht" if spec == "pusht" else "metaworld")
    from gymnasium.utils.env_checker import check_env

    with make_env(spec, **options) as env, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_env(env.unwrapped)
    remarks = gym_warnings(caught)
    if spec == "pusht":
        assert len(remarks) == 1 and "symmetric and normalized space" in remarks[0], remarks
    else:
        assert remarks == []
    assert env.spec.id == {"pusht": "cosmos3/PushT-v0"}.get(spec, "cosmos3/MetaWorld-v0")


def test_gymnasium_api(pusht):
    import gymnasium as gym
    from gymnasium import spaces

    assert isinstance(pusht, gym.Env) and pusht.unwrapped is pusht
    assert pusht.metadata["render_modes"] == ["rgb_array"] and pusht.metadata["render_fps"] == pusht.fps
    assert pusht.render_mode == "rgb_array"
    assert pusht.action_space == spaces.Box(0.0, 512.0, (2,), np.float32)
    space = pusht.observation_space
    assert isinstance(space, spaces.Dict) and set(space) == {IMAGE_PREFIX + "top", STATE_KEY, "task"}
    assert space[IMAGE_PREFIX + "top"] == spaces.Box(0, 255, (96, 96, 3), np.uint8)
    assert space[STATE_KEY] == spaces.Box(0.0, 512.0, (2,), np.float32)
    obs, info = pusht.reset(seed=0)
    check_obs(pusht, obs)
    assert obs in space and info == {"seed": 0}
    assert pusht.step(pusht.action_space.sample())[0] in space
    assert (pusht.spec.id, pusht.spec.kwargs) == ("cosmos3/PushT-v0", {"render_size": 96})
    with pytest.raises(ValueError, match="`options`"):
        pusht.reset(seed=0, options={"layout": 1})
    with pytest.raises(ValueError, match="`render_mode`"):
        make_env("pusht", render_mode="human")


def test_same_seed_same_first_observation(pusht):
    """A seed gives the same episode; `reset()` without one continues from `np_random` (seeded by the last seeded
    reset, as in gymnasium) and reports the seed it drew, which replays that episode."""
    first, _ = pusht.reset(seed=5)
    state = pusht.np_random.bit_generator.state
    assert_same(pusht.reset(seed=5)[0], first)
    assert pusht.np_random.bit_generator.state == state
    unseeded, info = pusht.reset()
    assert not np.array_equal(unseeded[STATE_KEY], first[STATE_KEY])
    pusht.reset(seed=5)
    again, again_info = pusht.reset()
    assert_same(again, unseeded)
    assert again_info == info and 0 <= info["seed"] < 2**32
    assert_same(pusht.reset(seed=info["seed"])[0], unseeded)


def test_gym_make_registered_id():
    pytest.importorskip("gym_pusht")
    import gymnasium as gym

    with gym.make("cosmos3/PushT-v0", render_size=96) as env:
        assert env.spec.id == "cosmos3/PushT-v0" and env.unwrapped.name == "pusht"
        obs, _ = env.reset(seed=2)
        with make_env("pusht", render_size=96) as direct:
            assert_same(direct.reset(seed=2)[0], obs)
            with gym.make(direct.spec) as remade:  # the spec `make_env` records rebuilds the same environment
                assert remade.unwrapped.spec == direct.spec
                assert_same(remade.reset(seed=2)[0], obs)


def test_record_episode_statistics():
    pytest.importorskip("gym_pusht")
    from gymnasium.wrappers import RecordEpisodeStatistics

    with RecordEpisodeStatistics(make_env("pusht", max_episode_steps=3)) as env:
        env.reset(seed=0)
        rewards = []
        for action in ([100.0, 100.0], [200.0, 300.0], [300.0, 200.0]):
            _, reward, terminated, truncated, info = env.step(np.array(action))
            rewards.append(reward)
        assert truncated and not terminated
        assert info["episode"]["l"] == 3 and info["episode"]["r"] == pytest.approx(sum(rewards))
        assert list(env.length_queue) == [3]


def test_sync_vector_env_steps():
    pytest.importorskip("gym_pusht")
    from gymnasium.vector import SyncVectorEnv

    actions = np.array([[100.0, 100.0], [300.0, 400.0]], np.float32)
    envs = SyncVectorEnv([lambda: make_env("pusht") for _ in range(2)])
    try:
        obs, _ = envs.reset(seed=3)  # seeds 3 and 4
        assert obs[IMAGE_PREFIX + "top"].shape == (2, 96, 96, 3) and obs[STATE_KEY].shape == (2, 2)
        obs, rewards, terminated, truncated, info = envs.step(actions)
        assert obs[IMAGE_PREFIX + "top"].dtype == np.uint8 and rewards.shape == terminated.shape == (2,)
        assert obs["task"] == (envs.envs[0].task,) * 2
        np.testing.assert_array_equal(info["action"], actions)
    finally:
        envs.close()
    with make_env("pusht") as env:  # the vector's second environment is this one, seeded 4
        env.reset(seed=4)
        single = env.step(actions[1])[0]
    np.testing.assert_array_equal(obs[IMAGE_PREFIX + "top"][1], single[IMAGE_PREFIX + "top"])
    np.testing.assert_array_equal(obs[STATE_KEY][1], single[STATE_KEY])
    # One-step episodes: the vector resets an ended environment (without a seed) at its next step, never steps it.
    envs = SyncVectorEnv([lambda: make_env("pusht", max_episode_steps=1) for _ in range(2)])
    try:
        envs.reset(seed=0)
        truncations = [envs.step(actions)[3].tolist() for _ in range(3)]
    finally:
        envs.close()
    assert truncations == [[True, True], [False, False], [True, True]]


# -------------------------------------------------------------------------------------------------------- PushT


def test_pusht_reset_step_render(pusht):
    assert (pusht.embodiment, pusht.fps, pusht.max_episode_steps, pusht.action_dim) == ("pusht", 10.0, 300, 2)
    assert pusht.action_dim == EMBODIMENTS[pusht.embodiment].raw_dim
    obs, _ = pusht.reset(seed=0)
    check_obs(pusht, obs)
    assert pusht.image_size == (96, 96)
    obs, reward, terminated, truncated, info = pusht.step(np.array([256.0, 256.0]))
    check_obs(pusht, obs)
    assert isinstance(reward, float) and terminated is False and truncated is False
    assert info["is_success"] is False and info["step"] == 1 and info["action"].dtype == np.float32
    frame = pusht.render()
    assert frame.dtype == np.uint8 and frame.shape == (96, 96, 3)
    with pytest.raises(ValueError, match="render_size"):
        make_env("pusht", render_size=64)


def test_pusht_reproducible(pusht):
    actions = [np.array([100.0 + 20 * i, 300.0]) for i in range(5)]
    a, b = rollout(pusht, 7, actions), rollout(pusht, 7, actions)
    for x, y in zip(a, b):
        assert_same(x, y)
    c = rollout(pusht, 8, actions[:0])
    assert not np.array_equal(a[0][IMAGE_PREFIX + "top"], c[0][IMAGE_PREFIX + "top"])


def test_pusht_conventions_state_is_pixel_xy(pusht):
    """Absolute actions, no gripper, upright image: the agent (blue disk) sits at column x, row y (x, y / 512)."""
    assert pusht.conventions.action_space == "absolute" and pusht.gripper_channels == ()
    assert pusht.conventions.image_flip == "none" and pusht.raw_image_flips == {"top": "none"}
    np.testing.assert_array_equal(pusht.action_low, [0, 0])
    np.testing.assert_array_equal(pusht.action_high, [512, 512])
    obs, _ = pusht.reset(seed=3)
    for _ in range(4):  # drive the agent toward a known corner of the workspace
        obs, *_ = pusht.step(np.array([120.0, 400.0]))
    image = obs[IMAGE_PREFIX + "top"].astype(int)
    blue = (image[..., 2] > 150) & (image[..., 0] < 120) & (image[..., 2] - image[..., 1] > 60)
    rows, cols = np.nonzero(blue)
    x, y = obs[STATE_KEY]
    assert abs(cols.mean() - x * 96 / 512) < 3 and abs(rows.mean() - y * 96 / 512) < 3


def test_action_validation(pusht):
    with pytest.raises(RuntimeError, match="reset"):
        make_env("pusht").step(np.zeros(2))
    for seed in (-1, 1.5, True, 2**32, "0"):
        with pytest.raises(ValueError, match="`seed`"):
            pusht.reset(seed=seed)
    pusht.reset(seed=0)
    bad = [np.zeros(3), np.zeros((1, 2)), np.array([np.nan, 1.0]), np.array([1.0, np.inf]),
           np.array([True, False]), np.array(["1", "2"]), np.array([1 + 1j, 0])]  # fmt: skip
    for action in bad:
        with pytest.raises(ValueError, match="`action`"):
            pusht.step(action)
    _, _, _, _, info = pusht.step(np.array([-10, 600]))  # ints, out of range: clipped
    assert info["action_clipped"] is True
    np.testing.assert_array_equal(info["action"], [0.0, 512.0])
    _, _, _, _, info = pusht.step(torch.tensor([200.0, 200.0]))
    assert info["action_clipped"] is False
    strict = make_env("pusht", out_of_range="error")
    strict.reset(seed=0)
    with pytest.raises(ValueError, match=r"`action` channels \[1\]"):
        strict.step(np.array([10.0, 513.0]))
    strict.close()
    with pytest.raises(RuntimeError, match="closed"):
        strict.reset(seed=0)


def test_episode_ends_at_truncation():
    pytest.importorskip("gym_pusht")
    with make_env("pusht", max_episode_steps=2) as env:
        env.reset(seed=0)
        assert env.step(np.array([1.0, 1.0]))[3] is False
        _, _, terminated, truncated, _ = env.step(np.array([1.0, 1.0]))
        assert (terminated, truncated) == (False, True)
        with pytest.raises(RuntimeError, match="ended"):
            env.step(np.array([1.0, 1.0]))
        env.reset(seed=0)  # a new episode may start
        assert env.elapsed_steps == 0


# ---------------------------------------------------------------------------------------------------- MetaWorld


def test_metaworld_reset_step_render(metaworld):
    assert (metaworld.embodiment, metaworld.fps, metaworld.max_episode_steps) == ("libero", 80.0, 500)
    assert (metaworld.action_dim, metaworld.state_dim, metaworld.cameras) == (4, 4, ("corner2",))
    obs, _ = metaworld.reset(seed=0)
    check_obs(metaworld, obs)
    assert obs["task"] == "reach the goal position"
    np.testing.assert_allclose(obs[STATE_KEY], metaworld.full_state[:4].astype(np.float32))
    obs, reward, terminated, truncated, info = metaworld.step(np.zeros(4, np.float32))
    check_obs(metaworld, obs)
    assert info["is_success"] is False and info["success"] == 0.0 and not terminated and not truncated
    frame = metaworld.render()
    assert frame.dtype == np.uint8 and frame.shape == (32, 32, 3)
    np.testing.assert_array_equal(frame, obs[CORNER2])


def test_metaworld_reproducible_layouts(metaworld):
    actions = [np.array([0.5, -0.3, 0.2, 1.0])] * 4
    a = rollout(metaworld, 11, actions)
    goal_a = metaworld.full_state[36:39].copy()
    b = rollout(metaworld, 11, actions)
    for x, y in zip(a, b):
        assert_same(x, y)
    np.testing.assert_array_equal(metaworld.full_state[36:39], goal_a)
    metaworld.reset(seed=12)  # another seed, another goal
    assert np.abs(metaworld.full_state[36:39] - goal_a).max() > 1e-3


def test_metaworld_several_envs_render_their_own_frames(metaworld):
    """Each adapter makes its GL context current before rendering (gymnasium leaves the newest one current, and
    closing that environment frees it), and frees its MuJoCo GL objects in its own context when closed (freed
    later by the garbage collector, they would be deleted in this environment's context: black frames)."""
    before = metaworld.reset(seed=4)[0][CORNER2]
    with make_env("metaworld:push-v3", image_size=32, render_quality="fast", cameras="corner3") as other:
        other_frame = other.reset(seed=4)[0][IMAGE_PREFIX + "corner3"]
        np.testing.assert_array_equal(metaworld.reset(seed=4)[0][CORNER2], before)
        np.testing.assert_array_equal(other.reset(seed=4)[0][IMAGE_PREFIX + "corner3"], other_frame)
        assert not np.array_equal(before, other_frame)
    np.testing.assert_array_equal(metaworld.reset(seed=4)[0][CORNER2], before)  # the current context was freed
    del other
    gc.collect()  # a closed environment's MuJoCo context must not take this one's GL objects with it
    np.testing.assert_array_equal(metaworld.reset(seed=4)[0][CORNER2], before)


def test_metaworld_mt1_goals_cycle():
    pytest.importorskip("metaworld")
    with make_env("metaworld:reach-v3", image_size=16, render_quality="fast", goals="mt1") as env:
        goals = []
        for seed in (0, 1, 50):
            env.reset(seed=seed)
            goals.append(env.full_state[36:39].copy())
    assert np.abs(goals[0] - goals[1]).max() > 1e-3
    np.testing.assert_array_equal(goals[0], goals[2])  # 50 fixed layouts: seed % 50


def test_metaworld_images_upright(metaworld):
    """Upright: MetaWorld's gray backdrop fills the top of corner2's frame and raising the hand moves the red arm
    up in the image. The raw render (`upright=False`) is the same frame rotated 180 degrees."""
    assert metaworld.raw_image_flips == {"corner2": "rotate180"} and metaworld.conventions.image_flip == "none"
    obs, _ = metaworld.reset(seed=0)

    def backdrop(image):  # MetaWorld's backdrop color, about (127, 126, 122)
        return (np.abs(image.astype(int) - [127, 126, 122]).max(-1) < 12).mean(-1)

    def arm_row(image):
        image = image.astype(int)
        red = (image[..., 0] > 120) & (image[..., 1] < 80) & (image[..., 2] < 80)
        return np.nonzero(red)[0].mean()

    image = obs[CORNER2]
    rows = backdrop(image)
    assert rows[:8].mean() > 0.5 > 0.25 > rows[-8:].mean()
    z0, row0 = obs[STATE_KEY][2], arm_row(image)
    for _ in range(25):
        obs, *_ = metaworld.step(np.array([0.0, 0.0, 1.0, -1.0]))
    assert obs[STATE_KEY][2] > z0 + 0.1 and arm_row(obs[CORNER2]) < row0 - 1
    with make_env("metaworld:reach-v3", image_size=32, render_quality="fast", upright=False) as raw:
        assert raw.conventions.image_flip == "rotate180"
        np.testing.assert_array_equal(raw.reset(seed=0)[0][CORNER2], flip_images(image, "rotate180"))


def test_metaworld_camera_flips_match_geometry(metaworld):
    """A fixed camera renders upside down exactly when its image-up axis points toward the floor."""
    import mujoco

    model, data = metaworld._raw.model, metaworld._raw.data
    mujoco.mj_forward(model, data)
    for camera in ("corner", "corner2", "corner3", "corner4", "topview"):
        up = data.cam_xmat[mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_CAMERA, camera)].reshape(3, 3)[:, 1]
        assert (METAWORLD_CAMERA_FLIPS[camera] == "rotate180") == (up[2] < -1e-6), camera


def test_metaworld_gripper_sign(metaworld):
    """+1 closes and -1 opens (gripper_open="min" of [-1, 1]); the state's opening channel is 1 when open."""
    conv = metaworld.conventions
    assert (conv.gripper_open, conv.gripper_range, conv.action_space) == ("min", "[-1,1]", "delta")
    assert metaworld.gripper_channels == (3,)
    obs, _ = metaworld.reset(seed=0)
    assert obs[STATE_KEY][3] > 0.95  # episodes start open
    for _ in range(15):
        obs, *_ = metaworld.step(np.array([0.0, 0.0, 0.0, 1.0]))
    closed = obs[STATE_KEY][3]
    for _ in range(15):
        obs, *_ = metaworld.step(np.array([0.0, 0.0, 0.0, -1.0]))
    assert closed < 0.5 < 0.9 < obs[STATE_KEY][3]
    openness = ActionConventions(gripper_open="max", gripper_range="[0,1]", image_flip="none",
                                 action_space="delta", translation_frame="world", rotation="rotation6d")
    assert convert_gripper(torch.tensor([-1.0, 1.0]), conv, openness).tolist() == [1.0, 0.0]


def test_metaworld_expert_succeeds_and_terminates(metaworld):
    from cosmos3.robotics.experts import scripted_expert

    expert = scripted_expert(metaworld)
    obs, _ = metaworld.reset(seed=0)
    for _ in range(metaworld.max_episode_steps):
        obs, _, terminated, truncated, info = metaworld.step(expert(obs))
        if terminated or truncated:
            break
    assert terminated and not truncated and info["is_success"] is True


def test_metaworld_instructions():
    pytest.importorskip("metaworld")
    tasks = metaworld_tasks()
    assert len(tasks) == 50
    assert {t.rsplit("-v", 1)[0] for t in tasks} == set(METAWORLD_INSTRUCTIONS)
    assert metaworld_instruction("reach-v3") == "reach the goal position"
    assert metaworld_instruction("new-task-v9") == "new task"
    from gymnasium import spaces

    task_space = spaces.Text(TASK_MAX_LENGTH, charset=TASK_CHARSET)  # every observation's `task` is in the space
    assert all(metaworld_instruction(t) in task_space for t in tasks)
    assert all(instruction in task_space for instruction in ALOHA_INSTRUCTIONS.values())


# ------------------------------------------------------------------------------------------------------- ALOHA


def test_aloha_reset_step():
    pytest.importorskip("gym_aloha")
    with make_env("aloha:AlohaTransferCube-v0", image_size=(24, 32), render_quality="fast") as env:
        assert (env.embodiment, env.fps, env.action_dim, env.state_dim) == ("libero", 50.0, 14, 14)
        assert env.gripper_channels == (6, 13) and env.conventions.gripper_open == "max"
        assert env.conventions.action_space == "absolute" and env.task_name == "AlohaTransferCube-v0"
        assert (env.action_low[[6, 13]] == 0).all() and (env.action_high[[6, 13]] == 1).all()
        assert env.action_low[1] < -1 < 1 < env.action_high[4]  # joint ranges, not gym-aloha's declared [-1, 1]
        first, _ = env.reset(seed=0)
        obs = first
        check_obs(env, obs)
        assert obs in env.observation_space and env.action_space.shape == (14,)
        state = obs[STATE_KEY]
        for _ in range(2):
            obs, reward, terminated, truncated, info = env.step(state)  # hold the start pose
        check_obs(env, obs)
        assert info["is_success"] is False and not terminated and not truncated
        np.testing.assert_allclose(obs[STATE_KEY], state, atol=0.05)
        assert env.render().shape == (480, 640, 3)
        again, _ = env.reset(seed=0)
        np.testing.assert_array_equal(again[STATE_KEY], state)
        np.testing.assert_array_equal(again[IMAGE_PREFIX + "top"], first[IMAGE_PREFIX + "top"])
