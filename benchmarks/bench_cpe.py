#!/usr/bin/env python
"""Seconds per 1000 CPE training steps at SD v1.4's sizes (docs/baselines.md §CPE).

    python benchmarks/bench_cpe.py                          # nudity recipe's batch, this machine's threads
    python benchmarks/bench_cpe.py --threads 1 --steps 50   # one thread
    python benchmarks/bench_cpe.py --direct                 # also time the plain per-layer loss

The 32 wrapped projections come from a randomly initialised ``UNet2DConditionModel(sample_size=64,
cross_attention_dim=768, attention_head_dim=8)`` (SD v1.4's shapes; only its ``attn2`` weights are
used). Text states are random ``[77, 768]`` tensors: CPE's step cost does not depend on their values.
An erase step uses the batch of a stage ≥ 2 (1 target + K adversarial rows, the neutral prompt
folded into the target, the empty prompt + S mixed anchors); an attack step trains K perturbations.
``--direct`` also times the same erase loss computed the plain way (every row through all 32
projections, frozen and gated), which :func:`coerasing.methods.cpe.gap_loss` replaces.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from coerasing.methods import cpe  # noqa: E402
from coerasing.methods.cpe import training as cpe_training  # noqa: E402


def sd14_bank(text_length: int, device: torch.device) -> cpe.ProjectionBank:
    """The 32 ``attn2`` k/v projections of a random SD v1.4-shaped UNet."""
    from diffusers import UNet2DConditionModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8).eval()
    return cpe.ProjectionBank.from_unet(unet, text_length, device)


def synthetic_data(config: cpe.CPEConfig, text_length: int, text_dim: int, device: torch.device) -> cpe.ConceptData:
    """Random states with the shapes of the nudity concept's prompt caches."""
    generator = torch.Generator().manual_seed(1)
    templates = len(cpe.default_templates("nudity", config.kind))
    anchors = len(cpe.default_anchors("nudity", config.kind))

    def states(count: int) -> torch.Tensor:
        return torch.randn(count, text_length, text_dim, generator=generator).to(device)

    return cpe.ConceptData("nudity", states(templates), states(templates), states(1), states(anchors))


def direct_erase_loss(trainer: cpe.ConceptTrainer) -> torch.Tensor:
    """The erase loss computed plainly: f⁰ and f of every row through all wrapped projections."""
    config, data, eraser, bank = trainer.config, trainer.data, trainer.eraser, trainer.bank
    generator = trainer.generator
    index = int(torch.randint(len(data.targets), (1,), generator=generator))
    target, neutral = data.targets[index : index + 1], data.neutrals[index : index + 1]
    anchors = cpe.sample_anchors(data.anchors, config.anchors_per_step, config.anchor_noise, generator)
    rows = torch.cat([target, target + trainer.deltas, neutral, data.empty, anchors])
    residual_input = eraser.residual_input(rows)
    count = 1 + len(trainer.deltas)
    erase = adversarial = anchor = 0.0
    for layer, weight in enumerate(bank.weights):
        with torch.no_grad():
            frozen = rows @ weight.T
            goal = frozen[count] + config.eta * (frozen[count] - frozen[0])
        gated = frozen + eraser.residual(layer, residual_input)
        scale = bank.spectral[layer] / len(bank.weights)
        erase = erase + scale * ((gated[0] - goal) ** 2).mean()
        adversarial = adversarial + scale * ((gated[1:count] - goal) ** 2).mean()
        anchor = anchor + scale * ((gated[count + 1 :] - frozen[count + 1 :]) ** 2).mean()
    return erase + config.adversarial_weight * adversarial + config.anchor_weight * anchor


def time_steps(step, steps: int, warmup: int) -> float:
    """Seconds per step of ``step()`` (after ``warmup`` untimed calls)."""
    for _ in range(warmup):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kind", default="explicit", choices=cpe.KINDS, help="recipe whose batch is timed")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--direct", action="store_true", help="also time the plain per-layer erase loss")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    # the bank has SD v1.4's shapes; nothing is loaded from the model
    config = cpe.CPEConfig(prompt="nudity", kind=args.kind, ckpt_path="CompVis/stable-diffusion-v1-4").resolved()
    bank = sd14_bank(77, device)
    data = synthetic_data(config, 77, bank.text_dim, device)
    generator = torch.Generator().manual_seed(0)
    eraser = cpe.ConceptEraser(bank.text_dim, bank.out_features, config.gate_dim, config.rank)
    eraser.reset_parameters(generator)
    trainer = cpe.ConceptTrainer(eraser, bank, data, config, generator, device)
    trainer.deltas = 0.01 * torch.randn(config.adversarial_prompts, 77, bank.text_dim, generator=generator).to(device)

    optimizer, scheduler = cpe_training._optimizer(list(eraser.parameters()), config.lr, config.warmup_steps, 10**6, 1)

    def erase_step(loss_fn=lambda: trainer.erase_losses()["loss"]) -> None:
        loss = loss_fn()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()

    deltas = trainer.deltas.clone().requires_grad_(True)
    attack_optimizer, attack_scheduler = cpe_training._optimizer([deltas], config.attack_lr, 5, 10**6, 1)

    def attack_step() -> None:
        loss = trainer.attack_loss(deltas)
        attack_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        attack_optimizer.step()
        attack_scheduler.step()

    rows = 1 + config.adversarial_prompts + 1 + 1 + config.anchors_per_step
    print(f"command: {shlex.join([sys.executable, *sys.argv])}")
    print(f"kind {config.kind}: {len(bank.names)} wrapped layers, g={config.gate_dim}, r={config.rank}, "
          f"K={config.adversarial_prompts}, S={config.anchors_per_step} ({rows} rows incl. neutral), "
          f"threads={torch.get_num_threads()}, device={device}")
    erase = time_steps(erase_step, args.steps, args.warmup)
    print(f"erase step:  {erase * 1000:8.1f} s per 1000 steps")
    trainer.eraser.requires_grad_(False)
    attack = time_steps(attack_step, args.steps, args.warmup)
    trainer.eraser.requires_grad_(True)
    print(f"attack step: {attack * 1000:8.1f} s per 1000 steps")
    if args.direct:
        direct = time_steps(lambda: erase_step(lambda: direct_erase_loss(trainer)), max(3, args.steps // 5), 1)
        print(f"erase step, plain per-layer loss: {direct * 1000:8.1f} s per 1000 steps "
              f"({direct / erase:.1f}x the Gram form)")
    plan_steps = cpe.total_steps(config)
    erase_steps = sum(cpe.stage_plan(config, s).steps for s in range(1, config.stages + 1))
    estimate = erase_steps * erase + (plan_steps - erase_steps) * attack
    print(f"one {config.kind} concept ({erase_steps} erase + {plan_steps - erase_steps} attack steps): "
          f"about {estimate / 60:.1f} min")


if __name__ == "__main__":
    main()
