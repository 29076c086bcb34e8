"""The dashboard over a live server: pages and their HTML (httpx), CSRF, tenants and sessions,
and in a real browser (Debian's chromium through Playwright): a task's progress moves and its
end shows without a reload, an action asks for confirmation first."""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Header, HTTPException
from playwright.sync_api import sync_playwright

from conveyor import Conveyor, dashboard
from conveyor.service import create_app

from .support.faults import wait_until
from .support.live import LiveServer, follow, service_settings

pytestmark = pytest.mark.timeout(120)


def csrf_of(html: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', html)
    assert found is not None, "the page has a form with a CSRF token"
    return found.group(1)


def submit(client: httpx.Client, name: str = "demo.echo", **args: Any) -> str:
    response = client.post("/tasks", json={"name": name, "args": args or {"value": 1}})
    assert response.status_code == 202, response.text
    return str(response.json()["id"])


@pytest.fixture
def service(serve: Callable[[FastAPI], LiveServer], tmp_path: Path) -> LiveServer:
    return serve(create_app(service_settings(tmp_path)))


def test_overview_tasks_and_task_pages(service: LiveServer) -> None:
    with service.client() as client:
        done = [submit(client, value=i) for i in range(3)]
        for task_id in done:
            follow(client, task_id)
        failed = submit(client, "demo.fail", message="boom <b>")
        follow(client, failed)

        overview = client.get("/dashboard/")
        assert overview.status_code == 200 and "text/html" in overview.headers["content-type"]
        assert re.search(r'data-count="completed">3<', overview.text)
        assert re.search(r'data-count="failed">1<', overview.text)
        assert "demo.echo" in overview.text and "local" in overview.text, "types and workers"
        wait_until(  # the last hour's chart: counted by the worker, added to the store each second
            lambda: 'id="hour-completed">3<' in client.get("/dashboard/").text,
            10,
            "the chart's counts",
        )
        chart = client.get("/dashboard/").text
        assert 'id="hour-failed">1<' in chart and 'class="bar-completed"' in chart
        for asset in ("dashboard.css", "dashboard.js"):
            assert client.get(f"/dashboard/static/{asset}").status_code == 200

        listing = client.get("/dashboard/tasks", params={"status": "completed", "limit": 2})
        assert listing.status_code == 200
        shown = [task_id for task_id in done if task_id in listing.text]
        assert len(shown) == 2 and done[2] in shown, "newest first, two per page"
        older = re.search(r'href="([^"]+cursor=[0-9]+)"', listing.text)
        assert older is not None
        rest = client.get(older.group(1).replace("&amp;", "&"))
        assert done[0] in rest.text and failed not in rest.text, "the filter is kept"

        anything = client.get("/dashboard/tasks", params={"status": "", "name": ""})
        assert anything.status_code == 200 and failed in anything.text, "the form's 'any'"
        assert client.get("/dashboard/tasks", params={"status": "bogus"}).status_code == 422
        page = client.get(f"/dashboard/tasks/{failed}")
        assert "boom &lt;b&gt;" in page.text and "boom <b>" not in page.text
        assert "Traceback" in page.text and 'id="retry"' in page.text
        assert client.get("/dashboard/tasks/not-an-id").status_code in (404, 422)


def test_the_task_list_narrowed_by_id_time_and_batch(service: LiveServer) -> None:
    with service.client() as client:
        ids = [submit(client, value=i) for i in range(3)]
        batch = client.post("/batches", json={"name": "demo.echo", "items": [{"value": 7}]})
        one = client.get("/dashboard/tasks", params={"id_prefix": ids[1][:13]}).text
        assert ids[1] in one and ids[0] not in one and ids[2] not in one
        assert f"id_prefix={ids[1][:13]}" in one, "the live page and the next page keep it"
        now = datetime.now(UTC)
        form = {  # a datetime-local field sends no zone: UTC
            "created_after": (now - timedelta(minutes=5)).strftime("%Y-%m-%dT%H:%M:%S"),
            "created_before": (now + timedelta(minutes=5)).strftime("%Y-%m-%dT%H:%M:%S"),
        }
        window = client.get("/dashboard/tasks", params=form).text
        assert all(task_id in window for task_id in ids)
        later = {"created_after": (now + timedelta(minutes=5)).isoformat()}
        assert "No task matches" in client.get("/dashboard/tasks", params=later).text
        in_batch = client.get("/dashboard/tasks", params={"batch": batch.json()["id"]}).text
        assert not any(task_id in in_batch for task_id in ids) and "demo.echo" in in_batch
        bad = client.get("/dashboard/tasks", params={"created_after": "soon"})
        assert bad.status_code == 422 and "created_after" in bad.text


def test_batches_and_their_items(service: LiveServer) -> None:
    with service.client() as client:
        items = [{"value": 1}, {"value": 2}, {"message": "x"}]
        good = client.post("/batches", json={"name": "demo.echo", "items": items[:2]}).json()
        bad = client.post("/batches", json={"name": "demo.fail", "items": [items[2]]}).json()
        for made in (good, bad):
            follow(client, made["id"], kind="batches")
        listing = client.get("/dashboard/batches").text
        assert good["id"] in listing and bad["id"] in listing
        page = client.get(f"/dashboard/batches/{good['id']}").text
        item_ids = [t["id"] for t in client.get(f"/batches/{good['id']}/items").json()["items"]]
        assert all(task_id in page for task_id in item_ids) and "finished" in page
        failed = client.get(f"/dashboard/batches/{bad['id']}", params={"status": "failed"}).text
        assert "x" in failed and "No items" not in failed
        none = client.get(f"/dashboard/batches/{good['id']}", params={"status": "failed"}).text
        assert "No items of this status" in none
        assert client.get(f"/dashboard/batches/{good['id']}0").status_code == 404


def test_hostile_arguments_are_escaped_and_cut(service: LiveServer) -> None:
    with service.client() as client:
        hostile = "<script>alert(1)</script>" + "x" * 50_000
        task_id = submit(client, value={"a": hostile, "deep": [[[[["down"]]]]]})
        follow(client, task_id)
        page = client.get(f"/dashboard/tasks/{task_id}").text
        assert "<script>alert(1)" not in page and "&lt;script&gt;alert(1)" in page
        assert "characters)" in page and len(page) < 60_000, "a long value is cut"


def test_actions_need_the_csrf_token(service: LiveServer) -> None:
    with service.client() as client:
        task_id = submit(client, "demo.sleep", seconds=3600)
        page = client.get(f"/dashboard/tasks/{task_id}").text
        refused = client.post(f"/dashboard/tasks/{task_id}/cancel", data={})
        assert refused.status_code == 403
        forged = client.post(f"/dashboard/tasks/{task_id}/cancel", data={"csrf": "forged"})
        assert forged.status_code == 403
        assert client.get(f"/tasks/{task_id}").json()["status"] != "cancelled"
        done = client.post(f"/dashboard/tasks/{task_id}/cancel", data={"csrf": csrf_of(page)})
        assert done.status_code == 303
        assert follow(client, task_id)[0]["status"] == "cancelled"
        again = client.post(f"/dashboard/tasks/{task_id}/retry", data={"csrf": csrf_of(page)})
        assert again.status_code == 303
        assert client.get(f"/tasks/{task_id}").json()["status"] in ("queued", "running")


def test_bulk_retry_counts_first_and_is_capped(
    service: LiveServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A filtered set is counted before it is acted on, the action is a CSRF-checked POST that
    asks for confirmation, it touches at most ``BULK_MAX`` tasks (the newest), and only the
    statuses it applies to."""
    monkeypatch.setattr(dashboard, "BULK_MAX", 3)
    with service.client() as client:
        failed = [submit(client, "demo.fail", message=f"m{i}") for i in range(5)]
        finished = {t: follow(client, t)[0]["finished_at"] for t in failed}
        follow(client, submit(client, value=1))
        listing = client.get("/dashboard/tasks", params={"status": "failed"}).text
        assert 'id="bulk-retry"' in listing and 'id="bulk-cancel"' not in listing
        form = client.get("/dashboard/tasks/bulk", params={"action": "retry", "status": "failed"})
        assert form.status_code == 200
        assert re.search(r"3 failed tasks \(more match: the newest 3", form.text), form.text
        assert 'data-confirm="Retry 3 tasks?"' in form.text
        fields = {"action": "retry", "status": "failed", "name": ""}
        assert client.post("/dashboard/tasks/bulk", data=fields).status_code == 403
        done = client.post("/dashboard/tasks/bulk", data=fields | {"csrf": csrf_of(form.text)})
        assert done.status_code == 303 and "done=retry%3A3" in done.headers["location"]
        again = {t: follow(client, t)[0]["finished_at"] for t in failed}
        rerun = [t for t in failed if again[t] != finished[t]]
        assert rerun == failed[2:], "the newest three ran again, the others did not"
        assert "Retried 3 tasks" in client.get(done.headers["location"]).text
        wrong = client.get("/dashboard/tasks/bulk", params={"action": "retry", "status": "queued"})
        assert wrong.status_code == 422 and "cancelled or failed" in wrong.text
        none = client.get("/dashboard/tasks/bulk", params={"action": "cancel", "status": "queued"})
        assert "No queued task matches" in none.text and 'id="bulk"' not in none.text


def test_workers_and_schedules_pages(service: LiveServer) -> None:
    """The workers page shows the server's worker; a schedule is listed with its next fires
    and history; trigger, pause and resume are CSRF-checked POSTs that do what they say."""
    with service.client() as client:
        workers = client.get("/dashboard/workers")
        assert workers.status_code == 200
        (worker,) = client.get("/workers").json()["items"]
        assert worker["id"] in workers.text and str(worker["pid"]) in workers.text
        body = {
            "name": "nightly <b>",
            "task": "demo.echo",
            "args": {"value": "<script>x</script>"},
            "cron": "30 2 * * *",
            "timezone": "Europe/Oslo",
        }
        schedule = client.post("/schedules", json=body).json()
        listing = client.get("/dashboard/schedules").text
        assert f"/dashboard/schedules/{schedule['id']}" in listing
        assert "nightly &lt;b&gt;" in listing and "nightly <b>" not in listing
        path = f"/dashboard/schedules/{schedule['id']}"
        page = client.get(path).text
        assert "30 2 * * *" in page and "Europe/Oslo" in page and "No fires yet" in page
        assert page.count("T02:30:00+0") == 5, "the next five fires, in local time"
        assert "&lt;script&gt;" in page and "<script>x" not in page

        assert client.post(f"{path}/trigger", data={}).status_code == 403
        triggered = client.post(f"{path}/trigger", data={"csrf": csrf_of(page)})
        assert triggered.status_code == 303
        task_id = triggered.headers["location"].rsplit("/", 1)[1]
        assert follow(client, task_id)[0]["result"] == "<script>x</script>"
        history = client.get(path).text
        assert task_id in history and "triggered" in history

        paused = client.post(f"{path}/pause", data={"csrf": csrf_of(page)})
        assert paused.status_code == 303
        assert client.get(f"/schedules/{schedule['id']}").json()["enabled"] is False
        assert 'id="resume"' in client.get(path).text
        client.post(f"{path}/resume", data={"csrf": csrf_of(page)})
        assert client.get(f"/schedules/{schedule['id']}").json()["enabled"] is True
        assert client.get("/dashboard/schedules/0").status_code == 404


def test_tenants_and_sessions(serve: Callable[[FastAPI], LiveServer], tmp_path: Path) -> None:
    settings = service_settings(tmp_path, api_keys="alpha:alpha-secret-key,beta:beta-secret-key")
    server = serve(create_app(settings))
    api_a = server.client(headers={"authorization": "Bearer alpha-secret-key"})
    api_b = server.client(headers={"authorization": "Bearer beta-secret-key"})
    browser = server.client(follow_redirects=False)
    with api_a, api_b, browser:
        mine, theirs = submit(api_a, value=1), submit(api_b, value=2)
        follow(api_a, mine)
        assert browser.get("/dashboard/").status_code == 303
        assert browser.post("/dashboard/login", data={"key": "nope"}).status_code == 401
        signed = browser.post("/dashboard/login", data={"key": "alpha-secret-key"})
        assert signed.status_code == 303
        cookie = signed.headers["set-cookie"].lower()
        assert "httponly" in cookie and "samesite=strict" in cookie
        assert "alpha-secret-key" not in cookie, "the key itself is never stored"
        listing = browser.get("/dashboard/tasks").text
        assert mine in listing and theirs not in listing
        assert browser.get(f"/dashboard/tasks/{theirs}").status_code == 404
        page = browser.get(f"/dashboard/tasks/{mine}").text
        stolen = browser.post(f"/dashboard/tasks/{theirs}/delete", data={"csrf": csrf_of(page)})
        assert stolen.status_code == 404
        assert api_b.get(f"/tasks/{theirs}").status_code == 200
        batch = api_b.post("/batches", json={"name": "demo.echo", "items": [{"value": 3}]}).json()
        assert batch["id"] not in browser.get("/dashboard/batches").text
        assert browser.get(f"/dashboard/batches/{batch['id']}").status_code == 404
        hourly = {"name": "b-hourly", "task": "demo.echo", "args": {"value": 1}, "every_s": 3600}
        their_schedule = api_b.post("/schedules", json=hourly).json()
        assert "b-hourly" not in browser.get("/dashboard/schedules").text
        schedule_path = f"/dashboard/schedules/{their_schedule['id']}"
        assert browser.get(schedule_path).status_code == 404
        forced = browser.post(f"{schedule_path}/trigger", data={"csrf": csrf_of(page)})
        assert forced.status_code == 404
        assert api_b.get(f"/schedules/{their_schedule['id']}/fires").json()["items"] == []
        follow(api_b, theirs)
        late = submit(api_a, value=4)
        follow(api_a, late)
        wait_until(  # beta's task ended before alpha's second: counted by then, not shown to alpha
            lambda: 'id="hour-completed">2<' in browser.get("/dashboard/").text,
            10,
            "alpha's two tasks in its chart",
        )
        browser.cookies.set("conveyor_session", "YmV0YQ|9999999999|forged")
        assert browser.get("/dashboard/").status_code == 303, "a forged cookie is refused"


def test_mounted_in_any_app_with_its_own_auth(
    serve: Callable[[FastAPI], LiveServer], make_yard: Callable[..., Conveyor]
) -> None:
    yard = make_yard()

    async def app_user(x_user: str | None = Header(default=None)) -> str | None:
        if x_user is None:
            raise HTTPException(401, "who are you?")
        return None if x_user == "operator" else x_user  # an operator sees every tenant

    app = FastAPI(lifespan=yard.lifespan)
    app.include_router(yard.router())
    app.mount("/ops", yard.dashboard(auth=app_user))
    with serve(app).client() as client:
        assert client.get("/ops/").status_code == 401
        page = client.get("/ops/", headers={"x-user": "ann"})
        assert page.status_code == 200 and 'href="/ops/tasks"' in page.text
        task_id = submit(client, "t.echo", value=1)  # the router's tenant: "" (no API keys)
        follow(client, task_id)
        assert task_id not in client.get("/ops/tasks", headers={"x-user": "ann"}).text
        assert task_id in client.get("/ops/tasks", headers={"x-user": "operator"}).text


@pytest.fixture
def browser() -> Iterator[Any]:
    executable = shutil.which("chromium")
    assert executable, "make test installs Debian's chromium"
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        yield launched
        launched.close()


def test_in_a_browser_progress_moves_and_actions_confirm(service: LiveServer, browser: Any) -> None:
    with service.client() as client:
        page = browser.new_page()
        page.goto(f"{service.url}/dashboard/tasks")
        appearing = submit(client, "demo.sleep", seconds=0.5, steps=2)
        row = page.locator("#tasks tr", has_text=appearing)
        row.wait_for(timeout=15_000)  # shown without a reload
        page.wait_for_function(
            "id => [...document.querySelectorAll('#tasks tr')].some("
            "r => r.textContent.includes(id) && r.textContent.includes('completed'))",
            arg=appearing,
            timeout=15_000,
        )
        slow = submit(client, "demo.sleep", seconds=2, steps=4)
        page.goto(f"{service.url}/dashboard/tasks/{slow}")
        page.wait_for_function(
            "Number(document.getElementById('progress').value) > 0", timeout=15_000
        )
        page.wait_for_selector("#result", timeout=15_000)  # reloaded once it ended
        assert page.inner_text("#status") == "completed"

        waiting = submit(client, "demo.sleep", seconds=3600)
        page.goto(f"{service.url}/dashboard/tasks/{waiting}")
        asked: list[str] = []

        def decline(dialog: Any) -> None:
            asked.append(dialog.message)
            dialog.dismiss()

        page.once("dialog", decline)
        page.click("#cancel")
        assert asked == ["Cancel this task?"]
        assert client.get(f"/tasks/{waiting}").json()["status"] != "cancelled"
        page.once("dialog", lambda dialog: dialog.accept())
        page.click("#cancel")
        page.wait_for_selector("#retry", timeout=15_000)
        assert follow(client, waiting)[0]["status"] == "cancelled"
        page.goto(f"{service.url}/dashboard/")
        assert page.inner_text('[data-count="cancelled"]') == "1"
