"""The demo's page: one gradio tab per task wired to a `DemoApp`'s handlers, what each tab shows first, and the
options the page is served with.

Every model call shares one `concurrency_id` with limit 1, whatever the tab: the tabs share the weights and the
scheduler state. The launch options keep the server local and closed (no share link, capped uploads, nothing served
beyond gradio's own cache, gradio's optional services off).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .handlers import MAX_SEED, TRANSFER_HINTS, DemoApp, DemoLimits, _gradio
from .plotting import draw_landscape, draw_tabletop

if TYPE_CHECKING:
    import gradio as gr

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860
CONCURRENCY_ID = "cosmos3-model"  # every model call shares it: one at a time, whatever the tab
EXAMPLES_FILE = "demo_examples.json"


@dataclass(frozen=True)
class _Defaults:
    """What the page shows first: small on CPU (seconds per request), the usual sizes on a GPU."""

    steps: int
    height: int
    width: int
    frames: int
    guidance: float = 6.0


def _defaults(device: str, limits: DemoLimits, recommended: dict | None = None) -> _Defaults:
    """`recommended`: the model folder's `call_defaults.json` (a small model's training size wins over ours)."""
    if device.startswith("cuda"):
        steps, height, width, frames = 35, 480, 832, 33
    else:
        steps, height, width, frames = 8, 256, 256, 9
    recommended = recommended or {}
    steps = recommended.get("num_inference_steps", steps)
    height, width = recommended.get("height", height), recommended.get("width", width)
    frames = recommended.get("num_frames", frames)
    while height * width > limits.max_pixels and (height > 16 or width > 16):
        height, width = max(16, height // 32 * 16), max(16, width // 32 * 16)
    frames = min(frames, 1 + (limits.max_frames - 1) // 4 * 4)
    return _Defaults(min(steps, limits.max_steps), min(height, limits.max_side // 16 * 16),
                     min(width, limits.max_side // 16 * 16), frames, recommended.get("guidance_scale", 6.0))


def _model_examples(folder: str) -> dict:
    """A model folder's own example inputs (`demo_examples.json`: `t2i` prompts, `world_action` entries with an
    `image` path inside the folder and an `instruction`), e.g. captions and MetaWorld frames for Cosmos3-Tiny,
    which knows nothing of sports cars. Entries pointing outside the folder are ignored. {} when absent."""
    import json

    path = os.path.join(folder, EXAMPLES_FILE)
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        data = json.load(f)
    root = os.path.realpath(folder)
    prompts = [p for p in data.get("t2i", []) if isinstance(p, str)]
    world = []
    for entry in data.get("world_action", []):
        image = os.path.realpath(os.path.join(root, str(entry.get("image", ""))))
        if image.startswith(root + os.sep) and os.path.isfile(image) and isinstance(entry.get("instruction"), str):
            world.append({"image": image, "instruction": entry["instruction"]})
    return {"t2i": prompts, "world_action": world}


def _draw_examples(folder: str) -> dict[str, str]:
    """The drawn example pictures, saved as files in `folder` because gradio's examples are given by path."""
    paths = {}
    for name, draw in (("tabletop", draw_tabletop), ("landscape", draw_landscape)):
        paths[name] = os.path.join(folder, f"{name}.png")
        draw().save(paths[name])
    return paths


def build_page(app: DemoApp) -> gr.Blocks:
    """The page: one tab per task, each with examples and a progress bar; all model calls share one queue slot."""
    from ..pipelines.common import read_call_defaults

    gr = _gradio()
    lim = app.limits
    d = _defaults(app.device, lim, read_call_defaults(app.model_folder))
    examples, model_examples = _draw_examples(app.workdir), _model_examples(app.model_folder)
    side = lim.max_side // 16 * 16
    run = dict(concurrency_id=CONCURRENCY_ID, concurrency_limit=1)
    steps_fixed = app.distilled_steps is not None
    title = f"Cosmos 3 demo: {os.path.basename(os.path.normpath(app.model_folder))}"
    # gradio finds these by their type in the event functions' defaults and swaps in a tracker per call; the
    # text pipeline reports per token through its tqdm bar, the others per denoising step (callback_on_step_end).
    step_progress, token_progress = gr.Progress(), gr.Progress(track_tqdm=True)

    def steps_slider(value: int, elem_id: str):
        value = app.distilled_steps if steps_fixed else value
        return gr.Slider(1, lim.max_steps, value=min(value, lim.max_steps), step=1, label="Steps",
                         interactive=not steps_fixed, elem_id=elem_id,
                         info="fixed by this distilled checkpoint" if steps_fixed else None)

    def guidance_slider(value: float, elem_id: str):
        value = 1.0 if steps_fixed else value
        return gr.Slider(0.0, lim.max_guidance, value=min(value, lim.max_guidance), step=0.5, label="Guidance",
                         interactive=not steps_fixed, elem_id=elem_id)

    def seed_box(elem_id: str):
        return gr.Number(value=0, label="Seed", precision=0, minimum=0, maximum=MAX_SEED, elem_id=elem_id)

    def sampling_controls(tab: str):
        """Output size, steps, guidance and seed rows (text to image, image to video)."""
        with gr.Row():
            height = gr.Slider(16, side, value=d.height, step=16, label="Height", elem_id=f"{tab}-height")
            width = gr.Slider(16, side, value=d.width, step=16, label="Width", elem_id=f"{tab}-width")
        with gr.Row():
            steps = steps_slider(d.steps, f"{tab}-steps")
            guidance = guidance_slider(d.guidance, f"{tab}-guidance")
            seed = seed_box(f"{tab}-seed")
        return height, width, steps, guidance, seed

    def unavailable(tab: str) -> bool:
        if app.unavailable[tab] is None:
            return False
        gr.Markdown(f"**Not available for this checkpoint.** {app.unavailable[tab]}", elem_id=f"{tab}-off")
        return True

    with gr.Blocks(title=title, analytics_enabled=False, delete_cache=(3600, 3600)) as demo:
        gr.Markdown(f"## {title}\nRuns locally on `{app.device}`. One request at a time; others wait in the queue.")
        with gr.Tab("Text to image", id="text_to_image"):
            with gr.Row():
                with gr.Column():
                    prompt = gr.Textbox(label="Prompt", lines=3, max_length=lim.max_prompt_chars,
                                        elem_id="t2i-prompt")
                    negative = gr.Textbox(label="Negative prompt", max_length=lim.max_prompt_chars,
                                          elem_id="t2i-negative")
                    height, width, steps, guidance, seed = sampling_controls("t2i")
                    button = gr.Button("Generate", variant="primary", elem_id="t2i-run")
                with gr.Column():
                    image_out = gr.Image(label="Image", format="png", interactive=False, elem_id="t2i-image")
            gr.Examples([[p] for p in model_examples.get("t2i", [])] or
                        [["a red sports car on a coastal road at sunset, cinematic"],
                         ["a robot arm stacking wooden blocks on a white table"],
                         ["a bowl of ramen, top view, studio lighting"]], inputs=[prompt], cache_examples=False)

            def t2i(prompt, negative, steps, guidance, seed, height, width, progress=step_progress):
                return app.text_to_image(prompt, negative, steps, guidance, seed, height, width, progress)

            inputs = [prompt, negative, steps, guidance, seed, height, width]
            button.click(t2i, inputs, image_out, api_name="text_to_image", **run)
            prompt.submit(t2i, inputs, image_out, api_name=False, **run)

        with gr.Tab("Image to video", id="image_to_video"):
            with gr.Row():
                with gr.Column():
                    image_in = gr.Image(label="First frame", type="pil", image_mode="RGB", elem_id="i2v-image")
                    prompt = gr.Textbox(label="Prompt", lines=2, max_length=lim.max_prompt_chars,
                                        elem_id="i2v-prompt")
                    negative = gr.Textbox(label="Negative prompt", max_length=lim.max_prompt_chars)
                    with gr.Row():
                        frames = gr.Slider(5, 1 + (lim.max_frames - 1) // 4 * 4, value=d.frames, step=4,
                                           label="Frames", elem_id="i2v-frames")
                        fps = gr.Slider(1, lim.max_fps, value=min(24.0, lim.max_fps), step=1, label="FPS")
                    height, width, steps, guidance, seed = sampling_controls("i2v")
                    button = gr.Button("Generate video", variant="primary", elem_id="i2v-run")
                with gr.Column():
                    video_out = gr.Video(label="Video", interactive=False, elem_id="i2v-video")
            gr.Examples([[examples["landscape"], "the sun sets slowly behind the hills, clouds drift"],
                         [examples["tabletop"], "a robot gripper picks up the red cube"]],
                        inputs=[image_in, prompt], cache_examples=False)

            def i2v(image, prompt, negative, frames, steps, guidance, seed, height, width, fps,
                    progress=step_progress):
                return app.image_to_video(image, prompt, negative, frames, steps, guidance, seed, height, width,
                                          fps, progress)

            button.click(i2v, [image_in, prompt, negative, frames, steps, guidance, seed, height, width, fps],
                         video_out, api_name="image_to_video", **run)

        with gr.Tab("Transfer", id="transfer"):
            if not unavailable("transfer"):
                with gr.Row():
                    with gr.Column():
                        clip_in = gr.Video(label="Source clip (the control maps are taken from it)",
                                           sources=["upload"], elem_id="transfer-clip")
                        prompt = gr.Textbox(label="Prompt", lines=2, max_length=lim.max_prompt_chars,
                                            elem_id="transfer-prompt")
                        negative = gr.Textbox(label="Negative prompt", max_length=lim.max_prompt_chars)
                        hints = gr.CheckboxGroup(list(TRANSFER_HINTS), value=["edge"], label="Control maps",
                                                 elem_id="transfer-hints")
                        height, width, steps, guidance, seed = sampling_controls("transfer")
                        button = gr.Button("Generate video", variant="primary", elem_id="transfer-run")
                    with gr.Column():
                        maps_out = gr.Video(label="Control maps", interactive=False, elem_id="transfer-maps")
                        video_out = gr.Video(label="Result", interactive=False, elem_id="transfer-video")

                def transfer(clip, prompt, negative, hints, steps, guidance, seed, height, width,
                             progress=step_progress):
                    return app.transfer(clip, prompt, negative, hints, steps, guidance, seed, height, width,
                                        progress)

                button.click(transfer, [clip_in, prompt, negative, hints, steps, guidance, seed, height, width],
                             [maps_out, video_out], api_name="transfer", **run)

        with gr.Tab("World action", id="world_action"):
            if not unavailable("world_action"):
                policy = app.policy
                with gr.Row():
                    with gr.Column():
                        image_in = gr.Image(label="Observation", type="pil", image_mode="RGB", elem_id="wa-image")
                        instruction = gr.Textbox(label="Instruction", max_length=lim.max_prompt_chars,
                                                 elem_id="wa-instruction")
                        with gr.Row():
                            embodiment = gr.Dropdown(app.embodiments, value=app.embodiments[0],
                                                     label="Embodiment", elem_id="wa-embodiment")
                            tier_default = policy.resolution_tier if policy is not None else 256
                            tier = gr.Dropdown(app.tiers, label="Resolution tier",
                                               value=tier_default if tier_default in app.tiers else app.tiers[0])
                        with gr.Row():
                            chunk = gr.Slider(1, lim.max_chunk, step=1, label="Chunk (actions)", elem_id="wa-chunk",
                                              value=min(policy.chunk_size if policy else 16, lim.max_chunk))
                            steps = steps_slider(policy.num_inference_steps if policy else 30, "wa-steps")
                            seed = seed_box("wa-seed")
                        button = gr.Button("Predict actions", variant="primary", elem_id="wa-run")
                    with gr.Column():
                        plot_out = gr.Image(label="Action chunk", format="png", interactive=False,
                                            elem_id="wa-plot")
                        video_out = gr.Video(label="Predicted video", interactive=False, elem_id="wa-video")
                        actions_out = gr.JSON(label="Actions")
                gr.Examples([[e["image"], e["instruction"]] for e in model_examples.get("world_action", [])]
                            or [[examples["tabletop"], "pick up the red cube and put it in the blue bowl"]],
                            inputs=[image_in, instruction], cache_examples=False)

                def world_action(image, instruction, embodiment, chunk, steps, seed, tier, progress=step_progress):
                    return app.world_action(image, instruction, embodiment, chunk, steps, seed, tier, progress)

                button.click(world_action, [image_in, instruction, embodiment, chunk, steps, seed, tier],
                             [plot_out, video_out, actions_out], api_name="world_action", **run)

        with gr.Tab("Text", id="text"):
            if not unavailable("text"):
                with gr.Row():
                    with gr.Column():
                        message = gr.Textbox(label="Message", lines=3, max_length=lim.max_prompt_chars,
                                             elem_id="text-message")
                        system = gr.Textbox(label="System prompt (optional)", max_length=lim.max_prompt_chars)
                        upsample = gr.Checkbox(label="Rewrite as a detailed video caption (prompt upsampling)")
                        with gr.Row():
                            tokens = gr.Slider(1, lim.max_new_tokens, value=min(128, lim.max_new_tokens), step=1,
                                               label="Max new tokens")
                            temperature = gr.Slider(0.0, 2.0, value=0.0, step=0.05, label="Temperature (0: greedy)")
                            top_p = gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="Top-p")
                            seed = seed_box("text-seed")
                        button = gr.Button("Generate text", variant="primary", elem_id="text-run")
                    with gr.Column():
                        reply = gr.Textbox(label="Reply", lines=10, interactive=False, elem_id="text-reply")
                gr.Examples([["Describe what a robot needs to do to open a drawer."],
                             ["a cat on a windowsill"]], inputs=[message], cache_examples=False)

                def text(message, system, tokens, temperature, top_p, seed, upsample, progress=token_progress):
                    return app.generate_text(message, system, tokens, temperature, top_p, seed, upsample, progress)

                button.click(text, [message, system, tokens, temperature, top_p, seed, upsample], reply,
                             api_name="text", **run)
    demo.queue(default_concurrency_limit=1, max_size=lim.queue_size, api_open=False)
    return demo


def build_demo(model_folder: str, *, device: str | None = None, limits: DemoLimits | None = None,
               dtype=None) -> gr.Blocks:
    """Load the checkpoint once and build the page (queued: one model call at a time, `limits.queue_size` waiting)."""
    return build_page(DemoApp(model_folder, device=device, dtype=dtype, limits=limits))


def launch_options(host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, limits: DemoLimits | None = None) -> dict:
    """`Blocks.launch` keywords: no share link, capped uploads, short error messages shown, nothing extra served
    (no `allowed_paths`), and gradio's optional services (SSR node server, MCP, monitoring, PWA) off."""
    limits = limits or DemoLimits()
    return dict(server_name=host, server_port=port, share=False, show_error=True, max_file_size=limits.max_upload,
                ssr_mode=False, mcp_server=False, enable_monitoring=False, pwa=False, inbrowser=False)

