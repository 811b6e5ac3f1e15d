"""The README's circuit figures, as the report draws them: the report opened in headless Chromium, the circuit
graphs of one trial captured as the browser renders them, the effects-over-training figure saved as embedded.

    sweep report induction-demo --out report.html
    .venv/bin/python benchmarks/report_figures.py report.html TRIAL benchmarks/figures
"""
import base64
import shutil
import sys
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By

page, trial, out = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
options = Options()
options.binary_location = shutil.which("chromium")
for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1300,2400", "--disable-dev-shm-usage"):
    options.add_argument(flag)
driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
try:
    driver.get(page.as_uri())
    section = driver.find_element(By.ID, f"trial-{trial}")
    graphs = 'svg[aria-label="circuit graph"]'
    columns = [c for c in section.find_elements(By.CSS_SELECTOR, "div.columns")
               if c.find_elements(By.CSS_SELECTOR, graphs)]
    driver.execute_script("arguments[0].scrollIntoView();", columns[0])
    columns[0].screenshot(str(out / "induction-circuit.png"))

    def save(alt: str, name: str) -> None:
        img = driver.find_element(By.CSS_SELECTOR, f'img[alt="{alt}"]')
        src = img.get_attribute("src")
        (out / name).write_bytes(base64.b64decode(src.split(",", 1)[1]))
    save(f"circuit edges of {trial}", "induction-circuit-effects.png")
    for img in driver.find_elements(By.TAG_NAME, "img"):
        print(img.get_attribute("alt"))
    logs = driver.get_log("browser")
    print("console errors:", [entry for entry in logs if entry["level"] == "SEVERE"])
finally:
    driver.quit()
