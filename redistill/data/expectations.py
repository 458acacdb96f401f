"""Validate an image folder with a great_expectations 1.x suite over its per-image table.

The suite is built in code from the reference's profile (`redistill.data.validation.reference_profile`: bands per
channel for grey or colour images of any size, labels only when both sides have them) and
saved as JSON with every run, next to the GX result and the data docs HTML. A failed validation names
every failed expectation, so the cycle can stop before any distillation and say why. A representative set
the watch grew is validated against the reference it grew from, widened by the batches it accepted
(`redistill.data.validation.validation_basis`); the report, `profile.json` and `basis.json` say which.

A folder with captions is validated on them too, by a second suite over its caption table
(`redistill.data.validation.caption_table`) in the same GX context: every image has a caption (not empty after
strip), none is longer than the teacher's tokenizer allows (`model_max_length`, special tokens counted) or, with
no tokenizer, than `validate.max_caption_tokens` whitespace words, and no caption labels more than
`validate.max_duplicate_caption_share` of the images. Its files are `captions_suite.json`, `captions_result.json`
and `captions_profile.json`; the report says which counter was used. Captions on one side only (the folder or the
reference) fail with a message that says which. A folder without captions is validated on its images alone.

great_expectations is imported inside the functions, so importing this module stays cheap.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from redistill.config import ValidateParams
from redistill.data.base import DataError
from redistill.data.caption_files import captions_file
from redistill.data.validation import (
    caption_counter,
    caption_table,
    grown_profile,
    image_table,
    reference_profile,
    validation_basis,
)

SUITE_NAME = "redistill-images"
CAPTIONS_SUITE_NAME = "redistill-captions"


@dataclass
class ValidationReport:
    """The outcome of one validation: success, what failed, and where the GX files are."""

    success: bool
    failed: list[str] = field(default_factory=list)  # one readable line per failed expectation
    num_images: int = 0
    suite_json: Path | None = None
    result_json: Path | None = None
    data_docs: Path | None = None  # index.html of the GX data docs site
    bands_from: str = ""  # the reference (and accepted batches) whose bands the suite was learnt from
    captions: str = ""  # with captions: how many, and how their length was counted (tokenizer or words)
    captions_result_json: Path | None = None

    def message(self) -> str:
        if self.success:
            return (
                f"data validation passed ({self.num_images} images"
                + (f"; bands from {self.bands_from}" if self.bands_from else "")
                + (f"; {self.captions}" if self.captions else "")
                + ")"
            )
        return "data validation failed: " + "; ".join(self.failed) + (f" ({self.captions})" if self.captions else "")


def build_suite(profile: dict, p: ValidateParams, labelled: bool = True):
    """The expectation suite: shape, value range, NaN/inf, per-channel bands, duplicates, count, and labels when
    both the reference (`profile`) and the validated folder (`labelled`) have them."""
    import great_expectations as gx

    E = gx.expectations
    expectations = [
        E.ExpectTableRowCountToBeBetween(min_value=p.min_count),
        E.ExpectColumnValuesToBeInSet(column="readable", value_set=[True]),
        E.ExpectColumnValuesToBeInSet(column="height", value_set=[profile["height"]]),
        E.ExpectColumnValuesToBeInSet(column="width", value_set=[profile["width"]]),
        E.ExpectColumnValuesToBeInSet(column="channels", value_set=[profile["channels"]]),
        E.ExpectColumnValuesToBeBetween(column="min", min_value=0.0, max_value=1.0),
        E.ExpectColumnValuesToBeBetween(column="max", min_value=0.0, max_value=1.0),
        E.ExpectColumnValuesToBeInSet(column="nan_count", value_set=[0]),
        E.ExpectColumnValuesToBeInSet(column="inf_count", value_set=[0]),
        *(
            E.ExpectColumnValuesToBeBetween(column=column, min_value=lo, max_value=hi, mostly=p.mostly)
            for column, (lo, hi) in profile["bands"].items()
        ),
        E.ExpectColumnValuesToBeUnique(column="pixel_sha256"),
    ]
    if "label_values" in profile and labelled:  # labels are optional: without them on both sides, no label check
        expectations += [
            E.ExpectColumnValuesToNotBeNull(column="label"),
            E.ExpectColumnValuesToBeInSet(column="label", value_set=profile["label_values"]),
            E.ExpectColumnKLDivergenceToBeLessThan(
                column="label",
                threshold=p.label_kl_max,
                partition_object={"values": profile["label_values"], "weights": profile["label_weights"]},
            ),
        ]
    return gx.ExpectationSuite(name=SUITE_NAME, expectations=expectations)


def build_caption_suite(caption_profile: dict, p: ValidateParams):
    """The captions' suite: every image captioned, none longer than the counter's limit, no caption labelling
    more than validate.max_duplicate_caption_share of the images."""
    import great_expectations as gx

    E = gx.expectations
    return gx.ExpectationSuite(
        name=CAPTIONS_SUITE_NAME,
        expectations=[
            E.ExpectColumnValuesToBeInSet(column="has_caption", value_set=[True]),
            E.ExpectColumnValuesToBeBetween(column="n_tokens", min_value=0, max_value=caption_profile["token_limit"]),
            E.ExpectColumnValuesToBeBetween(
                column="caption_share", min_value=0.0, max_value=p.max_duplicate_caption_share
            ),
        ],
    )


def _offending_files(table, cfg) -> list[str]:
    """The files of `table` that break one column expectation, so the message can name them."""
    import pandas as pd

    col, kw = cfg.kwargs.get("column"), cfg.kwargs
    if col not in getattr(table, "columns", []):
        return []
    values = table[col]
    if cfg.type == "expect_column_values_to_be_in_set":
        bad = ~values.isin(kw["value_set"]) & values.notna()
    elif cfg.type == "expect_column_values_to_be_between":
        v = pd.to_numeric(values, errors="coerce")
        bad = v.notna() & ((v < kw.get("min_value", -float("inf"))) | (v > kw.get("max_value", float("inf"))))
    elif cfg.type == "expect_column_values_to_not_be_null":
        bad = values.isna() & table["readable"].astype(bool)
    elif cfg.type == "expect_column_values_to_be_unique":
        bad = values.duplicated(keep=False) & values.notna()
    else:
        return []
    files = table.loc[bad, "file"].tolist()
    if col == "readable" and "error" in table.columns:
        errors = dict(zip(table["file"], table["error"]))
        return [f"{f} ({errors[f]})" if errors.get(f) else f for f in files]
    return files


def _describe(result, table=None, unit: str = "tokens") -> str:
    cfg = result.expectation_config
    kw = {k: v for k, v in cfg.kwargs.items() if k not in ("batch_id", "partition_object")}
    observed = result.result.get("observed_value")
    unexpected = result.result.get("partial_unexpected_list") or result.result.get("unexpected_count")
    detail = f"observed {observed}" if observed is not None else f"unexpected {unexpected}"
    files = _offending_files(table, cfg) if table is not None else []
    fix = "fix or remove those files"
    column = cfg.kwargs.get("column")
    if cfg.type == "expect_column_values_to_be_unique" and column == "pixel_sha256":
        detail = f"{len(files) or result.result.get('unexpected_count')} images are pixel-for-pixel duplicates"
    elif cfg.type == "expect_table_row_count_to_be_between":
        detail += " images; validate.min_count asks for more: add images or lower validate.min_count"
    elif column == "has_caption":
        detail, fix = (
            f"{len(files)} images have no caption (none in the captions file, or only whitespace)",
            "write their captions",
        )
    elif column == "n_tokens":
        detail = f"{len(files)} captions are longer than {kw.get('max_value'):g} {unit} (the text encoder would truncate them)"
        fix = "shorten those captions"
    elif column == "caption_share" and files:
        top = table.loc[table["file"].isin(files)].sort_values("caption_share", ascending=False).iloc[0]
        detail = (
            f"{len(files)} images share captions that each label more than {kw.get('max_value'):g} of the "
            f"images (the most common, {top['caption']!r}, labels {top['caption_share']:.1%})"
        )
        fix = "write distinct captions for them, or raise validate.max_duplicate_caption_share"
    if files:
        detail += f" in {', '.join(files[:5])}" + (f" and {len(files) - 5} more" if len(files) > 5 else "") + f"; {fix}"
    return f"{cfg.type}({', '.join(f'{k}={v}' for k, v in kw.items())}): {detail}"


def validate_folder(
    folder: Path,
    reference: Path,
    p: ValidateParams,
    out_dir: Path,
    reference_md5: str | None = None,
    teacher: Path | None = None,
) -> ValidationReport:
    """Validate `folder` against the suite learnt from `reference`; GX files go under `out_dir`.

    A representative set the watch grew (it holds `grown_from.json`) is validated against the reference it grew
    from, widened by the batches it accepted, and refused when `reference` is no longer that reference.
    `reference_md5`, when given, is the reference the cycle's key covers: any other one on disk is refused.
    Captions, when the folder has them, are counted with `teacher`'s tokenizer (`<teacher>/tokenizer`), else in
    whitespace words.
    """
    table = image_table(folder)
    if table.empty:
        return ValidationReport(False, [f"{folder} holds no PNG images; point --data at a folder of PNGs"], 0)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        basis = validation_basis(folder, reference)
    except DataError as e:
        return ValidationReport(False, [str(e)], len(table))
    if reference_md5 is not None and basis["reference_md5"] != reference_md5:
        basis["problem"] = (
            f"{reference} changed since the cycle resolved its inputs (md5 {reference_md5} in its key, "
            f"{basis['reference_md5'] or 'missing'} now); run the cycle again"
        )
    (out_dir / "basis.json").write_text(json.dumps(basis, indent=2) + "\n")
    if basis["problem"]:
        return ValidationReport(False, [basis["problem"]], len(table), bands_from=basis["bands_from"])
    try:
        reference_table = image_table(reference)
        profile = (
            grown_profile(reference_table, table, basis["batches"], p)
            if basis["batches"]
            else reference_profile(reference_table, p)
        )
    except DataError as e:
        return ValidationReport(False, [str(e)], len(table), bands_from=basis["bands_from"])
    try:
        captions, caption_profile, mismatch = _captions(folder, reference, p, teacher)
    except DataError as e:  # a malformed captions file, or a teacher tokenizer that does not load
        return ValidationReport(False, [str(e)], len(table), bands_from=basis["bands_from"])
    report = validate_table(
        table, {**profile, "bands_from": basis["bands_from"]}, p, out_dir, captions, caption_profile
    )
    report.bands_from = basis["bands_from"]
    if mismatch:
        report.success = False
        report.failed.append(mismatch)
    return report


def _captions(folder: Path, reference: Path, p: ValidateParams, teacher: Path | None):
    """(caption table or None, its profile, a message when only one of `folder` and `reference` has captions)."""
    mine, theirs = captions_file(folder), captions_file(reference)
    mismatch = None
    if mine is not None and theirs is None:
        mismatch = (
            f"{folder} has captions ({mine.name}) but the reference {reference} has none: captioned data is "
            f"validated against a captioned reference. Add captions to {reference} (captions.csv or "
            f"metadata.jsonl), or remove {mine} to validate the images alone"
        )
    elif mine is None and theirs is not None:
        mismatch = (
            f"{folder} has no captions but the reference {reference} has ({theirs.name}): a text-to-image "
            f"teacher needs a caption for every image. Add captions.csv (file,caption) or metadata.jsonl "
            f"(file_name, text) to {folder}"
        )
    if mine is None:
        return None, None, mismatch
    counter = caption_counter(teacher, p.max_caption_tokens)
    table = caption_table(folder, counter)
    profile = {
        "captions_file": mine.name,
        "token_limit": counter.limit,
        "unit": counter.unit,
        "counted_with": counter.name,
        "max_duplicate_caption_share": p.max_duplicate_caption_share,
        "num_captioned": int(table["has_caption"].sum()),
        "num_images": int(len(table)),
    }
    return table, profile, mismatch


def validate_table(
    table, profile: dict, p: ValidateParams, out_dir: Path, captions=None, caption_profile: dict | None = None
) -> ValidationReport:
    """Run the suite for `profile` over a per-image table; writes suite, result, profile and data docs.

    With a caption table (`redistill.data.validation.caption_table`) and its `caption_profile` (token_limit,
    counted_with), the captions' suite runs too, in the same data docs."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    logging.getLogger("great_expectations").setLevel(logging.ERROR)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # a folder with no labels.csv is validated on its pixels alone; one whose labels.csv misses files still
    # meets the not-null expectation
    suite = build_suite(profile, p, labelled=bool(table["label"].notna().any()))
    with tempfile.TemporaryDirectory() as tmp:
        ctx = gx.get_context(mode="file", project_root_dir=tmp)
        # no "Calculating Metrics" bars on stderr: the report lists what failed
        ctx.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
        batch = (
            ctx.data_sources.add_pandas("images")
            .add_dataframe_asset("table")
            .add_batch_definition_whole_dataframe("all")
        )
        suite = ctx.suites.add(suite)
        vd = ctx.validation_definitions.add(gx.ValidationDefinition(name="images", data=batch, suite=suite))
        cp = ctx.checkpoints.add(
            gx.Checkpoint(
                name="validate", validation_definitions=[vd], actions=[gx.checkpoint.UpdateDataDocsAction(name="docs")]
            )
        )
        run = cp.run(batch_parameters={"dataframe": table})
        (result,) = run.run_results.values()
        failed = [_describe(r, table) for r in result.results if not r.success]
        captions_result = None
        if captions is not None:  # a second asset and checkpoint: its own table, one row per image file
            cbatch = (
                ctx.data_sources.add_pandas("captions")
                .add_dataframe_asset("table")
                .add_batch_definition_whole_dataframe("all")
            )
            csuite = ctx.suites.add(build_caption_suite(caption_profile, p))
            cvd = ctx.validation_definitions.add(gx.ValidationDefinition(name="captions", data=cbatch, suite=csuite))
            ccp = ctx.checkpoints.add(
                gx.Checkpoint(
                    name="validate-captions",
                    validation_definitions=[cvd],
                    actions=[gx.checkpoint.UpdateDataDocsAction(name="docs")],
                )
            )
            crun = ccp.run(batch_parameters={"dataframe": captions})
            (captions_result,) = crun.run_results.values()
            failed += [
                _describe(r, captions, caption_profile["unit"]) for r in captions_result.results if not r.success
            ]
        docs_src = Path(tmp) / "gx" / "uncommitted" / "data_docs" / "local_site"
        docs = out_dir / "data_docs"
        shutil.rmtree(docs, ignore_errors=True)
        shutil.copytree(docs_src, docs)
    (out_dir / "suite.json").write_text(json.dumps(suite.to_json_dict(), indent=2, default=str) + "\n")
    (out_dir / "result.json").write_text(json.dumps(result.to_json_dict(), indent=2, default=str) + "\n")
    (out_dir / "profile.json").write_text(json.dumps(profile, indent=2) + "\n")
    report = ValidationReport(
        success=bool(run.success),
        failed=failed,
        num_images=len(table),
        suite_json=out_dir / "suite.json",
        result_json=out_dir / "result.json",
        data_docs=docs / "index.html",
    )
    if captions_result is not None:
        (out_dir / "captions_suite.json").write_text(json.dumps(csuite.to_json_dict(), indent=2, default=str) + "\n")
        (out_dir / "captions_result.json").write_text(
            json.dumps(captions_result.to_json_dict(), indent=2, default=str) + "\n"
        )
        (out_dir / "captions_profile.json").write_text(json.dumps(caption_profile, indent=2) + "\n")
        report.success = report.success and bool(crun.success)
        report.captions_result_json = out_dir / "captions_result.json"
        report.captions = (
            f"captions: {caption_profile['num_captioned']} of {caption_profile['num_images']} images "
            f"({caption_profile['captions_file']}), lengths counted in {caption_profile['counted_with']}"
        )
    return report
