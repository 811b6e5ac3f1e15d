"""`sweep report`: one self-contained HTML file that a real browser renders with every image."""

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

from click.testing import CliRunner

from sweep.cli import main

BROWSER_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--virtual-time-budget=5000",
]


def fake_experiment(tmp_path, reviews_file):
    """An experiment folder as Tune lays it out, from two real `sweep train` runs."""
    storage = tmp_path / "results"
    experiment = storage / "exp"
    for index, lr in enumerate(("3e-3", "1e-5")):
        run = tmp_path / f"run{index}"
        result = CliRunner().invoke(
            main,
            [
                "train",
                str(reviews_file),
                "--tokenizer",
                "bytes",
                "--heads",
                "2",
                "--d-model",
                "16",
                "--seq-len",
                "16",
                "--batch-size",
                "8",
                "--max-tokens",
                "1024",
                "--eval-every-tokens",
                "512",
                "--lr",
                lr,
                "--out",
                str(run),
            ],
        )
        assert result.exit_code == 0, result.output
        trial = experiment / f"trial_t{index}"
        shutil.copytree(run / "checkpoint", trial / "checkpoint_000001")
        lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        config = {"lr": float(lr), "heads": 2, "d_model": 16, "seq_len": 16, "layers": 1, "mlp": False, "batch_size": 8,
                  "max_tokens": 1024, "eval_every_tokens": 512, "tokenizer": "bytes"}
        (trial / "result.json").write_text(
            "".join(
                json.dumps(
                    line
                    | {
                        "training_iteration": i + 1,
                        "trial_id": f"t{index}",
                        "config": config,
                        "done": i == len(lines) - 1,
                    }
                )
                + "\n"
                for i, line in enumerate(lines)
            )
        )
    (experiment / "sweep.json").write_text(
        json.dumps({"metric": "test_loss", "mode": "min", "trials": 2, "created": "2026-01-01"})
    )
    return storage


def test_report_is_self_contained_and_renders_in_chromium(tmp_path, reviews_file):
    storage = fake_experiment(tmp_path, reviews_file)
    out = tmp_path / "report.html"
    result = CliRunner().invoke(main, ["report", "exp", "--storage", str(storage), "--out", str(out), "--top", "2"])
    assert result.exit_code == 0, result.output
    page = out.read_text()
    assert "t0" in page and "Head atlas" in page and "Leaderboard" in page
    assert not re.search(r"""(src|href)=["']https?://""", page)  # nothing fetched from the network
    images = re.findall(r'<img [^>]*src="data:image/png;base64,', page)
    # grid, effects, dynamics; per top trial: ablation bars and one layer grid
    assert len(images) == 3 + 2 * 2
    # one seed a grid point: the effects section gives estimates and says why there are no intervals
    assert "What changes the circuit" in page and "fewer than 3 seeds per grid point" in page
    dom = subprocess.run([shutil.which("chromium") or "chromium", *BROWSER_FLAGS, "--dump-dom", out.as_uri()],
                         capture_output=True, text=True, timeout=120).stdout
    body = re.search(r"<body[^>]*>", dom).group(0)
    assert f'data-images="{len(images)}"' in body and f'data-images-loaded="{len(images)}"' in body


def test_report_of_unknown_experiment(tmp_path):
    result = CliRunner().invoke(
        main, ["report", "ghost", "--storage", str(tmp_path), "--out", str(tmp_path / "r.html")]
    )
    assert result.exit_code == 2 and "no experiment 'ghost'" in result.stderr
    assert not (tmp_path / "r.html").exists()


def open_in_chromium(page: Path, screenshot: Path):
    """Drive Debian's headless Chromium with Selenium; return the driver (the caller quits it)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = shutil.which("chromium")
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--window-size=1300,2400",
        "--disable-dev-shm-usage",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    driver.get(page.as_uri())
    return driver


def test_report_in_a_real_browser(tmp_path, reviews_file):
    """Every image decodes, the attention viewer answers a click, no console errors (screenshot kept for a look)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    storage = fake_experiment(tmp_path, reviews_file)
    out = tmp_path / "report.html"
    assert (
        CliRunner()
        .invoke(main, ["report", "exp", "--storage", str(storage), "--out", str(out), "--top", "1"])
        .exit_code
        == 0
    )
    driver = open_in_chromium(out, tmp_path / "report.png")
    try:
        WebDriverWait(driver, 60).until(
            lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "1"
        )
        body = driver.find_element(By.TAG_NAME, "body")
        images = int(body.get_attribute("data-images"))
        assert images >= 4 and int(body.get_attribute("data-images-loaded")) == images
        assert [a.text for a in driver.find_elements(By.CSS_SELECTOR, "nav.toc a")][:4] == [
            "What grew where",
            "What changes the circuit",
            "Dynamics of every trial",
            "Leaderboard",
        ]
        viewer = driver.find_element(By.CSS_SELECTOR, ".viewer")
        readout = viewer.find_element(By.CSS_SELECTOR, ".readout")
        tokens = viewer.find_elements(By.CSS_SELECTOR, ".tok")
        assert len(tokens) > 3
        shading_before = [t.value_of_css_property("background-color") for t in tokens]
        before = readout.text
        tokens[2].click()
        assert viewer.get_attribute("data-query") == "2"
        assert readout.text != before and "position 2" in readout.text
        predicted = re.search(r"the model predicts next: (.*)", readout.text)  # CircuitsVis-style top predictions
        assert predicted and len(predicted.group(1).split(", ")) == 5 and predicted.group(1).endswith("%")
        assert [t.value_of_css_property("background-color") for t in tokens] != shading_before
        clicked = readout.text
        Select(viewer.find_element(By.TAG_NAME, "select")).select_by_index(1)
        assert readout.text != clicked and readout.text.startswith("head 0.1")
        # the head atlas leads with the head and its labels; wide tables keep their first column in view
        atlas = driver.find_element(By.CSS_SELECTOR, ".trial .wide table")
        assert [th.text for th in atlas.find_elements(By.TAG_NAME, "th")][:2] == ["head", "labels"]
        first = atlas.find_element(By.CSS_SELECTOR, "td")
        assert first.value_of_css_property("position") == "sticky" and first.text == "0.0"
        errors = [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]
        assert not errors, errors
        shots = Path(os.environ.get("SWEEP_SCREENSHOT_DIR", tmp_path))
        driver.save_screenshot(str(shots / "report-viewer.png"))
        driver.execute_script("window.scrollTo(0, 0)")
        driver.save_screenshot(str(shots / "report-top.png"))
    finally:
        driver.quit()


def test_atlas_of_an_experiment(tmp_path, reviews_file):
    storage = fake_experiment(tmp_path, reviews_file)
    document = json.loads(CliRunner().invoke(main, ["atlas", "exp", "--storage", str(storage), "--json"]).output)
    assert document["axes"] == ["lr"] and {t["trial_id"] for t in document["trials"]} == {"t0", "t1"}
    by_lr = {entry["value"]: entry for entry in document["groups"]["lr"]}
    assert set(by_lr) == {0.003, 1e-05} and all(entry["trials"] == 1 for entry in by_lr.values())
    trial = next(t for t in document["trials"] if t["trial_id"] == "t0")
    heads = json.loads(next((storage / "exp" / "trial_t0").glob("checkpoint_*/heads.json")).read_text())["heads"]
    assert trial["induction_max"] == max(
        h["scores"]["induction"] for h in heads
    )  # read from the trial's own heads.json
    assert by_lr[0.003]["induction_max"]["mean"] == trial["induction_max"]
    table = CliRunner().invoke(main, ["atlas", "exp", "--storage", str(storage)]).output
    assert "by lr" in table and "t0" in table
    result = CliRunner().invoke(main, ["atlas", "--storage", str(storage), "--csv", str(tmp_path / "atlas.csv")])
    assert result.exit_code == 0 and (tmp_path / "atlas.csv").read_text().startswith("trial_id,lr,status")


def test_a_bare_command_takes_the_newest_experiment_that_has_what_it_needs(tmp_path, reviews_file):
    storage = fake_experiment(tmp_path, reviews_file)
    throwaway = storage / "throwaway"  # launched last, stopped before any trial reported
    throwaway.mkdir()
    (throwaway / "sweep.json").write_text(json.dumps({"metric": "test_loss", "trials": 0, "created": "2026-06-01"}))
    result = CliRunner().invoke(main, ["effects", "--storage", str(storage), "--json"])
    assert result.exit_code == 0, result.output
    assert result.stderr.splitlines()[0] == "experiment exp: the newest with results"
    assert json.loads(result.stdout)["experiment"] == "exp"
    # nothing in the storage has snapshots: one line saying so, naming the newest
    result = CliRunner().invoke(main, ["circuit", "--storage", str(storage)])
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "has snapshots (newest: throwaway)" in result.stderr


def test_token_tables_show_a_token_once_escaped_with_its_whitespace_visible():
    from sweep.report import TEMPLATES

    shown = TEMPLATES.get_template("tokens.html").render(document={
        "frequent_tokens": 2, "direct_path": [{"token": "\\xae", "top": [[" the", 1.97], ["a\nb", 0.5]]}],
        "heads": []})
    assert "<code>&#39;\\xae&#39;</code>" in shown and "\\\\xae" not in shown  # a partial byte reads \xae, not \\xae
    assert "&#39; the&#39;" in shown and "&#39;a\\nb&#39;" in shown
