"""What every distillation method shares, so no method file repeats it.

- `Trainer`: one resumable training run. It owns the checkpoint folder, the device and the processes
  (accelerate: `accelerate launch` for several GPUs), mixed precision, the progress bar, the log lines and
  the wall clock.
- Mixed precision is torch's own AMP: `autocast` to bf16 or fp16 around the forward passes, fp32 master
  weights, and for fp16 one `GradScaler` per optimiser, so the gradient is unscaled before it is clipped,
  and a step whose gradient overflowed is skipped (the optimiser and the EMA do not move, the scale halves).
  accelerate's own fp16 needs `accelerator.prepare` on a GPU and silently does nothing on a CPU.
- `Trainer.phase`: one loop of optimiser steps (a progressive round, a consistency run, ...). Each
  checkpoint holds the full state of the phase: every model's weights (student, EMA/target, fake score,
  discriminator, the round's teacher), every optimiser and EMA, and the RNG, so a killed run resumes
  mid-phase and continues exactly where it stopped.
- Data parallel under `accelerate launch --multi_gpu --num_processes N` (NCCL on GPUs, gloo on CPUs):
  every process draws the same global batch of `distill.batch_size` from the same generator, works on its
  own 1/N of the rows (`Trainer.shard`), and the gradients are averaged, so N processes follow one process's
  run up to float rounding, every model stays identical everywhere, and a checkpoint (written by the main
  process only) resumes under any number of processes. Only the main process logs and writes.
- `new_ema`: diffusers' `EMAModel` with the warm-up the recipes use.
- `student_like`: a copy of the teacher's UNet to start the student from.
"""

from __future__ import annotations

import copy
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import Field
from tqdm import tqdm

from redistill.config import DistillParams, StudentParams, same_as, settings
from redistill.core import checkpoint

AMP_DTYPES = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@settings("TrainingConfig")
class TrainingConfig:
    """The settings every method shares, declared once in params.yaml `distill` and `distill.student`
    (redistill/config.py) and reused here with the same defaults; each method's config adds its own
    subsection (`ProgressiveConfig(ProgressiveParams, TrainingConfig)`) and has no default of its own."""

    target_steps: int = same_as(DistillParams, "target_steps")
    batch_size: int = same_as(DistillParams, "batch_size")
    lr: float = same_as(DistillParams, "lr")
    ema_decay: float = same_as(DistillParams, "ema_decay")
    seed: int = same_as(DistillParams, "seed")
    checkpoint_every: int = same_as(DistillParams, "checkpoint_every")
    mixed_precision: str = same_as(DistillParams, "mixed_precision")
    # distill.student under the names the checkpoints' fingerprints have always used; a tuple, as it was
    student_channels: tuple[int, ...] = same_as(StudentParams, "block_out_channels", convert=tuple, strict=False)
    student_layers: int = same_as(StudentParams, "layers_per_block")
    feature_loss: float = same_as(StudentParams, "feature_loss")
    lora_rank: int = same_as(StudentParams, "lora_rank")
    lora_alpha: float = same_as(StudentParams, "lora_alpha")
    lora_targets: str | list[str] = same_as(StudentParams, "lora_targets")
    init_from: str = Field(
        "", description='sha256 of the champion a warm start begins from ("" = from the teacher); redistill/warm.py'
    )


def new_ema(model: torch.nn.Module, decay: float, warmup: bool = True):
    """diffusers' EMAModel over `model`'s parameters; `warmup` ramps the decay up as the diffusers training
    scripts do; without it the decay is fixed (a consistency target network, whose μ is part of the method)."""
    from diffusers.training_utils import EMAModel

    return EMAModel(
        model.parameters(), decay=decay, use_ema_warmup=warmup, power=3 / 4, min_decay=0.0 if warmup else decay
    )


def student_like(unet: torch.nn.Module, channels: tuple = (), layers: int = 0) -> torch.nn.Module:
    """A trainable copy of `unet`, or, with `channels`/`layers`, a smaller student initialised from it
    where shapes allow (methods/student_shape.py)."""
    if not channels and not layers:
        return copy.deepcopy(unet).train().requires_grad_(True)
    from redistill.methods.student_shape import build_student

    return build_student(unet, list(channels), layers)[0].to(next(unet.parameters()).device)


def warm(student: torch.nn.Module, init: dict | None) -> torch.nn.Module:
    """Load a warm start's weights (the champion's UNet) into a freshly built student; a no-op without one."""
    if init is not None:
        student.load_state_dict(init)
    return student


def sizes(teacher_unet: torch.nn.Module, student_unet: torch.nn.Module) -> dict:
    """Parameter counts of teacher and student (smaller students report how much smaller)."""
    t = sum(p.numel() for p in teacher_unet.parameters())
    s = sum(p.numel() for p in student_unet.parameters())
    return {"teacher_params": t, "student_params": s, "student_param_ratio": round(s / t, 4)}


def frozen(unet: torch.nn.Module) -> torch.nn.Module:
    """`unet` in eval mode without gradients (a teacher or a target network)."""
    return unet.eval().requires_grad_(False)


@dataclass
class Phase:
    """The state of one training phase that a checkpoint must hold to resume it."""

    index: int  # phase number, 0-based; checkpoints order by (index, step)
    name: str  # for the progress bar and log lines, e.g. "round 1/2 (16→8 steps)"
    steps: int  # optimiser steps in the phase
    models: dict[str, torch.nn.Module]  # every network whose weights the phase changes or depends on
    optimizers: dict[str, torch.optim.Optimizer] = field(default_factory=dict)
    emas: dict = field(default_factory=dict)  # name → EMAModel
    generator: torch.Generator = field(default_factory=torch.Generator)


class Trainer:
    """A resumable run of one method. Checkpoints in `ckpt_dir` count only when their `fingerprint` (the
    method's settings and the teacher's prediction type) matches; others are discarded."""

    def __init__(
        self,
        ckpt_dir: Path,
        fingerprint: dict,
        checkpoint_every: int,
        log: Callable[[str], None] = print,
        mixed_precision: str = "no",
        keep: int = 2,
        seed: int = 0,
    ):
        from accelerate import Accelerator

        # fresh weights (a smaller student's new layers, discriminator heads) come from the global RNG:
        # seed it so an unbroken run and a resumed one start from the same networks
        torch.manual_seed(seed)
        # AMP is done here (see the module docstring), so accelerate only places devices and processes; one
        # setting for every run also keeps accelerate's process-wide state from clashing between runs
        # cpu=True where there is no GPU: processes started by `accelerate launch --multi_gpu` then join by gloo
        self.accelerator = Accelerator(mixed_precision="no", cpu=not torch.cuda.is_available())
        self.device = self.accelerator.device
        self.main = self.accelerator.is_main_process
        if not self.main:
            log = quiet  # one process speaks for all (the others' lines would repeat it)
        if mixed_precision not in AMP_DTYPES:
            raise ValueError(f"distill.mixed_precision must be one of {', '.join(AMP_DTYPES)}, got {mixed_precision!r}")
        self.amp_dtype = AMP_DTYPES[mixed_precision]
        self.scalers: dict[int, torch.amp.GradScaler] = {}  # fp16: one per optimiser, keyed by id
        self.skipped_steps = 0  # fp16 steps skipped because the gradient overflowed
        fingerprint = json.loads(json.dumps(fingerprint))  # as meta.json holds it (tuples become lists)
        self.ckpt_dir, self.fingerprint, self.every, self.log, self.keep = (
            Path(ckpt_dir),
            fingerprint,
            checkpoint_every,
            log,
            keep,
        )
        self.resume_path: Path | None = None
        self.resume_phase, self.resume_step, elapsed = 0, 0, 0.0
        found = checkpoint.latest(self.ckpt_dir)
        if found and found[1].get("fingerprint") == fingerprint:
            self.resume_path, meta = found
            self.resume_phase, self.resume_step, elapsed = meta["phase"], meta["step"], meta["elapsed_s"]
            log(f"resumed from {self.resume_path.name}: phase {self.resume_phase + 1}, step {self.resume_step}")
        self.accelerator.wait_for_everyone()  # every process has read the folder before the main one clears it
        if found and self.resume_path is None and self.main:
            shutil.rmtree(self.ckpt_dir)
        self.t0 = time.perf_counter() - elapsed

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def skips(self, index: int) -> bool:
        """True when a resumed run already finished phase `index`."""
        return self.resume_path is not None and index < self.resume_phase

    def resumed_weights(self, name: str) -> dict[str, torch.Tensor] | None:
        """Weights `name` of the checkpoint being resumed, if it holds them (e.g. a round's teacher)."""
        if self.resume_path is None or not (self.resume_path / f"{name}.safetensors").is_file():
            return None
        return checkpoint.load_weights(self.resume_path, name)

    @property
    def processes(self) -> int:
        return self.accelerator.num_processes

    def shard(self, *batch: torch.Tensor | None):
        """This process's rows of each global-batch tensor (None passes through): the i-th of N equal parts.

        Every process draws the whole global batch (the same numbers, since the generators agree), so the
        union of the shards is the batch one process would train on, whatever N is."""
        n, i = self.accelerator.num_processes, self.accelerator.process_index
        out = []
        for x in batch:
            if x is not None and n > 1:
                if len(x) % n:
                    raise ValueError(
                        f"distill.batch_size {len(x)} does not split over {n} processes; make it a multiple of {n}"
                    )
                x = x.chunk(n)[i]
            out.append(x)
        return out[0] if len(out) == 1 else tuple(out)

    def main_first(self):
        """A block the main process runs first (e.g. writes a cache) and the others after it (read it)."""
        return self.accelerator.main_process_first()

    def scaler(self, optimizer) -> torch.amp.GradScaler | None:
        """The fp16 loss scaler of `optimizer` (None under no/bf16, which need none)."""
        if self.amp_dtype is not torch.float16:
            return None
        if id(optimizer) not in self.scalers:
            self.scalers[id(optimizer)] = torch.amp.GradScaler(self.device.type)
        return self.scalers[id(optimizer)]

    def backward(
        self, loss: torch.Tensor, model: torch.nn.Module, optimizer, ema=None, max_grad_norm: float = 1.0
    ) -> bool:
        """One optimiser step: backward (scaled under fp16), unscale, clip, step, then the EMA.

        Returns False when fp16 found an inf/NaN gradient: then neither the weights nor the EMA move."""
        optimizer.zero_grad(set_to_none=True)
        scaler = self.scaler(optimizer)
        (scaler.scale(loss) if scaler is not None else loss).backward()
        if self.accelerator.num_processes > 1:  # data parallel under `accelerate launch`: average the gradients,
            grads = [p.grad for p in model.parameters() if p.grad is not None]  # in one all-reduce, not one per tensor
            if grads:
                flat = self.accelerator.reduce(torch.cat([g.reshape(-1) for g in grads]), reduction="mean")
                for g, mean in zip(grads, flat.split([g.numel() for g in grads])):
                    g.copy_(mean.view_as(g))
        if scaler is not None:
            scaler.unscale_(optimizer)  # clip the true gradient, not the scaled one
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        stepped = True
        if scaler is not None:
            scale = scaler.get_scale()
            scaler.step(optimizer)  # skips the step when the unscaled gradient holds inf/NaN
            scaler.update()
            stepped = scaler.get_scale() >= scale  # the scale only falls after an overflow
            self.skipped_steps += not stepped
        else:
            optimizer.step()
        if ema is not None and stepped:
            ema.step(model.parameters())
        return stepped

    def autocast(self):
        """Forward passes in the run's mixed precision (a no-op without it)."""
        return torch.autocast(
            self.device.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None
        )

    def phase(self, ph: Phase, step_fn: Callable[[], dict[str, float]]) -> dict[str, float]:
        """Run `step_fn` (one optimiser step; returns its losses) until `ph.steps`, with checkpoints, a
        progress bar on a terminal and a log line every 100 steps. Returns the mean of the last 100 losses."""
        for m in ph.models.values():
            m.to(self.device)
        for e in ph.emas.values():
            e.to(self.device)
        step = 0
        if self.resume_path is not None and ph.index == self.resume_phase:
            for name, m in ph.models.items():
                m.load_state_dict(checkpoint.load_weights(self.resume_path, name))
            state = checkpoint.load_state(self.resume_path)
            for name, o in ph.optimizers.items():
                o.load_state_dict(state["optimizers"][name])
            for name, e in ph.emas.items():
                e.load_state_dict(state["emas"][name])
            for name, o in ph.optimizers.items():
                if self.scaler(o) is not None and name in state.get("scalers", {}):
                    self.scaler(o).load_state_dict(state["scalers"][name])
            ph.generator.set_state(state["generator"])
            torch.set_rng_state(state["torch_rng"])
            if "cuda_rng" in state and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(state["cuda_rng"])
            step = self.resume_step
        history: dict[str, list[float]] = {}
        bar = tqdm(total=ph.steps, initial=step, desc=ph.name, disable=None if self.main else True, leave=False)
        while step < ph.steps:
            losses = step_fn()
            step += 1
            for k, v in losses.items():
                history.setdefault(k, []).append(v)
            bar.update(1)
            bar.set_postfix({k: f"{v:.4f}" for k, v in losses.items()}, refresh=False)
            if step % 100 == 0 or step == ph.steps:
                shown = " ".join(f"{k} {np.mean(v[-100:]):.4f}" for k, v in history.items())
                self.log(f"{ph.name} step {step}/{ph.steps} {shown} {self.elapsed:.0f}s")
            if step % self.every == 0 and step < ph.steps and self.main:
                self._save(ph, step)
        bar.close()
        means = {k: float(np.mean(v[-100:])) for k, v in history.items()}
        if self.processes > 1 and means:  # each process saw its shard: the global batch's losses are their mean
            keys = sorted(means)
            mean = self.accelerator.reduce(torch.tensor([means[k] for k in keys], device=self.device), reduction="mean")
            means = dict(zip(keys, mean.tolist()))
        return means

    def _save(self, ph: Phase, step: int) -> None:
        checkpoint.save(
            self.ckpt_dir / f"checkpoint-{ph.index:02d}-{step:07d}",
            {name: self.accelerator.unwrap_model(m).state_dict() for name, m in ph.models.items()},
            {
                "optimizers": {n: o.state_dict() for n, o in ph.optimizers.items()},
                "emas": {n: e.state_dict() for n, e in ph.emas.items()},
                "scalers": {
                    n: self.scaler(o).state_dict() for n, o in ph.optimizers.items() if self.scaler(o) is not None
                },
                "generator": ph.generator.get_state(),
                "torch_rng": torch.get_rng_state(),
                **({"cuda_rng": torch.cuda.get_rng_state_all()} if torch.cuda.is_available() else {}),
            },
            {
                "phase": ph.index,
                "step": step,
                "order": ph.index * 10**9 + step,
                "fingerprint": self.fingerprint,
                "elapsed_s": self.elapsed,
            },
        )
        checkpoint.prune(self.ckpt_dir, self.keep)

    def finish(self) -> float:
        """Remove the checkpoints of a finished run; returns the wall time."""
        self.accelerator.wait_for_everyone()
        if self.main:
            shutil.rmtree(self.ckpt_dir, ignore_errors=True)
        return round(self.elapsed, 1)


@dataclass
class Draws:
    """Every random draw of a step, in order, from the phase's generator: each of the global batch, of which this
    process keeps its shard (Trainer.shard)."""

    gen: torch.Generator
    run: Trainer
    batch: int
    shape: tuple
    device: Any

    def integers(self, high: int, low: int = 0) -> torch.Tensor:
        """Integers in [low, high), one per batch row (timesteps, indices)."""
        return self.run.shard(torch.randint(low, high, (self.batch,), generator=self.gen).to(self.device))

    def noise(self) -> torch.Tensor:
        """Standard normal noise of the batch's shape."""
        return self.run.shard(torch.randn((self.batch, *self.shape), generator=self.gen).to(self.device))

    def index(self, high: int) -> int:
        """One number for the whole batch (the same in every process)."""
        return int(torch.randint(0, high, (1,), generator=self.gen))


def quiet(message: str) -> None:
    """The log of a process other than the main one."""


def batch_conditions(model, run, idx: torch.Tensor, batch_size: int, gen: torch.Generator, device):
    """The conditions of the training images at `idx` (this process's shard): their own captions where the model
    pairs them with the data (text-to-image), else drawn for the global batch and sharded; None when unconditional."""
    if getattr(model, "paired", False):
        return model.conditions_at(idx, len(idx), gen, device)
    return run.shard(model.conditions(batch_size, gen, device))
