"""A small test-only executor for UI-format workflows: checks every node against the pack's own
definitions and runs the graph in dependency order (CI has no ComfyUI)."""

from __future__ import annotations

import json
from pathlib import Path

WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN")
FRONTEND_ONLY = {"Note", "MarkdownNote"}


def widget_names(node_class) -> list[tuple[str, dict]]:
    spec = node_class.INPUT_TYPES()
    names = []
    for section in ("required", "optional"):
        for name, (kind, *options) in spec.get(section, {}).items():
            if isinstance(kind, list) or kind in WIDGET_TYPES:
                names.append((name, options[0] if options else {}))
    return names


def widget_values(node_class, values: list) -> dict:
    """Map a node's widgets_values (by position) to input names; control_after_generate adds a value."""
    out, i = {}, 0
    for name, options in widget_names(node_class):
        out[name] = values[i]
        i += 2 if options.get("control_after_generate") else 1
    if i != len(values):
        raise AssertionError(f"{node_class.__name__}: {len(values)} widget values, definition implies {i}")
    return out


class NativeNodes:
    """Stand-ins for the two ComfyUI core nodes the examples use."""

    def __init__(self, load_image):
        self.saved = []
        self.load_image = load_image

    def run(self, node_type, inputs, widgets):
        if node_type == "SaveImage":
            assert len(widgets) == 1
            self.saved.append(inputs["images"])
            return ()
        if node_type == "LoadImage":
            assert len(widgets) == 2
            image = self.load_image()
            return (image, image[..., 0] * 0)
        raise AssertionError(f"unknown native node {node_type}")


def run_workflow(path: Path, mappings: dict, natives: NativeNodes) -> dict:
    workflow = json.loads(Path(path).read_text())
    assert workflow["version"] == 0.4
    nodes = {n["id"]: n for n in workflow["nodes"] if n["type"] not in FRONTEND_ONLY}
    links = {link[0]: link for link in workflow["links"]}
    outputs: dict[int, tuple] = {}
    pending = dict(nodes)
    while pending:
        ready = [n for n in pending.values() if all(links[i["link"]][1] in outputs for i in n["inputs"] if i["link"] is not None)]
        assert ready, "the workflow has a cycle or a dangling link"
        for node in sorted(ready, key=lambda n: n["order"]):
            inputs = {i["name"]: outputs[links[i["link"]][1]][links[i["link"]][2]] for i in node["inputs"] if i["link"] is not None}
            if node["type"] in mappings:
                cls = mappings[node["type"]]
                kwargs = {**widget_values(cls, node["widgets_values"]), **inputs}
                outputs[node["id"]] = getattr(cls(), cls.FUNCTION)(**kwargs)
                assert len(outputs[node["id"]]) == len(cls.RETURN_TYPES)
            else:
                outputs[node["id"]] = natives.run(node["type"], inputs, node["widgets_values"])
            del pending[node["id"]]
    return outputs
