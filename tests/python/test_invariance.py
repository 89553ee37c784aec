"""Invariance through HTTP (llama.cpp's black-box idea): streaming, concurrency and other traffic
must not change what a request generates."""

from concurrent.futures import ThreadPoolExecutor

from conftest import chat

PROMPTS = [
    "Name three rivers.",
    "What is 2 + 2?",
    "Write a haiku about autumn.",
    "Explain gravity in one sentence.",
    "List four colors.",
    "Who wrote Hamlet?",
    "Give me a synonym for happy.",
    "What is the capital of Japan?",
]


def test_stream_equals_non_stream(client):
    for p in PROMPTS[:4]:
        plain = chat(client, p, max_tokens=24)
        chunks = list(chat(client, p, max_tokens=24, stream=True))
        text = "".join(ch.delta.content or "" for c in chunks for ch in c.choices)
        assert text == plain.choices[0].message.content, p
        assert chunks[-1].choices[0].finish_reason == plain.choices[0].finish_reason


def test_greedy_unchanged_under_8_concurrent(client):
    solo = [chat(client, p, max_tokens=24).choices[0].message.content for p in PROMPTS]
    with ThreadPoolExecutor(8) as pool:
        for _ in range(2):
            together = list(pool.map(lambda p: chat(client, p, max_tokens=24).choices[0].message.content, PROMPTS))
            assert together == solo
        # Streamed and non-streamed mixed in one batch.
        def mixed(i):
            p = PROMPTS[i]
            if i % 2:
                return "".join(ch.delta.content or "" for c in chat(client, p, max_tokens=24, stream=True) for ch in c.choices)
            return chat(client, p, max_tokens=24).choices[0].message.content
        assert list(pool.map(mixed, range(8))) == solo
