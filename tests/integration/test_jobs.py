"""Issue 14: jobs as things to see and manage, on a real 3-node swarm.

Detached jobs outlive the command that submitted them and a kill -9 of the
controller service; ``ipdc jobs``, ``job status|logs|cancel|get`` and the web
dashboard (driven in real headless Chromium) show and manage them. Counts are
checked against tests.helpers.reference_counts, never against IPDC's own code.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ipdc.control.history import DB_NAME, History
from ipdc.kubo import EMPTY_CID
from ipdc.node.cluster import LocalCluster
from ipdc.node.lifecycle import Node
from ipdc.spawn import wait_for
from tests.helpers import REPO, live_runners, read_output, reference_counts, run_cli

#: A map that takes a while per chunk, so a test can act while the job runs.
SLOW_MAP = ("import time\nfrom collections import Counter\n\n"
            "def map_chunk(text):\n    time.sleep({delay})\n    return Counter(text.split()).items()\n")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    with LocalCluster(3, base=tmp_path_factory.mktemp("jobs")) as c:
        yield c


def make_input(path: Path, seed: int, lines: int = 4000) -> bytes:
    rng = random.Random(seed)
    words = [f"w{seed}x{i}" for i in range(300)] + ["the", "IPDC", "ü"]
    data = "".join(" ".join(rng.choice(words) for _ in range(rng.randint(0, 12))) + "\n"
                   for _ in range(lines)).encode()
    path.write_bytes(data)
    return data


def slow_map(tmp_path: Path, delay: float) -> Path:
    path = tmp_path / "SlowMap.py"
    path.write_text(SLOW_MAP.format(delay=delay))
    return path


def history(node: Node) -> History:
    return History(node.home / DB_NAME)


def job_row(node: Node, job_id: str) -> dict[str, Any]:
    row = history(node).job(job_id)
    assert row is not None
    return row


def detach(node: Node, args: list[str]) -> str:
    done = run_cli(["mr", *args, "--detach"], node.home)
    job_id = done.stdout.strip()
    assert len(job_id) == 32 and done.returncode == 0
    return job_id


def maps_done(node: Node, job_id: str) -> int:
    return sum(t["state"] == "done" for t in job_row(node, job_id)["tasks"]["map"])


def test_a_detached_job_outlives_its_command_and_ipdc_jobs_follows_it(cluster: LocalCluster,
                                                                       tmp_path: Path) -> None:
    node = cluster.nodes[0]
    data = make_input(tmp_path / "in.txt", seed=1)
    job_id = detach(node, ["--k", "3", str(tmp_path / "in.txt"), "--map", str(slow_map(tmp_path, 0.4)),
                           "--chunks", "12", "-o", str(tmp_path / "out")])
    # the submitting process has exited (run_cli waited for it); the job goes on in the service

    def listed() -> dict[str, Any]:
        rows = json.loads(run_cli(["jobs", "--json"], node.home).stdout)
        return next(r for r in rows if r["id"] == job_id)

    def in_progress() -> bool:
        row = listed()
        return row["state"] == "running" and 0 < row["progress"].get("map", [0, 0])[0] < 12

    assert wait_for(in_progress, 120, 0.2), listed()
    table = run_cli(["jobs"], node.home).stdout
    assert job_id[:12] in table and "running" in table and "map " in table
    assert wait_for(lambda: listed()["state"] == "succeeded", 180, 0.3), listed()
    assert read_output(tmp_path / "out", 3)[0] == reference_counts(data)
    row = listed()
    assert row["result_cid"] and row["output_dir"] == str(tmp_path / "out")
    assert row["finished_at"] >= row["started_at"] >= row["submitted_at"]


def kill_service_mid_job(node: Node, job_id: str, maps: int) -> None:
    """SIGKILL the node's controller service once ``maps`` map tasks of the job are accepted."""
    assert wait_for(lambda: maps_done(node, job_id) >= maps, 120, 0.05)
    os.kill(node.services["control"].pid() or 0, signal.SIGKILL)
    assert wait_for(lambda: node.services["control"].pid() is None, 10)


def resume_to_success(node: Node, job_id: str) -> dict[str, Any]:
    """Start what is missing (the controller service, which resumes the job); its final row."""
    run_cli(["node", "start"], node.home)
    assert wait_for(lambda: job_row(node, job_id)["state"] in ("succeeded", "failed"), 180, 0.2)
    final = job_row(node, job_id)
    assert final["state"] == "succeeded", final["error"]
    return final


def test_a_kill_9_of_the_controller_service_mid_job_loses_nothing(cluster: LocalCluster,
                                                                  tmp_path: Path) -> None:
    node = cluster.nodes[0]
    data = make_input(tmp_path / "in.txt", seed=2)
    job_id = detach(node, ["--k", "3", str(tmp_path / "in.txt"), "--map", str(slow_map(tmp_path, 0.5)),
                           "--chunks", "18", "-o", str(tmp_path / "out")])
    kill_service_mid_job(node, job_id, maps=3)
    recorded = job_row(node, job_id)["tasks"]["map"]
    before = {t["index"]: t["attempts"] for t in recorded if t["state"] == "done"}
    assert 3 <= len(before) < 18 and job_row(node, job_id)["state"] == "running"

    final = resume_to_success(node, job_id)
    assert read_output(tmp_path / "out", 3)[0] == reference_counts(data)
    after = {t["index"]: t["attempts"] for t in final["tasks"]["map"]}
    for index, attempts in before.items():
        assert after[index] == attempts, f"map task {index} was accepted before the kill, yet ran again"
    assert any(a["state"] == "superseded" for t in final["tasks"]["reduce"] for a in t["attempts"])
    # and from the workers' side: each map task accepted before the kill ran once in the whole swarm
    lines = [line for n in cluster.nodes
             for line in (n.home / "logs" / "agent.log").read_text().splitlines()]
    mark = f"job {job_id}: map task "
    runs = [int(line.split(mark)[1].split()[0]) for line in lines if mark in line]
    assert all(runs.count(index) == 1 for index in before), sorted(runs)


def test_a_resumed_job_adds_again_what_its_killed_service_never_added(cluster: LocalCluster,
                                                                      tmp_path: Path) -> None:
    """A service killed while an inline job's adds ran in the background leaves blocks no
    node holds: here every node's copies are collected before the restart. The resumed job
    must add them again from its files (a pin alone would wait on the swarm for ever)."""
    node = cluster.nodes[0]
    data = make_input(tmp_path / "in.txt", seed=5, lines=2000)
    job_id = detach(node, ["--k", "3", str(tmp_path / "in.txt"), "--map", str(slow_map(tmp_path, 0.5)),
                           "--chunks", "9", "-o", str(tmp_path / "out")])
    kill_service_mid_job(node, job_id, maps=1)
    manifest = job_row(node, job_id)["plan"]["manifest"]
    uploads = {*manifest["code"].values(), *manifest["chunks"]} - {EMPTY_CID}
    for n in cluster.nodes:
        with n.kubo() as kubo:
            kubo.pin_rm(*uploads)
            kubo._post("repo/gc")
            assert not any(kubo.has(c) for c in uploads), "a node still holds the job's uploads"

    resume_to_success(node, job_id)
    assert read_output(tmp_path / "out", 3)[0] == reference_counts(data)
    assert "added its code and input again" in (node.home / "logs" / "control.log").read_text()


def job_cids(row: dict[str, Any]) -> set[str]:
    manifest = row["plan"]["manifest"]
    cids = {*manifest["code"].values(), *manifest["chunks"]}
    cids |= {c for kind in ("map", "reduce") for t in row["tasks"][kind] for c in t["output"]}
    return cids - {EMPTY_CID}


def test_cancel_leaves_no_runner_work_dir_or_pin_anywhere(cluster: LocalCluster, tmp_path: Path) -> None:
    node = cluster.nodes[0]
    make_input(tmp_path / "in.txt", seed=3)
    job_id = detach(node, ["--k", "3", str(tmp_path / "in.txt"), "--map", str(slow_map(tmp_path, 1.0)),
                           "--chunks", "30", "-o", str(tmp_path / "out")])
    spares = sum(n.config.agent.warm_runners for n in cluster.nodes)
    assert wait_for(lambda: maps_done(node, job_id) >= 2 and live_runners(cluster) > spares, 120, 0.05)
    done = run_cli(["job", "cancel", job_id[:10], "--json"], node.home)
    assert json.loads(done.stdout) == {"job_id": job_id, "state": "cancelled"}
    row = job_row(node, job_id)
    assert row["state"] == "cancelled" and row["finished_at"] and not (tmp_path / "out").exists()
    cids = job_cids(row)
    assert cids

    def nothing_left() -> bool:
        for n in cluster.nodes:
            if any(job_id in d.name for d in n.work_dir.iterdir()):
                return False
            with n.kubo() as kubo:
                if cids & kubo.pins():
                    return False
        return live_runners(cluster) == spares

    assert wait_for(nothing_left, 60, 0.2)
    status = json.loads(run_cli(["job", "status", job_id, "--json"], node.home).stdout)
    assert status["state"] == "cancelled"


def test_logs_come_from_every_worker_and_get_works_on_another_node(cluster: LocalCluster,
                                                                  tmp_path: Path) -> None:
    node, other = cluster.nodes[0], cluster.nodes[2]
    data = make_input(tmp_path / "in.txt", seed=4)
    summary = json.loads(run_cli(["mr", "--k", "3", str(tmp_path / "in.txt"), "--json", "-o",
                                  str(tmp_path / "out")], node.home).stdout)
    job_id = summary["job_id"]
    logs = json.loads(run_cli(["job", "logs", job_id, "--json"], node.home).stdout)
    workers = {w["name"] for w in summary["workers"]}
    assert set(logs["workers"]) == workers and logs["missing"] == []
    for name, lines in logs["workers"].items():
        assert lines and all(job_id in line for line in lines), name
        assert any("done" in line for line in lines), name
    assert any(job_id in line for line in logs["controller"])
    text = run_cli(["job", "logs", job_id], node.home).stdout
    assert all(f"== {name} ==" in text for name in workers)

    got = run_cli(["job", "get", job_id, "-o", str(tmp_path / "got"), "--json"], other.home)
    assert json.loads(got.stdout)["result_cid"] == summary["result_cid"]
    for p in range(3):
        name = f"part-{p:05d}"
        assert (tmp_path / "got" / name).read_bytes() == (tmp_path / "out" / name).read_bytes()
    assert read_output(tmp_path / "got", 3)[0] == reference_counts(data)
    assert (tmp_path / "got" / "_SUCCESS").exists()
    missing = run_cli(["job", "get", "f" * 32], other.home, check=False)
    assert missing.returncode == 1 and "no node of the swarm has published a result" in missing.stderr


def test_ctrl_c_on_a_blocking_mr_without_a_terminal_cancels_the_job(cluster: LocalCluster,
                                                                   tmp_path: Path) -> None:
    node = cluster.nodes[1]
    make_input(tmp_path / "in.txt", seed=5)
    known = {j["id"] for j in history(node).jobs()}
    proc = subprocess.Popen(
        [sys.executable, "-m", "ipdc.cli", "mr", "--k", "3", str(tmp_path / "in.txt"), "--map",
         str(slow_map(tmp_path, 1.0)), "--chunks", "20", "-o", str(tmp_path / "out")],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "IPDC_HOME": str(node.home)}, cwd=tmp_path)
    try:
        def running() -> str:
            new = [j for j in history(node).jobs(states=["running"]) if j["id"] not in known]
            return new[0]["id"] if new and new[0]["progress"].get("map") else ""

        assert wait_for(lambda: bool(running()), 120, 0.05)
        job_id = running()
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert f"job {job_id} was cancelled" in err and "Traceback" not in err
    assert job_row(node, job_id)["state"] == "cancelled"
    assert not (tmp_path / "out").exists()


def test_dashboard_in_headless_chromium(cluster: LocalCluster, tmp_path: Path,
                                        tmp_path_factory: pytest.TempPathFactory) -> None:
    """The dashboard, as a user's browser sees it: a job started from the CLI appears and
    reaches `succeeded` without a reload; its page shows a timeline for every worker."""
    from selenium import webdriver
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    node = cluster.nodes[0]
    artifacts = Path(os.environ.get("IPDC_ARTIFACTS") or tmp_path_factory.mktemp("artifacts")) / "dashboard"
    artifacts.mkdir(parents=True, exist_ok=True)
    print(f"dashboard screenshots in {artifacts}")
    url = json.loads(run_cli(["dashboard", "--json"], node.home).stdout)["url"]
    assert url.startswith("http://127.0.0.1:") and "token=" in url
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run",
                 f"--user-data-dir={tmp_path / 'chromium'}", "--window-size=1280,900"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    try:
        driver.get(url)
        WebDriverWait(driver, 60).until(lambda d: d.find_element(By.ID, "live").text == "live")
        driver.execute_script("window.notReloaded = true")
        make_input(tmp_path / "in.txt", seed=6)
        job_id = detach(node, ["--k", "3", str(tmp_path / "in.txt"), "--map", str(slow_map(tmp_path, 0.3)),
                               "--chunks", "9", "-o", str(tmp_path / "out")])
        row = f'#jobs tr[data-job-id="{job_id}"]'
        # the page redraws on every update: read what it shows in one script, never a stale element
        shown = f'return document.querySelector(\'{row} .state\')?.textContent || ""'
        WebDriverWait(driver, 60).until(lambda d: d.execute_script(shown) in ("queued", "running",
                                                                              "succeeded"))
        WebDriverWait(driver, 180).until(lambda d: d.execute_script(shown) == "succeeded")
        assert driver.execute_script("return window.notReloaded === true"), "the page was reloaded"
        driver.save_screenshot(str(artifacts / "jobs.png"))

        WebDriverWait(driver, 30, ignored_exceptions=(StaleElementReferenceException,)).until(
            lambda d: d.find_element(By.CSS_SELECTOR, f"{row} a").click() or True)
        timeline = ("const lanes = {}; document.querySelectorAll('#timeline .worker').forEach((w) => "
                    "{ lanes[w.dataset.worker] = w.querySelectorAll('.attempt').length; }); return lanes;")
        workers = {w[0] for w in job_row(node, job_id)["workers"]}
        WebDriverWait(driver, 60).until(lambda d: workers <= set(d.execute_script(timeline)))
        lanes = driver.execute_script(timeline)
        assert all(lanes[name] >= 1 for name in workers), f"a worker without tasks on its timeline: {lanes}"
        assert driver.execute_script("return document.getElementById('job-state').textContent") == "succeeded"
        WebDriverWait(driver, 60).until(lambda d: d.find_elements(By.CSS_SELECTOR, "pre.logs"))
        driver.save_screenshot(str(artifacts / "job.png"))
        driver.set_window_size(390, 844)  # a phone
        driver.save_screenshot(str(artifacts / "job-phone.png"))
        driver.get(url + "#/peers")
        WebDriverWait(driver, 60).until(
            lambda d: len(d.find_elements(By.CSS_SELECTOR, "#peers tbody tr")) == 3)
        driver.save_screenshot(str(artifacts / "peers-phone.png"))
    finally:
        driver.quit()
    if os.environ.get("IPDC_UPDATE_DOCS"):  # the README's screenshot, refreshed on demand
        shutil.copy(artifacts / "job.png", REPO / "docs" / "dashboard-job.png")
