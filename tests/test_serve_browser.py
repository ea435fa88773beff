"""The demo page in a real headless browser: Debian's Chromium, driven by Playwright (browser
downloads are impossible here, so Playwright launches the system binary)."""
import threading
import time

import pytest

pytestmark = pytest.mark.slow


def test_clicking_a_recommendation_adds_it_and_the_list_changes(tmp_path, chromium):
    import uvicorn
    from playwright.sync_api import expect, sync_playwright

    from perseq.bench.serve import _free_port
    from perseq.cli import main
    from perseq.serve.app import create_app

    assert main(["train", "--set", "data.synthetic={n_users: 40, n_items: 40, n_clusters: 4, mean_len: 20, max_len: 40}",
                 "--set", "model.name=sasrec", "--set", "model.d=16", "--set", "train.epochs=1", "--out", str(tmp_path),
                 "--name", "s", "--no-progress"]) == 0
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(str(tmp_path / "s-s0"), str(tmp_path / "state.sqlite")),
                                           host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:  # a server that cannot start fails the test, not hangs it
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
            page = browser.new_page()
            page.goto(f"http://127.0.0.1:{port}/")
            page.fill("#user", "alice")
            page.click("#load")
            expect(page.locator("#cold")).to_contain_text("cold start")  # a new user: popular items
            expect(page.locator("#recs li")).to_have_count(10)
            first = page.locator("#recs button.item").first
            clicked = first.get_attribute("data-item")
            before = page.locator("#recs button.item").evaluate_all("els => els.map(e => e.dataset.item)")
            first.click()
            expect(page.locator("#history li").first).to_have_text(clicked)  # now the newest event
            expect(page.locator("#cold")).to_have_text("")  # recommendations from the model now
            after = page.locator("#recs button.item").evaluate_all("els => els.map(e => e.dataset.item)")
            assert clicked not in after and after != before  # seen items are left out; the list changed
            page.fill("#item", "i3")  # typing an item id adds it too
            page.click("#add")
            expect(page.locator("#history li").first).to_have_text("i3")
            expect(page.locator("#history li")).to_have_count(2)
            assert page.locator("#error").inner_text() == ""
            browser.close()
    finally:
        server.should_exit = True
        thread.join(10)
