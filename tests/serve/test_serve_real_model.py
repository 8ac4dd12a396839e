"""A real trained model end to end: ``chitu serve`` on the SmolLM2-135M-Instruct GGUF
(cpu_ref, fp32) answers the official ``openai`` client sensibly. The default test run's
real-model check: GGUF loader, GGUF tokenizer, chat template and eos all take part."""

from __future__ import annotations

import pytest
from serve_helpers import start_server, stop_cleanly

openai = pytest.importorskip("openai", reason="the official OpenAI client drives the server")

NAME = "smollm2"


def test_smollm2_answers_through_serve(smollm2_gguf, tmp_path):
    server = start_server(smollm2_gguf, tmp_path, "--num-blocks", "32", "--served-model-name", NAME)
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", timeout=300)
        reply = client.chat.completions.create(
            model=NAME,
            messages=[{"role": "user", "content": "What is 2+2?"}],
            max_tokens=32,
            temperature=0,
        )
        answer = reply.choices[0]
        assert "4" in answer.message.content, answer.message.content
        # The GGUF's eos (<|im_end|>) ends the turn, well before max_tokens.
        assert answer.finish_reason == "stop", answer
        completion = client.completions.create(
            model=NAME, prompt="The capital of France is", max_tokens=2, temperature=0
        )
        assert "Paris" in completion.choices[0].text, completion.choices[0].text
    finally:
        stop_cleanly(server)
