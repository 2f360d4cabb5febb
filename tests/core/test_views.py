"""What the model is shown: letterbox, tiles, orientation, colour, transparency, frames."""

from __future__ import annotations

import io
import itertools
import re

import numpy as np
import pytest
from PIL import Image, ImageCms, ImageDraw

from moderator.config import ImageConfig
from moderator.core.views import (
    Preprocessing,
    decode_views,
    fit_to_square,
    frames_by_display_time,
    request_draft,
    view_boxes,
)
from moderator.demo.hostile import hidden_under_alpha
from moderator.errors import ImageErrorCode, InvalidImage
from tests.helpers import close_to, encode, pixel

PREP = Preprocessing(size=64, fill=(123, 117, 104))
LIMITS = ImageConfig()
RED, BLUE, WHITE, BLACK = (255, 0, 0), (0, 0, 255), (255, 255, 255), (0, 0, 0)


def gif(frames: list[Image.Image], durations: list[int] | int = 50) -> bytes:
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=durations)


def test_square_image_becomes_one_view_of_model_size() -> None:
    views = decode_views(encode(Image.new("RGB", (100, 100), RED)), LIMITS, PREP)
    assert views.shape == (1, 3, 64, 64)
    assert views.dtype == np.uint8
    assert views.flags.c_contiguous
    assert close_to(pixel(views, 0, 32, 32), RED)


def test_letterbox_keeps_the_whole_image_and_pads() -> None:
    image = Image.new("RGB", (200, 100), WHITE)
    image.paste(RED, (190, 0, 200, 100))  # a red strip at the far right edge
    square = fit_to_square(image, PREP)
    assert square.size == (64, 64)
    assert close_to(square.getpixel((63, 32)), RED, tolerance=40)  # type: ignore[arg-type]
    assert square.getpixel((32, 2)) == PREP.fill  # padding above, not a crop
    assert close_to(square.getpixel((32, 32)), WHITE)  # type: ignore[arg-type]


@pytest.mark.parametrize(("width", "height"), [(1000, 100), (100, 1000), (2050, 100), (501, 250)])
def test_tiles_cover_the_whole_length_of_an_extreme_image(width: int, height: int) -> None:
    boxes = view_boxes(width, height, LIMITS)
    assert boxes[0] == (0, 0, width, height)
    long_side, short_side = max(width, height), min(width, height)
    axis = 0 if width >= height else 1
    spans = [(box[axis], box[axis + 2]) for box in boxes[1:]]
    assert spans[0][0] == 0
    assert spans[-1][1] == long_side
    assert all(end - start <= short_side * LIMITS.tile_aspect_ratio for start, end in spans)
    assert all(later[0] <= earlier[1] for earlier, later in itertools.pairwise(spans))
    assert view_boxes(150, 100, LIMITS) == [(0, 0, 150, 100)]


def test_an_image_needing_more_tiles_than_allowed_is_too_complex() -> None:
    strip = encode(Image.new("RGB", (20000, 200), RED))
    with pytest.raises(InvalidImage, match="needs 50 tiles") as info:
        decode_views(strip, LIMITS, PREP)
    assert info.value.code is ImageErrorCode.TOO_COMPLEX
    assert decode_views(strip, ImageConfig(max_tiles=50, max_views=51), PREP).shape[0] == 51


def test_tiles_see_an_edge_detail_at_full_scale() -> None:
    image = Image.new("RGB", (1000, 100), WHITE)
    image.paste(RED, (930, 20, 990, 80))
    views = decode_views(encode(image), LIMITS, PREP)
    assert views.shape[0] == 1 + 5  # whole + 5 tiles of 200 x 100
    last_tile = views[-1]
    red_pixels = ((last_tile[0] > 200) & (last_tile[1] < 60)).sum()
    assert red_pixels > 200  # the detail fills a good part of the last tile


def test_exif_orientation_is_applied() -> None:
    image = Image.new("RGB", (200, 100), RED)
    image.paste(BLUE, (100, 0, 200, 100))  # stored: red left, blue right
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise
    views = decode_views(encode(image, "JPEG", exif=exif, quality=95), LIMITS, PREP)
    assert close_to(pixel(views, 0, 32, 8), RED, tolerance=30)  # left went to the top
    assert close_to(pixel(views, 0, 32, 56), BLUE, tolerance=30)
    assert pixel(views, 0, 2, 32) == PREP.fill  # now portrait: padded left and right


def test_colour_modes_become_correct_rgb() -> None:
    gray = Image.new("L", (32, 32), 200)
    assert close_to(pixel(decode_views(encode(gray), LIMITS, PREP), 0, 32, 32), (200, 200, 200))

    opaque = Image.new("LA", (32, 32), (0, 255))
    views = decode_views(encode(opaque), LIMITS, PREP)
    assert views.shape[0] == 1
    assert close_to(pixel(views, 0, 32, 32), BLACK)

    palette = Image.new("P", (32, 32), 1)
    palette.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    palette.info["transparency"] = 0  # index 0 is transparent but unused: opaque in fact
    views = decode_views(encode(palette), LIMITS, PREP)
    assert views.shape[0] == 1
    assert close_to(pixel(views, 0, 32, 32), BLUE)

    cmyk = Image.new("CMYK", (32, 32), (0, 255, 255, 0))  # pure red in CMYK
    assert close_to(pixel(decode_views(encode(cmyk, "JPEG"), LIMITS, PREP), 0, 32, 32), RED, 30)


def test_sixteen_bit_images_are_scaled_not_clipped() -> None:
    image = Image.fromarray(np.full((32, 32), 32768, dtype=np.uint16))  # mid-grey in 16 bits
    assert image.mode.startswith("I;16")
    views = decode_views(encode(image), LIMITS, PREP)
    assert close_to(pixel(views, 0, 32, 32), (128, 128, 128), tolerance=2)


def test_large_jpeg_is_decoded_at_reduced_scale() -> None:
    big = encode(Image.new("RGB", (4000, 3000), RED), "JPEG")
    image = Image.open(io.BytesIO(big))
    request_draft(image, LIMITS, size=224)
    assert image.size == (1000, 750)  # 1/8 would cover 224, not the PDQ hash's 512
    image = Image.open(io.BytesIO(encode(Image.new("RGB", (8000, 6000), RED), "JPEG")))
    request_draft(image, LIMITS, size=224)
    assert image.size == (1000, 750)  # 1/8 scale: still 512 on the long side
    image = Image.open(io.BytesIO(big))
    request_draft(image, LIMITS, size=1100)
    assert image.size == (2000, 1500)
    assert close_to(pixel(decode_views(big, LIMITS, PREP), 0, 32, 32), RED, tolerance=20)


# -- transparency ------------------------------------------------------------------------------


@pytest.mark.parametrize("transparent", [Image.new("RGBA", (32, 32), (255, 0, 0, 0)), None])
def test_transparent_pixels_are_shown_on_white_and_on_black(
    transparent: Image.Image | None,
) -> None:
    if transparent is None:  # an RGB PNG whose only colour is its transparent colour
        data = encode(Image.new("RGB", (32, 32), RED), transparency=RED)
    else:
        data = encode(transparent)
    views = decode_views(data, LIMITS, PREP)
    assert views.shape[0] == 2  # uniform colour under alpha 0 is empty space, not content
    assert close_to(pixel(views, 0, 32, 32), WHITE)
    assert close_to(pixel(views, 1, 32, 32), BLACK)


def test_a_dark_shape_on_transparency_is_seen_on_white() -> None:
    logo = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    ImageDraw.Draw(logo).ellipse((16, 16, 48, 48), fill=(10, 10, 10, 255))
    views = decode_views(encode(logo), LIMITS, PREP)
    on_white, on_black = pixel(views, 0, 4, 4), pixel(views, 1, 4, 4)
    assert close_to(on_white, WHITE)
    assert close_to(on_black, BLACK)
    assert close_to(pixel(views, 0, 32, 32), (10, 10, 10))


@pytest.mark.parametrize("alpha", [0, 1, 64, 127])
def test_content_hidden_under_alpha_is_also_scored_raw(alpha: int) -> None:
    content = Image.new("RGB", (64, 64), BLUE)
    ImageDraw.Draw(content).rectangle((20, 20, 44, 44), fill=RED)
    hidden = content.convert("RGBA")
    hidden.putalpha(alpha)
    data = hidden_under_alpha(content) if alpha == 0 else encode(hidden)
    views = decode_views(data, LIMITS, PREP)
    assert views.shape[0] == 3
    assert close_to(pixel(views, 0, 32, 32), WHITE, tolerance=alpha + 12)  # a browser
    assert close_to(pixel(views, 1, 32, 32), BLACK, tolerance=alpha + 12)  # a dark-mode app
    assert close_to(pixel(views, 2, 32, 32), RED)  # what a thumbnailer dropping alpha shows
    assert close_to(pixel(views, 2, 4, 4), BLUE)


# -- colour profiles -----------------------------------------------------------------------------


def test_an_embedded_icc_profile_is_applied() -> None:
    lab_red = ImageCms.createProfile("LAB")  # not RGB: ignored
    assert lab_red is not None
    wide = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))
    srgb_tagged = encode(Image.new("RGB", (32, 32), (200, 80, 40)), icc_profile=wide.tobytes())
    assert close_to(pixel(decode_views(srgb_tagged, LIMITS, PREP), 0, 32, 32), (200, 80, 40), 3)
    # A profile whose primaries differ from sRGB moves the colours: Pillow ships no such
    # profile, so swap the red and blue colorants of the sRGB one.
    swapped = _swap_red_and_blue_colorants(wide.tobytes())
    data = encode(Image.new("RGB", (32, 32), (200, 80, 40)), icc_profile=swapped)
    r, _, b = pixel(decode_views(data, LIMITS, PREP), 0, 32, 32)
    assert b > r  # the file's "red" channel meant blue


def _swap_red_and_blue_colorants(profile: bytes) -> bytes:
    count = int.from_bytes(profile[128:132], "big")
    tags = {}
    for i in range(count):
        entry = 132 + 12 * i
        tags[profile[entry : entry + 4]] = entry
    data = bytearray(profile)
    for a, b in ((b"rXYZ", b"bXYZ"), (b"rTRC", b"bTRC")):
        if a in tags and b in tags:
            ea, eb = tags[a], tags[b]
            data[ea + 4 : ea + 12], data[eb + 4 : eb + 12] = (
                profile[eb + 4 : eb + 12],
                profile[ea + 4 : ea + 12],
            )
    return bytes(data)


def test_a_broken_icc_profile_is_ignored() -> None:
    data = encode(Image.new("RGB", (32, 32), (200, 80, 40)), icc_profile=b"not a profile" * 20)
    assert close_to(pixel(decode_views(data, LIMITS, PREP), 0, 32, 32), (200, 80, 40), 3)


# -- frames --------------------------------------------------------------------------------------


def test_every_frame_of_a_short_animation_is_scored() -> None:
    frames = [Image.new("RGB", (40, 40), (0, 0, 100 + 10 * i)) for i in range(15)]
    frames[11] = Image.new("RGB", (40, 40), RED)
    views = decode_views(gif(frames), LIMITS, PREP)
    assert views.shape[0] == 15
    assert close_to(pixel(views, 11, 32, 32), RED, tolerance=20)


def test_a_long_animation_is_sampled_by_display_time_first_and_last_included() -> None:
    # 200 frames; frame 150 shows for 10 s of a 30 s animation, every other frame 0.1 s.
    frames = [Image.new("RGB", (24, 24), (0, 0, 100 + i % 100)) for i in range(200)]
    frames[150] = Image.new("RGB", (24, 24), RED)
    durations = [100] * 200
    durations[150] = 10_000
    views = decode_views(gif(frames, durations), LIMITS, PREP)
    assert views.shape[0] == LIMITS.max_frames
    reds = [close_to(pixel(views, v, 32, 32), RED, tolerance=20) for v in range(views.shape[0])]
    assert any(reds)


def test_frames_by_display_time() -> None:
    assert frames_by_display_time([100] * 5, 16) == [0, 1, 2, 3, 4]
    even = frames_by_display_time([100] * 200, 5)
    assert even == [0, 50, 100, 150, 199]
    # One frame on screen for most of the time is picked once; the rest fill by time shown.
    skewed = frames_by_display_time([10] * 50 + [100_000] + [10] * 49, 4)
    assert skewed == [0, 1, 50, 99]
    # Room for fewer than 3: the longest shown, after the first when there is room for it.
    assert frames_by_display_time([100, 10_000, 100], 2) == [0, 1]
    assert frames_by_display_time([100, 10_000, 100], 1) == [1]


def test_an_opaque_banner_animation_has_every_frame_scored_with_its_tiles() -> None:
    frames = [Image.new("RGB", (1000, 120), BLUE) for _ in range(3)]
    frames[1] = Image.new("RGB", (1000, 120), RED)
    views = decode_views(gif(frames, [100, 10_000, 100]), LIMITS, PREP)
    assert views.shape[0] == 3 * 6  # 3 frames x (whole + 5 tiles)
    assert any(close_to(pixel(views, v, 32, 32), RED, 20) for v in range(views.shape[0]))


def test_a_transparent_animation_gets_the_frames_that_fit_picked_by_display_time() -> None:
    frames = [Image.new("RGBA", (1000, 120), (0, 0, 250 + i, 128)) for i in range(5)]
    frames[2] = Image.new("RGBA", (1000, 120), (255, 0, 0, 128))
    durations = [100, 100, 10_000, 100, 100]
    data = encode(frames[0], "PNG", save_all=True, append_images=frames[1:], duration=durations)
    views = decode_views(data, LIMITS, PREP)  # 2 layers x 6 boxes a frame: 4 frames fit in 48
    assert views.shape[0] == 4 * 12
    on_black = [pixel(views, v, 32, 32) for v in range(views.shape[0])]
    assert any(close_to(colour, (128, 0, 0), 20) for colour in on_black)


def test_an_animated_webp_whose_frame_header_lies_has_every_frame_seen() -> None:
    colours = [WHITE, RED, BLUE]
    frames = [Image.new("RGB", (64, 64), colour) for colour in colours]
    data = bytearray(
        encode(frames[0], "WEBP", save_all=True, append_images=frames[1:], lossless=True)
    )
    anmf = [m.start() for m in re.finditer(b"ANMF", data)]
    data[anmf[1] + 8 + 9 : anmf[1] + 8 + 12] = (4999).to_bytes(3, "little")  # height, off canvas
    views = decode_views(bytes(data), LIMITS, PREP)
    assert [pixel(views, v, 32, 32) for v in range(3)] == colours


def test_views_per_image_are_bounded() -> None:
    frames = [Image.new("RGBA", (400, 40), (i * 10, 0, 0, 128)) for i in range(20)]
    data = encode(frames[0], "PNG", save_all=True, append_images=frames[1:])
    limits = ImageConfig(max_views=30)
    views = decode_views(data, limits, PREP)
    assert 1 <= views.shape[0] <= limits.max_views
    with pytest.raises(InvalidImage) as info:
        decode_views(data, ImageConfig(max_views=10), PREP)  # one frame needs 3 layers x 6 views
    assert info.value.code is ImageErrorCode.TOO_COMPLEX
