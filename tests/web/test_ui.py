"""The console in a real headless Chromium against a real `python -m app serve` (see conftest.py)."""
from __future__ import annotations

import io
import json
import os
import shutil
import urllib.request
from pathlib import Path

import pytest
import torch

from .conftest import ADMIN_TOKEN, BASE_NAME, LABELS, PATCH_NAME, TEXT_NAME, submit_one_line_batch, tiny_base

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER),
                                reason="needs the chromium and chromedriver binaries "
                                       "(Debian packages chromium, chromium-driver)")

from PIL import Image  # noqa: E402

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run",
         "--window-size=1280,1000"]
WAIT_S = 120  # a generation on the shared 2-core CPU


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(CHROMEDRIVER))
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


@pytest.fixture
def page(browser, server):
    """The console freshly loaded from `/` (which redirects to /ui/), with the models listed."""
    browser.get(server.url + "/")
    WebDriverWait(browser, 60).until(
        lambda d: d.find_elements(By.CSS_SELECTOR, f'#model option[value="{BASE_NAME}"]'))
    browser.get_log("browser")  # start each test with an empty console log
    return browser


def fill(driver, field_id: str, text: str) -> None:
    box = driver.find_element(By.ID, field_id)
    box.clear()
    box.send_keys(text)


def wait_for_images(driver, count: int) -> list:
    """Wait until `count` result images have decoded, and return them."""
    def loaded(d):
        imgs = d.find_elements(By.CSS_SELECTOR, "#results img")
        if len(imgs) < count or not all(d.execute_script("return arguments[0].complete", i) for i in imgs):
            return False
        return imgs
    return WebDriverWait(driver, WAIT_S).until(loaded, message=f"no {count} decoded image(s) in #results")


def natural_size(driver, img) -> tuple[int, int]:
    return tuple(driver.execute_script("return [arguments[0].naturalWidth, arguments[0].naturalHeight]", img))


def script_errors(driver) -> list[str]:
    """Console errors other than the failed-resource line Chromium logs for every 4xx reply."""
    return [e["message"] for e in driver.get_log("browser")
            if e["level"] == "SEVERE" and "Failed to load resource" not in e["message"]]


def test_redirect_and_form_built_from_models(page, server):
    assert page.current_url == server.url + "/ui/"
    Select(page.find_element(By.ID, "model")).select_by_value(BASE_NAME)
    labels = [o.text for o in Select(page.find_element(By.ID, "class_label")).options]
    assert labels == [f"{i} · {name}" for i, name in enumerate(LABELS)]
    assert page.find_element(By.ID, "label-field").is_displayed()
    assert not page.find_element(By.ID, "caption-field").is_displayed()
    assert page.find_element(By.ID, "steps").get_attribute("placeholder") == "2"  # the base's default_steps
    patches = [o.get_attribute("value") for o in Select(page.find_element(By.ID, "patch")).options]
    assert patches == ["", PATCH_NAME]
    # Every form control has a label the screen reader can announce.
    for control in page.find_elements(By.CSS_SELECTOR, "#gen-form input, #gen-form select, #gen-form textarea"):
        cid = control.get_attribute("id")
        assert page.find_elements(By.CSS_SELECTOR, f'label[for="{cid}"]'), f"#{cid} has no <label>"


def test_generate_shows_image_with_seed_and_timings(page):
    Select(page.find_element(By.ID, "model")).select_by_value(BASE_NAME)
    Select(page.find_element(By.ID, "class_label")).select_by_value("1")
    fill(page, "seed", "1234")
    fill(page, "num_images", "2")
    page.find_element(By.ID, "generate").click()
    imgs = wait_for_images(page, 2)
    for img in imgs:
        width, height = natural_size(page, img)
        assert width > 0 and height > 0
    assert page.find_element(By.CSS_SELECTOR, '#results dd[data-field="seed"]').text == "1234"
    assert page.find_element(By.CSS_SELECTOR, '#results dd[data-field="prompt"]').text == f"1 · {LABELS[1]}"
    assert page.find_element(By.CSS_SELECTOR, '#results dd[data-field="sample"]').text.endswith("ms")
    assert not page.find_element(By.ID, "error").is_displayed()
    assert script_errors(page) == []


def test_compare_uses_same_seed_and_patch_changes_image(page):
    Select(page.find_element(By.ID, "model")).select_by_value(BASE_NAME)
    Select(page.find_element(By.ID, "patch")).select_by_value(PATCH_NAME)
    fill(page, "seed", "")  # the server picks the seed; the patch run must reuse it
    fill(page, "num_images", "1")
    page.find_element(By.ID, "compare").click()
    page.find_element(By.ID, "generate").click()
    base_img, patch_img, diff_img = wait_for_images(page, 3)
    mean = page.find_element(By.CSS_SELECTOR, "#results .diff-mean")
    assert float(mean.get_attribute("data-mean")) > 0 and "mean |Δ|" in mean.text
    assert natural_size(page, diff_img) == natural_size(page, base_img)
    seeds = [dd.text for dd in page.find_elements(By.CSS_SELECTOR, '#results dd[data-field="seed"]')]
    patch_names = [dd.text for dd in page.find_elements(By.CSS_SELECTOR, '#results dd[data-field="patch"]')]
    assert seeds[0] == seeds[1] and seeds[0].isdigit()
    assert patch_names[0] == "base" and patch_names[1].startswith(PATCH_NAME)
    assert base_img.get_attribute("src") != patch_img.get_attribute("src"), "the patch did not change the image"
    assert script_errors(page) == []


@pytest.mark.parametrize("seed", ["-1", "not-a-number"])
def test_bad_seed_shows_the_service_error(page, server, seed):
    status, reply = server.post_json("/generate", {"model": BASE_NAME, "class_label": 0,
                                                   "seed": int(seed) if seed == "-1" else seed})
    assert 400 <= status < 500 and {"error", "error_type"} <= set(reply)
    Select(page.find_element(By.ID, "model")).select_by_value(BASE_NAME)
    fill(page, "seed", seed)
    page.find_element(By.ID, "generate").click()
    error = wait_for_error(page)
    assert error.get_attribute("role") == "alert"
    assert f"{reply['error_type']} (HTTP {status})" in error.text
    assert reply["error"] in error.text
    assert page.find_elements(By.CSS_SELECTOR, "#results img") == []
    assert script_errors(page) == []


def wait_for_error(driver):
    return WebDriverWait(driver, WAIT_S).until(
        lambda d: d.find_element(By.ID, "error") if d.find_element(By.ID, "error").is_displayed() else False,
        message="no error shown")


def test_text_model_takes_a_caption(page):
    Select(page.find_element(By.ID, "model")).select_by_value(TEXT_NAME)
    assert page.find_element(By.ID, "caption-field").is_displayed()
    assert not page.find_element(By.ID, "label-field").is_displayed()
    fill(page, "caption", "a small bright square")
    fill(page, "seed", "5")
    page.find_element(By.ID, "generate").click()
    (img,) = wait_for_images(page, 1)
    assert min(natural_size(page, img)) > 0
    assert page.find_element(By.CSS_SELECTOR, '#results dd[data-field="model"]').text == TEXT_NAME
    assert page.find_element(By.CSS_SELECTOR, '#results dd[data-field="prompt"]').text == "a small bright square"
    assert script_errors(page) == []


def test_empty_caption_shows_the_service_error(page, server):
    status, reply = server.post_json("/generate", {"model": TEXT_NAME, "caption": ""})
    assert 400 <= status < 500 and {"error", "error_type"} <= set(reply)
    Select(page.find_element(By.ID, "model")).select_by_value(TEXT_NAME)
    fill(page, "caption", "")
    page.find_element(By.ID, "generate").click()
    error = wait_for_error(page)
    assert f"{reply['error_type']} (HTTP {status})" in error.text and reply["error"] in error.text
    assert script_errors(page) == []


def test_unparsable_number_is_named_in_the_error(page):
    Select(page.find_element(By.ID, "model")).select_by_value(BASE_NAME)
    fill(page, "steps", "1e")  # Chrome lets this into a number field but reports it as bad input
    page.find_element(By.ID, "generate").click()
    assert "Steps is not a number" in wait_for_error(page).text
    fill(page, "steps", "5000")  # parses, but the service refuses it: its message is shown instead
    page.find_element(By.ID, "generate").click()
    WebDriverWait(page, WAIT_S).until(lambda d: "HTTP 422" in d.find_element(By.ID, "error").text)
    assert "steps" in page.find_element(By.ID, "error").text
    assert script_errors(page) == []


def test_patches_table_lists_the_patch(page):
    rows = WebDriverWait(page, 30).until(
        lambda d: [cells for cells in table_rows(d, "patches-table") if cells[0] == PATCH_NAME])
    cells = rows[0][:6]
    assert cells[0:2] == [PATCH_NAME, BASE_NAME]
    assert cells[2]  # a version string
    assert cells[3:5] == ["ready", "class"]
    assert cells[5] == "test"


def start_compare(page, seed: str, images: str, seeds: str, class_label: str = "0") -> None:
    """Compare base and patch for `seeds` seeds from `seed`, `images` images each."""
    Select(page.find_element(By.ID, "model")).select_by_value(BASE_NAME)
    Select(page.find_element(By.ID, "class_label")).select_by_value(class_label)
    Select(page.find_element(By.ID, "patch")).select_by_value(PATCH_NAME)
    fill(page, "seed", seed)
    fill(page, "num_images", images)
    fill(page, "compare_seeds", seeds)
    page.find_element(By.ID, "compare").click()
    page.find_element(By.ID, "generate").click()


def test_compare_up_to_four_seeds(page):
    start_compare(page, "40", "1", "3")
    wait_for_images(page, 9)
    seeds = [dd.text for dd in page.find_elements(By.CSS_SELECTOR, '#results dd[data-field="seed"]')]
    assert seeds == ["40", "40", "41", "41", "42", "42"]
    assert len(page.find_elements(By.CSS_SELECTOR, "#results .diff-mean")) == 3
    fill(page, "compare_seeds", "5")
    page.find_element(By.ID, "generate").click()
    assert "Seeds to compare must be 1 to 4" in wait_for_error(page).text
    assert script_errors(page) == []


def set_range(driver, field_id: str, value: float) -> None:
    """Move a slider as a user does: the value, then the input event its label follows."""
    driver.execute_script("arguments[0].value = arguments[1];"
                          "arguments[0].dispatchEvent(new Event('input', {bubbles: true}))",
                          driver.find_element(By.ID, field_id), str(value))


def patch_fields(driver) -> list[str]:
    """The result cards' patch lines, read in one script (the results are replaced when a run ends)."""
    return driver.execute_script("return [...document.querySelectorAll('#results dd[data-field=\"patch\"]')]"
                                 ".map((e) => e.textContent)")


def result_b64(driver) -> list[str]:
    return [img.get_attribute("src").split(",", 1)[1] for img in
            driver.find_elements(By.CSS_SELECTOR, "#results .result:not(.diff) img")]


def test_strength_slider_and_mix_of_two_patches_in_compare(page, server, tmp_path):
    """Strength 0 makes the patch card the base's bytes; a mix sends both patches with their strengths and shows
    exactly what POST /generate answers for that composition."""
    start_compare(page, "7", "1", "1", class_label="1")
    wait_for_images(page, 3)
    base_b64, patch_b64 = result_b64(page)
    assert base_b64 != patch_b64
    set_range(page, "patch_scale", 0)
    assert page.find_element(By.ID, "patch_scale_value").text == "0.0"
    page.find_element(By.ID, "generate").click()
    WebDriverWait(page, WAIT_S).until(lambda d: "×0" in "".join(patch_fields(d)[1:2]))
    wait_for_images(page, 3)
    base_again, zero = result_b64(page)
    assert zero == base_again == base_b64
    assert float(page.find_element(By.CSS_SELECTOR, "#results .diff-mean").get_attribute("data-mean")) == 0

    assert server.put_patch("ui-mix", patch_file(tmp_path, seed=31).read_bytes()) == 201
    try:
        page.find_element(By.ID, "refresh").click()
        WebDriverWait(page, 30).until(lambda d: d.find_elements(By.CSS_SELECTOR, '#mix_patch option[value="ui-mix"]'))
        Select(page.find_element(By.ID, "class_label")).select_by_value("1")  # the refresh rebuilt the form
        Select(page.find_element(By.ID, "mix_patch")).select_by_value("ui-mix")
        set_range(page, "patch_scale", 0.5)
        set_range(page, "mix_scale", -1.5)
        page.find_element(By.ID, "generate").click()
        WebDriverWait(page, WAIT_S).until(lambda d: "ui-mix" in "".join(patch_fields(d)[1:2]))
        wait_for_images(page, 3)
        shown = patch_fields(page)[1]
        assert shown.startswith(PATCH_NAME) and "×0.5" in shown and "ui-mix" in shown and "×-1.5" in shown
        status, want = server.post_json("/generate", {
            "model": BASE_NAME, "class_label": 1, "seed": 7, "num_images": 1,
            "patches": [{"name": PATCH_NAME, "scale": 0.5}, {"name": "ui-mix", "scale": -1.5}]})
        assert status == 200
        assert result_b64(page)[1] == want["images"][0] != base_b64
        assert script_errors(page) == []
    finally:
        req = urllib.request.Request(server.url + "/patches/ui-mix", method="DELETE",
                                     headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
        urllib.request.urlopen(req, timeout=60).close()


def test_gate_heatmap_and_lines_for_the_selected_patch(page, server):
    Select(page.find_element(By.ID, "model")).select_by_value(BASE_NAME)
    Select(page.find_element(By.ID, "class_label")).select_by_value("2")
    Select(page.find_element(By.ID, "patch")).select_by_value(PATCH_NAME)
    img = WebDriverWait(page, WAIT_S).until(
        lambda d: d.find_element(By.ID, "gates-img") if d.find_element(By.ID, "gates-img").is_displayed()
        and d.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0",
                             d.find_element(By.ID, "gates-img")) else False, message="no gate heatmap")
    assert "class_label=2" in img.get_attribute("src")
    status, png = server.get(f"/patches/{PATCH_NAME}/gates.png?timesteps=50&class_label=2")
    assert status == 200
    served = Image.open(io.BytesIO(png)).size
    assert natural_size(page, img) == served
    status, body = server.get(f"/patches/{PATCH_NAME}/gates?timesteps=50&class_label=2")
    blocks = json.loads(body)["blocks"]
    charts = page.find_elements(By.CSS_SELECTOR, "#gates-lines svg")
    assert len(charts) == blocks
    assert len(charts[0].find_elements(By.TAG_NAME, "polyline")) == min(3, json.loads(body)["prompts"])
    assert "block 0" in charts[0].text
    assert script_errors(page) == []


def test_generation_streams_progress_then_the_image(page):
    Select(page.find_element(By.ID, "model")).select_by_value(BASE_NAME)
    fill(page, "steps", "8")
    fill(page, "seed", "3")
    page.execute_script("""
        window.seen = [];
        new MutationObserver((records) => records.forEach((r) => r.addedNodes.forEach(
            (n) => window.seen.push(n.textContent)))).observe(document.getElementById('progress-text'),
            {childList: true});
        window.previews = [];
        new MutationObserver(() => window.previews.push(document.getElementById('preview').src))
            .observe(document.getElementById('preview'), {attributes: true, attributeFilter: ['src']});""")
    page.find_element(By.ID, "generate").click()
    wait_for_images(page, 1)
    seen = page.execute_script("return window.seen")
    steps = [s.split("step ")[1] for s in seen if "step " in s]
    assert any("queued" in s for s in seen), seen
    assert steps and steps[-1] == "8/8", seen
    assert [int(s.split("/")[0]) for s in steps] == sorted(int(s.split("/")[0]) for s in steps)
    previews = [p for p in page.execute_script("return window.previews") if p.startswith("data:image/png")]
    assert previews, "no preview image shown"
    assert not page.find_element(By.ID, "progress").is_displayed()
    assert script_errors(page) == []


def dropped_disconnected(server) -> float:
    text = server.get("/metrics")[1].decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("dmp_requests_dropped_total{") and 'reason="disconnected"' in line)


def test_cancel_stops_the_work_on_the_server(page, server):
    before = dropped_disconnected(server)
    Select(page.find_element(By.ID, "model")).select_by_value(BASE_NAME)
    fill(page, "steps", "1000")
    fill(page, "num_images", "4")
    page.find_element(By.ID, "generate").click()
    WebDriverWait(page, WAIT_S).until(lambda d: "step " in d.find_element(By.ID, "progress-text").text)
    page.find_element(By.ID, "cancel").click()
    WebDriverWait(page, 30).until(lambda d: "Cancelled" in d.find_element(By.ID, "status").text)
    WebDriverWait(page, 60).until(lambda d: dropped_disconnected(server) > before,
                                  message="the server did not count the request as dropped")
    assert page.find_elements(By.CSS_SELECTOR, "#results img") == []
    assert not page.find_element(By.ID, "error").is_displayed()
    assert script_errors(page) == []


def patch_file(tmp_path, seed: int):
    """A valid patch for the `tiny` base, written to a .safetensors file."""
    from app.model.dmp import new_patch_for, patch_metadata_for, patch_to_bytes

    base = tiny_base(num_classes=len(LABELS))
    torch.manual_seed(seed)
    patch = new_patch_for(base)
    with torch.no_grad():
        for p in patch.parameters():
            p.normal_(0, 0.5)
    path = tmp_path / f"upload-{seed}.safetensors"
    path.write_bytes(patch_to_bytes(patch, **patch_metadata_for(base, BASE_NAME, "uploaded")))
    return path


def table_rows(driver, table: str) -> list[list[str]]:
    """Each row's cell texts, read in one script (the poll may re-render a table between selenium calls, leaving
    stale elements); a cell holding a <progress> reads "value/max"."""
    return driver.execute_script(
        "return [...document.querySelectorAll(`#${arguments[0]} tbody tr`)].map((r) => [...r.cells].map((c) => {"
        "  const bar = c.querySelector('progress');"
        "  return bar ? `${bar.getAttribute('value')}/${bar.getAttribute('max')}` : c.innerText.trim(); }))", table)


def table_names(driver) -> list[str]:
    """The names in the patch table."""
    return [cells[0] for cells in table_rows(driver, "patches-table")]


def test_upload_with_a_wrong_token_shows_the_401_text(page, tmp_path):
    fill(page, "admin_token", "not-the-token")
    fill(page, "upload_name", "wrong-token")
    page.find_element(By.ID, "upload_file").send_keys(str(patch_file(tmp_path, 1)))
    page.find_element(By.ID, "upload").click()
    error = WebDriverWait(page, 60).until(
        lambda d: d.find_element(By.ID, "manage-error") if d.find_element(By.ID, "manage-error").is_displayed()
        else False)
    assert "invalid_token (HTTP 401)" in error.text and "wrong admin token" in error.text
    assert "wrong-token" not in table_names(page)
    assert page.execute_script("return window.localStorage.length + window.sessionStorage.length") == 0
    assert script_errors(page) == []


def test_upload_adds_the_patch_then_history_and_delete(page, tmp_path):
    fill(page, "admin_token", ADMIN_TOKEN)
    fill(page, "upload_name", "uploaded-dmp")
    page.find_element(By.ID, "upload_file").send_keys(str(patch_file(tmp_path, 2)))
    page.find_element(By.ID, "upload").click()
    WebDriverWait(page, 60).until(lambda d: "uploaded-dmp" in table_names(d), message="upload not listed")
    assert "is ready on tiny" in page.find_element(By.ID, "manage-status").text
    assert page.execute_script("return window.localStorage.length + window.sessionStorage.length") == 0
    page.find_element(By.CSS_SELECTOR, '[aria-label="Version history of patch uploaded-dmp"]').click()
    history = WebDriverWait(page, 30).until(
        lambda d: d.find_element(By.ID, "history") if d.find_element(By.ID, "history").is_displayed() else False)
    assert "installed" in history.text and "Versions of uploaded-dmp" in history.text
    page.find_element(By.CSS_SELECTOR, '[aria-label="Delete patch uploaded-dmp (admin)"]').click()
    WebDriverWait(page, 60).until(lambda d: "uploaded-dmp" not in table_names(d), message="delete not shown")
    assert script_errors(page) == []


def test_list_follows_changes_made_elsewhere(page, server, tmp_path):
    assert "elsewhere-dmp" not in table_names(page)
    assert server.put_patch("elsewhere-dmp", patch_file(tmp_path, 3).read_bytes()) == 201
    WebDriverWait(page, 30).until(lambda d: "elsewhere-dmp" in table_names(d), message="poll did not pick it up")
    req = urllib.request.Request(server.url + "/patches/elsewhere-dmp", method="DELETE",
                                 headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    urllib.request.urlopen(req, timeout=30).close()
    WebDriverWait(page, 30).until(lambda d: "elsewhere-dmp" not in table_names(d), message="poll missed the delete")


def test_service_glance_reads_metrics(page, server):
    status, _ = server.post_json("/generate", {"model": BASE_NAME, "class_label": 0, "num_images": 3})
    assert status == 200
    WebDriverWait(page, 30).until(lambda d: "waiting" in d.find_element(By.ID, "glance-queue").text)
    assert page.find_element(By.ID, "glance-queue").text.split()[0].isdigit()
    # images/s needs two scrapes; the p95 comes from dmp_generate_seconds
    WebDriverWait(page, 30).until(lambda d: "images/s" in d.find_element(By.ID, "glance-rate").text)
    assert page.find_element(By.ID, "glance-p95").text.split()[1] == "ms"
    assert script_errors(page) == []


def test_batches_listed_with_progress(page, server):
    batch = submit_one_line_batch(server.url)

    cells = WebDriverWait(page, 60).until(
        lambda d: next((c for c in table_rows(d, "batches-table") if c[0] == batch["id"] and c[1] == "completed"),
                       None))
    assert cells[2] == "1/1"
    assert cells[3] == "1 ok, 0 failed of 1"
    assert script_errors(page) == []


def test_csp_forbids_external_resources(page, server):
    with urllib.request.urlopen(server.url + "/ui/", timeout=30) as resp:
        csp = resp.headers["Content-Security-Policy"]
    assert "default-src 'none'" in csp and "script-src 'self'" in csp and "connect-src 'self'" in csp
    blocked = page.execute_async_script("""
        const done = arguments[arguments.length - 1];
        document.addEventListener('securitypolicyviolation', (e) => done(e.blockedURI), {once: true});
        const img = new Image();
        img.src = 'http://example.invalid/pixel.png';
        setTimeout(() => done(null), 5000);""")
    assert blocked and blocked.startswith("http://example.invalid")
    page.get_log("browser")  # the violation report itself is expected here


SHOT_VIEWS = {"glance": "section[aria-labelledby=glance-title]", "generate": "section[aria-labelledby=gen-title]",
              "result": "section[aria-labelledby=out-title]", "gates": "section[aria-labelledby=gates-title]",
              "patches": "section[aria-labelledby=patches-title]"}


@pytest.mark.parametrize("width", [1280, 375])
def test_screenshots_of_each_view(page, tmp_path_factory, width):
    """Each view at desktop and phone width, saved under a tmp dir (and DMP_CONSOLE_SHOTS when set)."""
    out = tmp_path_factory.mktemp(f"console-{width}")
    keep = os.environ.get("DMP_CONSOLE_SHOTS")
    page.set_window_size(width, 1400)
    try:
        start_compare(page, "11", "2", "2")
        wait_for_images(page, 12)
        WebDriverWait(page, WAIT_S).until(lambda d: d.execute_script(
            "const i = document.getElementById('gates-img'); return i.complete && i.naturalWidth > 0"))
        WebDriverWait(page, 30).until(lambda d: "images/s" in d.find_element(By.ID, "glance-rate").text)
        page.find_element(By.CSS_SELECTOR, f'[aria-label="Version history of patch {PATCH_NAME}"]').click()
        WebDriverWait(page, 30).until(lambda d: d.find_element(By.ID, "history").is_displayed())
        # nothing wider than the window: no sideways scrolling at 375 px
        assert page.execute_script("return document.documentElement.scrollWidth") <= width
        for view, selector in SHOT_VIEWS.items():
            png = page.find_element(By.CSS_SELECTOR, selector).screenshot_as_png
            (out / f"{view}-{width}.png").write_bytes(png)
            if keep:
                Path(keep).mkdir(parents=True, exist_ok=True)
                (Path(keep) / f"{view}-{width}.png").write_bytes(png)
            assert Image.open(io.BytesIO(png)).size[0] <= width
    finally:
        page.set_window_size(1280, 1000)
    assert script_errors(page) == []
