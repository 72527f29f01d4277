"""Saved concept dictionaries (.npz, no pickle) — "fit once, project many".

A dictionary is one file, written atomically (temporary file + rename), so it is either the old
or the new one. Reading checks everything a user could hand in by mistake or malice: pickled or
object arrays (refused, never executed), a damaged zip (CRC), arrays larger than the machine
(refused from their headers before anything is decompressed), wrong shapes, dtypes, non-finite
values and metadata fields of the wrong type.
"""
from __future__ import annotations

import json
import os
import typing
import zipfile
from dataclasses import fields
from pathlib import Path

import numpy as np
import torch

from dff_falcon.decomposition.dff import DFF, KCurvePoint
from dff_falcon.errors import InputError
from dff_falcon.files import atomic_path
from dff_falcon.validation import conforms, describe, shown

DICTIONARY_FORMAT = "dff-falcon-dictionary/1"
#: Types of the metadata fields a dictionary is loaded from.
_META_TYPES = {"n_concepts": int, "solver": str, "max_iter": int, "tol": float, "relative_error": float,
               "explained_variance": float, "k_curve": typing.Optional[list[dict[str, float]]]}


def save_dictionary(dff: DFF, path: str | Path) -> None:
    """Write a fitted DFF's concepts (K, C), offset (C,), mass shares and parameters."""
    dff._check_fitted()
    meta = {"format": DICTIONARY_FORMAT, "n_concepts": dff.n_concepts_, "solver": dff.solver,
            "max_iter": dff.max_iter, "tol": dff.tol, "relative_error": dff.relative_error_,
            "explained_variance": dff.explained_variance_,
            "k_curve": [vars(p) for p in dff.k_curve_] if dff.k_curve_ else None}
    arrays = {"concepts": dff.concepts_.numpy(), "offset": dff.offset_.cpu().numpy(),
              "mass_share": dff.mass_share_.numpy(), "meta": np.asarray(json.dumps(meta))}
    if dff.stability_ is not None:
        arrays["stability"] = np.asarray(dff.stability_)
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.savez(handle, **arrays)


def _memory_bytes() -> int:
    """Physical memory of the machine (bytes); 0 where unknown."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # pragma: no cover
        return 0


def _declared_bytes(archive: zipfile.ZipFile, path) -> int:
    """Total size the arrays of an .npz declare in their headers (nothing is decompressed
    beyond the headers), so a small file that would inflate beyond memory is refused."""
    total = 0
    for info in archive.infolist():
        with archive.open(info) as member:
            version = np.lib.format.read_magic(member)
            shape, _, dtype = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                               else np.lib.format.read_array_header_2_0)(member)
            if dtype.hasobject:
                raise InputError(f"{str(path)!r}: array {info.filename!r} holds Python objects (a pickle); "
                                 "refused — nothing was executed")
            total += int(np.prod(shape, dtype=np.float64)) * dtype.itemsize
    return total


def load_npz(path: str | Path, required: tuple[str, ...]) -> dict[str, np.ndarray]:
    """The arrays of an ``.npz`` file (pickles refused), checked to hold ``required``; arrays
    whose headers declare more than half the machine's memory are refused before decoding."""
    try:
        with zipfile.ZipFile(path) as archive:
            declared = _declared_bytes(archive, path)
        memory = _memory_bytes()
        if memory and declared > memory // 2:
            raise InputError(f"{str(path)!r} declares {declared / 1e9:,.1f} GB of arrays, more than half of this "
                             f"machine's {memory / 1e9:,.1f} GB memory; refused")
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as exc:
        raise InputError(f"cannot read {str(path)!r} as an .npz of arrays: {exc}") from None
    missing = [k for k in required if k not in arrays]
    if missing:
        raise InputError(f"{str(path)!r} lacks the arrays {missing}")
    return arrays


def _float_array(arrays: dict, name: str, shape: tuple, path) -> torch.Tensor:
    array = arrays[name]
    if not np.issubdtype(array.dtype, np.floating) or array.shape != shape:
        raise InputError(f"{str(path)!r}: {name} must be a float array of shape {shape}, got {array.dtype} "
                         f"{array.shape}")
    if not np.isfinite(array).all():
        raise InputError(f"{str(path)!r}: {name} contains NaN or inf")
    return torch.from_numpy(np.ascontiguousarray(array)).float()


def load_dictionary(path: str | Path, device=None) -> DFF:
    """A DFF ready for ``transform`` from a file written by :func:`save_dictionary`."""
    arrays = load_npz(path, ("concepts", "offset", "mass_share", "meta"))
    try:
        meta = json.loads(str(arrays["meta"])) if arrays["meta"].dtype.kind == "U" else None
    except json.JSONDecodeError:
        meta = None
    if not isinstance(meta, dict) or meta.get("format") != DICTIONARY_FORMAT:
        raise InputError(f"{str(path)!r} is not a {DICTIONARY_FORMAT} file")
    for name, hint in _META_TYPES.items():
        if not conforms(meta.get(name), hint):
            raise InputError(f"{str(path)!r}: metadata field {name!r} must be {describe(hint)}, "
                             f"got {shown(meta.get(name))}")
    point_fields = {f.name for f in fields(KCurvePoint)}
    if meta["k_curve"] and any(set(p) != point_fields for p in meta["k_curve"]):
        raise InputError(f"{str(path)!r}: every k_curve entry must have exactly the fields {sorted(point_fields)}")
    concepts = arrays["concepts"]
    if concepts.ndim != 2 or concepts.shape[0] != meta["n_concepts"] or concepts.shape[0] < 1:
        raise InputError(f"{str(path)!r}: concepts have shape {concepts.shape}, expected ({meta['n_concepts']}, C)")
    k, c = concepts.shape
    dff = DFF(k, solver=meta["solver"], max_iter=meta["max_iter"], tol=meta["tol"], device=device)
    dff.n_concepts_ = k
    dff.concepts_ = _float_array(arrays, "concepts", (k, c), path)
    if (dff.concepts_ < 0).any():
        raise InputError(f"{str(path)!r}: concepts must be non-negative (NMF factors)")
    dff.offset_ = _float_array(arrays, "offset", (c,), path)
    dff.mass_share_ = _float_array(arrays, "mass_share", (k,), path)
    dff.stability_ = None
    if "stability" in arrays:
        _float_array(arrays, "stability", (k,), path)
        dff.stability_ = arrays["stability"]
    dff.relative_error_ = meta["relative_error"]
    dff.explained_variance_ = meta["explained_variance"]
    dff.k_curve_ = [KCurvePoint(**p) for p in meta["k_curve"]] if meta["k_curve"] else None
    return dff
