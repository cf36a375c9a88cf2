"""Distillation methods as plug-ins: ``--method NAME`` picks a registered class (see :mod:`.base`).

Registered here: :class:`DMD2` (``dmd2``), :class:`FDistill` (``fdistill``), :class:`SiD` (``sid``, with SiD-LSG's
guidance flags), :class:`SIM` (``sim``) and
:class:`TDM` (``tdm``, few-step students). A new method is one file in this folder
(or in user code) with a :class:`DistillationMethod` subclass decorated with :func:`register_method`.
"""

from .base import (
    METHODS,
    DistillationMethod,
    GeneratorTerms,
    build_method,
    get_method_class,
    method_for,
    method_names,
    register_method,
    resolve_method_config,
)
from .dmd2 import DMD2
from .fdistill import FDistill
from .sid import SIM, SiD
from .tdm import TDM


__all__ = [
    "DMD2",
    "METHODS",
    "DistillationMethod",
    "FDistill",
    "GeneratorTerms",
    "SIM",
    "SiD",
    "TDM",
    "build_method",
    "get_method_class",
    "method_for",
    "method_names",
    "register_method",
    "resolve_method_config",
]
