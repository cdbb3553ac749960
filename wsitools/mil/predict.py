"""Running trained heads on bags: probabilities, attention maps, and their files.

``wsitools predict --model DIR`` takes a training output (every ``fold_*/`` head, averaged: a
k-fold ensemble; survival heads average their risks relative to their own training median,
regression heads their predictions in the target's units) or one head folder, and writes
``predictions.csv`` and
``attention/{slide_id}.h5`` for each slide of a feature directory (no labels needed; heads trained
on patient bags pool each patient's slides the same way, from a slide -> patient table). The heads
run on ``device`` (``auto``: CUDA when available); bags are read on the CPU (each once, its values
checked as read) and copied over, and each bag's attention is written and let go before the next.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from wsitools import __version__
from wsitools.attention import pooling_attrs, write_attention
from wsitools.errors import DataError, ModelError, StoreError, one_line
from wsitools.io import atomic_path, check_out_apart, check_own_folder, not_an_output, write_json_atomic
from wsitools.feature_store import (
    EncoderRecord,
    FeatureStore,
    TileGeometry,
    check_finite,
    features_root_hint,
    list_feature_stores,
    read_coords,
    read_features,
)
from wsitools.mil.head_folder import SavedHead
from wsitools.labels import read_patients
from wsitools.mil.patients import group_slides, write_patient_attention
from wsitools.mil.run_folder import load_heads, write_predictions
from wsitools.types import check_slide_id

log = logging.getLogger(__name__)

RECORD_FILE = "predict.json"
"""A prediction folder's record (its inputs and what was predicted); it marks a folder that
``predict --overwrite`` may replace."""

OUTPUT_NAMES = {"survival": "risk", "regression": "prediction"}
"""The predictions column of a survival or regression head (classification: ``prob_{class}``)."""


@dataclass(frozen=True)
class BagPrediction:
    """One slide's prediction: class probabilities [C] (classification) or the one-element
    risk (survival) or predicted value (regression) [1]. Its attention is in the prediction
    folder's ``attention/{slide_id}.h5`` (:func:`~wsitools.attention.read_attention`), not
    here: a cohort's attention held until the end would grow with all its tiles."""

    slide_id: str
    probs: np.ndarray


SCALE_KEYS = ("risk_offset", "risk_scale", "target_mean", "target_sd")
"""What a survival or regression head records beside its weights to turn outputs into predictions."""


def to_predictions(outputs: np.ndarray, scale: dict[str, float]) -> np.ndarray:
    """Outputs ``[n, C]`` of one head as predictions: class probabilities [n, C] (``scale``
    empty), the risk standardised by the risks of the head's own training slides (their median
    ``risk_offset`` and standard deviation ``risk_scale``: 0 is the training median, so risks of
    several fold heads can be pooled, ranked and averaged), or the target in its own units
    (``target_mean`` + ``target_sd`` x output), [n]."""
    if "risk_offset" in scale:
        return (np.asarray(outputs, dtype=np.float64)[:, 0] - scale["risk_offset"]) / scale["risk_scale"]
    if "target_mean" in scale:
        return scale["target_mean"] + scale["target_sd"] * np.asarray(outputs, dtype=np.float64)[:, 0]
    return torch.softmax(torch.as_tensor(np.asarray(outputs, dtype=np.float32)), dim=-1).numpy()


def head_scale(head: SavedHead) -> dict[str, float]:
    """The scale a saved head recorded (empty for a classification head)."""
    return {k: float(head.meta[k]) for k in SCALE_KEYS if head.meta.get(k) is not None}


@torch.no_grad()
def predict_bag(
    models: Sequence[torch.nn.Module], x: torch.Tensor, ivp: torch.Tensor | None = None,
    *, scales: Sequence[dict[str, float]] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Mean prediction and mean attention of ``models`` (eval mode) on one bag: the mean of the
    softmax probabilities [C], or with ``scales`` (one per model, :func:`head_scale`) of each
    head's risk or predicted value, [1].

    The bag is moved to the device of the models (all on one device, e.g. from
    :func:`~wsitools.mil.run_folder.load_heads`); the results come back as CPU arrays."""
    device = next(models[0].parameters()).device
    x = x.to(device)
    ivp = ivp.to(device) if ivp is not None else None
    preds, attention = [], []
    for k, model in enumerate(models):
        model.eval()
        out = model(x, ivp)
        scale = scales[k] if scales is not None else {}
        preds.append(torch.from_numpy(to_predictions(out.logits.float()[None].cpu().numpy(), scale).reshape(-1)))
        attention.append(out.attention.float())
    return torch.stack(preds).mean(0).numpy(), torch.stack(attention).mean(0).cpu().numpy()


def check_encoder(head: SavedHead, bag: FeatureStore, *, model_dir: str | os.PathLike[str]) -> bool:
    """Refuse features of another encoder than the one ``head`` was trained on.

    A head records the encoder of its training features (name, ``encoder_hash`` and weight
    checksums, from the feature stores' attributes); a bag whose hash differs (other weights or
    settings, even at the same feature width) is a :class:`ModelError` naming both. A head
    without a recorded hash is compared by name when it has one; returns False when nothing
    could be compared (a head without an encoder record), so the caller can say so.
    """
    trained = EncoderRecord(head.meta.get("encoder"), head.meta.get("encoder_hash"), head.meta.get("encoder_weights"))
    given = EncoderRecord.of(bag.attrs)
    if trained.hash is not None:
        same = given.hash == trained.hash
    elif trained.name is not None and given.name is not None:
        same = given.name == trained.name
    else:
        return False
    if not same:
        raise ModelError(
            f"{bag.path}: features of encoder {given.describe()}, but the head {model_dir} was trained on "
            f"features of encoder {trained.describe()}; give --features of that encoder"
        )
    return trained.hash is not None


@dataclass(frozen=True)
class PatientPrediction:
    """One patient bag's prediction (as :class:`BagPrediction`) and the slides it pooled (in bag
    order); each slide's slice of the patient's attention is in its ``attention/{slide_id}.h5``."""

    patient_id: str
    slide_ids: tuple[str, ...]
    probs: np.ndarray


def _check_some_encoder_matches(
    head: SavedHead, wanted: Sequence[str], stores: dict[str, Path], *, model_dir: str | os.PathLike[str]
) -> None:
    """The :class:`ModelError` of :func:`check_encoder` when no store of ``wanted`` holds features
    of the head's encoder (the wrong ``--features``); a few stray stores among right ones are
    skipped one by one instead."""
    first_error = None
    for slide_id in wanted:
        try:
            check_encoder(head, FeatureStore.open_bag(stores[slide_id], check_values=False), model_dir=model_dir)
            return
        except ModelError as exc:
            first_error = first_error or exc
        except (DataError, KeyError):  # unusable or missing: reported with the slide
            continue
    if first_error is not None:
        raise first_error


def _checked_bag(
    slide_id: str, stores: dict[str, Path], head: SavedHead, *, features_dir: str | os.PathLike[str],
    model_dir: str | os.PathLike[str],
) -> FeatureStore:
    """The feature store of ``slide_id``, checked against the head: a :class:`DataError` naming
    the slide when it is missing, unusable, of another width or of tiles cut at another size or
    resolution than the head's training features, where both record it (another encoder's
    features of the same width are a :class:`ModelError` from :func:`check_encoder`). Its
    values are checked as :func:`_read_bag` reads them."""
    if slide_id not in stores:
        raise DataError(f"slide {slide_id}: no feature store {Path(features_dir) / (slide_id + '.h5')}")
    bag = FeatureStore.open_bag(stores[slide_id], check_values=False)
    if bag.dim != head.config.in_dim:
        raise DataError(
            f"slide {slide_id}: features are {bag.dim}-d, the head expects {head.config.in_dim}-d "
            f"(encoder {head.meta.get('encoder')})"
        )
    trained, given = TileGeometry.of(head.meta), TileGeometry.of(bag.attrs)
    if trained.known and given.known and trained != given:
        raise DataError(
            f"slide {slide_id}: features of {given.describe()}, but the head {model_dir} was trained on features of "
            f"{trained.describe()}; extract features from tiles cut alike"
        )
    return bag


def _read_bag(bag: FeatureStore) -> tuple[torch.Tensor, np.ndarray]:
    """The features of ``bag`` as float32 [N, D] and its coords, each read once; a
    :class:`DataError` naming the slide and file when a row holds NaN or inf
    (:func:`~wsitools.feature_store.check_finite`; also a float64 value beyond float32's range,
    which the head would see as inf), when the features or the coords fail their checksums
    (damaged since they were written) or when they do not fit in memory, so that the slide is
    skipped before its attention is written."""
    try:
        x, coords = read_features(bag.path), read_coords(bag.path)
    except StoreError as exc:
        raise DataError(f"slide {bag.slide_id}: {exc}") from None
    except MemoryError as exc:
        raise DataError(
            f"slide {bag.slide_id}: feature store {bag.path} does not fit in memory ({one_line(exc)})"
        ) from None
    check_finite(x.numpy(), slide_id=bag.slide_id, path=bag.path)
    return x, coords


def _joined(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """The rows of ``parts`` in order: a slide bag as read (no copy), a patient bag concatenated."""
    return parts[0] if len(parts) == 1 else torch.cat(list(parts))


def _bag_groups(
    wanted: Sequence[str], patients_table: str | os.PathLike[str] | None, *, bagging: str, model_dir: Any,
    skipped: dict[str, str], strict: bool,
) -> dict[str, list[str]]:
    """The bags to predict: each slide alone, or (``bagging`` ``patient``) the slides of each
    patient of ``patients_table``. A slide the table does not list is skipped with a warning
    (an error with ``strict``)."""
    if bagging != "patient":
        if patients_table is not None:
            raise DataError(f"--patients applies to heads trained with --bag patient; {model_dir} has one bag per slide")
        return {s: [s] for s in wanted}
    if patients_table is None:
        raise DataError(
            f"{model_dir}: the head pools each patient's slides into one bag (trained with --bag patient); "
            "give --patients TABLE (slide_id and patient_id columns, e.g. the labels table) to pool them the same way"
        )
    patients = read_patients(patients_table)
    unlisted = [s for s in wanted if s not in patients]
    if unlisted:
        message = f"slides not in the patients table {patients_table}: {', '.join(unlisted[:20])}"
        if strict:
            raise DataError(message)
        log.warning("skipping %d %s", len(unlisted), message)
        skipped.update({s: f"slide {s}: not in the patients table {patients_table}" for s in unlisted})
    return group_slides([s for s in wanted if s in patients], patients)


def _skipped_summary(skipped: dict[str, str], *, shown: int = 3) -> str:
    """The count of skipped slides and the reasons of the first ``shown`` (one line, bounded
    length whatever the cohort's size)."""
    reasons = list(skipped.values())
    more = f"; and {len(reasons) - shown} more" if len(reasons) > shown else ""
    return f"{len(reasons)} slides skipped: " + "; ".join(r[:300] for r in reasons[:shown]) + more


def predict(
    model_dir: str | os.PathLike[str],
    features_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    slides: Sequence[str] | None = None,
    patients: str | os.PathLike[str] | None = None,
    ivp_features_dir: str | os.PathLike[str] | None = None,
    device: str | torch.device = "auto",
    strict: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> list[BagPrediction] | list[PatientPrediction]:
    """Predict every slide in ``features_dir`` (or the named ``slides``) with the heads in
    ``model_dir``; write ``out_dir/predictions.csv``, ``out_dir/attention/{slide_id}.h5`` and
    ``out_dir/predict.json``. A slide whose bag is missing or unusable is skipped with a warning
    naming it (an error with ``strict``). ``device``: ``auto`` (CUDA when available), ``cpu`` or
    ``cuda`` (a :class:`ModelError` when there is no GPU). An existing ``out_dir`` is replaced
    only with ``overwrite``, and only when it is empty or an earlier prediction (it holds a
    ``predict.json``); anything else, a file included, is a :class:`DataError` naming it.

    Heads trained on patient bags pool the same way: ``patients`` (a table with ``slide_id`` and
    ``patient_id``) groups the slides, each patient's usable slides are concatenated into one
    bag, ``predictions.csv`` has one row per patient (``patient_id``, ``slides``) and each
    slide's attention file holds its slice of the patient's attention.

    Returns each bag's prediction (:class:`BagPrediction` or :class:`PatientPrediction`); the
    attention is in the files only. The folder is written under a temporary name and appears
    whole at the end: a run cut off (killed, or a failure with ``strict``) leaves no ``out_dir``
    and an earlier one as it was, and a new run starts over."""
    from tqdm import tqdm

    from wsitools.device import resolve_device

    dev = resolve_device(device)
    heads = load_heads(model_dir, device=dev)
    models = [h.model for h in heads]
    first = heads[0]
    classes = first.classes
    kind = first.task_type
    bagging = first.bag
    output = OUTPUT_NAMES.get(kind, "")
    scales = [head_scale(h) for h in heads] if kind != "classification" else None
    needs_ivp = first.config.ivp_in_dim is not None
    if needs_ivp and ivp_features_dir is None:
        raise DataError(f"{model_dir}: the head uses IVP features from a second encoder; give --ivp-features")
    stores = list_feature_stores(features_dir)
    wanted = list(dict.fromkeys(check_slide_id(s) for s in slides)) if slides else sorted(stores)  # each once
    if not wanted:
        raise DataError(f"no feature stores ({{slide_id}}.h5) in {features_dir}{features_root_hint(features_dir)}")
    out_dir = Path(out_dir)
    check_out_apart(out_dir, {"--model": model_dir, "--features": features_dir, "--patients": patients,
                              "--ivp-features": ivp_features_dir})
    if out_dir.exists() and not overwrite:
        raise DataError(f"output {out_dir} exists; use --overwrite to replace it")
    check_own_folder(
        out_dir, writes="predict --overwrite replaces its --out as a whole",
        foreign=lambda folder: not_an_output(
            folder, record=RECORD_FILE, fields={"package_version": str, "n_predicted": int, "task_type": str},
            own=("predictions.csv", "attention"), what="prediction", writer="predict",
        ),
    )
    skipped: dict[str, str] = {}
    groups = _bag_groups(wanted, patients, bagging=bagging, model_dir=model_dir, skipped=skipped, strict=strict)
    _check_some_encoder_matches(first, wanted, stores, model_dir=model_dir)
    unchecked = False
    results: list[Any] = []
    rows: list[dict[str, Any]] = []
    pooling = pooling_attrs([h.pooling for h in heads])
    if pooling["n_mean_pooled"]:
        log.info("%s: %d of its %d heads pool by the mean (uniform attention)", model_dir,
                 pooling["n_mean_pooled"], pooling["n_models"])
    meta = {"head": first.config.head, "task": (first.meta.get("task") or {}).get("name", ""),
            "task_type": kind, **pooling}
    with atomic_path(out_dir, overwrite=overwrite) as tmp:
        (tmp / "attention").mkdir(parents=True)
        for name, members in tqdm(groups.items(), desc="predict", unit=bagging, disable=not progress):
            bags, feats, ivps, coords = [], [], [], []
            for slide_id in members:
                try:
                    bag = _checked_bag(slide_id, stores, first, features_dir=features_dir, model_dir=model_dir)
                    if not check_encoder(first, bag, model_dir=model_dir) and not unchecked:
                        unchecked = True
                        log.warning(
                            "%s: the head records no encoder checksum; cannot check that %s holds features "
                            "of the encoder it was trained on", model_dir, features_dir,
                        )
                    part, tiles = _read_bag(bag)
                    ivp_bag = Path(ivp_features_dir) / f"{slide_id}.h5" if needs_ivp else None
                    ivp = _read_bag(FeatureStore.open_bag(ivp_bag, check_values=False))[0] if ivp_bag else None
                except (DataError, ModelError) as exc:  # ModelError: a stray store of another encoder
                    if strict:
                        raise
                    skipped[slide_id] = str(exc)
                    log.warning("skipping %s", exc)
                    continue
                bags.append(bag)
                feats.append(part)
                ivps.append(ivp)
                coords.append(tiles)
            if not bags:
                continue
            x, ivp = _joined(feats), (_joined(ivps) if needs_ivp else None)
            del feats, ivps  # a patient's parts, copied into x and ivp: not held twice through the forward pass
            probs, attention = predict_bag(models, x, ivp, scales=scales)
            outputs = classes or [output]
            if bagging == "patient":
                write_patient_attention(tmp / "attention", patient_id=name, bags=bags, coords=coords,
                                        attention=attention, classes=outputs, probs=probs, meta=meta)
                used = tuple(b.slide_id for b in bags)
                results.append(PatientPrediction(patient_id=name, slide_ids=used, probs=probs))
                row: dict[str, Any] = {"patient_id": name, "slides": ";".join(used), "n_tiles": len(x)}
            else:
                bag = bags[0]
                write_attention(
                    tmp / "attention" / f"{name}.h5",
                    slide_id=name,
                    attention=attention,
                    coords=coords[0],
                    classes=outputs,
                    probs=probs,
                    feature_path=bag.path,
                    provenance=bag.attrs,
                    meta=meta,
                )
                results.append(BagPrediction(slide_id=name, probs=probs))
                row = {"slide_id": name, "n_tiles": bag.n}
            rows.append({**row, "probs": probs} if classes else {**row, output: float(probs[0])})
        if not results:
            raise DataError(f"no slide could be predicted from {features_dir}: {_skipped_summary(skipped)}")
        write_predictions(tmp / "predictions.csv", rows, classes)
        write_json_atomic(
            tmp / RECORD_FILE,
            {
                "model_dir": str(Path(model_dir).resolve()),
                "features_dir": str(Path(features_dir).resolve()),
                **pooling,
                "task_type": kind,
                "bag": bagging,
                "classes": classes,
                "n_predicted": len(results),
                **({"patients": {r.patient_id: list(r.slide_ids) for r in results}} if bagging == "patient" else {}),
                "device": str(dev),
                "skipped": skipped,
                "package_version": __version__,
            },
        )
    return results
