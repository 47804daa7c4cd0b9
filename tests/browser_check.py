"""An explorer in a real browser: opt-in, outside CI and outside pytest's collection (``make browser-check``).

    .venv/bin/python tests/browser_check.py [--screenshot docs/img/explorer_browser_check.png] [--port 8899]

Serves JupyterLab on 127.0.0.1 from a temporary folder holding one notebook, which builds the tiny model and
``explore.detections`` on the synthetic suite's validation scenes; opens the notebook in headless Chromium (selenium
and chromedriver), runs all its cells from the Run menu, and checks, in the page:

1. the explorer's figure and status line appear;
2. typing class names into its text box (one never seen in training) and pressing Enter redraws: the status line
   names the new classes and the figure's image changes;
3. the proposals toggle redraws again;

then saves a screenshot of the page. Exit status 0 when every check passed.

Needs Debian's ``chromium`` and ``chromium-driver`` (``apt-get install chromium chromium-driver``) and the project's
``browser`` extra (``pip install -e ".[browser]"``: selenium). JupyterLab and ipywidgets are core dependencies.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
NEW_CLASSES = "circle, hexagon, zebra"

NOTEBOOK_CELLS = [
    "%matplotlib inline\n"
    "import json\n\n"
    "import torch\n\n"
    "from uniperceiver_v2 import api\n"
    "from uniperceiver_v2.config import get_preset\n"
    "from uniperceiver_v2.engine.data_setup import ensure_data\n"
    "from uniperceiver_v2.viz import explore\n\n"
    "torch.set_num_threads(1)\n"
    "_ = torch.manual_seed(0)",
    "cfg = get_preset('tiny')\n"
    "cfg.data.root = {data_root!r}\n"
    "ensure_data(cfg)\n"
    "captions = json.loads(cfg.data.path(cfg.data.caption_annotations, 'train').read_text())\n"
    "model = api.build_model(cfg, vocabulary_texts=[a['caption'] for a in captions['annotations']])",
    "explore.detections(model, explore.split_images(cfg, ['val'], limit=6), ['circle', 'square', 'triangle'])",
]


def write_notebook(folder: Path, data_root: Path) -> Path:
    cells = [{"cell_type": "code", "execution_count": None, "id": f"cell-{i}", "metadata": {}, "outputs": [],
              "source": source.format(data_root=str(data_root))} for i, source in enumerate(NOTEBOOK_CELLS)]
    notebook = {"cells": cells, "nbformat": 4, "nbformat_minor": 5,
                "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}}}
    path = folder / "explorer_check.ipynb"
    path.write_text(json.dumps(notebook, indent=1))
    return path


def start_lab(folder: Path, port: int, token: str) -> subprocess.Popen:
    """JupyterLab on 127.0.0.1:port serving ``folder``, with its settings and workspaces inside ``folder`` (no news
    pop-up, nothing written to the user's JupyterLab state)."""
    settings = folder / ".settings" / "@jupyterlab" / "apputils-extension"
    settings.mkdir(parents=True)
    (settings / "notification.jupyterlab-settings").write_text(
        json.dumps({"fetchNews": "false", "checkForUpdates": False}))
    env = dict(os.environ, JUPYTERLAB_SETTINGS_DIR=str(folder / ".settings"),
               JUPYTERLAB_WORKSPACES_DIR=str(folder / ".workspaces"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--ServerApp.ip=127.0.0.1",
               f"--ServerApp.port={port}", "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}",
               f"--ServerApp.root_dir={folder}"]
    if os.geteuid() == 0:            # containers: JupyterLab refuses root without being told
        command.append("--allow-root")
    log = open(folder / "jupyterlab.log", "w")
    server = subprocess.Popen(command, cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 60
    while time.time() < deadline:
        if server.poll() is not None:
            tail = (folder / "jupyterlab.log").read_text().splitlines()[-15:]
            raise RuntimeError(f"JupyterLab exited with {server.returncode}:\n" + "\n".join(tail))
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/status?token={token}", timeout=2):
                return server
        except OSError:
            time.sleep(0.5)
    server.terminate()
    raise RuntimeError(f"JupyterLab did not answer on port {port} within 60 s")


def chromium(width: int = 1400, height: int = 1150):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     f"--window-size={width},{height}"):
        options.add_argument(argument)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


def check(driver, url: str, screenshot: Path) -> list[tuple[str, bool, str]]:
    """Drive the notebook; returns (check, passed, detail) rows."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as ready
    from selenium.webdriver.support.ui import WebDriverWait

    def wait(seconds: float, condition):
        return WebDriverWait(driver, seconds, poll_frequency=0.2).until(condition)

    def status() -> str:
        return driver.find_element(By.CSS_SELECTOR, ".explorer-status").text

    def figure() -> str:
        return driver.find_element(By.CSS_SELECTOR, "img.explorer-figure").get_attribute("src") or ""

    rows = []
    driver.get(url)
    wait(90, ready.presence_of_element_located((By.CSS_SELECTOR, ".jp-Notebook .jp-Cell")))
    # the kernel started ("Idle" in the status bar): a Run All sent earlier can be lost while the kernel starts
    wait(120, lambda d: d.find_elements(By.XPATH, "//*[contains(@class, 'jp-StatusBar')]//*[contains(text(), 'Idle')]"))
    run_menu = wait(30, ready.element_to_be_clickable(
        (By.XPATH, "//div[contains(@class, 'lm-MenuBar-itemLabel') and text()='Run']")))
    run_menu.click()
    wait(10, ready.element_to_be_clickable(
        (By.CSS_SELECTOR, "li.lm-Menu-item[data-command='runmenu:run-all']"))).click()

    started = time.time()
    try:
        wait(240, lambda d: (d.find_elements(By.CSS_SELECTOR, ".explorer-status") and "detection(s)" in status())
             or d.find_elements(By.CSS_SELECTOR, "[data-mime-type='application/vnd.jupyter.stderr']"))
    except TimeoutException:
        pass
    if not driver.find_elements(By.CSS_SELECTOR, ".explorer-status"):
        failure = screenshot.with_name("explorer_browser_check_failure.png")
        driver.save_screenshot(str(failure))
        outputs = [element.text for element in driver.find_elements(By.CSS_SELECTOR, ".jp-OutputArea-output")]
        return [("explorer drawn", False, f"no explorer after {time.time() - started:.0f} s; page: {failure}; "
                                          f"outputs: {outputs}")]
    first = figure()
    rows.append(("explorer drawn", first.startswith(("blob:", "data:image/png")),
                 f"{time.time() - started:.1f} s after Run All; status: {status()}"))

    box = driver.find_element(By.CSS_SELECTOR, ".widget-text input")
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(NEW_CLASSES, Keys.ENTER)
    typed = time.time()
    try:
        wait(30, lambda d: "zebra" in status() and figure() != first)
        passed = True
    except TimeoutException:
        passed = False
    rows.append(("class names typed: status and figure follow", passed,
                 f"{time.time() - typed:.2f} s in the browser; status: {status()}"))

    second = figure()
    toggle = driver.find_element(By.XPATH, "//button[contains(@class, 'widget-toggle-button') and "
                                           "normalize-space()='proposals']")
    toggle.click()
    clicked = time.time()
    try:
        wait(30, lambda d: figure() != second and "proposals shown" in status())
        passed = True
    except TimeoutException:
        passed = False
    rows.append(("proposals toggled: figure follows", passed,
                 f"{time.time() - clicked:.2f} s in the browser; status: {status()}"))

    explorer = driver.find_element(By.CSS_SELECTOR, "img.explorer-figure")
    driver.execute_script("arguments[0].scrollIntoView({block: 'end'});", explorer)
    time.sleep(0.5)
    screenshot.parent.mkdir(parents=True, exist_ok=True)
    with Image.open(io.BytesIO(driver.get_screenshot_as_png())) as page:      # 256 colours: a third of the bytes
        page.convert("RGB").quantize(colors=256).save(screenshot, optimize=True)
    rows.append(("screenshot saved", screenshot.is_file(), str(screenshot)))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--screenshot", type=Path, default=ROOT / "docs" / "img" / "explorer_browser_check.png")
    parser.add_argument("--port", type=int, default=8899)
    parser.add_argument("--data", type=Path, default=ROOT / "data" / "synthetic")
    args = parser.parse_args(argv)
    for program in (CHROMIUM, CHROMEDRIVER):
        if not Path(program).exists():
            print(f"{program} not found: apt-get install chromium chromium-driver")
            return 2
    token = secrets.token_hex(16)
    with tempfile.TemporaryDirectory(prefix="explorer-check-") as folder:
        folder = Path(folder)
        write_notebook(folder, args.data.resolve())
        server = start_lab(folder, args.port, token)
        driver = None
        try:
            driver = chromium()
            url = f"http://127.0.0.1:{args.port}/lab/tree/explorer_check.ipynb?token={token}"
            rows = check(driver, url, args.screenshot.resolve())
        finally:
            if driver is not None:
                driver.quit()
            server.terminate()
            server.wait(timeout=30)
    for name, passed, detail in rows:
        print(f"{'PASS' if passed else 'FAIL'}  {name}: {detail}")
    return 0 if all(passed for _, passed, _ in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
