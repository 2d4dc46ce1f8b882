"""What a UI workflow adds to its API twin: groups, notes, node titles, nodes bypassed by default.

An API-format prompt has none of these, so each workflow may have a sidecar beside its twin's
folder, ``workflows/layout/<name>.json`` (read by tests/tools/make_workflows.py):

    {
     "groups": [{"title": "1 · Inputs", "nodes": ["1", "2"], "stage": "inputs"},
                {"title": "Identity (bypass to skip)", "nodes": ["30", "31"], "optional": true, "row": 1}],
     "notes": [{"text": "Markdown", "title": "About this workflow", "size": [520, 640]},
               {"text": "Markdown", "group": "<a group's title>"}],
     "titles": {"30": "Face of the original photo"},
     "bypassed": ["31"]
    }

Every key is optional; node ids are the API twin's. Groups are the workflow's stages, in order:
when there are groups, every node is in exactly one. They are laid out left to right, a group
with a higher "row" starting a new row below the ones before; inside a group its nodes keep the
editor's columns (dependency order), each column stacked in order. The editor decides membership
of a group by the centre of each node (LGraphGroup.recomputeInsideNodes), and no group overlaps
another, so it counts exactly the sidecar's nodes. "stage" picks the group's colour; "optional"
marks a group the user may bypass (the tests run the workflow with it on and off). A note without
"group" stands left of the graph; with one, it is a member of that group. "{models}" in a note's
text is replaced by the list of model files the workflow loads (tests/make_workflows.py).
"""

from __future__ import annotations

import json
from pathlib import Path

NODE_TITLE_HEIGHT = 30  # LiteGraph.NODE_TITLE_HEIGHT: a node's title bar sits above its pos
GROUP_FONT_SIZE = 24
GROUP_TITLE_HEIGHT = 40  # the group's title bar (font 24 × 1.4 ≈ 34) and some air
GAP = 48  # between columns, between stacked nodes, between groups and between rows
PADDING = 16  # between a group's edge and its nodes
# The editor's own group colours (LGraphCanvas.node_colors' groupcolor): pale blue, purple, yellow, green, brown.
STAGE_COLORS = {"inputs": "#3f789e", "method": "#a1309b", "sampling": "#b58b2a", "output": "#8A8",
                "optional": "#b06634"}
NOTE_SIZE = (420, 220)
# Widths that hold a title: the canvas draws group titles at GROUP_FONT_SIZE and node titles at 14 px
# (about 0.55 em a character), and cuts a title that does not fit.
GROUP_TITLE_CHAR = 14
NODE_TITLE_CHAR = 8
NODE_TITLE_MARGIN = 56  # the collapse dot before a node's title and the badge after it
KEYS = {"groups", "notes", "titles", "bypassed"}
GROUP_KEYS = {"title", "nodes", "stage", "optional", "row", "color"}


def load_layout(folder: Path, name: str) -> dict:
    """The sidecar of workflow ``name`` in ``folder`` (the folder holding api/), or {} without one."""
    path = folder / "layout" / f"{name}.json"
    if not path.exists():
        return {}
    layout = json.loads(path.read_text())
    unknown = set(layout) - KEYS
    if unknown:
        raise ValueError(f"{path}: unknown keys {sorted(unknown)}; a layout has {sorted(KEYS)}")
    for group in layout.get("groups", []):
        if set(group) - GROUP_KEYS or group.get("stage", "method") not in STAGE_COLORS:
            raise ValueError(f"{path}: group {group.get('title')!r} has keys {sorted(group)} (a group has "
                             f"{sorted(GROUP_KEYS)}) and stage {group.get('stage')!r} (one of {sorted(STAGE_COLORS)})")
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


def _note(node_id: int, note: dict, models: str) -> dict:
    return {"id": node_id, "type": "MarkdownNote", "pos": [0, 0], "size": list(note.get("size", NOTE_SIZE)),
            "flags": {}, "order": 0, "mode": 0, "inputs": [], "outputs": [], "properties": {},
            "title": note.get("title", "Note"), "widgets_values": [note["text"].replace("{models}", models)]}


def _place_group(members: list[dict], left: float, top: float, title: str) -> tuple[float, float]:
    """Put a group's members in their editor columns from (left, top); returns its right and bottom edge
    (wide enough for its title)."""
    columns: dict[float, list[dict]] = {}
    for node in sorted(members, key=lambda n: (n["pos"][0], n["pos"][1])):
        columns.setdefault(node["pos"][0], []).append(node)
    x, lowest = left + PADDING, top + GROUP_TITLE_HEIGHT
    for column in columns.values():
        y = top + GROUP_TITLE_HEIGHT + PADDING + NODE_TITLE_HEIGHT
        for node in column:
            node["pos"] = [x, y]
            y += node["size"][1] + NODE_TITLE_HEIGHT + GAP
            lowest = max(lowest, node["pos"][1] + node["size"][1])
        x += max(node["size"][0] for node in column) + GAP
    return max(x - GAP + PADDING, left + len(title) * GROUP_TITLE_CHAR + 2 * PADDING), lowest + PADDING


def apply_layout(workflow: dict, layout: dict, models: str = "") -> dict:
    """The UI workflow with the sidecar's titles, bypassed nodes, notes and groups (see above);
    ``models`` replaces "{models}" in the notes."""
    nodes = {str(node["id"]): node for node in workflow["nodes"]}
    titles, bypassed = layout.get("titles", {}), layout.get("bypassed", [])
    groups = [dict(group, nodes=list(group["nodes"])) for group in layout.get("groups", [])]
    named = {node_id for group in groups for node_id in group["nodes"]} | set(titles) | set(bypassed)
    missing = sorted(named - set(nodes), key=int)
    if missing:
        raise ValueError(f"the layout names nodes {missing} that the workflow does not have")
    grouped = [node_id for group in groups for node_id in group["nodes"]]
    if len(grouped) != len(set(grouped)):
        raise ValueError("a node may be in one group only")
    if groups and set(grouped) != set(nodes):
        raise ValueError(f"nodes {sorted(set(nodes) - set(grouped), key=int)} are in no group: the groups are the "
                         "workflow's stages, every node is in one")
    rows = [group.get("row", 0) for group in groups]
    if rows != sorted(rows):
        raise ValueError(f"the groups' rows must not decrease in the sidecar's order: {rows}")
    for node_id, title in titles.items():
        nodes[node_id]["title"] = title
        nodes[node_id]["size"][0] = max(nodes[node_id]["size"][0], len(title) * NODE_TITLE_CHAR + NODE_TITLE_MARGIN)
    for node_id in bypassed:
        nodes[node_id]["mode"] = 4  # LGraphEventMode.BYPASS
    laid_out = list(nodes.values())
    left = min(node["pos"][0] for node in laid_out)
    top = min(bounding_rect(node)[1] for node in laid_out)
    titles_of_groups = [group["title"] for group in groups]
    free_notes = []
    for note in layout.get("notes", []):
        workflow["last_node_id"] = workflow.get("last_node_id", max(int(i) for i in nodes)) + 1
        node = _note(workflow["last_node_id"], note, models)
        workflow["nodes"].append(node)
        if "group" in note:
            if note["group"] not in titles_of_groups:
                raise ValueError(f"a note names the group {note['group']!r}; the groups are {titles_of_groups}")
            node["pos"] = [left - 1, top]  # the group's first column
            groups[titles_of_groups.index(note["group"])]["nodes"].insert(0, str(node["id"]))
            nodes[str(node["id"])] = node
        else:
            free_notes.append(node)
    y = top
    for node in free_notes:  # left of the graph, one under the other
        node["pos"] = [left - node["size"][0] - GAP, y + NODE_TITLE_HEIGHT]
        y += node["size"][1] + NODE_TITLE_HEIGHT + GAP
    workflow.setdefault("groups", [])
    x, row_top, row_bottom, row = left, top, top, 0
    for number, group in enumerate(groups, start=len(workflow["groups"]) + 1):
        if group.get("row", 0) != row:
            x, row_top, row = left, row_bottom + GAP, group.get("row", 0)
        right, bottom = _place_group([nodes[node_id] for node_id in group["nodes"]], x, row_top, group["title"])
        row_bottom = max(row_bottom, bottom)
        stage = "optional" if group.get("optional") else group.get("stage", "method")
        workflow["groups"].append({"id": number, "title": group["title"],
                                   "bounding": [x, row_top, right - x, bottom - row_top],
                                   "color": group.get("color", STAGE_COLORS[stage]), "font_size": GROUP_FONT_SIZE,
                                   "flags": {}})
        x = right + GAP
    return workflow
