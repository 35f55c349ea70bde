"""``dit extract``: T5 features and VAE latents of a data set written as feature shards, resumable (:mod:`.command`
is the command and says what it writes; :mod:`.extraction` the work; :mod:`.sources` the data sets it reads,
:mod:`.checks` whether the pipeline can represent them, :mod:`.progress` what survives a crash,
:mod:`.feature_writer` the shards, :mod:`.control_images` ControlNet's control images).

``extract``, ``load_encoders``, ``FeatureWriter`` and ``ControlFeatureWriter`` are imported on first use (``import
dit.train.extract`` imports no torch).
"""

from dit.lazy import lazy_exports

#: Public name -> the module defining it (imported on first use).
_EXPORTS = {
    "extract": "dit.train.extract.extraction",
    "load_encoders": "dit.train.extract.extraction",
    "FeatureWriter": "dit.train.extract.feature_writer",
    "ControlFeatureWriter": "dit.train.extract.feature_writer",
}
__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(globals(), _EXPORTS)
