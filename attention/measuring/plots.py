"""Pictures of numbers for the graph: line plots (loss curves, a metric against a swept value)
and labelled grids, as ComfyUI IMAGEs.

Drawn with Pillow, which ComfyUI itself depends on (no plotting library to install), with the
font Pillow ships (``ImageFont.load_default``, a scalable TrueType font where FreeType is there).
"""

from __future__ import annotations

import math

BACKGROUND, AXES, GRID, TEXT = (255, 255, 255), (60, 60, 60), (225, 225, 225), (20, 20, 20)
COLOURS = ((31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189), (140, 86, 75))


def font(size: int = 14):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


def _ticks(low: float, high: float, count: int = 5) -> list[float]:
    if high <= low:
        return [low]
    step = 10 ** math.floor(math.log10((high - low) / count))
    for factor in (1, 2, 5, 10):
        if (high - low) / (step * factor) <= count:
            step *= factor
            break
    first = math.ceil(low / step) * step
    return [first + i * step for i in range(int((high - first) / step + 1e-9) + 1)]


def _label(value: float) -> str:
    return f"{value:.3g}"


def line_plot(series: dict[str, list[tuple[float, float]]], *, title: str, x_label: str, y_label: str,
              size: tuple[int, int] = (768, 512)):
    """A ComfyUI IMAGE (1, H, W, 3) of each series' points joined by lines, with axes, ticks and a
    legend; returns it and the drawn points' pixel positions ({name: [(x, y)]}) for tests."""
    import numpy as np
    import torch
    from PIL import Image, ImageDraw

    width, height = size
    left, right, top, bottom = 80, 24, 48, 64
    image = Image.new("RGB", size, BACKGROUND)
    draw = ImageDraw.Draw(image)
    points = [p for values in series.values() for p in values if all(math.isfinite(v) for v in p)]
    xs, ys = [p[0] for p in points] or [0.0, 1.0], [p[1] for p in points] or [0.0, 1.0]
    x_low, x_high = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y_low, y_high = min(ys), max(ys) if max(ys) > min(ys) else min(ys) + 1
    pad = (y_high - y_low) * 0.05
    y_low, y_high = y_low - pad, y_high + pad

    def at(x: float, y: float) -> tuple[float, float]:
        return (left + (x - x_low) / (x_high - x_low) * (width - left - right),
                height - bottom - (y - y_low) / (y_high - y_low) * (height - top - bottom))

    for tick in _ticks(y_low, y_high):
        _, y = at(x_low, tick)
        draw.line([(left, y), (width - right, y)], fill=GRID)
        draw.text((left - 8, y), _label(tick), fill=TEXT, font=font(12), anchor="rm")
    for tick in _ticks(x_low, x_high):
        x, _ = at(tick, y_low)
        draw.line([(x, top), (x, height - bottom)], fill=GRID)
        draw.text((x, height - bottom + 8), _label(tick), fill=TEXT, font=font(12), anchor="mt")
    draw.rectangle([left, top, width - right, height - bottom], outline=AXES)
    draw.text((width / 2, 16), title, fill=TEXT, font=font(16), anchor="mt")
    draw.text((width / 2, height - 20), x_label, fill=TEXT, font=font(13), anchor="mm")
    draw.text((16, top - 24), y_label, fill=TEXT, font=font(13), anchor="lm")
    drawn = {}
    for index, (name, values) in enumerate(series.items()):
        colour = COLOURS[index % len(COLOURS)]
        pixels = [at(x, y) for x, y in values if math.isfinite(x) and math.isfinite(y)]
        if len(pixels) > 1:
            draw.line(pixels, fill=colour, width=2)
        for x, y in pixels:
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
        # The legend's swatch is drawn, not typed: Pillow's bundled font has no dash glyph.
        legend_y = top + 8 + 18 * index
        draw.line([(left + 12, legend_y + 7), (left + 28, legend_y + 7)], fill=colour, width=2)
        draw.text((left + 34, legend_y), name, fill=colour, font=font(13), anchor="lt")
        drawn[name] = pixels
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)[None], drawn


def loss_curve(losses: list[float], before: float, after: float, title: str):
    """A trainer's loss per step, with the validation loss before and after as two points."""
    steps = len(losses)
    image, _ = line_plot({"training loss": list(enumerate(losses)),
                          "validation loss": [(0, before), (max(steps - 1, 0), after)]},
                         title=title, x_label="step", y_label="loss")
    return image


def labelled_grid(columns: list[tuple[str, list]], *, padding: int = 4, line_height: int = 16):
    """A ComfyUI IMAGE (1, H, W, 3) of images in columns, each column under its label (one or more
    lines of text): ``columns`` is [(label, [image (h, w, 3) in 0..1, ...])]. Every cell takes the
    size of the first image (others are resized to it). Returns the grid and each column's cells'
    boxes ([[(x0, y0, x1, y1), ...], ...], in grid pixels) for tests."""
    import numpy as np
    import torch
    from PIL import Image, ImageDraw

    def picture(image) -> Image.Image:
        pixels = (image.detach().float().cpu().numpy() * 255).round().clip(0, 255).astype(np.uint8)
        return Image.fromarray(pixels[..., :3])

    first = next(image for _, images in columns for image in images)
    cell_w, cell_h = first.shape[1], first.shape[0]
    label_font = font(line_height - 3)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    # A label wider than the cells widens its column, so no label runs into the next one.
    widths = [max([cell_w] + [math.ceil(measure.textlength(text, font=label_font)) for text in label.splitlines()])
              for label, _ in columns]
    label_h = padding + line_height * max(len(label.splitlines()) or 1 for label, _ in columns)
    rows = max(len(images) for _, images in columns)
    grid = Image.new("RGB", (sum(widths) + padding * (len(columns) + 1), label_h + rows * (cell_h + padding) + padding),
                     BACKGROUND)
    draw = ImageDraw.Draw(grid)
    boxes, x = [], padding
    for (label, images), column_w in zip(columns, widths):
        for line, text in enumerate(label.splitlines()):
            draw.text((x, padding + line * line_height), text, fill=TEXT, font=label_font, anchor="la")
        column = []
        for r, image in enumerate(images):
            y = label_h + r * (cell_h + padding)
            cell = picture(image)
            if cell.size != (cell_w, cell_h):
                cell = cell.resize((cell_w, cell_h), Image.LANCZOS)
            grid.paste(cell, (x, y))
            column.append((x, y, x + cell_w, y + cell_h))
        boxes.append(column)
        x += column_w + padding
    return torch.from_numpy(np.asarray(grid, dtype=np.float32) / 255.0)[None], boxes
