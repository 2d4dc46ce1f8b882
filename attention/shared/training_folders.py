"""A trainer's folder of examples: <stem>.png (the target), a companion image beside it
(<stem>.face.png for Face Fusion, <stem>.id.png for Infinite-ID, <stem>.source.png for the MCDM)
and an optional <stem>.txt caption."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


@dataclass
class Example:
    image: Path
    face: Path
    caption: str


def find_examples(folder: Path, companion: str) -> list[Example]:
    """<stem>.png (target), <stem><companion>.png (its face crop, or identity image), <stem>.txt (caption)."""
    if not folder.is_dir():
        raise ValueError(f"folder={str(folder)!r} is not a folder; expected a folder of <name>.png, "
                         f"<name>{companion}.png and <name>.txt files")
    examples = []
    for image in sorted(folder.iterdir()):
        if image.suffix.lower() not in IMAGE_SUFFIXES or Path(image.stem).suffix:
            continue
        faces = [image.with_name(image.stem + companion + s) for s in IMAGE_SUFFIXES]
        face = next((f for f in faces if f.exists()), None)
        caption = image.with_suffix(".txt")
        if face is None:
            raise ValueError(f"{image.name} has no companion image: expected {faces[0].name} beside it")
        examples.append(Example(image, face, caption.read_text().strip() if caption.exists() else ""))
    if not examples:
        raise ValueError(f"folder={str(folder)!r} holds no <name>.png + <name>{companion}.png pairs")
    return examples
