"""Flow-matching pixel-space teachers: a `UNet2DModel` that predicts a velocity, sampled with diffusers'
`FlowMatchEulerDiscreteScheduler`, in a stock `DDPMPipeline` folder.

diffusers' convention (Stable Diffusion 3, Flux): the path from data to noise is straight,
x_σ = (1 − σ)·x₀ + σ·ε for σ ∈ [0, 1], the network sees timestep σ·T (T = `num_train_timesteps`) and predicts
the velocity dx/dσ = ε − x₀; the sampler is Euler from σ = 1 to 0 on the scheduler's grid, with its `shift`
(σ' = s·σ / (1 + (s − 1)·σ)) and its other settings as saved. `DDPMPipeline`'s loop (noise, then
`scheduler.step(unet(x, t), t, x)` per timestep) runs this sampler unchanged, so the teacher and its students
load and sample in plain diffusers.

There is no ᾱ schedule and no ε/v/x₀ prediction type: the methods written for diffusion teachers refuse this
kind (the `rectified` method serves it), and `velocity`, `ode_sample` and `add_noise` use the straight path.
"""

from __future__ import annotations

import contextlib
import hashlib

import torch

from redistill.models.pixel import UnconditionalPixel

PREDICTION = "flow"  # what `facts` calls the output: the velocity ε − x₀


class StraightPathModel:
    """What every flow-matching kind shares (mixed in before its base): the straight path's facts, noising and
    velocity. A kind says how to call its network (`output`, `teacher_output`) and how to sample."""

    family = "flow"
    solver = "euler"

    @property
    def prediction_type(self) -> str:
        return PREDICTION

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        raise ValueError(
            f"a {self.kind} model has no ᾱ schedule (it predicts a velocity on the straight path); "
            "this step serves diffusion models only"
        )

    def noise_path(self):
        from redistill.models.prediction import StraightPath

        return StraightPath(self.num_train_timesteps)

    def velocity(self, net, x, sigma, cond=None):
        return self.teacher_output(net, x, sigma.to(x.device).float() * self.num_train_timesteps, cond)

    def add_noise(self, x0, noise, t):
        sigma = (t.float() / self.num_train_timesteps).view(-1, 1, 1, 1).to(x0.device)
        return (1 - sigma) * x0 + sigma * noise

    def fit_grid(self, steps: int) -> None:
        """Before sampling at `steps`: a few-step student's `FlowMatchLCMScheduler` (consistency, adversarial, DMD)
        is saved for the K steps it was trained at, σ = 1, (K−1)/K, …, 1/K (`shift_terminal` = 1/K). Asked for
        another count, it is re-gridded to σ = 1, …, 1/steps, as its consistency training allows; one step takes
        `shift_terminal` off (stock diffusers divides by zero there). Any other scheduler (a shifted one: a
        teacher's) is left as saved."""
        from diffusers import FlowMatchLCMScheduler

        sched = self.pipe.scheduler
        c = sched.config
        if not isinstance(sched, FlowMatchLCMScheduler) or c.get("shift") != 1.0 or c.get("use_dynamic_shifting"):
            return
        want = student_terminal(steps)
        if c.shift_terminal != want:
            self.pipe.scheduler = FlowMatchLCMScheduler.from_config(c, shift_terminal=want)

    @contextlib.contextmanager
    def seeded_renoise(self, generator):
        """SD3's and Flux's pipelines call `scheduler.step` without the generator, so a re-noising sampler
        (`FlowMatchLCMScheduler`) would draw from torch's global RNG and the same seed would give other images on
        every call. Inside this context that RNG is forked (the global state is left as it was) and seeded from
        the generator's seed, hashed so the re-noise is not the initial noise again."""
        from diffusers import FlowMatchLCMScheduler

        if not isinstance(self.pipe.scheduler, FlowMatchLCMScheduler):
            yield
            return
        digest = hashlib.sha256(f"renoise:{generator.initial_seed()}".encode()).digest()
        device = generator.device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(int.from_bytes(digest[:8], "little") >> 1)
            yield

    @torch.no_grad()
    def ode_sample(self, net, x, steps, cond=None):
        """The teacher's own sampler from noise `x`: Euler on its scheduler's grid at `steps` (shift included),
        guidance folded in."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        sched = FlowMatchEulerDiscreteScheduler.from_config(self.pipe.scheduler.config)
        sched.set_timesteps(steps)
        for t in sched.timesteps:
            x = sched.step(self.teacher_output(net, x, t.expand(len(x)).to(x.device), cond), t, x).prev_sample
        return x


class FlowMatchingPixel(StraightPathModel, UnconditionalPixel):
    """An unconditional pixel model (its network call, `DDPMPipeline` sampling and export are the same) on the
    straight path instead of an ᾱ schedule."""

    kind = "flow-matching-pixel"
    layouts = ("DDPMPipeline",)
    description = (
        "a UNet2DModel without class embeddings that predicts a velocity, with a "
        "FlowMatchEulerDiscreteScheduler, e.g. a DDPMPipeline folder"
    )
    pairs_from_samples = False  # its couplings are Euler solves of its velocity, not DDIM draws: cached as pairs

    def sample(self, n, steps, generator, cond=None, guidance_scale=None):
        self.fit_grid(steps)
        return super().sample(n, steps, generator, cond, guidance_scale)

    @classmethod
    def claims(cls, pipe) -> bool:
        from diffusers import FlowMatchEulerDiscreteScheduler, FlowMatchLCMScheduler, UNet2DModel

        unet = getattr(pipe, "unet", None)
        return (
            isinstance(unet, UNet2DModel)
            and getattr(unet, "class_embedding", None) is None
            and isinstance(getattr(pipe, "scheduler", None), (FlowMatchEulerDiscreteScheduler, FlowMatchLCMScheduler))
        )

    # -- facts ----------------------------------------------------------------------------------------
    @property
    def shift(self) -> float:
        return float(self.scheduler_config.get("shift", 1.0))

    def facts(self) -> dict:
        c = self.scheduler_config
        return {
            **super().facts(),
            "shift": self.shift,
            "use_dynamic_shifting": bool(c.get("use_dynamic_shifting")),
            "shift_terminal": c.get("shift_terminal"),
        }


def student_terminal(steps: int) -> float | None:
    """The `shift_terminal` of a K-step student's grid σ = 1, (K−1)/K, …, 1/K: 1/K, or None at one step (σ = 1
    alone; stock diffusers divides by zero when it stretches a one-point grid)."""
    return None if steps == 1 else 1.0 / steps


def euler_scheduler(num_train_timesteps: int, steps: int):
    """The stock `FlowMatchEulerDiscreteScheduler` whose grid at `steps` is σ = 1, (K−1)/K, …, 1/K, then 0: the
    evenly spaced Euler steps a K-step student is trained on. (Its default grid ends at σ = 1/T, so a last step
    would be spent at almost no noise; `shift_terminal` = 1/K stretches the grid to end at 1/K. One step needs no
    setting: σ = 1, then 0.)"""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=num_train_timesteps, shift=1.0, shift_terminal=student_terminal(steps)
    )


def lcm_flow_scheduler(num_train_timesteps: int, steps: int):
    """The stock `FlowMatchLCMScheduler` that samples a consistency student of a flow teacher at `steps`: at
    σ = 1, (K−1)/K, …, 1/K (the grid `euler_scheduler` gives), each step x̂₀ = x − σ·v̂, re-noised to the next σ."""
    from diffusers import FlowMatchLCMScheduler

    return FlowMatchLCMScheduler(
        num_train_timesteps=num_train_timesteps, shift=1.0, shift_terminal=student_terminal(steps)
    )
