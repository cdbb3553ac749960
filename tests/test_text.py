"""The frozen text encoder (bundled MiniLM, offline), its disk cache, and task descriptions."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from wsitools import text  # noqa: E402
from wsitools.errors import DataError, ModelError  # noqa: E402
from wsitools.text import embed_texts, load_task, resolve_text_model, task_from_dict  # noqa: E402

TEXTS = [
    "lung adenocarcinoma with glandular growth",
    "adenocarcinoma of the lung forming glands",
    "a red sports car parked on the street",
]


def test_default_model_embeds_offline_and_meaning_is_kept(tmp_path):
    emb = embed_texts(TEXTS, cache_dir=tmp_path)
    assert emb.shape == (3, 384) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-4)
    related, unrelated = emb[0] @ emb[1], emb[0] @ emb[2]
    assert related > 0.6 > unrelated + 0.3


def test_cache_is_used_and_keyed_by_model_and_text(tmp_path, monkeypatch):
    first = embed_texts(TEXTS[:2], cache_dir=tmp_path)
    cached = list(tmp_path.rglob("*.npy"))
    assert len(cached) == 2
    assert len({p.parent for p in cached}) == 1  # one folder per model

    def no_model(_):
        raise AssertionError("the model must not be loaded when every text is cached")

    monkeypatch.setattr(text, "_load_model", no_model)
    again = embed_texts(list(reversed(TEXTS[:2])), cache_dir=tmp_path)
    np.testing.assert_array_equal(again, first[::-1])
    with pytest.raises(AssertionError, match="must not be loaded"):
        embed_texts(["a text never embedded before"], cache_dir=tmp_path)


def test_plain_hugging_face_directory_gets_mean_pooling(tmp_path):
    """A model directory without sentence-transformers modules: mean pooling, no normalisation,
    so the direction equals the bundled sentence-transformers model's (mean pool + normalise)."""
    bundled = resolve_text_model(None)
    plain = tmp_path / "plain-minilm"
    plain.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json", "vocab.txt"):
        (plain / name).symlink_to(bundled / name)
    ours = embed_texts(TEXTS, model=plain, cache_dir=tmp_path / "cache")
    default = embed_texts(TEXTS, cache_dir=tmp_path / "cache")
    assert not np.allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-3)
    np.testing.assert_allclose(ours / np.linalg.norm(ours, axis=1, keepdims=True), default, atol=1e-4)
    assert len({p.parent for p in (tmp_path / "cache").rglob("*.npy")}) == 2


def test_bad_model_directory_is_named(tmp_path):
    with pytest.raises(ModelError, match="no config.json"):
        resolve_text_model(tmp_path)
    with pytest.raises(ModelError, match=str(tmp_path / "missing")):
        embed_texts(["x"], model=tmp_path / "missing", cache_dir=tmp_path)


def test_a_text_model_with_pickled_objects_is_refused_without_advice_to_unpickle_it(tmp_path):
    """torch's own message suggests weights_only=False, which would run whatever the file holds."""
    import fractions

    import torch

    bundled = resolve_text_model(None)
    model = tmp_path / "minilm"
    for path in bundled.rglob("*"):
        if path.is_file() and path.name != "model.safetensors":
            (model / path.relative_to(bundled)).parent.mkdir(parents=True, exist_ok=True)
            (model / path.relative_to(bundled)).symlink_to(path)
    torch.save({"embeddings.word_embeddings.weight": fractions.Fraction(1, 3)}, model / "pytorch_model.bin")
    with pytest.raises(ModelError) as caught:
        embed_texts(["x"], model=model, cache_dir=tmp_path / "cache")
    assert str(caught.value) == (
        f"text model {model}: cannot be loaded: it holds pickled Python objects other than tensors, "
        "which are never unpickled"
    )


def test_task_description_yaml(tmp_path):
    path = tmp_path / "task.yaml"
    path.write_text(
        "name: lung_subtype\n"
        "description: H&E whole-slide image of lung tissue; classify the subtype\n"
        "stain: H&E\n"
        "classes:\n"
        "  LUSC: squamous cell carcinoma, keratinisation\n"
        "  LUAD: adenocarcinoma, glandular growth\n"
    )
    task = load_task(path)
    assert task.classes == ("LUSC", "LUAD")  # file order, not sorted
    assert task.prompts() == [
        "Task: H&E whole-slide image of lung tissue; classify the subtype. Stain: H&E.",
        "LUSC: squamous cell carcinoma, keratinisation",
        "LUAD: adenocarcinoma, glandular growth",
    ]
    assert task_from_dict(task.to_dict()) == task


@pytest.mark.parametrize(
    "data, message",
    [
        ({"name": "t", "description": "d"}, "lacks classes"),
        ({"name": "t", "description": "d", "classes": {"a": "x"}}, "at least two"),
        ({"name": "../t", "description": "d", "classes": {"a": "x", "b": "y"}}, "task name"),
        ({"name": "t", "description": "d", "classes": {"a": "x", "b": ""}}, "without a description: b"),
        (["not", "a", "mapping"], "must be a mapping"),
    ],
)
def test_bad_task_descriptions_are_named(data, message):
    with pytest.raises(DataError, match=message):
        task_from_dict(data, source="my_task.yaml")


def test_missing_task_file(tmp_path):
    with pytest.raises(DataError, match=f"{Path(tmp_path) / 'nope.yaml'}: no such file"):
        load_task(tmp_path / "nope.yaml")
