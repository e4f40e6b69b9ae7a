"""DMD2 distillation: the exported 4-step student gets closer to the teacher's many-step samples, its training inputs
are the distilled pipeline's, it resumes exactly, and the teacher is left alone."""

import json

import pytest
import torch
from diffusers import UniPCMultistepScheduler

from cosmos3 import Cosmos3TextToImagePipeline, Cosmos3Transformer
from cosmos3.conditioning import Cosmos3Request
from cosmos3.testing import make_tiny_vae, randomize_
from cosmos3.tokenizers.text import build_tiny_tokenizer
from cosmos3.training import Example, TrainConfig, Trainer
from cosmos3.training.distill import DistillConfig, Distiller, export_student, pipeline_prompts

HEIGHT, WIDTH = 32, 32  # one 2x2 latent patch: 32 numbers per sample
PROMPTS = ["a red car", "waves on a beach at dusk"]
GUIDANCE = 3.0
NUM_SEEDS = 64


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These models are tiny: thread start-up and contention cost more than they save (10x on a busy 2-core box)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def quiet(record):
    pass


def gen(seed):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def teacher_pipeline(tmp_path_factory):
    """A tiny teacher with structure: pre-trained briefly to put each prompt's samples around its own latent (plus a
    little spread), and the negative prompt's around all of them, so guidance has a direction to push along."""
    tokenizer = build_tiny_tokenizer()
    teacher = randomize_(Cosmos3Transformer.from_preset("tiny", vocab_size=len(tokenizer)), seed=1, std=0.1)
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    pipe = Cosmos3TextToImagePipeline(transformer=teacher, text_tokenizer=tokenizer, vae=make_tiny_vae(),
                                      scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    prompts = pipeline_prompts(pipe, PROMPTS, height=HEIGHT, width=WIDTH)
    g = gen(0)
    latents = []
    for _ in prompts:
        center = torch.randn(prompts[0].vision_shape, generator=g)
        latents.append([center + 0.3 * torch.randn(center.shape, generator=g) for _ in range(4)])
    data = [Example(p.text_ids, x) for p, xs in zip(prompts, latents) for x in xs]
    data += [Example(prompts[0].negative_ids, x) for xs in latents for x in xs]
    config = TrainConfig(output_dir=str(tmp_path_factory.mktemp("teacher")), max_steps=400, batch_size=4,
                         learning_rate=1e-2, timestep_distribution="uniform", save_every=10**6, ema_decay=0.0)
    Trainer(teacher, data, config, log=quiet).train()
    teacher.requires_grad_(False).eval()
    return pipe, prompts


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """Fréchet distance between Gaussian fits of two sample sets `[N, D]` (float64), and its mean term."""
    a, b = a.double(), b.double()
    ca, cb = torch.cov(a.T), torch.cov(b.T)
    values, vectors = torch.linalg.eigh(ca)
    root = vectors @ torch.diag(values.clamp_min(0).sqrt()) @ vectors.T
    cross = torch.linalg.eigvalsh(root @ cb @ root).clamp_min(0).sqrt().sum()
    mean_term = float((a.mean(0) - b.mean(0)).pow(2).sum())
    return mean_term + float(ca.trace() + cb.trace() - 2 * cross), mean_term


def samples(pipe, steps: int, guidance: float) -> list[torch.Tensor]:
    """Per prompt, the flattened latents of `NUM_SEEDS` seeded samples `[N, 32]`."""
    out = []
    for prompt in PROMPTS:
        generators = [gen(1000 + s) for s in range(NUM_SEEDS)]
        images = pipe([prompt] * NUM_SEEDS, height=HEIGHT, width=WIDTH, num_inference_steps=steps,
                      guidance_scale=guidance, generator=generators, output_type="latent").images
        out.append(images.flatten(1))
    return out


def distance_to(reference: list[torch.Tensor], candidate: list[torch.Tensor]) -> tuple[float, float]:
    """Mean over prompts of the Fréchet distance and of its mean term."""
    pairs = [frechet_distance(r, c) for r, c in zip(reference, candidate)]
    return sum(p[0] for p in pairs) / len(pairs), sum(p[1] for p in pairs) / len(pairs)


def test_distillation_brings_the_4_step_student_closer_to_the_teachers_many_step_samples(teacher_pipeline, tmp_path):
    """The metric is a distance between the distributions DMD matches: the teacher's 30-step guided samples and the
    student's 4-step samples (guidance 1), per prompt, measured as the Fréchet distance of Gaussian fits to 64
    seeded samples each (mean over the two prompts). The student runs through the distilled pipeline path:
    `export_student` / `Distiller.export`, `from_pretrained`, 4 steps, guidance 1.

    Before distillation the 4-step student is the teacher without guidance: its samples sit at the unguided mean and
    are blurrier than the teacher's. Distillation must bake the guidance in, which the mean term shows (about 8x
    smaller here); at this size the spread barely changes (model error swamps that finer signal), which bounds the
    total (measured 2.94 -> 2.04, mean term 1.29 -> 0.32, 2026-12-03): the total's bound leaves room for the run's
    float rounding on another CPU, the mean term's is the one that tests the guidance. A student that does not
    learn, or learns the wrong sign, fails both. The critic must also have learned the student's distribution: it
    fits the student's samples better than the teacher it started from."""
    pipe, prompts = teacher_pipeline
    teacher_state = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    reference = samples(pipe, 30, GUIDANCE)

    before_dir = export_student(pipe.transformer, pipe, str(tmp_path / "before"))
    before_pipe = Cosmos3TextToImagePipeline.from_pretrained(before_dir)
    before_pipe.set_progress_bar_config(disable=True)
    before, before_mean = distance_to(reference, samples(before_pipe, 4, 1.0))

    config = DistillConfig(output_dir=str(tmp_path / "run"), max_steps=300, batch_size=4, student_learning_rate=3e-4,
                           critic_learning_rate=3e-4, betas=(0.9, 0.999), guidance_scale=GUIDANCE, grad_clip=10.0,
                           ema_decay=0.0, save_every=10**6)
    distiller = Distiller(pipe.transformer, prompts * 2, config, log=quiet)
    distiller.train()
    after_dir = distiller.export(pipe, str(tmp_path / "after"))
    student = Cosmos3TextToImagePipeline.from_pretrained(after_dir)
    student.set_progress_bar_config(disable=True)
    assert student.config.distilled_sigmas == pytest.approx([1.0, 15 / 16, 5 / 6, 5 / 8])
    assert json.loads((tmp_path / "after" / "modular_model_index.json").read_text())["distilled_sigmas"] == (
        pytest.approx([1.0, 15 / 16, 5 / 6, 5 / 8]))
    with pytest.raises(ValueError, match="guidance is baked in"):
        student(PROMPTS[0], height=HEIGHT, width=WIDTH, num_inference_steps=4, guidance_scale=GUIDANCE)
    after, after_mean = distance_to(reference, samples(student, 4, 1.0))

    print(f"Fréchet distance to the teacher's 30-step samples: before {before:.3f} (mean term {before_mean:.3f}), "
          f"after {after:.3f} (mean term {after_mean:.3f})")
    assert after < 0.8 * before
    assert after_mean < 0.3 * before_mean
    probe = prompts * 32
    x0, batch = distiller.sample(probe, gen(1)), distiller.batch(probe)
    with torch.no_grad():
        critic_fit = distiller.critic_loss(batch, x0, gen(2))
        teacher_fit = distiller.critic_loss(batch, x0, gen(2), model=pipe.transformer)
    assert critic_fit < teacher_fit
    for name, value in pipe.transformer.state_dict().items():  # the teacher is untouched
        assert torch.equal(value, teacher_state[name]), name


# ------------------------------------------------------------------------------------------------ small, random models


def model(seed=0):
    return randomize_(Cosmos3Transformer.from_preset("tiny"), seed=seed, std=0.1)


def dataset():
    return [Cosmos3Request([1, 2, 3, 4], negative_ids=[5, 6], vision_shape=(8, 1, 2, 4), fps=24.0),
            Cosmos3Request([7, 8, 9], negative_ids=[5, 6], vision_shape=(8, 2, 2, 2), fps=16.0),
            Cosmos3Request([10, 11], negative_ids=[5, 6], fps=16.0, vision_condition_frames=(0,),
                           vision=torch.randn(8, 2, 2, 2, generator=gen(3)))]


def config(tmp_path, **kw):
    return DistillConfig(**{"output_dir": str(tmp_path), "batch_size": 2, "student_learning_rate": 1e-3,
                            "critic_learning_rate": 1e-3, "guidance_scale": 2.0, "critic_updates_per_student_update": 2,
                            "save_every": 3, **kw})


def test_student_and_critic_start_from_the_teacher_and_share_its_text_tower(tmp_path):
    teacher = model()
    state = {k: v.clone() for k, v in teacher.state_dict().items()}
    distiller = Distiller(teacher, dataset(), config(tmp_path, max_steps=4, save_every=100), log=quiet)
    for copy in (distiller.student, distiller.critic):
        assert all(torch.equal(v, state[k]) for k, v in copy.state_dict().items())
        assert copy.layers[0].self_attn.to_q.weight is teacher.layers[0].self_attn.to_q.weight  # shared, not copied
        assert copy.layers[0].self_attn.add_q_proj.weight is not teacher.layers[0].self_attn.add_q_proj.weight
    assert "layers.0.self_attn.add_q_proj.weight" in distiller.student_params
    assert not any("to_q" in n or "embed_tokens" in n for n in distiller.student_params)
    records = distiller.train()
    assert [r["student_update"] for r in records] == [True, False, True, False]
    assert all(torch.equal(v, state[k]) for k, v in teacher.state_dict().items())  # the teacher never changes
    for params in (distiller.student_params, distiller.critic_params):
        assert not torch.equal(params["layers.0.self_attn.add_q_proj.weight"],
                               state["layers.0.self_attn.add_q_proj.weight"])


def test_training_inputs_are_the_distilled_pipelines(tmp_path, tiny_tokenizer):
    """Backward simulation uses the pipeline's re-noising rule: with one prompt and a fresh generator, the student's
    own sampler and the exported student in `Cosmos3TextToImagePipeline` give the same latents."""
    teacher = randomize_(Cosmos3Transformer.from_preset("tiny", vocab_size=len(tiny_tokenizer)), seed=2, std=0.1)
    pipe = Cosmos3TextToImagePipeline(transformer=teacher, text_tokenizer=tiny_tokenizer, vae=make_tiny_vae(),
                                      scheduler=UniPCMultistepScheduler(prediction_type="flow_prediction",
                                                                        use_flow_sigmas=True, flow_shift=3.0))
    prompts = pipeline_prompts(pipe, ["a lighthouse"], height=32, width=48)
    distiller = Distiller(teacher, prompts * 2, config(tmp_path / "run", max_steps=2, save_every=100), log=quiet)
    distiller.train()
    ours = distiller.sample(prompts, gen(7))[0]
    folder = distiller.export(pipe, str(tmp_path / "student"), ema=False)
    student = Cosmos3TextToImagePipeline.from_pretrained(folder)
    student.set_progress_bar_config(disable=True)
    theirs = student("a lighthouse", height=32, width=48, num_inference_steps=4, guidance_scale=1.0, generator=gen(7),
                     output_type="latent").images[0]
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_conditioning_frames_stay_clean(tmp_path):
    distiller = Distiller(model(), dataset(), config(tmp_path, max_steps=2, save_every=100), log=quiet)
    distiller.train()
    prompt = dataset()[2]
    out = distiller.sample([prompt], gen(0))[0]
    assert torch.equal(out[:, 0], prompt.vision[:, 0])
    assert not torch.equal(out[:, 1], prompt.vision[:, 1])


def test_resume_continues_exactly(tmp_path):
    straight = Distiller(model(), dataset(), config(tmp_path / "a", max_steps=6), log=quiet)
    records = straight.train()
    Distiller(model(), dataset(), config(tmp_path / "b", max_steps=3), log=quiet).train()
    events = []
    second = Distiller(model(), dataset(), config(tmp_path / "b", max_steps=6), log=events.append)
    resumed = [r for r in second.train() if "step" in r]
    assert any(e.get("event") == "resumed" for e in events)
    assert [r["step"] for r in resumed] == [4, 5, 6]
    assert [r["student_update"] for r in resumed] == [r["student_update"] for r in records[3:]]
    for key in ("loss_critic", "loss_dmd"):
        assert [r.get(key, 0.0) for r in resumed] == pytest.approx([r.get(key, 0.0) for r in records[3:]], rel=1e-5)
    for mine, theirs in ((straight.student_params, second.student_params), (straight.critic_params,
                                                                            second.critic_params),
                         (straight.ema, second.ema)):
        for name, p in mine.items():
            torch.testing.assert_close(p, theirs[name], rtol=1e-5, atol=1e-6)


def test_examples_are_accepted_with_a_negative_prompt(tmp_path):
    examples = [Example([1, 2, 3], torch.zeros(8, 1, 2, 2)), Example([4, 5], torch.zeros(8, 1, 2, 4), fps=24.0)]
    with pytest.raises(ValueError, match="pass `negative_ids`"):
        Distiller(model(), examples, config(tmp_path), log=quiet)
    distiller = Distiller(model(), examples, config(tmp_path, max_steps=2, save_every=100), log=quiet,
                          negative_ids=[9, 9])
    assert len(distiller.train()) == 2
    with pytest.raises(ValueError, match="vision only"):
        Distiller(model(), [Example([1], torch.zeros(8, 1, 2, 2), sound=torch.zeros(8, 4))],
                  config(tmp_path, batch_size=1), log=quiet, negative_ids=[9])


def test_non_finite_steps_are_skipped_before_the_optimizers(tmp_path):
    distiller = Distiller(model(), dataset(), config(tmp_path, max_steps=2, save_every=100), log=quiet)
    with torch.no_grad():
        distiller.student_params["proj_out.weight"][0, 0] = float("nan")
    critic = {k: v.clone() for k, v in distiller.critic_params.items()}
    records = distiller.train()
    assert records[0]["skipped_dmd"] == "non-finite loss" and all(r["skipped_critic"] for r in records)
    assert distiller.skipped_student_steps == 1 and distiller.skipped_critic_steps == 2
    assert all(torch.equal(critic[k], v) for k, v in distiller.critic_params.items())
    assert all(float(s["step"]) == 0 for s in distiller.critic_optimizer.state.values())


def test_config_errors(tmp_path):
    with pytest.raises(ValueError, match="`critic_updates_per_student_update` must be an int >= 1"):
        config(tmp_path, critic_updates_per_student_update=0)
    with pytest.raises(ValueError, match="`student_sigmas` must start at 1.0"):
        config(tmp_path, student_sigmas=[0.9, 0.5])
    with pytest.raises(ValueError, match="`student_sigmas`"):
        config(tmp_path, student_sigmas=[1.0, 0.5, 0.7])
    with pytest.raises(ValueError, match="`guidance_scale` must be a finite number >= 1"):
        config(tmp_path, guidance_scale=0.5)
    with pytest.raises(ValueError, match="`critic_learning_rate` must be > 0"):
        config(tmp_path, critic_learning_rate=0.0)
    with pytest.raises(ValueError, match="`betas`"):
        config(tmp_path, betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="`timestep_distribution`"):
        config(tmp_path, timestep_distribution="cosine")
    with pytest.raises(ValueError, match="`min_timestep` and `max_timestep`"):
        config(tmp_path, min_timestep=0.5, max_timestep=0.4)
    with pytest.raises(ValueError, match="fewer than `batch_size`=5"):
        Distiller(model(), dataset(), config(tmp_path, batch_size=5), log=quiet)


def test_export_refuses_a_non_empty_folder(tmp_path, tiny_tokenizer):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    pipe = Cosmos3TextToImagePipeline(transformer=model(), text_tokenizer=tiny_tokenizer, vae=make_tiny_vae(),
                                      scheduler=UniPCMultistepScheduler())
    with pytest.raises(FileExistsError, match="not an empty folder"):
        export_student(pipe.transformer, pipe, str(tmp_path / "out"))


def test_cosmos3_distill_recipe(teacher_pipeline, tmp_path):
    """`cosmos3 distill RECIPE` distills the saved teacher folder and exports a 4-step student pipeline."""
    from cosmos3.cli import main

    pipe, _ = teacher_pipeline
    pipe.save_pretrained(str(tmp_path / "teacher"))
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    (tmp_path / "distill.toml").write_text(
        'model = "teacher"\ndevice = "cpu"\nlog_tensorboard = false\n'
        f'[prompts]\nfile = "prompts.txt"\nheight = {HEIGHT}\nwidth = {WIDTH}\n'
        '[distill]\noutput_dir = "run"\nmax_steps = 6\nbatch_size = 2\nsave_every = 3\nguidance_scale = 3.0\n'
        "student_learning_rate = 1e-4\ncritic_learning_rate = 1e-4\n")
    main(["distill", str(tmp_path / "distill.toml")])
    lines = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "loss_critic" in r] == [1, 2, 3, 4, 5, 6]
    student = Cosmos3TextToImagePipeline.from_pretrained(str(tmp_path / "run" / "pipeline"))
    student.set_progress_bar_config(disable=True)
    assert student.config.distilled_sigmas == pytest.approx([1.0, 15 / 16, 5 / 6, 5 / 8])
    out = student(PROMPTS[0], height=HEIGHT, width=WIDTH, num_inference_steps=4, guidance_scale=1.0,
                  generator=gen(0), output_type="latent")
    assert torch.isfinite(torch.as_tensor(out.images)).all()
    with pytest.raises(SystemExit):  # a bad key is refused before anything runs
        (tmp_path / "bad.toml").write_text('model = "teacher"\n[prompts]\ntexts = ["a"]\n[distill]\noutput_dir = "r"\n'
                                           "critic_lr = 1\n")
        main(["distill", str(tmp_path / "bad.toml")])
