"""Studies: the papers' comparison (random init, published weights, first stage, P1X, P2X per method) on the
user's data from one YAML file, run stage by stage, resumable after a kill (``medssl study CONFIG.yaml``).

Stable API:

- ``load_study_config(path, *, out=None) -> StudyConfig`` (:mod:`medssl.study.config`): read and validate.
- ``study_config_from_dict(raw, path, *, out=None) -> StudyConfig``: the same from a dict.
- ``build_plan(config) -> list[Stage]`` (:mod:`medssl.study.plan`): stages in dependency order with hashes.
- ``run_study(config, *, progress=True) -> Path`` (:mod:`medssl.study.runner`): run, return OUT/report.md.
"""

from medssl.study.config import StudyConfig, load_study_config, study_config_from_dict
from medssl.study.plan import Stage, build_plan
from medssl.study.runner import run_study

__all__ = ["Stage", "StudyConfig", "build_plan", "load_study_config", "run_study", "study_config_from_dict"]
