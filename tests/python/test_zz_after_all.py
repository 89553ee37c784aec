"""Runs last (pytest orders files by name): the whole suite left no KV block in use and the
server counted no 5xx (except /health's 503 while the model loaded)."""

import re

from conftest import wait_blocks_free


def test_all_blocks_free_after_suite(http):
    wait_blocks_free(http, timeout=10)


def test_no_server_errors_counted(http):
    text = http.get("/metrics").text
    five = [l for l in text.splitlines()
            if l.startswith("kiln:http_requests_total{") and 'status="5' in l and 'route="/health"' not in l]
    assert not five, "server errors were counted:\n" + "\n".join(five)
