"""What a UI workflow adds to its API twin: groups, notes, node titles, nodes bypassed by default.

An API-format prompt has none of these, so each workflow may have a sidecar beside its twin's
folder, ``workflows/layout/<name>.json`` (read by tests/tools/make_workflows.py):

    {
     "groups": [{"title": "...", "nodes": ["30", "31"], "color": "#3f789e"}],
     "notes": [{"text": "Markdown", "group": "<a group's title>", "title": "About this group"}],
     "titles": {"30": "Face of the original photo"},
     "bypassed": ["31"]
    }

Every key is optional; node ids are the API twin's. A note without "group" stands left of the
graph; with one, it is a member of that group. The editor decides membership of a group by the
centre of each node (LGraphGroup.recomputeInsideNodes), so ``apply_layout`` gives each group a band
of its own below the laid-out graph: its members in their columns, and no other node inside it.
"""

from __future__ import annotations

import json
from pathlib import Path

NODE_TITLE_HEIGHT = 30  # LiteGraph.NODE_TITLE_HEIGHT: a node's title bar sits above its pos
GROUP_FONT_SIZE = 24
GROUP_TITLE_HEIGHT = 40  # the group's title bar (font 24 × 1.4 ≈ 34) and some air
GAP = 48  # between columns, between stacked nodes and between bands
PADDING = 16  # between a group's edge and its nodes
GROUP_COLOR = "#3f789e"
NOTE_SIZE = (420, 220)
KEYS = {"groups", "notes", "titles", "bypassed"}


def load_layout(folder: Path, name: str) -> dict:
    """The sidecar of workflow ``name`` in ``folder`` (the folder holding api/), or {} without one."""
    path = folder / "layout" / f"{name}.json"
    if not path.exists():
        return {}
    layout = json.loads(path.read_text())
    unknown = set(layout) - KEYS
    if unknown:
        raise ValueError(f"{path}: unknown keys {sorted(unknown)}; a layout has {sorted(KEYS)}")
    return layout


def bounding_rect(node: dict) -> tuple[float, float, float, float]:
    """(x, y, width, height) of a serialised node with its title bar, as the editor measures it."""
    (x, y), (width, height) = node["pos"], node["size"]
    return x, y - NODE_TITLE_HEIGHT, width, height + NODE_TITLE_HEIGHT


def nodes_inside(workflow: dict, group: dict) -> set[int]:
    """Ids of the nodes the editor counts as the group's: those whose centre is inside it."""
    gx, gy, gw, gh = group["bounding"]
    inside = set()
    for node in workflow["nodes"]:
        x, y, w, h = bounding_rect(node)
        if gx < x + w / 2 < gx + gw and gy < y + h / 2 < gy + gh:
            inside.add(node["id"])
    return inside


def _note(node_id: int, note: dict) -> dict:
    return {"id": node_id, "type": "MarkdownNote", "pos": [0, 0], "size": list(NOTE_SIZE), "flags": {},
            "order": 0, "mode": 0, "inputs": [], "outputs": [], "properties": {}, "title": note.get("title", "Note"),
            "widgets_values": [note["text"]]}


def apply_layout(workflow: dict, layout: dict) -> dict:
    """The UI workflow with the sidecar's titles, bypassed nodes, notes and groups (see above)."""
    nodes = {str(node["id"]): node for node in workflow["nodes"]}
    titles, bypassed = layout.get("titles", {}), layout.get("bypassed", [])
    groups = [dict(group, nodes=list(group["nodes"])) for group in layout.get("groups", [])]
    named = {node_id for group in groups for node_id in group["nodes"]} | set(titles) | set(bypassed)
    missing = sorted(named - set(nodes), key=int)
    if missing:
        raise ValueError(f"the layout names nodes {missing} that the workflow does not have")
    for node_id, title in titles.items():
        nodes[node_id]["title"] = title
    for node_id in bypassed:
        nodes[node_id]["mode"] = 4  # LGraphEventMode.BYPASS
    titles_of_groups = [group["title"] for group in groups]
    free_notes = []
    for note in layout.get("notes", []):
        workflow["last_node_id"] = workflow.get("last_node_id", max(int(i) for i in nodes)) + 1
        node = _note(workflow["last_node_id"], note)
        workflow["nodes"].append(node)
        nodes[str(node["id"])] = node
        if "group" in note:
            if note["group"] not in titles_of_groups:
                raise ValueError(f"a note names the group {note['group']!r}; the groups are {titles_of_groups}")
            groups[titles_of_groups.index(note["group"])]["nodes"].insert(0, str(node["id"]))
        else:
            free_notes.append(node)
    grouped = [node_id for group in groups for node_id in group["nodes"]]
    if len(grouped) != len(set(grouped)):
        raise ValueError("a node may be in one group only")
    laid_out = [node for node_id, node in nodes.items() if node_id not in grouped and node not in free_notes]
    left = min(node["pos"][0] for node in laid_out)
    top = min(bounding_rect(node)[1] for node in laid_out)
    bottom = max(sum(bounding_rect(node)[1::2]) for node in laid_out)
    y = top
    for node in free_notes:  # left of the graph, one under the other
        node["pos"] = [left - NOTE_SIZE[0] - GAP, y + NODE_TITLE_HEIGHT]
        y += NOTE_SIZE[1] + NODE_TITLE_HEIGHT + GAP
    workflow.setdefault("groups", [])
    for number, group in enumerate(groups, start=len(workflow["groups"]) + 1):
        band_top = bottom + GAP
        members = [nodes[node_id] for node_id in group["nodes"]]
        # the members keep the editor's columns (dependency order), each column stacked in its order
        columns: dict[float, list[dict]] = {}
        for node in sorted(members, key=lambda n: (n["pos"][0], n["pos"][1])):
            columns.setdefault(node["pos"][0], []).append(node)
        x = left + PADDING
        lowest = band_top + GROUP_TITLE_HEIGHT
        for column in columns.values():
            y = band_top + GROUP_TITLE_HEIGHT + PADDING + NODE_TITLE_HEIGHT
            for node in column:
                node["pos"] = [x, y]
                y += node["size"][1] + NODE_TITLE_HEIGHT + GAP
                lowest = max(lowest, node["pos"][1] + node["size"][1])
            x += max(node["size"][0] for node in column) + GAP
        right = x - GAP + PADDING
        bottom = lowest + PADDING
        workflow["groups"].append({"id": number, "title": group["title"],
                                   "bounding": [left, band_top, right - left, bottom - band_top],
                                   "color": group.get("color", GROUP_COLOR), "font_size": GROUP_FONT_SIZE,
                                   "flags": {}})
    return workflow
