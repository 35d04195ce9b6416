"""The shard builder (``realisid build-shards``): a folder of photos or existing webdataset / img2dataset tars to
RealisID face shards.

``build_shards`` keeps single-person photos (one face that is large, confident and not cut by the border;
other faces much smaller) and writes them in the shard format of realisid/data/shards.py through
:class:`~realisid.data.shard_writer.FaceShardWriter`, with the identity embedding when the analyzer has one
(``id.npy``) and a reference face (``ref.jpg``) cut from ANOTHER photo of the same identity, with that face's
embedding (``ref_id.npy``: the analyzer's, on the donor photo, aligned with the donor face's detected key
points) and its 5 key points in ``ref.jpg`` pixels (meta ``ref_kps``). Training conditions on the reference.

It runs in two passes over the source, analysis then writing; both resume after an interruption (rerun the
same command). One concept per module:

- :mod:`.sources`: folder and tar sources as candidate photos (:class:`SourceItem`), caption sidecars.
- :mod:`.selection`: which face of a photo is kept (:func:`select_face`), downscaling, sample keys.
- :mod:`.workers`: the per-image work (decode, analyse, load, cut references) and the process pool.
- :mod:`.journal`: the analysis cache ``OUT/NAME.analysis.jsonl`` and the journal ``OUT/NAME.progress.json``.
- :mod:`.driver`: :func:`build_shards` and its two passes, :func:`format_summary`.

The command line (``add_build_parser``, ``cmd_build_shards``) is in realisid/cli/build.py.

Reasons a photo is not kept (the manifest's ``rejected``; one reason per photo):
``corrupt_image``, ``huge_image`` (more than ``max_pixels``; never decoded), ``unreadable_file``,
``no_face``, ``low_score``, ``face_too_small``, ``several_faces``, ``face_cut_by_border``,
``analysis_error`` (the analyzer raised), and for tar sources ``missing_image``, ``corrupt_tar_member``
(a damaged member, skipped; a sample that lost its image that way counts once, as this) and
``duplicate_key``; ``source_changed`` when a photo differs between analysis and writing. An unreadable
caption sidecar does not reject the photo: it is kept with an empty caption and counted under the
manifest's ``warnings`` as ``bad_sidecar``. ``min_face`` is measured in the analysed (downscaled) image.
"""
from realisid.data.build.driver import build_shards, format_summary
from realisid.data.build.journal import ANALYSIS_VERSION, AnalysisCache, JOURNAL_VERSION, Journal, Record
from realisid.data.build.selection import BORDER_TOLERANCE, border_overflow, downscale, face_long_side, sample_key, select_face
from realisid.data.build.sources import (IMAGE_EXTS, TAR_IMAGE_EXTS, SourceItem, folder_items, read_sidecar, resolve_source,
                                         tar_items)
from realisid.data.build.workers import Runner, Settings, Worker

__all__ = [
    "ANALYSIS_VERSION", "BORDER_TOLERANCE", "IMAGE_EXTS", "JOURNAL_VERSION", "TAR_IMAGE_EXTS", "AnalysisCache", "Journal",
    "Record", "Runner", "Settings", "SourceItem", "Worker", "border_overflow", "build_shards", "downscale", "face_long_side",
    "folder_items", "format_summary", "read_sidecar", "resolve_source", "sample_key", "select_face", "tar_items",
]
