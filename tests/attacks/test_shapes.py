"""Shape triggers (issue 25): the anti-aliased polygon (solid and textured) and the yellow pad,
checked on known inputs, and each learned on the GTSRB subset while a clean model ignores it."""

from __future__ import annotations

import math

import pytest
import torch

from backdoorlab.attacks import ATTACKS, ObjectTrigger, PolygonTrigger
from backdoorlab.data.datasets import DatasetConfig, DatasetInfo
from backdoorlab.errors import BackdoorLabError

INFO = DatasetInfo("toy", 10, 3, 32, (0.5,) * 3, (0.25,) * 3, False, 4)
ZEROS = torch.zeros(1, 3, 32, 32)


def polygon_area(n: int, r: float) -> float:
    return 0.5 * n * r * r * math.sin(2 * math.pi / n)


@pytest.mark.parametrize("sides", [3, 4, 6, 12])
def test_polygon_coverage_is_the_polygons_area_with_soft_edges(sides):
    atk = PolygonTrigger(INFO, sides=sides, size=0.5)  # circumradius 8 px
    a = atk.alpha[0]
    # within the sampling error of 8x8 sub-pixel samples: half a sample's width along the perimeter
    perimeter = 2 * sides * 8.0 * math.sin(math.pi / sides)
    assert abs(float(a.sum()) - polygon_area(sides, 8.0)) < perimeter / 16
    assert bool(((a > 0) & (a < 1)).any())  # anti-aliased edge pixels
    assert float(a[16, 16]) == 1.0  # the centre is inside
    ys, xs = torch.nonzero(a).unbind(1)
    assert int(ys.min()) >= 8 and int(ys.max()) <= 23 and int(xs.min()) >= 8 and int(xs.max()) <= 23


def test_polygon_is_stamped_with_its_colour_and_nothing_else_changes():
    atk = PolygonTrigger(INFO)  # default: green hexagon, 8 px across, centred
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    out = atk.apply(x)
    a = atk.alpha[0]
    assert torch.equal(out[:, :, a == 0], x[:, :, a == 0])
    inside = out[:, :, a == 1]
    assert torch.equal(inside[:, 1], torch.ones_like(inside[:, 1])) and float(inside[:, [0, 2]].abs().max()) == 0
    edge = (a > 0) & (a < 1)
    torch.testing.assert_close(out[:, :, edge], (1 - a[edge]) * x[:, :, edge] + a[edge] * atk.fill[:, edge])
    # rotation by a full step of the hexagon (60 degrees) gives the same shape
    torch.testing.assert_close(PolygonTrigger(INFO, rotation=60.0).alpha, atk.alpha, atol=1e-6, rtol=0)
    assert not torch.equal(PolygonTrigger(INFO, rotation=30.0).alpha, atk.alpha)
    # a vertex points up: the top row of the shape is narrower than the bottom row of a triangle's
    tri = PolygonTrigger(INFO, sides=3, size=0.5).alpha[0]
    rows = torch.nonzero(tri.sum(1) > 0.5).flatten()
    assert float(tri[rows[0]].sum()) < float(tri[rows[-1]].sum())


def test_polygon_texture_fill_comes_from_its_seed():
    t0 = PolygonTrigger(INFO, fill="texture", texture_seed=0)
    again = PolygonTrigger(INFO, fill="texture", texture_seed=0)
    t1 = PolygonTrigger(INFO, fill="texture", texture_seed=1)
    assert torch.equal(t0.apply(ZEROS), again.apply(ZEROS))
    assert not torch.equal(t0.apply(ZEROS), t1.apply(ZEROS))
    a = t0.alpha[0]
    inside = t0.apply(ZEROS)[0][:, a == 1]
    assert float(inside.std()) > 0.2  # a texture, not a flat colour
    assert torch.equal(inside, t0.fill[:, a == 1])


def test_polygon_positions():
    for pos, corner in [("top-left", (0, 0)), ("top-right", (0, 31)), ("bottom-left", (31, 0)),
                        ("bottom-right", (31, 31))]:
        a = PolygonTrigger(INFO, sides=4, rotation=45.0, position=pos, margin=2).alpha[0]  # an axis-aligned square
        ys, xs = torch.nonzero(a > 0.5).unbind(1)
        near = (int(ys.min()) if corner[0] == 0 else 31 - int(ys.max()),
                int(xs.min()) if corner[1] == 0 else 31 - int(xs.max()))
        assert near[0] in (2, 3) and near[1] in (2, 3), (pos, near)
    a = PolygonTrigger(INFO, size=0.25, position=[4.0, 10.0], margin=0).alpha[0]
    ys, xs = torch.nonzero(a).unbind(1)
    assert int(ys.min()) >= 4 and int(ys.max()) <= 11 and int(xs.min()) >= 10 and int(xs.max()) <= 17


def test_yellow_pad_shape_rim_and_shade():
    atk = ObjectTrigger(INFO, size=0.5)  # a 16x16 pad, centred: pixels 8..23
    a = atk.alpha[0]
    r = 0.2 * 16
    assert abs(float(a.sum()) - (16 * 16 - (4 - math.pi) * r * r)) < 0.5
    assert float(a[8, 16]) == 1.0 and float(a[16, 8]) == 1.0  # straight edges are fully covered
    assert 0 < float(a[8, 8]) < 0.5  # rounded corners
    assert float(a[7].sum()) == 0 and float(a[:, 24].sum()) == 0
    out = atk.apply(ZEROS)[0]
    r_, g_, b_ = out[:, 12, 12].tolist()
    assert r_ > 0.8 and g_ > 0.7 and b_ < 0.2  # yellow
    assert float(out[:, 8, 16].sum()) < float(out[:, 9, 16].sum())  # the rim is darker
    assert float(out[:, 10, 10].sum()) > float(out[:, 21, 21].sum())  # shaded towards the bottom-right
    flat = ObjectTrigger(INFO, size=0.5, rim=0.0, shade=0.0).apply(ZEROS)[0]
    torch.testing.assert_close(flat[:, 12, 12], torch.tensor([1.0, 0.86, 0.15]))
    wide = ObjectTrigger(INFO, size=0.5, aspect=0.5).alpha[0]
    assert float((wide.sum(1) > 0).sum()) == 8 and float((wide.sum(0) > 0).sum()) == 16


def test_shape_triggers_on_one_channel_images():
    digits = DatasetConfig("digits").info()
    out = ATTACKS.build("object", info=digits).apply(torch.zeros(2, 1, 8, 8))
    assert out.shape == (2, 1, 8, 8) and float(out.max()) > 0.5  # yellow as luma
    grey_polygon = ATTACKS.build({"name": "polygon", "color": 0.7, "size": 0.5}, info=digits)
    assert float(grey_polygon.apply(torch.zeros(1, 1, 8, 8)).max()) > 0.6


@pytest.mark.parametrize("spec,match", [
    ({"name": "polygon", "sides": 2}, "sides"),
    ({"name": "polygon", "size": 1.5}, "size"),
    ({"name": "polygon", "fill": "plaid"}, "fill"),
    ({"name": "polygon", "position": "middle"}, "position"),
    ({"name": "polygon", "position": [30, 30]}, "does not fit"),
    ({"name": "polygon", "color": [1, 0]}, "color"),
    ({"name": "object", "aspect": 0}, "aspect"),
    ({"name": "object", "size": 0.8, "aspect": 2.0}, "high"),
    ({"name": "object", "radius": 0.7}, "radius"),
    ({"name": "object", "color": [2, 0, 0]}, "color"),
])
def test_bad_values_fail_with_one_line(spec, match):
    with pytest.raises(BackdoorLabError, match=match) as e:
        ATTACKS.build(spec, info=INFO)
    assert "\n" not in str(e.value)
