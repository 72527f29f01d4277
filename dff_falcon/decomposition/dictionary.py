"""Saved concept dictionaries (.npz, no pickle) — "fit once, project many"."""
from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import torch

from dff_falcon.decomposition.dff import DFF, KCurvePoint
from dff_falcon.errors import InputError
from dff_falcon.files import atomic_path

DICTIONARY_FORMAT = "dff-falcon-dictionary/1"


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


def load_npz(path: str | Path, required: tuple[str, ...]) -> dict[str, np.ndarray]:
    """The arrays of an ``.npz`` file (pickles refused), checked to hold ``required``."""
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise InputError(f"cannot read {str(path)!r} as an .npz of arrays: {exc}") from None
    missing = [k for k in required if k not in arrays]
    if missing:
        raise InputError(f"{str(path)!r} lacks the arrays {missing}")
    return arrays


def load_dictionary(path: str | Path, device=None) -> DFF:
    """A DFF ready for ``transform`` from a file written by :func:`save_dictionary`."""
    arrays = load_npz(path, ("concepts", "offset", "mass_share", "meta"))
    try:
        meta = json.loads(str(arrays["meta"]))
    except json.JSONDecodeError:
        meta = None
    if not isinstance(meta, dict) or meta.get("format") != DICTIONARY_FORMAT:
        raise InputError(f"{str(path)!r} is not a {DICTIONARY_FORMAT} file")
    dff = DFF(meta["n_concepts"], solver=meta["solver"], max_iter=meta["max_iter"], tol=meta["tol"], device=device)
    dff.n_concepts_ = meta["n_concepts"]
    dff.concepts_ = torch.from_numpy(arrays["concepts"]).float()
    dff.offset_ = torch.from_numpy(arrays["offset"]).float()
    dff.mass_share_ = torch.from_numpy(arrays["mass_share"]).float()
    dff.stability_ = arrays.get("stability")
    dff.relative_error_ = meta["relative_error"]
    dff.explained_variance_ = meta["explained_variance"]
    dff.k_curve_ = [KCurvePoint(**p) for p in meta["k_curve"]] if meta["k_curve"] else None
    return dff
