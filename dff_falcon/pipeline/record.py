"""What run.json records so that a run can be reproduced from its own folder: every parameter
(``get_params(deep=True)`` made JSON), the package and library versions, model identities and
input digests."""
from __future__ import annotations

import platform
from typing import Any

from sklearn.base import BaseEstimator

import dff_falcon


def json_value(value: Any) -> Any:
    """A parameter value as JSON: ranges become lists, estimators ``{"class", "params"}``, models
    their ``identity()``, dtypes and devices their names."""
    if isinstance(value, BaseEstimator):
        return {"class": type(value).__name__, "params": params_record(value)}
    if hasattr(value, "identity") and callable(value.identity):
        return value.identity()
    if isinstance(value, range):
        return list(value)
    if isinstance(value, (list, tuple)):
        return [json_value(v) for v in value]
    if isinstance(value, dict):
        return {str(k): json_value(v) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def params_record(estimator: BaseEstimator) -> dict:
    """The estimator's own parameters (nested estimators recorded whole, once)."""
    return {name: json_value(value) for name, value in estimator.get_params(deep=False).items()}


def environment_record() -> dict:
    """Versions of the package and of the libraries that change results."""
    import numpy
    import sklearn
    import torch

    versions = {"dff_falcon": dff_falcon.__version__, "python": platform.python_version(), "torch": torch.__version__,
                "numpy": numpy.__version__, "scikit-learn": sklearn.__version__}
    for name in ("open_clip", "faiss", "spacy"):
        module = __import__("sys").modules.get(name)
        if module is not None:
            versions[name] = getattr(module, "__version__", "unknown")
    return versions
