"""Regenerate the example inputs the shipped workflows load (the PNG files beside this script).

    pip install scikit-image matplotlib opencv-python-headless pillow numpy
    python workflows/examples/make_examples.py

Every picture comes from a public-domain or CC0 photograph that ships inside a registry
package, changed only by the documented steps below (crops, resizing, OpenCV's classical
stylisation filter, a pose skeleton drawn from coordinates measured by hand on the photo).
The README lists each file with its source and licence.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

HERE = Path(__file__).resolve().parent
SIDE = 512  # SD1.5's native size; the workflows rescale where they need another

# OpenPose's 18 COCO key points of the astronaut photo (skimage.data.astronaut(), 512×512), measured
# by hand on the picture; None where the body is outside it or hidden. Order: nose, neck,
# right shoulder/elbow/wrist, left shoulder/elbow/wrist, right hip/knee/ankle, left hip/knee/ankle,
# right eye, left eye, right ear, left ear (the person's right is the picture's left).
ASTRONAUT_POSE = [(225, 127), (222, 215), (95, 255), (45, 400), (150, 480), (335, 265), (360, 400), (330, 455),
                  None, None, None, None, None, None, (203, 101), (246, 104), (160, 115), (290, 115)]
# OpenPose's limbs (pairs of key points) and its colour for each key point, as its renderer draws them.
LIMBS = [(1, 2), (1, 5), (2, 3), (3, 4), (5, 6), (6, 7), (1, 8), (8, 9), (9, 10), (1, 11), (11, 12), (12, 13),
         (1, 0), (0, 14), (14, 16), (0, 15), (15, 17)]
COLOURS = [(255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0), (0, 255, 0),
           (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255), (0, 0, 255), (85, 0, 255),
           (170, 0, 255), (255, 0, 255), (255, 0, 170), (255, 0, 85)]


def astronaut() -> Image.Image:
    """Eileen Collins, NASA (public domain), as scikit-image ships it."""
    import skimage.data

    return Image.fromarray(skimage.data.astronaut())


def grace_hopper() -> Image.Image:
    """Grace Hopper, US Navy (public domain), as matplotlib ships it; the top square of the 512×600 photo."""
    spec = importlib.util.find_spec("matplotlib")
    if spec is None:
        raise SystemExit("matplotlib is needed for its sample photo: pip install matplotlib")
    path = Path(spec.submodule_search_locations[0]) / "mpl-data" / "sample_data" / "grace_hopper.jpg"
    with Image.open(path) as photo:
        width, height = photo.size
        return photo.convert("RGB").crop((0, 0, width, width)).resize((SIDE, SIDE), Image.LANCZOS)


def second_view(photo: Image.Image) -> Image.Image:
    """Another reference of the same person: mirrored and closer (a 400-pixel square around the face)."""
    return photo.transpose(Image.FLIP_LEFT_RIGHT).crop((56, 0, 456, 400)).resize((SIDE, SIDE), Image.LANCZOS)


def style_reference() -> Image.Image:
    """A painted-looking style image: scikit-image's coffee photo (CC0, Rachel Michetti) through
    OpenCV's edge-preserving stylisation filter (cv2.stylization), centre square."""
    import cv2
    import skimage.data

    photo = skimage.data.coffee()  # 400×600
    height, width = photo.shape[:2]
    left = (width - height) // 2
    square = np.ascontiguousarray(photo[:, left:left + height, ::-1])  # RGB → BGR for OpenCV
    painted = cv2.stylization(square, sigma_s=60, sigma_r=0.45)[..., ::-1]
    return Image.fromarray(np.ascontiguousarray(painted)).resize((SIDE, SIDE), Image.LANCZOS)


def pose_image(points, side: int = SIDE) -> Image.Image:
    """An OpenPose skeleton on black, as ControlNet's openpose preprocessor draws one."""
    image = Image.new("RGB", (side, side))
    draw = ImageDraw.Draw(image)
    for (a, b), colour in zip(LIMBS, COLOURS):
        if points[a] is not None and points[b] is not None:
            draw.line([points[a], points[b]], fill=tuple(int(c * 0.6) for c in colour), width=8)
    for point, colour in zip(points, COLOURS):
        if point is not None:
            x, y = point
            draw.ellipse([x - 5, y - 5, x + 5, y + 5], fill=colour)
    return image


def pose_pair() -> Image.Image:
    """The astronaut's pose twice, side by side: the double-width canvas of pair generation."""
    pose = pose_image(ASTRONAUT_POSE)
    pair = Image.new("RGB", (2 * SIDE, SIDE))
    pair.paste(pose, (0, 0))
    pair.paste(pose, (SIDE, 0))
    return pair


EXAMPLES = {
    "likeness_portrait.png": astronaut,
    "likeness_portrait_2.png": grace_hopper,
    "likeness_portrait_view_2.png": lambda: second_view(astronaut()),
    "likeness_style.png": style_reference,
    "likeness_pose_pair.png": pose_pair,
}


def main() -> None:
    for name, make in EXAMPLES.items():
        make().save(HERE / name, optimize=True)
        print(f"wrote {HERE / name}")


if __name__ == "__main__":
    main()
