"""The student's model card: a README.md in its folder, as diffusers' training scripts write one
(`diffusers.utils.hub_utils.load_or_create_model_card(from_training=True)` + `populate_model_card`): YAML front matter
(`library_name: diffusers`, `base_model`, `tags`), then what the model is, how to load and sample it, its lineage and
the gate's figures. Pure text: no torch, no diffusers, no MLflow here; the callers read the records.

Its inputs are those of the version's description (`mlflow_lineage.version_description`), plus the start (cold, or
warm from a version), what the folder holds (`folder_facts`), the MLflow store and images beside the card.
"""

from __future__ import annotations

import json
from pathlib import Path

from redistill.models.adapter_files import PEFT_ONLY
from redistill.registry.mlflow_lineage import _trigger_note, gate_table

CARD = "README.md"


def folder_facts(folder: Path) -> dict:
    """What the card's "how to use" needs from a student folder: its model_index.json, its text-to-image sampling
    settings (redistill_sampling.json) and, for a LoRA adapter, its pointer to the base (redistill_lora.json)."""
    folder = Path(folder)

    def read(name: str) -> dict | None:
        f = folder / name
        try:
            return json.loads(f.read_text()) if f.is_file() else None
        except ValueError:
            return None

    return {
        "model_index": read("model_index.json"),
        "sampling": read("redistill_sampling.json"),
        "adapter": read("redistill_lora.json"),
    }


def _kind(model_index: dict | None, sampling: dict | None) -> str:
    if sampling is not None or (model_index or {}).get("text_encoder"):
        return "text-to-image"
    if isinstance((model_index or {}).get("_class_name"), list):
        return "class-conditional-image-generation"
    return "unconditional-image-generation"


_WHAT = {
    "text-to-image": "A text-to-image",
    "class-conditional-image-generation": "A class-conditional",
    "unconditional-image-generation": "An unconditional",
}


def _lora_lines(path: str) -> list[str]:
    return [f'pipe.load_lora_weights({path!r}, weight_name="pytorch_lora_weights.safetensors")', "pipe.fuse_lora()"]


def _peft_lines(path: str) -> list[str]:
    """DiTPipeline and PixArtSigmaPipeline have no LoRA loader: peft injects and fills the adapter."""
    return [
        "from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict",
        "from safetensors import safe_open",
        "",
        f'with safe_open({path + "/pytorch_lora_weights.safetensors"!r}, framework="pt") as f:',
        '    config = json.loads(f.metadata()["lora_adapter_metadata"])',
        "    state = {k: f.get_tensor(k) for k in f.keys()}",
        'keys = ("r", "lora_alpha", "target_modules")',
        "inject_adapter_in_model(LoraConfig(**{k: config[k] for k in keys}), pipe.transformer)",
        "set_peft_model_state_dict(pipe.transformer, state)",
    ]


def usage(
    path: str, steps, model_index: dict | None = None, sampling: dict | None = None, adapter: dict | None = None
) -> str:
    """The Python that loads and samples the student in `path` with diffusers alone."""
    own = isinstance((model_index or {}).get("_class_name"), list)  # a pipeline class of redistill's own, shipped
    call = f"num_inference_steps={steps}"
    if sampling is not None or (adapter is not None and model_index is None):
        g = (sampling or {}).get("guidance_scale", 1.0)
        call = f'"a prompt", num_inference_steps={steps}, guidance_scale={g}'
        if "num_classes" in (sampling or {}):  # a class-conditional latent student (DiT): labels, not prompts
            call = f"class_labels=[0, 1], num_inference_steps={steps}, guidance_scale={g}"
    elif own:
        call = f"class_labels=[0, 1], num_inference_steps={steps}"
    if adapter is not None and model_index is None:  # the registered form of a LoRA student: adapter + scheduler
        base = adapter.get("base_uri") or "path/to/the/base/teacher"
        return "\n".join(
            [
                "import json",
                "",
                "import diffusers",
                "",
                f"pipe = diffusers.DiffusionPipeline.from_pretrained({base!r})  # the base teacher, sha256 "
                f"{adapter.get('base_sha256', '?')}",
                *(_peft_lines(path) if adapter.get("denoiser") in PEFT_ONLY else _lora_lines(path)),
                f'scheduler = json.load(open({path + "/scheduler/scheduler_config.json"!r}))["_class_name"]  # the student\'s',
                f"pipe.scheduler = getattr(diffusers, scheduler).from_pretrained({path + '/scheduler'!r})",
                f"images = pipe({call}).images",
            ]
        )
    return "\n".join(
        [
            "from diffusers import DiffusionPipeline",
            "",
            f"pipe = DiffusionPipeline.from_pretrained({path!r}{', trust_remote_code=True' if own else ''})",
            f"images = pipe({call}).images",
        ]
    )


def model_card(
    *,
    name: str,
    version: str | None,
    teacher_uri: str,
    teacher_sha256: str,
    datasets: list[dict],
    params_sha256: str,
    git_commit: str,
    trigger: str,
    trigger_detail: dict | None,
    method: str,
    steps: str,
    checks: list[dict],
    verdict: str,
    replaced: str | None,
    champion_before: str | None,
    run_id: str,
    flow_run_url: str | None,
    init: str | None = None,
    aliases: list[str] | None = None,
    model_index: dict | None = None,
    sampling: dict | None = None,
    adapter: dict | None = None,
    tracking_uri: str | None = None,
    run_url: str | None = None,
    model_id: str | None = None,
    images: list[tuple[str, str]] | None = None,
    path: str = "path/to/this/folder",
) -> str:
    """README.md of a student folder. The first arguments are `version_description`'s (`version` None: not registered
    yet, as when the logged model is written before its version); `path` is how the "how to use" snippet names the
    folder; `images` are (caption, path relative to the card) pairs shown under the figures."""
    kind = _kind(model_index, sampling)
    tags = ["diffusers", "diffusers-training", "distillation", f"{method}-distillation", "redistill", kind]
    if adapter is not None:
        tags.append("lora")
    front = [
        "---",
        "library_name: diffusers",
        f"base_model: {json.dumps(str(teacher_uri))}",
        "tags:",
        *[f"- {json.dumps(t)}" for t in dict.fromkeys(tags)],
        "inference: true",
        "---",
    ]
    registered = (
        f"version {version} of the registered model `{name}`"
        if version is not None
        else f"a candidate for the registered model `{name}` (its version is assigned at registration: the "
        "logged model's tag `mlflow.modelVersions` names it)"
    )
    if replaced:
        outcome = f"it passed its gate and replaced champion version {replaced}"
    elif verdict == "passed":
        outcome = "it passed its gate"
    else:
        outcome = "it was rejected by its gate" + (
            f"; the champion stayed version {champion_before}" if champion_before else ""
        )
    start = init or "cold"
    start_text = (
        "from the teacher (cold)"
        if start.split(":")[0] == "cold"
        else f"from champion version {start.split(':', 1)[1]} (warm)"
        if ":" in start
        else start
    )
    commit = git_commit or "unknown"
    rows = [
        f"| registry | `{name}`"
        + (f" version {version}" if version is not None else " (not registered yet)")
        + (f" (aliases: {', '.join(aliases)})" if aliases else "")
        + " |",
        f"| method | {method} at {steps} steps |",
        f"| teacher | `{teacher_uri}` |",
        f"| teacher sha256 | `{teacher_sha256}` |",
        *[f"| data ({d.get('context')}) | `{d.get('path')}` (DVC md5 `{d.get('md5')}`) |" for d in datasets],
        f"| settings sha256 | `{params_sha256}` |",
        f"| code | git `{commit.removesuffix('-dirty')}`{' (dirty tree)' if commit.endswith('-dirty') else ''} |",
        f"| trigger | {trigger}{_trigger_note(trigger_detail)} |",
        f"| start | {start_text} |",
        *(
            [
                f"| LoRA adapter | rank {adapter.get('rank', '?')} on the base teacher sha256 "
                f"`{adapter.get('base_sha256', '?')}` |"
            ]
            if adapter is not None
            else []
        ),
        f"| MLflow run | `{run_id}`"
        + (f" ({run_url})" if run_url else "")
        + (f" in `{tracking_uri}`" if tracking_uri else "")
        + " |",
        *([f"| MLflow logged model | `{model_id}` |"] if model_id else []),
        *([f"| Prefect flow run | {flow_run_url} |"] if flow_run_url else []),
        f"| gate | **{verdict}**" + (f", replaced version {replaced}" if replaced else "") + " |",
    ]
    body = [
        "",
        "<!-- This model card has been generated automatically according to the information the training script had "
        "access to. You\nshould probably proofread and complete it, then remove this comment. -->",
        "",
        f"# {name}" + (f" v{version}" if version is not None else ""),
        "",
        f"{_WHAT[kind]} diffusion model distilled by redistill ({method} distillation) from the teacher "
        f"`{teacher_uri}`, to sample in {steps} steps. It is {registered}; {outcome}.",
        "",
        "## Intended uses & limitations",
        "",
        "#### How to use",
        "",
        "```python",
        usage(path, steps, model_index, sampling, adapter),
        "```",
        "",
        "It was distilled and judged at the step count above; other step counts work, unjudged.",
        "",
        "#### Limitations and bias",
        "",
        "It can do no better than its teacher, and it was judged only on the data below, by the gate's checks.",
        "",
        "## Training details",
        "",
        "### Lineage",
        "",
        "| lineage | |",
        "|---|---|",
        *rows,
        "",
        "### The gate's figures",
        "",
        *gate_table(checks),
        *(["", *[f"![{caption}]({rel})" for caption, rel in images]] if images else []),
        "",
    ]
    return "\n".join(front + body)


def cycle_card(
    name: str,
    inputs: dict,
    logged: dict,
    decision: dict,
    tags: dict,
    run_id: str,
    steps: int,
    student: Path,
    version: str | None = None,
    replaced: str | None = None,
    champion_before: str | None = None,
    model_id: str | None = None,
) -> str:
    """The card from what a cycle holds before it registers (the arguments of tasks/registry.py describe_version,
    less the version): for the pyfunc model's folders (`serving.save_pyfunc(..., card=...)`)."""
    detail = tags.get("redistill.trigger_detail")
    return model_card(
        name=name,
        version=version,
        teacher_uri=inputs["teacher_uri"],
        teacher_sha256=inputs["teacher_sha256"],
        datasets=logged["datasets"],
        params_sha256=inputs["params_sha256"],
        git_commit=inputs["git_commit"],
        trigger=tags.get("redistill.trigger", "?"),
        trigger_detail=json.loads(detail) if detail else None,
        method=tags.get("redistill.method", "?"),
        steps=str(steps),
        checks=decision["checks"],
        verdict="passed" if decision["passed"] else "rejected",
        replaced=replaced,
        champion_before=champion_before,
        run_id=run_id,
        flow_run_url=tags.get("redistill.prefect_flow_run_url"),
        init=tags.get("redistill.init"),
        model_id=model_id,
        **folder_facts(student),
    )


def lineage_card(d: dict, folder: Path, images: list[tuple[str, str]] | None = None) -> str:
    """The card from a registered version's lineage (`redistill.lineage.lineage`'s dict), for the folder
    `redistill export` wrote."""
    m = d.get("mlflow") or {}
    datasets = [
        {
            "context": ds.get("context"),
            "path": (ds.get("source") or {}).get("dvc_path") if isinstance(ds.get("source"), dict) else ds.get("name"),
            "md5": ds.get("digest"),
        }
        for ds in m.get("datasets") or []
    ]
    if not datasets:  # a version from before MLflow lineage: its tags
        datasets = [{"context": "training", "path": d["data"]["uri"], "md5": d["data"]["md5"]}]
    init = d["init"]["kind"] + (f":{d['init']['from_version']}" if d["init"].get("from_version") else "")
    g = d["gate"]
    return model_card(
        name=d["model"],
        version=d["version"],
        teacher_uri=d["teacher"]["uri"],
        teacher_sha256=d["teacher"]["sha256"],
        datasets=datasets,
        params_sha256=d["params"]["sha256"],
        git_commit=d["code"]["git_commit"] + ("-dirty" if d["code"]["dirty"] else ""),
        trigger=d["trigger"]["kind"],
        trigger_detail=d["trigger"]["detail"] if isinstance(d["trigger"]["detail"], dict) else None,
        method=d["method"],
        steps=d["num_inference_steps"],
        checks=g["checks"],
        verdict=g["verdict"],
        replaced=d.get("replaced"),
        champion_before=None,
        run_id=d["run_id"],
        flow_run_url=d["prefect"]["url"],
        init=init,
        aliases=d.get("aliases"),
        tracking_uri=m.get("tracking_uri"),
        run_url=(m.get("ui") or {}).get("run") if str((m.get("ui") or {}).get("run", "")).startswith("http") else None,
        model_id=m.get("logged_model_id"),
        images=images,
        path=str(folder),
        **folder_facts(folder),
    )
