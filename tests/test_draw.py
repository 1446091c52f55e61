"""`splitc inspect --draw`: pictures laid out by Graphviz, readable at any size: ResNet-50 on 8
devices under every strategy with no two labels on top of each other, tensors named by the
model's layers."""

import itertools
import xml.etree.ElementTree as ET

import pytest

from splitc import frontend
from splitc.draw import plan_graph
from splitc.planning import strategies
from splitc.planning.extract import extract

SVG = "{http://www.w3.org/2000/svg}"


def label_boxes(svg: bytes) -> list[tuple[float, float, float, float, str]]:
    """Each text's box, from its anchor, font size and length (a generous 0.6 em a glyph)."""
    boxes = []
    for t in ET.fromstring(svg).iter(SVG + "text"):
        x, y, size, text = float(t.get("x")), float(t.get("y")), float(t.get("font-size")), \
            t.text or ""
        width = 0.6 * size * len(text)
        left = {"middle": x - width / 2, "end": x - width}.get(t.get("text-anchor"), x)
        boxes.append((left, y - 0.8 * size, left + width, y + 0.2 * size, text))
    return boxes


def overlapping(boxes):
    return [(a[4], b[4]) for a, b in itertools.combinations(boxes, 2)
            if a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]]


@pytest.fixture(scope="module")
def resnet50():
    return frontend.load("resnet50")


@pytest.mark.parametrize("strategy", ["pipeline", "channel", "spatial", "hybrid"])
def test_resnet50_on_eight_devices_has_no_labels_on_labels(resnet50, strategy):
    names = [f"pi{i}" for i in range(8)]
    split = strategies.get(strategy).split(resnet50.mod, strategies.Context(8))
    plan = extract(split.module, names, resnet50.layer_names).plan(["rpi4"] * 8, strategy,
                                                                  "resnet50")
    boxes = label_boxes(plan_graph(plan).pipe(format="svg"))
    assert len(boxes) > 20
    assert overlapping(boxes) == []
    text = " ".join(b[4] for b in boxes)
    assert "pi7 (rpi4)" in text and "/layer" in text  # devices by name, tensors by layer


def test_the_branch_plan_too():
    model = frontend.load("resnet18", tiny=True)
    split = strategies.get("branch").split(model.mod, strategies.Context(8))
    plan = extract(split.module, None, model.layer_names).plan(["host"] * 8, "branch", "r18")
    assert overlapping(label_boxes(plan_graph(plan).pipe(format="svg"))) == []
