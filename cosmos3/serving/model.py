"""The served model: a checkpoint folder loaded once, one pipeline per task sharing its weights, and the planning of
each endpoint's request into a `Job` (fields checked and media decoded in the HTTP thread, before anything waits
for the model; the pipeline call and the encoding of its output in `Job.run`, on the worker).

A request's result is what calling the pipeline directly gives: the same arguments, `output_type="np"`, and a
`torch.Generator("cpu").manual_seed(seed)` per sample (image `i` of `n`: `seed + i`, all in one batched call), then
`cosmos3.io.write_image(path, to_uint8(out.images[i]))` for an image and `cosmos3.io.write_video(path,
to_uint8(out.frames[0]), fps)` for a video (whose H.264 bytes are not always reproducible: see `encode_video`).
"""

from __future__ import annotations

import copy
import inspect
import os
import re
import secrets
import tempfile
from collections.abc import Callable

import numpy as np

from .api import ApiError, Fields, ServeLimits, decode_image, decode_video
from .jobs import Job

MAX_SEED = 2**63 - 1
FALLBACK = {"num_frames": 33, "height": 480, "width": 832, "fps": 24.0}  # as `cosmos3 generate`, without defaults
IMAGE_FORMATS = {"png": ".png", "jpeg": ".jpg", "webp": ".webp"}
ACTION_MODES = ("policy", "forward_dynamics", "inverse_dynamics")
COMPUTED_HINTS = ("edge", "blur")  # transfer hints computed from `input_video`; the others come as clips


def _callback(step: Callable[[int, int], None]) -> Callable:
    """A `callback_on_step_end` reporting each finished denoising step to the job (which may raise `Cancelled`)."""

    def callback(pipe, i: int, t, tensors: dict) -> dict:
        step(i + 1, pipe.num_timesteps)
        return {}

    return callback


def _generators(seed: int, n: int) -> list:
    import torch

    return [torch.Generator(device="cpu").manual_seed(seed + i) for i in range(n)]


def _encoded(write: Callable[[str], None], suffix: str) -> bytes:
    """The bytes a writer of `cosmos3.io` puts in a file (they write atomically to paths, not to buffers)."""
    with tempfile.TemporaryDirectory(prefix="cosmos3-serve-") as folder:
        path = os.path.join(folder, "out" + suffix)
        write(path)
        with open(path, "rb") as f:
            return f.read()


def to_uint8(images: np.ndarray) -> np.ndarray:
    """`output_type="np"` floats in [0, 1] -> uint8, rounded as `cosmos3 generate` does."""
    return (np.clip(images, 0, 1) * 255).round().astype(np.uint8)


def encode_video(frames: np.ndarray, fps: float) -> dict:
    """`[T, H, W, 3]` floats in [0, 1] -> {"video": mp4 bytes, "thumbnail": PNG bytes of the first frame}.

    The mp4 is what `Cosmos3PipelineOutput.save` writes (`cosmos3.io.write_video`, H.264). Its bytes are not always
    reproducible: for frames whose width is not a multiple of 128 (Cosmos3-Tiny's 64, 832), libx264 now and then
    codes identical frames differently (2 to 22% of encodes at 32 and 64 pixels here, single-threaded too, never at
    128 or 256), which points at uninitialised row padding in the RGB -> YUV frames it reads. The thumbnail is
    lossless, so it is the exact pixels of the pipeline's first frame."""
    from .. import io as cio

    frames = to_uint8(frames)
    return {"video": _encoded(lambda p: cio.write_video(p, frames, fps), ".mp4"),
            "thumbnail": _encoded(lambda p: cio.write_image(p, frames[0]), ".png")}


class ServedModel:
    """A checkpoint folder's pipelines, loaded once: text-to-image, text-to-video, image-to-video, video-to-video,
    transfer and world action, all built from the same components (one transformer in memory); each has its own
    scheduler copy. `unavailable[task]` says why the checkpoint cannot do a task (distilled students: no transfer
    or world action; no action heads: no world action)."""

    def __init__(self, folder: str, *, device: str | None = None, dtype=None, attention: str | None = None,
                 limits: ServeLimits | None = None):
        import torch

        from ..conditioning import resolve_device
        from ..models.attention import resolve_backend
        from ..pipelines import (
            Cosmos3ImageToVideoPipeline,
            Cosmos3TextToImagePipeline,
            Cosmos3TextToVideoPipeline,
            Cosmos3TransferPipeline,
            Cosmos3VideoToVideoPipeline,
            Cosmos3WorldActionPipeline,
        )
        from ..pipelines.common import read_call_defaults

        if not isinstance(folder, (str, os.PathLike)) or not os.path.isfile(os.path.join(folder, "model_index.json")):
            raise FileNotFoundError(f"--model {folder!r} is not a pipeline folder (no model_index.json).")
        self.folder = str(folder)
        self.id = re.sub(r"[^A-Za-z0-9._-]", "-", os.path.basename(os.path.normpath(self.folder))) or "cosmos3"
        self.limits = limits or ServeLimits()
        self.device = resolve_device(device, name="--device")
        if dtype is None:
            dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.defaults = read_call_defaults(self.folder)

        base = Cosmos3TextToImagePipeline.from_pretrained(self.folder, dtype=dtype).to(self.device)
        backend = attention or ("tiled" if self.device.type == "cpu" and dtype == torch.bfloat16 else "native")
        base.transformer.set_attention_backend(resolve_backend(backend))
        base.set_progress_bar_config(disable=True)
        components = dict(base.components)
        flags = {k: base.config[k] for k in ("default_use_system_prompt", "use_native_flow_schedule",
                                             "distilled_sigmas")}

        def build(cls):
            pipe = cls(**{**components, "scheduler": copy.deepcopy(base.scheduler)}, **flags)
            pipe.set_progress_bar_config(disable=True)
            return pipe

        self.pipes = {"t2i": base, "t2v": build(Cosmos3TextToVideoPipeline), "i2v": build(Cosmos3ImageToVideoPipeline),
                      "v2v": build(Cosmos3VideoToVideoPipeline), "transfer": build(Cosmos3TransferPipeline)}
        self.spatial = int(base.vae.config.scale_factor_spatial)
        self.temporal = int(base.vae.config.scale_factor_temporal)
        self.unavailable: dict[str, str | None] = dict.fromkeys(("t2i", "t2v", "i2v", "v2v", "transfer", "action"))
        distilled = bool(flags["distilled_sigmas"])
        if distilled:
            self.unavailable["transfer"] = "This is a distilled (few-step) checkpoint: transfer needs the many-step " \
                                           "sampler."
        self.policy = self.normalizer = None
        self.embodiment_widths: dict[str, int] = {}
        if not base.transformer.config.action_gen:
            self.unavailable["action"] = "This checkpoint has no action heads (`action_gen=False`)."
        elif distilled:
            self.unavailable["action"] = "This is a distilled (few-step) checkpoint: its schedule covers images and " \
                                         "videos, not actions."
        else:
            self.pipes["action"] = build(Cosmos3WorldActionPipeline)
            self._load_policy(int(base.transformer.config.action_dim))

    def _load_policy(self, model_action_dim: int) -> None:
        """`policy_config.json` sets the world-action defaults and `action_normalizer.json` maps actions to and from
        the robot's units (for the policy's own embodiment), as `Cosmos3Policy` and the demo do."""
        from ..robotics.policy import CONFIG_NAME, NORMALIZER_NAME, PolicyConfig
        from ..tokenizers.action import EMBODIMENT_TO_RAW_ACTION_DIM, ActionNormalizer

        if os.path.isfile(os.path.join(self.folder, CONFIG_NAME)):
            self.policy = PolicyConfig.load(self.folder)
            path = os.path.join(self.folder, NORMALIZER_NAME)
            if os.path.isfile(path):
                self.normalizer = ActionNormalizer.load(path, expected_dim=self.policy.action_dim)
        widths = {name: w for name, w in EMBODIMENT_TO_RAW_ACTION_DIM.items() if w <= model_action_dim}
        if self.policy is not None and self.policy.action_dim is not None \
                and self.policy.action_dim <= model_action_dim:
            widths[self.policy.embodiment] = self.policy.action_dim
        self.embodiment_widths = widths

    # ------------------------------------------------------------------------------------------------ shared reads

    def _require(self, task: str, param: str | None = None) -> None:
        if self.unavailable.get(task):
            raise ApiError(400, self.unavailable[task], param=param, code="unsupported_task")

    def _common(self, f: Fields, pipe, *, guidance: bool = True) -> dict:
        """`model`, `seed`, `num_inference_steps`, `guidance_scale`: the server's defaults are the folder's
        `call_defaults.json`, else the pipeline's (steps capped at --max-steps)."""
        model = f.raw("model")
        if model is not None and model != self.id:
            raise ApiError(404, f"`model` {model!r} is not served here; this server runs {self.id!r}.", param="model",
                           code="model_not_found")
        signature = inspect.signature(type(pipe).__call__).parameters
        steps = self.defaults.get("num_inference_steps", signature["num_inference_steps"].default)
        out = {"seed": f.number("seed", low=0, high=MAX_SEED, default=None, integer=True),
               "num_inference_steps": f.number("num_inference_steps", low=1, high=self.limits.max_steps,
                                               default=min(steps, self.limits.max_steps), integer=True)}
        if out["seed"] is None:  # recorded in the reply, so a result can always be reproduced
            out["seed"] = secrets.randbelow(2**31)
        if guidance:
            out["guidance_scale"] = f.number("guidance_scale", low=0.0, high=100.0, integer=False,
                                             default=self.defaults.get("guidance_scale",
                                                                       signature["guidance_scale"].default))
        return out

    def _size(self, f: Fields) -> tuple[int, int]:
        default = (self.defaults.get("height", FALLBACK["height"]), self.defaults.get("width", FALLBACK["width"]))
        return f.size("size", default, factor=self.spatial, max_pixels=self.limits.max_pixels)

    def _frames(self, f: Fields, fps: float, default: int | None) -> int | None:
        """`num_frames`, or Sora's `seconds` (frames = 1 + seconds x fps); a whole number 1 + k x the VAE's temporal
        factor, within --max-frames."""
        frames, seconds = f.raw("num_frames"), f.raw("seconds")
        if frames is not None and seconds is not None:
            raise ApiError(400, "Give `num_frames` or `seconds`, not both.", param="seconds")
        name = "num_frames"
        if seconds is not None:
            name = "seconds"
            if isinstance(seconds, str):  # Sora sends it as a string ("4"), in JSON as in forms
                try:
                    seconds = float(seconds)
                except ValueError:
                    raise ApiError(400, f"`seconds` must be a number, got {seconds!r}.", param="seconds") from None
            if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not 0 < seconds < 1e6:
                raise ApiError(400, f"`seconds` must be a positive number, got {seconds!r}.", param="seconds")
            exact = seconds * fps
            if abs(exact - round(exact)) > 1e-6:
                raise ApiError(400, f"`seconds` {seconds:g} at {fps:g} fps is {exact:g} frame intervals, not a whole "
                               "number; give `num_frames` instead.", param="seconds")
            frames = 1 + round(exact)
        else:
            frames = f.number("num_frames", low=1, high=10**6, default=default, integer=True)
            if frames is None:
                return None
        if frames > self.limits.max_frames:
            raise ApiError(400, f"`{name}` asks for {frames} frames; the limit is {self.limits.max_frames} "
                           "(--max-frames).", param=name)
        if frames < 2 or (frames - 1) % self.temporal:
            raise ApiError(400, f"`{name}` gives {frames} frames; a video has 1 + k x {self.temporal} frames "
                           f"(k >= 1: {1 + self.temporal}, {1 + 2 * self.temporal}, ...).", param=name)
        return frames

    def _prompt(self, f: Fields, name: str = "prompt", required: bool = True) -> str | None:
        return f.text(name, limit=self.limits.max_prompt_chars, required=required)

    # ------------------------------------------------------------------------------------------------------ images

    def plan_images(self, f: Fields) -> Job:
        """`POST /v1/images/generations`: n images for a prompt, in one batched call."""
        pipe = self.pipes["t2i"]
        prompt, negative = self._prompt(f), self._prompt(f, "negative_prompt", required=False)
        n = f.number("n", low=1, high=self.limits.max_n, default=1, integer=True)
        height, width = self._size(f)
        f.choice("response_format", ("b64_json",), "b64_json")  # no `url`: the server keeps no files to link to
        fmt = f.choice("output_format", tuple(IMAGE_FORMATS), "png")
        common = self._common(f, pipe)
        f.done()
        seed = common.pop("seed")

        def run(step):
            from .. import io as cio

            out = pipe(prompt, negative_prompt=negative, height=height, width=width, num_images_per_prompt=n,
                       generator=_generators(seed, n), output_type="np", callback_on_step_end=_callback(step),
                       **common)
            return [_encoded(lambda p, im=im: cio.write_image(p, im), IMAGE_FORMATS[fmt])
                    for im in to_uint8(out.images)]

        return Job("image", "t2i", run, info={"seed": seed, "n": n, "size": f"{width}x{height}",
                                              "output_format": fmt})

    # ------------------------------------------------------------------------------------------------------ videos

    def plan_video(self, f: Fields) -> Job:
        """`POST /v1/videos`: t2v; i2v with `input_reference`; v2v with `input_video`; transfer with `control` /
        `control_videos` (computed hints from `input_video`)."""
        hint_parts = {k: v for k, v in f.values.items() if re.fullmatch(r"control_videos\[\w+\]", k)}
        transfer = "control" in f or "control_videos" in f or bool(hint_parts)
        if "input_reference" in f and "input_video" in f:
            raise ApiError(400, "Give `input_reference` (an image: image-to-video) or `input_video` (a clip), not "
                           "both.", param="input_video")
        task = ("transfer" if transfer else "v2v" if "input_video" in f else "i2v" if "input_reference" in f
                else "t2v")
        self._require(task)
        pipe = self.pipes[task]
        prompt, negative = self._prompt(f), self._prompt(f, "negative_prompt", required=False)
        height, width = self._size(f)
        fps = f.number("fps", low=0.0, high=240.0, low_open=True,
                       default=float(self.defaults.get("fps", FALLBACK["fps"])))
        frames = self._frames(f, fps, None if task == "transfer" else self.defaults.get("num_frames",
                                                                                       FALLBACK["num_frames"]))
        common = self._common(f, pipe)
        seed = common.pop("seed")
        kwargs = dict(negative_prompt=negative, height=height, width=width, fps=fps, **common)
        if task == "transfer":
            args = (prompt,)
            kwargs["control_videos"] = self._hints(f, hint_parts)
            kwargs["num_frames"] = frames
            guidance = f.number("control_guidance", low=-100.0, high=100.0, default=None)
            if guidance is not None:
                kwargs["control_guidance"] = guidance
            from ..pipelines.transfer import HINTS

            # as the pipeline counts them: the first hint's length (in HINTS order), or fewer if asked
            length = len(kwargs["control_videos"][next(h for h in HINTS if h in kwargs["control_videos"])])
            frames = min(frames or length, length)
        else:
            kwargs["num_frames"] = frames
            if task == "i2v":
                args = (decode_image(f.media("input_reference"), "input_reference", self.limits), prompt)
            elif task == "v2v":
                args = (decode_video(f.media("input_video"), "input_video", self.limits).frames, prompt)
            else:
                args = (prompt,)
        f.done()

        def run(step):
            if task in ("i2v", "v2v"):
                from PIL import Image

                # frames go in as PIL images, which every preprocessing path reads as 0..255 (`cosmos3 generate`)
                media = Image.fromarray(args[0]) if task == "i2v" else [Image.fromarray(x) for x in args[0]]
                call = (media, prompt)
            else:
                call = args
            out = pipe(*call, generator=_generators(seed, 1), output_type="np", callback_on_step_end=_callback(step),
                       **kwargs)
            return encode_video(out.frames[0], fps)

        return Job("video", task, run, info={"seed": seed, "size": f"{width}x{height}", "num_frames": frames,
                                             "fps": fps})

    def _hints(self, f: Fields, parts: dict) -> dict:
        """Transfer's control clips: `control` (names among edge, blur) computed from `input_video`, and
        `control_videos` ({name: base64 mp4} in JSON; `control_videos[name]` files in a form), all one size."""
        from ..pipelines.transfer import HINTS
        from ..tokenizers.control import blur_map, edge_map

        computed = f.raw("control")
        if isinstance(computed, str):
            computed = [c.strip() for c in computed.split(",") if c.strip()]
        if computed is not None and (not isinstance(computed, list) or
                                     not all(isinstance(c, str) and c in COMPUTED_HINTS for c in computed)):
            raise ApiError(400, f"`control` must list hints among {list(COMPUTED_HINTS)} (computed from "
                           f"`input_video`), got {computed!r}; give other hints as `control_videos`.", param="control")
        given = f.raw("control_videos")
        if given is not None and not (isinstance(given, dict) and not f.form):
            raise ApiError(400, "`control_videos` must be an object {name: base64 video} (in a form: one file per "
                           "hint, named `control_videos[name]`).", param="control_videos")
        given = dict(given or {})
        for key, value in parts.items():
            f.read.add(key)
            given[key[len("control_videos["):-1]] = value
        clips, names = {}, list(computed or [])
        if names:
            if "input_video" not in f:
                raise ApiError(400, f"`control` {names} is computed from `input_video`; give the source clip.",
                               param="input_video")
            source = decode_video(f.media("input_video"), "input_video", self.limits).frames
            for name in names:
                clips[name] = (edge_map if name == "edge" else blur_map)(source)
        elif "input_video" in f:
            raise ApiError(400, "`input_video` is the source of `control` hints; with `control_videos` only it is "
                           "not used: leave it out or name hints in `control`.", param="input_video")
        for name, value in given.items():
            param = f"control_videos[{name}]"
            if name not in HINTS or name in clips:
                raise ApiError(400, f"`{param}`: a hint name must be one of {list(HINTS)} and given once.",
                               param=param)
            fields_ = Fields({param: value}, f.form)
            clips[name] = decode_video(fields_.media(param), param, self.limits).frames
        if not clips:
            raise ApiError(400, "Transfer needs hints: `control` with `input_video`, and/or `control_videos`.",
                           param="control")
        sizes = {name: clip.shape[1:3] for name, clip in clips.items()}
        if len(set(sizes.values())) > 1:
            raise ApiError(400, f"The hint clips differ in size (height, width): {sizes}.", param="control_videos")
        return clips

    # ---------------------------------------------------------------------------------------------- world action

    def plan_actions(self, f: Fields) -> Job:
        """`POST /v1/actions`: a policy chunk (actions and the predicted video from an image), forward dynamics (the
        video from an image and actions) or inverse dynamics (the actions of a clip)."""
        from ..pipelines import ActionRequest

        self._require("action")
        pipe = self.pipes["action"]
        mode = f.choice("mode", ACTION_MODES, "policy")
        prompt = self._prompt(f)
        policy = self.policy
        embodiment = f.raw("embodiment")
        if embodiment is None and policy is not None:
            embodiment = policy.embodiment
        if embodiment not in self.embodiment_widths:
            raise ApiError(400, f"`embodiment` must be one of {sorted(self.embodiment_widths)}, got {embodiment!r}.",
                           param="embodiment")
        own = policy is not None and policy.embodiment == embodiment
        chunk = f.number("chunk_size", low=1, high=self.limits.max_chunk, integer=True,
                         default=min(policy.chunk_size if own else 16, self.limits.max_chunk))
        tier = f.number("resolution_tier", low=0, high=10**4, integer=True,
                        default=policy.resolution_tier if own else 256)
        fps = f.number("fps", low=0.0, high=1000.0, low_open=True, default=policy.fps if own else 10.0)
        view = f.raw("view_point") or ((policy.view_point if own else None) or "ego_view")
        if not isinstance(view, str):
            raise ApiError(400, f"`view_point` must be a string, got {view!r}.", param="view_point")
        if "guidance_scale" not in f and own:
            f.values["guidance_scale"] = policy.guidance_scale
        if "num_inference_steps" not in f and own:
            f.values["num_inference_steps"] = min(policy.num_inference_steps, self.limits.max_steps)
        common = self._common(f, pipe)
        seed = common.pop("seed")
        return_video = f.flag("return_video", mode == "forward_dynamics")
        image = video = actions = None
        normalized = not (own and self.normalizer is not None)
        if mode == "inverse_dynamics":
            clip = decode_video(f.media("video"), "video", self.limits) if "video" in f else None
            if clip is None:
                raise ApiError(400, "`mode` inverse_dynamics needs `video` (the clip whose actions are inferred).",
                               param="video")
            video = clip.frames
        else:
            if "image" not in f:
                raise ApiError(400, f"`mode` {mode} needs `image` (the first frame).", param="image")
            image = decode_image(f.media("image"), "image", self.limits)
        if mode == "forward_dynamics":
            actions = self._actions(f, self.embodiment_widths[embodiment])
            if not normalized:
                actions = self.normalizer.normalize(actions)
        f.done()
        from ..tokenizers.action import EMBODIMENT_TO_RAW_ACTION_DIM

        try:
            request = ActionRequest(
                mode=mode, chunk_size=chunk, domain_name=embodiment, resolution_tier=tier, view_point=view,
                image=None if image is None else _pil(image), video=None if video is None else [_pil(x) for x in video],
                actions=actions,
                action_dim=None if embodiment in EMBODIMENT_TO_RAW_ACTION_DIM else self.embodiment_widths[embodiment])
        except ValueError as e:  # tier, view point: ActionRequest's own checks name the argument
            raise ApiError(400, str(e), param=_param_of(str(e))) from None

        def run(step):
            out = pipe(prompt, request, fps=fps, generator=_generators(seed, 1), output_type="np",
                       callback_on_step_end=_callback(step), **common)
            result = {"actions": None, "video": None}
            if out.action[0] is not None:
                values = out.action[0].float().cpu()
                result["actions"] = (values if normalized else self.normalizer.denormalize(values)).tolist()
            if return_video:
                result["video"] = encode_video(out.frames[0], fps)["video"]
            return result

        return Job("action", mode, run, info={"seed": seed, "embodiment": embodiment, "chunk_size": chunk,
                                              "normalized": normalized if mode != "forward_dynamics" else None})

    def _actions(self, f: Fields, width: int):
        import torch

        value = f.raw("actions")
        if isinstance(value, str) and f.form:
            import json

            try:
                value = json.loads(value)
            except ValueError:
                raise ApiError(400, "`actions` must be a JSON array [T][D] of numbers.", param="actions") from None
        ok = (isinstance(value, list) and 0 < len(value) <= self.limits.max_chunk and
              all(isinstance(row, list) and len(row) == width and
                  all(isinstance(x, (int, float)) and not isinstance(x, bool) and np.isfinite(x) for x in row)
                  for row in value))
        if not ok:
            raise ApiError(400, f"`actions` must be an array of 1..{self.limits.max_chunk} rows of {width} finite "
                           "numbers (the embodiment's action width) for forward_dynamics.", param="actions")
        return torch.tensor(value, dtype=torch.float32)

    def describe(self) -> dict:
        """`GET /v1/models` entry."""
        return {"id": self.id, "object": "model", "created": int(os.path.getmtime(self.folder)), "owned_by": "local",
                "tasks": [t for t, why in self.unavailable.items() if why is None],
                "defaults": self.defaults, "embodiments": sorted(self.embodiment_widths)}


def _pil(frame: np.ndarray):
    from PIL import Image

    return Image.fromarray(frame)


def _param_of(message: str) -> str | None:
    """The field an `ActionRequest` error names (its messages quote the argument in backticks)."""
    match = re.search(r"`(\w+)`", message)
    return match[1] if match and match[1] in ("resolution_tier", "view_point", "chunk_size") else None
