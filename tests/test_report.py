"""The HTML report, rendered from small constructed stores, checked as text and in a real headless Chromium."""
from __future__ import annotations

import base64
import fcntl
import io
import json
import os
import select
import shutil
import subprocess
import time
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from aggregations.report import render_report
from aggregations.run import aggregate
from pipeline.store import STATUS_FAILED, STATUS_OK, RelevanceStore

EVIL = "<script>alert(1)</script>"
CLASSES = [EVIL, "cat $x^$ \\frac", "dog & <b>bird</b>"]  # markup, and text matplotlib would take for math
SIZE, PER_CLASS = 16, 8
SPOT = (0, 12, 3, 15)  # x0, y0, x1, y1: where class 0 of model A looks
BOX = (5.0, 5.0, 11.0, 11.0)
PREPROCESS = {"resize": [SIZE, SIZE], "center_crop": None, "pad_to_square": False, "mean": [0.5] * 3,
              "std": [0.5] * 3, "interpolation": "bilinear"}


def _images(folder: Path) -> list[str]:
    """Real PNGs (the report draws class averages from them), with markup in their file names."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(len(CLASSES) * PER_CLASS):
        image = rng.uniform(0.2, 0.6, (SIZE, SIZE, 3))
        image[5:11, 5:11] = [0.9, 0.3, 0.1]  # the object
        if i < PER_CLASS:
            image[12:15, 0:3] = 1.0  # the stamp on class 0
        path = folder / f"img <{i}> & 'q'.png"
        Image.fromarray((image * 255).astype(np.uint8)).save(path)
        paths.append(str(path))
    return paths


def _relevance(cue: bool, rng) -> np.ndarray:
    """Per row: in the cue model class 0 puts most relevance on the stamp and class 2 all over the
    background (the boats-by-water case); everything else is on the object."""
    n = len(CLASSES) * PER_CLASS
    relevance = rng.normal(0, 0.002, (n, SIZE, SIZE)).astype(np.float32)
    relevance[:, 5:11, 5:11] += rng.uniform(0.02, 0.05, (n, 6, 6)).astype(np.float32)
    if cue:
        x0, y0, x1, y1 = SPOT
        relevance[:PER_CLASS, y0:y1, x0:x1] += 0.4
        relevance[2 * PER_CLASS:] += 0.025
    return relevance


def _store(path: Path, paths: list[str], cue: bool, groups=("epsilon_plus", "alpha2_beta1"), failed=(5, 17)) -> str:
    n = len(paths)
    rng = np.random.default_rng(1 if cue else 2)
    config = {"model": {"factory": "tests.models:model_a" if cue else "tests.models:model_b",
                        "weights": "model.pt", "kwargs": {"num_classes": 3}},
              "dataset": {"source": "manifest <u>x</u>.parquet", "kind": "manifest"}, "dataset_fingerprint": "same",
              "preprocess": PREPROCESS, "target_mode": "label"}
    settings = {"epsilon_plus": {"composite": "epsilon_plus"}, "alpha2_beta1": {"composite": "alpha_beta", "alpha": 2,
                                                                               "beta": 1}}
    store = RelevanceStore.create(str(path), config=config, class_names=CLASSES,
                                  groups={g: settings[g] for g in groups}, n_rows=n, height=SIZE, width=SIZE,
                                  rows_per_shard=PER_CLASS, max_boxes=1)
    labels = np.repeat(np.arange(len(CLASSES)), PER_CLASS)
    status = np.full(n, STATUS_OK, np.int8)
    status[list(failed)] = STATUS_FAILED
    errors = np.array(["" if s == STATUS_OK else "cannot decode <script>bad()</script>" for s in status])
    for g in groups:
        relevance = _relevance(cue, rng)
        relevance[status != STATUS_OK] = np.nan
        output = relevance.sum(axis=(1, 2), dtype=np.float64) + rng.normal(0, 0.01, n)
        for start in range(0, n, PER_CLASS):
            rows = slice(start, start + PER_CLASS)
            store.group(g).write_block(
                start, relevance=relevance[rows], output=output[rows], target=labels[rows], label=labels[rows],
                prediction=labels[rows], sample_id=np.arange(n)[rows], path=np.array(paths)[rows],
                error=errors[rows], status=status[rows], boxes=np.tile(np.array(BOX, np.float32), (PER_CLASS, 1, 1)))
    aggregate(str(path))
    return str(path)


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("report")
    paths = _images(root / "images")
    cue = _store(root / "a.zarr", paths, cue=True)
    plain = _store(root / "b.zarr", paths, cue=False, groups=("epsilon_plus",), failed=())
    _evaluation(root / "a.evaluation")  # beside the store: the report picks it up by default
    return Path(render_report(cue, str(root / "report.html"), compare=plain))


def _evaluation(folder: Path) -> None:
    """Perturbation curves as `lrp-audit evaluate` writes them: LRP falls faster than the random order."""
    from pipeline.evaluation import CURVE_SCHEMA

    rng = np.random.default_rng(1)
    rows = [dict(row=r, sample_id=r, path=f"{r}.png", target=0, label=0, prediction=0, method=method, status="ok",
                 error="", curve=list(np.linspace(4, end, 9) + rng.normal(0, 0.05, 9)))
            for r in range(8) for method, end in (("epsilon_plus", 0.0), ("random", 3.5))]
    (folder / "curves").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=CURVE_SCHEMA), folder / "curves" / "shard-000000.parquet")


class _Tags(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.ids, self.images, self.text = [], set(), [], []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append(tag)
        if "id" in attrs:
            self.ids.add(attrs["id"])
        if tag == "img":
            self.images.append(attrs.get("src", ""))

    def handle_data(self, data):
        self.text.append(data)


def _parse(page: str) -> _Tags:
    parser = _Tags()
    parser.feed(page)
    return parser


def test_the_report_is_one_self_contained_file_with_every_section(report):
    page = report.read_text(encoding="utf-8")
    parsed = _parse(page)
    assert {"finding", "summary", "flagged", "classes", "pools", "context", "sweep", "comparison", "failures",
            "evaluation"} <= parsed.ids
    assert "script" not in parsed.tags  # no code at all; the CSP forbids it too
    assert "default-src 'none'" in page
    assert len(parsed.images) >= 20
    for src in parsed.images:  # every picture embedded and a valid PNG
        assert src.startswith("data:image/png;base64,")
        Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).verify()
    assert "http://" not in page and "https://" not in page


def test_the_evaluation_section_shows_the_aopc_table_and_warns_about_another_run(report, tmp_path):
    import json

    from aggregations.report import evaluation

    text = " ".join(_parse(report.read_text(encoding="utf-8")).text)
    section = text.split("Explanation quality: region perturbation (AOPC)", 1)[1]
    assert "epsilon_plus" in section and "random" in section and "AOPC" in section
    expected = evaluation.report_section(str(report.parent / "a.evaluation"))["rows"]
    assert expected[0][0] == "epsilon_plus" and expected[0][1] in section  # the formatted AOPC itself
    assert "made with another" not in section

    other = tmp_path / "other.evaluation"
    _evaluation(other)
    identity = {"weights_digest": "abc", "dataset_fingerprint": "same"}
    (other / "evaluation.json").write_text(json.dumps({"config": identity}))
    warned = evaluation.report_section(str(other), store_config={**identity, "weights_digest": "def"})
    assert "another weights digest than the audited store" in warned["warning"] and warned["rows"]
    (other / "aopc.parquet").write_bytes(b"not parquet")
    broken = evaluation.report_section(str(other))
    assert "could not be read" in broken["warning"] and broken["rows"] == []


def test_the_flagged_cue_class_leads_the_report(report):
    text = " ".join(_parse(report.read_text(encoding="utf-8")).text)
    verdict = text.split("Flagged: class", 1)[1][:60]
    assert EVIL in verdict  # the text content, once the entities are decoded
    assert "cue" in verdict
    x0, y0, x1, y1 = SPOT
    assert f"at x {x0}..{x1 - 1}, y {y0}..{y1 - 1}" in text  # where: exactly the planted spot


def test_a_context_flag_shows_the_images_with_the_most_context(report):
    text = " ".join(_parse(report.read_text(encoding="utf-8")).text)
    flagged = text.split("Flagged classes", 2)[2].split("Per-class average heatmaps")[0]
    assert "#2 dog & <b>bird</b> context" in " ".join(flagged.split())
    assert "of its positive relevance outside the object" in flagged


def test_dataset_strings_are_shown_as_text_never_as_markup(report):
    page = report.read_text(encoding="utf-8")
    for raw in (EVIL, "<b>bird</b>", "<5> & 'q'", "<script>bad()</script>", "<u>x</u>"):
        assert raw not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "dog &amp; &lt;b&gt;bird&lt;/b&gt;" in page
    assert "cannot decode &lt;script&gt;bad()&lt;/script&gt;" in page  # the failed rows and their errors
    assert "img &lt;5&gt; &amp; &#39;q&#39;.png" in page  # a failed row's path


def test_the_cli_writes_the_report_and_prints_the_headline(report, tmp_path, capsys):
    from jobs.report import main

    store = report.parent / "a.zarr"
    out = tmp_path / "cli.html"
    assert main([str(store), "--compare", str(report.parent / "b.zarr"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert str(out) in printed and "top flagged class" in printed and EVIL in printed
    assert out.stat().st_size > 10_000
    assert main([str(tmp_path / "missing.zarr")]) == 2
    assert "no relevance store" in capsys.readouterr().err


def test_a_store_whose_images_are_gone_still_renders(tmp_path):
    paths = [str(tmp_path / f"gone{i}.png") for i in range(len(CLASSES) * PER_CLASS)]
    store = _store(tmp_path / "gone.zarr", paths, cue=True, groups=("epsilon_plus",), failed=())
    page = Path(render_report(store, str(tmp_path / "gone.html"))).read_text(encoding="utf-8")
    parsed = _parse(page)
    assert not {"sweep", "comparison", "evaluation", "spray"} & parsed.ids  # one group, no second store, no
    # evaluation, no SpRAy run
    assert "finding" in parsed.ids and len(parsed.images) >= 5


# ---- the SpRAy section ------------------------------------------------------------------------------------

SPRAY_ROWS = 40  # per class: above SpRAy's minimum of 30


@pytest.fixture(scope="module")
def spray_report(tmp_path_factory) -> Path:
    """Class 0 (named EVIL): every other image carries the stamp and its map looks at it; class 1: the object."""
    from aggregations.spray import RunOptions, SpraySettings, spray

    root = tmp_path_factory.mktemp("spray-report")
    rng = np.random.default_rng(5)
    n = 2 * SPRAY_ROWS
    labels = np.repeat([0, 1], SPRAY_ROWS)
    stamped = (labels == 0) & (np.arange(n) % 2 == 0)
    x0, y0, x1, y1 = SPOT
    paths = []
    for i in range(n):
        image = rng.uniform(0.2, 0.6, (SIZE, SIZE, 3))
        image[5:11, 5:11] = [0.9, 0.3, 0.1]
        if stamped[i]:
            image[y0:y1, x0:x1] = 1.0
        paths.append(str(root / f"s <{i}>.png"))
        Image.fromarray((image * 255).astype(np.uint8)).save(paths[-1])
    relevance = rng.normal(0, 0.01, (n, SIZE, SIZE)).astype(np.float32)
    relevance[~stamped, 5:11, 5:11] += 0.05
    relevance[stamped, y0:y1, x0:x1] += 0.3
    relevance *= rng.uniform(0.5, 2.0, (n, 1, 1)).astype(np.float32)
    store = RelevanceStore.create(str(root / "s.zarr"), config={"preprocess": PREPROCESS}, class_names=CLASSES[:2],
                                  groups=["epsilon_plus"], n_rows=n, height=SIZE, width=SIZE, rows_per_shard=20,
                                  max_boxes=1)
    for start in range(0, n, 20):
        rows = slice(start, start + 20)
        store.group("epsilon_plus").write_block(
            start, relevance=relevance[rows], output=relevance[rows].sum(axis=(1, 2), dtype=np.float64),
            target=labels[rows], label=labels[rows], prediction=labels[rows], sample_id=np.arange(n)[rows],
            path=np.array(paths)[rows], boxes=np.tile(np.array(BOX, np.float32), (20, 1, 1)))
    aggregate(str(root / "s.zarr"))
    spray(str(root / "s.zarr"), settings=SpraySettings(embedding="tsne"), options=RunOptions(progress=False))
    return Path(render_report(str(root / "s.zarr"), str(root / "spray.html")))


def test_the_spray_section_shows_each_strategy_flagged_class_first(spray_report):
    page = spray_report.read_text(encoding="utf-8")
    parsed = _parse(page)
    assert "spray" in parsed.ids
    text = " ".join(" ".join(parsed.text).split())
    section = text.split("Prediction strategies per class (SpRAy)", 1)[1].split("Region pools", 1)[0]
    assert section.index(f"#1 {EVIL} · 2 clusters strategy flagged") < section.index(f"#2 {CLASSES[1]} · 1 cluster")
    assert "of its positive relevance lies in x" in section and "outside the object boxes" in section
    # the cluster table of the stamped class: two clusters of 20 rows, 50% each
    first = section.split(f"#2 {CLASSES[1]}", 1)[0]
    assert first.count(" 20 50% ") == 2
    assert EVIL not in page and "s <3>.png" not in page  # class names and paths are text
    # eigenvalues, embedding, 2 + 1 cluster means, 4 prototypes per cluster
    alts = _alts(page)
    assert len([a for a in alts if a.startswith("eigenvalues")]) == 2
    embeddings = [a for a in alts if a.startswith("2-D embedding")]
    assert embeddings == [f"2-D embedding of {n} by cluster" for n in CLASSES[:2]]
    assert len([a for a in alts if a.startswith("mean heatmap of cluster")]) == 3
    assert len([a for a in alts if a.startswith("prototype")]) == 12
    for src in parsed.images:
        Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).verify()


def _alts(page: str) -> list[str]:
    class Alts(HTMLParser):
        def __init__(self):
            super().__init__()
            self.alts = []

        def handle_starttag(self, tag, attrs):
            if tag == "img":
                self.alts.append(dict(attrs).get("alt", ""))

    parser = Alts()
    parser.feed(page)
    return parser.alts


def test_a_cluster_mean_spreads_back_over_the_pixels_it_pooled():
    from aggregations.report.spray import to_pixels
    from aggregations.spray.preprocess import sum_pool

    rng = np.random.default_rng(0)
    maps = rng.normal(size=(1, 15, 10))
    pooled = sum_pool(maps, 4)[0]
    pixels = to_pixels(pooled, 15, 10)
    assert pixels.shape == (15, 10)
    np.testing.assert_allclose(sum_pool(pixels[None], 4)[0], pooled)  # each cell keeps its sum


# ---- a real browser --------------------------------------------------------------------------------------

CHROMIUM_FLAGS = ["--no-sandbox", "--headless", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"]


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return name
    if os.environ.get("CI"):
        pytest.fail("no chromium on PATH in CI: .ci/run must install it")
    pytest.skip("no chromium on PATH (CI installs it: .ci/run; locally: apt-get install chromium)")


class DevTools:
    """Chromium driven over the DevTools protocol on a pipe (``--remote-debugging-pipe``: fds 3 and 4).

    A page can fail without a console message (a broken image) or with one that only DevTools sees
    (a CSP violation is a Log entry), so the test listens to Runtime and Log events and asks the DOM.
    Standard library only: no websocket client needed.
    """

    def __init__(self, browser: str, profile: Path):
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()
        # move the browser's ends above 9, so the shell's "3<&N 4>&M" never clobbers them
        ends = [fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (to_browser_r, from_browser_w)]
        os.close(to_browser_r), os.close(from_browser_w)
        command = " ".join([f"exec {browser}", *CHROMIUM_FLAGS, f"'--user-data-dir={profile}'",
                            "--remote-debugging-pipe about:blank",
                            f"3<&{ends[0]} 4>&{ends[1]} {ends[0]}<&- {ends[1]}>&-"])
        self.process = subprocess.Popen(["bash", "-c", command], pass_fds=ends, stdin=subprocess.DEVNULL,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for fd in ends:
            os.close(fd)
        self._buffer, self._id, self.events = b"", 0, []

    def _read(self, deadline: float) -> dict:
        while b"\0" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("chromium did not answer in time")
            if select.select([self._from_browser], [], [], remaining)[0]:
                chunk = os.read(self._from_browser, 1 << 20)
                if not chunk:
                    raise RuntimeError("chromium closed the DevTools pipe (did it start?)")
                self._buffer += chunk
        message, _, self._buffer = self._buffer.partition(b"\0")
        return json.loads(message)

    def send(self, method: str, params: dict | None = None, session: str | None = None, timeout: float = 30) -> dict:
        self._id += 1
        message = {"id": self._id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read(deadline)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]
            self.events.append(reply)

    def wait_for(self, method: str, timeout: float = 30) -> dict:
        deadline = time.monotonic() + timeout
        while not any(event.get("method") == method for event in self.events):
            self.events.append(self._read(deadline))
        return next(event for event in self.events if event.get("method") == method)

    def close(self):
        try:
            self.send("Browser.close", timeout=5)
        except (RuntimeError, TimeoutError, OSError):
            pass
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
        os.close(self._to_browser), os.close(self._from_browser)


def load_in_chromium(page: Path, profile: Path) -> dict:
    """Open ``page``; return its console errors, exceptions, error log entries, images and visible text."""
    browser = DevTools(_chromium(), profile)
    try:
        target = browser.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = browser.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            browser.send(f"{domain}.enable", session=session)
        browser.send("Page.navigate", {"url": page.resolve().as_uri()}, session=session)
        browser.wait_for("Page.loadEventFired")
        probe = """JSON.stringify({
            images: Array.from(document.images).map(i => ({ok: i.complete && i.naturalWidth > 0, alt: i.alt})),
            scripts: document.scripts.length,
            text: document.body.innerText})"""
        state = json.loads(browser.send("Runtime.evaluate", {"expression": probe, "returnByValue": True},
                                        session=session)["result"]["value"])
        time.sleep(0.3)  # late events (e.g. a CSP report) arrive after load
        browser.send("Runtime.evaluate", {"expression": "1"}, session=session)
    finally:
        browser.close()
    problems = []
    for event in browser.events:
        method, params = event.get("method"), event.get("params", {})
        if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert", "warning"):
            problems.append(f"console.{params['type']}: {params.get('args')}")
        elif method == "Runtime.exceptionThrown":
            problems.append(f"exception: {params.get('exceptionDetails', {}).get('text')}")
        elif method == "Log.entryAdded" and params.get("entry", {}).get("level") in ("error", "warning"):
            problems.append(f"log {params['entry'].get('source')}: {params['entry'].get('text')}")
    return {"problems": problems, **state}


def screenshot(page: Path, out: Path, profile: Path, size=(1280, 1600)) -> Path:
    subprocess.run([_chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--hide-scrollbars",
                    f"--window-size={size[0]},{size[1]}", f"--screenshot={out}", page.resolve().as_uri()],
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120, check=True)
    return out


def test_the_browser_check_catches_a_broken_page(tmp_path):
    """The control: errors of every kind the report could have are seen, so a clean result means something."""
    bad = tmp_path / "bad.html"
    bad.write_text("""<!DOCTYPE html><html><head><meta http-equiv="Content-Security-Policy"
        content="default-src 'none'; img-src data:; style-src 'unsafe-inline'"></head><body>
        <img src="data:image/png;base64,AAAA" alt="broken"><script>alert(1)</script></body></html>""")
    state = load_in_chromium(bad, tmp_path / "profile")
    assert any("Content Security Policy" in p for p in state["problems"])  # the injected script was blocked
    assert [image["ok"] for image in state["images"]] == [False]

    noisy = tmp_path / "noisy.html"
    noisy.write_text("<!DOCTYPE html><html><body><script>console.error('boom'); undefinedFunction();</script>"
                     "</body></html>")
    problems = load_in_chromium(noisy, tmp_path / "profile2")["problems"]
    assert any("boom" in p for p in problems) and any("exception" in p for p in problems)


def test_the_spray_section_loads_cleanly_in_headless_chromium(spray_report, tmp_path):
    state = load_in_chromium(spray_report, tmp_path / "profile")
    assert state["problems"] == [] and state["scripts"] == 0
    assert all(image["ok"] for image in state["images"])
    assert sum(image["alt"].startswith("prototype") for image in state["images"]) == 12
    assert f"#1 {EVIL} · 2 clusters" in state["text"]


def test_the_report_loads_cleanly_in_headless_chromium(report, tmp_path):
    state = load_in_chromium(report, tmp_path / "profile")
    assert state["problems"] == []
    assert len(state["images"]) >= 20 and all(image["ok"] for image in state["images"])
    assert state["scripts"] == 0
    assert f"Flagged: class {EVIL}" in state["text"]  # the evil class name is visible as plain text
    assert "dog & <b>bird</b>" in state["text"]

    shot = screenshot(report, tmp_path / "report.png", tmp_path / "profile-shot")
    pixels = np.asarray(Image.open(shot).convert("RGB"), dtype=np.int16)
    assert pixels.shape[:2] == (1600, 1280)
    reddish = (pixels[..., 0] > 150) & (pixels[..., 1] < 90) & (pixels[..., 2] < 90)
    assert reddish.sum() > 500  # the red headline frame and the red hot spot are on screen
    keep = os.environ.get("LRP_AUDIT_SCREENSHOTS")  # e.g. CI artifacts: keep the screenshot to look at
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(keep) / "report.png")
