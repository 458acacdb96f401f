"""Smaller students (BK-SDM style: Kim et al. 2023, "BK-SDM: A Lightweight, Fast, and Cheap Version of
Stable Diffusion", arXiv:2305.15798), for every method.

1. Build the student UNet from the teacher's config with fewer channels per level and/or fewer
   layers per block (`distill.student`).
2. Initialise it from the teacher where shapes allow: a tensor of the same name and shape is copied;
   a tensor of the same name with smaller dimensions gets the teacher's leading slice (the first
   channels); a layer the teacher has beyond the student's count is dropped, as BK-SDM removes blocks
   and keeps the rest; anything else keeps its fresh initialisation.
3. Optionally add BK-SDM's feature-level distillation: the outputs of the student's down, mid and up
   blocks (a transformer's: its blocks' image tokens) are pulled towards the teacher's on the same input
   (`feature_loss` weight). Where the student has fewer channels it is compared with the teacher's leading
   channels, the same slice its weights were initialised from.

`with_sampling` marks how a conditional latent student of any method is sampled.
"""

from __future__ import annotations

import contextlib

import torch


class ShapeError(ValueError):
    """A smaller-student shape that cannot be built from this teacher."""


def is_default(block_out_channels: list[int], layers_per_block: int) -> bool:
    return not block_out_channels and not layers_per_block


def build_student(teacher_unet, block_out_channels: list[int], layers_per_block: int):
    """Step 1 and 2: the student UNet and what its initialisation did ({"copied", "sliced", "fresh"} counts)."""
    from diffusers import UNet2DModel

    if not isinstance(teacher_unet, UNet2DModel):
        raise ShapeError(
            f"a smaller student is built from a UNet2DModel teacher; this teacher's denoiser is a "
            f"{type(teacher_unet).__name__}: leave distill.student.block_out_channels and layers_per_block unset "
            "(the student keeps the teacher's shape)"
        )
    cfg = dict(teacher_unet.config)
    levels = len(cfg["block_out_channels"])
    if block_out_channels:
        if len(block_out_channels) != levels:
            raise ShapeError(
                f"distill.student.block_out_channels needs {levels} entries, one per level of the teacher "
                f"({list(cfg['block_out_channels'])}), got {block_out_channels}"
            )
        groups = cfg.get("norm_num_groups") or 32
        bad = [c for c in block_out_channels if c <= 0 or c % groups]
        if bad:
            raise ShapeError(
                f"distill.student.block_out_channels {block_out_channels}: every entry must be a positive "
                f"multiple of the teacher's norm_num_groups ({groups}); valid e.g. "
                f"{[max(groups, c // 2 // groups * groups) for c in cfg['block_out_channels']]}"
            )
        cfg["block_out_channels"] = tuple(block_out_channels)
    if layers_per_block:
        if layers_per_block < 1:
            raise ShapeError(f"distill.student.layers_per_block must be ≥ 1, got {layers_per_block}")
        cfg["layers_per_block"] = layers_per_block
    cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}
    try:
        student = UNet2DModel.from_config(cfg)
    except Exception as e:  # diffusers raises ValueError / RuntimeError for shapes it cannot build
        raise ShapeError(
            f"the student shape {block_out_channels or 'teacher'} × {layers_per_block or 'teacher'} "
            f"layers cannot be built: {e}"
        ) from e
    teacher_sd = teacher_unet.state_dict()
    counts = {"copied": 0, "sliced": 0, "fresh": 0}
    new_sd = student.state_dict()
    for name, v in new_sd.items():
        t = teacher_sd.get(name)
        if t is not None and t.shape == v.shape:
            new_sd[name] = t.clone()
            counts["copied"] += 1
        elif t is not None and t.dim() == v.dim() and all(a >= b for a, b in zip(t.shape, v.shape)):
            new_sd[name] = t[tuple(slice(0, d) for d in v.shape)].clone()
            counts["sliced"] += 1
        else:
            counts["fresh"] += 1
    student.load_state_dict(new_sd)
    return student.train().requires_grad_(True), counts


def feature_blocks(net) -> list:
    """The blocks whose outputs are a network's features: a UNet's down, mid and up blocks; a transformer's blocks
    (Flux: its double-stream then single-stream blocks)."""
    if hasattr(net, "down_blocks"):
        return [*net.down_blocks, net.mid_block, *net.up_blocks]
    return [*net.transformer_blocks, *getattr(net, "single_transformer_blocks", [])]


def block_output(output):
    """A block's features from its output: a UNet block's (hidden states, skips) → the hidden states; an MMDiT
    block's (context, image tokens) → the image tokens; else the tensor itself."""
    if not isinstance(output, tuple):
        return output
    return output[0] if output[0] is not None and output[0].ndim == 4 else output[-1]


class FeatureMatch:
    """Step 3: block-output feature distillation between a teacher and a student UNet.

    Features are captured only inside `with fm.teacher(): ...` and `with fm.student(): ...`, so the other
    calls a method makes (a teacher's second DDIM step, a target network) do not overwrite them.
    """

    def __init__(self, teacher_unet, student_unet, weight: float):
        self.weight = weight
        self._on = {"teacher": False, "student": False}
        self.feats: dict[str, list[torch.Tensor]] = {"teacher": [], "student": []}
        self._hooks = []
        if weight > 0:
            for who, unet in (("teacher", teacher_unet), ("student", student_unet)):
                for block in feature_blocks(unet):
                    self._hooks.append(block.register_forward_hook(self._hook(who)))

    def _hook(self, who):
        def hook(_module, _inputs, output):
            if self._on[who]:
                self.feats[who].append(block_output(output))

        return hook

    @contextlib.contextmanager
    def _capture(self, who):
        self.feats[who] = []
        self._on[who] = self.weight > 0
        try:
            yield
        finally:
            self._on[who] = False

    def teacher(self):
        return self._capture("teacher")

    def student(self):
        return self._capture("student")

    def loss(self) -> torch.Tensor | float:
        """weight × mean over blocks of ‖student − teacher[leading channels]‖²; 0 when off."""
        if self.weight <= 0 or not self.feats["student"]:
            return 0.0
        terms = []
        for s, t in zip(self.feats["student"], self.feats["teacher"]):
            t = t.detach()[:, : s.shape[1]]
            terms.append((s.float() - t.float()).pow(2).mean())
        return self.weight * torch.stack(terms).mean()

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []


def with_sampling(pipe, model, steps: int):
    """Mark how a conditional latent student is sampled (the folder's redistill_sampling.json): at guidance 1 (the
    teacher's w is folded in; a UNet with a guidance embedding is given w through it, still in one pass)."""
    if model.clips or not model.conditional:  # a pixel or unconditional student: its pipeline says how to sample
        return pipe
    net = pipe.transformer if getattr(pipe, "unet", None) is None else pipe.unet
    # the student takes w as an input (LCM's guidance embedding, Flux's guidance_embeds): sampled at w, one pass
    embedded = getattr(net.config, "time_cond_proj_dim", None) is not None or bool(
        getattr(net.config, "guidance_embeds", False)
    )
    pipe.redistill_sampling = {
        **(getattr(pipe, "redistill_sampling", None) or {}),  # what the export recorded (a DiT's classes)
        "guidance_scale": model.guidance_scale if embedded else 1.0,
        "distilled_guidance_scale": model.guidance_scale,
        "num_inference_steps": steps,
    }
    return pipe
