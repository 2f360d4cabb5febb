"""Colour profiles: an embedded RGB ICC profile's transform to sRGB, cached and bounded.

Part of the views pipeline (core/views.py); like it, no torch (it runs in decode workers).
"""

from __future__ import annotations

import collections
import hashlib
import io

from PIL import ImageCms

_SRGB = ImageCms.createProfile("sRGB")
# Display profiles are a few KB (Display P3: 0.5 KB, Adobe RGB: 0.5 KB, camera ones up to a few
# hundred); a bigger one is ignored rather than parsed and cached.
MAX_ICC_BYTES = 1024 * 1024
_CACHED_TRANSFORMS = 16
_TRANSFORMS: collections.OrderedDict[bytes, ImageCms.ImageCmsTransform | None] = (
    collections.OrderedDict()
)


def srgb_transform(icc_profile: bytes | None) -> ImageCms.ImageCmsTransform | None:
    """The RGB -> sRGB transform of an embedded ICC profile; None without one, for a profile of
    another colour space, one over MAX_ICC_BYTES, or one littleCMS cannot read (viewers then
    show the raw values too). Transforms are cached by the profile's digest, never its bytes."""
    if not icc_profile or len(icc_profile) > MAX_ICC_BYTES:
        return None
    digest = hashlib.sha256(icc_profile).digest()
    if digest in _TRANSFORMS:
        _TRANSFORMS.move_to_end(digest)
        return _TRANSFORMS[digest]
    transform = _build_transform(icc_profile)
    _TRANSFORMS[digest] = transform
    if len(_TRANSFORMS) > _CACHED_TRANSFORMS:
        _TRANSFORMS.popitem(last=False)
    return transform


def _build_transform(icc_profile: bytes) -> ImageCms.ImageCmsTransform | None:
    try:
        profile = ImageCms.ImageCmsProfile(io.BytesIO(icc_profile))
        if profile.profile.xcolor_space.strip() != "RGB":
            return None
        return ImageCms.buildTransform(profile, _SRGB, "RGB", "RGB")
    except (ImageCms.PyCMSError, OSError, ValueError, TypeError):
        return None
