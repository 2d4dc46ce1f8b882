"""The real graph editor (comfyui-frontend-package) in headless Chromium.

Chromium is Debian's; the flags keep it off the network this machine does
not have (without them it keeps retrying Google's hosts).
"""

from __future__ import annotations

import json
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-quic"]

# Records what the editor reports about every graph it loads.
RECORDER = """
() => {
  window.__likeness = {missing: null};
  app.registerExtension({
    name: "likeness.test.recorder",
    afterConfigureGraph(missing) {
      window.__likeness.missing = (missing || []).map(m => typeof m === "string" ? m : (m.type || String(m)));
    },
  });
}
"""

LOAD_AND_REPORT = """
async (workflow) => {
  window.__likeness.missing = null;
  await app.loadGraphData(workflow);
  const registered = LiteGraph.registered_node_types;
  const types = workflow.nodes.map(n => n.type);
  return {
    missing: window.__likeness.missing,
    unregistered: [...new Set(types.filter(t => !(t in registered)))],
    errored: app.graph._nodes.filter(n => n.has_errors).map(n => n.type),
    node_count: app.graph._nodes.length,
  };
}
"""


# What an offline editor always logs (../shared/HOST.md): its optional user files and the
# template list are 404s, the browser asks for a favicon, api.comfy.org is blocked, and one
# TypeError is thrown while it starts. Matched exactly, so any other error fails a test.
HARMLESS_404_PATHS = ("/user.css", "/favicon.ico", "/api/userdata/user.css", "/api/userdata/comfy.templates.json",
                      "/api/userdata?dir=workflows&recurse=true&split=false&full_info=true",
                      "/api/userdata?dir=subgraphs%2F&recurse=true&split=false&full_info=true")
NOT_FOUND = "Failed to load resource: the server responded with a status of 404 (Not Found)"
HARMLESS_MESSAGES = {
    ("TypeError: Cannot read properties of undefined (reading 'id')", "/assets/lib/vue/dist/vue.esm-browser.prod.js"),
}
# api.comfy.org is blocked: the editor's look-up of comfy-core, and of any node type it finds missing.
BLOCKED_COMFY_ORG = re.compile(r"Connecting to 'https://api\.comfy\.org/(nodes\?node_id=comfy-core|comfy-nodes/\w+/node)' "
                               r"violates the following Content Security Policy directive: \"connect-src 'self'\"\. "
                               r"The action has been blocked\.")


def _model_urls() -> set[str]:
    from .paths import load_installer

    return {model["url"] for model in load_installer().MODEL_FILES}


# The missing-models dialog asks each listed file's size from its URL; offline that is blocked.
MODEL_URL_BLOCKED = (
    re.compile(r"Connecting to '(?P<url>[^']+)' violates the following Content Security Policy directive: "
               r"\"connect-src 'self'\"\. The action has been blocked\."),
    re.compile(r"Fetch API cannot load (?P<url>\S+)\. Refused to connect because it violates the document's "
               r"Content Security Policy\."))
FILE_SIZE_FAILED = "Error fetching file size: TypeError: Failed to fetch"
# Run on a prompt the server refuses: the editor logs the 400 and its PromptExecutionError (GraphEditor.run).
REFUSED_PROMPT = "Failed to load resource: the server responded with a status of 400 (Bad Request)"
REFUSED_PROMPT_ERROR = "PromptExecutionError: Prompt execution failed"


@dataclass(frozen=True)
class ConsoleError:
    text: str  # the message's first line
    path: str  # where it came from: path and query of the URL

    def __str__(self) -> str:
        return f"{self.text} ({self.path})"

    @property
    def harmless(self) -> bool:
        if self.text == NOT_FOUND:
            return self.path in HARMLESS_404_PATHS
        if (self.text, self.path) in HARMLESS_MESSAGES or BLOCKED_COMFY_ORG.fullmatch(self.text) is not None:
            return True
        if self.text == FILE_SIZE_FAILED:
            return True
        blocked = (pattern.fullmatch(self.text) for pattern in MODEL_URL_BLOCKED)
        return any(match is not None and match["url"] in _model_urls() for match in blocked)


def console_error(message) -> ConsoleError:
    from urllib.parse import urlsplit

    url = urlsplit((message.location or {}).get("url", ""))
    return ConsoleError(message.text.splitlines()[0] if message.text else "",
                        url.path + (f"?{url.query}" if url.query else ""))


# The template browser's cards, found by their titles: each card's thumbnail and its loaded width.
TEMPLATE_CARDS = """
async ([names, expected]) => {
  // what a card drew, as the mean colour of each cell of an 8x8 grid (robust to JPEG decoders)
  const cellsOf = img => {
    const canvas = document.createElement('canvas');
    canvas.width = img.naturalWidth; canvas.height = img.naturalHeight;
    const context = canvas.getContext('2d');
    context.drawImage(img, 0, 0);
    const data = context.getImageData(0, 0, canvas.width, canvas.height).data;
    const cells = [];
    for (let gy = 0; gy < 8; gy++) for (let gx = 0; gx < 8; gx++) {
      const x0 = Math.floor(gx * canvas.width / 8), x1 = Math.floor((gx + 1) * canvas.width / 8);
      const y0 = Math.floor(gy * canvas.height / 8), y1 = Math.floor((gy + 1) * canvas.height / 8);
      const sum = [0, 0, 0];
      for (let y = y0; y < y1; y++) for (let x = x0; x < x1; x++)
        for (let c = 0; c < 3; c++) sum[c] += data[4 * (y * canvas.width + x) + c];
      cells.push(...sum.map(v => v / ((x1 - x0) * (y1 - y0))));
    }
    return cells;
  };
  const cards = {};
  for (const name of names) {
    const find = () => {
      const title = [...document.querySelectorAll('.p-dialog *')]
        .find(e => e.children.length === 0 && e.innerText && e.innerText.trim() === name);
      let card = title;
      while (card && !card.querySelector('img')) card = card.parentElement;
      return card;
    };
    let card = find();
    if (!card) continue;
    card.scrollIntoView();
    // The grid is virtual: a card scrolled into view first shows a recycled picture (its src is a
    // blob URL, which names nothing), so read it until it draws the expected picture or 10 s pass.
    let img = null, cells = null;
    for (let i = 0; i < 50; i++) {
      await new Promise(r => setTimeout(r, 200));
      card = find();
      img = card && card.querySelector('img');
      if (!img || !(img.complete && img.naturalWidth)) continue;
      cells = cellsOf(img);
      const want = expected[name];
      if (!want || Math.max(...cells.map((v, k) => Math.abs(v - want[k]))) < 3) break;
    }
    if (!card || !img || !cells) continue;
    cards[name] = {thumbnail: img.src, loaded_width: img.naturalWidth, loaded_height: img.naturalHeight, cells,
                   text: card.innerText};
  }
  return cards;
}
"""

# The labels ("<models folder> / <file>") of the missing-models dialog's list.
MISSING_MODELS = """
() => [...document.querySelectorAll('.comfy-missing-models li')]
  .map(item => (item.innerText.match(/(\\S+) \\/ (\\S+)/) || [""])[0]).filter(Boolean)
"""
# The red error boxes in that list (a file the dialog will not download: "Only allowed suffixes ...").
MISSING_MODEL_ERRORS = """
() => [...document.querySelectorAll('.comfy-missing-models li .p-message')].map(box => box.innerText.trim())
"""
# Run (the editor's queue button): the node errors the server answered and the dialog the editor shows.
RUN = """
async () => {
  await app.queuePrompt(0, 1);
  for (let i = 0; i < 30 && !document.querySelector('.p-dialog'); i++) await new Promise(r => setTimeout(r, 100));
  return {node_errors: app.lastNodeErrors || {},
          dialog: [...document.querySelectorAll('.p-dialog')].map(d => d.innerText).join('\\n')};
}
"""


@dataclass
class GraphReport:
    """What the editor said about one workflow."""
    missing: list[str]  # from afterConfigureGraph
    unregistered: list[str]  # workflow types LiteGraph does not know
    errored: list[str]  # loaded nodes with has_errors
    alerts: list[str]  # toasts the editor raised (an invalid workflow schema, say)
    node_count: int
    screenshot: Path
    console_errors: list[ConsoleError] = field(default_factory=list)
    # The editor's missing-models dialog: "directory / name" of each file it lists, and its red error rows.
    missing_models: list[str] = field(default_factory=list)
    missing_model_errors: list[str] = field(default_factory=list)

    @property
    def problems(self) -> list[str]:
        unexpected = {str(e) for e in self.console_errors if not e.harmless}
        return sorted(set(self.missing) | set(self.unregistered) | set(self.errored) | set(self.alerts) | unexpected)


class GraphEditor:
    def __init__(self, url: str, artifacts: Path) -> None:
        from playwright.sync_api import sync_playwright

        self.artifacts = artifacts
        self.console_errors: list[ConsoleError] = []
        self._playwright = sync_playwright().start()
        self._profile = tempfile.TemporaryDirectory(prefix="likeness-chromium-")
        self.context = self._playwright.chromium.launch_persistent_context(
            self._profile.name, executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS,
            viewport={"width": 1600, "height": 1000})
        self.page = self.context.new_page()
        self.page.on("console", lambda m: m.type == "error" and self.console_errors.append(console_error(m)))
        self.page.goto(url, wait_until="domcontentloaded", timeout=120_000)
        self._wait_for_start_up()

    def reload(self) -> None:
        """Open the editor afresh (its model lists are read once per page)."""
        self.page.reload(wait_until="domcontentloaded", timeout=120_000)
        self._wait_for_start_up()

    def _wait_for_start_up(self) -> None:
        # The start-up graph must have loaded before ours, or it overwrites ours.
        self.page.wait_for_function(
            "() => window.app && app.graph && window.LiteGraph && "
            "Object.keys(LiteGraph.registered_node_types).length > 100 && app.graph._nodes.length > 0",
            timeout=120_000)
        self.page.evaluate(RECORDER)

    def template_cards(self, module: str, names: list[str], expected: dict | None = None) -> dict[str, dict]:
        """The template browser's cards of one extension, by title: {title: {thumbnail, loaded
        width and height, the mean colour of each cell of an 8x8 grid over the drawn picture}}.
        ``expected``: {title: cells} a card is waited for (up to 10 s) to draw."""
        # An earlier test's alert (a rejected workflow's stays until closed) would cover cards.
        self.page.evaluate("() => document.querySelectorAll('.p-toast-message').forEach(t => t.remove())")
        try:
            self.page.evaluate("async () => { await app.extensionManager.command.execute('Comfy.BrowseTemplates'); }")
            self.page.get_by_text(module, exact=True).first.click(timeout=30_000)
            self.page.wait_for_timeout(1500)
            self.page.screenshot(path=str(self.artifacts / "template_browser.png"))
            cards = {}
            for name in names:  # the grid loads more cards as it scrolls: bring each into view first
                title = self.page.locator(".p-dialog").get_by_text(name, exact=True).first
                title.scroll_into_view_if_needed(timeout=10_000)
                self.page.wait_for_timeout(800)
                cards.update(self.page.evaluate(TEMPLATE_CARDS, [[name], expected or {}]))
        finally:
            self.page.keyboard.press("Escape")
        return cards

    def unexpected_console_errors(self) -> list[str]:
        return [str(e) for e in self.console_errors if not e.harmless]

    def registered_types(self) -> list[str]:
        return self.page.evaluate("() => Object.keys(LiteGraph.registered_node_types)")

    def load(self, workflow: dict | Path, name: str) -> GraphReport:
        if isinstance(workflow, Path):
            workflow = json.loads(workflow.read_text())
        errors_before = len(self.console_errors)
        self.page.evaluate("() => document.querySelectorAll('.p-toast-message').forEach(t => t.remove())")
        report = self.page.evaluate(LOAD_AND_REPORT, workflow)
        self.page.wait_for_timeout(300)
        screenshot = self.artifacts / f"{name}.png"
        self.page.screenshot(path=str(screenshot))
        alerts = self.page.evaluate(
            "() => [...document.querySelectorAll('.p-toast-message')].map(t => t.innerText.trim())")
        missing_models = self.page.evaluate(MISSING_MODELS)
        missing_model_errors = self.page.evaluate(MISSING_MODEL_ERRORS)
        for _ in range(3):  # the missing-nodes and missing-models dialogs, if any
            if not self.page.locator(".p-dialog").count():
                break
            self.page.keyboard.press("Escape")
            self.page.wait_for_timeout(300)
        return GraphReport(report["missing"] or [], report["unregistered"], report["errored"], alerts,
                           report["node_count"], screenshot, self.console_errors[errors_before:],
                           sorted(missing_models), missing_model_errors)

    def run(self, name: str) -> dict:
        """Press Run on the loaded graph: {"node_errors": what the server refused, per node, "dialog":
        the text of the dialog the editor then shows}. The dialog is closed afterwards."""
        before = len(self.console_errors)
        answer = self.page.evaluate(RUN)
        self.page.wait_for_timeout(300)
        self.page.screenshot(path=str(self.artifacts / f"{name}.png"))
        # What the editor logs when the server refuses a prompt (POST /prompt answered 400), and only that.
        refused = [e for e in self.console_errors[before:]
                   if (e.text, e.path) == (REFUSED_PROMPT, "/api/prompt") or e.text == REFUSED_PROMPT_ERROR]
        self.console_errors[before:] = [e for e in self.console_errors[before:] if e not in refused]
        answer["refusal_logged"] = bool(refused)
        for _ in range(3):
            if not self.page.locator(".p-dialog").count():
                break
            self.page.keyboard.press("Escape")
            self.page.wait_for_timeout(300)
        return answer

    def screenshot_graph(self, path: Path, width: int = 1024) -> Path:
        """The loaded graph as the editor's canvas draws it (no menus around it), fitted to the
        view and cropped to the nodes: a template thumbnail (JPEG)."""
        import base64
        import io

        from PIL import Image

        # Titles and widgets drawn at any zoom (the editor drops text when zoomed out), no FPS counter.
        self.page.evaluate("() => { app.canvas.min_font_size_for_lod = 0; app.canvas.render_info = false; app.canvas.show_info = false; }")
        self.page.evaluate("async () => { await app.extensionManager.command.execute('Comfy.Canvas.FitView'); }")
        self.page.wait_for_timeout(1500)  # Load Image previews arrive from /view
        data = self.page.evaluate("() => { app.canvas.draw(true, true); return app.canvas.canvas.toDataURL('image/png'); }")
        with Image.open(io.BytesIO(base64.b64decode(data.split(",", 1)[1]))) as image:
            image = image.convert("RGB")
            background = image.getpixel((2, 2))
            mask = Image.eval(image.convert("L"), lambda v, b=sum(background) // 3: 255 if abs(v - b) > 6 else 0)
            box = mask.getbbox() or (0, 0, image.width, image.height)
            pad = 16
            image = image.crop((max(box[0] - pad, 0), max(box[1] - pad, 0), min(box[2] + pad, image.width),
                                min(box[3] + pad, image.height)))
            height = round(image.height * width / image.width)
            image.resize((width, height), Image.LANCZOS).save(path, quality=85, optimize=True)
        return path

    def ui_from_api(self, prompt: dict, name: str) -> dict:
        """Let the editor lay out an API-format prompt and serialise it as a
        UI workflow. Seeds are set to "fixed" so the workflow reproduces."""
        self.page.evaluate("async ([api, name]) => { await app.loadApiJson(api, name); }", [prompt, name])
        # Columns by dependency, each node at its drawn size (Load Image previews included).
        self.page.wait_for_timeout(1000)
        self.page.evaluate("() => { app.graph.arrange(48); app.graph.setDirtyCanvas(true, true); }")
        workflow = _without_nulls(self.page.evaluate("() => app.graph.serialize()"))
        for node in workflow["nodes"]:
            values = node.get("widgets_values")
            if isinstance(values, list):
                node["widgets_values"] = ["fixed" if v == "randomize" else v for v in values]
        self.page.keyboard.press("Escape")
        return workflow

    def to_api_prompt(self) -> dict:
        """The loaded graph in API format, as the editor would POST it."""
        return self.page.evaluate("async () => (await app.graphToPrompt()).output")

    def close(self) -> None:
        self.context.close()
        self._playwright.stop()
        self._profile.cleanup()


def _without_nulls(value):
    """serialize() writes null for unset fields; the editor's own workflow
    schema rejects them on load, so they are left out as saved files do."""
    if isinstance(value, dict):
        return {key: _without_nulls(item) for key, item in value.items() if item is not None}
    if isinstance(value, list):
        return [_without_nulls(item) for item in value]
    return value
