"""One way to get a ready predictor: a frozen backbone, its predictor, and the library's
tasks made for that backbone. The CLI, the plugin's session, the learning process and the
continual benchmark all build theirs here.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple, Union

from .backbones import DEFAULT_BACKBONE, build_backbone
from .config import PathLike, cache_dir as default_cache_dir
from .library import TaskLibrary
from .predictor import CASamPredictor
from .runtimes import models_folder

NO_CACHE = False  # pass as ``cache_dir`` for a predictor without an on-disk embedding cache


def build_predictor(backbone: str = DEFAULT_BACKBONE, checkpoint: Optional[PathLike] = None,
                    device: Optional[str] = "auto", *, cache_dir: Union[PathLike, None, bool] = None,
                    library: Union[TaskLibrary, PathLike, None, bool] = None, runtime: Optional[str] = None,
                    **predictor_options) -> Tuple[CASamPredictor, Dict[str, str]]:
    """(predictor, {task not loaded: why}).

    ``cache_dir``: the on-disk embedding cache (None: ``config.cache_dir()``, shared by the
    CLI and the viewer; ``NO_CACHE``: none). ``library``: a ``TaskLibrary`` or its folder
    whose tasks for this backbone are registered (OpenVINO's converted graphs are kept beside
    the cache: ``<cache_dir>/encoders``, or the default cache's with ``NO_CACHE``) (None: no tasks; True: the default library).
    ``runtime``: where the image encoder and mask decoder run (casam_core.runtimes; default ``$CASAM_RUNTIME``
    or "auto").
    """
    if cache_dir is None or cache_dir is True:
        cache_dir = default_cache_dir()
    models = models_folder(cache_dir or None)  # converted graphs beside the embeddings: one cache setting
    predictor = CASamPredictor(build_backbone(backbone, checkpoint, device, runtime=runtime, models_dir=models),
                               disk_cache=cache_dir or None, **predictor_options)
    if library is None or library is False:
        return predictor, {}
    if not isinstance(library, TaskLibrary):
        library = TaskLibrary(None if library is True else library)
    return predictor, predictor.load_tasks(library)
