"""Textual inversion on the tiny stack: the loss falls, only the new row moves, runs repeat, files round-trip."""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers import DDPMScheduler, StableDiffusionPipeline
from PIL import Image

from coerasing import textual_inversion as TI
from coerasing.errors import CoErasingError
from coerasing.methods.base import Runtime
from coerasing.models import TextComponents

PLACEHOLDER = "<tiny-concept>"


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """One intra-op thread: on a small shared CPU, competing OpenMP threads slow the tiny models down a lot.

    Module-scoped, so that it is in force while the module-scoped ``trained`` fixture runs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pipe(tiny_stack):
    pipe = StableDiffusionPipeline.from_pretrained(tiny_stack.sd_path, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def images(reference_images) -> list[Image.Image]:
    return [Image.open(path).convert("RGB") for path in sorted(reference_images.glob("*.png"))]


def _models(pipe, **kwargs) -> TI.InversionModels:
    """The pipeline's models with a private float32 copy of tokenizer and text encoder (the pipe stays clean)."""
    return TI.InversionModels.from_pipeline(pipe, copy_text=True, **kwargs)


def _fixed_settings(**overrides) -> TI.TextualInversionSettings:
    """A deterministic objective: one template, no flips, one draw of t and of the noises for the whole run."""
    values = {"steps": 60, "templates": ("a photo of a {}",), "flip_probability": 0.0, "resample_noise": False,
              "seed": 3}
    return TI.TextualInversionSettings(**{**values, **overrides})


def _fixed_loss(models: TI.InversionModels, image: Image.Image, settings, vector: torch.Tensor, token_id: int):
    """The fixed objective of ``settings`` (its first draw) with ``vector`` as the token's row."""
    generator = torch.Generator("cpu").manual_seed(settings.seed)
    side = models.resolution // models.vae_scale_factor
    draws = TI._Draws(generator, 1, settings, 1000, (4, side, side))
    _, _, _, t, noise, latent_noise = draws.step()
    mean, std = TI.LatentCache(models.vae, [image], models.resolution).moments(0, False)
    z0 = (mean + std * latent_noise) * models.vae.config.scaling_factor
    schedule = DDPMScheduler.from_config(models.scheduler_config)
    weight = models.text_encoder.get_input_embeddings().weight
    saved = weight[token_id].clone()
    with torch.no_grad():
        weight[token_id] = vector
        states = TI.encode_prompts(models.tokenizer, models.text_encoder, [settings.templates[0].format(PLACEHOLDER)])
        prediction = models.noise_pred(schedule.add_noise(z0, noise, t), t, states)
        weight[token_id] = saved
    return float(torch.nn.functional.mse_loss(prediction, noise))


@pytest.fixture(scope="module")
def trained(pipe, images):
    """One 60-step run on a deterministic objective, with what the models looked like before it."""
    models = _models(pipe)
    unet_before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    table_before = models.text_encoder.get_input_embeddings().weight.detach().clone()
    flags_before = [p.requires_grad for p in pipe.unet.parameters()]
    settings = _fixed_settings()
    result = TI.learn_token(models, images[:1], settings, PLACEHOLDER, progress=False)
    return models, result, settings, unet_before, table_before, flags_before


# ----------------------------------------------------------------------------------------------
# The placeholder token


def test_add_placeholder_token_starts_from_the_initializer_and_refuses_existing_words(pipe):
    tokenizer, encoder = copy.deepcopy(pipe.tokenizer), copy.deepcopy(pipe.text_encoder)
    n = len(tokenizer)
    person = tokenizer("person", add_special_tokens=False).input_ids
    assert len(person) == 1
    token_id = TI.add_placeholder_token(tokenizer, encoder, "<tok-a>", "person")
    table = encoder.get_input_embeddings().weight
    assert token_id == n and len(tokenizer) == n + 1 and table.shape[0] == n + 1
    assert torch.equal(table[token_id], table[person[0]])
    assert token_id in tokenizer("a photo of <tok-a>").input_ids
    for existing in ("<tok-a>", "cat", "object"):  # an added token, a vocabulary entry, a word ("object</w>")
        with pytest.raises(CoErasingError, match="already exists"):
            TI.add_placeholder_token(tokenizer, encoder, existing, "person")
    with pytest.raises(CoErasingError, match="whitespace"):
        TI.add_placeholder_token(tokenizer, encoder, "<two words>", "person")
    # a multi-token initializer: the mean of its tokens' embeddings
    ids = tokenizer("van gogh", add_special_tokens=False).input_ids
    assert len(ids) == 2
    multi = TI.add_placeholder_token(tokenizer, encoder, "<tok-b>", "van gogh")
    table = encoder.get_input_embeddings().weight
    assert torch.allclose(table[multi], table[ids].mean(0))
    assert len(pipe.tokenizer) == n  # the copies, not the pipeline, changed


def test_weight_decay_moves_untouched_rows_and_restore_puts_them_back():
    """Why :func:`restore_other_rows` exists: AdamW shrinks rows that had no gradient at all."""
    weight = torch.nn.Parameter(torch.randn(5, 3, generator=torch.Generator().manual_seed(0)))
    original = weight.detach().clone()
    optimizer = torch.optim.AdamW([weight], lr=0.1, weight_decay=0.01)
    grad = torch.zeros(5, 3)
    grad[4] = 1.0
    weight.grad = grad
    optimizer.step()
    assert not torch.equal(weight[:4], original[:4])  # moved by weight decay alone
    row = weight[4].detach().clone()
    TI.restore_other_rows(weight, original, keep=4)
    assert torch.equal(weight[:4], original[:4]) and torch.equal(weight[4], row)


# ----------------------------------------------------------------------------------------------
# Training


def test_learn_token_lowers_its_loss(trained, images):
    """Mean loss of the last 20 % of the steps is below that of the first 20 %, and the learned row fits the
    (fixed) objective better than 20 random vocabulary rows put in its place, by a margin over the start
    larger than the spread of those rows' losses (the tiny random UNet listens to its text only weakly)."""
    models, result, settings, *_ = trained
    losses = result.losses
    assert len(losses) == settings.steps and all(torch.isfinite(torch.tensor(losses)))
    n = len(losses) // 5
    first, last = sum(losses[:n]) / n, sum(losses[-n:]) / n
    assert last < first - 1e-3, (first, last)
    table = models.text_encoder.get_input_embeddings().weight.detach()
    learned = _fixed_loss(models, images[0], settings, result.embedding, result.token_id)
    initial = _fixed_loss(models, images[0], settings, TI.initializer_embedding(
        models.tokenizer, models.text_encoder, settings.initializer), result.token_id)
    picks = torch.randint(0, result.token_id, (20,), generator=torch.Generator().manual_seed(1))
    others = [_fixed_loss(models, images[0], settings, table[i], result.token_id) for i in picks]
    assert learned < min(others), (learned, min(others))
    # the gain over the start is larger than the whole spread of the random rows' losses
    assert initial - learned > max(others) - min(others), (initial, learned, min(others), max(others))
    assert learned == pytest.approx(losses[-1], abs=2e-3)  # the objective the run optimised


def test_only_the_new_row_moves_and_the_unet_stays_frozen(trained, pipe):
    models, result, _, unet_before, table_before, flags_before = trained
    table = models.text_encoder.get_input_embeddings().weight
    n = table_before.shape[0]
    assert table.shape[0] == n + 1 and result.token_id == n
    assert torch.equal(table[:n], table_before)  # every other row bit-identical
    start = TI.initializer_embedding(models.tokenizer, models.text_encoder, "person")
    assert not torch.equal(table[n], start)  # the new row moved
    assert torch.equal(table[result.token_id].cpu(), result.embedding)
    assert result.embedding.device.type == "cpu" and result.embedding.shape == (table.shape[1],)
    for key, value in pipe.unet.state_dict().items():
        assert torch.equal(value, unet_before[key]), key
    assert all(p.grad is None for p in pipe.unet.parameters())
    assert all(p.grad is None for p in pipe.vae.parameters())
    assert all(p.grad is None for p in models.text_encoder.parameters())
    assert [p.requires_grad for p in pipe.unet.parameters()] == flags_before  # flags restored


def test_same_seed_same_embedding_other_seed_different(pipe, images):
    """Default settings (random images, templates, flips, t, noise, VAE samples), batch 2, a few steps."""

    def run(seed: int) -> TI.TokenResult:
        settings = TI.TextualInversionSettings(steps=4, batch_size=2, seed=seed)
        return TI.learn_token(_models(pipe), images, settings, PLACEHOLDER, progress=False)

    a, b, c = run(0), run(0), run(1)
    assert torch.equal(a.embedding, b.embedding) and a.losses == b.losses
    assert not torch.equal(a.embedding, c.embedding)


def test_save_and_load_give_identical_text_states(trained, pipe, tmp_path):
    models, result, *_ = trained
    path = result.save(tmp_path / "token.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["token.safetensors"]  # no temp file left
    assert TI.read_token(path)[0] == PLACEHOLDER
    tokenizer, encoder = copy.deepcopy(pipe.tokenizer), copy.deepcopy(pipe.text_encoder)
    token_id = TI.load_token(path, tokenizer, encoder)
    assert token_id == result.token_id
    prompt = f"a photo of {PLACEHOLDER} at the beach"
    expected = TextComponents(models.tokenizer, models.text_encoder).encode(prompt)
    assert torch.equal(TextComponents(tokenizer, encoder).encode(prompt), expected)
    with pytest.raises(CoErasingError, match="already exists"):
        TI.load_token(path, tokenizer, encoder)


def test_learn_token_on_a_pipeline_keeps_the_token_there(tiny_stack, images):
    """Given a pipeline, the token is added to its own tokenizer/encoder (STEREO's rounds accumulate tokens)."""
    pipe = StableDiffusionPipeline.from_pretrained(tiny_stack.sd_path, safety_checker=None)
    result = TI.learn_token(pipe, images, TI.TextualInversionSettings(steps=2), PLACEHOLDER, progress=False)
    assert pipe.tokenizer.convert_tokens_to_ids(PLACEHOLDER) == result.token_id == len(pipe.tokenizer) - 1
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight[result.token_id], result.embedding)
    assert all(p.grad is None for p in pipe.unet.parameters())
    pipe.text_encoder.to(torch.bfloat16)
    with pytest.raises(CoErasingError, match="float32"):
        TI.learn_token(pipe, images, TI.TextualInversionSettings(steps=2), "<other>", progress=False)
    assert "<other>" not in pipe.tokenizer.get_vocab()  # refused before anything changed


def test_v_prediction_trains_toward_the_velocity():
    schedule = DDPMScheduler(prediction_type="v_prediction")
    latents, noise, t = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.tensor([10, 900])
    assert torch.equal(TI.denoising_target(schedule, latents, noise, t), schedule.get_velocity(latents, noise, t))
    assert TI.denoising_target(DDPMScheduler(), latents, noise, t) is noise


def test_settings_are_checked():
    with pytest.raises(CoErasingError, match="exactly once"):
        TI.TextualInversionSettings(templates=("a photo",)).validate()
    with pytest.raises(CoErasingError, match="latent"):
        TI.TextualInversionSettings(latent="mode").validate()
    art = TI.TextualInversionSettings.for_initializer("art", steps=5)
    assert art.templates == TI.STYLE_TEMPLATES and art.steps == 5 and art.validate() is art


# ----------------------------------------------------------------------------------------------
# The concept inversion attack


class CountingRuntime(Runtime):
    """The base runtime, counting calls of its ``noise_pred`` (the erased model the attack must use)."""

    calls = 0

    def noise_pred(self, latents, timestep, text_states):
        self.calls += 1
        return super().noise_pred(latents, timestep, text_states)


def test_concept_inversion_attack_leaves_the_pipeline_unchanged(pipe, images, tmp_path):
    n = len(pipe.tokenizer)
    table = pipe.text_encoder.get_input_embeddings().weight.detach().clone()
    runtime = CountingRuntime(pipe)
    settings = TI.TextualInversionSettings(steps=3, seed=0)
    attack = TI.concept_inversion_attack(runtime, images, settings, progress=False)
    assert runtime.calls == 3  # trained against the runtime's model
    assert len(pipe.tokenizer) == n and attack.token.token not in pipe.tokenizer.get_vocab()
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight, table)
    assert attack.prompt == f"a photo of {TI.DEFAULT_ATTACK_TOKEN}"
    assert attack.prompt_embeds.shape == (1, pipe.tokenizer.model_max_length, table.shape[1])
    # the states are those of the prompt with the learned token, as a reloaded token gives them
    tokenizer, encoder = copy.deepcopy(pipe.tokenizer), copy.deepcopy(pipe.text_encoder)
    TI.load_token(attack.token.save(tmp_path / "attack.safetensors"), tokenizer, encoder)
    assert torch.equal(TextComponents(tokenizer, encoder).encode(attack.prompt), attack.prompt_embeds)
    plain = TextComponents(pipe.tokenizer, pipe.text_encoder).encode("a photo of person")
    assert not torch.equal(plain, attack.prompt_embeds)
