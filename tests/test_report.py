"""`sweep report`: one self-contained HTML file that a real browser renders with every image."""

import json
import re
import shutil
import subprocess

from click.testing import CliRunner

from sweep.cli import main

BROWSER_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--virtual-time-budget=5000"]


def fake_experiment(tmp_path, reviews_file):
    """An experiment folder as Tune lays it out, from two real `sweep train` runs."""
    storage = tmp_path / "results"
    experiment = storage / "exp"
    for index, lr in enumerate(("3e-3", "1e-5")):
        run = tmp_path / f"run{index}"
        result = CliRunner().invoke(main, ["train", str(reviews_file), "--tokenizer", "bytes", "--heads", "2", "--d-model", "16",
                                           "--seq-len", "16", "--batch-size", "8", "--max-tokens", "1024", "--eval-every-tokens", "512",
                                           "--lr", lr, "--out", str(run)])
        assert result.exit_code == 0, result.output
        trial = experiment / f"trial_t{index}"
        shutil.copytree(run / "checkpoint", trial / "checkpoint_000001")
        lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        config = {"lr": float(lr), "heads": 2, "d_model": 16, "seq_len": 16, "layers": 1, "mlp": False}
        (trial / "result.json").write_text("".join(
            json.dumps(line | {"training_iteration": i + 1, "trial_id": f"t{index}", "config": config, "done": i == len(lines) - 1}) + "\n"
            for i, line in enumerate(lines)))
    (experiment / "sweep.json").write_text(json.dumps({"metric": "test_loss", "mode": "min", "trials": 2, "created": "2026-01-01"}))
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
    assert len(images) == 1 + 2  # loss curves + one layer grid per top trial
    dom = subprocess.run([shutil.which("chromium") or "chromium", *BROWSER_FLAGS, "--dump-dom", out.as_uri()],
                         capture_output=True, text=True, timeout=120).stdout
    body = re.search(r"<body[^>]*>", dom).group(0)
    assert f'data-images="{len(images)}"' in body and f'data-images-loaded="{len(images)}"' in body


def test_report_of_unknown_experiment(tmp_path):
    result = CliRunner().invoke(main, ["report", "ghost", "--storage", str(tmp_path), "--out", str(tmp_path / "r.html")])
    assert result.exit_code == 2 and "no experiment 'ghost'" in result.stderr
    assert not (tmp_path / "r.html").exists()
