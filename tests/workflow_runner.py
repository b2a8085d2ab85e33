"""A small test-only executor for UI-format workflows: maps each node's widget values (by position, as the frontend
stores them) onto its inputs and runs the graph in dependency order with the node classes it is given (inside a real
ComfyUI: the pack's nodes and ComfyUI's own)."""

from __future__ import annotations

import json
from pathlib import Path

WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")
FRONTEND_ONLY = {"Note", "MarkdownNote"}
PACK_PREFIX = "LensPack"


def widget_names(node_class) -> list[tuple[str, dict]]:
    spec = node_class.INPUT_TYPES()
    names = []
    for section in ("required", "optional"):
        for name, (kind, *options) in spec.get(section, {}).items():
            if isinstance(kind, list) or kind in WIDGET_TYPES:
                names.append((name, options[0] if options else {}))
    return names


def widget_values(node_class, values: list, strict: bool = True) -> dict:
    """Map a node's widgets_values (by position) to input names; control_after_generate adds a value. ComfyUI's own
    nodes may carry frontend-only values after their widgets (Load Image's upload button): not strict for those."""
    out, i = {}, 0
    for name, options in widget_names(node_class):
        out[name] = values[i]
        i += 2 if options.get("control_after_generate") else 1
    if i != len(values) and (strict or i > len(values)):
        raise AssertionError(f"{node_class.__name__}: {len(values)} widget values, definition implies {i}")
    return out


def run_workflow(path: Path, mappings: dict) -> dict:
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
            cls = mappings[node["type"]]
            kwargs = {**widget_values(cls, node.get("widgets_values", []), strict=node["type"].startswith(PACK_PREFIX)), **inputs}
            result = getattr(cls(), cls.FUNCTION)(**kwargs)
            outputs[node["id"]] = result.get("result", ()) if isinstance(result, dict) else result
            del pending[node["id"]]
    return outputs
