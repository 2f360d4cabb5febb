"""ICC profile transforms: bounded in size, cached by digest."""

from __future__ import annotations

from PIL import ImageCms

from moderator.core import colour
from moderator.core.colour import MAX_ICC_BYTES, srgb_transform


def test_icc_profiles_are_bounded_in_size_and_cached_by_digest() -> None:
    assert srgb_transform(ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes())
    assert srgb_transform(b"\0" * (MAX_ICC_BYTES + 1)) is None
    assert srgb_transform(ImageCms.ImageCmsProfile(ImageCms.createProfile("LAB")).tobytes()) is None
    for i in range(100):
        assert srgb_transform(b"junk profile %d" % i) is None
    assert len(colour._TRANSFORMS) <= 16
    assert all(len(key) == 32 for key in colour._TRANSFORMS)  # digests, not the profiles
