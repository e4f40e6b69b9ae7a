"""`cosmos3 generate | train | distill | export`.

`cosmos3 generate`: run a task of a checkpoint folder and write the result.

    cosmos3 generate --task t2i --model ./Cosmos3-Nano --prompt "a red car" --out car.png
    cosmos3 generate --task t2v --model ./Cosmos3-Nano --prompt "waves" --frames 33 --height 480 --width 832 --out w.mp4
    cosmos3 generate --task i2v --model ./Cosmos3-Nano --prompt "..." --image first.png --out clip.mp4
    cosmos3 generate --task policy --model ./Cosmos3-Nano-Policy-DROID --prompt "open the drawer" --image obs.png \
        --domain droid_lerobot --chunk 16 --out rollout.mp4          # also writes rollout.json with the actions
    cosmos3 generate --task transfer --model ./Cosmos3-Nano --prompt "a snowy street" --video in.mp4 \
        --control edge,blur --control-video depth=depth.mp4 --out snowy.mp4   # edge and blur computed from in.mp4

Outputs: `.png` for t2i, `.mp4` (with sound when `--sound`) for video tasks, and a `.json` next to it with the
actions of policy / inverse dynamics.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

TASKS = ("t2i", "t2v", "i2v", "v2v", "transfer", "policy", "forward-dynamics", "inverse-dynamics")
COMPUTED_HINTS = ("edge", "blur")  # transfer hints computed from --video; the others come as --control-video


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cosmos3", description="Cosmos 3 world models.")
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate an image, a video or actions", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    g.add_argument("--task", required=True, choices=TASKS)
    g.add_argument("--model", default=None, help="checkpoint folder (the published diffusers layout); default: "
                   "Cosmos3-Tiny, shipped in the package")
    g.add_argument("--prompt", required=True)
    g.add_argument("--negative-prompt", default=None)
    g.add_argument("--out", required=True, help="output path (.png for t2i, .mp4 otherwise)")
    g.add_argument("--image", help="conditioning image (i2v, policy, forward-dynamics)")
    g.add_argument("--video", help="conditioning video (v2v, inverse-dynamics; transfer: the source of --control)")
    g.add_argument("--control", default=None,
                   help="transfer: hints computed from --video, comma-separated among " + ", ".join(COMPUTED_HINTS))
    g.add_argument("--control-video", action="append", default=[], metavar="NAME=PATH",
                   help="transfer: a hint clip given as a file (depth, seg, wsm, or edge/blur made elsewhere); repeat")
    g.add_argument("--control-guidance", type=float, default=None, help="transfer: guidance of the control axis")
    g.add_argument("--chunk-frames", type=int, default=None,
                   help="transfer: frames per window for long clips (default: one window)")
    g.add_argument("--actions", help="JSON file with a [T, D] list of actions (forward-dynamics)")
    g.add_argument("--domain", help="embodiment for action tasks, e.g. droid_lerobot")
    g.add_argument("--chunk", type=int, default=16, help="actions per chunk (action tasks)")
    g.add_argument("--tier", type=int, default=480, help="resolution tier for action tasks")
    g.add_argument("--frames", type=int, default=None, help="default: the model's call_defaults.json, else 33")
    g.add_argument("--height", type=int, default=None, help="default: the model's call_defaults.json, else 480")
    g.add_argument("--width", type=int, default=None, help="default: the model's call_defaults.json, else 832")
    g.add_argument("--fps", type=float, default=None, help="default: the model's call_defaults.json, else 24")
    g.add_argument("--steps", type=int, default=None, help="denoising steps (default: the task's)")
    g.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the task's)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--sound", action="store_true", help="also generate sound (video tasks)")
    g.add_argument("--device", default=None, help="cpu / cuda (default: cuda when available)")
    g.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    g.add_argument("--attention", default=None,
                   help="attention backend: native, flex, flash_varlen, tiled (default: tiled on a CPU in bfloat16, "
                        "where PyTorch's CPU attention runs at float32 speed; native otherwise)")
    g.add_argument("--cfg-parallel", type=int, default=1, metavar="N",
                   help="under torchrun: 2 runs the samples and their negatives (guidance) on two ranks")
    g.add_argument("--ulysses", type=int, default=1, metavar="N",
                   help="under torchrun: N ranks share each batch's generated tokens (Ulysses sequence parallelism)")
    g.add_argument("--sequence", default=None, choices=["ulysses", "ring"],
                   help="with --ulysses: head all-to-all or ring attention (default: ulysses when N divides the heads)")
    g.add_argument("--shard", default=None, choices=["fsdp", "tp"],
                   help="under torchrun: shard the transformer's weights over all ranks (FSDP2) or split its heads "
                        "and MLPs over each cfg group's ranks (DTensor tensor parallel)")
    g.add_argument("--vae-parallel", default=None, choices=["frames"],
                   help="under torchrun: split the VAE decode's latent frames over all ranks")
    t = sub.add_parser("train", help="fine-tune with a TOML recipe (also under torchrun)")
    t.add_argument("recipe", help="TOML recipe (see cosmos3.training.config)")
    d = sub.add_parser("distill", help="distill a few-step student with a TOML recipe (also under torchrun)")
    d.add_argument("recipe", help="TOML recipe (see cosmos3.training.distill)")
    e = sub.add_parser("export", help="write a pipeline folder from a training checkpoint")
    e.add_argument("checkpoint", help="a checkpoint-XXXXXXXX folder")
    e.add_argument("--model", required=True, help="the pipeline folder the run started from")
    e.add_argument("--out", required=True, help="the new pipeline folder")
    e.add_argument("--no-ema", action="store_true", help="export the trained weights instead of their EMA")
    r = sub.add_parser("rollout", help="closed-loop evaluation of a policy in a simulator")
    r.add_argument("--env", required=True, help="pusht, metaworld:<task>, aloha[:<task>]")
    r.add_argument("--policy", required=True, help="a checkpoint folder with policy_config.json, 'random', or "
                   "'expert' (the scripted expert, MetaWorld)")
    r.add_argument("--episodes", type=int, default=10)
    r.add_argument("--seed", type=int, default=0, help="episode i runs with seed + i")
    r.add_argument("--num-envs", type=int, default=1, help="environments stepped side by side")
    r.add_argument("--max-steps", type=int, default=None, help="default: the environment's episode limit")
    r.add_argument("--n-action-steps", type=int, default=None, help="actions executed per chunk (policy default)")
    r.add_argument("--steps", type=int, default=None, help="denoising steps (policy default)")
    r.add_argument("--videos", type=int, default=2, help="episodes to record as mp4")
    r.add_argument("--out", required=True, help="folder for eval_info.json and videos")
    r.add_argument("--device", default=None)
    r.add_argument("--cuda-graphs", action="store_true", help="replay each denoising step from a CUDA graph (GPU)")
    from .training.collect import _env_option_arg, _image_size_arg

    r.add_argument("--image-size", type=_image_size_arg, default=None,
                   help="camera SIZE or HEIGHTxWIDTH (render as the training data was)")
    r.add_argument("--env-option", type=_env_option_arg, action="append", default=[], metavar="KEY=VALUE",
                   help="an environment option, VALUE as JSON if it parses (repeatable), e.g. render_quality=fast")
    from .demo import add_demo_arguments

    dm = sub.add_parser("demo", help="serve the browser demo on 127.0.0.1 (needs the `demo` extra)")
    add_demo_arguments(dm)
    from .serving import add_serve_arguments as add_generation_serve_arguments

    sv = sub.add_parser("serve", help="serve the generation HTTP API (OpenAI images / videos shape) on 127.0.0.1")
    add_generation_serve_arguments(sv)
    c = sub.add_parser("collect", help="record successful scripted-expert episodes as a LeRobotDataset v3")
    from .training.collect import add_collect_arguments

    add_collect_arguments(c)
    try:
        from .robotics.server import add_serve_arguments
    except ImportError:  # the server's dependencies (websockets, msgpack) are not installed
        add_serve_arguments = None
    if add_serve_arguments is not None:
        s = sub.add_parser("serve-policy", help="serve a policy over WebSocket (openpi protocol)")
        add_serve_arguments(s)
        s.add_argument("--device", default=None)
        s.add_argument("--steps", type=int, default=None, help="denoising steps (policy default)")
        s.add_argument("--cuda-graphs", action="store_true",
                       help="replay each denoising step from a CUDA graph (GPU; captured at the first chunk)")
        s.add_argument("--ray", action="store_true",
                       help="serve on Ray Serve (the `serve` extra): model replicas batched with @serve.batch "
                            "behind an openpi WebSocket ingress; Ray from RAY_ADDRESS, else a local one")
        s.add_argument("--replicas", type=int, default=None, help="--ray: model replicas (default 1)")
        s.add_argument("--gpus-per-replica", type=float, default=None,
                       help="--ray: GPUs each replica reserves (default 1 where the Ray cluster has GPUs, else 0)")
        s.add_argument("--cpus-per-replica", type=float, default=None,
                       help="--ray: CPUs each replica reserves (default 1)")
    return parser


def _fail(message: str) -> None:
    print(f"cosmos3: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def generate(args: argparse.Namespace) -> dict:
    import numpy as np
    import torch

    from . import io as cio
    from .pipelines import (
        ActionRequest,
        Cosmos3ImageToVideoPipeline,
        Cosmos3TextToImagePipeline,
        Cosmos3TextToVideoPipeline,
        Cosmos3TransferPipeline,
        Cosmos3VideoToVideoPipeline,
        Cosmos3WorldActionPipeline,
    )

    ext = os.path.splitext(args.out)[1].lower()
    expected = ".png" if args.task == "t2i" else ".mp4"
    if ext != expected:
        _fail(f"--out for --task {args.task} must end in {expected}, got {args.out!r}")
    if args.model is None:
        from .assets import default_model_folder

        try:
            args.model = default_model_folder()
        except FileNotFoundError as e:
            _fail(str(e))
    if not os.path.isdir(args.model):
        _fail(f"--model {args.model!r} is not a folder")
    from .pipelines.common import read_call_defaults

    try:
        recommended = read_call_defaults(args.model)
    except ValueError as e:
        _fail(str(e))
    frames_given = args.frames  # transfer: the clip's length unless --frames is given
    fallback = {"num_frames": 33, "height": 480, "width": 832, "fps": 24.0}
    for arg, key in (("frames", "num_frames"), ("height", "height"), ("width", "width"), ("fps", "fps")):
        if getattr(args, arg) is None:
            setattr(args, arg, recommended.get(key, fallback[key]))
    for arg, key in (("steps", "num_inference_steps"), ("guidance", "guidance_scale")):
        if getattr(args, arg) is None and key in recommended:
            setattr(args, arg, recommended[key])
    needs = {"i2v": "image", "policy": "image", "forward-dynamics": "image", "v2v": "video",
             "inverse-dynamics": "video"}
    hints = _transfer_hints(args) if args.task == "transfer" else {}
    if args.task in needs and getattr(args, needs[args.task]) is None:
        _fail(f"--task {args.task} needs --{needs[args.task]}")
    action_task = args.task in ("policy", "forward-dynamics", "inverse-dynamics")
    if action_task and not args.domain:
        _fail(f"--task {args.task} needs --domain (an embodiment name, e.g. droid_lerobot)")
    if args.task == "forward-dynamics" and not args.actions:
        _fail("--task forward-dynamics needs --actions (a JSON [T, D] list)")

    from PIL import Image

    # Read every input before loading the model (minutes on a real checkpoint); frames go in as PIL images, which
    # every preprocessing path reads as 0..255.
    image = Image.fromarray(cio.read_image(args.image)) if args.image else None
    frames_in = ([Image.fromarray(f) for f in cio.read_video(args.video).frames]
                 if args.video and args.task != "transfer" else None)
    actions = None
    if args.actions:
        try:
            with open(args.actions) as f:
                actions = torch.tensor(json.load(f), dtype=torch.float32)
        except (OSError, ValueError, TypeError) as e:
            _fail(f"--actions {args.actions!r} is not a JSON [T, D] list of numbers: {e}")
    from .conditioning import resolve_device

    try:
        device = resolve_device(args.device, name="--device")
    except ValueError as e:
        _fail(str(e))
    device, writes = _join_ranks(args, device)
    from .models.attention import resolve_backend

    try:
        attention = resolve_backend(args.attention or
                                    ("tiled" if device.type == "cpu" and args.dtype == "bfloat16" else "native"))
    except ValueError as e:
        _fail(f"--attention: {e}")
    classes = {"t2i": Cosmos3TextToImagePipeline, "t2v": Cosmos3TextToVideoPipeline, "i2v": Cosmos3ImageToVideoPipeline,
               "v2v": Cosmos3VideoToVideoPipeline, "transfer": Cosmos3TransferPipeline}
    cls = classes.get(args.task, Cosmos3WorldActionPipeline)
    try:
        pipe = cls.from_pretrained(args.model, dtype=getattr(torch, args.dtype)).to(device)
    except OSError as e:
        _fail(f"--model {args.model!r} is not a readable Cosmos 3 checkpoint folder: {e}")
    pipe.transformer.set_attention_backend(attention)
    _parallelize(pipe, args)
    generator = torch.Generator(device="cpu").manual_seed(args.seed)
    common = dict(negative_prompt=args.negative_prompt, generator=generator, output_type="np")
    if args.steps is not None:
        common["num_inference_steps"] = args.steps
    if args.guidance is not None:
        common["guidance_scale"] = args.guidance
    video = dict(num_frames=args.frames, height=args.height, width=args.width, fps=args.fps, enable_sound=args.sound)

    if args.task == "t2i":
        out = pipe(args.prompt, height=args.height, width=args.width, **common)
        if writes:
            cio.write_image(args.out, (out.images[0] * 255).round().astype(np.uint8))
        return {"out": args.out}
    if args.task == "transfer":
        out = pipe(
            args.prompt, control_videos=hints, num_frames=frames_given, height=args.height, width=args.width,
            fps=args.fps, num_video_frames_per_chunk=args.chunk_frames,
            **({} if args.control_guidance is None else {"control_guidance": args.control_guidance}), **common)
    elif args.task == "t2v":
        out = pipe(args.prompt, **video, **common)
    elif args.task == "i2v":
        out = pipe(image, args.prompt, **video, **common)
    elif args.task == "v2v":
        out = pipe(frames_in, args.prompt, **video, **common)
    else:
        mode = args.task.replace("-", "_")
        request = ActionRequest(mode=mode, chunk_size=args.chunk, domain_name=args.domain, resolution_tier=args.tier,
                                image=image, video=frames_in, actions=actions)
        out = pipe(args.prompt, request, fps=args.fps, **common)
    if writes:
        out.save(args.out, args.fps)
    result = {"out": args.out}
    if writes and out.action is not None and out.action[0] is not None:
        actions_path = os.path.splitext(args.out)[0] + ".json"
        cio.atomic_write_json(actions_path, out.action[0].tolist(), indent=None)
        result["actions"] = actions_path
    return result


def _join_ranks(args: argparse.Namespace, device):
    """`--cfg-parallel`, `--ulysses`, `--shard`, `--vae-parallel`: join the process group `torchrun` describes,
    before the model loads (each rank on its own GPU, `cuda:LOCAL_RANK`). Returns the rank's device and whether it
    writes the outputs: every rank computes the same result, rank 0 writes it."""
    if args.cfg_parallel == 1 and args.ulysses == 1 and args.shard is None and args.vae_parallel is None:
        return device, True
    if "WORLD_SIZE" not in os.environ:
        _fail("--cfg-parallel / --ulysses / --shard / --vae-parallel need several processes: launch with torchrun "
              "--nproc-per-node N")
    import atexit

    import torch.distributed as dist

    from .training.parallel import init_distributed

    info = init_distributed(device.type)
    if dist.is_initialized():
        atexit.register(dist.destroy_process_group)  # on every way out of `generate`
    return info.device, info.is_main


def _parallelize(pipe, args: argparse.Namespace) -> None:
    if args.cfg_parallel != 1 or args.ulysses != 1 or args.shard is not None or args.vae_parallel is not None:
        from .parallel import parallelize

        parallelize(pipe, cfg=args.cfg_parallel, ulysses=args.ulysses, shard=args.shard, sequence=args.sequence,
                    vae=args.vae_parallel)


def _transfer_hints(args: argparse.Namespace) -> dict:
    """The hint clips of `--task transfer` as uint8 `[T, H, W, 3]` arrays: `--control` maps computed from `--video`,
    `--control-video NAME=PATH` read from files; every clip at the same size and frame rate."""
    from . import io as cio
    from .pipelines.transfer import HINTS

    computed = [h for h in (args.control or "").split(",") if h]
    bad = [h for h in computed if h not in COMPUTED_HINTS]
    if bad:
        _fail(f"--control {args.control!r}: {bad} cannot be computed here; valid: {list(COMPUTED_HINTS)} (give "
              "depth, seg or wsm clips with --control-video NAME=PATH)")
    clips, rates = {}, {}
    if computed:
        if args.video is None:
            _fail("--control computes its maps from --video; give --video IN.mp4")
        from .tokenizers.control import blur_map, edge_map

        source = cio.read_video(args.video)
        for name in computed:
            clips[name] = (edge_map if name == "edge" else blur_map)(source.frames)
            rates[name] = source.fps
    for item in args.control_video:
        name, _, path = item.partition("=")
        if name not in HINTS or not path:
            _fail(f"--control-video {item!r}: expected NAME=PATH with NAME among {list(HINTS)}")
        if name in clips:
            _fail(f"--control-video {name!r} is given twice (or also computed by --control)")
        clip = cio.read_video(path)
        clips[name], rates[name] = clip.frames, clip.fps
    if not clips:
        _fail("--task transfer needs hints: --control edge[,blur] with --video, and/or --control-video NAME=PATH")
    sizes = {name: clip.shape[1:3] for name, clip in clips.items()}
    if len(set(sizes.values())) > 1:
        _fail(f"the hint clips differ in size (height, width): {sizes}; make them from the same source clip")
    if len({round(r, 3) for r in rates.values()}) > 1:
        _fail(f"the hint clips differ in frame rate: {rates}; make them from the same source clip")
    return clips


def _make_policy(path: str, args: argparse.Namespace):
    from .robotics.policy import Cosmos3Policy

    if not os.path.isdir(path):
        _fail(f"--policy {path!r} is not a folder")
    overrides = {"num_inference_steps": args.steps} if getattr(args, "steps", None) else {}
    return _with_cuda_graphs(Cosmos3Policy.from_pretrained(path, device=args.device, **overrides), args)


def _with_cuda_graphs(policy, args: argparse.Namespace):
    if getattr(args, "cuda_graphs", False):
        device = policy.pipeline.transformer.device
        if device.type != "cuda":
            _fail(f"--cuda-graphs needs a CUDA device; the policy runs on {device}")
        policy.pipeline.enable_cuda_graphs()
    return policy


def rollout(args: argparse.Namespace) -> dict:
    from .robotics.envs import make_env
    from .robotics.rollout import ExpertPolicy, RandomPolicy
    from .robotics.rollout import rollout as run

    env_options = dict(args.env_option)
    if args.image_size is not None:
        env_options["image_size"] = args.image_size
    if args.policy == "expert":
        policy = ExpertPolicy("scripted")
    elif args.policy == "random":
        env = make_env(args.env)
        low, high = env.action_low, env.action_high
        env.close()
        policy = RandomPolicy(low, high, seed=args.seed)
    else:
        from .robotics.policy import Cosmos3Policy

        if not os.path.isdir(args.policy):
            _fail(f"--policy {args.policy!r} is neither a folder nor 'random' / 'expert'")
        overrides = {k: v for k, v in (("n_action_steps", args.n_action_steps), ("num_inference_steps", args.steps))
                     if v is not None}
        policy = Cosmos3Policy.from_pretrained(args.policy, device=args.device, seed=args.seed, **overrides)
        policy = _with_cuda_graphs(policy, args)
    return run(policy, args.env, args.episodes, seed=args.seed, num_envs=args.num_envs, max_steps=args.max_steps,
               out_dir=args.out, videos=args.videos, env_options=env_options)


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    try:
        if args.command == "generate":
            print(json.dumps(generate(args)))
        elif args.command == "train":
            from .training import recipes

            recipes.train(args.recipe)
        elif args.command == "distill":
            from .training import recipes

            recipes.distill(args.recipe)
        elif args.command == "rollout":
            print(json.dumps(rollout(args)["aggregated"]))
        elif args.command == "demo":
            from .demo import run_demo

            try:
                run_demo(args)
            except ImportError as e:  # gradio missing: the message says `pip install 'cosmos3[demo]'`
                _fail(str(e))
        elif args.command == "serve":
            from .serving import run_serve

            run_serve(args)
        elif args.command == "collect":
            from .training.collect import run_collect

            print(json.dumps(run_collect(args), default=str))
        elif args.command == "serve-policy":
            ray_only = [f"--{n.replace('_', '-')}" for n in ("replicas", "gpus_per_replica", "cpus_per_replica")
                        if getattr(args, n) is not None]
            if args.ray:
                try:
                    from .robotics.ray_serve import run_ray_serve
                except ImportError as e:  # ray[serve] missing: the message says `pip install 'cosmos3[serve]'`
                    _fail(str(e))
                if not os.path.isdir(args.policy):
                    _fail(f"--policy {args.policy!r} is not a folder")
                run_ray_serve(args)
            elif ray_only:
                _fail(f"{' '.join(ray_only)} needs --ray")
            else:
                from .robotics.server import run_serve

                run_serve(args, _make_policy)
        elif args.command == "export":
            from .training.export import export_checkpoint

            out = export_checkpoint(args.checkpoint, args.model, args.out, use_ema=not args.no_ema)
            print(json.dumps({"pipeline": out}))
    except (ValueError, TypeError, FileNotFoundError, FileExistsError, RuntimeError) as e:
        _fail(str(e))


if __name__ == "__main__":
    main()
