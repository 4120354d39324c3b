"""Work-arounds that let monailabel 0.8.5 start with monai 1.6.1, pydicom 3 and a CPU-only torch.

Each fix is applied only when its failure is actually there, so on an environment that does not need it
(pydicom 2, a torchvision build that matches torch) nothing changes. ``apply_compat()`` must run before the first
``import monailabel.app`` / ``monailabel.interfaces.app``: our ASGI entry (:mod:`drasclr_ext.monailabel.server`) and
our app module (:mod:`drasclr_ext.monailabel.application`, which the training subprocess imports first) do it.
docs/MONAILABEL.md lists every incompatibility with its exact error.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import sys
from collections.abc import MutableMapping
from typing import Any

from drasclr_ext.monailabel.errors import INSTALL_HINT, LabelAppSetupError

__all__ = [
    "TESTED_MONAILABEL",
    "alias_pydicom_storage_uids",
    "apply_compat",
    "make_torchvision_importable",
    "move_string_image_keys",
    "require_monailabel",
]

logger = logging.getLogger(__name__)
TESTED_MONAILABEL = "0.8.5"
# torchvision's _meta_registrations.py registers fake kernels for these ops without checking that its C++
# extension loaded; their schemas (torchvision/csrc/ops/nms.cpp).
_TORCHVISION_OP_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
_torchvision_library: Any = None  # keeps the op definitions alive
_applied: list[str] = []


def require_monailabel() -> str:
    """monailabel's version; ``LabelAppSetupError`` with the install command when it is not installed."""
    if importlib.util.find_spec("monailabel") is None:
        raise LabelAppSetupError(f"monailabel is not installed. Install it with: {INSTALL_HINT}")
    from importlib.metadata import PackageNotFoundError, version

    try:
        found = version("monailabel")
    except PackageNotFoundError:  # a source checkout on sys.path
        found = "unknown"
    if found != TESTED_MONAILABEL:
        logger.warning(f"monailabel {found} found; this app is tested with {TESTED_MONAILABEL}")
    return found


def alias_pydicom_storage_uids() -> bool:
    """pydicom-seg 0.4.1 imports ``pydicom._storage_sopclass_uids``, which pydicom 3 removed (the UIDs are in
    ``pydicom.uid``); monailabel imports pydicom-seg at start-up. Alias the old module name to ``pydicom.uid``.

    Returns True when the alias was needed.
    """
    name = "pydicom._storage_sopclass_uids"
    if name in sys.modules or importlib.util.find_spec("pydicom") is None:
        return False
    try:
        importlib.import_module(name)
        return False
    except ModuleNotFoundError:
        pass
    uid = importlib.import_module("pydicom.uid")
    if not hasattr(uid, "SegmentationStorage"):
        raise LabelAppSetupError(
            f"pydicom {getattr(sys.modules.get('pydicom'), '__version__', '?')} has neither {name} nor "
            "pydicom.uid.SegmentationStorage: install pydicom 2.4 or 3.x"
        )
    sys.modules[name] = uid
    return True


def _drop_modules(prefix: str) -> None:
    for name in [m for m in sys.modules if m == prefix or m.startswith(prefix + ".")]:
        del sys.modules[name]


def make_torchvision_importable() -> bool:
    """Make ``import torchvision`` work when its C++ extension cannot load.

    The registries reachable here only have the CUDA build of torchvision 0.28.0 (the release for torch 2.13); its
    ``_C.so`` needs ``libtorch_cuda.so``, which the CPU torch lacks, and ``import torchvision`` then fails with
    ``RuntimeError: operator torchvision::nms does not exist``. We define the two op schemas that torchvision
    registers fake kernels for, and import again: torchvision's Python code (``torchvision.utils``, which
    monailabel imports) works, and its C++ ops (nms, roi_align, image decoding) raise torchvision's own
    "Couldn't load custom C++ ops" error when called. Our app calls none of them.

    Returns True when the schemas were needed.
    """
    global _torchvision_library
    if importlib.util.find_spec("torchvision") is None:
        return False
    try:
        importlib.import_module("torchvision")
        return False
    except RuntimeError as exc:
        if "torchvision::" not in str(exc):
            raise
        logger.info(f"torchvision's C++ extension does not load with this torch ({exc}); defining its op schemas")
    _drop_modules("torchvision")
    import torch

    if _torchvision_library is None:
        _torchvision_library = torch.library.Library("torchvision", "DEF")
        for schema in _TORCHVISION_OP_SCHEMAS:
            _torchvision_library.define(schema)
    importlib.import_module("torchvision")
    return True


def apply_compat() -> list[str]:
    """Apply every needed work-around once (idempotent); the names of those applied in this process."""
    require_monailabel()
    if not _applied:
        _applied.append("checked")
        if alias_pydicom_storage_uids():
            _applied.append("pydicom._storage_sopclass_uids -> pydicom.uid")
        if make_torchvision_importable():
            _applied.append("torchvision op schemas")
        logger.info(f"MONAI Label compatibility fixes: {_applied[1:] or 'none needed'}")
    return _applied[1:]


def move_string_image_keys(data: MutableMapping[str, Any], key: str = "image", new_prefix: str = "input") -> None:
    """Rename ``<key>_*`` entries that are strings (MONAI Label's ``image_path``) to ``<new_prefix>_*``.

    MONAI 1.6's ``Spacingd`` calls ``.update()`` on every ``<key>_*`` entry of the data dict when the image is a
    NIfTI file, taking them for meta dicts; on MONAI Label's ``image_path`` string that raises
    ``AttributeError: 'str' object has no attribute 'update'``.
    """
    for name in [k for k in data if isinstance(k, str) and k.startswith(f"{key}_") and isinstance(data[k], str)]:
        data[f"{new_prefix}_{name[len(key) + 1 :]}"] = data.pop(name)
