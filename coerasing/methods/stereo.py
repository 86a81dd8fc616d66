"""STEREO (Srivatsan et al., CVPR 2025, arXiv 2408.16807): search thoroughly enough, then robustly erase once.

docs/baselines.md §STEREO. Two stages, both on the project's one erasing loop (:mod:`coerasing.train`):

**STE** ("search thoroughly enough"), ``rounds`` times on one UNet that is never reset:

1. erase the current concept with ESD at η = 0 (the target is the frozen round-start model's
   unconditional prediction; ``noxattn``, DDIM partial trajectories with guidance 3), from the
   previous round's weights;
2. attack the erased model by textual inversion (:mod:`coerasing.textual_inversion`): learn one new
   token from reference images of the concept (round ``r`` uses the ``r``-th of ``rounds`` disjoint
   chunks of the images, as the official code);
3. the learned token is the next round's concept (round 0 erases the concept word).

**REO** ("robustly erase once"): from the **original** UNet, with the original UNet frozen as the
reference. Negatives are the concept word and the learned tokens, anchors a list of benign
prompts. Each iteration conditions the partial trajectory and the trained prediction on one
sampled negative ``q``, draws one anchor ``a``, and regresses on the compositional target

    ε∅ + α · (ε_a − ε∅) − β · mean_n (ε_n − ε∅),      α = 1, β = 3 (the official code's s = 2),

averaged over **all** negatives every iteration (:func:`compositional_target`). The output is a plain
UNet state dict (``unet.pth``, with periodic ``unet_<i>.pth``); the learned tokens are kept in
``tokens/`` (they are the search's findings, and attacks can reuse them).

Chosen where the paper is silent or differs from the code (the official code is followed): one
negative and one anchor per iteration drawn uniformly by the run's seeded generator (the code
draws them stratified), the seed is the same in every round (the code resets it every round),
token names are ``<stereo-1>``, ``<stereo-2>``, … (the code's are random), and anchors are benign
prompts of our own (the code's anchors contain the concept in context; docs/baselines.md §STEREO says why).
"""

from __future__ import annotations

import shutil
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..checkpoints import claim_run_folder, write_run_json
from ..choices import DEFAULT_MODEL, SAMPLERS, TRAIN_METHODS
from ..config import MAX_STEPS, EraseConfig, safe_name
from ..errors import CoErasingError
from ..files import atomic_write_json, require_json_record
from ..flags import SEED_MAX, check_fields, check_output_fields, flag
from ..images import list_image_files, load_images
from ..ip_adapter import unet_noise_pred
from ..models import load_text_components, parse_devices
from ..textual_inversion import TextualInversionSettings, learn_token, load_token, save_token
from ..train import Eraser, random_index
from .base import CurvePoint, Method, TraceContext, TrainingWorld
from .concepts import concept_kind, toy_training_captions

#: Default anchors (our own lists): benign prompts the REO target pulls towards.
NUDITY_ANCHORS = (
    "a person in a winter coat walking in the snow", "a woman in a long dress at a dinner party",
    "a man in a suit reading a newspaper", "two friends in jeans and t-shirts laughing in a park",
    "a doctor in a white coat in a hospital corridor", "a child in a raincoat jumping in a puddle",
    "a swimmer in a wetsuit standing on the beach", "a dancer in a costume on a stage",
    "a farmer in overalls feeding chickens", "a portrait of an elderly man in a wool sweater",
)
ARTIST_ANCHORS = (
    "a painting by Claude Monet", "a painting by Rembrandt", "a painting by Johannes Vermeer",
    "a watercolor of a harbor", "a charcoal sketch of a tree", "a photograph of a city street",
    "an oil painting of a bowl of fruit", "a painting by Edward Hopper", "a woodblock print of a mountain",
    "a pencil drawing of a horse",
)
OBJECT_ANCHORS = (
    "a photo of a dog", "a photo of a bicycle", "a photo of a bridge", "a photo of a lighthouse",
    "a photo of a sailboat", "a photo of a teapot", "a photo of a castle", "a photo of a bus",
    "a photo of a mountain lake", "a photo of a cat on a sofa",
)


def default_anchors(concept: str) -> list[str]:
    """Benign anchor prompts for ``concept``; toy shapes: training captions of the other shapes."""
    kind = concept_kind(concept)
    if kind == "toy":
        captions = [text for text, (shape, _, _) in toy_training_captions().items()
                    if shape is not None and shape != concept]
        return captions[:: max(1, len(captions) // 40)][:40]
    return list({"explicit": NUDITY_ANCHORS, "artist": ARTIST_ANCHORS}.get(kind, OBJECT_ANCHORS))


def default_initializer(concept: str) -> str:
    """STEREO's token initialisers: ``person`` (nudity), ``art`` (artists), ``object`` (everything else)."""
    return {"explicit": "person", "artist": "art"}.get(concept_kind(concept), "object")


def compositional_target(
    eps_uncond: torch.Tensor, eps_anchor: torch.Tensor, eps_negatives: torch.Tensor,
    anchor_weight: float, negative_weight: float,
) -> torch.Tensor:
    """REO's target ``ε∅ + α(ε_a − ε∅) − β · mean_n(ε_n − ε∅)`` (docs/baselines.md §STEREO).

    ``eps_negatives`` stacks the negatives on dim 0 ``[N, C, H, W]``; the others are ``[1, C, H, W]``.
    """
    return (eps_uncond + anchor_weight * (eps_anchor - eps_uncond)
            - negative_weight * (eps_negatives - eps_uncond).mean(0, keepdim=True))


@dataclass
class StereoConfig:
    """Everything one STEREO run depends on (``erase_pipeline.py --method stereo``)."""

    prompt: str | None = flag(None, group="what to erase", resume=True, help="(required) the concept word")
    image: str | None = flag(None, group="what to erase", resume=True, path=True,
                             help="(required) reference images of the concept (generate_data.py's folder)")
    ckpt_path: str = flag(DEFAULT_MODEL, group="what to erase", resume=True, path=True, help="base SD model")
    rounds: int = flag(4, group="STE (search)", min=1, max=64, resume=True, help="search rounds N")
    ste_iterations: int = flag(200, group="STE (search)", min=1, max=1_000_000, resume=True,
                               help="ESD iterations per round (η = 0)")
    ste_lr: float = flag(5e-6, group="STE (search)", min=0, max=10, exclusive_min=True, resume=True,
                         help="learning rate of each round's erasing")
    ti_steps: int = flag(3000, group="STE (search)", min=1, max=1_000_000, resume=True,
                         help="textual-inversion steps per round")
    ti_lr: float = flag(5e-3, group="STE (search)", min=0, max=10, exclusive_min=True, resume=True,
                        help="textual-inversion learning rate")
    initializer: str | None = flag(None, group="STE (search)", resume=True,
                                   help="word the learned token starts from (default: person for nudity, art for "
                                        "artists, object otherwise)")
    reo_iterations: int = flag(200, group="REO (erase)", min=1, max=1_000_000, resume=True,
                               help="iterations of the robust erasing")
    reo_lr: float = flag(2e-5, group="REO (erase)", min=0, max=10, exclusive_min=True, resume=True,
                         help="learning rate of the robust erasing")
    reo_save_iter: int = flag(50, group="REO (erase)", min=1, max=1_000_000, help="periodic REO checkpoints")
    anchors: str | None = flag(None, group="REO (erase)", resume=True,
                               help="anchor prompts separated by '|' (default: the concept kind's list)")
    anchor_weight: float = flag(1.0, group="REO (erase)", min=-100, max=100, resume=True, help="α of the target")
    negative_weight: float = flag(3.0, group="REO (erase)", min=-100, max=100, resume=True, help="β of the target")
    train_method: str = flag("noxattn", group="shared", choices=TRAIN_METHODS, resume=True,
                             help="UNet parameters trained in both stages")
    num_inference_steps: int = flag(50, group="shared", min=1, max=MAX_STEPS, resume=True,
                                    help="steps of the partial trajectories")
    sampler: str = flag("ddim", group="shared", choices=SAMPLERS, resume=True, help="partial-trajectory sampler")
    sampling_guidance: float = flag(3.0, group="shared", min=0, max=100, resume=True,
                                    help="guidance of the partial trajectories")
    seed: int = flag(0, group="shared", min=0, max=SEED_MAX, resume=True, help="seeds all randomness")
    devices: str | None = flag(None, group="shared", help="as erase_pipeline.py's --devices")
    output_dir: str = flag("checkpoints", group="outputs", output=True, help="root of the default folder")
    save_path: str | None = flag(None, group="outputs", output=True,
                                 help="run folder (default: <output_dir>/stereo/<prompt>)")
    resume: bool = flag(False, group="outputs", help="continue an interrupted run (finished rounds are kept)")
    overwrite: bool = flag(False, group="outputs", help="start afresh in a folder that holds a run")

    def validate(self) -> StereoConfig:
        if not (self.prompt and self.prompt.strip()):
            raise CoErasingError("--prompt is required: the concept word to erase, e.g. --prompt nudity.")
        if not self.image:
            raise CoErasingError("--image is required: reference images of the concept (python generate_data.py "
                                 "--label <concept>), used by the textual-inversion search.")
        check_fields(self)
        if not Path(self.image).expanduser().exists():
            raise CoErasingError(f"--image {self.image} does not exist; generate the reference images first.")
        check_output_fields(self)
        return self

    @property
    def concept(self) -> str:
        return (self.prompt or "").strip()

    def run_folder(self) -> Path:
        if self.save_path:
            return Path(self.save_path).expanduser()

        return Path(self.output_dir).expanduser() / "stereo" / safe_name(self.concept, "--prompt")

    def anchor_list(self) -> list[str]:
        if self.anchors:
            anchors = [a.strip() for a in self.anchors.split("|") if a.strip()]
            if not anchors:
                raise CoErasingError("--anchors is empty; give prompts separated by '|'.")
            return anchors
        return default_anchors(self.concept)

    def erase_config(self, **overrides: Any) -> EraseConfig:
        """The shared settings as an :class:`EraseConfig` for one of the stages."""
        return EraseConfig(modality="text", train_method=self.train_method, ckpt_path=self.ckpt_path,
                           num_inference_steps=self.num_inference_steps, sampler=self.sampler,
                           sampling_guidance=self.sampling_guidance, seed=self.seed, devices=self.devices,
                           **overrides)


def token_name(round_index: int) -> str:
    return f"<stereo-{round_index + 1}>"


def text_with_tokens(config: StereoConfig, token_files: list[Path], device: torch.device, dtype: torch.dtype) -> Any:
    """The base model's tokenizer and text encoder with the learned tokens added."""

    text = load_text_components(config.ckpt_path, torch.device("cpu"), torch.float32)
    for path in token_files:
        load_token(path, text.tokenizer, text.text_encoder)
    text.text_encoder.to(device, dtype)
    return text


class CompositionalEraser(Eraser):
    """REO's erasing loop: the project's :class:`~coerasing.train.Eraser` with the compositional target.

    The conditioning (partial trajectory and trained prediction) is one sampled negative;
    :meth:`target` is :func:`compositional_target` of the frozen original model's predictions for the
    empty prompt, one sampled anchor and every negative, in one batched call.
    """

    def __init__(self, config: EraseConfig, text: Any, negatives: list[str], anchors: list[str],
                 anchor_weight: float, negative_weight: float) -> None:
        super().__init__(replace(config, prompt=",".join(negatives)), text)
        self.anchor_states = [self.models.text.encode(anchor) for anchor in anchors]
        self.anchor_weight, self.negative_weight = anchor_weight, negative_weight
        self.anchor: torch.Tensor | None = None

    def sample_conditioning(self) -> tuple[torch.Tensor, None]:
        self.anchor = self.anchor_states[random_index(len(self.anchor_states), self.generator)]
        return self.prompt_states[random_index(len(self.prompt_states), self.generator)], None

    @torch.inference_mode()
    def target(self, latents: torch.Tensor, t: int, prompt_states: torch.Tensor,
               image_tokens: torch.Tensor | None) -> torch.Tensor:
        device, dtype = self.models.frozen_device, self.models.frozen_dtype
        states = torch.cat([self.uncond_states, self.anchor, *self.prompt_states]).to(device, dtype)
        z = latents.to(device, dtype).repeat(len(states), 1, 1, 1)
        eps = unet_noise_pred(self.frozen_unet, z, torch.tensor([t], device=device), states).float()
        self.last.update(eps_u=eps[:1], eps_c=eps[2:])
        return compositional_target(eps[:1], eps[1:2], eps[2:], self.anchor_weight, self.negative_weight)


def _chunks(files: list[Path], count: int) -> list[list[Path]]:
    size = max(1, len(files) // count)
    return [files[i * size : (i + 1) * size] or files for i in range(count)]


#: What a STEREO run writes into its folder: ``--overwrite`` removes these and nothing else.
STEREO_FILES = ("run.json", "stereo.json", "tokens", "round_*", "reo")


#: The settings that only REO reads: runs that differ in nothing else share one search (:meth:`Stereo.trace`).
REO_SETTINGS = ("reo_iterations", "reo_lr", "reo_save_iter", "anchors", "anchor_weight", "negative_weight")


def _take_search(source: Path, folder: Path, rounds: int) -> None:
    """Copy a finished search's rounds and tokens from ``source`` into ``folder`` where they are missing, each
    round as a whole (a temporary folder, then a rename), so a kill never leaves half a round."""
    for r in range(rounds):
        round_dir, origin = folder / f"round_{r + 1}", source / f"round_{r + 1}"
        if not (round_dir / "erase" / "unet.pth").exists():
            partial = folder / f"round_{r + 1}.partial"
            shutil.rmtree(partial, ignore_errors=True)
            shutil.rmtree(round_dir, ignore_errors=True)
            shutil.copytree(origin, partial)
            partial.rename(round_dir)
        token = folder / "tokens" / f"stereo-{r + 1}.safetensors"
        if not token.exists():
            token.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source / "tokens" / token.name, token.with_suffix(".partial"))
            token.with_suffix(".partial").replace(token)


def train_stereo(config: StereoConfig, search_only: bool = False, search_from: Path | None = None) -> Path:
    """STE rounds, then REO (module docstring); returns the final ``unet.pth``. Resumable between rounds.

    ``search_only``: stop after the rounds (returns the folder). ``search_from``: a finished search of the same
    settings (all but :data:`REO_SETTINGS`) whose rounds and tokens are taken instead of searching again; the
    REO that follows is the one a run from scratch would train (each stage seeds itself)."""
    config.validate()
    folder = config.run_folder()
    claim_run_folder(folder, "stereo", overwrite=config.overwrite and not config.resume, owned=STEREO_FILES,
                     inputs={"--image": config.image, "--anchors": config.anchors})
    if (folder / "run.json").exists() and not (config.resume or config.overwrite):
        raise CoErasingError(f"{folder} already holds a STEREO run; pass --resume to continue it, --overwrite to "
                             "replace it, or another --save_path.")
    folder.mkdir(parents=True, exist_ok=True)
    state_path = folder / "stereo.json"
    settings = asdict(config)
    fixed = {k: v for k, v in settings.items() if k not in ("devices", "resume", "overwrite", "reo_save_iter")}
    if state_path.exists():
        previous = require_json_record(state_path, {"settings": dict},
                                       fix="start the run again with --overwrite, or use another --save_path")
        if previous.get("settings") != fixed:
            changed = sorted(k for k in fixed if previous.get("settings", {}).get(k) != fixed[k])
            raise CoErasingError(f"--resume: the STEREO run in {folder} was started with other settings "
                                 f"({', '.join(changed)}); resume with them or use another --save_path.")
    atomic_write_json(state_path, {"settings": fixed})
    write_run_json(folder, settings, "stereo", status="running")
    if search_from is not None:
        _take_search(Path(search_from), folder, config.rounds)
    frozen_device, _ = parse_devices(config.devices)
    images = list_image_files(config.image)
    chunks = _chunks(images, config.rounds)
    initializer = config.initializer or default_initializer(config.concept)
    tokens_dir = folder / "tokens"
    token_files: list[Path] = []
    previous_unet: Path | None = None
    for r in tqdm(range(config.rounds), desc="STEREO search rounds", dynamic_ncols=True):
        round_dir = folder / f"round_{r + 1}"
        prompt = config.concept if r == 0 else token_name(r - 1)
        erase_dir = round_dir / "erase"
        if not (erase_dir / "unet.pth").exists():
            resume = (erase_dir / "train_state.pt").exists()
            ste = config.erase_config(prompt=prompt, negative_guidance=0.0, lr=config.ste_lr,
                                      iterations=config.ste_iterations, save_iter=config.ste_iterations,
                                      unet_ckpt_path=str(previous_unet) if previous_unet else None,
                                      save_path=str(erase_dir), resume=resume, overwrite=not resume)
            text = text_with_tokens(config, token_files, frozen_device, torch.float32)
            Eraser(ste, text).run()
        previous_unet = erase_dir / "unet.pth"
        token_file = tokens_dir / f"stereo-{r + 1}.safetensors"
        if not token_file.exists():
            from ..formats import load_unet_checkpoint_into
            from ..generation import load_generation_pipeline

            pipe = load_generation_pipeline(config.ckpt_path, frozen_device, torch.float32)
            load_unet_checkpoint_into(pipe.unet, previous_unet, "STEREO round checkpoint")
            ti = TextualInversionSettings.for_initializer(initializer, steps=config.ti_steps, lr=config.ti_lr,
                                                          seed=config.seed + r)
            result = learn_token(pipe, load_images(chunks[r])[1], ti, token_name(r))
            save_token(token_file, result.token, result.embedding)
            del pipe
        token_files.append(token_file)
    negatives = [config.concept, *(token_name(r) for r in range(config.rounds))]
    if search_only:
        write_run_json(folder, settings, "stereo", status="searched", negatives=negatives, initializer=initializer)
        return folder
    reo_dir = folder / "reo"
    if not (reo_dir / "unet.pth").exists() or not (reo_dir / f"unet_{config.reo_iterations}.pth").exists():
        resume = (reo_dir / "train_state.pt").exists()
        reo = config.erase_config(prompt=config.concept, lr=config.reo_lr, iterations=config.reo_iterations,
                                  save_iter=config.reo_save_iter, save_path=str(reo_dir), resume=resume,
                                  overwrite=not resume)
        text = text_with_tokens(config, token_files, frozen_device, torch.float32)
        CompositionalEraser(reo, text, negatives, config.anchor_list(), config.anchor_weight,
                            config.negative_weight).run()
    final = reo_dir / "unet.pth"
    write_run_json(folder, settings, "stereo", status="finished", final_checkpoint=str(final), negatives=negatives,
                   anchors=config.anchor_list(), initializer=initializer)
    return final


class Stereo(Method):
    """STEREO behind the method interface: a plain UNet state dict (REO's output)."""

    name = "stereo"
    summary = "STEREO: adversarial search by textual inversion, then robust compositional erasing (CVPR 2025)."
    config_class = StereoConfig
    trainable = True
    candidate_blocks = ("stereo",)

    def train(self, config: StereoConfig, world: TrainingWorld | None = None) -> Path:
        return train_stereo(config)

    def trace(self, context: TraceContext) -> list[CurvePoint]:
        """STEREO's curve: REO's periodic checkpoints (its search rounds are trained once per seed and search
        settings, whatever REO's)."""
        preset = dict(context.preset("stereo"))
        world = context.world()
        preset.setdefault("prompt", context.preset("stage1").get("prompt", context.concept))
        settings = {**preset, "ckpt_path": world["ckpt_path"], "image": str(context.references()),
                    "seed": context.seed}
        folder = context.run_folder("stereo", settings)
        config = StereoConfig(**settings, save_path=str(folder), devices=context.device)
        # tuning candidates that differ only in REO's settings share one search (its own cached folder)
        search = {key: value for key, value in settings.items() if key not in REO_SETTINGS}
        search_folder = context.run_folder("stereo_search", search)

        def search_work() -> None:
            resume = (search_folder / "stereo.json").exists()
            train_stereo(StereoConfig(**search, save_path=str(search_folder), devices=context.device,
                                      resume=resume), search_only=True)

        def work() -> None:
            context.once(search_folder, search, search_work)
            resume = (folder / "stereo.json").exists()
            train_stereo(replace(config, resume=resume, overwrite=False), search_from=search_folder)

        context.once(folder, settings, work)
        every, total = config.reo_save_iter, config.reo_iterations
        iterations = sorted({*range(every, total + 1, every), total})
        return [CurvePoint(f"reo{i}", float(i), folder / "reo" / f"unet_{i}.pth") for i in iterations]

