"""The helpers every method uses: rows, masks on the token grid, sigma ranges."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def helpers(comfy):
    paths = {"rows": "shared.rows", "masks": "shared.token_masks", "schedule": "shared.sigmas",
             "unet_layers": "shared.layer_table"}
    return {name: comfy.pack(f"attention.{path}") for name, path in paths.items()}


@pytest.mark.parametrize("cond_or_uncond,batch,cond,uncond", [
    ([0], 3, [0, 1, 2], []),
    ([1, 0], 4, [2, 3], [0, 1]),
    ([0, 1], 2, [0], [1]),
    ([1], 2, [], [0, 1]),
])
def test_rows_follow_cond_or_uncond(helpers, cond_or_uncond, batch, cond, uncond):
    rows = helpers["rows"]
    assert rows.rows_of(rows.COND, cond_or_uncond, batch) == cond
    assert rows.rows_of(rows.UNCOND, cond_or_uncond, batch) == uncond
    assert rows.row_mask(rows.COND, cond_or_uncond, batch).tolist() == [r in cond for r in range(batch)]


def test_rows_refuse_a_batch_that_does_not_split(helpers):
    with pytest.raises(ValueError, match="cannot be split"):
        helpers["rows"].rows_of(0, [0, 1], 3)


@pytest.mark.parametrize("latent_hw,tokens,grid", [
    ((64, 64), 64 * 64, (64, 64)), ((64, 64), 32 * 32, (32, 32)), ((64, 64), 8 * 8, (8, 8)),
    ((96, 64), 48 * 32, (48, 32)), ((75, 51), 38 * 26, (38, 26)), ((75, 51), 10 * 7, (10, 7)),
    ((2, 1), 1, (1, 1)), ((5, 3), 2, (2, 1)), ((5, 3), 1, (1, 1)),
])
def test_token_grid_follows_the_unet_downsampling(helpers, latent_hw, tokens, grid):
    assert helpers["masks"].token_grid([1, 4, *latent_hw], tokens) == grid


def test_token_grid_refuses_a_count_that_matches_nothing(helpers):
    with pytest.raises(ValueError, match="do not match"):
        helpers["masks"].token_grid([1, 4, 64, 64], 1000)


def test_mask_to_tokens_keeps_the_region(helpers):
    mask = torch.zeros(512, 768)
    mask[:, :384] = 1.0  # left half of a landscape image
    tokens = helpers["masks"].mask_to_tokens(mask, [2, 4, 64, 96], 16 * 24)
    grid = tokens.reshape(1, 16, 24)
    assert tokens.shape == (1, 16 * 24)
    assert torch.all(grid[..., :12] > 0.99) and torch.all(grid[..., 12:] < 0.01)


def test_sigma_range_from_percent_uses_the_model_sampling(helpers, comfy, tiny_checkpoints):
    schedule = helpers["schedule"]
    model, _, _ = comfy.load_checkpoint(tiny_checkpoints["sd15"])
    sampling = schedule.model_sampling_of(model)
    window = schedule.SigmaRange.from_percent(sampling, 0.2, 0.6)
    assert window.sigma_start == pytest.approx(float(sampling.percent_to_sigma(0.2)))
    assert window.sigma_end == pytest.approx(float(sampling.percent_to_sigma(0.6)))
    assert window.sigma_start > window.sigma_end
    middle = (window.sigma_start + window.sigma_end) / 2
    assert window.contains(middle)
    assert not window.contains(window.sigma_start * 1.5)
    assert not window.contains(window.sigma_end / 2)
    assert window.active({"sigmas": torch.tensor([middle])})
    t = schedule.sigma_to_timestep(sampling, torch.tensor(middle))
    assert float(schedule.timestep_to_sigma(sampling, t)) == pytest.approx(middle, rel=1e-3)
    with pytest.raises(ValueError, match="start_percent"):
        schedule.SigmaRange.from_percent(sampling, 0.8, 0.2)


def test_layer_selection_names_the_sets(helpers):
    layers = helpers["unet_layers"]
    keys = [("input", 1, 0), ("middle", 0, 0), ("output", 3, 0)]
    assert layers.select_keys(keys, "decoder") == [("output", 3, 0)]
    assert layers.select_keys(keys, "all") == keys
    with pytest.raises(ValueError, match="expected one of"):
        layers.select_keys(keys, "everything")


def test_a_line_plot_puts_each_point_where_its_value_is(comfy):
    plots = comfy.pack("attention.measuring.plots")
    values = [(0, 3.0), (1, 2.0), (2, 2.5), (3, 1.0)]
    image, drawn = plots.line_plot({"loss": values}, title="t", x_label="step", y_label="loss", size=(400, 300))
    assert image.shape == (1, 300, 400, 3)
    (pixels,) = drawn.values()
    xs, ys = [x for x, _ in pixels], [y for _, y in pixels]
    assert xs == sorted(xs) and len(set(xs)) == 4  # steps left to right, evenly
    assert abs((xs[1] - xs[0]) - (xs[3] - xs[2])) < 1e-6
    assert ys[3] > ys[1] > ys[2] > ys[0]  # higher values higher up (smaller pixel rows)
    # the drawn colour is there at each point
    for x, y in pixels:
        assert image[0, round(y), round(x)].tolist() != [1.0, 1.0, 1.0]
