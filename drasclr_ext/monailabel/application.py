"""The MONAI Label app (``MyApp``) of the dense emphysema subtype bundle.

The app folder's ``main.py`` (written by ``python -m drasclr_ext.monailabel app --out DIR``) only imports
:class:`MyApp` from here. Importing this module applies our compatibility fixes before monailabel is imported,
which is what makes MONAI Label's training subprocess start (it imports ``main.py`` before anything of monailabel
that needs pydicom-seg).
"""

from __future__ import annotations

from drasclr_ext.monailabel.compat import apply_compat

apply_compat()

import logging  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Dict, Mapping  # noqa: E402

from monailabel.interfaces.app import MONAILabelApp  # noqa: E402
from monailabel.interfaces.tasks.infer_v2 import InferTask  # noqa: E402
from monailabel.interfaces.tasks.train import TrainTask  # noqa: E402

from drasclr_ext.monailabel.bundle import BUNDLE_NAME, SubtypeBundle, default_bundle_path  # noqa: E402
from drasclr_ext.monailabel.errors import LabelAppSetupError  # noqa: E402
from drasclr_ext.monailabel.infer import LABELS, SubtypeInferTask  # noqa: E402
from drasclr_ext.monailabel.train import SubtypeTrainTask  # noqa: E402

__all__ = ["MODEL_NAME", "MyApp", "resolve_bundle"]

logger = logging.getLogger(__name__)
MODEL_NAME = BUNDLE_NAME  # the model's name in /info/, /infer/<model> and /train/<model>


def resolve_bundle(conf: Mapping[str, Any]) -> SubtypeBundle:
    """The bundle of ``--conf bundle_path DIR``, else the source checkout's ``bundles/drasclr_emphysema_subtype``."""
    path = conf.get("bundle_path") or default_bundle_path()
    if not path:
        raise LabelAppSetupError(
            f"no bundle: start the server with --conf bundle_path <folder of {BUNDLE_NAME}> (a local copy of the "
            "bundle; this app never downloads from the model zoo)"
        )
    return SubtypeBundle(path)


class MyApp(MONAILabelApp):
    """One model, :data:`MODEL_NAME`: infer (subtype label map + report) and, when the bundle has a
    ``configs/train.json``, train (fine-tuning from the datastore's final labels).

    Conf (``--conf key value``): ``bundle_path``, the bundle folder (its ``models/model.pt`` is rewritten by
    training: use a copy you may change).
    """

    def __init__(self, app_dir: str, studies: str, conf: Dict[str, str]) -> None:
        self.bundle = resolve_bundle(conf or {})
        logger.info(f"{MODEL_NAME}: bundle {self.bundle.root}")
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="DrasCLR emphysema subtypes",
            description="Dense emphysema subtype maps (normal, centrilobular, paraseptal, panlobular) from chest CT",
            version=self.bundle.version(),
            labels=LABELS,
        )

    def init_infers(self) -> Dict[str, InferTask]:
        return {MODEL_NAME: SubtypeInferTask(self.bundle)}

    def init_trainers(self) -> Dict[str, TrainTask]:
        if not self.bundle.has_train_config:
            logger.warning(f"{self.bundle.train_config} does not exist: no train task")
            return {}
        return {MODEL_NAME: SubtypeTrainTask(self.bundle, Path(self.app_dir) / "train")}
