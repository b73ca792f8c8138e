"""``transformers serve`` on the real SmolLM2-135M-Instruct (127.0.0.1) as the API teacher of the engine: the
``openai`` client gets the model's own answer back, generated with the model's own chat template (the same text as
greedy generation with the model in this process)."""

from __future__ import annotations

import asyncio

from data_gen.config import DecodingConfig, TeacherConfig
from data_gen.engine import Request, build_engine
from kd_core.generation import encode_prompt, generate_batched
from tests.conftest import transformers_serve

QUESTIONS = ["What is the capital of France?", "Name a colour of the sky."]


def test_real_model_behind_transformers_serve_answers_through_the_engine(smollm2, smollm2_dir, tmp_path):
    model, tokenizer = smollm2
    local, _ = generate_batched(
        model, tokenizer, [encode_prompt(tokenizer, q) for q in QUESTIONS], max_new_tokens=16, batch_size=1
    )
    with transformers_serve(smollm2_dir, tmp_path / "serve.log") as port:
        cfg = TeacherConfig(
            model=str(smollm2_dir),
            base_url=f"http://127.0.0.1:{port}/v1",
            api_key_env=None,
            concurrency=1,
            timeout_s=120.0,
            max_retries=2,
            decoding=DecodingConfig(temperature=0.0, max_tokens=16),
        )
        engine = build_engine(cfg, tmp_path / "out", progress=False)

        async def ask():
            results = [
                r
                async for r in engine.run(
                    [Request(f"q{i}", [{"role": "user", "content": q}]) for i, q in enumerate(QUESTIONS)]
                )
            ]
            await engine.aclose()
            return sorted(results, key=lambda r: r.request.id)

        results = asyncio.run(ask())
    assert all(r.ok and r.output_tokens > 0 for r in results)
    # Real words, and the model's own greedy answer: the server applied the model's chat template.
    assert [r.text.strip() for r in results] == [g.text.strip() for g in local]
    assert "Paris" in results[0].text
